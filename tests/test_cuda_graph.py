"""CUDA-graph decode: the host-side bucketing and packing (CPU), the padded step against the engine's
eager decode (CPU), and graph replays against eager decode on a GPU (logits and greedy tokens).

lmc.runtime modules are imported inside the tests: importing them imports triton, which
tests/test_kernels.py must see first with TRITON_INTERPRET set. The GPU tests run compiled kernels:
TRITON_INTERPRET=0 pytest -m gpu tests/test_cuda_graph.py
"""
from __future__ import annotations

import os
import random
import warnings
from types import SimpleNamespace

import pytest
import torch

from lmc.compiler.convert import convert

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and TRITON_INTERPRET=0 (run: TRITON_INTERPRET=0 pytest -m gpu)")

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 51)), [3, 4]]  # 5, 31 and 2 tokens: odd, across 16-token blocks
STEPS = 21


def test_batch_buckets_and_bucket_for():
    from lmc.runtime.cuda_graph import batch_buckets, bucket_for

    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    buckets = batch_buckets(48)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    with pytest.raises(ValueError, match="exceeds the largest"):
        bucket_for(49, buckets)


def test_pack_decode_rows_matches_the_engines_batch_tensors():
    """Real rows carry the last token, its position, its KV slot (block table entry * block size + offset)
    and the kv length; padding rows read and write slot 0 of the scratch block only."""
    from lmc.runtime.cuda_graph import LEN, POS, SLOT, TABLE, pack_decode_rows

    rng = random.Random(3)
    block_size, width, scratch = 16, 7, 41
    pool = rng.sample(range(40), 40)
    seqs = []
    for length in (1, 16, 17, 33, 112):
        n = -(-length // block_size)
        blocks, pool = pool[:n], pool[n:]
        seqs.append(SimpleNamespace(prompt=[0] * (length - 1), output=[rng.randrange(1000)], blocks=blocks, length=length))
    rows = pack_decode_rows([(s.output[-1], s.length, s.blocks) for s in seqs], 8, width, block_size, scratch)
    assert rows.shape == (8, TABLE + width) and rows.dtype.name == "int64"

    positions = torch.tensor([s.length - 1 for s in seqs])
    slots = torch.tensor([s.blocks[p // block_size] * block_size + p % block_size for s, p in zip(seqs, positions.tolist())])
    kv_lens = torch.tensor([s.length for s in seqs])
    tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs])
    n = len(seqs)
    assert rows[:n, 0].tolist() == [s.output[-1] for s in seqs]
    assert rows[:n, POS].tolist() == positions.tolist()
    assert rows[:n, SLOT].tolist() == slots.tolist()
    assert rows[:n, LEN].tolist() == kv_lens.tolist()
    for i, s in enumerate(seqs):
        assert rows[i, TABLE:TABLE + len(s.blocks)].tolist() == tables[i, :len(s.blocks)].tolist()
        assert (rows[i, TABLE + len(s.blocks):] == scratch).all()
    pad = rows[n:]
    assert (pad[:, :TABLE] == [0, 0, scratch * block_size, 1]).all() and (pad[:, TABLE:] == scratch).all()
    with pytest.raises(AssertionError):
        pack_decode_rows([(1, 200, list(range(13)))], 1, width, block_size, scratch)


def _engine(ws, device: str, **kw):
    from lmc.runtime.config import EngineConfig
    from lmc.runtime.engine import Engine

    return Engine(str(ws), EngineConfig(device=device, cache_block_seq_len=16, session_len=112, max_batch_size=4, **kw))


def _greedy_logits(engine, prompts, steps: int = STEPS) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy generation through the public API: each prompt's tokens and its logits [steps, V] on the CPU."""
    from lmc.runtime.sampling import GenerationConfig

    gen = GenerationConfig(max_new_tokens=steps, ignore_eos=True, output_logits="generation")
    results = engine.generate(prompts, gen)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return [r.token_ids for r in results], [r.logits for r in results]


def _same_prefix_rel(a, b) -> float:
    """Largest relative logit difference over the steps where two greedy runs still share their context."""
    (tokens_a, logits_a), (tokens_b, logits_b) = a, b
    worst = 0.0
    for ta, tb, la, lb in zip(tokens_a, tokens_b, logits_a, logits_b):
        same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta) - 1) + 1  # through the first split
        worst = max(worst, _rel(la[:same], lb[:same]))
    return worst


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _workspace(checkpoint, tmp_path, dtype: str = "float32"):
    ws = tmp_path / f"ws-{dtype}"
    convert(checkpoint("llama3"), ws, dtype=dtype)
    return ws


