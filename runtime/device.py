"""Which device runs, and in which float dtype: decided here once for every command."""
from __future__ import annotations

import torch

from lmc.errors import LmcError


def pick_device(name: str | None) -> torch.device:
    """"cuda", "cuda:N", "cpu" or None (cuda when available)."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise LmcError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype a model computes in: the stored one on a GPU; float32 on the CPU, where fp16/bf16
    matmuls are slow and inexact."""
    return stored if device.type == "cuda" else torch.float32
