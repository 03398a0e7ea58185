"""The decoder forward, written once for every architecture, over ops in lmc.kernels.

Each op dispatches to its Triton kernel on CUDA and to its torch reference elsewhere. The
blocks (`attention_block`, `mlp_block`, `decoder_layer`) are plain functions of a layer's
weights so that AWQ calibration runs exactly this code with modified weights.
"""
from __future__ import annotations

import os

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmc.kernels.attention import paged_decode_attention, paged_prefill_attention, write_kv_cache
from lmc.kernels.gather import gather_columns
from lmc.kernels.gemv import gemv_config, gemv_triton
from lmc.kernels.kv_quant import QuantizedKV
from lmc.kernels.rmsnorm import rms_norm
from lmc.kernels.rotary import apply_rotary, rotary_decode_attention, rotary_write_kv
from lmc.kernels.silu_mul import silu_mul
from lmc.kernels.w4a16 import device_name, w4a16_matmul, w4a16_silu_matmul, x_in_kk_order
from lmc.kernels.w4a16_mma import mma_eligible, mma_layout
from lmc.kernels.w4a16_wgmma import kk_columns, wgmma_available
from lmc.kernels.w4a16_tuning import has_mma
from lmc.errors import LmcError, WorkspaceError
from lmc.format.archs import INT4_LEAVES, LAYER_NAMES, LINEAR_KEYS, layer_params, linear_shape, rank_config
from lmc.format.int4 import dequantize_lmc, quantize_int4, to_lmc_tensors
from lmc.format.config import ModelConfig
from lmc.runtime.device import host_available
from lmc.runtime.rope import Rope
from lmc.format.workspace import Workspace, index_key, rank_name


@dataclass
class Int4Weight:
    """A linear stored as lmc-int4-k8 (see docs/workspace-format.md)."""

    qweight: torch.Tensor  # [ceil(K/8), N] int32
    scales: torch.Tensor  # [ceil(K/G), N]
    zeros: torch.Tensor  # [ceil(K/G), N]
    group_size: int
    mma: tuple[torch.Tensor, torch.Tensor] | None = None  # (qfrag, sz): the mma layout (kernels/w4a16_mma.py)
    mma_silu: bool = False  # mma is the gate/up layout (mlp_hidden's), not a plain one
    perm: torch.Tensor | None = None  # [K] int32, act-order: stored input column j is input column perm[j] (linear()
    # gathers x by it; w_qkv's and w13's move to the norm before them at load, load_layer)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w^T -> [T, N]; w is a float [N, K] tensor or an Int4Weight. One token with a float weight
    takes lmc's GEMV where this GPU's table has the shape (kernels/gemv.py), cuBLAS otherwise."""
    if isinstance(w, Int4Weight):
        x = x if w.perm is None else gather_columns(x, w.perm)  # [T, K] in the stored column order
        y = w4a16_matmul(x, w.qweight, w.scales, w.zeros, w.group_size, mma=None if w.mma_silu else w.mma)
        return y + bias if bias is not None else y
    config = gemv_config(x, w)
    if config is not None:
        y = gemv_triton(x.contiguous(), w, *config)
        return y + bias if bias is not None else y
    return F.linear(x, w, bias)


# ----------------------------------------------------------------------------- attention contexts


@dataclass
class PagedBatch:
    """Where this step's tokens sit in the paged KV cache (prefill or decode)."""

    k_cache: list[torch.Tensor | QuantizedKV]  # per layer [num_blocks, block_size, Hkv, D] or quantized (8, 4 bits)
    v_cache: list[torch.Tensor | QuantizedKV]
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    kv_lens: torch.Tensor  # [B] int32, tokens in cache after this step
    cu_seqlens_q: torch.Tensor | None  # [B+1] int32 for prefill; None for decode (one token each)
    max_q: int | None = None  # prefill: the longest sequence's new tokens (None: read from cu_seqlens_q, a sync)

    @staticmethod
    def longest_run(cu: torch.Tensor | None) -> int | None:
        """max_q from host cu_seqlens_q [B+1] (None for decode), so the prefill attention never waits for the GPU."""
        return None if cu is None else int((cu[1:] - cu[:-1]).max())

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        write_kv_cache(k, v, self.k_cache[layer], self.v_cache[layer], self.slot_mapping)
        return self._attend_cached(layer, q, scale)

    def rotate_attend(self, layer: int, q, k, v, cos, sin, scale: float) -> torch.Tensor:
        """Rotary on q and k, k and v into the cache (one kernel on CUDA), then attention; at decode on CUDA over
        a float cache, from rotary.FUSED_ROPE_MIN_BATCH sequences, all of it is one kernel
        (rotary_decode_attention)."""
        if self.cu_seqlens_q is None:
            return rotary_decode_attention(q, k, v, cos, sin, self.k_cache[layer], self.v_cache[layer],
                                           self.slot_mapping, self.block_tables, self.kv_lens, scale)
        q = rotary_write_kv(q, k, v, cos, sin, self.k_cache[layer], self.v_cache[layer], self.slot_mapping)
        return self._attend_cached(layer, q, scale)

    def _attend_cached(self, layer: int, q, scale: float) -> torch.Tensor:
        if self.cu_seqlens_q is None:
            return paged_decode_attention(q, self.k_cache[layer], self.v_cache[layer], self.block_tables, self.kv_lens, scale)
        return paged_prefill_attention(q, self.k_cache[layer], self.v_cache[layer], self.block_tables,
                                       self.cu_seqlens_q, self.kv_lens, scale, self.max_q)


