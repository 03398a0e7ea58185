"""RMSNorm with an optional fused residual add (Llama's pre-norm), one program per row.

h = x + residual (or x), y = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype), as in HF's LlamaRMSNorm:
the sum is rounded to x.dtype (it is the residual stream), statistics are taken in fp32, and the
normalized value is rounded to x.dtype before the weight multiplies it.

The row math lives in the jit helpers below (`add_residual`, `rms_scale`, `rms_apply`, `add_rms_row`), which every
kernel that norms a row calls: this one, the one-shot all-reduce's fused form (kernels/allreduce.py) and the
one-token GEMVs that take the add + norm into their prologue (kernels/gemv.py, kernels/w4a16.py, fed a
`PendingNorm`). The sum of squares is taken so that its bits do not depend on the kernel's layout (its number of
warps): each kernel then gets the same normed row bit for bit, whatever its launch settings (`sum_of_squares`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmc.errors import LmcError
from lmc.kernels.pdl import pdl_launch, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch reference serves
    triton = None

if triton is not None:

    @triton.jit
    def _power_scales(amax):
        """(2^(127 - e), 2^(e - 127)) for amax's biased exponent e (at most 253): amax times the first is below 4.
        The second is 0 for a zero (or subnormal) amax."""
        e = tl.minimum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 253)  # amax < 2^(e - 126)
        return ((254 - e) << 23).to(tl.float32, bitcast=True), (e << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _fixed_squares(h, down):
        """sum over h float32 [BLOCK] of (h * down)^2 as int64 fixed point with 40 fraction bits (each term < 2^44:
        8192 of them fit)."""
        u = h * down
        return tl.sum((u * u * 1099511627776.0).to(tl.int64), axis=0)

    @triton.jit
    def _float_of_fixed(fixed, up):
        return fixed.to(tl.float32) * 9.094947017729282e-13 * up * up  # * 2^-40, then the power of two back

    @triton.jit
    def sum_of_squares(h):
        """sum(h * h) over h float32 [BLOCK] (zeros past the row), with bits independent of the order of the sum.
        Each square is taken relative to the row's largest magnitude (scaled by a power of two, exact), as a fixed
        point number with 40 fraction bits (exact for float16 and bfloat16 values; what lies below 2^-40 of the
        largest square is dropped) and summed in int64, which is associative; one rounding to float32 at the end.
        A float32 tl.sum would add in an order set by the layout, so two kernels with different warps could differ
        in the last bit of the mean and so in the normed row; and any split of the row into chunks gives the same
        bits as the whole row at once (`add_rms_row`)."""
        down, up = _power_scales(tl.max(tl.abs(h), axis=0))
        return _float_of_fixed(_fixed_squares(h, down), up)

    @triton.jit
    def add_residual(x, r):
        """The new residual stream x + residual, added in float32 and rounded to x's dtype."""
        return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)

    @triton.jit
    def rms_scale(h, H, eps):
        """rsqrt(mean(h^2) + eps) of the row h float32 [BLOCK] (zeros past H)."""
        return tl.math.rsqrt(sum_of_squares(h) / H + eps)

    @triton.jit
    def rms_apply(h, scale, w, dtype: tl.constexpr):
        """The normed row from h float32 and its rms_scale: h * scale rounded to dtype, times the weight w,
        rounded again (elementwise: any slice of the row gives the same bits as the whole)."""
        n = (h * scale).to(dtype)
        return (n.to(tl.float32) * w.to(tl.float32)).to(dtype)

    @triton.jit
    def add_residual_at(x_ptr, res_ptr, cols, H):
        """add_residual of the row's elements at cols (zeros past H)."""
        mask = cols < H
        return add_residual(tl.load(x_ptr + cols, mask=mask, other=0.0), tl.load(res_ptr + cols, mask=mask, other=0.0))

    @triton.jit
    def add_rms_row(x_ptr, res_ptr, h_ptr, H, eps, store_h, CHUNK: tl.constexpr):
        """The prologue of a GEMV fed a PendingNorm: the rms_scale of the row h = add_residual(x [H], residual [H]),
        with h stored to h_ptr where store_h (one program of the grid). The row is read CHUNK elements at a time,
        twice (its largest magnitude, then the fixed-point sum of squares): the same bits as sum_of_squares of the
        whole row, with a chunk's registers instead of the row's. Unrolled by 4, so that loads of several chunks are in
        flight at once (sm_90 SASS of the 1-warp int4 GEMV: two chunks' per round trip)."""
        amax = 0.0
        for c in tl.range(0, H, CHUNK, loop_unroll_factor=4):
            cols = c + tl.arange(0, CHUNK)
            h = add_residual_at(x_ptr, res_ptr, cols, H)
            if store_h:
                tl.store(h_ptr + cols, h, mask=cols < H)
            amax = tl.maximum(amax, tl.max(tl.abs(h.to(tl.float32)), axis=0))
        down, up = _power_scales(amax)
        fixed = tl.zeros([], tl.int64)
        for c in tl.range(0, H, CHUNK, loop_unroll_factor=4):
            fixed += _fixed_squares(add_residual_at(x_ptr, res_ptr, c + tl.arange(0, CHUNK), H).to(tl.float32), down)
        return tl.math.rsqrt(_float_of_fixed(fixed, up) / H + eps)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,
        H, eps,
        stride_x, stride_res, stride_y, stride_h,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr, PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: no earlier kernel writes it, so before the wait
        pdl_wait(PDL)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = add_residual(x, tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0))
            tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
        h = x.to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, rms_apply(h, rms_scale(h, H, eps), w, x.dtype), mask=mask)
