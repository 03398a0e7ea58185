"""Arrival counters of the kernels whose last split finishes the job (the split-K GEMV, the split-KV decode,
the row argmax).

Each split program of an output tile stores its partials, then increments the tile's counter (an acq_rel
atomic after a barrier); the program that sees SPLITS - 1 reduces the partials and sets the counter back to 0, so
every call (and every CUDA-graph replay) starts from zeros. One buffer per device serves all such kernels: they
run one after another on the decode stream, and a PDL kernel touches the counters only after pdl_wait.
"""
from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # replaced buffers: graphs captured before their replacement still use them


def split_counters(device: torch.device, size: int) -> torch.Tensor:
    """int32 zeros, at least `size` of them, shared by every call on the device (each call leaves them at zero).
    Grown outside CUDA-graph capture (the engine runs every shape once before capturing it); a grown buffer's
    predecessor is kept alive for the graphs captured while it was current."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < size:
        grown = 4096
        if counters is not None:
            _OUTGROWN.append(counters)
            grown = 2 * counters.numel()  # doubling: the buffers kept alive stay few (log of the largest request)
        counters = torch.zeros(max(size, grown), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters
