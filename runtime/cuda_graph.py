"""Decode steps under CUDA graphs: Model.hidden + logits captured once per batch-size bucket.

A step of B sequences runs the graph of the smallest bucket >= B (1, 2, 4, ... up to
max_batch_size). Every input lives in one static int64 buffer, refilled by a single copy before
each replay; its row layout (`pack_decode_rows`):

    column 0     token id          column 2   flat KV slot of the new token
    column 1     position          column 3   kv len (tokens in cache after this step)
    columns 4..  block table, fixed width ceil(session_len / block_size)

Rows past B are padding: token 0 at position 0, kv len 1, writing and reading only slot 0 of a
scratch KV block taken from the cache at start, so they never touch a real sequence. Inside the
graph nothing reads tensor values on the host: the attention grid depends on the table width,
and the rope tables are grown to session_len before the first capture. Dynamic NTK rope past
max_position_embeddings changes the frequencies with the batch's longest sequence, so such
engines decode eagerly. A failed capture warns once and decodes eagerly too. On CPU the same
padded step runs eagerly (the tests use this to check the packing against the engine).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from lmc.kernels.argmax import argmax_rows
from lmc.runtime.kv_cache import GRAPH_SCRATCH_BLOCKS, decode_table_width
from lmc.runtime.model import PagedBatch

# columns of a packed decode row (see the module docstring)
ID, POS, SLOT, LEN, TABLE = 0, 1, 2, 3, 4


def batch_buckets(max_batch_size: int) -> list[int]:
    """Captured batch sizes: the powers of two below max_batch_size, then max_batch_size."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


