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
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lmc.kernels.pdl import pdl_enabled
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine, _Sequence
from lmc.runtime.sampling import GenerationConfig
from lmc.runtime.tokenizer import IncrementalDetokenizer


def kernel_family(name: str) -> str:
    """A short label for a kernel name (Triton names are their Python function names)."""
    for key in ("_w4a16_gemv", "_w4a16_gemm", "_splitk_sum", "_rms_norm", "_rotary_kv", "_decode_kernel",
                "_merge_splits", "_silu_mul", "gemm", "gemv", "index", "copy", "argmax", "reduce", "elementwise"):
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
    engine = Engine(args.workspace, EngineConfig(device="cuda", session_len=512, max_batch_size=max(args.batch, 1),
                                                 cache_block_seq_len=64))
    if args.eager:
        engine.decoder = None
    gen = GenerationConfig(max_new_tokens=2, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(args.batch):
        prompt = torch.randint(0, engine.model.cfg.vocab_size, (args.kv_len - 1,), generator=g).tolist()
        s = _Sequence(i, prompt, gen, IncrementalDetokenizer(engine.tokenizer, prompt), None)
        assert engine._reserve(s)
        seqs.append(s)
    for s, row in zip(seqs, engine._prefill(seqs)):
        s.output.append(int(row.argmax()))
    for _ in range(5):
        engine._decode(seqs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine._decode(seqs)
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine._decode(seqs)
        torch.cuda.synchronize()
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])  # name -> [total µs, calls]
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            per_name[e.name][1] += 1
    families: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for name, (us, calls) in per_name.items():
        families[kernel_family(name)][0] += us / args.steps
        families[kernel_family(name)][1] += calls / args.steps
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
