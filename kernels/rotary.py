"""Rotary position embedding for q and k in one launch, HF's "rotate half" convention.

With x1 = x[..., :D/2] and x2 = x[..., D/2:]: out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin).
cos and sin hold one row per token (the caller has applied positions and any rope scaling).
One program per token rotates all of its q heads and then all of its k heads, in fp32.
`rotary_write_kv` does the same and also stores the rotated k and the untouched v at the token's
slot of a paged KV cache (one launch instead of rotary, a v copy and two cache writes); into a quantized
cache (kernels/kv_quant.py) it stores each rotated k head and each v head as codes plus scales and zeros
(per vector, or per group of channels: policy 4's k), quantizing in registers. `rotary_decode_attention` is
rotary_write_kv followed by decode attention; on CUDA over a float cache the decode kernel does both (one launch).
The formula itself, shared by all of them: kernels/rotary_tiles.py.
"""
from __future__ import annotations

import functools
import os

import torch

from lmc.errors import LmcError
from lmc.kernels.attention import paged_decode_attention, paged_decode_attention_triton, write_kv_cache
from lmc.kernels.kv_quant import cache_parts
from lmc.kernels.pdl import pdl_launch, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch reference serves
    triton = None

if triton is not None:
    from lmc.kernels.kv_quant import quantize_store
    from lmc.kernels.rotary_tiles import cos_sin_at, rotate_halves

    @triton.jit
    def _cos_sin(cos_ptr, sin_ptr, t, stride_cos, stride_sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Token t's cos and sin rows [BLOCK_HALF] in fp32 (zeros past HALF)."""
        cols = tl.arange(0, BLOCK_HALF)
        return cos_sin_at(cos_ptr, sin_ptr, t, stride_cos, stride_sin, cols, cols < HALF)

    @triton.jit
    def _rotate_tile(x_ptr, x_offs, mask, cos, sin, HALF: tl.constexpr):
        """The rotated halves of the heads at x_ptr + x_offs [BLOCK_HEADS, BLOCK_HALF], in the input dtype."""
        x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0)
        return rotate_halves(x1, x2, cos[None, :], sin[None, :])

    @triton.jit
    def _rotate_heads(
        x_ptr, o_ptr, cos, sin, n_heads, stride_xh, stride_oh,
        HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        heads = tl.arange(0, BLOCK_HEADS)
        cols = tl.arange(0, BLOCK_HALF)
        for h0 in range(0, n_heads, BLOCK_HEADS):
            hh = h0 + heads
            mask = (hh[:, None] < n_heads) & (cols[None, :] < HALF)  # [BLOCK_HEADS, BLOCK_HALF]
            o1, o2 = _rotate_tile(x_ptr, hh[:, None] * stride_xh + cols[None, :], mask, cos, sin, HALF)
            o_offs = hh[:, None] * stride_oh + cols[None, :]
            tl.store(o_ptr + o_offs, o1, mask=mask)
            tl.store(o_ptr + o_offs + HALF, o2, mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
        Hq, Hkv,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
        stride_qot, stride_qoh, stride_kot, stride_koh,
        HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        cos, sin = _cos_sin(cos_ptr, sin_ptr, t, stride_cos, stride_sin, HALF, BLOCK_HALF)
        _rotate_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, cos, sin, Hq, stride_qh, stride_qoh,
                      HALF, BLOCK_HEADS, BLOCK_HALF)
        _rotate_heads(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, cos, sin, Hkv, stride_kh, stride_koh,
                      HALF, BLOCK_HEADS, BLOCK_HALF)


    @triton.jit
    def _rotary_kv_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, slot_ptr,
        Hq, Hkv,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
        stride_qot, stride_qoh, stride_cs, stride_ch, stride_kss, stride_ksh, stride_vss, stride_vsh,
        HALF: tl.constexpr, D: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
        BLOCK_D: tl.constexpr, BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, PDL: tl.constexpr,
    ):
        """Token t: rotated q -> qo[t]; rotated k -> k_cache slot s; v -> v_cache slot s (s = slot[t]).
        Caches are addressed as [slots, Hkv, D] values (BITS 16) or [slots, Hkv, D * BITS / 8] codes (BITS 8,
        4) with strides (stride_cs, stride_ch, 1); codes have their (scale, zero) pairs, K_GROUP / V_GROUP
        channels each, at ksz / vsz [slots, Hkv, G, 2] (strides stride_kss / stride_vss, stride_ksh /
        stride_vsh, 2, 1)."""
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        cos, sin = _cos_sin(cos_ptr, sin_ptr, t, stride_cos, stride_sin, HALF, BLOCK_HALF)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        _rotate_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, cos, sin, Hq, stride_qh, stride_qoh,
                      HALF, BLOCK_HEADS, BLOCK_HALF)
        heads = tl.arange(0, BLOCK_HEADS)
        if BITS == 16:
            _rotate_heads(k_ptr + t * stride_kt, kc_ptr + slot * stride_cs, cos, sin, Hkv, stride_kh, stride_ch,
                          HALF, BLOCK_HEADS, BLOCK_HALF)
            dcols = tl.arange(0, BLOCK_D)
            for h0 in range(0, Hkv, BLOCK_HEADS):
                hh = h0 + heads
                mask = (hh[:, None] < Hkv) & (dcols[None, :] < D)  # [BLOCK_HEADS, BLOCK_D]
                v = tl.load(v_ptr + t * stride_vt + hh[:, None] * stride_vh + dcols[None, :], mask=mask, other=0.0)
                tl.store(vc_ptr + slot * stride_cs + hh[:, None] * stride_ch + dcols[None, :], v, mask=mask)
        else:
            cols = tl.arange(0, BLOCK_HALF)
            for h0 in range(0, Hkv, BLOCK_HEADS):
                hh = h0 + heads
                h_mask = hh < Hkv
                mask = h_mask[:, None] & (cols[None, :] < HALF)  # [BLOCK_HEADS, BLOCK_HALF]
                k1, k2 = _rotate_tile(k_ptr + t * stride_kt, hh[:, None] * stride_kh + cols[None, :], mask, cos, sin,
                                      HALF)
                quantize_store(k1.to(tl.float32), k2.to(tl.float32), mask, kc_ptr + slot * stride_cs + hh * stride_ch,
                               ksz_ptr + slot * stride_kss + hh * stride_ksh, h_mask, cols, HALF, BITS, K_GROUP)
                v_offs = t * stride_vt + hh[:, None] * stride_vh + cols[None, :]
                v1 = tl.load(v_ptr + v_offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_HEADS, BLOCK_HALF]
                v2 = tl.load(v_ptr + v_offs + HALF, mask=mask, other=0.0).to(tl.float32)
                quantize_store(v1, v2, mask, vc_ptr + slot * stride_cs + hh * stride_ch,
                               vsz_ptr + slot * stride_vss + hh * stride_vsh, h_mask, cols, HALF, BITS, V_GROUP)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    T, _, D = q.shape
    assert D % 2 == 0, f"head_dim {D} must be even"
    assert k.shape[0] == T and k.shape[2] == D, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    assert cos.shape == (T, D // 2) and sin.shape == (T, D // 2), \
        f"cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} must be [{T}, {D // 2}]"


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    _check(q, k, cos, sin)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [T, Hkv, D]
    if T > 0:
        BLOCK_HALF = triton.next_power_of_2(D // 2)
        BLOCK_HEADS = min(triton.next_power_of_2(max(Hq, Hkv)), max(2048 // BLOCK_HALF, 1))
        _rotary_kernel[(T,)](
            q, k, cos, sin, q_out, k_out,
            Hq, Hkv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            HALF=D // 2, BLOCK_HEADS=BLOCK_HEADS, BLOCK_HALF=BLOCK_HALF, **pdl_launch(q.device),
        )
    return q_out, k_out


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # [T, H, D/2] each
    c = cos.float()[:, None, :]  # [T, 1, D/2]
    s = sin.float()[:, None, :]  # [T, 1, D/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)  # [T, H, D]


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, cos, sin)
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] by cos/sin [T, D/2]; returns new tensors in the input dtype."""
    if q.is_cuda:
        return apply_rotary_triton(q, k, cos, sin)
    return apply_rotary_ref(q, k, cos, sin)


def _check_kv(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    (k_data, _, k_bits, _), (v_data, _, v_bits, _) = cache_parts(k_cache), cache_parts(v_cache)
    assert k_data.shape == v_data.shape and k_data.stride() == v_data.stride() and k_bits == v_bits, \
        f"k_cache {tuple(k_data.shape)} / v_cache {tuple(v_data.shape)} differ"
    assert v.shape == k.shape and tuple(k.shape[1:]) == tuple(k_cache.shape[2:]), \
        f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match the cache's [Hkv, D] {tuple(k_cache.shape[2:])}"
    assert slot_mapping.shape == (k.shape[0],), f"slot_mapping {tuple(slot_mapping.shape)} != [{k.shape[0]}]"


def rotary_write_kv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache, v_cache, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    _check_kv(k, v, k_cache, v_cache, slot_mapping)
    q_out, k_out = apply_rotary_ref(q, k, cos, sin)
    write_kv_cache(k_out, v.contiguous(), k_cache, v_cache, slot_mapping)
    return q_out


def rotary_write_kv_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache, v_cache, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    _check(q, k, cos, sin)
    _check_kv(k, v, k_cache, v_cache, slot_mapping)
    kc, ksz, bits, k_group = cache_parts(k_cache)
    vc, vsz, _, v_group = cache_parts(v_cache)
    if ksz is None:  # a float cache: the scale pointers are never read
        ksz, vsz = kc, vc
    assert all(c.stride(-1) == 1 and c.stride(0) == c.shape[1] * c.stride(1) for c in (kc, ksz, vsz)), \
        "the caches must be [num_blocks, block_size, Hkv, ...] with contiguous slots"
    assert bits == 16 or ksz.stride()[3:] == vsz.stride()[3:] == (2, 1), \
        "a head's (scale, zero) pairs must be contiguous"
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    slot_mapping = slot_mapping.to(device=q.device).contiguous()  # [T]
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if T > 0:  # grouped quantization reshapes each half into groups: BLOCK_HALF >= group
        BLOCK_HALF = max([triton.next_power_of_2(D // 2), *(g for g in (k_group, v_group) if g < D)])
        BLOCK_HEADS = min(triton.next_power_of_2(max(Hq, Hkv)), max(2048 // BLOCK_HALF, 1))
        _rotary_kv_kernel[(T,)](
            q, k, v, cos, sin, q_out, kc, vc, ksz, vsz, slot_mapping,
            Hq, Hkv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            sin.stride(0), q_out.stride(0), q_out.stride(1), kc.stride(1), kc.stride(2), ksz.stride(1),
            ksz.stride(2), vsz.stride(1), vsz.stride(2), HALF=D // 2, D=D, BLOCK_HEADS=BLOCK_HEADS,
            BLOCK_HALF=BLOCK_HALF, BLOCK_D=2 * BLOCK_HALF, BITS=bits, K_GROUP=k_group, V_GROUP=v_group,
            **pdl_launch(q.device),
        )
    return q_out


def rotary_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache, v_cache, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] by cos/sin [T, D/2], stores the rotated k and v [T, Hkv, D]
    at flat slots slot_mapping [T] of k_cache / v_cache [num_blocks, block_size, Hkv, D] or QuantizedKV (in
    place, quantized) and returns the rotated q as a new tensor. Same results as apply_rotary followed by
    write_kv_cache."""
    if q.is_cuda:
        return rotary_write_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return rotary_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


@functools.cache
def _fused_rope_on() -> bool:
    """LMC_FUSED_ROPE=0 (read once) keeps rotary_write_kv and the decode attention two launches (an A/B switch)."""
    return os.environ.get("LMC_FUSED_ROPE", "1") != "0"


# The smallest decode batch that takes the fused kernel. 2 x H200, 8B shape (bench/NOTES.md, session 17,
# tp_h200x2_v16_rope*.json): at batch 16 one launch a layer fewer saved 38-50 µs a step (fp16 tp 1 and 2, int4
# tp 1); at batch 1 the fused prologue (q rotated in every split program, k and v stored and a barrier in the
# last one) sat on the critical path and cost 17-52 µs. Session 18 (tp_h200x2_v17_rope_*.json, int4 tp 1, one
# run each): batch 4 +25 µs fused, batch 8 -25 µs. LMC_FUSED_ROPE_MIN_BATCH=N overrides it (an A/B knob).
FUSED_ROPE_MIN_BATCH = 8


@functools.cache
def _fused_rope_min_batch() -> int:
    """LMC_FUSED_ROPE_MIN_BATCH, read once: an integer >= 1 (default FUSED_ROPE_MIN_BATCH)."""
    value = os.environ.get("LMC_FUSED_ROPE_MIN_BATCH", str(FUSED_ROPE_MIN_BATCH))
    if not value.strip().isdigit() or int(value) < 1:
        raise LmcError(f"LMC_FUSED_ROPE_MIN_BATCH={value!r}: set it to a whole number of sequences >= 1 (the "
                       "smallest decode batch that rotates inside the attention kernel), or unset it")
    return int(value)


def decode_fuses_rope(device: torch.device, k_cache, batch: int) -> bool:
    """Whether rotary_decode_attention is one launch: on CUDA, over a float cache, from FUSED_ROPE_MIN_BATCH
    sequences (LMC_FUSED_ROPE_MIN_BATCH), unless LMC_FUSED_ROPE=0."""
    return (device.type == "cuda" and isinstance(k_cache, torch.Tensor) and batch >= _fused_rope_min_batch()
            and _fused_rope_on())


def rotary_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache, v_cache, slot_mapping: torch.Tensor, block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """A decode step's attention from un-rotated q [B, Hq, D]: rotary_write_kv (the new token of sequence b at
    position kv_lens[b] - 1, slot slot_mapping[b]), then paged_decode_attention; [B, Hq, D]. Where
    decode_fuses_rope, the decode kernel rotates q and stores k and v itself: the same output and cache bits."""
    if decode_fuses_rope(q.device, k_cache, q.shape[0]):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, kv_lens, scale,
                                             rope=(k, v, cos, sin, slot_mapping))
    q = rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, scale)
