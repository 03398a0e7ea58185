"""Interchange: GPTQ and compressed-tensors checkpoints in, compressed-tensors out (docs/interchange.md).

GPTQ checkpoints are written here from the published layout (AutoGPTQ's pack loops; gptqmodel
does not install next to lmc's torch); compressed-tensors checkpoints are written and read back
by the `compressed-tensors` library itself (a test extra). The reference for every greedy
comparison is transformers running the checkpoint's dequantized weights, computed here
independently of lmc's codecs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.format.int4 import dequantize_lmc
from lmc.format.workspace import Workspace
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig

# odd shapes: K = 80 and 100 are not multiples of the group (32), N = 10 (k/v) and 100 (gate/up)
# not multiples of 8, K = 100 not a multiple of 8 (a part-filled qweight word)
ODD = dict(hidden_size=80, intermediate_size=100, num_attention_heads=8, num_key_value_heads=1)
AWQ_SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)  # K % 32, N % 8
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = {"attention.w_qkv": LINEARS[:3], "attention.wo": LINEARS[3:4], "feed_forward.w13": LINEARS[4:6],
         "feed_forward.w2": LINEARS[6:]}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 43))]


def _quiet(*_):
    pass


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _float_state(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


# ----------------------------------------------------------------------------- GPTQ, from the published layout


def _gptq_quantize(w: torch.Tensor, g: int, sym: bool, group_of_column: np.ndarray):
    """GPTQ's quantizer per group (columns of a group need not be adjacent): codes [N, K], scales
    and zeros [N, ng] as numpy (zero 8 when symmetric)."""
    wf = w.double().numpy()
    n, k = wf.shape
    ng = int(group_of_column.max()) + 1
    codes = np.zeros((n, k), np.int64)
    scales = np.zeros((n, ng), np.float16)
    zeros = np.zeros((n, ng), np.int64)
    for grp in range(ng):
        cols = np.nonzero(group_of_column == grp)[0]
        x = wf[:, cols]
        lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        s = np.maximum(hi - lo, 1e-5) / 15
        s16 = s.astype(np.float16)
        z = np.full(n, 8) if sym else np.clip(np.round(-lo / s16.astype(np.float64)), 0, 15).astype(np.int64)
        codes[:, cols] = np.clip(np.round(x / s16.astype(np.float64)[:, None]) + z[:, None], 0, 15)
        scales[:, grp], zeros[:, grp] = s16, z
    return codes, scales, zeros


def _gptq_pack(codes: np.ndarray, zeros: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """AutoGPTQ's QuantLinear.pack loops (extended to K and N that are not multiples of 8):
    qweight [ceil(K/8), N] along K, qzeros [ng, ceil(N/8)] along N. v1 ("gptq") as GPTQModel
    saves it: the v2 words minus 0x11111111 (a zero of 0 borrows from the next nibble)."""
    n, k = codes.shape
    intweight = codes.T.astype(np.uint32)  # [K, N]
    qweight = np.zeros((-(-k // 8), n), np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(8 * row, min(8 * row + 8, k)):
            qweight[row] |= intweight[j] << (4 * (j - 8 * row))
    stored = zeros.T.astype(np.uint32)  # [ng, N]
    qzeros = np.zeros((stored.shape[0], -(-n // 8)), np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(8 * col, min(8 * col + 8, n)):
            qzeros[:, col] |= stored[:, j] << (4 * (j - 8 * col))
    if fmt == "gptq":
        qzeros = qzeros - np.uint32(0x11111111)  # uint32 arithmetic wraps like GPTQModel's int32 words
    return qweight.view(np.int32), qzeros.view(np.int32)


def write_gptq(ckpt: Path, out: Path, group_size: int = 32, sym: bool = False, fmt: str = "gptq",
               act_order: str | None = None, seed: int = 0, linears: tuple[str, ...] = LINEARS) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint of the float checkpoint `ckpt` (group_size -1: one group per row). act_order:
    None (g_idx = k // G), "groups" (g_idx relabels whole groups: foldable), "columns" (a column
    permutation, real act-order: one per input, shared by q/k/v and by gate/up, as GPTQ's Hessian order
    is) or "columns-per-module" (a permutation of each module's own). Returns {module: dequantized
    weight [N, K] float32}, computed from the stored integers."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    state = _float_state(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    out.mkdir(parents=True)
    tensors, dequant, orders = {}, {}, {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        if not module.endswith(linears):
            tensors[name] = w.to(torch.float16)
            continue
        n, k = w.shape
        g = k if group_size == -1 else group_size
        ng = -(-k // g)
        blocks = np.arange(k) // g
        if act_order == "groups":
            g_idx = rng.permutation(ng)[blocks]
        elif act_order in ("columns", "columns-per-module"):
            parent, leaf = module.rsplit(".", 1)
            key = (parent, leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") or leaf)
            if act_order == "columns-per-module" or key not in orders:
                orders[key] = rng.permutation(k)  # the order GPTQ quantized the columns in
            g_idx = blocks[np.argsort(orders[key])]
        else:
            g_idx = blocks
        codes, scales, zeros = _gptq_quantize(w, g, sym, g_idx)
        qweight, qzeros = _gptq_pack(codes, zeros, fmt)
        tensors.update({module + ".qweight": torch.from_numpy(qweight), module + ".qzeros": torch.from_numpy(qzeros),
                        module + ".scales": torch.from_numpy(scales.T.copy()),
                        module + ".g_idx": torch.from_numpy(g_idx.astype(np.int32))})
        s = torch.from_numpy(scales.astype(np.float32))[:, g_idx]  # [N, K]
        z = torch.from_numpy(zeros.astype(np.float32))[:, g_idx]
        dequant[module] = (torch.from_numpy(codes).float() - z) * s
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg.update(torch_dtype="float16", quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order is not None, "sym": sym,
        "checkpoint_format": fmt, "damp_percent": 0.01, "true_sequential": True, "static_groups": False})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ckpt.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return dequant


def _reference_model(ckpt: Path, dequant: dict[str, torch.Tensor], state: dict[str, torch.Tensor]):
    """transformers (float32) with the float checkpoint's architecture, the given linears and the other tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    new = {}
    for name in model.state_dict():
        module = name.removesuffix(".weight")
        new[name] = dequant[module] if module in dequant else state.get(name, state.get("model.embed_tokens.weight")).float()
    model.load_state_dict(new)
    return model


