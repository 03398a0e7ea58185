"""The engine's warm-up (runtime/warmup.py): which forwards it runs, that it touches no sequence's KV blocks
and changes no output (CPU), and, on a GPU, that a served load after it compiles no kernel.

GPU test: TRITON_INTERPRET=0 pytest -m gpu tests/test_warmup.py
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from lmc.compiler.convert import convert

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and TRITON_INTERPRET=0 (run: TRITON_INTERPRET=0 pytest -m gpu)")


def test_token_counts_meet_every_power_of_two_class_both_ways():
    from lmc.runtime.warmup import warmup_batch, warmup_token_counts

    assert warmup_token_counts(40) == [1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 39, 40]
    assert warmup_token_counts(1) == [1]
    counts = warmup_token_counts(8192)
    for c in (1, 2, 4, 8, 16, 64, 128, 256, 2048):  # the H200 table's M classes
        assert c in counts and (c == 1 or c - 1 in counts)
    assert max(counts) == 8192 and 8191 in counts
    assert warmup_batch(1, 8, 100) == [1] and warmup_batch(3, 8, 100) == [2, 1]
    assert warmup_batch(8, 8, 100) == [4, 1, 1, 1, 1]
    assert warmup_batch(8192, 256, 8192) == [8192 - 255] + [1] * 255
    assert warmup_batch(8192, 256, 1024) == [993] * 8 + [1] * 248  # chunks no longer than a session
    assert warmup_batch(40, 4, 10) == [10, 10, 10, 10]
    for max_len in (1024, 8192):
        for t in counts:
            rows = warmup_batch(t, 256, max_len)
            assert sum(rows) == t and len(rows) <= 256 and max(rows) <= max_len and rows == sorted(rows, reverse=True)
            if max_len == 8192:
                assert rows.count(1) - (rows[0] == 1) == min(t // 2, 255)  # about half the tokens are one-token rows


def _engine(ws, **kw):
    from lmc.runtime.config import EngineConfig
    from lmc.runtime.engine import Engine

    base = dict(device="cpu", cache_block_seq_len=8, session_len=96, max_batch_size=6, max_prefill_token_num=40)
    return Engine(str(ws), EngineConfig(**{**base, **kw}))


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(5, 400) for _ in range(n)] for n in (1, 9, 17, 33, 50)]


def _greedy(engine) -> list[list[int]]:
    from lmc.runtime.sampling import GenerationConfig

    return [r.token_ids for r in engine.generate(_prompts(), GenerationConfig(max_new_tokens=12, ignore_eos=True))]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer_dir):
    from conftest import make_checkpoint

    root = tmp_path_factory.mktemp("warmup")
    convert(make_checkpoint("llama3", root / "ckpt", tokenizer_dir), root / "ws")  # odd shapes, GQA
    return root / "ws"


@pytest.mark.parametrize("graph_decoder", [False, True])
def test_warmup_touches_no_sequence_block_and_changes_no_output(ws, graph_decoder):
    """Warm up an engine that already holds a sequence's KV blocks (written by a generate): every block but the
    scratch one keeps its bytes, the free list is whole again, and greedy tokens equal a cold engine's. Without
    a graph decoder (CPU) the scratch block is borrowed and given back; with one (run eagerly on CPU) it is the
    decoder's, and its padded bucket steps run too."""
    from lmc.runtime.cuda_graph import GraphDecoder
    from lmc.runtime.kv_cache import decode_table_width
    from lmc.runtime.warmup import warm_up

    expected = _greedy(_engine(ws))
    engine = _engine(ws)
    if graph_decoder:
        engine.decoder = GraphDecoder(engine)
    assert _greedy(engine) == expected  # fills (and frees) real blocks; prefix caching keeps them evictable
    before = [(k.clone(), v.clone()) for k, v in zip(engine.cache.k, engine.cache.v)]
    free = engine.blocks.num_free
    calls, borrowed = [], []
    forward, allocate = engine.ragged_forward, engine.blocks.allocate
    widths = []  # block-table columns of every decode forward (cu None)
    engine.ragged_forward = lambda ids, *a, **kw: (calls.append(int(ids.numel())),
                                                   a[4] is None and widths.append(a[2].shape[1]),
                                                   forward(ids, *a, **kw))[-1]
    engine.blocks.allocate = lambda n: (borrowed.extend(got := allocate(n)), got)[1]
    report = warm_up(engine)
    engine.blocks.allocate = allocate
    # the mixed forwards, then (no graphs on a CPU) an eager decode forward at every row count up to max_batch_size
    assert calls == [1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 39, 40] + [1, 2, 3, 4, 5, 6] and report["forwards"] == 18
    assert report["graphs"] == 0
    if graph_decoder:
        scratch = engine.decoder.scratch_block
        for b in engine.decoder.buckets:  # on CPU the padded steps run eagerly; warm them explicitly
            engine.decoder.warm(b)
    else:
        assert len(borrowed) == 1
        scratch = borrowed[0]
    assert engine.blocks.num_free == free
    changed = set()  # compared as bytes: never-written blocks may hold NaNs
    for (k0, v0), k1, v1 in zip(before, engine.cache.k, engine.cache.v):
        for b in range(k0.shape[0]):
            if not all(torch.equal(a[b].view(torch.uint8), c[b].view(torch.uint8)) for a, c in ((k0, k1), (v0, v1))):
                changed.add(b)
    assert changed == {scratch}, (changed, scratch)  # the warm-up wrote there, and only there
    warm_decodes = len(widths)
    assert _greedy(engine) == expected and (graph_decoder or len(widths) > warm_decodes)
    # every decode table, the warm-up's and (without a graph decoder) the engine's own eager steps', as wide as a graph's: the decode
    # attention's split count (a compile-time constant) then follows the rows alone
    assert set(widths) == {decode_table_width(engine.session_len, engine.blocks.block_size)}, widths
    engine.close()  # gives the frozen heap back (device.thaw_heap)


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_warmup_leaves_a_quantized_kv_cache_engines_output_unchanged(ws, quant_policy):
    from lmc.runtime.warmup import warm_up

    expected = _greedy(_engine(ws, quant_policy=quant_policy))
    engine = _engine(ws, quant_policy=quant_policy)
    warm_up(engine)
    assert _greedy(engine) == expected and engine.blocks.num_free == engine.blocks.num_blocks
    engine.close()


