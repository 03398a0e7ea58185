"""Perplexity of a model over fixed token windows (no KV cache, dense causal attention).

Each window is scored on its own: every token after the first is predicted from the tokens
before it in the same window, so a window of S tokens contributes S - 1 negative log-likelihoods.
The result is the mean over all of them, taken from an fp32 log-softmax; ppl = exp(mean NLL).
Choosing and tokenizing the text is the caller's job (see `lmc eval ppl` in lmc/cli.py).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lmc.errors import LmcError
from lmc.runtime.model import DenseCausal, Model

LOGITS_BUDGET_BYTES = 256 * 2**20  # fp32 logits held at once (one chunk of rows x vocab)


def logits_rows(vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """How many rows of fp32 logits fit in `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab_size))


@torch.inference_mode()
def perplexity(model: Model, windows: torch.Tensor, batch_size: int = 4, chunk_rows: int | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Mean NLL and perplexity of `windows` (int64 [n, S], S >= 2) under `model`.

    Windows run `batch_size` at a time; logits are made `chunk_rows` rows at a time (default:
    what fits in LOGITS_BUDGET_BYTES) so [B*S, V] fp32 is never held for a big vocabulary.
    `progress(k)` is called after each batch with the number of windows it held.
    Returns {"nll", "ppl", "windows", "seqlen", "tokens"}; tokens = n * (S - 1) predictions."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise LmcError(f"perplexity needs at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise LmcError(f"--batch-size must be >= 1, got {batch_size}")
    vocab = model.cfg.vocab_size
    if int(windows.min()) < 0 or int(windows.max()) >= vocab:
        raise LmcError(f"token ids lie outside the model's vocabulary of {vocab}: "
                       "tokenize with the workspace's own tokenizer")
    n, s = windows.shape
    rows = chunk_rows or logits_rows(vocab)
    dev = model.device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(dev)  # [B, S]
        b = batch.shape[0]
        positions = torch.arange(s, device=dev).repeat(b)  # [B*S]
        h = model.hidden(batch.reshape(-1), positions, DenseCausal(b, s), s - 1)  # [B*S, H]
        h = h.view(b, s, -1)[:, :-1].reshape(b * (s - 1), -1)  # [B*(S-1), H]: positions that predict a token
        targets = batch[:, 1:].reshape(-1)  # [B*(S-1)]
        for r in range(0, h.shape[0], rows):
            logits = model.logits(h[r:r + rows])  # [C, V] float32
            total += F.cross_entropy(logits, targets[r:r + rows], reduction="sum").double()
        if progress is not None:
            progress(b)
    tokens = n * (s - 1)
    nll = float(total) / tokens
    return {"nll": nll, "ppl": math.inf if nll > 709 else math.exp(nll), "windows": n, "seqlen": s, "tokens": tokens}
