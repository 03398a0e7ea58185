"""Tensor parallelism at runtime: one process per rank, rank 0 leads.

A workspace converted with `--tp N` holds each rank's slice of the weights (format/archs.py `rank_config`:
query heads, KV heads and the MLP width divided; embeddings, norms and lm_head whole on every rank). Rank 0
runs the Engine: tokenizer, scheduler, sampling and any server. lmc starts ranks 1..N-1 itself as spawned
processes (`start_ranks`); each loads its slice and KV cache and then follows rank 0 step by step
(`follow`). Column-parallel w_qkv / w13, row-parallel wo / w2 with a sum over ranks after each
(`Shard.all_reduce_add_norm`, fused with the next RMSNorm). The lm_head is vocabulary-parallel: each rank
loads and multiplies its `Shard.vocab_rows` of the workspace's whole lm_head and rank 0 gathers the logits
(`Shard.gather_vocab`; LMC_TP_LM_HEAD=replicated: every rank loads it whole and rank 0 alone computes logits).

Two process groups: `compute` (NCCL on CUDA, gloo on the CPU) carries the model's collectives, and
`control` (gloo) the set-up's. Rank 0's step announcements go through shared memory (runtime/shm_channel.py):
before every forward rank 0 sends one message, an int64 header and its int64 payload (the layouts below; a
payload too long for a channel slot follows over `control`); the followers rebuild the same inputs and run the
same forward. The token ids travel inside the forward, as a broadcast from rank 0 (`Shard.broadcast_ids`: a
peer-memory kernel on CUDA, kernels/tp_exchange.py, else the compute group), so a CUDA-graph step whose ids are
the previous step's argmax on the device needs no host round trip, and the followers' graphs capture the same
collectives as rank 0's.

    header  int64 [8]: op, then per op
        FORWARD  T tokens, B sequences, W table width, max_position, has cu_seqlens, payload length, S logit rows
        DECODE   bucket, B rows, W table width, payload length          (a CUDA-graph decoder step)
        STOP     (nothing)
        FREEZE   (nothing: the warm-up is over; freeze the heap, runtime/device.py freeze_heap)
    payload FORWARD: positions [T], slots [T], block tables [B * W], kv lens [B], cu_seqlens [B + 1] if any,
                     the token rows whose logits rank 0 samples [S] (a split lm_head computes them on every rank)
            DECODE:  the packed decode rows [bucket, 4 + W] (runtime/cuda_graph.py `pack_decode_rows`)
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmc.errors import LmcError
from lmc.kernels.rmsnorm import rms_norm
from lmc.runtime.device import freeze_heap
from lmc.runtime.shm_channel import SLOT_WORDS, ChannelReader, ChannelWriter

STOP, FORWARD, DECODE, FREEZE = 0, 1, 2, 3
LEAVE_S = 30
JOIN_POLL_S = 0.2  # how often rank 0 looks at its followers while they join
HEADER = 8
ONE_SHOT_ELEMENTS = 1 << 20  # per rank per slot of the one-shot all-reduce (decode batch 256 at hidden 4096): 3x
                             # faster than NCCL up to there on 2 x H200 (allreduce_h200x2_v3.json); prefill goes to NCCL
ALLREDUCE_MODES = ("one-shot", "nccl")  # LMC_TP_ALLREDUCE
LM_HEAD_MODES = ("split", "replicated")  # LMC_TP_LM_HEAD
TIMEOUT = datetime.timedelta(minutes=10)  # joining, and a collective inside a step
IDLE = datetime.timedelta(days=365)  # the control group's timeout: a follower may wait this long for a long payload
                                     # that follows a channel message (the channel's own wait checks that rank 0 lives)


@dataclass
class Shard:
    """This process's place among the ranks and its two process groups."""

    rank: int
    tp: int
    compute: object  # dist.ProcessGroup: the model's collectives
    control: object  # dist.ProcessGroup (gloo): set-up exchanges, and announcement payloads too long for the channel
    channel: object  # runtime/shm_channel.py: ChannelWriter on rank 0, ChannelReader on the followers
    store: str  # the rendezvous file (in a private folder rank 0 removes when it leaves)
    one_shot: object | None = None  # kernels/allreduce.py OneShotAllReduce: decode-sized sums on CUDA
    exchange: object | None = None  # kernels/tp_exchange.py LeaderExchange: decode-sized ids and logits on CUDA
    split_lm_head: bool = True  # LMC_TP_LM_HEAD: each rank computes the logits of its vocab_rows

    def vocab_rows(self, vocab: int) -> range:
        """The lm_head rows (vocabulary ids) this rank computes logits for: ceil(V / tp) per rank in rank order, the
        last rank fewer when tp does not divide V; all V when the lm_head is replicated."""
        if not self.split_lm_head:
            return range(vocab)
        per = -(-vocab // self.tp)
        return range(min(self.rank * per, vocab), min((self.rank + 1) * per, vocab))

    def gather_vocab(self, part: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """part [B, len(vocab_rows)] (this rank's logits) -> every rank's, [B, V] float32 in vocabulary order, on
        rank 0 (None on the others). Every rank calls it at the same point. The short last rank is padded to
        ceil(V / tp) columns; then one peer-memory kernel where it fits (kernels/tp_exchange.py), else one
        all-gather in the compute dtype into a fresh buffer (capturable in a CUDA graph) and on rank 0 a copy that
        reorders and widens."""
        b, per = part.shape[0], -(-vocab // self.tp)
        if part.shape[1] < per:
            part = F.pad(part, (0, per - part.shape[1]))  # [B, per]
        if self.exchange is not None and self.exchange.fits_logits(part):
            return self.exchange.gather(part, vocab)
        out = torch.empty((self.tp * b, per), dtype=part.dtype, device=part.device)  # [tp * B, per]: rank-major
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13: the old name
        all_gather(out, part.contiguous(), group=self.compute)
        if not self.leader:
            return None
        whole = torch.empty((b, self.tp, per), dtype=torch.float32, device=part.device)
        whole.copy_(out.view(self.tp, b, per).transpose(0, 1))  # [B, tp, per]: row-major
        whole = whole.view(b, self.tp * per)
        return whole if self.tp * per == vocab else whole[:, :vocab].contiguous()  # [B, V]

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_reduce_add_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] (a row-parallel linear's partial output) summed over the ranks, + residual, RMSNorm by weight:
        (normed, new residual). On CUDA a sum that fits the one-shot buffer is one fused kernel (slot: 0 after
        attention, 1 after the MLP, alternating as kernels/allreduce.py requires); larger ones (prefill) and the
        CPU sum through the process group, then norm."""
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot.add_rms_norm(x, residual, weight, eps, slot)
        dist.all_reduce(x, group=self.compute)
        return rms_norm(x, weight, eps, residual)

    def use_one_shot(self, dtype: torch.dtype, device: torch.device) -> None:
        """Set up the one-shot all-reduce and the ids / logits exchange for the model's dtype unless
        LMC_TP_ALLREDUCE=nccl (every rank calls this at the same point; CUDA only). Where the GPUs cannot share
        memory every rank stays on NCCL, with one line saying why."""
        if device.type != "cuda" or allreduce_mode() != "one-shot":
            return
        from lmc.kernels.allreduce import OneShotAllReduce
        from lmc.kernels.peer_memory import PeerMemoryError
        from lmc.kernels.tp_exchange import LeaderExchange

        try:
            self.one_shot = OneShotAllReduce(self.control, device, dtype, ONE_SHOT_ELEMENTS)
            self.exchange = LeaderExchange(self.control, device, dtype)
        except PeerMemoryError as e:
            self._close_peer_memory()
            if self.leader:
                print(f"lmc: tensor parallel sums through NCCL only: {e}", file=sys.stderr)

    def _close_peer_memory(self) -> None:
        for user in (self.one_shot, self.exchange):
            if user is not None:
                user.close()
        self.one_shot = self.exchange = None

    def broadcast_ids(self, ids: torch.Tensor) -> None:
        """Rank 0's token ids into every rank's `ids` (contiguous, same shape everywhere): one peer-memory kernel
        where they fit (kernels/tp_exchange.py), else a broadcast over the compute group."""
        if self.exchange is None or not self.exchange.broadcast_ids(ids):
            dist.broadcast(ids, src=0, group=self.compute)

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (the KV blocks that fit on every device)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t)

    # ------------------------------------------------------------------ announcements (rank 0)
    def _send(self, header: list[int], payload: torch.Tensor | None) -> None:
        """One message: the header padded to HEADER words, then the payload unless it does not fit a channel slot
        (then it follows over the control group; the header's payload length tells the followers)."""
        words = np.array(header + [0] * (HEADER - len(header)), dtype=np.int64)  # [HEADER]
        inline = payload is not None and HEADER + payload.numel() <= SLOT_WORDS
        if inline:
            words = np.concatenate([words, payload.reshape(-1).numpy()])  # [HEADER + n]
        self.channel.send(words, TIMEOUT.total_seconds())
        if payload is not None and not inline:
            dist.broadcast(payload.contiguous(), src=0, group=self.control)

    def announce_forward(self, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                         kv_lens: torch.Tensor, cu: torch.Tensor | None, max_position: int, rows: torch.Tensor) -> None:
        """Host tensors: positions, slots [T]; tables [B, W]; kv_lens [B]; cu [B+1] or None; rows [S], the tokens
        whose logits rank 0 takes."""
        parts = [positions, slots, tables.reshape(-1), kv_lens] + ([cu] if cu is not None else []) + [rows]
        payload = torch.cat([p.to(torch.int64) for p in parts])
        b, w = tables.shape
        self._send([FORWARD, positions.numel(), b, w, max_position, cu is not None, payload.numel(), rows.numel()],
                   payload)

    def announce_decode(self, bucket: int, rows: int, packed) -> None:
        """packed: the decode rows [bucket, 4 + W] as rank 0 copies them to its graph inputs."""
        payload = torch.from_numpy(packed).reshape(-1)
        self._send([DECODE, bucket, rows, packed.shape[1] - 4, payload.numel()], payload)

    def stop(self) -> None:
        self._send([STOP], None)

    def announce_freeze(self) -> None:
        """The warm-up is over: every follower freezes its heap as rank 0 does (the kernels it compiled included)."""
        self._send([FREEZE], None)

    def leave(self, decoder=None) -> None:
        """Leave the process group (a later engine in this process may start another). Every rank leaves at
        the same time (NCCL's teardown waits for the peers), after dropping the CUDA graphs that captured its
        collectives; a teardown that has not finished after LEAVE_S seconds (a peer gone) is left behind."""
        if decoder is not None:
            decoder.release()
        if self.one_shot is not None or self.exchange is not None:
            torch.cuda.synchronize()
            self._close_peer_memory()
        self.channel.close()
        if not dist.is_initialized():
            return
        done = threading.Thread(target=dist.destroy_process_group, name="lmc-tp-leave", daemon=True)
        done.start()
        done.join(LEAVE_S)
        if self.leader:
            shutil.rmtree(os.path.dirname(self.store), ignore_errors=True)

    # ------------------------------------------------------------------ the followers' side
    def receive(self) -> tuple[list[int], torch.Tensor | None]:
        """rank 0's next message: (header, payload or None)."""
        words = self.channel.receive()
        h = words[:HEADER].tolist()
        n = {FORWARD: h[6], DECODE: h[4]}.get(h[0], 0)
        if not n:
            return h, None
        if words.shape[0] == HEADER + n:
            return h, torch.from_numpy(words[HEADER:])
        payload = torch.empty(n, dtype=torch.int64)
        dist.broadcast(payload, src=0, group=self.control)
        return h, payload


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on cuda:r (of the devices this process sees; start_ranks checked there are enough), or on the
    CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _rendezvous() -> str:
    """The path of the ranks' rendezvous store: a file in a fresh private folder (mode 0700), so that no other
    user's process can read or write the keys the ranks exchange (a TCP store on 127.0.0.1 took anyone's)."""
    return os.path.join(tempfile.mkdtemp(prefix="lmc-tp-"), "store")


def join(rank: int, tp: int, store: str, device: torch.device, channel) -> Shard:
    """Enter the process group as `rank` (every rank calls this once) through the rendezvous file `store`, with
    its end of the announcement channel: rank 0 its ChannelWriter, a follower the writer's file path (it attaches
    here)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if rank > 0:  # tell rank 0 this rank is about to join (_join_watching waits for it before it joins itself)
        Path(_ready_marker(store, rank)).touch(mode=0o600)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=tp,
                            timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    control = dist.new_group(backend="gloo", timeout=IDLE)
    compute = dist.group.WORLD
    if rank > 0:
        leader = os.getppid()  # lmc spawned this follower from rank 0
        channel = ChannelReader(channel, rank - 1, lambda: os.getppid() == leader)
    shard = Shard(rank, tp, compute, control, channel, store, split_lm_head=lm_head_mode() == "split")
    warm = torch.zeros(1, device=device)
    dist.all_reduce(warm, group=compute)  # create the communicators now, outside any CUDA-graph capture
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return shard


def allreduce_mode() -> str:
    """LMC_TP_ALLREDUCE: one-shot (the default; kernels/allreduce.py for decode-sized sums on CUDA) or nccl."""
    mode = os.environ.get("LMC_TP_ALLREDUCE", "one-shot")
    if mode not in ALLREDUCE_MODES:
        raise LmcError(f"LMC_TP_ALLREDUCE={mode!r}: set it to one of {', '.join(ALLREDUCE_MODES)}, or unset it")
    return mode


def lm_head_mode() -> str:
    """LMC_TP_LM_HEAD: split (the default; each rank computes V / tp of the logits, rank 0 gathers them) or
    replicated (every rank holds the whole lm_head, rank 0 alone computes the logits)."""
    mode = os.environ.get("LMC_TP_LM_HEAD", "split")
    if mode not in LM_HEAD_MODES:
        raise LmcError(f"LMC_TP_LM_HEAD={mode!r}: set it to one of {', '.join(LM_HEAD_MODES)}, or unset it")
    return mode


def start_ranks(workspace: str, config, tp: int, device: torch.device) -> tuple[Shard, list]:
    """Start ranks 1..tp-1 as processes following this one, and join them as rank 0."""
    allreduce_mode()  # a bad value is one line here, before any rank starts
    lm_head_mode()
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        raise LmcError(f"the workspace is split for tp={tp}, this machine shows {torch.cuda.device_count()} GPUs: "
                       f"run on {tp} GPUs, or convert the checkpoint with --tp {torch.cuda.device_count()}")
    store = _rendezvous()
    ctx = multiprocessing.get_context("spawn")
    procs = []
    channel = ChannelWriter(tp - 1, lambda: all(p.is_alive() for p in procs))
    try:
        procs += [ctx.Process(target=_follower_main, args=(rank, tp, store, channel.path, workspace, config, device.type),
                              name=f"lmc-rank{rank}", daemon=True) for rank in range(1, tp)]
        for p in procs:
            p.start()
        shard = _join_watching(procs, tp, store, rank_device(device, 0), channel)
    except BaseException:
        channel.close()
        shutil.rmtree(os.path.dirname(store), ignore_errors=True)
        raise
    channel.unlink()  # every follower has attached: no name is left in /dev/shm
    return shard, procs


def _ready_marker(store: str, rank: int) -> str:
    """The file a follower creates in the rendezvous folder just before it joins the process group."""
    return os.path.join(os.path.dirname(store), f"ready{rank}")


def _raise_if_a_follower_exited(procs: list) -> None:
    """One exited follower before everyone joined: stop the others and say which one, in one line."""
    gone = [p for p in procs if p.exitcode is not None]
    if gone:
        for p in procs:
            p.kill()
        raise LmcError(f"tensor-parallel rank {gone[0].name.removeprefix('lmc-rank')} exited (code "
                       f"{gone[0].exitcode}) before joining; its error, if any, is printed above")


def _join_watching(procs: list, tp: int, store: str, device: torch.device, channel) -> Shard:
    """join() as rank 0 while watching the followers: one that exits before everyone has joined (killed, out of
    memory, a failed import) ends the wait at once instead of after the 10-minute join timeout.

    Rank 0 enters the process group only once every follower has said it is about to (`_ready_marker`): a
    follower that dies while it starts (importing torch, loading its slice) leaves no rank-0 thread waiting
    inside init_process_group, which would block the next tensor-parallel engine of this process in gloo's
    set-up until the timeout."""
    while not all(os.path.exists(_ready_marker(store, r)) for r in range(1, tp)):
        _raise_if_a_follower_exited(procs)
        time.sleep(JOIN_POLL_S)
    done: dict = {}

    def run() -> None:
        try:
            done["shard"] = join(0, tp, store, device, channel)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            done["error"] = e

    joiner = threading.Thread(target=run, name="lmc-tp-join", daemon=True)
    joiner.start()
    while joiner.is_alive():
        joiner.join(JOIN_POLL_S)
        if joiner.is_alive():
            _raise_if_a_follower_exited(procs)
    if "error" in done:
        raise done["error"]
    if device.type == "cuda":
        torch.cuda.set_device(device)  # join ran on another thread; the current device is per thread
    return done["shard"]


def _follower_main(rank: int, tp: int, store: str, channel: str, workspace: str, config, device_type: str) -> None:
    try:
        from lmc.runtime.engine import build_follower

        shard, model, cache, decoder = build_follower(rank, tp, store, channel, workspace, config, device_type)
        follow(shard, model, cache, decoder)
        shard.leave(decoder)
    except Exception:  # the leader sees its collectives fail; say why here, once
        traceback.print_exc()
        os._exit(1)


def follow(shard: Shard, model, cache, decoder) -> None:
    """Run rank 0's announced forwards on this rank's slice until it says stop."""
    from lmc.runtime.model import PagedBatch

    dev = model.device
    while True:
        h, payload = shard.receive()
        op = h[0]
        if op == STOP:
            return
        if op == FREEZE:
            freeze_heap()
            continue
        with torch.inference_mode():
            if op == DECODE:
                bucket, rows, width = h[1:4]
                decoder.replay_rows(bucket, rows, payload.view(bucket, 4 + width).numpy(), None)
                continue
            t, b, w, max_position, has_cu = h[1:6]
            s = h[7]
            positions, slots, tables, kv_lens, cu, rows = payload.split([t, t, b * w, b, (b + 1) if has_cu else 0, s])
            paged = PagedBatch(cache.k, cache.v, slots.to(dev), tables.view(b, w).to(torch.int32).to(dev),
                               kv_lens.to(torch.int32).to(dev), cu.to(torch.int32).to(dev) if has_cu else None,
                               PagedBatch.longest_run(cu if has_cu else None))
            ids = torch.zeros(t, dtype=torch.int64, device=dev)  # filled by rank 0's broadcast in the forward
            hidden = model.hidden(ids, positions.to(dev), paged, max_position)  # [T, H]
            if s and model.split_lm_head:
                model.logits(hidden[rows.to(dev)])  # this rank's part of the gather rank 0 samples from
