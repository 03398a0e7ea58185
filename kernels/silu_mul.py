"""Fused SwiGLU activation: silu(gate) * up over the fused gate/up projection output.

gate_up [T, 2I] holds gate in columns [0, I) and up in columns [I, 2I) (the w13 layout).
Computed in fp32 and rounded once to the input dtype.
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
    def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        y = gf * tl.sigmoid(gf) * u.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, y.to(g.dtype), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    assert gate_up.shape[-1] % 2 == 0, f"gate_up last dim {gate_up.shape[-1]} must be even"
    I = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * I)  # [T, 2I]
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    T = gu.shape[0]
    out = torch.empty((T, I), dtype=gu.dtype, device=gu.device)  # [T, I]
    if T > 0 and I > 0:
        BLOCK = min(triton.next_power_of_2(I), 1024)
        _silu_mul_kernel[(T, triton.cdiv(I, BLOCK))](gu, out, I, gu.stride(0), out.stride(0), BLOCK=BLOCK,
                                                     **pdl_launch(gu.device))
    return out.view(*gate_up.shape[:-1], I)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)  # [T, I] each
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)  # [T, I]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] = cat(gate, up); returns [T, I] in the input dtype."""
    if gate_up.is_cuda:
        return silu_mul_triton(gate_up)
    return silu_mul_ref(gate_up)
