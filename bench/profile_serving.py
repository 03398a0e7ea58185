"""Where a serving step's time goes: `lmc bench`'s load on one engine, every step timed by kind.

Each engine.step() is timed on the host with a device sync after it (this turns the pipelined decode
off, which only affects pure-decode steps), and classified: "decode" (every running sequence computes
one token: the CUDA-graph path), "mixed" (decodes plus prompt chunks: the eager ragged path) or
"prefill" (prompt chunks only). A torch profile of a few steps of each kind gives GPU time per kernel
family; those steps are left out of the per-kind sums (the profiler slows them) and marked in `step_log`.

    python bench/profile_serving.py WORKSPACE --concurrency 256 --num-prompts 600 --out prof.json

The engine is warmed up first (Engine.warmup, as `lmc serve` does; --no-warmup skips it), then runs the load
three times: a first run (whatever the warm-up left to compile), the same load without the per-step syncs, and
the instrumented run; every kernel compiled in each phase is logged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from profile_decode import kernel_family  # noqa: E402

from lmc import bench as B  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.engine import Engine  # noqa: E402


def instrument(engine: Engine, log: list, profiled: dict) -> None:
    step, schedule = engine.step, engine.scheduler.schedule
    current = {}

    def spy_schedule():
        batch = schedule()
        current["batch"] = batch
        if batch is not None:
            current["kind"] = "decode" if batch.is_decode else \
                ("prefill" if all(n > 1 for n in batch.num_new) else "mixed")
        return batch

    def timed_step():
        current["batch"] = None
        t0 = time.perf_counter()
        kind_hint = None
        prof = None
        profiled["attempts"] += 1
        if profiled["attempts"] % 7 == 0 and len(profiled["done"]) < 9 and engine.scheduler.has_work():
            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.__enter__()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        batch = current["batch"]
        if batch is not None:
            kind_hint = current["kind"]
            log.append({"kind": kind_hint, "seqs": len(batch.seqs), "tokens": sum(batch.num_new), "ms": seconds * 1e3,
                        "profiled": prof is not None})
        if prof is not None:
            prof.__exit__(None, None, None)
            if kind_hint and profiled["count"][kind_hint] < 3:
                profiled["count"][kind_hint] += 1
                families = defaultdict(float)
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        families[kernel_family(e.name)] += e.device_time_total
                profiled["done"].append({"kind": kind_hint, "seqs": len(batch.seqs), "tokens": sum(batch.num_new),
                                         "wall_ms": seconds * 1e3,
                                         "gpu_us": dict(sorted(families.items(), key=lambda kv: -kv[1]))})

    engine.scheduler.schedule = spy_schedule
    engine.step = timed_step


def log_compiles(log: list, compiles: list, phase: dict) -> None:
    """Record every Triton / Gluon kernel compiled (or loaded from the disk cache) from now on: the run it fell in
    (phase["name"]), the step (index into `log`), its signature and the seconds it took."""
    from triton import knobs

    started = {}

    def before(*, key, repr, **_):
        started[str(key)] = time.perf_counter()
        return False  # compile as usual

    def after(*, key, repr, **_):
        compiles.append({"run": phase["name"], "step": len(log), "kernel": repr[:300],
                         "s": round(time.perf_counter() - started.pop(str(key), time.perf_counter()), 3)})

    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--input-len", type=int, default=224)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-warmup", action="store_true", help="skip Engine.warmup (as before session 19)")
    args = ap.parse_args()
    engine = Engine(args.workspace, EngineConfig(max_batch_size=args.concurrency, session_len=1024))
    vocab = list(range(10, engine.cfg.vocab_size))
    warm = B.random_requests(2 * args.concurrency, args.input_len, args.output_len, 0.5, vocab, seed=1)
    log: list = []
    compiles: list = []
    phase = {"name": "Engine.warmup"}
    log_compiles(log, compiles, phase)
    warmup = None if args.no_warmup else engine.warmup()
    phase["name"] = "warm-up"
    engine.start()
    first_result = B.run_bench(warm, args.concurrency, B.engine_sender(engine), False)  # compiles, graph captures
    # the same load as the instrumented run, without its per-step syncs (the pipelined decode stays on)
    phase["name"] = "plain"
    plain = B.random_requests(args.num_prompts, args.input_len, args.output_len, 0.5, vocab, seed=3)  # no cache hits
    plain_result = B.run_bench(plain, args.concurrency, B.engine_sender(engine), False)
    engine.stop()
    phase["name"] = "instrumented"
    profiled = {"done": [], "attempts": 0, "count": defaultdict(int)}
    instrument(engine, log, profiled)
    engine.start()
    requests = B.random_requests(args.num_prompts, args.input_len, args.output_len, 0.5, vocab, seed=2)
    result = B.run_bench(requests, args.concurrency, B.engine_sender(engine), False)
    engine.stop()
    by_kind = defaultdict(lambda: {"steps": 0, "ms": 0.0, "tokens": 0, "seqs": 0})
    for row in (r for r in log if not r["profiled"]):  # the profiler slows the steps it records
        k = by_kind[row["kind"]]
        k["steps"] += 1
        k["ms"] += row["ms"]
        k["tokens"] += row["tokens"]
        k["seqs"] += row["seqs"]
    summary = {k: {**v, "ms_per_step": v["ms"] / v["steps"], "seqs_per_step": v["seqs"] / v["steps"],
                   "tokens_per_step": v["tokens"] / v["steps"]} for k, v in by_kind.items()}
    report = {"device": torch.cuda.get_device_name(), "workspace": args.workspace, "concurrency": args.concurrency,
              "num_prompts": args.num_prompts, "bench": result,
              "bench_uninstrumented": plain_result, "bench_first_run": first_result, "engine_warmup": warmup, "steps": summary,
              "total_step_ms": sum(r["ms"] for r in log), "profiles": profiled["done"],
              "step_log": [[r["kind"][0], r["seqs"], r["tokens"], round(r["ms"], 3)] for r in log],
              "step_log_columns": ["kind (d/m/p)", "seqs", "tokens", "ms"], "compiles": compiles}
    for kind, v in summary.items():
        print(f"{kind:8} {v['steps']:5} steps  {v['ms_per_step']:8.2f} ms/step  {v['seqs_per_step']:6.1f} seqs  "
              f"{v['tokens_per_step']:7.1f} tokens/step  ({v['ms'] / 1e3:.2f} s)")
    print(f"first run (compiles, graph captures): {first_result['output_throughput']:.1f} out tok/s, TTFT p99 "
          f"{first_result['ttft_ms']['p99']:.0f} ms")
    print(f"bench without the step syncs: {plain_result['output_throughput']:.1f} out tok/s")
    print(f"bench: {result['output_throughput']:.1f} out tok/s, {result['duration_s']:.1f} s; "
          f"steps {report['total_step_ms'] / 1e3:.1f} s")
    for p in profiled["done"]:
        top = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in list(p["gpu_us"].items())[:6])
        print(f"  profile {p['kind']:7} seqs {p['seqs']:4} tokens {p['tokens']:5} wall {p['wall_ms']:.2f} ms: {top} (GPU ms)")
    if warmup is not None:
        print(f"Engine.warmup: {warmup}")
    for run in ("Engine.warmup", "warm-up", "plain"):
        done = [c for c in compiles if c["run"] == run]
        print(f"  {run} run: {len(done)} kernels compiled or loaded, {sum(c['s'] for c in done):.1f} s")
    for c in compiles:
        if c["run"] == "instrumented":
            print(f"  compiled in the instrumented run, step {c['step']}: {c['s']:.2f} s {c['kernel'][:160]}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