else:  # the kernels that call them are not compiled without triton
    sum_of_squares = add_residual = rms_scale = rms_apply = add_residual_at = add_rms_row = None


# Elements of the row per warp that a GEMV prologue reads at a time (`add_rms_row`). At 512 the 8B's int4 GEMVs
# compile for sm_90 with about their registers without the prologue (bench/compile_decode_sm90.py --gemvs: 167 / 163
# against 161 / 166; the whole row at once took 255 / 243), the float ones with 168 / 96 against 167 / 70.
NORM_CHUNK_PER_WARP = 512


def norm_chunk(h: int, num_warps: int) -> int:
    """add_rms_row's CHUNK for a row of h elements in a kernel of num_warps warps."""
    return min(triton.next_power_of_2(h), NORM_CHUNK_PER_WARP * num_warps)


@dataclass
class PendingNorm:
    """rms_norm(x, weight, eps, residual) of one token, not yet run: the add + RMSNorm between two linears of a
    decode step. A one-token GEMV given it as its input (kernels/gemv.py `gemv_triton`, kernels/w4a16.py
    `w4a16_gemv_triton`) does it in its prologue; anything else calls `materialize` (the RMSNorm kernel). Either
    way the new residual stream lands in `new_residual`, allocated up front so that the caller holds it already."""

    x: torch.Tensor  # [1, H], the block's output
    residual: torch.Tensor  # [1, H]
    weight: torch.Tensor  # [H]
    eps: float
    new_residual: torch.Tensor  # [1, H], written by whichever runs the norm

    @classmethod
    def of(cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> "PendingNorm":
        assert x.shape[0] == 1 and x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape
        return cls(x, residual, weight, eps, torch.empty_like(residual))

    def materialize(self) -> torch.Tensor:
        """The normed row [1, H] (one RMSNorm kernel)."""
        return rms_norm_triton(self.x, self.weight, self.eps, self.residual, new_residual=self.new_residual)[0]


def materialized(x: torch.Tensor | PendingNorm) -> torch.Tensor:
    return x.materialize() if isinstance(x, PendingNorm) else x


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual: where the new residual stream goes (contiguous, x's shape); a new tensor if None."""
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    H = x.shape[-1]
    assert weight.shape == (H,), f"weight {tuple(weight.shape)} does not match hidden size {H}"
    assert weight.is_contiguous()
    x2 = x.reshape(-1, H)  # [T, H]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)  # [T, H]
    if residual is None:
        res2, h = x2, x2
    else:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
        res2 = residual.reshape(-1, H)  # [T, H]
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        if new_residual is None:
            h = torch.empty_like(x2)  # [T, H]
        else:
            assert new_residual.shape == x.shape and new_residual.is_contiguous()
            h = new_residual.view(-1, H)
    T = x2.shape[0]
    if T > 0:
        BLOCK_H = triton.next_power_of_2(H)
        num_warps = min(max(BLOCK_H // 512, 4), 16)
        _rms_norm_kernel[(T,)](
            x2, res2, weight, y, h,
            H, eps,
            x2.stride(0), res2.stride(0), y.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK_H=BLOCK_H,
            num_warps=num_warps, **pdl_launch(x2.device),
        )
    return y.view(x.shape), (x if residual is None else h.view(x.shape))


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        h = x
    else:
        h = (x.float() + residual.float()).to(x.dtype)  # [T, H]
    hf = h.float()  # [T, H]
    n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # [T, H]
    y = n.to(x.dtype).float() * weight.float()  # [T, H]
    return y.to(x.dtype), h


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normalized x [+ residual], the new residual stream), both [T, H] in x.dtype."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
