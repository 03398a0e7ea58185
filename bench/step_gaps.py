"""Where an engine decode step's time goes, outside the kernels: the host's own work per step, and the GPU's
time around the step's CUDA graph (the input copies, the argmax, the token copy back, idle gaps).

Why: the step's graph replayed alone (bench_decode.time_graph_replays) is what the table A/Bs time; an engine
step also copies its inputs in, takes the argmax, copies the tokens out and runs Python (scheduling, detokenizing,
streaming), overlapped with the GPU by the pipelined greedy step (Engine._pipelined_step). This says how much of
that shows: per step, CUDA events recorded on the stream around each part give the GPU's timeline, and the time the
host spends waiting for the tokens gives its own share (wall minus wait).

    python bench/step_gaps.py [--batches 1,16,64] [--work /tmp/w] [--out bench/results/step_gaps.json]

CUDA only: it builds (or reuses) the 8B-shaped int4 workspace under --work, as bench_tp.py does. It instruments
by wrapping GraphDecoder.replay_rows / _graph and GreedyStep (nothing in the runtime changes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

PARTS = ("copies_to_graph", "graph", "argmax", "d2h", "idle_before", "period")
MARKS = ("start", "graph_start", "graph_end", "argmax_end", "d2h_end")  # in stream order within a step


def split_steps(steps: list[dict]) -> dict[str, list[float]]:
    """ms of each part of each step after the first, from per-step marks {name: event} (anything with CUDA
    events' elapsed_time(other) -> ms): copies_to_graph = start -> graph_start (the input copies), graph,
    argmax, d2h (the token copy), idle_before = the previous step's d2h_end -> this start, period = start ->
    start."""
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    for prev, m in zip(steps, steps[1:]):
        for part, (a, b) in zip(PARTS, ((m["start"], m["graph_start"]), (m["graph_start"], m["graph_end"]),
                                        (m["graph_end"], m["argmax_end"]), (m["argmax_end"], m["d2h_end"]),
                                        (prev["d2h_end"], m["start"]), (prev["start"], m["start"]))):
            parts[part].append(a.elapsed_time(b))
    return parts


class StepMarks:
    """Records CUDA events around the parts of each greedy graph step while installed."""

    def __init__(self):
        from lmc.runtime import cuda_graph

        self.cg = cuda_graph
        self.steps: list[dict] = []
        self.waits_ms: list[float] = []  # the host's wait in GreedyStep.tokens, a step each
        self._saved = {}

    @staticmethod
    def _event() -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def install(self) -> None:
        gd, gs = self.cg.GraphDecoder, self.cg.GreedyStep
        self._saved = {"replay_rows": gd.replay_rows, "_graph": gd._graph, "init": gs.__init__, "tokens": gs.tokens}
        saved, marks = self._saved, self

        def replay_rows(dec, bucket, b, rows, ids):
            marks.steps.append({"start": marks._event()})
            out = saved["replay_rows"](dec, bucket, b, rows, ids)
            marks.steps[-1]["graph_end"] = marks._event()
            return out

        def _graph(dec, bucket):
            captured = saved["_graph"](dec, bucket)
            if captured is not None and marks.steps:
                marks.steps[-1]["graph_start"] = marks._event()
            return captured

        def init(step, ids):
            m = marks.steps[-1] if marks.steps else {}
            m.setdefault("argmax_end", marks._event())
            saved["init"](step, ids)
            m.setdefault("d2h_end", marks._event())

        def tokens(step):
            t = time.perf_counter()
            out = saved["tokens"](step)
            marks.waits_ms.append((time.perf_counter() - t) * 1e3)
            return out

        gd.replay_rows, gd._graph, gs.__init__, gs.tokens = replay_rows, _graph, init, tokens

    def uninstall(self) -> None:
        gd, gs = self.cg.GraphDecoder, self.cg.GreedyStep
        gd.replay_rows, gd._graph = self._saved["replay_rows"], self._saved["_graph"]
        gs.__init__, gs.tokens = self._saved["init"], self._saved["tokens"]

    def clear(self) -> None:
        self.steps.clear()
        self.waits_ms.clear()


def measure(engine, batch: int, vocab: int, steps: int = 40, kv_len: int = 160) -> dict:
    from bench_decode import decode_ready, time_graph_replays

    marks = StepMarks()
    handles = decode_ready(engine, batch, kv_len, vocab, steps + 8)
    marks.install()
    try:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        marks.clear()
        walls = []
        started = time.time()  # to line the steps up with a clock log (nvidia-smi --query-gpu=timestamp,...)
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            walls.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        whole = [m for m in marks.steps if all(k in m for k in MARKS)]
        parts = split_steps(whole)
        waits = list(marks.waits_ms)
    finally:
        marks.uninstall()
        for h in handles:
            h.abort()
        engine.step()
    alone = time_graph_replays(engine, batch, kv_len, vocab, 300)
    return {"batch": batch, "started_unix": started, "step_ms": step_ms, "graph_alone_ms": alone and alone["ms"],
            "steps_marked": len(whole),
            "host_wall_median_ms": statistics.median(walls), "host_wait_median_ms": statistics.median(waits),
            "host_busy_median_ms": statistics.median(walls) - statistics.median(waits),
            **{f"{p}_median_ms": statistics.median(v) for p, v in parts.items() if v},
            "parts_ms": {p: [round(x, 4) for x in v] for p, v in parts.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--work", default="/tmp/w")
    ap.add_argument("--out", default="bench/results/step_gaps.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/step_gaps.py needs CUDA (it times a CUDA graph's step)", file=sys.stderr)
        return 2
    from bench_decode import LLAMA3_8B
    from bench_serving import build

    from lmc.runtime.config import EngineConfig
    from lmc.runtime.engine import Engine

    batches = [int(b) for b in args.batches.split(",")]
    ws = build(LLAMA3_8B, Path(args.work), "cuda", ("int4",))["int4"]
    engine = Engine(str(ws), EngineConfig(device="cuda", session_len=1024, max_batch_size=max(batches)))
    report = {"device": torch.cuda.get_device_name(0), "command": " ".join(["bench/step_gaps.py", *sys.argv[1:]]),
              "rows": []}
    try:
        engine.warmup()
        for batch in batches:
            row = measure(engine, batch, LLAMA3_8B["vocab_size"])
            report["rows"].append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "parts_ms"},
                  flush=True)
    finally:
        engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