def test_warmup_runs_on_every_tensor_parallel_rank(checkpoint, tmp_path):
    """tp = 2 on the CPU (gloo): the warm-up's forwards are announced to the follower like the engine's own (a
    rank left out would hang the all-reduces), and the greedy tokens after it are tp = 1's."""
    from lmc.runtime.warmup import warm_up

    ckpt = checkpoint("llama3")
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    expected = _greedy(_engine(tmp_path / "tp1"))
    engine = _engine(tmp_path / "tp2", threads=1, cpu_cache_budget_gb=0.05)
    try:
        assert warm_up(engine)["forwards"] == 12 + 6
        assert _greedy(engine) == expected
    finally:
        engine.close()


def test_bench_refuses_no_warmup_against_a_url():
    from click.testing import CliRunner

    from lmc.cli import main

    result = CliRunner().invoke(main, ["bench", "http://127.0.0.1:9", "--no-warmup"])
    assert result.exit_code == 2 and "--warmup sets up a local engine" in result.output


@gpu
@needs_cuda
def test_no_kernel_compiles_after_warmup_on_gpu(checkpoint, tmp_path):
    """After warm_up, greedy generation of prompts of many lengths together (mixed steps of odd sizes, decode
    buckets, chunked prefill) compiles no Triton kernel, fp16 and int4 (the int4 kernels' M classes), and int4
    without CUDA graphs (eager decode steps)."""
    from triton import knobs

    from lmc.compiler.quantize import QuantizeOptions, quantize
    from lmc.runtime.sampling import GenerationConfig

    src = checkpoint("llama3", dtype=torch.float16)
    fp16, int4 = tmp_path / "fp16", tmp_path / "int4"
    convert(src, fp16, dtype="float16")
    quantize(src, int4, QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True, dtype="float16", device="cpu"),
             say=lambda *_: None)
    rng = random.Random(7)
    prompts = [[rng.randrange(5, 400) for _ in range(rng.randrange(1, 90))] for _ in range(37)]
    gens = [GenerationConfig(max_new_tokens=rng.randrange(1, 30), ignore_eos=True) for _ in prompts]
    for ws, eager in ((fp16, False), (int4, False), (int4, True)):  # eager: decode steps without CUDA graphs
        engine = _engine(ws, device="cuda", session_len=160, max_batch_size=16, max_prefill_token_num=96,
                         eager_mode=eager)
        assert engine.warmup()["graphs"] == (0 if eager else 5)
        compiled = []
        knobs.runtime.jit_cache_hook = lambda *, repr, **_: compiled.append(repr) and False
        try:
            engine.generate(prompts, gens)
        finally:
            knobs.runtime.jit_cache_hook = None
            engine.close()
        assert compiled == [], f"{ws.name} (eager {eager}): {len(compiled)} kernels compiled after the warm-up: " \
                               f"{compiled[:2]}"


