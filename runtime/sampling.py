"""Next-token choice for a batch of sequences: penalties, bans, temperature, top-k, top-p, min-p,
seeded sampling, greedy, and log-probabilities; one host sync per step.

GenerationConfig takes LMDeploy's field names and defaults (greedy unless `do_sample`), so a script
written for `lmdeploy.GenerationConfig` runs unchanged.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from lmc.errors import LmcError

MIN_TEMPERATURE = 1e-5  # a temperature below this samples greedily: logits divided by it would overflow float32
SEED_RANGE = (-2 ** 63, 2 ** 64)  # the seeds torch.Generator takes: [low, high)
MAX_N = 128  # sequences per prompt (OpenAI's limit on choices): each holds a copy of the prompt


@dataclass
class GenerationConfig:
    """LMDeploy's GenerationConfig. Greedy unless do_sample (or with temperature 0 / top_k 1; a temperature
    below MIN_TEMPERATURE counts as 0)."""

    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None  # also return the chosen token's log-probability and this many alternatives
    include_stop_str_in_output: bool = False
    output_logits: str | None = None  # "generation": return each generated position's logits (float32, CPU)
    response_format: dict | None = None  # not supported: refused when set
    logits_processors: list | None = None  # not supported: refused when set

    def check(self) -> None:
        def bad(what: str):
            raise LmcError(f"GenerationConfig: {what}")

        for name in ("n", "max_new_tokens", "top_k"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                bad(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("top_p", "min_p", "temperature", "repetition_penalty"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Real):
                bad(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("stop_words", "bad_words"):
            words = getattr(self, name)
            if words is not None and not (isinstance(words, (list, tuple)) and all(isinstance(w, str) for w in words)):
                bad(f"{name} must be a list of strings, got {words!r}"[:200])
        if not 1 <= self.n <= MAX_N:
            bad(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.max_new_tokens < 1:
            bad(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            bad(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            bad(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if self.min_new_tokens is not None and not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.random_seed is not None and (isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)
                                             or not SEED_RANGE[0] <= self.random_seed < SEED_RANGE[1]):
            bad(f"random_seed must be an integer in [-2**63, 2**64), got {self.random_seed!r}")
        if self.output_logits not in (None, "generation"):
            bad(f"output_logits must be None or 'generation', got {self.output_logits!r}")
        if self.response_format is not None or self.logits_processors:
            bad("response_format and logits_processors are not supported by lmc; leave them unset")
        for name in ("stop_token_ids", "bad_token_ids"):
            ids = getattr(self, name) or []
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                bad(f"{name} must be a list of non-negative token ids")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < MIN_TEMPERATURE or self.top_k == 1


@dataclass
class Logprob:
    """The chosen token's log-probability under the model and the `top` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SampleRow:
    """What sampling needs of one sequence this step."""

    gen: GenerationConfig
    generator: torch.Generator | None  # seeded requests: their own stream of random numbers
    seen: list[int]  # prompt + output (repetition penalty)
    banned: list[int]  # ids that may not be chosen now (bad tokens; EOS before min_new_tokens)


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition penalty (as transformers: divide positive logits, multiply negative) and bans, in place."""
    for i, row in enumerate(rows):
        if row.gen.repetition_penalty != 1.0 and row.seen:
            seen = torch.tensor(sorted(set(row.seen)), device=logits.device)
            picked = logits[i, seen]
            logits[i, seen] = torch.where(picked > 0, picked / row.gen.repetition_penalty,
                                          picked * row.gen.repetition_penalty)
        if row.banned:
            logits[i, torch.tensor(row.banned, device=logits.device)] = float("-inf")
    return logits


def _sample_rows(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logits [S, V] of sampled rows -> chosen ids [S] (on the device, no host sync)."""
    device = logits.device
    temps = torch.tensor([r.gen.temperature for r in rows], device=device)[:, None]  # [S, 1]
    probs = torch.softmax(logits / temps, dim=-1)  # [S, V]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [S, V]
    v = logits.shape[1]
    top_k = torch.tensor([r.gen.top_k if 0 < r.gen.top_k < v else v for r in rows], device=device)[:, None]
    top_p = torch.tensor([r.gen.top_p for r in rows], device=device)[:, None]
    min_p = torch.tensor([r.gen.min_p for r in rows], device=device)[:, None]
    rank = torch.arange(v, device=device)[None, :]  # [1, V]
    drop = rank >= top_k
    drop |= sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
    drop |= sorted_probs < min_p * sorted_probs[:, :1]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    noise = torch.empty_like(sorted_probs)  # exponential race: argmax p / E is a draw from p
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), v, device=device).exponential_()
    pick = (sorted_probs / noise).argmax(dim=-1, keepdim=True)  # [S, 1] rank of the chosen token
    return order.gather(1, pick).squeeze(1)


def sample_batch(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[Logprob | None]]:
    """logits [B, V] float32 -> one id per row, and its Logprob where the row's config asks for them.
    Log-probabilities are those of the model's distribution (before penalties and temperature)."""
    want_lp = [i for i, r in enumerate(rows) if r.gen.logprobs is not None]
    raw = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None  # [L, V]
    logits = _apply_penalties(logits.clone() if want_lp else logits, rows)
    chosen = logits.argmax(dim=-1)  # [B] (the host waits for it here: torch's launch is the cheaper one)
    sampled = [i for i, r in enumerate(rows) if not r.gen.greedy]
    if sampled:
        chosen[sampled] = _sample_rows(logits[sampled], [rows[i] for i in sampled])
    tokens = chosen.tolist()
    logprobs: list[Logprob | None] = [None] * len(rows)
    if want_lp:
        n_top = max(rows[i].gen.logprobs for i in want_lp)
        top_v, top_i = raw.topk(max(n_top, 1), dim=-1)  # [L, n]
        chosen_lp = raw.gather(1, chosen[want_lp][:, None]).squeeze(1).tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want_lp):
            n = rows[i].gen.logprobs
            logprobs[i] = Logprob(tokens[i], chosen_lp[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return tokens, logprobs
