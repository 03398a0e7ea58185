"""Perplexity of a model over fixed token windows.

Each window is scored on its own: every token after the first is predicted from the tokens
before it in the same window, so a window of S tokens contributes S - 1 negative log-likelihoods.
The result is the mean over all of them, taken from an fp32 log-softmax; ppl = exp(mean NLL).
Choosing and tokenizing the text is the caller's job (see `lmc eval ppl` in lmc/cli.py).

With quant_policy 0 a window runs as one dense causal pass (no KV cache). With 8 or 4 it runs as
decoding sees it: in chunks through a paged KV cache of that policy, as the engine's chunked prefill
does, so every query reads the keys and values of earlier positions (its own chunk's too) from the
quantized cache.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lmc.errors import LmcError
from lmc.runtime.config import EngineConfig
from lmc.runtime.kv_cache import PagedKVCache
from lmc.runtime.model import DenseCausal, Model, PagedBatch

LOGITS_BUDGET_BYTES = 256 * 2**20  # fp32 logits held at once (one chunk of rows x vocab)
CACHE_CHUNK = 64  # tokens of a window per step through the KV cache (one block of the engine's default)


def logits_rows(vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """How many rows of fp32 logits fit in `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab_size))


@torch.inference_mode()
def perplexity(model: Model, windows: torch.Tensor, batch_size: int = 4, chunk_rows: int | None = None,
               progress: Callable[[int], None] | None = None, quant_policy: int = 0,
               cache_chunk: int | None = None) -> dict:
    """Mean NLL and perplexity of `windows` (int64 [n, S], S >= 2) under `model`.

    Windows run `batch_size` at a time; logits are made `chunk_rows` rows at a time (default:
    what fits in LOGITS_BUDGET_BYTES) so [B*S, V] fp32 is never held for a big vocabulary.
    `cache_chunk`: tokens per step through a paged KV cache of `quant_policy` (0, 8, 4); None means
    CACHE_CHUNK for a quantized policy and one dense pass without a cache for policy 0.
    `progress(k)` is called after each batch with the number of windows it held.
    Returns {"nll", "ppl", "windows", "seqlen", "tokens"}; tokens = n * (S - 1) predictions."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise LmcError(f"perplexity needs at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise LmcError(f"--batch-size must be >= 1, got {batch_size}")
    if quant_policy not in (0, 8, 4):
        raise LmcError(f"quant_policy {quant_policy} is not a KV cache policy: use 0 (float), 8 (int8) or 4 (int4)")
    vocab = model.cfg.vocab_size
    if int(windows.min()) < 0 or int(windows.max()) >= vocab:
        raise LmcError(f"token ids lie outside the model's vocabulary of {vocab}: "
                       "tokenize with the workspace's own tokenizer")
    n, s = windows.shape
    rows = chunk_rows or logits_rows(vocab)
    dev = model.device
    if cache_chunk is None and quant_policy:
        cache_chunk = CACHE_CHUNK
    cache = None
    if cache_chunk is not None:
        block_size = EngineConfig.cache_block_seq_len
        cache = PagedKVCache(model.cfg, min(batch_size, n) * -(-s // block_size), block_size, model.dtype, dev,
                             quant_policy)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(dev)  # [B, S]
        b = batch.shape[0]
        if cache is None:
            positions = torch.arange(s, device=dev).repeat(b)  # [B*S]
            h = model.hidden(batch.reshape(-1), positions, DenseCausal(b, s), s - 1).view(b, s, -1)  # [B, S, H]
        else:
            h = cached_hidden(model, batch, cache, cache_chunk)  # [B, S, H]
        h = h[:, :-1].reshape(b * (s - 1), -1)  # [B*(S-1), H]: positions that predict a token
        targets = batch[:, 1:].reshape(-1)  # [B*(S-1)]
        for r in range(0, h.shape[0], rows):
            logits = model.logits(h[r:r + rows])  # [C, V] float32
            total += F.cross_entropy(logits, targets[r:r + rows], reduction="sum").double()
        if progress is not None:
            progress(b)
    tokens = n * (s - 1)
    nll = float(total) / tokens
    return {"nll": nll, "ppl": math.inf if nll > 709 else math.exp(nll), "windows": n, "seqlen": s, "tokens": tokens}


def cached_hidden(model: Model, batch: torch.Tensor, cache: PagedKVCache, chunk: int) -> torch.Tensor:
    """Final hidden states [B, S, H] of windows batch [B, S], computed `chunk` tokens at a time as ragged
    prefill steps over `cache` (runtime/engine.py `_forward` builds the same): window b owns blocks
    b*W .. b*W + W - 1, each step writes its tokens' K/V into their slots and attends to everything cached
    so far. Earlier contents of the blocks are overwritten before they are read."""
    b, s = batch.shape
    bs, dev = cache.block_size, model.device
    width = -(-s // bs)
    assert b * width <= cache.num_blocks, f"{b} windows of {s} tokens need {b * width} blocks, cache has {cache.num_blocks}"
    tables = torch.arange(b * width, dtype=torch.int32, device=dev).view(b, width)  # [B, W]
    out = []
    for c0 in range(0, s, chunk):
        c1 = min(s, c0 + chunk)
        pos = torch.arange(c0, c1, device=dev)  # [L]
        slots = (tables[:, pos // bs].long() * bs + pos % bs).reshape(-1)  # [B*L]
        kv_lens = torch.full((b,), c1, dtype=torch.int32, device=dev)  # [B]
        cu = torch.arange(0, (b + 1) * (c1 - c0), c1 - c0, dtype=torch.int32, device=dev)  # [B+1]
        paged = PagedBatch(cache.k, cache.v, slots, tables, kv_lens, cu, c1 - c0)
        h = model.hidden(batch[:, c0:c1].reshape(-1), pos.repeat(b), paged, c1 - 1)  # [B*L, H]
        out.append(h.view(b, c1 - c0, -1))
    return torch.cat(out, dim=1)  # [B, S, H]