def test_warmup_freezes_the_start_up_heap_and_close_gives_it_back(ws):
    """After the warm-up a full collection no longer walks the start-up heap (device.freeze_heap: the objects sit
    in the permanent generation, which gc.get_objects() leaves out), and the engine still generates; close()
    gives the heap back to the collector."""
    import gc

    from lmc.runtime.warmup import warm_up

    engine = _engine(ws)
    expected = _greedy(_engine(ws))
    tracked = len(gc.get_objects())
    try:
        warm_up(engine)
        assert engine.froze_heap and gc.get_freeze_count() >= tracked * 0.9
        assert len(gc.get_objects()) < tracked * 0.05  # what a collection would walk now
        assert _greedy(engine) == expected
    finally:
        engine.close()
    assert not engine.froze_heap and gc.get_freeze_count() == 0


def test_a_follower_freezes_its_heap_when_rank_0_says_the_warm_up_is_over():
    """tp > 1: the warm-up's last announcement (FREEZE) makes each follower freeze its heap too, the kernels it
    compiled for the warm-up's forwards included; the follower then goes on to the next message."""
    import gc
    from types import SimpleNamespace

    from lmc.runtime.device import thaw_heap
    from lmc.runtime.distributed import FREEZE, STOP, follow

    messages = iter([([FREEZE] + [0] * 7, None), ([STOP] + [0] * 7, None)])
    shard = SimpleNamespace(receive=lambda: next(messages))
    assert gc.get_freeze_count() == 0
    try:
        follow(shard, SimpleNamespace(device=torch.device("cpu")), None, None)
        assert gc.get_freeze_count() > 0 and next(messages, None) is None  # froze, then read STOP and returned
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0


def test_closing_one_engine_keeps_another_engines_heap_frozen(ws):
    """gc.unfreeze is process-wide: with two warmed-up engines in one process, closing the first leaves the heap
    frozen for the second (device.freeze_heap counts its holders); closing the last gives it back."""
    import gc

    from lmc.runtime.warmup import warm_up

    first, second = _engine(ws), _engine(ws)
    try:
        warm_up(first)
        warm_up(second)
        first.close()
        assert gc.get_freeze_count() > 0 and second.froze_heap
        tracked = len(gc.get_objects())
        gc.collect()
        assert len(gc.get_objects()) <= tracked + 1000  # the start-up heap is still out of the collector's walk
    finally:
        first.close()
        second.close()
    assert gc.get_freeze_count() == 0