@dataclass
class DenseCausal:
    """B sequences of S tokens each, no cache (calibration and perplexity)."""

    batch: int
    seqlen: int

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        b, s = self.batch, self.seqlen
        q = q.view(b, s, *q.shape[1:]).transpose(1, 2)  # [B, Hq, S, D]
        k = k.view(b, s, *k.shape[1:]).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(b, s, *v.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)  # [B, Hq, S, D]
        return o.transpose(1, 2).reshape(b * s, *o.shape[1:2], o.shape[-1])  # [T, Hq, D]

    def rotate_attend(self, layer: int, q, k, v, cos, sin, scale: float) -> torch.Tensor:
        q, k = apply_rotary(q, k, cos, sin)
        return self.attend(layer, q, k, v.contiguous(), scale)


# ----------------------------------------------------------------------------- blocks


def attention_core(cfg: ModelConfig, lw: dict, h: torch.Tensor, cos, sin, ctx, layer: int) -> torch.Tensor:
    """h [T, H] (already normed) -> attention heads [T, Hq*D], the input of wo."""
    t = h.shape[0]
    qkv = linear(h, lw["w_qkv"], lw.get("w_qkv_bias"))  # [T, (Hq + 2 Hkv) D]
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.reshape(t, cfg.num_heads, cfg.head_dim)  # [T, Hq, D]
    k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)  # [T, Hkv, D]
    v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q.reshape(-1, cfg.head_dim), lw["q_norm"], cfg.rms_norm_eps)[0].view_as(q)
        k = rms_norm(k.reshape(-1, cfg.head_dim), lw["k_norm"], cfg.rms_norm_eps)[0].view_as(k)
    o = ctx.rotate_attend(layer, q, k, v, cos, sin, cfg.head_dim ** -0.5)  # [T, Hq, D]
    return o.reshape(t, cfg.q_size)


def attention_block(cfg: ModelConfig, lw: dict, h: torch.Tensor, cos, sin, ctx, layer: int) -> torch.Tensor:
    """h [T, H] (already normed) -> attention output [T, H] (before the residual add)."""
    return linear(attention_core(cfg, lw, h, cos, sin, ctx, layer), lw["wo"])


def mlp_hidden(lw: dict, h: torch.Tensor, x_kk: bool = False) -> torch.Tensor:
    """h [T, H] (already normed; x_kk: its columns in the gate/up kernel's k order, ffn_norm_columns) -> silu(gate)
    * up [T, I], the input of w2."""
    w13 = lw["w13"]
    if isinstance(w13, Int4Weight):  # decode: one kernel, the activation in the GEMV's epilogue
        mma = w13.mma if w13.mma_silu else None
        return w4a16_silu_matmul(h, w13.qweight, w13.scales, w13.zeros, w13.group_size, mma, x_kk)  # [T, I]
    if x_kk:
        raise LmcError("mlp_hidden: x in the int4 kernel's k order for a float gate/up weight")
    config = gemv_config(h, w13)
    if config is not None:  # one token on a tuned shape: the float GEMV with the activation in its epilogue
        return gemv_triton(h.contiguous(), w13, *config, silu_mul=True)  # [1, I]
    return silu_mul(linear(h, w13))  # [T, 2I] -> [T, I]


def mlp_block(lw: dict, h: torch.Tensor, x_kk: bool = False) -> torch.Tensor:
    """h [T, H] (already normed; x_kk as in mlp_hidden) -> [T, H]."""
    return linear(mlp_hidden(lw, h, x_kk), lw["w2"])