def test_scratch_block_is_planned_beside_full_sessions(checkpoint, tmp_path):
    """With the cache capped at max_batch_size full sessions, the graph decoder's scratch block comes on top:
    max_batch_size sequences of session_len tokens still fit (they did not before the cap counted it)."""
    from lmc.runtime.cuda_graph import GraphDecoder
    from lmc.runtime.kv_cache import GRAPH_SCRATCH_BLOCKS, PagedKVCache, plan_num_blocks

    from lmc.runtime.block_manager import BlockManager

    engine = _engine(_workspace(checkpoint, tmp_path), "cpu")  # no graphs on CPU: nothing reserved
    per_session = -(-engine.session_len // engine.blocks.block_size)  # 112 / 16 = 7
    assert engine.blocks.num_blocks == engine.config.max_batch_size * per_session == 28
    planned = plan_num_blocks(engine.cfg, engine.config, engine.dtype, engine.device,
                              reserved_blocks=GRAPH_SCRATCH_BLOCKS)
    assert planned == 28 + GRAPH_SCRATCH_BLOCKS
    engine.cache = PagedKVCache(engine.cfg, planned, engine.blocks.block_size, engine.dtype, engine.device)
    engine.blocks = BlockManager(planned, engine.blocks.block_size, prefix_caching=True)
    engine.decoder = GraphDecoder(engine)
    assert engine.blocks.num_free == 28
    sessions = [engine.blocks.allocate(per_session) for _ in range(engine.config.max_batch_size)]
    assert engine.decoder.scratch_block not in {b for blocks in sessions for b in blocks}


def test_padded_step_matches_eager_decode_on_cpu(checkpoint, tmp_path):
    """GraphDecoder's padded step (run eagerly on CPU) gives the engine's eager decode logits, and
    its scratch block never reaches a sequence."""
    from lmc.runtime.cuda_graph import GraphDecoder

    ws = _workspace(checkpoint, tmp_path)
    eager = _greedy_logits(_engine(ws, "cpu"), PROMPTS)
    engine = _engine(ws, "cpu")
    blocks = engine.blocks.num_blocks
    engine.decoder = GraphDecoder(engine)
    assert engine.blocks.num_blocks == blocks - 1 == engine.blocks.num_free
    handed = engine.blocks.allocate(engine.blocks.num_free)
    assert engine.decoder.scratch_block not in handed
    engine.blocks.release(handed)
    calls = []
    step = engine.decoder.step
    engine.decoder.step = lambda seqs: (calls.append(len(seqs)), step(seqs))[1]
    padded = _greedy_logits(engine, PROMPTS)  # 3 sequences in the bucket of 4
    assert calls and max(calls) == 3
    assert padded[0] == eager[0] and _same_prefix_rel(padded, eager) <= 1e-5
    assert all(t.shape == (STEPS, 416) for t in padded[1])


def _pipelined_case(engine_factory):
    """Greedy generation that exercises the pipelined decode: 6 prompts over a batch of 4 (admission after a
    finish), different max_new_tokens (finishes on different steps), a stop word that cuts one sequence, and
    one sampled sequence (which turns pipelining off while it runs). Returns (pipelined, plain, ahead calls)."""
    from lmc.runtime.sampling import GenerationConfig

    prompts = PROMPTS + [[9, 9, 9], list(range(100, 117)), [1]]
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (7, 12, 3, 9, 15, 6)]
    plain = engine_factory(False)
    first = plain.generate(prompts, gens)
    stop = first[1].text[len(first[1].text) // 2:][:3]  # cuts prompt 1's text half way (or earlier)
    assert stop
    gens[1] = GenerationConfig(max_new_tokens=12, ignore_eos=True, stop_words=[stop])
    gens[4] = GenerationConfig(max_new_tokens=15, do_sample=True, temperature=0.7, top_k=5, random_seed=3, ignore_eos=True)
    expected = plain.generate(prompts, gens)
    pipelined = engine_factory(True)
    calls = []
    real = pipelined.decoder.launch_greedy
    pipelined.decoder.launch_greedy = lambda seqs, ids=None: (calls.append((len(seqs), ids is not None)), real(seqs, ids))[1]
    got = pipelined.generate(prompts, gens)
    assert _all_free(pipelined) and _all_free(plain)
    return got, expected, calls


def _all_free(engine) -> bool:
    return engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished_requests()


def test_pipelined_greedy_decode_gives_the_plain_decodes_results(checkpoint, tmp_path):
    """CPU, GraphDecoder's padded step run eagerly: launching step n + 1 before step n's tokens are read gives
    the same tokens, texts and finish reasons as one synchronous step at a time."""
    from lmc.runtime.cuda_graph import GraphDecoder

    ws = _workspace(checkpoint, tmp_path)

    def factory(pipelined: bool):
        engine = _engine(ws, "cpu")
        if pipelined:
            engine.decoder = GraphDecoder(engine)
        return engine

    got, expected, calls = _pipelined_case(factory)
    assert (4, True) in calls  # steps were launched ahead, with a full batch
    assert [(r.token_ids, r.text, r.finish_reason) for r in got] == \
        [(r.token_ids, r.text, r.finish_reason) for r in expected]
    assert expected[1].finish_reason == "stop" and len(expected[1].token_ids) < 12
    assert [len(r.token_ids) for r in expected if r.index != 1] == [7, 3, 9, 15, 6]


@gpu
@needs_cuda
def test_pipelined_greedy_decode_on_gpu(checkpoint, tmp_path):
    """CUDA graphs: the pipelined decode gives the eager engine's tokens."""
    ws = _workspace(checkpoint, tmp_path)
    got, expected, calls = _pipelined_case(lambda pipelined: _engine(ws, "cuda", cuda_graph=pipelined))
    assert any(ahead for _, ahead in calls)
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in expected]


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [3, 4])
def test_graph_decode_equals_eager_on_gpu(checkpoint, tmp_path, batch):
    """fp32: graph replays give the eager decode's logits (to fp32 rounding) and the same greedy tokens."""
    ws = _workspace(checkpoint, tmp_path)
    prompts = (PROMPTS + [list(range(60, 77))])[:batch]
    eager_engine = _engine(ws, "cuda", cuda_graph=False)
    graph_engine = _engine(ws, "cuda")
    assert eager_engine.decoder is None and graph_engine.decoder is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = _greedy_logits(graph_engine, prompts)
    assert not [w for w in caught if "lmc:" in str(w.message)]  # a failed capture warns and falls back
    assert sorted(graph_engine.decoder.graphs) == [4]
    eager = _greedy_logits(eager_engine, prompts)
    assert graph[0] == eager[0] and _same_prefix_rel(graph, eager) <= 1e-4
    assert sorted(graph_engine.decoder.graphs) == [4]  # all sequences run to the end together


