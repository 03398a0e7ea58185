"""Where a tensor-parallel decode step's time goes on rank 0: host work, the control-plane announcement, and
waiting for the GPU (GreedyStep.tokens), at tp = 1 and tp = 2, batch 1, greedy (pipelined) decode.

If rank 0 spends most of a step waiting for tokens, the GPUs (or a follower rank) set the pace; if it waits
little, its own host loop does. Uses bench_tp's workspaces (built if absent).

    python bench/profile_tp.py --format int4 --out bench/results/profile_tp_h200x2.json     # 2 GPUs
    python bench/profile_tp.py --smoke --out /tmp/profile_tp.json                           # CPU, tiny
    python bench/profile_tp.py --format int4 --kernels --out ...  # + rank 0's GPU kernels per step (torch.profiler)

--kernels adds, per run, rank 0's GPU kernels over the timed steps (torch.profiler over the CUDA-graph
replays): each kernel's launches and microseconds per step, their sum, and the step time the kernels leave
idle (the gaps between them: launch latency and waiting on the other rank inside the all-reduces).

tp = 2 runs with the lm_head that LMC_TP_LM_HEAD says (split by default; recorded in the result).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import LLAMA3_8B, TINY, prompts_for, timed_generate, versions  # noqa: E402
from bench_serving import build  # noqa: E402
from bench_tp import split  # noqa: E402

from lmc.runtime import cuda_graph, distributed  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.engine import Engine  # noqa: E402

SPENT = {"tokens_wait": 0.0, "announce": 0.0, "replay": 0.0}


def timed(owner, name: str, key: str) -> None:
    """Wrap owner.name so that its wall time adds to SPENT[key]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[key] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def kernel_table(prof, steps: int, gpu: bool, top: int = 25) -> dict:
    """Per-step GPU kernel time of a torch.profiler run (CPU: the ops' own time, which checks the script):
    the `top` kernels by time, their sum, the count."""
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) if gpu else e.self_cpu_time_total
        if us and e.key and not e.key.startswith(("cudaGraph", "cudaLaunch", "cudaStream", "ProfilerStep")):
            rows.append({"kernel": e.key[:120], "launches_per_step": round(e.count / steps, 2),
                         "us_per_step": round(us / steps, 2)})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"kernel_us_per_step": round(sum(r["us_per_step"] for r in rows), 1),
            "launches_per_step": round(sum(r["launches_per_step"] for r in rows), 1), "top": rows[:top]}


def profile(ws: Path, dev: str, vocab: int, batch: int, new_tokens: int, kernels: bool = False) -> dict:
    engine = Engine(str(ws), EngineConfig(device=dev, session_len=1024, max_batch_size=16))
    try:
        prompts = prompts_for(batch, 128, vocab)
        timed_generate(engine, prompts, 8, dev)  # graphs captured
        for key in SPENT:
            SPENT[key] = 0.0
        if kernels:
            activity = torch.profiler.ProfilerActivity.CUDA if dev == "cuda" else torch.profiler.ProfilerActivity.CPU
            with torch.profiler.profile(activities=[activity]) as prof:
                run = timed_generate(engine, prompts, new_tokens, dev)
            table = kernel_table(prof, new_tokens, dev == "cuda")
        else:
            run = timed_generate(engine, prompts, new_tokens, dev)
    finally:
        engine.close()
    steps = new_tokens  # every step (prefill included) waits once and replays at most once
    per_step = {k + "_ms": round(v / steps * 1e3, 4) for k, v in SPENT.items()}
    total_ms = run["total_s"] / steps * 1e3
    row = {"batch": batch, "step_ms": round(run["step_ms"], 4), "loop_ms_per_step": round(total_ms, 4), **per_step,
           "host_ms_per_step": round(total_ms - SPENT["tokens_wait"] / steps * 1e3, 4)}
    if kernels:
        row["kernels"] = table | {"idle_us_per_step": round(row["step_ms"] * 1e3 - table["kernel_us_per_step"], 1)}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/lmc_bench_serving")
    ap.add_argument("--format", default=None, choices=("fp16", "int4"),
                    help="workspace format (default int4; fp16 with --smoke: the tiny shape cannot split int4 groups)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="also rank 0's GPU kernels per step (torch.profiler)")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    args = ap.parse_args()
    args.format = args.format or ("fp16" if args.smoke else "int4")
    dev = "cpu" if args.smoke else "cuda"
    shape = TINY if args.smoke else LLAMA3_8B
    timed(cuda_graph.GreedyStep, "tokens", "tokens_wait")
    timed(distributed.Shard, "announce_decode", "announce")
    timed(cuda_graph.GraphDecoder, "replay_rows", "replay")
    ws = build(shape, Path(args.work), dev, (args.format,))[args.format]
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "versions": versions(),
              "format": args.format, "command": " ".join(sys.argv), "lm_head": distributed.lm_head_mode(), "runs": {}}
    for tp, path in ((1, ws), (2, split(ws, 2))):
        for batch in (int(b) for b in args.batches.split(",")):
            row = profile(path, dev, shape["vocab_size"], batch, args.new_tokens, args.kernels)
            result["runs"][f"tp{tp}_b{batch}"] = row
            print(f"tp={tp} {row}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