def ffn_norm_columns(lw: dict, tokens: int) -> tuple[torch.Tensor | None, bool]:
    """The column order the RMSNorm before the MLP writes for `tokens` rows, and whether it is the gate/up wgmma
    kernel's k order: where that kernel reads x by TMA at this M (the table's choice), the norm writes x in its kk
    order (`w13_in_kk`, set at load: kk_columns composed with an act-order w13_in) and the kernel copies nothing;
    else the act-order order w13_in, or None."""
    kk = lw.get("w13_in_kk")
    if kk is not None:
        w13 = lw["w13"]
        if x_in_kk_order(tokens, w13.qweight.shape[1], kk.shape[0], kk.device, True):
            return kk, True
    return lw.get("w13_in"), False


def decoder_layer(cfg: ModelConfig, lw: dict, h: torch.Tensor, residual: torch.Tensor, next_norm: tuple,
                  cos, sin, ctx, layer: int, add_norm) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer from its normed input h [T, H]: returns the output normed by `next_norm` (the next layer's
    attention_norm, or the final norm, with the column order its reader wants: (weight, columns or None)) and
    the residual stream [T, H]. `add_norm(x, residual, weight, slot, columns)` adds a block's output to the
    residual stream and norms the sum: (normed, new residual); columns: the input order of the act-order linear
    that reads it, the normed columns given in that order (kernels/rmsnorm.py). Under tensor parallelism
    it first sums the row-parallel linear's partial outputs over the ranks (one kernel on CUDA: kernels/allreduce.py);
    slot 0 after attention, 1 after the MLP (the one-shot all-reduce alternates its buffers by it)."""
    a = attention_block(cfg, lw, h, cos, sin, ctx, layer)  # [T, H] (this rank's part of the sum)
    columns, x_kk = ffn_norm_columns(lw, a.shape[0])
    h, residual = add_norm(a, residual, lw["ffn_norm"], 0, columns)
    m = mlp_block(lw, h, x_kk)  # [T, H] (this rank's part of the sum)
    weight, columns = next_norm
    return add_norm(m, residual, weight, 1, columns)


# ----------------------------------------------------------------------------- weights and model

def add_kk_columns(lw: dict) -> None:
    """lw["w13_in_kk"]: the column order in which the RMSNorm before the MLP can write x for the gate/up wgmma
    kernel's TMA path (kernels/w4a16_wgmma.kk_columns, after an act-order w13_in), where that kernel can run: an
    int4 w13 with its gate/up mma layout on a Hopper GPU, and not LMC_KK_NORM=0 (an A/B switch: the kernel then
    copies x into that order itself). ffn_norm_columns picks it per M."""
    w13 = lw.get("w13")
    if (not isinstance(w13, Int4Weight) or w13.mma is None or not w13.mma_silu or w13.perm is not None
            or not wgmma_available(w13.qweight.device) or os.environ.get("LMC_KK_NORM", "1") == "0"):
        return
    kk = kk_columns(w13.qweight.shape[0] * 8, w13.qweight.device)  # [K] int32
    base = lw.get("w13_in")
    lw["w13_in_kk"] = kk if base is None else base[kk.long()].contiguous()  # normed column base[kk[c]]


def load_tensor(ws: Workspace, name: str, device, dtype, rows: range | None = None) -> torch.Tensor:
    """A workspace tensor on `device` (floats in `dtype`); `rows`: only those rows of its first dimension, cut from
    the mapped file before the copy (on the CPU in the stored dtype, a view of the file)."""
    t = ws.get(name)
    if rows is not None:
        t = t[rows.start:rows.stop]
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def mma_wanted(device: torch.device, dtype: torch.dtype, k: int, n: int, group: int, silu: bool) -> bool:
    """Whether an int4 linear also gets the mma layout (kernels/w4a16_mma.py, _mma_wide.py, _wgmma.py: the tensor-core
    paths the table names, one more copy of its words): float16 on a GPU whose tuning table has mma entries, a shape the
    layout takes, and not LMC_INT4_MMA=0."""
    return (device.type == "cuda" and dtype == torch.float16 and os.environ.get("LMC_INT4_MMA", "1") != "0"
            and mma_eligible(k, n, group, silu) and has_mma(device_name(device)))


def load_linear(ws: Workspace, base: str, device, dtype, in_features: int, dense: bool = False,
                silu: bool = False):
    """A float [N, K] weight, or an Int4Weight; `dense`: int4 dequantized once here (the CPU path, where a
    dequantize per call would dominate the step); silu: the MLP's fused gate/up weight (its mma layout pairs gate
    and up columns)."""
    if ws.has(base + ".weight"):
        return load_tensor(ws, base + ".weight", device, dtype)
    qweight, scales, zeros = (load_tensor(ws, base + leaf, device, dtype) for leaf in INT4_LEAVES)
    perm = act_order_perm(ws, base, in_features, device)
    return int4_linear(qweight, scales, zeros, ws.quantization["group_size"], in_features, dtype, dense, silu, perm)


def act_order_perm(ws: Workspace, base: str, in_features: int, device) -> torch.Tensor | None:
    """An act-order linear's input order [K] int32 on `device` (None: the linear has none), checked to be a
    permutation of 0..K-1 (an index outside it would read past x)."""
    if not ws.has(base + ".perm"):
        return None
    perm = ws.get(base + ".perm")  # [K] int32, mapped
    if not torch.equal(torch.sort(perm).values, torch.arange(in_features, dtype=perm.dtype)):
        raise WorkspaceError(f"{ws.path}: {base}.perm is not a permutation of 0..{in_features - 1}; the workspace is "
                             "corrupt: rebuild it with `lmc convert`")
    return perm.to(device)


def int4_linear(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, in_features: int,
                dtype: torch.dtype, dense: bool = False, silu: bool = False, perm: torch.Tensor | None = None):
    """lmc-int4-k8 tensors on their device -> what `linear` takes: an Int4Weight (with the mma layout where
    mma_wanted), or with `dense` the dequantized float [N, K] weight (an act-order `perm` undone: its columns in
    the input's order)."""
    if dense:
        w = dequantize_lmc(qweight, scales, zeros, group, in_features).t().to(dtype)  # [N, K], stored column order
        if perm is None:
            return w.contiguous()
        out = torch.empty_like(w)  # [N, K]
        out[:, perm.long()] = w
        return out
    if mma_wanted(qweight.device, dtype, qweight.shape[0] * 8, qweight.shape[1], group, silu):
        return Int4Weight(qweight, scales, zeros, group, mma_layout(qweight, scales, zeros, group, silu), silu, perm)
    return Int4Weight(qweight, scales, zeros, group, perm=perm)


LM_HEAD_GROUP = 128  # the int4 lm_head's group size when the workspace is float (a quantized one's own otherwise)
_QUANTIZE_ROWS = 8192  # lm_head rows quantized at a time: the float32 temporaries stay ~0.1-0.2 GB at H = 4096


def quantize_lm_head(w: torch.Tensor, group: int, dtype: torch.dtype, dense: bool = False):
    """A float lm_head [V, H] quantized where it lies (RTN, asymmetric, groups of `group` along H: the workspace
    codec's lmc-int4-k8), in blocks of rows so that no temporary grows with the vocabulary -> int4_linear's
    result (`dense`: dequantized again, the CPU's path). Deterministic: the same weight in the same dtype gives
    the same codes on every device, and a rank's rows the codes of the whole head's."""
    parts = [to_lmc_tensors(*quantize_int4(w[r:r + _QUANTIZE_ROWS], group), dtype)
             for r in range(0, w.shape[0], _QUANTIZE_ROWS)]  # (qweight [H/8, rows], scales, zeros [H/G, rows])
    qweight, scales, zeros = (torch.cat(t, dim=1) for t in zip(*parts))  # [H/8, V], [H/G, V], [H/G, V]
    return int4_linear(qweight, scales, zeros, group, w.shape[1], dtype, dense)


NORMED_INPUT = ("w_qkv", "w13")  # the linears whose input an RMSNorm writes: it reads its row in their act-order


def load_layer(ws: Workspace, i: int, device, dtype, dense: bool = False) -> dict:
    lw = {}
    for key, suffix in LAYER_NAMES.items():
        name = f"layers.{i}.{suffix}"
        if key in LINEAR_KEYS:
            lw[key] = load_linear(ws, name, device, dtype, linear_shape(ws.config, key)[1], dense, key == "w13")
            if key in NORMED_INPUT and isinstance(lw[key], Int4Weight) and lw[key].perm is not None:
                lw[key + "_in"], lw[key].perm = lw[key].perm, None  # [K]: the norm before it gathers instead
        elif ws.has(name):
            lw[key] = load_tensor(ws, name, device, dtype)
    return lw


class RankView:
    """Rank `rank`'s tensors of a workspace split for tp > 1, under their tp = 1 names (split tensors are
    stored as `rank:base.rank.leaf`, whole ones as `rank:name`: format/workspace.py `rank_name`)."""

    def __init__(self, ws: Workspace, rank: int):
        self.ws, self.rank = ws, rank
        self.config = rank_config(ws.config, ws.tp)
        self.quantization = ws.quantization

    def _key(self, name: str) -> str:
        split = index_key(rank_name(name, self.rank, self.ws.tp, True), self.rank, self.ws.tp)
        return split if self.ws.has(split) else index_key(name, self.rank, self.ws.tp)

    def get(self, name: str) -> torch.Tensor:
        return self.ws.get(self._key(name))

    def has(self, name: str) -> bool:
        return self.ws.has(self._key(name))


class Model:
    """Weights on the device and the forward over a flat batch of tokens. With a Shard (tp > 1) this is one
    rank's slice: `cfg` is that slice's config (runtime/distributed.py), and the lm_head is the shard's
    `vocab_rows` of the workspace's (a view of the embedding when tied; the embedding itself stays whole)."""

    def __init__(self, ws: Workspace, device: torch.device, dtype: torch.dtype, shard=None, lm_head: str = "float"):
        if ws.tp != (shard.tp if shard is not None else 1):
            raise LmcError(f"{ws.path} is split for tp={ws.tp}; run it with --tp {ws.tp} on {ws.tp} devices, "
                           "or convert the checkpoint with --tp 1")
        self.shard = shard
        src = RankView(ws, shard.rank) if shard is not None else ws
        self.cfg, self.device, self.dtype = src.config, device, dtype
        if shard is not None:
            shard.use_one_shot(dtype, device)
        dense_bytes = self.cfg.num_layers * layer_params(self.cfg) * dtype.itemsize
        self.dense_int4 = bool(ws.quantization) and device.type == "cpu" and dense_bytes < host_available() // 2
        self.embed = load_tensor(src, "tok_embeddings.weight", device, dtype)  # [V, H]
        self.layers = [load_layer(src, i, device, dtype, self.dense_int4) for i in range(self.cfg.num_layers)]
        if shard is None:  # the tp add_norm (all-reduce + RMSNorm) writes no column order
            for lw in self.layers:
                add_kk_columns(lw)
        self.norm = load_tensor(src, "norm.weight", device, dtype)
        self.next_norms = [(lw["attention_norm"], lw.get("w_qkv_in")) for lw in self.layers[1:]] + [(self.norm, None)]
        rows = shard.vocab_rows(self.cfg.vocab_size) if shard is not None else range(self.cfg.vocab_size)
        self.split_lm_head = shard is not None and shard.split_lm_head  # logits() is then a collective
        self.lm_head = self.embed[rows.start:rows.stop] if self.cfg.tie_word_embeddings else \
            load_tensor(src, "output.weight", device, dtype, rows)  # [rows, H], float in every workspace
        if lm_head == "int4":  # EngineConfig.lm_head: quantized here, the workspace unchanged
            group = ws.quantization["group_size"] if ws.quantization else LM_HEAD_GROUP
            self.lm_head = quantize_lm_head(self.lm_head, group, dtype, dense=device.type == "cpu")
        self.rope = Rope(self.cfg, device)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx, max_position: int,
               input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T] -> final normed hidden states [T, H]; input_embeds [T, H] replaces the
        token embeddings (a prompt with images; tp = 1 only)."""
        if self.shard is not None:
            self.shard.broadcast_ids(input_ids)  # the followers' ids are rank 0's
        cos, sin = self.rope(positions, max_position)
        x = self.embed[input_ids] if input_embeds is None else input_embeds  # [T, H]
        first = self.layers[0]
        h, residual = rms_norm(x, first["attention_norm"], self.cfg.rms_norm_eps, None, first.get("w_qkv_in"))  # residual: x
        for i, (lw, next_norm) in enumerate(zip(self.layers, self.next_norms)):
            h, residual = decoder_layer(self.cfg, lw, h, residual, next_norm, cos, sin, ctx, i, self.add_norm)
        return h

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, slot: int,
                 columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """decoder_layer's add_norm: x [T, H] (summed over the ranks first) + residual, normed by weight (its columns
        in the order `columns` gives: an act-order workspace, tp 1 only)."""
        if self.shard is not None:
            return self.shard.all_reduce_add_norm(x, residual, weight, self.cfg.rms_norm_eps, slot)
        return rms_norm(x, weight, self.cfg.rms_norm_eps, residual, columns)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, H] -> [B, V] float32. With a split lm_head every rank calls this at the same point (a collective):
        each multiplies its shard's vocab_rows and rank 0 gets all of them; a follower gets its own part [B, rows],
        unused."""
        part = linear(h, self.lm_head)  # [B, rows]
        if not self.split_lm_head:
            return part.float()
        whole = self.shard.gather_vocab(part, self.cfg.vocab_size)  # [B, V] float32 on rank 0
        return part if whole is None else whole
