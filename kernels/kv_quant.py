"""The quantized KV cache codec (quant_policy 8 and 4, as LMDeploy defines them): online (no calibration),
asymmetric, per token and per head. Holds the storage (`QuantizedKV`), the torch reference quantizer and
dequantizer, and the Triton helpers that the fused rotary + cache write (kernels/rotary.py) and the paged
attention kernels (kernels/attention.py) inline.

Layout (docs/kv-cache.md): each K (and V) head vector x[0:D] of a token is stored as codes c[0:D] in
[0, qmax] (qmax = 2^bits - 1) with float16 scales s and zeros z, z being the value code 0 stands for:

    x[d] ~ c[d] * s[g(d)] + z[g(d)]    (LMDeploy's (c - zp) * s with its zero point zp in code units: z = -zp * s)

A store's `group` says which channels share a (scale, zero): group = D is one pair for the whole vector
(policy 8's K and V, policy 4's V; g(d) = 0); group < D (policy 4's K: INT4_KEY_GROUP = 16 channels) cuts
each half of the head into groups of `group` consecutive channels, the last group of a half shorter when
group does not divide D/2: with n = ceil(D/2 / group) groups per half, g(d) = (d mod D/2) // group + n *
(d >= D/2), 2n pairs per vector. Grouped stores hold 4 bits only. (SmolLM2 perplexity through the cache,
WikiText-2 / PTB: int4 K per vector +12.0 % / +10.9 %, in 16-channel groups +3.5 % / +2.9 %: a few K channels
are 3-7x the others and set a whole vector's step; docs/benchmarks.md.)

One layer's K (or V) is a QuantizedKV of two tensors, addressed by slot like the float cache
(position p of sequence b -> block block_tables[b, p // block_size], offset p % block_size):

    codes         uint8   [num_blocks, block_size, Hkv, D]       bits 8: byte d = c[d]
                  uint8   [num_blocks, block_size, Hkv, D / 2]   bits 4: byte j = c[j] | c[j + D/2] << 4
                                                                 (low nibble: first half of the head, high
                                                                 nibble: second half, as LMDeploy packs it)
    scales_zeros  float16 [num_blocks, block_size, Hkv, G, 2]    [..., g, 0] = s[g], [..., g, 1] = z[g];
                                                                 G = 1 (group = D) or 2n (above)

Quantization of each group's channels, in float32 with lo, hi = their min and max:

    z    = fp16(lo)                                   nearest; exact for fp16 inputs and bf16 ones in range
    span = max(hi - z, 2 * qmax * (z - lo))
    s    = fp16(max(span * (1 + 2^-10) / qmax, 2^-14))
    c    = floor((x - z) / s + 0.5)                   clamped to [0, qmax] (never needed, see below)

The codes are computed from the stored (rounded) s and z, s covers [z, hi] with a margin for its own fp16
rounding, and when z rounded up past lo, s >= 2 (z - lo) keeps lo's code at 0: so (x - z) / s lies in
(-0.5, qmax) and |c * s + z - x| <= s / 2 for every element. The 2^-14 floor (float16's smallest normal)
keeps s normal for constant groups. float16 parameters (4 bytes per pair) rather than float32 (8): bytes
per head vector are code_bytes + 4 G (vector_bytes); float16 range limits |x| to 65504, as an fp16 cache does.
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
INT4_KEY_GROUP = 16  # channels per (scale, zero) of policy 4's keys; docs/kv-cache.md, "Why int4 keys are grouped"


def store_groups(head_dim: int, bits: int) -> tuple[int, int]:
    """Channels per (scale, zero) of K and of V in a cache of `bits`: policy 4's K in groups of
    INT4_KEY_GROUP, all else one pair per vector (group = head_dim)."""
    return (min(INT4_KEY_GROUP, head_dim) if bits == 4 else head_dim), head_dim


def num_groups(head_dim: int, group: int) -> int:
    """(scale, zero) pairs per head vector: 1 when group = head_dim, else ceil(D/2 / group) per half."""
    return 1 if group >= head_dim else 2 * -(-(head_dim // 2) // group)


def group_index(head_dim: int, group: int, device=None) -> torch.Tensor:
    """g(d) for d in [0, head_dim): the (scale, zero) pair each channel uses; [head_dim] int64."""
    d = torch.arange(head_dim, device=device)
    if group >= head_dim:
        return torch.zeros_like(d)
    half = head_dim // 2
    return (d % half) // group + (d >= half) * (num_groups(head_dim, group) // 2)


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of codes per head vector."""
    return head_dim * bits // 8


