"""Warm-up: compile the kernels a serving step can launch and capture the decode graphs at start, not while
requests wait (vLLM and LMDeploy's engines do the same before they take traffic).

Without it the first requests of a server pay for every Triton compile (an 8B int4 engine: 56 kernels,
26 s on a cold cache, first-run TTFT p99 19 s on an H200), and a step whose shape is new later on
(e.g. an eager mixed step of 42 tokens: 1.6 s) stalls every running sequence while its kernels compile.

What runs, on every rank (the forwards are announced as the engine's own are):
- one eager ragged forward per token count in `warmup_token_counts`: 2^k and 2^k - 1 up to the step's
  token budget (and the budget and the budget - 1), so every M class of a power-of-two W4A16 table (kernels/w4a16_tuning.json) is met with
  and without Triton's divisible-by-16 specialization; each batch mixes one prompt chunk with
  one-token rows (`warmup_batch`), as a mixed step does, so the logits and the attention see 1..256 rows;
- the CUDA-graph capture of every decode bucket (runtime/cuda_graph.py), with padding rows only, and the
  greedy argmax (kernels/argmax.py) at every row count up to the largest bucket (rank 0 alone samples).
Every KV write and read is on one scratch block (the graph decoder's, else one borrowed and given back), so
no sequence's cache is touched; nothing is sampled.
"""
from __future__ import annotations

import time

import torch

from lmc.kernels.argmax import argmax_rows


def warmup_token_counts(max_tokens: int) -> list[int]:
    """Token counts of the warm-up's forwards: 2^k and 2^k - 1 below max_tokens, max_tokens and max_tokens - 1."""
    counts, p = {max_tokens, max(1, max_tokens - 1)}, 1
    while p < max_tokens:
        counts.update({p, max(1, p - 1)})
        p *= 2
    return sorted(counts)


def warmup_batch(tokens: int, max_batch: int) -> list[int]:
    """New tokens per sequence for a warm-up forward of `tokens` tokens: one prompt chunk first, then
    one-token rows (about half the tokens, at most max_batch sequences in all)."""
    seqs = max(1, min(max_batch, tokens // 2))
    return [tokens - (seqs - 1)] + [1] * (seqs - 1)


def _forward(engine, num_new: list[int], scratch: int) -> None:
    """One eager forward of len(num_new) sequences on block `scratch`: the first sequence starts at position 0,
    the one-token rows sit at position 0, and position p is written to slot p % block size, so every slot
    attention reads was written in this forward (values are finite; several tokens share a slot)."""
    bs, dev = engine.blocks.block_size, engine.device
    total = sum(num_new)
    positions = torch.cat([torch.arange(num_new[0], dtype=torch.int64),
                           torch.zeros(len(num_new) - 1, dtype=torch.int64)])  # [T]
    slots = scratch * bs + positions % bs  # [T]: position p on the scratch block's slot p % bs
    kv_lens = torch.tensor([num_new[0]] + [1] * (len(num_new) - 1), dtype=torch.int32)  # [B]
    width = -(-num_new[0] // bs)
    tables = torch.full((len(num_new), width), scratch, dtype=torch.int32)  # [B, W]
    decode = all(n == 1 for n in num_new)
    cu = None if decode else torch.tensor([0] + num_new, dtype=torch.int64).cumsum(0).to(torch.int32)  # [B+1]
    rows = (torch.cumsum(torch.tensor(num_new), 0) - 1).to(torch.int64)  # [B]: every sequence's last token
    ids = torch.zeros(total, dtype=torch.int64, device=dev)  # [T]
    engine.ragged_forward(ids, positions, slots, tables, kv_lens, cu, rows)


def warm_up(engine, progress: bool = False) -> dict:
    """Run the warm-up on `engine` (no request may be running); returns what it did and how long it took."""
    from tqdm import tqdm

    assert not engine.has_unfinished_requests(), "warm up before any request arrives"
    t0 = time.perf_counter()
    counts = warmup_token_counts(engine.config.max_prefill_token_num)
    decoder = engine.decoder
    buckets = decoder.buckets if decoder is not None and decoder.enabled else []
    borrowed = [] if decoder is not None else engine.blocks.allocate(1)
    scratch = decoder.scratch_block if decoder is not None else borrowed[0]
    bar = tqdm(total=len(counts) + len(buckets), desc="warm-up (kernels, CUDA graphs)", unit="step",
               disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for t in counts:
                _forward(engine, warmup_batch(t, engine.config.max_batch_size), scratch)
                bar.update()
            for bucket in buckets:
                decoder.warm(bucket)
                bar.update()
            if buckets and buckets[-1] in decoder.graphs:  # the greedy decode's argmax (its split follows the rows)
                logits = decoder.graphs[buckets[-1]][1]  # [B, V] float32: the largest graph's output buffer
                for b in range(1, buckets[-1] + 1):
                    argmax_rows(logits[:b])
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
    finally:
        bar.close()
        if borrowed:
            engine.blocks.release(borrowed)
    return {"forwards": len(counts), "graphs": len(buckets), "seconds": round(time.perf_counter() - t0, 3)}
