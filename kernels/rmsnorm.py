"""RMSNorm with an optional fused residual add (Llama's pre-norm), one program per row.

h = x + residual (or x), y = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype), as in HF's LlamaRMSNorm:
the sum is rounded to x.dtype (it is the residual stream), statistics are taken in fp32, and the
normalized value is rounded to x.dtype before the weight multiplies it.

`columns` [H] int32 (optional, a permutation) makes y's column j the normed row's column columns[j]: the input
order of the act-order linear that reads y (docs/workspace-format.md), so that linear needs no gather of its
own. The kernel loads the row at those columns (a gather from a row it also reads in order, for the residual
stream h, which keeps the model's order); storing y scattered instead cost 3.7 µs more at M = 1 on an H200
(bench/NOTES.md, session 29).
"""
from __future__ import annotations

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
    def add_rms_norm_values(x, r, w, H, eps, HAS_RESIDUAL: tl.constexpr = True):
        """The math of this module on one row of loaded values (x and r in the stream's dtype, w the weight; masked
        lanes zero): returns (y, h), h = x + r rounded to x's dtype (x itself without a residual), y = weight *
        (h * rsqrt(mean(h^2) + eps)) rounded twice. The RMSNorm kernel below and the all-reduce's fused form
        (kernels/allreduce.py) call it, so every RMSNorm of the decode step rounds alike."""
        h = x.to(tl.float32)
        if HAS_RESIDUAL:
            h = (h + r.to(tl.float32)).to(x.dtype).to(tl.float32)
        var = tl.sum(h * h, axis=0) / H
        n = (h * tl.math.rsqrt(var + eps)).to(x.dtype)
        return (n.to(tl.float32) * w.to(tl.float32)).to(x.dtype), h.to(x.dtype)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, col_ptr,
        H, eps,
        stride_x, stride_res, stride_y, stride_h,
        HAS_RESIDUAL: tl.constexpr, GATHER: tl.constexpr,
        BLOCK_H: tl.constexpr, PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        src = cols  # y's column j is the row's column src[j]
        if GATHER:  # like the weight, written by no earlier kernel
            src = tl.load(col_ptr + cols, mask=mask, other=0)
        w = tl.load(w_ptr + src, mask=mask, other=0.0)  # a weight: no earlier kernel writes it, so before the wait
        pdl_wait(PDL)
        x = tl.load(x_ptr + row * stride_x + src, mask=mask, other=0.0)
        r = x
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + src, mask=mask, other=0.0)
        y, h = add_rms_norm_values(x, r, w, H, eps, HAS_RESIDUAL)
        if HAS_RESIDUAL and GATHER:  # the residual stream in the model's order: the row read again, in order
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
            h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # add_rms_norm_values' h, unpermuted
        if HAS_RESIDUAL:
            tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        tl.store(y_ptr + row * stride_y + cols, y, mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    H = x.shape[-1]
    assert weight.shape == (H,), f"weight {tuple(weight.shape)} does not match hidden size {H}"
    assert weight.is_contiguous()
    assert columns is None or (columns.shape == (H,) and columns.dtype == torch.int32 and columns.is_contiguous())
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
        h = torch.empty_like(x2)  # [T, H]
    T = x2.shape[0]
    if T > 0:
        BLOCK_H = triton.next_power_of_2(H)
        num_warps = min(max(BLOCK_H // 512, 4), 16)
        _rms_norm_kernel[(T,)](
            x2, res2, weight, y, h, weight if columns is None else columns,
            H, eps,
            x2.stride(0), res2.stride(0), y.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, GATHER=columns is not None,
            BLOCK_H=BLOCK_H,
            num_warps=num_warps, **pdl_launch(x2.device),
        )
    return y.view(x.shape), (x if residual is None else h.view(x.shape))


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        h = x
    else:
        h = (x.float() + residual.float()).to(x.dtype)  # [T, H]
    hf = h.float()  # [T, H]
    n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # [T, H]
    y = (n.to(x.dtype).float() * weight.float()).to(x.dtype)  # [T, H]
    if columns is not None:
        y = y.index_select(-1, columns.long())  # [T, H]: column j is column columns[j]
    return y, h


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normalized x [+ residual], with `columns` its columns in that order; the new residual stream), both
    [T, H] in x.dtype."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps, residual, columns)
    return rms_norm_ref(x, weight, eps, residual, columns)
