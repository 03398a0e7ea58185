"""The rotary formula as Triton helpers, inlined by the rotary kernels (kernels/rotary.py) and by the decode
attention kernel that rotates q and the step's k itself (kernels/attention.py). HF's "rotate half": with
x1 = x[..., :D/2] and x2 = x[..., D/2:], out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin), in float32, rounded
to x's dtype (the GPU's roundings: fused multiply-adds; the torch references round each product, within one
float32 ulp). Every kernel computes it with `rotate_halves`, the same operations and roundings, so a fused kernel
and the separate ones produce the same bits.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch references serve
    triton = None

if triton is not None:

    @triton.jit
    def cos_sin_at(cos_ptr, sin_ptr, t, stride_cos, stride_sin, cols, mask):
        """Token t's cos and sin at columns `cols` of its rows, in float32 (zeros where not mask)."""
        cos = tl.load(cos_ptr + t * stride_cos + cols, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t * stride_sin + cols, mask=mask, other=0.0).to(tl.float32)
        return cos, sin

    @triton.jit
    def rotate_halves(x1, x2, cos, sin):
        """The rotated halves (x1 * cos - x2 * sin, x2 * cos + x1 * sin) of x1, x2 (x's dtype) by float32 cos, sin
        (broadcast against them), computed in float32 and rounded to x's dtype. The multiply-adds are written out
        (x2 * sin and x1 * sin rounded, x1 * cos and x2 * cos fused): left to the compiler, which product it fuses
        depends on the code around it (sm_90: the rotary kernel fused x1 * sin into o2, the decode kernel x2 * cos),
        and a kernel that inlines this must give the same bits as the others."""
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        o1 = tl.fma(x1f, cos, -(x2f * sin))
        o2 = tl.fma(x2f, cos, x1f * sin)
        return o1.to(x1.dtype), o2.to(x1.dtype)

    @triton.jit
    def pair_cols(dims, HALF: tl.constexpr):
        """For head dims `dims` (< 2 * HALF): the pair index j (dim j of the first half pairs with j + HALF of the
        second, both rotated by cos[j], sin[j]) and whether each dim is in the first half."""
        first = dims < HALF
        return tl.where(first, dims, dims - HALF), first

    @triton.jit
    def rotate_whole(x_ptrs, mask, cos, sin, first, HALF: tl.constexpr):
        """Whole heads rotated in one tile: x_ptrs [..., BLOCK_D] point at x[j] for each column's pair index j
        (pair_cols), cos and sin [BLOCK_D] are the pair's, `first` [BLOCK_D] marks the columns of first-half dims.
        Each column computes both halves with rotate_halves and keeps its own: [..., BLOCK_D] in x's dtype, zeros
        where not mask."""
        x1 = tl.load(x_ptrs, mask=mask, other=0.0)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
        o1, o2 = rotate_halves(x1, x2, cos, sin)
        return tl.where(first, o1, o2)
