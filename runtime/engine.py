"""The serving engine: requests in, streamed outputs back, one scheduler iteration per `step()`.

Public API (every front end uses only this):

    engine = Engine(workspace, EngineConfig(...))
    handle = engine.add_request(prompt_ids, GenerationConfig(...))   # any thread
    for out in handle: ...             # RequestOutput: new token ids, text delta, logprobs, finish reason
    async for out in handle: ...       # when added from a running asyncio loop (the server)
    handle.abort()                     # or engine.abort(request_id): its KV blocks are freed at once
    engine.step()                      # one iteration, in the caller's thread
    engine.start() / engine.stop()     # or a background thread that steps while there is work
    engine.generate(prompts, gens)     # a batch to completion -> list[Response]
    engine.stats()                     # queue lengths, cache use, prefix-cache hit rate, counters
    engine.warmup()                    # compile kernels and capture the decode graphs before traffic

Without a background thread, iterating a handle drives `step()` itself, so a single-threaded
caller needs nothing else. Requests added from other threads wait in an inbox that each step
drains first (and that is drained at once when the engine is idle).
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lmc.errors import LmcError
from lmc.format.workspace import Workspace
from lmc.runtime.block_manager import BlockManager
from lmc.runtime.config import EngineConfig
from lmc.runtime.device import compute_dtype, default_threads, freeze_heap, pick_device, set_cpu_threads, thaw_heap
from lmc.runtime.kv_cache import GRAPH_SCRATCH_BLOCKS, PagedKVCache, decode_table_width, plan_num_blocks
from lmc.runtime.model import Model, PagedBatch
from lmc.runtime.sampling import GenerationConfig, Logprob, SampleRow, sample_batch
from lmc.runtime.scheduler import RUNNING, Batch, Scheduler, Sequence
from lmc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer
from lmc.runtime.vision import VisionModel, check_placement


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]  # new this step (an EOS that ended the request included)
    text: str  # new text this step
    finish_reason: str | None  # "stop" (EOS, stop token, stop word), "length", "abort", "error", or None: more to come
    num_prompt_tokens: int
    num_generated_tokens: int  # so far
    logprobs: list[Logprob] | None = None  # one per new token when the request asked for them
    logits: torch.Tensor | None = None  # [new tokens, V] float32 on the CPU, with output_logits="generation"


@dataclass
class Response:
    """A finished (or, in a stream, partial) generation, as LMDeploy's pipeline returns it."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    index: int = 0
    logits: torch.Tensor | None = None  # [generated tokens, V] with output_logits="generation"


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_hit_rate: float  # cached prompt tokens / prompt tokens looked up
    preemptions: int
    prompt_tokens: int  # counters since start
    generation_tokens: int
    finished_requests: int

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class RequestHandle:
    """The outputs of one request, as they come. Iterate it (blocking) or `async for` it."""

    def __init__(self, engine: "Engine", request_id: str, loop: asyncio.AbstractEventLoop | None,
                 outputs: queue.SimpleQueue | None = None):
        self.engine, self.request_id = engine, request_id
        self._loop = loop
        self._queue: queue.SimpleQueue | asyncio.Queue = outputs or (asyncio.Queue() if loop else queue.SimpleQueue())
        self.finished = False

    def _put(self, out: RequestOutput) -> None:  # engine side, any thread
        if self._loop is not None:
            self.engine._outbox.setdefault(self._loop, []).append((self._queue, out))
        else:
            self._queue.put(out)

    def __iter__(self):
        if self._loop is not None:
            raise LmcError("this request was added from an asyncio loop: use `async for`")
        try:
            while not self.finished:
                while self._queue.empty() and not self.engine.running_in_background:
                    self.engine.step()
                out = self._queue.get()
                self.finished = out.finish_reason is not None
                yield out
        finally:
            if not self.finished:  # the consumer stopped early: nothing may keep generating for it
                self.abort()

    async def __aiter__(self):
        if self._loop is None:
            raise LmcError("this request was not added from an asyncio loop: iterate it with `for`")
        try:
            while not self.finished:
                out = await self._queue.get()
                self.finished = out.finish_reason is not None
                yield out
        finally:
            if not self.finished:
                self.abort()

    def abort(self) -> None:
        self.engine.abort(self.request_id)

    def result(self) -> Response:
        """Wait for the end and return the whole generation."""
        return merge_outputs(list(self))


