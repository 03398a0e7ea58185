"""Rotary embedding frequencies: default, llama3, linear and dynamic-NTK scaling (as transformers)."""
from __future__ import annotations

import math

import torch

from lmc.format.config import ModelConfig


def inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """[D/2] float32 inverse frequencies. `seq_len` (max position + 1) only matters for dynamic NTK."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.type == "dynamic" and seq_len is not None and seq_len > cfg.max_position_embeddings:
        f = scaling.factor
        base = base * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]
    if scaling is None or scaling.type == "dynamic":
        return freq
    if scaling.type == "linear":
        return freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by factor, blend in between
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / scaling.factor, freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class Rope:
    """cos/sin tables for positions, cached up to the longest position seen."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic"
        self._len = 0
        self._cos = self._sin = None
        self._ensure(min(cfg.max_position_embeddings, 4096))

    def _ensure(self, length: int) -> None:
        if length <= self._len:
            return
        length = max(length, 2 * self._len)
        t = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq(self.cfg))  # [L, D/2]
        self._cos, self._sin = freqs.cos().to(self.device), freqs.sin().to(self.device)
        self._len = length

    def __call__(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 on the device -> (cos, sin) [T, D/2] float32.

        `max_position` (host int) is the largest position in the batch; dynamic NTK rescales the
        base once a sequence grows past max_position_embeddings, as transformers does."""
        if self.dynamic and max_position + 1 > self.cfg.max_position_embeddings:
            freqs = positions.float()[:, None] * inv_freq(self.cfg, max_position + 1).to(positions.device)[None]
            return freqs.cos(), freqs.sin()
        self._ensure(max_position + 1)
        return self._cos[positions], self._sin[positions]
