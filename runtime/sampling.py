"""Next-token choice: repetition penalty, temperature, top-k, top-p, seeded sampling, greedy."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmc.errors import LmcError


@dataclass
class GenerationConfig:
    """Named as LMDeploy's GenerationConfig. temperature 0 (or top_k 1) is greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 40
    repetition_penalty: float = 1.0
    stop_words: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise LmcError("sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")
        if self.max_new_tokens < 1:
            raise LmcError("max_new_tokens must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V]; seen [n] token ids: as transformers, divide positive logits, multiply negative."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor, generator: torch.Generator | None) -> int:
    """logits [V] float32 -> one token id."""
    logits = apply_repetition_penalty(logits, seen, gen.repetition_penalty)
    if gen.greedy:
        return int(logits.argmax())
    logits = logits / gen.temperature
    if gen.top_k:
        kth = torch.topk(logits, min(gen.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if gen.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > gen.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
