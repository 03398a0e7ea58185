"""y = x[:, columns]: an act-order linear's input in its stored column order (docs/workspace-format.md, version 3),
as one PDL kernel of the decode chain. torch's index_select, launched between two PDL kernels, waits for the
whole chain before it and cost 4.4-5.3 µs at M = 1-64 on an H200 (bench/NOTES.md, session 29).
"""
from __future__ import annotations

import torch

from lmc.kernels.pdl import pdl_launch, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch reference serves
    triton = None

BLOCK = 1024  # columns a program

if triton is not None:

    @triton.jit
    def _gather_columns_kernel(x_ptr, col_ptr, y_ptr, K, stride_x, stride_y, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < K
        src = tl.load(col_ptr + cols, mask=mask, other=0)  # written by no earlier kernel: before the wait
        pdl_wait(PDL)
        v = tl.load(x_ptr + row * stride_x + src, mask=mask, other=0.0)
        tl.store(y_ptr + row * stride_y + cols, v, mask=mask)


def gather_columns_ref(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return x.index_select(-1, columns)  # [T, K]


def gather_columns(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """x [T, K], columns [K] int32 (a permutation) -> y [T, K] with y[:, j] = x[:, columns[j]]."""
    if not x.is_cuda or triton is None:
        return gather_columns_ref(x, columns)
    k = x.shape[-1]
    assert columns.shape == (k,) and columns.dtype == torch.int32 and columns.is_contiguous()
    x2 = x.reshape(-1, k)  # [T, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)  # [T, K]
    if x2.shape[0] > 0:
        _gather_columns_kernel[(x2.shape[0], triton.cdiv(k, BLOCK))](
            x2, columns, y, k, x2.stride(0), y.stride(0), BLOCK=BLOCK, num_warps=4, **pdl_launch(x2.device))
    return y.view(x.shape)