def _deliver(items: list) -> None:
    """On the consumer's asyncio loop: put each output in its handle's queue."""
    for q, out in items:
        q.put_nowait(out)


def merge_outputs(outputs: list[RequestOutput], index: int = 0) -> Response:
    """One request's outputs, in order, as one Response."""
    last = outputs[-1]
    logprobs = [lp for out in outputs for lp in out.logprobs or ()]
    logits = [out.logits for out in outputs if out.logits is not None]
    return Response("".join(out.text for out in outputs), last.num_generated_tokens, last.num_prompt_tokens,
                    last.finish_reason, [t for out in outputs for t in out.token_ids], logprobs or None, index,
                    torch.cat(logits) if logits else None)


@dataclass(eq=False)
class _Request:
    seq: Sequence
    gen: GenerationConfig
    handle: RequestHandle
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    max_length: int  # total tokens at which the request ends with "length"
    banned: list[int]
    eos_ids: set[int]
    stop_ids: set[int]
    text: str = ""  # generated text so far (cut at a stop word)
    images: list = field(default_factory=list)  # PlacedImages of the prompt (lmc.runtime.vision)
    sent: int = 0  # characters of text already streamed
    min_new_tokens: int = 0


def ragged_inputs(seqs: list[Sequence], num_new: list[int], block_size: int, decode: bool, width: int = 0):
    """A step's host inputs: seqs[i] computes tokens[num_computed : num_computed + num_new[i]]. Returns ids (list,
    [T]), positions and KV slots [T] int64, block tables [B, W] int32 (W: the most blocks a sequence holds, at least
    `width`; 0 past a sequence's blocks), kv lens [B] int32, cu_seqlens [B+1] int32 (None for a decode step) and
    each sequence's end row (list, [B]). numpy over the step's T tokens: ~1 ms at 8,192 tokens on a slow 2-core VM,
    3x less than a loop per token."""
    table = np.zeros((len(seqs), max(width, *(len(s.blocks) for s in seqs))), dtype=np.int64)  # [B, W]
    for i, s in enumerate(seqs):
        table[i, :len(s.blocks)] = s.blocks
    new = np.asarray(num_new, dtype=np.int64)  # [B]
    starts = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=len(seqs))  # [B]
    ends = np.cumsum(new)  # [B]: one past each sequence's last row
    seq_of = np.repeat(np.arange(len(seqs)), new)  # [T]: the sequence of each row
    pos = starts[seq_of] + np.arange(int(ends[-1])) - (ends - new)[seq_of]  # [T]
    slots = table[seq_of, pos // block_size] * block_size + pos % block_size  # [T]
    cu = None if decode else torch.from_numpy(np.concatenate([[0], ends]).astype(np.int32))  # [B+1]
    ids = [t for s, n in zip(seqs, num_new) for t in s.tokens[s.num_computed:s.num_computed + n]]  # [T]
    return (ids, torch.from_numpy(pos), torch.from_numpy(slots), torch.from_numpy(table.astype(np.int32)),
            torch.from_numpy((starts + new).astype(np.int32)), cu, ends.tolist())


def session_len_of(config: EngineConfig, ws: Workspace) -> int:
    """The session length: the user's (refused past a sliding-window model's window), else the workspace's default,
    else max_position_embeddings."""
    if config.session_len is not None:
        ws.check_within_window(config.session_len, "--session-len")
    return config.session_len or ws.meta.get("engine", {}).get("session_len") or ws.config.max_position_embeddings


def check_tp(config: EngineConfig, ws: Workspace) -> int:
    """The ranks a workspace runs on: its own split; a --tp that differs is refused with what to do."""
    if ws.vision and ws.tp > 1:
        raise LmcError(f"{ws.path} is a vision-language workspace split for tp={ws.tp}; lmc runs those at tp=1: "
                       "convert with --tp 1")
    if config.tp is not None and config.tp != ws.tp:
        source = "the checkpoint or this workspace" if ws.tp == 1 else "the checkpoint"
        raise LmcError(f"--tp {config.tp} does not match {ws.path}, which is split for tp={ws.tp}: pass --tp {ws.tp}, "
                       f"or make a tp={config.tp} workspace (`lmc convert` {source} with --tp {config.tp})")
    return ws.tp


def setup_rank(rank, ws: Workspace, config: EngineConfig, device: torch.device) -> None:
    """Set a rank's device, dtype, model slice, KV cache, block manager and CUDA-graph decoder on `rank` (the
    Engine, or a follower's _Rank): the same code on every rank, so every rank plans the same cache."""
    shard = rank.shard
    rank.device = device
    if device.type == "cpu":
        threads = config.threads or max(1, default_threads() // (shard.tp if shard else 1))
        rank.threads = set_cpu_threads(threads)
    rank.dtype = getattr(torch, config.dtype) if config.dtype else compute_dtype(device, ws.dtype)
    rank.model = Model(ws, device, rank.dtype, shard, config.lm_head)
    graphs = device.type == "cuda" and config.cuda_graph
    local = rank.model.cfg
    num_blocks = plan_num_blocks(local, config, rank.dtype, device, reserved_blocks=GRAPH_SCRATCH_BLOCKS if graphs else 0)
    if shard is not None:
        num_blocks = shard.agree_min(num_blocks)
    rank.cache = PagedKVCache(local, num_blocks, config.cache_block_seq_len, rank.dtype, device, config.quant_policy)
    rank.blocks = BlockManager(num_blocks, config.cache_block_seq_len, config.enable_prefix_caching)
    rank.decoder = None
    if graphs:
        from lmc.runtime.cuda_graph import GraphDecoder

        rank.decoder = GraphDecoder(rank)  # reserves the same scratch block on every rank (a fresh manager's first)


@dataclass
class _Rank:
    """What a follower rank holds: setup_rank fills it as it fills the Engine."""

    shard: object
    config: EngineConfig
    session_len: int


def build_follower(rank: int, tp: int, store: str, channel: str, workspace: str, config: EngineConfig, device_type: str):
    """A follower process's shard, model, cache and decoder (runtime/distributed.py runs them)."""
    from lmc.runtime.distributed import join, rank_device

    device = rank_device(torch.device(device_type), rank)
    r = _Rank(join(rank, tp, store, device, channel), config, config.session_len)
    setup_rank(r, Workspace(workspace), config, device)
    freeze_heap()  # as rank 0 after its warm-up: a collection walking the start-up heap would stall every rank's step
    return r.shard, r.model, r.cache, r.decoder


class Engine:
    def __init__(self, workspace: str, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        config.check()
        ws = Workspace(workspace)
        self.workspace = ws
        tp = check_tp(config, ws)
        self.cfg = ws.config  # the whole model's (vocabulary, special tokens); self.model.cfg is this rank's slice
        self.session_len = session_len_of(config, ws)
        config.session_len = self.session_len
        self.tokenizer = Tokenizer(ws.tokenizer_dir)
        self.eos_ids = self.tokenizer.eos_ids(self.cfg.eos_token_ids)
        self.shard, self._ranks = None, []
        self.froze_heap = False  # set by the warm-up (device.freeze_heap)
        device = pick_device(config.device)
        if tp > 1:
            from lmc.runtime.distributed import rank_device, start_ranks

            self.shard, self._ranks = start_ranks(workspace, config, tp, device)
            device = rank_device(device, 0)
        try:
            setup_rank(self, ws, config, device)
        except BaseException as e:
            for p in self._ranks:  # they wait on a collective rank 0 will never join
                p.terminate()
            if self.shard is None:
                raise
            self.shard.leave()
            if isinstance(e, (LmcError, KeyboardInterrupt)):
                raise
            raise LmcError(f"a tensor-parallel rank failed while loading ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); its own error is printed above") from e
        self.vision = VisionModel(ws, self.device, self.dtype) if ws.vision else None
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_prefill_token_num, config.prefill_interval)
        self._requests: dict[str, _Request] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # async outputs of this step, sent once per loop
        self._ahead: tuple[Batch, object] | None = None  # (its sequences, the GreedyStep) of a step run ahead
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", _Request) | ("abort", request_id)
        self._lock = threading.RLock()  # held by whoever steps or drains the inbox
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failed: str | None = None  # why the background loop stopped, if a step raised
        self._ids = itertools.count()
        self._counters = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0}

    def close(self) -> None:
        """Stop the background loop and the other tensor-parallel ranks (their processes exit); let go of the heap
        the warm-up froze (the collector gets it back when no other engine of the process holds it)."""
        self.stop()
        if self.froze_heap:
            thaw_heap()  # the last engine of the process to close gives the heap back
            self.froze_heap = False
        if self._ranks:
            if self.failed is None:
                try:
                    self.shard.stop()
                except Exception:  # a rank already gone: nothing to tell
                    pass
            self.shard.leave(self.decoder)  # with the followers, which leave on "stop"
            for p in self._ranks:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
            self._ranks = []

    def warmup(self, progress: bool = False) -> dict:
        """Compile every kernel a step can launch and capture the decode graphs now, before any request
        (runtime/warmup.py); `lmc serve` and `lmc bench` call it unless --no-warmup. Returns what it ran and
        its seconds."""
        from lmc.runtime.warmup import warm_up

        with self._lock:
            return warm_up(self, progress)

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt_ids: list[int], gen: GenerationConfig | None = None,
                    request_id: str | None = None, outputs: queue.SimpleQueue | None = None,
                    images: list | None = None) -> RequestHandle:
        """Queue a request; returns its handle. Called from a running asyncio loop, the handle is async.
        `outputs`: deliver this request's outputs to that queue instead of the handle (to stream several
        requests in the order their tokens come; see `stream`). `images`: the PlacedImages of a prompt
        built by lmc.runtime.vision.multimodal_prompt."""
        if self.failed is not None:
            raise LmcError(f"the engine stopped after an error ({self.failed}); restart it")
        gen = gen or GenerationConfig()
        gen.check()
        if not prompt_ids:
            raise LmcError("the prompt is empty")
        if len(prompt_ids) >= self.session_len:
            raise LmcError(f"the prompt has {len(prompt_ids)} tokens; session_len is {self.session_len}: "
                           "shorten it or raise --session-len")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt_ids):
            raise LmcError(f"the prompt holds token ids outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        check_placement(self.workspace.vision, prompt_ids, images or [])
        if self.blocks.blocks_for(len(prompt_ids) + 1) > self.blocks.num_blocks:
            raise LmcError(f"a prompt of {len(prompt_ids)} tokens does not fit the KV cache "
                           f"({self.blocks.num_blocks} blocks of {self.blocks.block_size}); raise --cache-max-entry-count")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        handle = RequestHandle(self, request_id, None if outputs is not None else loop, outputs)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), arrival=0,
                       images=tuple((p.start, p.end, p.image.digest) for p in images or ()))
        generator = None
        if gen.random_seed is not None and not gen.greedy:
            generator = torch.Generator(device=self.device).manual_seed(gen.random_seed)
        stop_ids = set(gen.stop_token_ids or ())
        req = _Request(seq, gen, handle, IncrementalDetokenizer(self.tokenizer, prompt_ids, gen.skip_special_tokens),
                       generator, min(len(prompt_ids) + gen.max_new_tokens, self.session_len),
                       list(gen.bad_token_ids or ()) + self._bad_word_ids(gen), set() if gen.ignore_eos else self.eos_ids,
                       stop_ids, min_new_tokens=gen.min_new_tokens or 0, images=list(images or ()))
        self._inbox.put(("add", req))
        self._poke()
        return handle

    def abort(self, request_id: str) -> None:
        """End a request now: its blocks are freed and its handle gets a final output (finish_reason "abort")."""
        self._inbox.put(("abort", str(request_id)))
        self._poke()

    def step(self) -> None:
        """One scheduler iteration: admit, compute one forward, sample, stream the outputs."""
        with self._lock:
            try:
                self._step()
            finally:
                self._flush_outbox()

    def _flush_outbox(self) -> None:
        """Hand this step's outputs to each asyncio loop in one call (a wake-up per loop, not per token).
        Called with the lock held, as every producer of outputs is."""
        while self._outbox:
            loop, items = self._outbox.popitem()
            loop.call_soon_threadsafe(_deliver, items)

    def _step(self) -> None:
        if self._ahead is not None:  # a greedy decode step launched ahead by the previous call
            batch, launched = self._ahead
            self._ahead = None
            self._pipelined_step(batch, launched)
            return
        self._drain()
        batch = self.scheduler.schedule()
        for seq in self.scheduler.overflowed:  # the KV cache cannot hold it even alone
            r = self._requests[seq.request_id]
            r.text += r.detok.flush()
            self._finish(r, "length", [], r.text[r.sent:], None)
        self.scheduler.overflowed.clear()
        if batch is None:
            return
        if self._pipelines(batch):
            with torch.inference_mode():
                launched = self.decoder.launch_greedy(batch.seqs)
            self._pipelined_step(batch, launched)
            return
        sampling = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        with torch.inference_mode():
            logits = self._forward(batch)  # [S, V] for the sequences that sample
            self.scheduler.computed(batch)
            if sampling:
                self._accept(sampling, logits)

    # ------------------------------------------------------------------ pipelined greedy decode
    def _pipelines(self, batch: Batch) -> bool:
        """Greedy decode without penalties, bans or per-token outputs can run ahead of the host: the next token
        is the argmax, taken on the device and fed to the next step there."""
        if self.decoder is None or not batch.is_decode:
            return False
        for seq in batch.seqs:
            r = self._requests[seq.request_id]
            g = r.gen
            if not g.greedy or g.repetition_penalty != 1.0 or r.banned or seq.num_output < r.min_new_tokens \
                    or g.logprobs is not None or g.output_logits:
                return False
        return True

    def _launch_ahead(self, seqs: list[Sequence], launched) -> object | None:
        """Launch the step after `launched` (its device tokens as inputs) when nothing else wants the GPU next:
        no request arriving or admissible, no sequence at its length limit, a KV slot for every next token."""
        if not self._inbox.empty() or self.scheduler.admits_next_step():
            return None  # a request could be admitted next step
        if any(seq.length + 1 >= self._requests[seq.request_id].max_length for seq in seqs):
            return None
        need = sum(max(0, self.blocks.blocks_for(seq.length + 1) - len(seq.blocks)) for seq in seqs)
        if need > self.blocks.num_free:
            return None
        for seq in seqs:
            seq.blocks += self.blocks.allocate(max(0, self.blocks.blocks_for(seq.length + 1) - len(seq.blocks)))
        return self.decoder.launch_greedy(seqs, launched.ids)

    def _pipelined_step(self, batch: Batch, launched) -> None:
        """Accept a launched greedy step's tokens, having first launched the step after it where possible, so
        detokenizing, stop checks and streaming overlap the GPU. A sequence that finishes (or is aborted) drops
        out; the step launched ahead is then accepted only for the others (its inputs were theirs)."""
        alive = [i for i, seq in enumerate(batch.seqs) if seq.status == RUNNING]
        seqs = [batch.seqs[i] for i in alive]
        if not seqs:
            return
        if len(alive) < len(batch.seqs):
            launched = launched.subset(alive)
        with torch.inference_mode():
            ahead = self._launch_ahead(seqs, launched)
            tokens = launched.tokens()
            decoded = Batch(seqs, [1] * len(seqs))
            self.scheduler.computed(decoded)
            for seq, token in zip(seqs, tokens):
                self._accept_token(self._requests[seq.request_id], token, None, None)
        if ahead is not None:
            self._ahead = (decoded, ahead)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or not self._inbox.empty()

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Step on a background thread whenever there is work (for async front ends)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmc-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (requests still queued stay queued)."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def generate(self, prompts: list[list[int]], gen: GenerationConfig | list[GenerationConfig] | None = None) -> list[Response]:
        """Run a batch of prompts (token ids) to completion; one Response per prompt, in order."""
        gens = gen if isinstance(gen, list) else [gen or GenerationConfig()] * len(prompts)
        outputs: list[list[RequestOutput]] = [[] for _ in prompts]
        for i, out in self.stream(prompts, gens):
            outputs[i].append(out)
        return [merge_outputs(outs, i) for i, outs in enumerate(outputs)]

    def stream(self, prompts: list[list[int]], gens: list[GenerationConfig], images: list[list] | None = None):
        """Run prompts together; yield (prompt index, RequestOutput) as tokens come. Stopping the iteration
        early aborts what is still running, so nothing keeps generating for a consumer that left.
        `images`: each prompt's PlacedImages (lmc.runtime.vision.multimodal_prompt)."""
        if len(gens) != len(prompts):
            raise LmcError(f"{len(prompts)} prompts but {len(gens)} generation configs: pass one config, or one per prompt")
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        handles = [self.add_request(ids, g, outputs=outputs, images=imgs)
                   for ids, g, imgs in zip(prompts, gens, images or [None] * len(prompts))]
        index = {h.request_id: i for i, h in enumerate(handles)}
        left = len(handles)
        try:
            while left:
                while outputs.empty() and not self.running_in_background:
                    self.step()
                out = outputs.get()
                if out.finish_reason is not None:
                    handles[index[out.request_id]].finished = True
                    left -= 1
                yield index[out.request_id], out
        finally:
            for h in handles:
                if not h.finished:
                    h.abort()

    def stats(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        return EngineStats(len(s.running), len(s.waiting) + self._inbox.qsize(), b.num_blocks, b.num_used, b.hit_rate,
                           s.preemptions, self._counters["prompt_tokens"], self._counters["generation_tokens"],
                           self._counters["finished"])

    # ------------------------------------------------------------------ inbox and background loop
    def _poke(self) -> None:
        self._wake.set()
        if self._lock.acquire(blocking=False):  # idle: apply at once (an abort frees its blocks now)
            try:
                self._drain()
                self._flush_outbox()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                item.seq.arrival = time.monotonic_ns()
                self._requests[item.seq.request_id] = item
                self.scheduler.add(item.seq)
                self._counters["prompt_tokens"] += item.seq.num_prompt
            else:
                req = self._requests.get(item)
                if req is not None:
                    self._finish(req, "abort", [], req.text[req.sent:], None)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._wake.wait()
                self._wake.clear()
                while not self._stopping and (self.scheduler.has_work() or not self._inbox.empty()):
                    self.step()
        except Exception as e:  # a bug or a device error: nobody may wait forever on a dead loop
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        """Stop serving after an error in a step: every request ends with finish_reason "error" and new ones
        are refused, saying why."""
        self.failed = f"{type(error).__name__}: {error}"
        with self._lock:
            self._drain()
            for r in list(self._requests.values()):
                self._finish(r, "error", [], r.text[r.sent:], None)
            self._flush_outbox()
        self._thread = None

    @property
    def healthy(self) -> bool:
        return self.failed is None

    # ------------------------------------------------------------------ forward
    def _forward(self, batch: Batch) -> torch.Tensor | None:
        """Run the model over the batch's new tokens; logits [S, V] of the sequences that sample, in order."""
        pieces = [] if self.vision is None else \
            [(self._requests[s.request_id].images, s.num_computed, n) for s, n in zip(batch.seqs, batch.num_new)]
        with_images = any(start < p.end and p.start < start + n for images, start, n in pieces for p in images)
        if batch.is_decode and self.decoder is not None and not with_images:
            return self.decoder.step(batch.seqs)
        bs = self.blocks.block_size  # an eager decode step's table as wide as a graph's (decode_table_width)
        width = decode_table_width(self.session_len, bs) if batch.is_decode else 0
        ids, positions, slots, tables, kv_lens, cu, ends = ragged_inputs(batch.seqs, batch.num_new, bs,
                                                                         batch.is_decode, width)
        rows = torch.tensor([ends[i] - 1 for i in range(len(batch.seqs)) if batch.samples(i)], dtype=torch.int64)  # [S]
        ids = torch.tensor(ids, dtype=torch.int64, device=self.device)  # [T]
        embed = (lambda t: self.vision.embed(self.model.embed, t, pieces)) if with_images else None
        return self.ragged_forward(ids, positions, slots, tables, kv_lens, cu, rows, embed)

    def ragged_forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                       kv_lens: torch.Tensor, cu: torch.Tensor | None, rows: torch.Tensor,
                       embed=None) -> torch.Tensor | None:
        """The eager forward (rank 0; announced first, so every follower runs the same): ids [T] on the device;
        host tensors positions, slots [T] (int64), tables [B, W], kv_lens [B] (int32), cu [B+1] (None: one token a
        sequence), rows [S] (the tokens whose logits are wanted); embed: ids -> [T, H] (image tokens) or None.
        Logits [S, V], None when S = 0."""
        dev = self.device
        max_position = int(kv_lens.max()) - 1
        if self.shard is not None:
            self.shard.announce_forward(positions, slots, tables, kv_lens, cu, max_position, rows)
        paged = PagedBatch(self.cache.k, self.cache.v, slots.to(dev), tables.to(dev), kv_lens.to(dev),
                           cu.to(dev) if cu is not None else None, PagedBatch.longest_run(cu))
        embeds = embed(ids) if embed is not None else None  # [T, H]
        h = self.model.hidden(ids, positions.to(dev), paged, max_position, embeds)  # [T, H]
        if not rows.numel():  # every sequence is part-way through its prompt
            return None
        return self.model.logits(h[rows.to(dev)])  # [S, V] (with a split lm_head the followers compute these rows too)

    # ------------------------------------------------------------------ outputs
    def _bad_word_ids(self, gen: GenerationConfig) -> list[int]:
        ids = []
        for word in gen.bad_words or ():
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) != 1:
                raise LmcError(f"bad word {word!r} is {len(encoded)} tokens; lmc bans single-token words (use bad_token_ids)")
            ids += encoded
        return ids

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        reqs = [self._requests[s.request_id] for s in seqs]
        rows = []
        for r in reqs:
            banned = r.banned
            if r.seq.num_output < r.min_new_tokens:
                banned = banned + sorted(r.eos_ids | r.stop_ids)
            seen = r.seq.tokens if r.gen.repetition_penalty != 1.0 else []
            rows.append(SampleRow(r.gen, r.generator, seen, banned))
        raw = [logits[i:i + 1].cpu() if r.gen.output_logits else None for i, r in enumerate(reqs)]
        tokens, logprobs = sample_batch(logits, rows)
        for r, token, lp, row in zip(reqs, tokens, logprobs, raw):
            self._accept_token(r, token, lp, row)

    def _accept_token(self, r: _Request, token: int, lp: Logprob | None, logits: torch.Tensor | None) -> None:
        """Append a token, find stop conditions, stream the text that is final. With stop words, the last
        (longest word - 1) characters are held back until they cannot begin a stop word."""
        seq, gen = r.seq, r.gen
        seq.tokens.append(token)
        self._counters["generation_tokens"] += 1
        r.text += r.detok.push(token)
        end = len(r.text)
        reason = "stop" if token in r.eos_ids or token in r.stop_ids else None
        words = [w for w in gen.stop_words or () if w]
        if words and reason is None:
            longest = max(len(w) for w in words)
            search_from = max(0, r.sent - longest)
            for word in words:
                cut = r.text.find(word, search_from)
                if cut >= 0:
                    end = cut + len(word) if gen.include_stop_str_in_output else cut
                    r.text, reason = r.text[:end], "stop"
                    break
            else:
                end = max(r.sent, len(r.text) - (longest - 1))
        if reason is None and seq.length >= r.max_length:
            reason = "length"
        if reason is not None:
            if reason == "length":
                r.text += r.detok.flush()
            end = len(r.text)
        delta, r.sent = r.text[r.sent:end], max(r.sent, end)
        if reason is None:
            r.handle._put(RequestOutput(seq.request_id, [token], delta, None, seq.num_prompt, seq.num_output,
                                        [lp] if lp else None, logits))
        else:
            self._finish(r, reason, [token], delta, lp, logits)

    def _finish(self, r: _Request, reason: str, tokens: list[int], delta: str, lp: Logprob | None,
                logits: torch.Tensor | None = None) -> None:
        seq = r.seq
        self.scheduler.free(seq)
        del self._requests[seq.request_id]
        self._counters["finished"] += 1
        r.handle._put(RequestOutput(seq.request_id, tokens, delta, reason, seq.num_prompt, seq.num_output,
                                    [lp] if lp else None, logits))