@gpu
@needs_cuda
def test_graph_decode_fp16_close_to_eager(checkpoint, tmp_path):
    ws = _workspace(checkpoint, tmp_path, "float16")
    graph_engine = _engine(ws, "cuda")
    graph = _greedy_logits(graph_engine, PROMPTS)
    eager = _greedy_logits(_engine(ws, "cuda", cuda_graph=False), PROMPTS)
    assert graph_engine.decoder.graphs and _same_prefix_rel(graph, eager) <= 1e-2


@gpu
@needs_cuda
def test_failed_capture_warns_and_decodes_eagerly(checkpoint, tmp_path, monkeypatch):
    from lmc.runtime.cuda_graph import GraphDecoder

    def broken(self, bucket):
        raise RuntimeError("capture refused\nsecond line")

    monkeypatch.setattr(GraphDecoder, "_capture", broken)
    ws = _workspace(checkpoint, tmp_path)
    engine = _engine(ws, "cuda")
    with pytest.warns(UserWarning, match=r"capture failed for batch 4 \(RuntimeError: capture refused\); decoding eagerly"):
        fallback = _greedy_logits(engine, PROMPTS, 5)
    assert not engine.decoder.enabled and not engine.decoder.graphs
    eager = _greedy_logits(_engine(ws, "cuda", cuda_graph=False), PROMPTS, 5)
    assert fallback[0] == eager[0] and _same_prefix_rel(fallback, eager) <= 1e-4


@gpu
@needs_cuda
def test_pdl_decode_equals_decode_without_it(checkpoint, tmp_path, monkeypatch):
    """int4 fp16 workspace, graph decode: programmatic dependent launch (every Triton kernel waits for the one
    before it, the GEMV loads weights before that wait) gives bit-identical logits to plain launches; a kernel
    reading its input before the previous kernel finished would not."""
    from lmc.compiler.quantize import QuantizeOptions, quantize
    from lmc.kernels import pdl

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90")
    ws = tmp_path / "int4"
    quantize(checkpoint("llama3"), ws, QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True,
                                                       dtype="float16", device="cpu"), say=lambda *_: None)
    logits = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LMC_PDL", flag)
        monkeypatch.setattr(pdl, "_ENABLED", {})
        assert pdl.pdl_enabled(torch.device("cuda")) == (flag == "1")
        engine = _engine(ws, "cuda")
        logits[flag] = _greedy_logits(engine, PROMPTS)
        assert engine.decoder.graphs
    assert logits["1"][0] == logits["0"][0]
    assert all(torch.equal(a, b) for a, b in zip(logits["1"][1], logits["0"][1]))


def test_pipelined_decode_lets_waiting_requests_in(checkpoint, tmp_path):
    """With steps launched ahead (GraphDecoder's padded step, eager on CPU), a request that arrives while one
    decodes still joins within prefill_interval steps: steps run ahead count towards the interval (an H200 run
    where they did not kept 16 concurrent clients at one running sequence)."""
    from lmc.runtime.cuda_graph import GraphDecoder
    from lmc.runtime.sampling import GenerationConfig

    engine = _engine(_workspace(checkpoint, tmp_path), "cpu", prefill_interval=6)
    engine.decoder = GraphDecoder(engine)
    first = engine.add_request([5, 6, 7], GenerationConfig(max_new_tokens=40, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None  # decoding runs ahead
    late = engine.add_request([8, 9], GenerationConfig(max_new_tokens=3, ignore_eos=True))
    running = []
    for _ in range(9):
        engine.step()
        running.append(engine.stats().running)
    assert 2 in running
    assert len(late.result().token_ids) == 3 and len(first.result().token_ids) == 40
