"""The quantized KV cache codec (quant_policy 8 and 4, as LMDeploy defines them): online (no calibration),
asymmetric, one scale and zero per token and per head. Holds the storage (`QuantizedKV`), the torch
reference quantizer and dequantizer, and the Triton helpers that the fused rotary + cache write
(kernels/rotary.py) and the paged attention kernels (kernels/attention.py) inline.

Layout (docs/kv-cache.md): each K (and V) head vector x[0:D] of a token is stored as codes c[0:D] in
[0, qmax] (qmax = 2^bits - 1) with its own float16 scale s and zero z, z being the value code 0 stands for:

    x ~ c * s + z        (LMDeploy's (c - zp) * s with its zero point zp in code units: z = -zp * s)

One layer's K (or V) is a QuantizedKV of two tensors, addressed by slot like the float cache
(position p of sequence b -> block block_tables[b, p // block_size], offset p % block_size):

    codes         uint8   [num_blocks, block_size, Hkv, D]      bits 8: byte d = c[d]
                  uint8   [num_blocks, block_size, Hkv, D / 2]  bits 4: byte j = c[j] | c[j + D/2] << 4
                                                                (low nibble: first half of the head, high
                                                                nibble: second half, as LMDeploy packs it)
    scales_zeros  float16 [num_blocks, block_size, Hkv, 2]      [..., 0] = s, [..., 1] = z

Quantization, in float32 with lo, hi = min(x), max(x):

    z    = fp16(lo)                                   nearest; exact for fp16 inputs and bf16 ones in range
    span = max(hi - z, 2 * qmax * (z - lo))
    s    = fp16(max(span * (1 + 2^-10) / qmax, 2^-14))
    c    = floor((x - z) / s + 0.5)                   clamped to [0, qmax] (never needed, see below)

The codes are computed from the stored (rounded) s and z, s covers [z, hi] with a margin for its own fp16
rounding, and when z rounded up past lo, s >= 2 (z - lo) keeps lo's code at 0: so (x - z) / s lies in
(-0.5, qmax) and |c * s + z - x| <= s / 2 for every element. The 2^-14 floor (float16's smallest normal)
keeps s normal for constant vectors. float16 parameters (4 bytes per head vector) rather than float32 (8):
int4 at head_dim 64 stores 36 bytes per vector instead of 40 (3.56x the vectors of an fp16 cache rather
than 3.2x); float16 range limits |x| to 65504, as an fp16 cache does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch reference serves
    triton = None

SCALE_ZERO_DTYPE = torch.float16
SCALE_MARGIN = 1 + 2**-10  # covers the float16 rounding of s (relative error <= 2^-11)
MIN_SCALE = 2**-14  # float16's smallest normal


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of codes per head vector."""
    return head_dim * bits // 8


def vector_bytes(head_dim: int, bits: int) -> int:
    """Bytes per stored head vector: its codes plus its float16 scale and zero."""
    return code_bytes(head_dim, bits) + 2 * SCALE_ZERO_DTYPE.itemsize


def check_bits(head_dim: int, bits: int) -> None:
    assert bits in (8, 4), f"quantized KV holds 8 or 4 bits, not {bits}"
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"


@dataclass(frozen=True)
class QuantizedKV:
    """One layer's K (or V) of a quantized paged cache; the layout is in the module docstring."""

    codes: torch.Tensor  # [num_blocks, block_size, Hkv, D * bits / 8] uint8
    scales_zeros: torch.Tensor  # [num_blocks, block_size, Hkv, 2] float16: (scale, zero)
    bits: int  # 8 or 4

    @classmethod
    def empty(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, bits: int,
              device) -> "QuantizedKV":
        check_bits(head_dim, bits)
        slots = (num_blocks, block_size, num_kv_heads)
        return cls(torch.empty(*slots, code_bytes(head_dim, bits), dtype=torch.uint8, device=device),
                   torch.empty(*slots, 2, dtype=SCALE_ZERO_DTYPE, device=device), bits)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[num_blocks, block_size, Hkv, D], the float cache's shape for the same vectors."""
        nb, bs, hkv, c = self.codes.shape
        return nb, bs, hkv, c * 8 // self.bits

    @property
    def device(self) -> torch.device:
        return self.codes.device


def quantize_kv_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head vectors x [..., D] -> codes [..., D * bits / 8] uint8 and scales_zeros [..., 2] float16."""
    D = x.shape[-1]
    check_bits(D, bits)
    qmax = 2**bits - 1
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)  # [...]
    zero = lo.to(SCALE_ZERO_DTYPE)
    zf = zero.float()
    span = torch.maximum(hi - zf, (2 * qmax) * (zf - lo))
    scale = torch.clamp(span * (SCALE_MARGIN / qmax), min=MIN_SCALE).to(SCALE_ZERO_DTYPE)
    c = torch.floor((xf - zf[..., None]) / scale.float()[..., None] + 0.5).clamp(0, qmax).to(torch.uint8)  # [..., D]
    if bits == 4:
        c = c[..., : D // 2] | (c[..., D // 2:] << 4)  # [..., D / 2]: low nibble j, high nibble j + D/2
    return c, torch.stack((scale, zero), dim=-1)


def dequantize_kv_ref(codes: torch.Tensor, scales_zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D * bits / 8], scales_zeros [..., 2] -> head vectors [..., D] float32."""
    if bits == 4:
        codes = torch.cat((codes & 15, codes >> 4), dim=-1)  # [..., D]
    sz = scales_zeros.float()
    return codes.float() * sz[..., 0:1] + sz[..., 1:2]