def bucket_for(batch: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `batch` rows."""
    for b in buckets:
        if b >= batch:
            return b
    raise ValueError(f"batch {batch} exceeds the largest CUDA-graph bucket {buckets[-1]}")


def pack_decode_rows(rows: list[tuple[int, int, list[int]]], bucket: int, width: int, block_size: int,
                     scratch_block: int) -> np.ndarray:
    """rows: (last token, length with that token, KV blocks) per sequence -> int64 [bucket, TABLE + width].

    Row i < len(rows) decodes its last token at position length - 1; rows past that are padding
    that reads and writes slot 0 of `scratch_block` (see the module docstring)."""
    assert len(rows) <= bucket, f"{len(rows)} rows do not fit bucket {bucket}"
    out = np.empty((bucket, TABLE + width), dtype=np.int64)  # [bucket, 4 + W]
    out[:, :TABLE] = (0, 0, scratch_block * block_size, 1)
    out[:, TABLE:] = scratch_block
    for i, (token, length, blocks) in enumerate(rows):
        assert len(blocks) <= width, f"a sequence holds {len(blocks)} blocks, more than the table width {width}"
        p = length - 1
        out[i, :TABLE] = (token, p, blocks[p // block_size] * block_size + p % block_size, length)
        out[i, TABLE:TABLE + len(blocks)] = blocks
    return out


class GraphDecoder:
    """`step(seqs) -> logits [B, V] float32` for the engine's decode, replaying one graph per bucket."""

    def __init__(self, engine):
        self.model = engine.model
        self.cache = engine.cache
        self.shard = engine.shard  # tp > 1: rank 0 announces each step; the followers replay it (runtime/distributed.py)
        self.device = engine.device
        self.session_len = engine.session_len
        self.block_size = self.cache.block_size
        self.width = decode_table_width(self.session_len, self.block_size)
        self.buckets = batch_buckets(engine.config.max_batch_size)
        (self.scratch_block,) = engine.blocks.reserve(GRAPH_SCRATCH_BLOCKS)  # never handed to a sequence
        on_cuda = self.device.type == "cuda"
        shape = (self.buckets[-1], TABLE + self.width)
        self.inputs = torch.zeros(shape, dtype=torch.int64, device=self.device)  # [max bucket, 4 + W]
        self.staging = torch.zeros(shape, dtype=torch.int64, pin_memory=on_cuda)  # host side of `inputs`
        self.copied = torch.cuda.Event() if on_cuda else None  # the last copy out of `staging` is done
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, logits)
        self.pool = None
        self.enabled = on_cuda
        cfg, rope = self.model.cfg, self.model.rope
        if rope.dynamic and self.session_len > cfg.max_position_embeddings:
            self.enabled = False
            if on_cuda:
                warnings.warn("lmc: CUDA graphs are off: dynamic NTK rope past max_position_embeddings; decoding eagerly",
                              stacklevel=2)
        else:  # grow the cos/sin tables once: a capture must never see them reallocated
            rope(torch.zeros(1, dtype=torch.int64, device=self.device), self.session_len - 1)

    def _forward(self, bucket: int) -> torch.Tensor:
        """The padded decode step over inputs[:bucket]; logits [bucket, V] float32."""
        x = self.inputs[:bucket]  # [b, 4 + W]
        ids, positions, slots, kv_lens = x[:, :TABLE].t().contiguous()  # 4 x [b]
        tables = x[:, TABLE:].to(torch.int32)  # [b, W]
        batch = PagedBatch(self.cache.k, self.cache.v, slots, tables, kv_lens.to(torch.int32), None)
        h = self.model.hidden(ids, positions, batch, self.session_len - 1)  # [b, H]
        if self.shard is not None and not self.shard.leader and not self.model.split_lm_head:
            return h  # only rank 0 computes logits
        return self.model.logits(h)  # [b, V]; a follower: its part of the gather, unused

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile Triton kernels and create cuBLAS handles outside the capture
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bucket)
        return graph, logits

    def _graph(self, bucket: int):
        if not self.enabled:
            return None
        if bucket not in self.graphs:
            try:
                self.graphs[bucket] = self._capture(bucket)
            except Exception as e:  # torch and Triton raise many types; decoding must go on
                self.enabled = False
                warnings.warn(f"lmc: CUDA graph capture failed for batch {bucket} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); decoding eagerly", stacklevel=3)
                return None
        return self.graphs[bucket]

    def _run(self, seqs, ids: torch.Tensor | None) -> torch.Tensor:
        """Fill the inputs and start the step; logits [B, V] float32 (the graph's output buffer when replayed).
        ids None: each sequence computes its last token. ids [B] on the device: the step's input tokens (rows in
        seqs' order), the token each sequence is about to accept on the host (so its length counts one more)."""
        b = len(seqs)
        bucket = bucket_for(b, self.buckets)
        ahead = 0 if ids is None else 1
        rows = pack_decode_rows([(0 if ahead else s.tokens[-1], s.length + ahead, s.blocks) for s in seqs], bucket,
                                self.width, self.block_size, self.scratch_block)  # [bucket, 4 + W]
        if self.shard is not None:
            self.shard.announce_decode(bucket, b, rows)
        return self.replay_rows(bucket, b, rows, ids)

    def replay_rows(self, bucket: int, b: int, rows: np.ndarray, ids: torch.Tensor | None) -> torch.Tensor:
        """Copy packed rows [bucket, 4 + W] to the inputs (ids [b] on the device over column 0 when given) and
        run the bucket's graph; logits [b, V] (a follower rank: its part of them or hidden states, unused)."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the staging buffer
        self.staging[:bucket].numpy()[:] = rows
        self.inputs[:bucket].copy_(self.staging[:bucket], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if ids is not None:
            self.inputs[:b, ID].copy_(ids)  # stream-ordered after the copy above
        captured = self._graph(bucket)
        if captured is None:
            return self._forward(bucket)[:b]
        graph, logits = captured
        graph.replay()
        return logits[:b]

    def warm(self, bucket: int) -> None:
        """Capture the bucket's graph now (runtime/warmup.py) with padding rows only; followers capture theirs."""
        rows = pack_decode_rows([], bucket, self.width, self.block_size, self.scratch_block)  # [bucket, 4 + W]
        if self.shard is not None:
            self.shard.announce_decode(bucket, 0, rows)
        self.replay_rows(bucket, 0, rows, None)

    def release(self) -> None:
        """Drop the captured graphs (before a tensor-parallel rank leaves its process group)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self.pool = None

    def step(self, seqs) -> torch.Tensor:
        """One decode step: each sequence computes its last token; logits [B, V] float32 (a new tensor)."""
        return self._run(seqs, None).clone()

    def launch_greedy(self, seqs, ids: torch.Tensor | None = None) -> "GreedyStep":
        """Start a greedy decode step and return without waiting for it (see Engine._pipelined_step); ids as
        in _run."""
        return GreedyStep(argmax_rows(self._run(seqs, ids)))  # one Triton launch on CUDA


class GreedyStep:
    """A launched greedy step: its tokens on the device (the next step's input) and, once the copy lands, on
    the host."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids  # [B] int64 on the device
        self._host = ids.to("cpu", non_blocking=True)  # pinned when ids are on CUDA
        self._copied = None
        if ids.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def subset(self, rows: list[int]) -> "GreedyStep":
        """The same step for some of its rows (sequences that left drop out)."""
        return GreedyStep(self.ids[torch.tensor(rows, device=self.ids.device)])

    def tokens(self) -> list[int]:
        """Waits for this step only (not for steps launched after it)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()
