"""Where a decode step's time goes: GPU time per kernel name over CUDA-graph replays (torch.profiler).

  python bench/profile_decode.py WORKSPACE [--batch 1] [--kv-len 192] [--steps 20] [--out FILE]

Run it on a workspace that bench/bench_decode.py built (e.g. /tmp/lmc_bench_decode/llama3-8b-int4). With
PDL (lmc.kernels.pdl) kernels overlap, so per-kernel times add up to more than the step; run with LMC_PDL=0
for a breakdown that adds up.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_decode import decode_ready, time_decode_step  # bench/ is on sys.path when this script runs
from lmc.errors import LmcError
from lmc.kernels.pdl import pdl_enabled
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine


def kernel_family(name: str) -> str:
    """A short label for a kernel name (Triton names are their Python function names)."""
    for key in ("_w4a16_gemv", "_w4a16_gemm", "_splitk_sum", "_rms_norm", "_rotary_kv", "_decode_kernel",
                "_silu_mul", "gemm", "gemv", "index", "copy", "argmax", "reduce", "elementwise"):
        if key in name.lower():
            return key
    return name[:60]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kv-len", type=int, default=192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="profile eager decode instead of graph replays")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        engine = Engine(args.workspace, EngineConfig(device="cuda", session_len=512,
                                                     max_batch_size=max(args.batch, 1), cache_block_seq_len=64))
    except LmcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.eager:
        engine.decoder = None
    vocab = engine.model.cfg.vocab_size
    step_ms = time_decode_step(engine, args.batch, args.kv_len, vocab, "cuda", args.steps)
    handles = decode_ready(engine, args.batch, args.kv_len, vocab, args.steps + 3)
    for _ in range(3):
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    for h in handles:
        h.abort()
    families: dict[str, list] = defaultdict(lambda: [0.0, 0.0])  # family -> [µs per step, calls per step]
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            family = families[kernel_family(e.name)]
            family[0] += e.device_time_total / args.steps
            family[1] += 1 / args.steps
    rows = sorted(((k, v[0], v[1]) for k, v in families.items()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"{args.workspace} B={args.batch} kv={args.kv_len} {'eager' if args.eager else 'graph'} "
          f"pdl={pdl_enabled(torch.device('cuda'))}: step {step_ms:.3f} ms (wall), kernels {total / 1e3:.3f} ms")
    for name, us, calls in rows:
        print(f"  {name:<40} {us:9.1f} us/step  {calls:6.1f} calls/step  {us / max(calls, 1e-9):7.2f} us/call")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "workspace": args.workspace, "device": torch.cuda.get_device_name(), "batch": args.batch,
            "kv_len": args.kv_len, "graph": not args.eager, "pdl": pdl_enabled(torch.device("cuda")),
            "step_ms_wall": step_ms, "kernel_ms_sum": total / 1e3,
            "kernels": [{"family": n, "us_per_step": us, "calls_per_step": c} for n, us, c in rows],
            "command": " ".join(sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
