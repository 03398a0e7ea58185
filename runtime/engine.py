"""Generation: continuous batching of prefill and decode steps over the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lmc.errors import LmcError
from lmc.runtime.config import EngineConfig
from lmc.runtime.device import compute_dtype, pick_device
from lmc.runtime.kv_cache import GRAPH_SCRATCH_BLOCKS, PagedKVCache, plan_num_blocks
from lmc.runtime.model import Model, PagedBatch
from lmc.runtime.sampling import GenerationConfig, sample
from lmc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer
from lmc.format.workspace import Workspace


@dataclass
class Response:
    """One finished generation, as LMDeploy's pipeline returns it."""

    text: str
    token_ids: list[int]  # generated ids (an EOS that ended the generation included)
    input_token_len: int
    generate_token_len: int
    finish_reason: str  # "stop" (EOS or a stop word) or "length" (max_new_tokens or session_len)
    index: int = 0


@dataclass
class _Sequence:
    index: int
    prompt: list[int]
    gen: GenerationConfig
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


# on_delta(index, text delta, token id, finish_reason or None)
DeltaCallback = Callable[[int, str, int, "str | None"], None]


class Engine:
    def __init__(self, workspace: str, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        config.check()
        ws = Workspace(workspace)
        self.workspace = ws
        self.device = pick_device(config.device)
        if config.dtype:
            self.dtype = getattr(torch, config.dtype)
        else:
            self.dtype = compute_dtype(self.device, ws.dtype)
        self.cfg = ws.config
        self.model = Model(ws, self.device, self.dtype)
        self.tokenizer = Tokenizer(ws.tokenizer_dir)
        self.eos_ids = self.tokenizer.eos_ids(self.cfg.eos_token_ids)
        self.session_len = config.session_len or ws.meta.get("engine", {}).get("session_len") or self.cfg.max_position_embeddings
        config.session_len = self.session_len
        graphs = self.device.type == "cuda" and config.cuda_graph
        num_blocks = plan_num_blocks(self.cfg, config, self.dtype, self.device,
                                     reserved_blocks=GRAPH_SCRATCH_BLOCKS if graphs else 0)
        self.cache = PagedKVCache(self.cfg, num_blocks, config.cache_block_seq_len, self.dtype, self.device)
        self.max_prefill_tokens = max(8192, self.session_len)
        self.decoder = None
        if graphs:
            from lmc.runtime.cuda_graph import GraphDecoder

            self.decoder = GraphDecoder(self)

    # ------------------------------------------------------------------ steps
    def _batch_tensors(self, seqs: list[_Sequence], new_tokens: list[int]):
        """Block tables, kv lens and slots for `new_tokens[i]` fresh tokens at the end of seq i."""
        bs = self.cache.block_size
        width = max(len(s.blocks) for s in seqs)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], dtype=torch.int32)  # [B, W]
        slots, positions = [], []
        for s, n in zip(seqs, new_tokens):
            for p in range(s.length - n, s.length):
                slots.append(s.blocks[p // bs] * bs + p % bs)
                positions.append(p)
        kv_lens = torch.tensor([s.length for s in seqs], dtype=torch.int32)
        return tables, kv_lens, torch.tensor(slots, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64)

    @torch.inference_mode()
    def _prefill(self, seqs: list[_Sequence]) -> torch.Tensor:
        lens = [len(s.prompt) for s in seqs]
        tables, kv_lens, slots, positions = self._batch_tensors(seqs, lens)
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)  # [B+1]
        dev = self.device
        batch = PagedBatch(self.cache.k, self.cache.v, slots.to(dev), tables.to(dev), kv_lens.to(dev), cu.to(dev))
        ids = torch.tensor([t for s in seqs for t in s.prompt], dtype=torch.int64, device=dev)
        h = self.model.hidden(ids, positions.to(dev), batch, max(lens) - 1)  # [T, H]
        return self.model.logits(h[(cu[1:] - 1).to(dev)])  # [B, V]

    @torch.inference_mode()
    def _decode(self, seqs: list[_Sequence]) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.step(seqs)
        tables, kv_lens, slots, positions = self._batch_tensors(seqs, [1] * len(seqs))
        dev = self.device
        batch = PagedBatch(self.cache.k, self.cache.v, slots.to(dev), tables.to(dev), kv_lens.to(dev), None)
        ids = torch.tensor([s.output[-1] for s in seqs], dtype=torch.int64, device=dev)
        h = self.model.hidden(ids, positions.to(dev), batch, max(s.length for s in seqs) - 1)
        return self.model.logits(h)  # [B, V]

    # ------------------------------------------------------------------ bookkeeping
    def _accept(self, seq: _Sequence, logits: torch.Tensor, on_delta: DeltaCallback | None) -> None:
        seen = torch.tensor(seq.prompt + seq.output, device=logits.device) if seq.gen.repetition_penalty != 1.0 else torch.empty(0)
        self._accept_token(seq, sample(logits, seq.gen, seen, seq.generator), on_delta)

    def _accept_token(self, seq: _Sequence, token: int, on_delta: DeltaCallback | None) -> None:
        seq.output.append(token)
        delta = seq.detok.push(token)
        seq.text += delta
        if token in self.eos_ids and not seq.gen.ignore_eos:
            seq.finish_reason = "stop"
        for word in seq.gen.stop_words:
            cut = seq.text.find(word)
            if word and cut >= 0:
                delta = delta[: max(0, len(delta) - (len(seq.text) - cut))]
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
        if seq.finish_reason is None and (len(seq.output) >= seq.gen.max_new_tokens or seq.length >= self.session_len):
            seq.finish_reason = "length"
        if seq.finish_reason == "length":
            tail = seq.detok.flush()
            seq.text += tail
            delta += tail
        if on_delta is not None:
            on_delta(seq.index, delta, token, seq.finish_reason)

    def _pipelines(self, running: list[_Sequence]) -> bool:
        """Greedy decode without a repetition penalty can run ahead of the host: the next token is the argmax,
        taken on the device and fed to the next step there."""
        return self.decoder is not None and all(s.gen.greedy and s.gen.repetition_penalty == 1.0 for s in running)

    @torch.inference_mode()
    def _decode_pipelined(self, running: list[_Sequence], on_delta: DeltaCallback | None) -> None:
        """Decode steps with step n + 1 launched before step n's tokens reach the host, so detokenizing, stop
        checks and callbacks overlap the GPU. Returns once a sequence finishes; the step in flight then is
        accepted for the others (its inputs were theirs), so nothing is computed twice or left running. A step
        is launched ahead only when no sequence can reach its length limit before it (KV slots stay within
        the blocks reserved). Tokens equal _decode's: both take the first maximum of the same logits."""
        pending = self.decoder.launch_greedy(running)
        while True:
            ahead = None
            if all(len(s.output) + 1 < s.gen.max_new_tokens and s.length + 1 < self.session_len for s in running):
                ahead = self.decoder.launch_greedy(running, pending.ids)
            for seq, token in zip(running, pending.tokens()):
                self._accept_token(seq, token, on_delta)
            if ahead is None:
                return
            if any(s.finish_reason for s in running):
                for seq, token in zip(running, ahead.tokens()):
                    if not seq.finish_reason:
                        self._accept_token(seq, token, on_delta)
                return
            pending = ahead

    def _reserve(self, seq: _Sequence) -> bool:
        need = self.cache.blocks_for(min(len(seq.prompt) + seq.gen.max_new_tokens, self.session_len))
        if need > self.cache.num_blocks:
            raise LmcError(f"one sequence needs {need} KV blocks but the cache holds {self.cache.num_blocks}; "
                           "raise --cache-max-entry-count or lower --session-len / --max-new-tokens")
        if need > self.cache.free_blocks:
            return False
        seq.blocks = self.cache.allocate(need)
        return True

    def generate(self, prompts: list[list[int]], gen: GenerationConfig | list[GenerationConfig] | None = None,
                 on_delta: DeltaCallback | None = None) -> list[Response]:
        """Generate for each prompt (token ids); continuous batching up to max_batch_size."""
        gens = gen if isinstance(gen, list) else [gen or GenerationConfig()] * len(prompts)
        waiting = []
        for i, (ids, g) in enumerate(zip(prompts, gens)):
            g.check()
            if not ids:
                raise LmcError(f"prompt {i} is empty")
            if len(ids) >= self.session_len:
                raise LmcError(f"prompt {i} has {len(ids)} tokens; session_len is {self.session_len}: shorten it or raise --session-len")
            generator = None if g.seed is None else torch.Generator().manual_seed(g.seed + i)
            waiting.append(_Sequence(i, list(ids), g, IncrementalDetokenizer(self.tokenizer, ids), generator))
        done: list[_Sequence] = []
        running: list[_Sequence] = []
        try:
            while waiting or running:
                admitted, tokens = [], 0
                while waiting and len(running) + len(admitted) < self.config.max_batch_size:
                    if admitted and tokens + len(waiting[0].prompt) > self.max_prefill_tokens:
                        break
                    if not self._reserve(waiting[0]):
                        break
                    tokens += len(waiting[0].prompt)
                    admitted.append(waiting.pop(0))
                if admitted:
                    logits = self._prefill(admitted)
                    for seq, row in zip(admitted, logits):
                        self._accept(seq, row, on_delta)
                    running += admitted
                elif running and self._pipelines(running):
                    self._decode_pipelined(running, on_delta)
                elif running:
                    logits = self._decode(running)
                    for seq, row in zip(running, logits):
                        self._accept(seq, row, on_delta)
                finished = [s for s in running if s.finish_reason]
                for s in finished:
                    self.cache.release(s.blocks)
                    s.blocks = []
                running = [s for s in running if not s.finish_reason]
                done += finished
        finally:
            for s in running:
                self.cache.release(s.blocks)
        done.sort(key=lambda s: s.index)
        return [Response(s.text, s.output, len(s.prompt), len(s.output), s.finish_reason, s.index) for s in done]
