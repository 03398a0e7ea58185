"""Iteration-level scheduling: which sequences compute how many tokens in the next forward.

Each step has a token budget (`max_prefill_token_num`). Running sequences go first, oldest
first: a decoding sequence takes one token, a sequence still prefilling takes the next chunk of
its prompt. Then waiting sequences are admitted in arrival order (FIFO: a request that does not
fit blocks the ones behind it) while the budget, `max_batch_size` and free KV blocks allow, each
with a chunk of its prompt, after looking its full prompt blocks up in the prefix cache. So a
long prompt is prefilled over several steps, side by side with the running decodes.

KV blocks are taken as a sequence grows. When a running sequence needs a block and none is
free, the newest running sequence is preempted: its blocks are released and it goes back to the
front of the queue, to be recomputed from its tokens (prompt and output so far) later; greedy
output is unchanged by this, and a seeded sequence keeps its own random stream.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmc.runtime.block_manager import ROOT_HASH, BlockManager, chain_hash

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    """A request's tokens and its KV blocks. `tokens` is the prompt followed by the output so far."""

    request_id: str
    tokens: list[int]
    num_prompt: int
    arrival: int
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K and V are in the cache
    keys: list[bytes] = field(default_factory=list)  # prefix-cache key of each full block of tokens
    num_registered: int = 0  # leading blocks whose key is in the block manager
    status: str = WAITING
    images: tuple = ()  # (start, end, content digest) of each image's tokens (lmc.runtime.vision)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def pending(self) -> int:
        """Tokens to compute before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    def block_keys(self, n_blocks: int, block_size: int) -> list[bytes]:
        """Keys of the first n_blocks full blocks (computed once, extended as the sequence grows)."""
        while len(self.keys) < n_blocks:
            i = len(self.keys)
            parent = self.keys[-1] if self.keys else ROOT_HASH
            lo, hi = i * block_size, (i + 1) * block_size
            extra = b"".join(digest for start, end, digest in self.images if start < hi and end > lo)
            self.keys.append(chain_hash(parent, self.tokens[lo:hi], extra))
        return self.keys[:n_blocks]


@dataclass
class Batch:
    """One step: seqs[i] computes tokens[num_computed : num_computed + num_new[i]]."""

    seqs: list[Sequence]
    num_new: list[int]

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly its one last token (a decode step, or one-token prompts)."""
        return all(n == 1 == s.pending for s, n in zip(self.seqs, self.num_new))

    def samples(self, i: int) -> bool:
        """Whether seqs[i] reaches its last token this step (so its next token is sampled)."""
        return self.num_new[i] == self.seqs[i].pending


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_step_tokens: int, prefill_interval: int = 1):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.prefill_interval = prefill_interval
        self.steps_since_admission = prefill_interval  # the first request is admitted at once
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.preemptions = 0
        self.overflowed: list[Sequence] = []  # sequences that cannot grow even with the whole cache to themselves

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ leaving
    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks and drop it from the queues (finished or aborted)."""
        self.blocks.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.status = [], 0, FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _overflow(self, seq: Sequence) -> None:
        self.free(seq)
        self.overflowed.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_registered, seq.status = [], 0, 0, WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # ------------------------------------------------------------------ the step
    def _grow(self, seq: Sequence, n: int) -> bool:
        """Blocks for seq's next n tokens, preempting newer running sequences as needed. False when seq
        itself had to be preempted."""
        need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.blocks)
        while need > self.blocks.num_free:
            if self.running == [seq]:
                self._overflow(seq)
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks += self.blocks.allocate(need)
        return True

    def _start(self, seq: Sequence) -> None:
        """Prefix-cache lookup for a sequence about to be admitted (its blocks are empty)."""
        bs = self.blocks.block_size
        n_full = (seq.length - 1) // bs  # the last token is always computed: its logits are needed
        hits = self.blocks.match(seq.block_keys(n_full, bs)) if self.blocks.prefix_caching else []
        self.blocks.record_lookup(seq.length, len(hits) * bs)
        seq.blocks, seq.num_computed, seq.num_registered = hits, len(hits) * bs, len(hits)

    def schedule(self) -> Batch | None:
        budget = self.max_step_tokens
        seqs, num_new = [], []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING:  # preempted while an older sequence grew
                continue
            n = min(seq.pending, budget)
            if not self._grow(seq, n):
                continue
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        # waiting sequences in arrival order (a preempted one is first in line again); while sequences decode,
        # only every prefill_interval steps, so most steps stay pure decode steps
        admitted = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size and self._admission_open():
            seq = self.waiting[0]
            self._start(seq)
            n = min(seq.pending, budget)
            need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.blocks)
            if need > self.blocks.num_free:
                self.blocks.release(seq.blocks)
                seq.blocks, seq.num_computed, seq.num_registered = [], 0, 0
                if not self.running:  # the whole cache is free and still too small (a long recomputation)
                    self._overflow(seq)
                    continue
                break
            seq.blocks += self.blocks.allocate(need)
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
            admitted += 1
        if admitted:
            self.steps_since_admission = 0
        return Batch(seqs, num_new) if seqs else None

    def _admission_open(self) -> bool:
        return not self.running or self.steps_since_admission >= self.prefill_interval

    def admits_next_step(self) -> bool:
        """Whether the next schedule() would admit a waiting sequence, counting the step about to be accepted
        (so nothing should be launched ahead of it)."""
        return bool(self.waiting) and len(self.running) < self.max_batch_size and \
            (not self.running or self.steps_since_admission + 1 >= self.prefill_interval)

    def computed(self, batch: Batch) -> None:
        """After the forward (scheduled here or run ahead by the engine): advance each sequence and make its
        newly full blocks findable."""
        self.steps_since_admission += 1
        bs = self.blocks.block_size
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            full = seq.num_computed // bs
            if self.blocks.prefix_caching and full > seq.num_registered:
                for i, key in enumerate(seq.block_keys(full, bs)[seq.num_registered:], start=seq.num_registered):
                    self.blocks.register(seq.blocks[i], key)
                seq.num_registered = full
