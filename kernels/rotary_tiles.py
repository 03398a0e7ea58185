"""The rotary formula as Triton helpers, inlined by the rotary kernels (kernels/rotary.py). HF's "rotate half": with
x1 = x[..., :D/2] and x2 = x[..., D/2:], out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin), in float32, rounded
to x's dtype. Every kernel computes it with `rotate_halves`, the same operations in the same order, so a fused
kernel and the separate ones produce the same bits.
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
        (broadcast against them), computed in float32 and rounded to x's dtype."""
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        o1 = x1f * cos - x2f * sin
        o2 = x2f * cos + x1f * sin
        return o1.to(x1.dtype), o2.to(x1.dtype)
