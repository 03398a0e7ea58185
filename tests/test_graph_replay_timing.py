"""bench_decode.time_graph_replays (the decode step's CUDA graph timed alone, for table A/Bs) and tune_in_step's
--measure graph: refused where no graph can be timed; on a GPU the replays leave the engine's later output
unchanged."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmc.compiler.convert import convert

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("extra", [["--tp", "2"], ["--smoke"]])
def test_tune_in_step_refuses_graph_timing_where_bench_tp_has_no_graph(tmp_path, extra):
    run = subprocess.run([sys.executable, str(BENCH / "tune_in_step.py"), "--variants",
                          str(BENCH / "variants_m16_h200.json"), "--out", str(tmp_path / "o.json"),
                          "--measure", "graph", *extra], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--measure graph" in run.stderr
    assert not (tmp_path / "o.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
def test_graph_replays_time_the_bucket_and_leave_later_output_unchanged(checkpoint, tmp_path):
    sys.path.insert(0, str(BENCH))
    import bench_decode

    from lmc.runtime.config import EngineConfig
    from lmc.runtime.engine import Engine
    from lmc.runtime.sampling import GenerationConfig

    ws = tmp_path / "ws"
    convert(checkpoint("llama3", dtype=torch.float16), ws, dtype="float16")
    prompts = [[5, 9, 13], [7, 11, 2, 8, 4]]
    greedy = GenerationConfig(max_new_tokens=8, ignore_eos=True)

    def engine():
        return Engine(str(ws), EngineConfig(device="cuda", session_len=128, max_batch_size=4))

    fresh = engine()
    try:
        want = [r.token_ids for r in fresh.generate(prompts, greedy)]
    finally:
        fresh.close()
    timed = engine()
    try:
        got = bench_decode.time_graph_replays(timed, 3, 40, 100, replays=20, chunks=4)
        assert got is not None and got["ms"] > 0 and len(got["chunks_ms"]) == 4
        assert timed.stats().running == 0 and timed.stats().waiting == 0  # the timing's sequences are gone
        assert [r.token_ids for r in timed.generate(prompts, greedy)] == want
    finally:
        timed.close()