def vector_bytes(head_dim: int, bits: int, group: int) -> int:
    """Bytes per stored head vector: its codes plus its float16 scales and zeros."""
    return code_bytes(head_dim, bits) + num_groups(head_dim, group) * 2 * SCALE_ZERO_DTYPE.itemsize


def check_layout(head_dim: int, bits: int, group: int) -> None:
    assert bits in (8, 4), f"quantized KV holds 8 or 4 bits, not {bits}"
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"
    assert group == head_dim or (bits == 4 and group < head_dim and group & (group - 1) == 0), \
        f"groups of {group} channels: one per vector ({head_dim}), or a power of 2 below it with 4 bits"


@dataclass(frozen=True)
class QuantizedKV:
    """One layer's K (or V) of a quantized paged cache; the layout is in the module docstring."""

    codes: torch.Tensor  # [num_blocks, block_size, Hkv, D * bits / 8] uint8
    scales_zeros: torch.Tensor  # [num_blocks, block_size, Hkv, G, 2] float16: (scale, zero) per group
    bits: int  # 8 or 4
    group: int  # channels per (scale, zero): D (one pair per vector) or fewer (4 bits; module docstring)

    @classmethod
    def empty(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, bits: int, group: int,
              device) -> "QuantizedKV":
        check_layout(head_dim, bits, group)
        slots = (num_blocks, block_size, num_kv_heads)
        return cls(torch.empty(*slots, code_bytes(head_dim, bits), dtype=torch.uint8, device=device),
                   torch.empty(*slots, num_groups(head_dim, group), 2, dtype=SCALE_ZERO_DTYPE, device=device),
                   bits, group)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[num_blocks, block_size, Hkv, D], the float cache's shape for the same vectors."""
        nb, bs, hkv, c = self.codes.shape
        return nb, bs, hkv, c * 8 // self.bits

    @property
    def device(self) -> torch.device:
        return self.codes.device