def _assert_dequantized_equal(ws_path: Path, dequant: dict[str, torch.Tensor], layers: int = 2,
                              w2_orders: dict[int, torch.Tensor] | None = None):
    """Every linear of the workspace dequantizes to the checkpoint's weights; w2_orders: act-order's w2 input
    order per layer (its g_idx sorted), in which w2's columns and w13's gate and up rows are stored."""
    ws = Workspace(ws_path)
    g = ws.quantization["group_size"]
    for i in range(layers):
        for fused, modules in FUSED.items():
            base = f"layers.{i}.{fused}"
            want = torch.cat([dequant[f"model.layers.{i}.{m}"] for m in modules])  # [N, K]
            order = (w2_orders or {}).get(i)
            if order is not None and fused.endswith("w13"):
                want = want[torch.cat([order, order + want.shape[0] // 2])]  # gate, up rows in w2's order
            elif order is not None and fused.endswith("w2"):
                want = want[:, order]
            got = dequantize_lmc(ws.get(base + ".qweight"), ws.get(base + ".scales"), ws.get(base + ".zeros"), g,
                                 want.shape[1]).t()  # [N, K], in the stored column order
            if ws.has(base + ".perm"):  # act-order: stored column j is input column perm[j]
                got = torch.empty_like(got).index_copy_(1, ws.get(base + ".perm").long(), got)
            assert torch.equal(got, want), base


def _assert_runs_like(ws_path: Path, reference) -> None:
    """First-token logits within 1e-3 and 12 greedy tokens equal to the transformers reference."""
    engine = Engine(str(ws_path), EngineConfig(device="cpu", cache_block_seq_len=16, session_len=128))
    ours = [r.logits[0] for r in engine.generate(PROMPTS, GenerationConfig(max_new_tokens=1, output_logits="generation"))]
    with torch.no_grad():
        for p, row in zip(PROMPTS, ours):
            ref = reference(torch.tensor([p])).logits[0, -1]
            assert float((row - ref).abs().max() / ref.abs().max()) <= 1e-3
        ref_tokens = reference.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, min_new_tokens=12,
                                        do_sample=False)[0, len(PROMPTS[0]):].tolist()
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    assert Engine(str(ws_path), EngineConfig(device="cpu")).generate([PROMPTS[0]], gen)[0].token_ids == ref_tokens


@pytest.mark.parametrize("sym,fmt,act_order,group", [(False, "gptq", None, 32), (True, "gptq_v2", "groups", 32),
                                                     (False, "gptq_v2", None, 32), (True, "gptq", None, 32),
                                                     (False, "gptq", "groups", -1), (False, "gptq", "columns", 32),
                                                     (True, "gptq_v2", "columns", 32)])
def test_gptq_converts_and_runs_like_its_dequantized_weights(sym, fmt, act_order, group, checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **ODD)
    dequant = write_gptq(ckpt, tmp_path / "gptq", group, sym=sym, fmt=fmt, act_order=act_order)
    convert(tmp_path / "gptq", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    lmc_group = 32 if group == 32 else 128  # one group per row: any lmc group lies inside it
    permuted = {"act_order": ["w_qkv", "wo", "w13"]} if act_order == "columns" else {}  # a .perm each
    assert ws.quantization == {"method": "gptq", "bits": 4, "group_size": lmc_group, "layout": "lmc-int4-k8",
                               "zero_point": True} | permuted
    assert ws.meta["format_version"] == ws.manifest["format_version"] == (3 if permuted else 2)
    assert ws.meta["dtype"] == "float16" and ws.manifest["provenance"]["source_format"] == "gptq"
    _assert_dequantized_equal(tmp_path / "ws", dequant, w2_orders=_w2_orders(tmp_path / "gptq") if permuted else None)
    _assert_runs_like(tmp_path / "ws", _reference_model(ckpt, dequant, _float_state(tmp_path / "gptq")))


def _w2_orders(gptq: Path) -> dict[int, torch.Tensor]:
    """Each layer's down_proj columns sorted by their GPTQ group (stable): the order lmc stores them in, w2 having
    no .perm (w13's output rows come in that order instead)."""
    state = _float_state(gptq)
    return {i: torch.sort(state[f"model.layers.{i}.mlp.down_proj.g_idx"].long(), stable=True).indices for i in range(2)}


# ----------------------------------------------------------------------------- compressed-tensors, by its library

CT_GROUPED = dict(hidden_size=96, intermediate_size=160, num_attention_heads=8, num_key_value_heads=1, head_dim=12)


def write_compressed(ckpt: Path, out: Path, strategy: str = "group", group_size: int | None = 32,
                     symmetric: bool = False, ignore: tuple[str, ...] = ("lm_head",), num_bits: int = 4) -> None:
    """A checkpoint llm-compressor's way: the compressed-tensors library attaches the scheme,
    its own qparams (min/max) go in, ModelCompressor packs and writes config.json."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=list(ignore))
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight.float()  # [N, K]
                groups = w.reshape(w.shape[0], -1, group_size) if strategy == "group" else w[:, None, :]  # [N, ng, G]
                scale, zero = calculate_qparams(groups.amin(2), groups.amax(2), args)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for f in ckpt.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    assert ct.__version__


def _unpack_rows(words: np.ndarray, count: int) -> np.ndarray:
    """int32 [R, W] -> the 4-bit fields [R, count], field j of word w at bits 4j (the published packing)."""
    u = words.view(np.uint32).astype(np.int64)
    fields = np.stack([(u >> (4 * j)) & 0xF for j in range(8)], axis=-1)  # [R, W, 8]
    return fields.reshape(u.shape[0], -1)[:, :count]


def compressed_dequant(folder: Path) -> dict[str, torch.Tensor]:
    """{module: W [N, K] float32}: (q - zp) * scale from the stored tensors, q and zp signed (nibble - 8)."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    out = {}
    for name in state:
        if not name.endswith(".weight_packed"):
            continue
        module = name.removesuffix(".weight_packed")
        n, k = state[module + ".weight_shape"].tolist()
        q = _unpack_rows(state[name].numpy(), k) - 8  # [N, K]
        scale = state[module + ".weight_scale"].float()  # [N, ng]
        zp_name = module + ".weight_zero_point"
        zp = (_unpack_rows(state[zp_name].numpy().T.copy(), n).T - 8) if zp_name in state else np.zeros(scale.shape, np.int64)
        per_column = -(-k // scale.shape[1])  # G, or K for one scale per row
        idx = np.arange(k) // per_column
        out[module] = (torch.from_numpy(q - zp[:, idx]).float()) * scale[:, idx]
    return out


@pytest.mark.parametrize("strategy,symmetric", [("group", False), ("group", True), ("channel", False), ("channel", True)])
def test_compressed_tensors_converts_and_runs_like_its_dequantized_weights(strategy, symmetric, checkpoint, tmp_path):
    shapes = CT_GROUPED if strategy == "group" else ODD  # the library itself needs K % G == 0 for groups
    ckpt = checkpoint("llama3", **shapes)
    write_compressed(ckpt, tmp_path / "ct", strategy, 32 if strategy == "group" else None, symmetric)
    dequant = compressed_dequant(tmp_path / "ct")
    assert set(dequant) == {f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS}  # lm_head left in float
    convert(tmp_path / "ct", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    assert ws.quantization["method"] == "compressed-tensors" and ws.meta["dtype"] == "bfloat16"
    assert ws.quantization["group_size"] == (32 if strategy == "group" else 128)  # per channel: any lmc group holds it
    assert ws.manifest["provenance"]["source_format"] == "compressed-tensors"
    _assert_dequantized_equal(tmp_path / "ws", dequant)
    _assert_runs_like(tmp_path / "ws", _reference_model(ckpt, dequant, _float_state(tmp_path / "ct")))


def _pack_along_columns(values: np.ndarray) -> np.ndarray:
    """[R, C] values 0..15 -> int32 [R, ceil(C/8)]: word [r, w] holds values[r, 8w + j] in bits 4j (the published
    pack-quantized packing of weight_packed along K; weight_zero_point is the packing of zeros.T, transposed)."""
    r, c = values.shape
    padded = np.zeros((r, -(-c // 8) * 8), np.uint32)
    padded[:, :c] = values
    words = sum(padded[:, j::8] << np.uint32(4 * j) for j in range(8))  # [R, ceil(C/8)]
    return words.astype(np.uint32).view(np.int32)


def test_compressed_tensors_act_order_group_converts_and_runs_like_its_dequantized_weights(checkpoint, tmp_path):
    """compressed-tensors `actorder: group` (as llm-compressor wrote it before the library dropped it): each
    module's groups chosen per column, weight_g_idx [K] saved beside the packed weight. The library's own
    checkpoint, re-quantized here by that g_idx (one column order per input, as in write_gptq)."""
    from safetensors.torch import load_file, save_file

    ckpt = checkpoint("llama3", **CT_GROUPED)
    write_compressed(ckpt, tmp_path / "ct", "group", 32, symmetric=False)
    state, floats = load_file(tmp_path / "ct" / "model.safetensors"), _float_state(ckpt)
    rng, orders, dequant = np.random.default_rng(5), {}, {}
    for name in [n for n in state if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        w = floats[module + ".weight"]  # [N, K]
        n, k = w.shape
        parent, leaf = module.rsplit(".", 1)
        key = (parent, leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") or leaf)
        orders.setdefault(key, rng.permutation(k))
        g_idx = (np.arange(k) // 32)[np.argsort(orders[key])]  # [K]: column j's group
        codes, scales, zeros = _gptq_quantize(w, 32, False, g_idx)
        scale = torch.from_numpy(scales.astype(np.float32)).to(state[module + ".weight_scale"].dtype)  # [N, ng]
        state.update({name: torch.from_numpy(_pack_along_columns(codes)), module + ".weight_scale": scale,
                      module + ".weight_zero_point": torch.from_numpy(_pack_along_columns(zeros.T).T.copy()),
                      module + ".weight_g_idx": torch.from_numpy(g_idx.astype(np.int32))})
        s, z = scale.float()[:, g_idx], torch.from_numpy(zeros).float()[:, g_idx]  # [N, K]
        dequant[module] = (torch.from_numpy(codes).float() - z) * s
    save_file(state, tmp_path / "ct" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    convert(tmp_path / "ct", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    assert ws.quantization["act_order"] == ["w_qkv", "wo", "w13"] and ws.meta["format_version"] == 3
    w2_orders = {i: torch.sort(state[f"model.layers.{i}.mlp.down_proj.weight_g_idx"].long(), stable=True).indices
                 for i in range(2)}
    _assert_dequantized_equal(tmp_path / "ws", dequant, w2_orders=w2_orders)
    _assert_runs_like(tmp_path / "ws", _reference_model(ckpt, dequant, state))


def test_compressed_dequant_matches_the_library(checkpoint, tmp_path):
    """This file's reading of pack-quantized equals the library's own decompression (as transformers loads it)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt = checkpoint("llama3", **CT_GROUPED)
    write_compressed(ckpt, tmp_path / "ct", symmetric=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    weights = dict(model.named_parameters())
    for module, w in compressed_dequant(tmp_path / "ct").items():
        assert torch.equal(weights[module + ".weight"], w.to(torch.bfloat16)), module


def test_gptq_reruns_byte_identical_and_splits_for_tp(checkpoint, tmp_path):
    from lmc.format.int4 import from_lmc_tensors

    ckpt = checkpoint("llama3", **AWQ_SHAPES)  # K per rank (32, 64) holds whole groups of 32
    write_gptq(ckpt, tmp_path / "gptq", act_order="groups")
    convert(tmp_path / "gptq", tmp_path / "a")
    convert(tmp_path / "gptq", tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    convert(tmp_path / "gptq", tmp_path / "tp2", tp=2)
    one, two = Workspace(tmp_path / "a"), Workspace(tmp_path / "tp2")

    def codes(ws, prefix, base, k):
        return from_lmc_tensors(*(ws.get(f"{prefix}{base}{leaf}") for leaf in (".qweight", ".scales", ".zeros")), k)

    full = codes(one, "", "layers.1.feed_forward.w2", 128)  # row-parallel: each rank holds half of K
    halves = [codes(two, f"{r}:", f"layers.1.feed_forward.w2.{r}", 64) for r in range(2)]
    for part in range(3):
        assert torch.equal(torch.cat([h[part] for h in halves], dim=1), full[part])


# ----------------------------------------------------------------------------- codecs


def test_gptq_v1_zero_of_zero_comes_back_exactly():
    """v1 stores zero - 1 per nibble as GPTQModel writes it (the word minus 0x11111111, borrows
    included): zero points 0 and 15 next to each other read back exactly."""
    from lmc.compiler.pack import unpack_gptq

    zeros = np.array([[0, 15, 0, 0, 7, 8, 15, 1, 0, 3]])  # [N=10, 1 group] as [ng, N]
    codes = np.zeros((10, 8), np.int64)
    _, qzeros = _gptq_pack(codes, zeros.T, "gptq")
    assert qzeros.shape == (1, 2)
    _, _, got = unpack_gptq(torch.zeros(1, 10, dtype=torch.int32), torch.from_numpy(qzeros), torch.ones(1, 10), 8, 1)
    assert got[:, 0].tolist() == zeros[0].tolist()


def test_compressed_pack_matches_the_library():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from lmc.compiler.pack import pack_compressed, unpack_compressed

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (13, 70), generator=g, dtype=torch.uint8)  # N, K not multiples of 8
    zeros = torch.randint(0, 16, (13, 3), generator=g).float()
    scales = torch.rand(13, 3, generator=g)
    ours = pack_compressed(codes, scales, zeros, torch.bfloat16)
    assert torch.equal(ours[".weight_packed"], ct.pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4))
    assert torch.equal(ours[".weight_zero_point"], ct.pack_to_int32((zeros - 8).to(torch.int8), 4, packed_dim=0))
    assert ours[".weight_shape"].tolist() == [13, 70]
    back = unpack_compressed(ours[".weight_packed"], ours[".weight_scale"], ours[".weight_zero_point"], 70)
    assert torch.equal(back[0], codes) and torch.equal(back[2], zeros)


# ----------------------------------------------------------------------------- refusals, one line each


def _one_line(call) -> str:
    with pytest.raises(LmcError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_gptq_act_order_runs_its_int4_kernels_like_the_dequantized_weights(checkpoint, tmp_path, monkeypatch):
    """The int4 path (the activations gathered into each linear's stored order, as on a GPU) gives the
    dense path's logits, and the workspace verifies and rebuilds byte for byte."""
    from lmc.format.workspace import verify_workspace
    from lmc.runtime import model as model_mod

    ckpt = checkpoint("llama3", **ODD)
    write_gptq(ckpt, tmp_path / "gptq", act_order="columns")
    convert(tmp_path / "gptq", tmp_path / "ws")
    convert(tmp_path / "gptq", tmp_path / "again")
    assert _tree(tmp_path / "ws") == _tree(tmp_path / "again") and verify_workspace(tmp_path / "ws") == []
    shown = subprocess.run([sys.executable, "-m", "lmc", "inspect", str(tmp_path / "ws")], capture_output=True, text=True)
    assert "(format v3)" in shown.stdout and "gptq int4 group 32 (lmc-int4-k8), act-order w_qkv, wo, w13" in shown.stdout
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True, output_logits="generation")
    dense = Engine(str(tmp_path / "ws"), EngineConfig(device="cpu"))
    monkeypatch.setattr(model_mod, "host_available", lambda: 0)  # no room to dequantize: int4 kept
    packed = Engine(str(tmp_path / "ws"), EngineConfig(device="cpu"))
    layer = packed.model.layers[0]  # qkv and w13 read their columns as the norms store them; wo gathers its own
    assert layer["w13"].perm is None and layer["w_qkv"].perm is None and layer["wo"].perm is not None
    assert layer["w13_in"].shape == layer["w_qkv_in"].shape == (80,) and layer["w2"].perm is None
    assert not isinstance(dense.model.layers[0]["w13"], model_mod.Int4Weight) and "w13_in" not in dense.model.layers[0]
    a, b = dense.generate([PROMPTS[1]], gen)[0], packed.generate([PROMPTS[1]], gen)[0]
    assert a.token_ids == b.token_ids
    assert float((a.logits - b.logits).abs().max() / b.logits.abs().max()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and TRITON_INTERPRET=0 (run: TRITON_INTERPRET=0 pytest -m gpu)")
@pytest.mark.parametrize("shapes", [ODD, dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                               num_key_value_heads=2)])  # odd: the Triton kernels; 256/512: mma too
def test_gptq_act_order_on_the_gpu_gives_the_cpu_tokens(shapes, checkpoint, tmp_path):
    """float16 int4 kernels with the gathered activations, decode in CUDA graphs, against the CPU's float32
    dequantized path: the same 10 greedy tokens and first-step logits within 2 %."""
    ckpt = checkpoint("llama3", **shapes)
    write_gptq(ckpt, tmp_path / "gptq", act_order="columns")
    convert(tmp_path / "gptq", tmp_path / "ws")
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True, output_logits="generation")
    out = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float16")):
        engine = Engine(str(tmp_path / "ws"), EngineConfig(device=device, dtype=dtype, cache_block_seq_len=16,
                                                           session_len=128, max_batch_size=4))
        out[device] = engine.generate([PROMPTS[1]], gen)[0]
        if device == "cuda":
            assert "w13_in" in engine.model.layers[0] and engine.model.layers[0]["wo"].perm is not None
    cpu, gpu = out["cpu"], out["cuda"]
    assert gpu.token_ids == cpu.token_ids
    first_cpu, first_gpu = cpu.logits[0].float(), gpu.logits[0].float().cpu()
    assert float((first_gpu - first_cpu).abs().max() / first_cpu.abs().max()) < 2e-2


def test_gptq_act_order_with_a_different_order_per_fused_part_is_refused(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **ODD)
    write_gptq(ckpt, tmp_path / "gptq", act_order="columns-per-module")
    message = _one_line(lambda: convert(tmp_path / "gptq", tmp_path / "ws"))
    assert message.startswith("model.layers.0.self_attn.q_proj and model.layers.0.self_attn.k_proj have different "
                              "act-order (desc_act) g_idx"), message
    assert not (tmp_path / "ws").exists()
    r = subprocess.run([sys.executable, "-m", "lmc", "convert", str(tmp_path / "gptq"), "-o", str(tmp_path / "ws")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "act-order" in r.stderr, r.stderr


def test_gptq_act_order_is_tp_1(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    write_gptq(ckpt, tmp_path / "gptq", act_order="columns")
    message = _one_line(lambda: convert(tmp_path / "gptq", tmp_path / "tp2", tp=2))
    assert message.startswith("--tp 2: this gptq checkpoint is act-order (desc_act)"), message
    convert(tmp_path / "gptq", tmp_path / "ws")
    message = _one_line(lambda: convert(tmp_path / "ws", tmp_path / "tp2", tp=2))  # re-splitting the workspace
    assert "act-order" in message and not (tmp_path / "tp2").exists()


def test_gptq_group_index_that_does_not_match_its_group_size_is_refused(checkpoint, tmp_path):
    """A g_idx whose groups are not whole lmc groups even in act-order's order (group 0 with 33 columns)."""
    from safetensors.torch import load_file, save_file

    ckpt = checkpoint("llama3", **ODD)
    write_gptq(ckpt, tmp_path / "gptq")
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.g_idx"][32] = 0  # K = 80: groups of 33, 31 and 16 columns
    save_file(tensors, tmp_path / "gptq" / "model.safetensors", metadata={"format": "pt"})
    message = _one_line(lambda: convert(tmp_path / "gptq", tmp_path / "ws"))
    assert message.startswith("model.layers.0.self_attn.o_proj: g_idx puts input columns 32..63 (after sorting by "
                              "group) in different quantization groups"), message
    assert not (tmp_path / "ws").exists()


def test_a_workspace_whose_act_order_perm_is_not_a_permutation_is_refused(checkpoint, tmp_path):
    import struct

    from lmc.errors import WorkspaceError

    ckpt = checkpoint("llama3", **ODD)
    write_gptq(ckpt, tmp_path / "gptq", act_order="columns")
    convert(tmp_path / "gptq", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    name = "layers.1.attention.wo.perm"
    shard = next(p for p in (tmp_path / "ws" / "weights").iterdir() if name in p.read_bytes()[:200000].decode("latin-1"))
    raw = bytearray(shard.read_bytes())
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    start = 8 + struct.unpack("<Q", raw[:8])[0] + header[name]["data_offsets"][0]
    raw[start:start + 4] = struct.pack("<i", 10**6)  # an index far past K: would read outside x
    shard.write_bytes(bytes(raw))
    del ws
    with pytest.raises(WorkspaceError, match=r"layers\.1\.attention\.wo\.perm is not a permutation of 0\.\.79"):
        Engine(str(tmp_path / "ws"), EngineConfig(device="cpu"))


@pytest.mark.parametrize("change,field", [({"bits": 8}, "bits=8"), ({"bits": 3}, "bits=3"),
                                          ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
                                          ({"format": "bitblas", "checkpoint_format": None}, "checkpoint_format='bitblas'"),
                                          ({"dynamic": {"-:.*down_proj": {}}}, "dynamic="),
                                          ({"lm_head": True}, "lm_head=True"), ({"pack_dtype": "int16"}, "pack_dtype='int16'"),
                                          ({"group_size": 48}, "group_size 48")])
def test_gptq_configs_lmc_cannot_represent_are_refused(change, field, checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **ODD)
    write_gptq(ckpt, tmp_path / "gptq")
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    cfg["quantization_config"] = {k: v for k, v in cfg["quantization_config"].items() if v is not None}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(cfg))
    assert field in _one_line(lambda: convert(tmp_path / "gptq", tmp_path / "ws"))


@pytest.mark.parametrize("kind", ["8-bit", "layer left in float", "lm_head quantized"])
def test_compressed_tensors_lmc_cannot_represent_are_refused(kind, checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **CT_GROUPED)
    write_compressed(ckpt, tmp_path / "ct", **{"8-bit": dict(num_bits=8),
                                              "layer left in float": dict(ignore=("lm_head", "re:.*layers.1.mlp.down_proj")),
                                              "lm_head quantized": dict(ignore=())}[kind])
    message = _one_line(lambda: convert(tmp_path / "ct", tmp_path / "ws"))
    assert {"8-bit": "weights.num_bits=8; lmc reads W4A16 pack-quantized",
            "layer left in float": "model.layers.1.mlp.down_proj is not quantized in this compressed-tensors checkpoint",
            "lm_head quantized": "lm_head is quantized in this compressed-tensors checkpoint, but lmc keeps embeddings and lm_head in float",
            }[kind] in message, message


@pytest.mark.parametrize("change,field", [
    ({"format": "naive-quantized", "config_groups": {"group_0": {"format": None}}}, "config_groups.group_0.format='naive-quantized'"),
    ({"config_groups": {"group_0": {"format": "float-quantized"}}}, "config_groups.group_0.format='float-quantized'"),
    ({"config_groups": {"group_0": {"input_activations": {"num_bits": 8, "type": "int"}}}}, "config_groups.group_0.input_activations="),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme="),
    ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity_config="),
    ({"transform_config": {"config_groups": {"R1": {}}}}, "transform_config="),
    ({"quantization_status": "frozen"}, "quantization_status='frozen'"),
    ({"config_groups": {"group_1": {"targets": ["re:.*down_proj"], "format": "pack-quantized",
                                    "weights": {"num_bits": 4, "strategy": "group", "group_size": 64}}}},
     "config_groups.group_1.weights="),
    ({"config_groups": {"group_0": {"weights": {"strategy": "tensor"}}}}, "weights.strategy='tensor'"),
    ({"config_groups": {"group_0": {"weights": {"group_size": 48}}}}, "group_size 48"),
])
def test_compressed_tensors_configs_lmc_cannot_represent_are_refused(change, field, checkpoint, tmp_path):
    def merge(into: dict, change: dict) -> None:
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    write_compressed(checkpoint("llama3", **CT_GROUPED), tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    merge(cfg["quantization_config"], change)
    (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    assert field in _one_line(lambda: convert(tmp_path / "ct", tmp_path / "ws"))


def test_model_format_must_match_the_checkpoint(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **ODD)
    assert "has no gptq quantization_config (it reads as hf); drop --model-format gptq" in _one_line(
        lambda: convert(ckpt, tmp_path / "ws", model_format="gptq"))
    write_gptq(ckpt, tmp_path / "gptq")
    assert "(it reads as gptq)" in _one_line(lambda: convert(tmp_path / "gptq", tmp_path / "ws", model_format="awq"))
    convert(tmp_path / "gptq", tmp_path / "ws", model_format="gptq")
    assert Workspace(tmp_path / "ws").quantization["method"] == "gptq"


def test_gptq_internlm2_fused_wqkv_splits_after_unpacking(checkpoint, tmp_path):
    """InternLM2 packs q, k, v in one grouped wqkv: unpacked first, then split like the float one."""
    from safetensors.torch import save_file

    ckpt = checkpoint("internlm2")
    names = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
    dequant = write_gptq(ckpt, tmp_path / "gptq", linears=names)
    twin = tmp_path / "float"  # the same model with the dequantized weights in float32
    twin.mkdir()
    state = {k: v.float() for k, v in _float_state(tmp_path / "gptq").items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    save_file({**state, **{m + ".weight": w for m, w in dequant.items()}}, twin / "model.safetensors")
    for f in (tmp_path / "gptq").iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            (twin / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((twin / "config.json").read_text())
    del cfg["quantization_config"]
    (twin / "config.json").write_text(json.dumps(cfg))
    convert(tmp_path / "gptq", tmp_path / "ws")
    convert(twin, tmp_path / "ws_float", dtype="float32")
    q, f = Workspace(tmp_path / "ws"), Workspace(tmp_path / "ws_float")
    for i in range(2):
        for name in ("attention.w_qkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
            base = f"layers.{i}.{name}"
            want = f.get(base + ".weight")  # [N, K]
            got = dequantize_lmc(q.get(base + ".qweight"), q.get(base + ".scales"), q.get(base + ".zeros"), 32, want.shape[1])
            assert torch.equal(got.t(), want), base


# ----------------------------------------------------------------------------- compressed-tensors out

RTN = dict(calib_samples=0, w_group_size=32, device="cpu")  # the layout is what is tested, not the search


def _workspace_tensors(path: Path) -> dict[str, torch.Tensor]:
    ws = Workspace(path)
    return {name: ws.get(name) for name in ws.tensor_names()}


def test_compressed_tensors_output_round_trips_and_reruns_byte_identical(checkpoint, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    ckpt = checkpoint("qwen2", **AWQ_SHAPES)  # q/k/v biases and tied embeddings ride along
    summary = quantize(ckpt, tmp_path / "ct", QuantizeOptions(**RTN, format="compressed-tensors"), say=_quiet)
    assert summary["format"] == "compressed-tensors"
    quantize(ckpt, tmp_path / "ct2", QuantizeOptions(**RTN, format="compressed-tensors"), say=_quiet)
    assert _tree(tmp_path / "ct") == _tree(tmp_path / "ct2")
    quantize(ckpt, tmp_path / "own", QuantizeOptions(**RTN, workspace=True), say=_quiet)
    convert(tmp_path / "ct", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    assert ws.quantization["method"] == "compressed-tensors" and ws.meta["dtype"] == "float16"
    assert ws.manifest["provenance"]["quantized_by"]["quantization"]["format"] == "compressed-tensors"
    own, back = _workspace_tensors(tmp_path / "own"), _workspace_tensors(tmp_path / "ws")
    assert own.keys() == back.keys()
    for name in own:
        assert own[name].dtype == back[name].dtype and torch.equal(own[name], back[name]), name


def test_compressed_tensors_output_loads_in_transformers(checkpoint, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lmc.compiler.quantize import QuantizeOptions, quantize

    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    quantize(ckpt, tmp_path / "ct", QuantizeOptions(**RTN, format="compressed-tensors"), say=_quiet)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    QuantizationConfig.model_validate(cfg["quantization_config"])  # the library's own schema accepts it
    assert json.loads((tmp_path / "ct" / "lmc_provenance.json").read_text())["format"] == "hf-compressed-tensors"
    convert(tmp_path / "ct", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    # transformers + compressed-tensors 0.20.1 load asymmetric pack-quantized only with dequantize=True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    weights = dict(model.named_parameters())
    for i in range(2):
        for fused, modules in FUSED.items():
            base = f"layers.{i}.{fused}"
            lmc_w = dequantize_lmc(ws.get(base + ".qweight"), ws.get(base + ".scales"), ws.get(base + ".zeros"), 32).t()
            theirs = torch.cat([weights[f"model.layers.{i}.{m}.weight"] for m in modules])  # fp16 products, as float32
            assert torch.equal(theirs, lmc_w.to(torch.float16).float()), base
    with torch.no_grad():
        ref_tokens = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, min_new_tokens=12,
                                    do_sample=False)[0, len(PROMPTS[0]):].tolist()
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    assert Engine(str(tmp_path / "ws"), EngineConfig(device="cpu")).generate([PROMPTS[0]], gen)[0].token_ids == ref_tokens


def test_compressed_tensors_output_falls_back_and_flags_conflict(checkpoint, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    notes = []
    summary = quantize(checkpoint("qwen3"), tmp_path / "q", QuantizeOptions(**RTN, format="compressed-tensors"),
                       say=lambda m: None, warn=notes.append)  # hidden 72: K not a multiple of 32
    assert summary["format"] == "workspace"
    assert any(n.startswith("note: writing an lmc workspace instead of an HF compressed-tensors pack-quantized "
                            "checkpoint: model.layers.*.self_attn.q_proj has K=72") for n in notes), notes
    r = subprocess.run([sys.executable, "-m", "lmc", "quantize", "x", "-o", str(tmp_path / "y"), "--workspace",
                        "--format", "compressed-tensors"], capture_output=True, text=True)
    assert r.returncode == 2 and "drop --format compressed-tensors or --workspace" in r.stderr


# ----------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_smollm2_compressed_tensors_output_in_transformers_matches_lmc(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct quantized by lmc (AWQ, g64) and written as compressed-tensors: transformers
    on that folder and lmc on the workspace converted from it give the same WikiText-2 perplexity
    (within 0.1%) and the same greedy text."""
    pytest.importorskip("compressed_tensors")
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lmc.calib.text import load_text
    from lmc.calib.windows import eval_windows
    from lmc.compiler.quantize import QuantizeOptions, quantize
    from lmc.runtime.model import Model
    from lmc.runtime.perplexity import perplexity
    from lmc.runtime.tokenizer import Tokenizer

    opts = QuantizeOptions(w_group_size=64, calib_samples=32, calib_seqlen=512, search_samples=4, device="cpu",
                           format="compressed-tensors")
    assert quantize(smollm2_gguf, tmp_path / "ct", opts, say=_quiet)["format"] == "compressed-tensors"
    convert(tmp_path / "ct", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    windows = torch.from_numpy(eval_windows(Tokenizer(ws.tokenizer_dir).encode(load_text("wikitext2", "test", purpose="eval").text),
                                            512, 40))  # [40, 512]
    ours = perplexity(Model(ws, torch.device("cpu"), torch.float32), windows)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(4):
            logits = model(batch).logits[:, :-1].float()  # [B, S-1, V]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
    theirs = float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))
    print(f"SmolLM2 W4A16 g64 wikitext2 ppl: lmc workspace {ours['ppl']:.4f}, transformers on compressed-tensors {theirs:.4f}")
    assert abs(theirs / ours["ppl"] - 1) <= 1e-3
    prompt = Tokenizer(ws.tokenizer_dir).encode("The capital of France is")
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):]
    gen = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    assert Engine(str(tmp_path / "ws"), EngineConfig(device="cpu")).generate([prompt], gen)[0].token_ids == ref.tolist()


@pytest.mark.parametrize("act_order", [False, True])
def test_the_act_order_bench_packs_gptq_as_these_tests_do(act_order, monkeypatch):
    """bench/bench_act_order_e2e.py packs its 8B GPTQ checkpoints in torch on the GPU; on a small linear its words,
    zeros, scales and g_idx are those of this file's numpy packer (the one the act-order conversion tests use)."""
    from conftest import load_bench

    bench = load_bench("bench_act_order_e2e.py")
    monkeypatch.setattr(bench, "GROUP", 16)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(5)).half()  # [N, K]
    order = torch.randperm(64, generator=torch.Generator().manual_seed(6)) if act_order else None
    got = bench.gptq_linear(w, order)
    g_idx = (np.arange(64) // 16)[np.argsort(order.numpy())] if act_order else np.arange(64) // 16
    codes, scales, zeros = _gptq_quantize(w.float(), 16, False, g_idx)
    qweight, qzeros = _gptq_pack(codes, zeros, "gptq")
    assert np.array_equal(got["g_idx"].numpy(), g_idx)
    assert np.array_equal(got["qweight"].numpy(), qweight) and np.array_equal(got["qzeros"].numpy(), qzeros)
    assert np.array_equal(got["scales"].numpy(), scales.T)
