"""Warm-up: compile the kernels a serving step can launch and capture the decode graphs at start, not while
requests wait (vLLM and LMDeploy's engines do the same before they take traffic).

Without it the first requests of a server pay for every Triton compile (an 8B int4 engine: 56 kernels,
26 s on a cold cache, first-run TTFT p99 19 s on an H200), and a step whose shape is new later on
(e.g. an eager mixed step of 42 tokens: 1.6 s) stalls every running sequence while its kernels compile.

What runs, on every rank (the forwards are announced as the engine's own are):
- one eager ragged forward per token count in `warmup_token_counts`: 2^k and 2^k - 1 up to the step's token
  budget (and the budget and the budget - 1), so every M class of a power-of-two W4A16 table
  (kernels/w4a16_tuning.json) is met with and without Triton's divisible-by-16 specialization; each batch mixes
  prompt chunks (at most session_len tokens each) with one-token rows (`warmup_batch`), as a mixed step does,
  so the logits and the attention see 1..max_batch_size rows;
- the CUDA-graph capture of every decode bucket (runtime/cuda_graph.py), with padding rows only, and the
  greedy argmax (kernels/argmax.py) at every row count up to the largest bucket (rank 0 alone samples);
  without graphs (eager_mode=True, dynamic NTK rope past its range), an eager decode forward at every row count
  up to max_batch_size instead (the decode attention's split count follows the rows, as the argmax's does; its
  block table is as wide as a graph's: kv_cache.decode_table_width).
Every KV write and read is on one scratch block (the graph decoder's, else one borrowed and given back), so
no sequence's cache is touched; nothing is sampled. Last, the process's heap is frozen (device.freeze_heap), so
that Python's oldest-generation collections during serving do not walk it (a 154 ms stall in one decode step).
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from lmc.errors import LmcError
from lmc.kernels.argmax import argmax_rows
from lmc.runtime.device import freeze_heap
from lmc.runtime.kv_cache import decode_table_width


def warmup_token_counts(max_tokens: int) -> list[int]:
    """Token counts of the warm-up's forwards: 2^k and 2^k - 1 below max_tokens, max_tokens and max_tokens - 1."""
    counts, p = {max_tokens, max(1, max_tokens - 1)}, 1
    while p < max_tokens:
        counts.update({p, max(1, p - 1)})
        p *= 2
    return sorted(counts)


def warmup_batch(tokens: int, max_batch: int, max_len: int) -> list[int]:
    """New tokens per sequence for a warm-up forward of `tokens` tokens (at most max_batch * max_len): prompt chunks
    of at most max_len tokens first, then one-token rows (about half the tokens, as many as max_batch leaves)."""
    assert tokens <= max_batch * max_len, f"{tokens} tokens do not fit {max_batch} sequences of {max_len}"

    def chunks(n: int) -> int:
        return -(-n // max_len)

    ones = min(tokens // 2, max_batch - 1)
    while ones > 0 and ones + chunks(tokens - ones) > max_batch:
        ones -= 1
    rest = tokens - ones
    k = chunks(rest)
    return [rest // k + (i < rest % k) for i in range(k)] + [1] * ones


def _forward(engine, num_new: list[int], scratch: int) -> None:
    """One eager forward of len(num_new) sequences whose every block is `scratch`, each from position 0 (a prompt
    chunk, or a one-token row): position p is written to the scratch block's slot p % block size, so every slot
    attention reads was written in this forward (values are finite; several tokens share a slot). The inputs
    are built as the engine builds a step's (ragged_inputs)."""
    from lmc.runtime.engine import ragged_inputs

    bs, decode = engine.blocks.block_size, all(n == 1 for n in num_new)
    seqs = [SimpleNamespace(tokens=[0] * n, num_computed=0, blocks=[scratch] * -(-n // bs)) for n in num_new]
    width = decode_table_width(engine.session_len, bs) if decode else 0  # as Engine._forward's
    ids, positions, slots, tables, kv_lens, cu, ends = ragged_inputs(seqs, num_new, bs, decode, width)
    rows = torch.tensor(ends, dtype=torch.int64) - 1  # [B]: every sequence's last token
    engine.ragged_forward(torch.tensor(ids, dtype=torch.int64, device=engine.device), positions, slots, tables,
                          kv_lens, cu, rows)


def warm_up(engine, progress: bool = False) -> dict:
    """Run the warm-up on `engine` (idle: no request added yet); returns what it did and how long it took."""
    from tqdm import tqdm

    if engine.has_unfinished_requests():
        raise LmcError("warm the engine up before adding requests (Engine.warmup runs on an idle engine)")
    t0 = time.perf_counter()
    config = engine.config
    counts = warmup_token_counts(min(config.max_prefill_token_num, config.max_batch_size * engine.session_len))
    decoder = engine.decoder
    buckets = decoder.buckets if decoder is not None and decoder.enabled else []
    borrowed = [] if decoder is not None else engine.blocks.allocate(1)
    scratch = decoder.scratch_block if decoder is not None else borrowed[0]
    # without graphs (CPU, eager_mode=True, dynamic NTK rope) decode steps run eagerly: every batch size, since the
    # decode attention's split count is a compile-time constant that follows the rows
    decodes = [] if buckets else list(range(1, config.max_batch_size + 1))
    bar = tqdm(total=len(counts) + len(decodes) + len(buckets), desc="warm-up (kernels, CUDA graphs)", unit="step",
               disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for t in counts:
                _forward(engine, warmup_batch(t, config.max_batch_size, engine.session_len), scratch)
                bar.update()
            for b in decodes:
                _forward(engine, [1] * b, scratch)
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
        freeze_heap()  # the start-up heap, kernels included, out of the collector's way (Engine.close thaws)
        engine.froze_heap = True
        if engine.shard is not None:  # and each follower's, after the kernels it compiled for these forwards
            engine.shard.announce_freeze()
    finally:
        bar.close()
        if borrowed:
            engine.blocks.release(borrowed)
    return {"forwards": len(counts) + len(decodes), "graphs": len(buckets),
            "seconds": round(time.perf_counter() - t0, 3)}