def quantize_kv_ref(x: torch.Tensor, bits: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Head vectors x [..., D] -> codes [..., D * bits / 8] uint8 and scales_zeros [..., G, 2] float16, with
    `group` channels per (scale, zero) (None: one pair per vector)."""
    D = x.shape[-1]
    group = group or D
    check_layout(D, bits, group)
    qmax = 2**bits - 1
    xf = x.float()
    gid = group_index(D, group, x.device).expand(xf.shape)  # [..., D]
    bounds = xf.new_empty(*xf.shape[:-1], num_groups(D, group))  # [..., G]
    lo = bounds.fill_(float("inf")).scatter_reduce(-1, gid, xf, "amin")
    hi = bounds.clone().fill_(float("-inf")).scatter_reduce(-1, gid, xf, "amax")
    zero = lo.to(SCALE_ZERO_DTYPE)
    zf = zero.float()
    span = torch.maximum(hi - zf, (2 * qmax) * (zf - lo))
    scale = torch.clamp(span * (SCALE_MARGIN / qmax), min=MIN_SCALE).to(SCALE_ZERO_DTYPE)  # [..., G]
    c = torch.floor((xf - zf.gather(-1, gid)) / scale.float().gather(-1, gid) + 0.5)
    c = c.clamp(0, qmax).to(torch.uint8)  # [..., D]
    if bits == 4:
        c = c[..., : D // 2] | (c[..., D // 2:] << 4)  # [..., D / 2]: low nibble j, high nibble j + D/2
    return c, torch.stack((scale, zero), dim=-1)


def dequantize_kv_ref(codes: torch.Tensor, scales_zeros: torch.Tensor, bits: int, group: int | None = None
                      ) -> torch.Tensor:
    """codes [..., D * bits / 8], scales_zeros [..., G, 2] -> head vectors [..., D] float32."""
    if bits == 4:
        codes = torch.cat((codes & 15, codes >> 4), dim=-1)  # [..., D]
    D = codes.shape[-1]
    sz = scales_zeros.float()[..., group_index(D, group or D, codes.device), :]  # [..., D, 2]
    return codes.float() * sz[..., 0] + sz[..., 1]


def cache_parts(cache) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """A float cache tensor or a QuantizedKV -> (values or codes, scales_zeros or None, bits: 16 for float,
    channels per (scale, zero): head_dim for float)."""
    if isinstance(cache, QuantizedKV):
        return cache.codes, cache.scales_zeros, cache.bits, cache.group
    return cache, None, 16, cache.shape[-1]


if triton is not None:
    _SCALE_MARGIN = tl.constexpr(SCALE_MARGIN)
    _MIN_SCALE = tl.constexpr(MIN_SCALE)

    @triton.jit
    def _scale_zero(lo, hi, QMAX: tl.constexpr):
        """float16 (scale, zero) of groups with float32 bounds lo, hi; as quantize_kv_ref."""
        zero = lo.to(tl.float16)
        zf = zero.to(tl.float32)
        span = tl.maximum(hi - zf, (2 * QMAX) * (zf - lo))
        scale = tl.maximum(span * (_SCALE_MARGIN / QMAX), _MIN_SCALE).to(tl.float16)
        return scale, zero

    @triton.jit
    def _codes(x, scale, zero, QMAX: tl.constexpr):
        """uint8 codes of x given each element's float16 scale and zero (broadcast to x's shape)."""
        c = tl.floor(tl.div_rn(x - zero.to(tl.float32), scale.to(tl.float32)) + 0.5)
        return tl.minimum(tl.maximum(c, 0.0), QMAX).to(tl.uint8)

    @triton.jit
    def _quantize_half_grouped(x, mask, sz_row, row_mask, g0, HALF: tl.constexpr, GROUP: tl.constexpr,
                               QMAX: tl.constexpr):
        """Codes [R, BLOCK_HALF] of one half of R head vectors x (valid where mask), in groups of GROUP
        consecutive channels; stores the groups' (scale, zero) as pairs g0, g0 + 1, ... at sz_row [R]."""
        R: tl.constexpr = x.shape[0]
        BLOCK_HALF: tl.constexpr = x.shape[1]
        NGB: tl.constexpr = BLOCK_HALF // GROUP
        NGH: tl.constexpr = (HALF + GROUP - 1) // GROUP
        g = tl.arange(0, NGB)
        g_mask = row_mask[:, None] & (g[None, :] < NGH)  # [R, NGB]: real groups of real rows
        xg = tl.reshape(x, (R, NGB, GROUP))
        mg = tl.reshape(mask, (R, NGB, GROUP))
        lo = tl.where(g_mask, tl.min(tl.where(mg, xg, float("inf")), axis=2), 0.0)  # [R, NGB]
        hi = tl.where(g_mask, tl.max(tl.where(mg, xg, float("-inf")), axis=2), 0.0)
        scale, zero = _scale_zero(lo, hi, QMAX)
        sz = sz_row[:, None] + 2 * (g0 + g)[None, :]  # [R, NGB]
        tl.store(sz, scale, mask=g_mask)
        tl.store(sz + 1, zero, mask=g_mask)
        return tl.reshape(_codes(xg, scale[:, :, None], zero[:, :, None], QMAX), (R, BLOCK_HALF))

    @triton.jit
    def quantize_store(x1, x2, mask, codes_row, sz_row, row_mask, cols, HALF: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr):
        """Quantizes R head vectors given as halves x1 = x[:, :HALF], x2 = x[:, HALF:] ([R, BLOCK_HALF] float32,
        valid where mask) and stores codes at codes_row [R] (pointers to each vector's first code byte) and
        the (scale, zero) pairs at sz_row [R]; rows where row_mask is false are not written. GROUP channels per
        pair (2 * HALF: one per vector; fewer: BITS 4 only, BLOCK_HALF >= GROUP). Same arithmetic as
        quantize_kv_ref."""
        QMAX: tl.constexpr = (1 << BITS) - 1
        if GROUP < 2 * HALF:
            c1 = _quantize_half_grouped(x1, mask, sz_row, row_mask, 0, HALF, GROUP, QMAX)
            c2 = _quantize_half_grouped(x2, mask, sz_row, row_mask, (HALF + GROUP - 1) // GROUP, HALF, GROUP, QMAX)
        else:
            lo = tl.min(tl.minimum(tl.where(mask, x1, float("inf")), tl.where(mask, x2, float("inf"))), axis=1)
            hi = tl.max(tl.maximum(tl.where(mask, x1, float("-inf")), tl.where(mask, x2, float("-inf"))), axis=1)
            lo = tl.where(row_mask, lo, 0.0)  # [R]; rows past the heads: no inf - inf
            hi = tl.where(row_mask, hi, 0.0)
            scale, zero = _scale_zero(lo, hi, QMAX)
            c1 = _codes(x1, scale[:, None], zero[:, None], QMAX)  # [R, BLOCK_HALF]
            c2 = _codes(x2, scale[:, None], zero[:, None], QMAX)
            tl.store(sz_row, scale, mask=row_mask)
            tl.store(sz_row + 1, zero, mask=row_mask)
        if BITS == 4:  # byte j: c[j] in the low nibble, c[j + D/2] in the high one
            tl.store(codes_row[:, None] + cols[None, :], c1 | (c2 << 4), mask=mask)
        else:  # byte d: c[d]
            tl.store(codes_row[:, None] + cols[None, :], c1, mask=mask)
            tl.store(codes_row[:, None] + HALF + cols[None, :], c2, mask=mask)

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
    def _codes_to_float(c, F16: tl.constexpr):
        """uint8 codes (< 256) as float16 values (F16) or float32 ones, exactly. To float16 without a conversion
        instruction (Hopper issues those at a quarter of the FMA rate: decode attention spent more time converting
        than reading): the bits 0x6400 | c are the float16 1024 + c, so one OR and one subtraction give c."""
        if F16:
            x = (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        else:
            x = c.to(tl.float32)
        return x

    @triton.jit
    def _affine(c, scale, zero, F16: tl.constexpr):
        """c * scale + zero (the parameters stored as float16): in float16 when F16 (the multiply and add fuse
        into one fma.rn.f16, one rounding), else in float32."""
        if F16:
            x = _codes_to_float(c, F16) * scale + zero
        else:
            x = _codes_to_float(c, F16) * scale.to(tl.float32) + zero.to(tl.float32)
        return x

    @triton.jit
    def _dequant_half_grouped(c, sz_ptr, sz_off, n_mask, g0, HALF: tl.constexpr, GROUP: tl.constexpr,
                              F16: tl.constexpr):
        """One half's codes c [BLOCK_N, BH] (uint8) -> float16 (F16) or float32 values with the pairs g0, g0 + 1,
        ... at sz_off [BLOCK_N]; groups past the half read (0, 0)."""
        BLOCK_N: tl.constexpr = c.shape[0]
        BH: tl.constexpr = c.shape[1]
        NGB: tl.constexpr = BH // GROUP
        NGH: tl.constexpr = (HALF + GROUP - 1) // GROUP
        g = tl.arange(0, NGB)
        g_mask = n_mask[:, None] & (g[None, :] < NGH)  # [BLOCK_N, NGB]
        sz = sz_ptr + sz_off[:, None] + 2 * (g0 + g)[None, :]
        scale = tl.load(sz, mask=g_mask, other=0.0)  # [BLOCK_N, NGB] float16
        zero = tl.load(sz + 1, mask=g_mask, other=0.0)
        x = _affine(tl.reshape(c, (BLOCK_N, NGB, GROUP)), scale[:, :, None], zero[:, :, None], F16)
        return tl.reshape(x, (BLOCK_N, BH))

    @triton.jit
    def _dequant_vector(c, sz_ptr, sz_off, n_mask, F16: tl.constexpr):
        """Codes c [BLOCK_N, BLOCK_D] -> float16 (F16) or float32 values with one (scale, zero) per row at
        sz_off [BLOCK_N]."""
        scale = tl.load(sz_ptr + sz_off, mask=n_mask, other=0.0)  # [BLOCK_N] float16
        zero = tl.load(sz_ptr + sz_off + 1, mask=n_mask, other=0.0)
        return _affine(c, scale[:, None], zero[:, None], F16)

    @triton.jit
    def load_dequant(codes_ptr, sz_ptr, code_off, sz_off, n_mask, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BITS: tl.constexpr, GROUP: tl.constexpr, F16: tl.constexpr):
        """Tokens' head vectors [BLOCK_N, BLOCK_D] in float16 when F16 (c * s + z rounded once), else float32,
        columns in head_dims order, from codes at code_off [BLOCK_N] and (scale, zero) pairs at sz_off [BLOCK_N]
        (GROUP channels per pair; fewer than D: BITS 4 only, BLOCK_D >= 2 * GROUP); rows where n_mask is false
        are zeros. Columns past D hold a zero z or 0 (q is zero there, and those output columns are never
        stored)."""
        if BITS == 4:
            cols = tl.arange(0, BLOCK_D // 2)
            b = tl.load(codes_ptr + code_off[:, None] + cols[None, :],
                        mask=n_mask[:, None] & (cols[None, :] < D // 2), other=0)  # [BLOCK_N, BLOCK_D / 2]
            if GROUP < D:  # each half in its own groups; then column 2j = x[j], 2j + 1 = x[j + D/2]
                x1 = _dequant_half_grouped(b & 15, sz_ptr, sz_off, n_mask, 0, D // 2, GROUP, F16)
                x2 = _dequant_half_grouped(b >> 4, sz_ptr, sz_off, n_mask, (D // 2 + GROUP - 1) // GROUP, D // 2,
                                           GROUP, F16)
                x = tl.interleave(x1, x2)  # [BLOCK_N, BLOCK_D]
            else:  # column 2j = c[j], 2j + 1 = c[j + D/2]
                x = _dequant_vector(tl.interleave(b & 15, b >> 4), sz_ptr, sz_off, n_mask, F16)
        else:
            cols = tl.arange(0, BLOCK_D)
            c = tl.load(codes_ptr + code_off[:, None] + cols[None, :],
                        mask=n_mask[:, None] & (cols[None, :] < D), other=0)  # [BLOCK_N, BLOCK_D]
            x = _dequant_vector(c, sz_ptr, sz_off, n_mask, F16)
        return x

    @triton.jit
    def codes_to_float32(c):
        """uint8 codes as float32 values, exactly, without a conversion instruction (a quarter-rate I2F on
        Hopper): the bits 0x4B000000 | c are the float32 2^23 + c, so one OR and one subtraction give c."""
        return (c.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _codes_f16_asm(c):
        """uint8 codes as float16 1024 + c (GPU only): one PRMT per two codes, the four codes of a register
        interleaved with 0x64 bytes. Not pure on purpose: Triton then keeps the conversion where the tile was
        loaded (16 bytes per thread, then float16 to shared memory and ldmatrix into the MMA) instead of moving it
        after the shared-memory read of the byte tile in the MMA's operand layout, which for a V tile (the dot
        reduces over its rows) reads one byte per load (int8 tile loop, per thread: 97 shared loads -> 11)."""
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 magic;
            mov.b32 magic, 0x64646464;
            prmt.b32 $0, $2, magic, 0x4140;
            prmt.b32 $1, $2, magic, 0x4342;
            }""", "=r,=r,r", [c], dtype=tl.float16, is_pure=False, pack=4)

    @triton.jit
    def _nibbles_f16_asm(b):
        """Bytes b (uint8) as their low and high nibbles in float16, 1024 + c each (GPU only; as _codes_f16_asm)."""
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, magic;
            mov.b32 magic, 0x64646464;
            and.b32 t, $4, 0x0f0f0f0f;
            prmt.b32 $0, t, magic, 0x4140;
            prmt.b32 $1, t, magic, 0x4342;
            shr.u32 t, $4, 4;
            and.b32 t, t, 0x0f0f0f0f;
            prmt.b32 $2, t, magic, 0x4140;
            prmt.b32 $3, t, magic, 0x4342;
            }""", "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16), is_pure=False, pack=4)

    @triton.jit
    def code_operand(c, DTYPE: tl.constexpr, ASM: tl.constexpr):
        """uint8 codes (< 256) as a dot operand of DTYPE (float16 or float32), exactly and without a conversion
        instruction: float16 gives 1024 + c (the bits 0x6400 | c; the caller folds the 1024 into its zero term,
        see code_offset; ASM: by _codes_f16_asm, GPU only), float32 gives c (codes_to_float32)."""
        if DTYPE == tl.float16:
            if ASM:
                x = _codes_f16_asm(c)
            else:
                x = (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        else:
            x = codes_to_float32(c)
        return x

    @triton.jit
    def nibble_operands(b, DTYPE: tl.constexpr, ASM: tl.constexpr):
        """4-bit codes in bytes b (uint8: c[j] low, c[j + D/2] high) as the two halves' dot operands of DTYPE
        (code_operand of each nibble)."""
        if DTYPE == tl.float16 and ASM:
            x1, x2 = _nibbles_f16_asm(b)
        else:
            x1 = code_operand(b & 15, DTYPE, ASM)
            x2 = code_operand(b >> 4, DTYPE, ASM)
        return x1, x2

    @triton.jit
    def code_offset(DTYPE: tl.constexpr):
        """What code_operand adds to every code of a DTYPE operand: 1024 for float16, else 0."""
        return 1024.0 if DTYPE == tl.float16 else 0.0

    @triton.jit
    def load_scale_zero(sz, mask):
        """The (scale, zero) pairs at sz (float16 pointers to each pair's scale; pairs are 4-byte aligned) as
        float32, one 32-bit load per pair; (0, 0) where mask is false."""
        w = tl.load(sz.to(tl.pointer_type(tl.uint32)), mask=mask, other=0)
        scale = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        zero = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return scale, zero

    @triton.jit
    def load_codes(codes_ptr, code_off, n_mask, D: tl.constexpr, BLOCK_D: tl.constexpr):
        """8-bit codes c[j] of tokens' head vectors, uint8 [..., BLOCK_D] (code_off and n_mask [..., 1]: each
        vector's first code byte, and which are read; 0 past D and where n_mask is false)."""
        j = tl.arange(0, BLOCK_D)
        return tl.load(codes_ptr + code_off + j, mask=n_mask & (j < D), other=0)

    @triton.jit
    def load_nibble_halves(codes_ptr, code_off, n_mask, D: tl.constexpr, BLOCK_H: tl.constexpr):
        """4-bit codes of tokens' head vectors as the head's two halves without an interleave, c[j] and c[j + D/2]
        ([..., BLOCK_H] uint8 each, j < D/2): the low and high nibbles of byte j. As load_codes otherwise."""
        b = load_codes(codes_ptr, code_off, n_mask, D // 2, BLOCK_H)
        return b & 15, b >> 4