def cache_parts(cache) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """A float cache tensor or a QuantizedKV -> (values or codes, scales_zeros or None, bits: 16 for float)."""
    if isinstance(cache, QuantizedKV):
        return cache.codes, cache.scales_zeros, cache.bits
    return cache, None, 16


if triton is not None:
    _SCALE_MARGIN = tl.constexpr(SCALE_MARGIN)
    _MIN_SCALE = tl.constexpr(MIN_SCALE)

    @triton.jit
    def quantize_store(x1, x2, mask, codes_row, sz_row, row_mask, cols, HALF: tl.constexpr, BITS: tl.constexpr):
        """Quantizes R head vectors given as halves x1 = x[:, :HALF], x2 = x[:, HALF:] ([R, BLOCK_HALF] float32,
        valid where mask) and stores codes at codes_row [R] (pointers to each vector's first code byte) and
        (scale, zero) at sz_row [R]; rows where row_mask is false are not written. Same arithmetic as
        quantize_kv_ref."""
        QMAX: tl.constexpr = (1 << BITS) - 1
        lo = tl.min(tl.minimum(tl.where(mask, x1, float("inf")), tl.where(mask, x2, float("inf"))), axis=1)  # [R]
        hi = tl.max(tl.maximum(tl.where(mask, x1, float("-inf")), tl.where(mask, x2, float("-inf"))), axis=1)
        lo = tl.where(row_mask, lo, 0.0)  # rows past the heads: no inf - inf
        hi = tl.where(row_mask, hi, 0.0)
        zero = lo.to(tl.float16)
        zf = zero.to(tl.float32)
        span = tl.maximum(hi - zf, (2 * QMAX) * (zf - lo))
        scale = tl.maximum(span * (_SCALE_MARGIN / QMAX), _MIN_SCALE).to(tl.float16)
        sf = scale.to(tl.float32)
        c1 = tl.floor(tl.div_rn(x1 - zf[:, None], sf[:, None]) + 0.5)
        c2 = tl.floor(tl.div_rn(x2 - zf[:, None], sf[:, None]) + 0.5)
        c1 = tl.minimum(tl.maximum(c1, 0.0), QMAX).to(tl.uint8)  # [R, BLOCK_HALF]
        c2 = tl.minimum(tl.maximum(c2, 0.0), QMAX).to(tl.uint8)
        if BITS == 4:  # byte j: c[j] in the low nibble, c[j + D/2] in the high one
            tl.store(codes_row[:, None] + cols[None, :], c1 | (c2 << 4), mask=mask)
        else:  # byte d: c[d]
            tl.store(codes_row[:, None] + cols[None, :], c1, mask=mask)
            tl.store(codes_row[:, None] + HALF + cols[None, :], c2, mask=mask)
        tl.store(sz_row, scale, mask=row_mask)
        tl.store(sz_row + 1, zero, mask=row_mask)

    @triton.jit
    def head_dims(D: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr):
        """The head-dim index that each column of an attention tile holds, and which columns are real: the
        identity, except for 4 bits, whose tiles interleave the head's two halves (column 2j holds j, column
        2j + 1 holds j + D/2: the order of a byte's two nibbles)."""
        cols = tl.arange(0, BLOCK_D)
        if BITS == 4:
            return cols // 2 + (cols % 2) * (D // 2), cols // 2 < D // 2
        return cols, cols < D

    @triton.jit
    def load_dequant(codes_ptr, sz_ptr, code_off, sz_off, n_mask, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BITS: tl.constexpr):
        """Tokens' head vectors [BLOCK_N, BLOCK_D] in float32, columns in head_dims order, from codes at
        code_off [BLOCK_N] and (scale, zero) at sz_off [BLOCK_N]; rows where n_mask is false are zeros.
        Columns past D hold the zero z (q is zero there, and those output columns are never stored)."""
        scale = tl.load(sz_ptr + sz_off, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        zero = tl.load(sz_ptr + sz_off + 1, mask=n_mask, other=0.0).to(tl.float32)
        if BITS == 4:
            cols = tl.arange(0, BLOCK_D // 2)
            b = tl.load(codes_ptr + code_off[:, None] + cols[None, :],
                        mask=n_mask[:, None] & (cols[None, :] < D // 2), other=0)  # [BLOCK_N, BLOCK_D / 2]
            c = tl.interleave(b & 15, b >> 4)  # [BLOCK_N, BLOCK_D]: column 2j = c[j], 2j + 1 = c[j + D/2]
        else:
            cols = tl.arange(0, BLOCK_D)
            c = tl.load(codes_ptr + code_off[:, None] + cols[None, :],
                        mask=n_mask[:, None] & (cols[None, :] < D), other=0)  # [BLOCK_N, BLOCK_D]
        return c.to(tl.float32) * scale[:, None] + zero[:, None]
