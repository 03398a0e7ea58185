"""The serving engine through its public API: scheduling (growth, preemption, chunked prefill, FIFO),
prefix caching, aborts, streaming, sampling options, and the CPU thread choice."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer_dir):
    from conftest import make_checkpoint

    root = tmp_path_factory.mktemp("engine")
    convert(make_checkpoint("llama3", root / "ckpt", tokenizer_dir), root / "ws")  # odd shapes, GQA
    return root / "ws"


def _engine(ws, **kw) -> Engine:
    base = dict(device="cpu", cache_block_seq_len=8, session_len=160, max_batch_size=8)
    return Engine(str(ws), EngineConfig(**{**base, **kw}))


def _prompts(n: int, seed: int, shared: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(shared or []) + [rng.randrange(5, 400) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


GREEDY = GenerationConfig(max_new_tokens=24, ignore_eos=True)


def _all_free(engine: Engine) -> bool:
    return engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished_requests()


def _tight_cache(ws, blocks: int, **kw) -> Engine:
    """An engine whose KV cache holds exactly `blocks` blocks of 8 tokens."""
    probe = _engine(ws)
    per_block = probe.cache.k[0].nbytes // probe.blocks.num_blocks * 2 * len(probe.cache.k)
    return _engine(ws, cache_max_entry_count=1.0, cpu_cache_budget_gb=blocks * per_block / 1024**3, **kw)


def test_preemption_leaves_greedy_output_unchanged(ws):
    prompts = _prompts(10, seed=1)
    roomy = _engine(ws).generate(prompts, GREEDY)
    tight = _tight_cache(ws, 14)
    assert tight.blocks.num_blocks == 14  # far less than 8 running sequences of up to 64 tokens need
    got = tight.generate(prompts, GREEDY)
    assert tight.scheduler.preemptions > 0
    assert [(r.token_ids, r.text, r.finish_reason) for r in got] == [(r.token_ids, r.text, r.finish_reason) for r in roomy]
    assert _all_free(tight)


def test_seeded_sampling_survives_preemption(ws):
    prompts = _prompts(6, seed=2)
    gens = [GenerationConfig(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=20, top_p=0.9,
                             random_seed=i, ignore_eos=True) for i in range(6)]
    roomy = _engine(ws).generate(prompts, gens)
    tight = _tight_cache(ws, 10)
    got = tight.generate(prompts, gens)
    assert tight.scheduler.preemptions > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in roomy]


def test_chunked_prefill_equals_unchunked(ws):
    prompts = _prompts(6, seed=3) + [list(range(10, 110))]  # one long prompt among short ones
    whole = _engine(ws).generate(prompts, GREEDY)
    chunks = []
    engine = _engine(ws, max_prefill_token_num=7)
    real = engine.scheduler.schedule

    def spy():
        batch = real()
        if batch is not None:
            chunks.append(sum(batch.num_new))
        return batch

    engine.scheduler.schedule = spy
    got = engine.generate(prompts, GREEDY)
    assert max(chunks) == 7 and len(chunks) > 100 // 7
    assert [r.token_ids for r in got] == [r.token_ids for r in whole]


def test_long_prompt_does_not_stall_running_decodes(ws):
    """A long prompt is prefilled in chunks while the running sequences keep decoding every step."""
    engine = _engine(ws, max_prefill_token_num=16, prefill_interval=1)
    short = engine.add_request([5, 6, 7], GenerationConfig(max_new_tokens=40, ignore_eos=True))
    engine.step()  # the short prompt is prefilled and running
    long = engine.add_request(list(range(10, 130)), GenerationConfig(max_new_tokens=2, ignore_eos=True))
    seen = []
    for _ in range(8):  # 120 prompt tokens in chunks of <= 15 beside one decode token
        engine.step()
        seen.append(engine.stats().running)
    assert len(short.result().token_ids) == 40 and len(long.result().token_ids) == 2
    assert seen[0] == 2


def test_waiting_requests_join_every_prefill_interval_steps(ws):
    """While sequences decode, a new request waits for the next admission step (so most steps stay pure decode
    steps, which run as CUDA graphs); with nothing running it starts at once."""
    engine = _engine(ws, prefill_interval=4)
    first = engine.add_request([5, 6, 7], GenerationConfig(max_new_tokens=30, ignore_eos=True))
    engine.step()
    assert engine.stats().running == 1  # admitted at once: nothing was running
    engine.step()
    late = engine.add_request([8, 9], GenerationConfig(max_new_tokens=5, ignore_eos=True))
    running = []
    for _ in range(4):
        engine.step()
        running.append(engine.stats().running)
    assert running[0] == 1 and 2 in running  # joined within prefill_interval steps, not at the first
    assert len(late.result().token_ids) == 5 and len(first.result().token_ids) == 30


def test_prefix_caching_on_equals_off_and_hits(ws):
    shared = list(range(50, 90))  # 40 tokens: 5 full blocks shared by every prompt
    prompts = _prompts(8, seed=4, shared=shared)
    off = _engine(ws, enable_prefix_caching=False).generate(prompts, GREEDY)
    engine = _engine(ws, max_batch_size=2)
    on = engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert engine.stats().prefix_cache_hit_rate > 0.4
    assert _all_free(engine)  # cached blocks count as free (evictable)
    # a repeat of a finished request's prompt reuses its blocks
    before = engine.blocks.hit_tokens
    again = engine.generate([prompts[0]], GREEDY)
    assert engine.blocks.hit_tokens - before >= len(shared) and again[0].token_ids == on[0].token_ids


def test_prefix_cache_evicts_lru_when_full(ws):
    engine = _tight_cache(ws, 12)
    for seed in range(30):  # far more distinct prompts than cached blocks
        engine.generate(_prompts(2, seed=100 + seed), GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert _all_free(engine) and len(engine.blocks.block_of) <= engine.blocks.num_blocks


def test_abort_frees_blocks_at_once(ws):
    engine = _engine(ws)
    handle = engine.add_request(list(range(5, 45)), GenerationConfig(max_new_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    handle.abort()
    assert engine.blocks.num_used == 0  # the engine was idle: applied immediately, not at the next step
    outs = list(handle)
    assert outs[-1].finish_reason == "abort" and len([t for o in outs for t in o.token_ids]) == 3


def test_thousand_random_requests_leave_every_block_free(ws):
    engine = _engine(ws, max_batch_size=32, max_prefill_token_num=64)
    rng = random.Random(5)
    handles = []
    for i in range(1000):
        prompt = [rng.randrange(5, 400) for _ in range(rng.randrange(1, 30))]
        gen = GenerationConfig(max_new_tokens=rng.randrange(1, 6), ignore_eos=True)
        handles.append(engine.add_request(prompt, gen))
        if i % 50 == 0:
            engine.step()  # arrivals interleaved with steps
        if i % 97 == 0:
            handles[-1].abort()
    results = [h.result() for h in handles]
    assert sum(r.finish_reason == "abort" for r in results) == 11
    assert all(r.finish_reason == "length" for r in results if r.finish_reason != "abort")
    assert _all_free(engine) and engine.stats().finished_requests == 1000


def test_requests_added_while_others_run_on_a_background_loop(ws):
    prompts = _prompts(6, seed=6)
    alone = [_engine(ws).generate([p], GREEDY)[0].token_ids for p in prompts]
    engine = _engine(ws, max_batch_size=4)
    engine.start()
    try:
        results = [None] * len(prompts)

        def client(i):
            results[i] = engine.add_request(prompts[i], GREEDY).result().token_ids

        threads = []
        for i in range(len(prompts)):
            threads.append(threading.Thread(target=client, args=(i,)))
            threads[-1].start()
        for t in threads:
            t.join(timeout=120)
        assert results == alone
    finally:
        engine.stop()
    assert _all_free(engine)


def test_stream_stopped_early_aborts_the_rest(ws):
    engine = _engine(ws)
    threads = threading.active_count()
    stream = engine.stream([[5, 6, 7], [8, 9]], [GenerationConfig(max_new_tokens=50, ignore_eos=True)] * 2)
    for _ in range(3):
        next(stream)
    assert engine.blocks.num_used > 0
    stream.close()
    assert _all_free(engine) and threading.active_count() == threads  # nothing left generating


def test_generation_options(ws):
    engine = _engine(ws)
    free = engine.generate([[5, 6, 7]], GREEDY)[0]
    eos = free.token_ids[3]
    engine.eos_ids = {eos}
    # min_new_tokens bans EOS until reached; stop_token_ids stop; logprobs of the model's distribution
    r = engine.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=24, min_new_tokens=10))[0]
    assert eos not in r.token_ids[:10]
    stop = free.token_ids[5]
    r = engine.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop]))[0]
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[:6]
    r = engine.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=4, ignore_eos=True, logprobs=3,
                                                     output_logits="generation"))[0]
    for lp, logits in zip(r.logprobs, r.logits):
        ref = torch.log_softmax(logits, -1)
        assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-5 and lp.token_id == int(ref.argmax())
        assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    banned = engine.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=8, ignore_eos=True,
                                                          bad_token_ids=[free.token_ids[0]]))[0]
    assert banned.token_ids[0] != free.token_ids[0]
    with pytest.raises(LmcError, match="2 prompts but 1 generation configs"):
        engine.generate([[5], [6]], [GREEDY])
    for bad in (dict(top_p=0), dict(temperature=-1), dict(max_new_tokens=0), dict(min_p=2), dict(logprobs=50)):
        with pytest.raises(LmcError, match="GenerationConfig"):
            engine.add_request([5], GenerationConfig(**bad))


def test_engine_config_errors_name_the_cause(ws):
    with pytest.raises(LmcError, match="max_batch_size must be a positive integer"):
        _engine(ws, max_batch_size=0)
    with pytest.raises(LmcError, match="max_prefill_token_num"):
        _engine(ws, max_prefill_token_num=0)


def test_cpu_threads_follow_the_load(monkeypatch):
    from lmc.runtime import device

    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(device.os, "getloadavg", lambda: (0.4, 0, 0))
    assert device.default_threads() == 4
    monkeypatch.setattr(device.os, "getloadavg", lambda: (2.7, 0, 0))
    assert device.default_threads() == 2
    monkeypatch.setattr(device.os, "getloadavg", lambda: (9.0, 0, 0))
    assert device.default_threads() == 1


def test_int4_on_cpu_is_dequantized_once_with_the_same_logits(checkpoint, tmp_path, monkeypatch):
    from lmc.compiler.quantize import QuantizeOptions, quantize
    from lmc.runtime import model as model_mod

    quantize(checkpoint("llama3"), tmp_path / "q", QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True,
                                                                    device="cpu"), say=lambda *_: None)
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True, output_logits="generation")
    dense = _engine(tmp_path / "q")
    assert dense.model.dense_int4 and not isinstance(dense.model.layers[0]["w13"], model_mod.Int4Weight)
    monkeypatch.setattr(model_mod, "host_available", lambda: 0)  # no room: int4 kept, dequantized per call
    packed = _engine(tmp_path / "q")
    assert isinstance(packed.model.layers[0]["w13"], model_mod.Int4Weight)
    a, b = dense.generate([[5, 6, 7, 8]], gen)[0], packed.generate([[5, 6, 7, 8]], gen)[0]
    assert a.token_ids == b.token_ids
    assert float((a.logits - b.logits).abs().max() / b.logits.abs().max()) < 1e-5


def test_a_failing_step_ends_every_request_and_says_why(ws):
    engine = _engine(ws)
    engine.start()
    try:
        ok = engine.add_request([5, 6, 7], GenerationConfig(max_new_tokens=3, ignore_eos=True)).result()
        assert ok.finish_reason == "length" and engine.healthy

        def broken(*args):
            raise RuntimeError("device lost")

        engine.model.hidden = broken
        handles = [engine.add_request([5, 6, 7], GenerationConfig(max_new_tokens=30, ignore_eos=True)) for _ in range(3)]
        results = [h.result() for h in handles]  # ends, instead of waiting forever on a dead loop
        assert [r.finish_reason for r in results] == ["error"] * 3
        assert not engine.healthy and "device lost" in engine.failed
        with pytest.raises(LmcError, match="engine stopped after an error"):
            engine.add_request([5], GREEDY)
    finally:
        engine.stop()


def test_ragged_inputs_equal_a_loop_over_tokens():
    """The step's host inputs built with numpy equal the per-token loop they replaced: chunks after a cached
    prefix, fresh prompts, one-token rows, sequences across block boundaries, and a decode step."""
    from types import SimpleNamespace

    from lmc.runtime.engine import ragged_inputs

    rng = random.Random(11)
    bs = 16
    for decode in (False, True):
        seqs, num_new, pool = [], [], rng.sample(range(500), 500)
        for _ in range(rng.randrange(1, 40)):
            length = rng.randrange(1, 200)
            n = 1 if decode else rng.randrange(1, length + 1)
            blocks, pool = pool[:-(-length // bs)], pool[-(-length // bs):]
            seqs.append(SimpleNamespace(tokens=[rng.randrange(1000) for _ in range(length)], num_computed=length - n,
                                        blocks=blocks))
            num_new.append(n)
        least = 17 if decode else 0  # a decode step's table is padded to a fixed width (kv_cache.decode_table_width)
        ids, positions, slots, tables, kv_lens, cu, ends = ragged_inputs(seqs, num_new, bs, decode, least)
        want_ids, want_pos, want_slots, want_ends = [], [], [], []
        for s, n in zip(seqs, num_new):
            for p in range(s.num_computed, s.num_computed + n):
                want_ids.append(s.tokens[p])
                want_pos.append(p)
                want_slots.append(s.blocks[p // bs] * bs + p % bs)
            want_ends.append(len(want_ids))
        width = max(least, *(len(s.blocks) for s in seqs))
        assert ids == want_ids and positions.tolist() == want_pos and slots.tolist() == want_slots
        assert positions.dtype == slots.dtype == torch.int64 and tables.dtype == kv_lens.dtype == torch.int32
        assert tables.tolist() == [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        assert kv_lens.tolist() == [s.num_computed + n for s, n in zip(seqs, num_new)] and ends == want_ends
        assert cu is None if decode else (cu.dtype == torch.int32 and cu.tolist() == [0] + want_ends)
