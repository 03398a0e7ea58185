"""Programmatic dependent launch (PDL, Hopper and later): the next kernel of the decode chain is launched
while the current one is still running, so that its launch, its ramp-up and its first weight loads overlap
the tail of the kernel before it (about 1-3 µs per kernel boundary, 10 boundaries per layer).

The contract, for every kernel launched with `**pdl_launch(device)`:
  - it calls `pdl_wait(PDL)` in every program before it reads anything an earlier kernel wrote and before it
    writes anything; only reads of constant data (weights) may come before it;
  - `pdl_wait` also lets the kernel after it launch (griddepcontrol.launch_dependents).
griddepcontrol.wait returns once the previous grid has completed and its writes are visible; since that grid
waited for its own predecessor before completing, every earlier kernel is complete too. Kernels launched
without PDL (torch ops, cuBLAS) wait for everything before them as usual. Under CUDA-graph capture the
launch attribute becomes a programmatic edge of the graph (CUDA >= 12.3).

Off with LMC_PDL=0, off the GPU, under TRITON_INTERPRET and before sm_90: then PDL is False and the kernels
compile without the griddepcontrol instructions.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: PDL stays off
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without griddepcontrol: PDL stays off
    gdc_wait = gdc_launch_dependents = None

_ENABLED: dict[int, bool] = {}


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL (read once per device)."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ENABLED:
        _ENABLED[index] = (os.environ.get("LMC_PDL", "1") != "0"
                           and torch.cuda.get_device_capability(index) >= (9, 0))
    return _ENABLED[index]


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords of a PDL kernel: its PDL constexpr, and Triton's launch_pdl option when on."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait for the previous kernel (all its writes visible), then let the next kernel launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
else:
    pdl_wait = None  # the kernels that call it are not compiled without triton
