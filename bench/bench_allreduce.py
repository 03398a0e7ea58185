"""Tensor-parallel all-reduce latency on the GPUs of one host: NCCL's all_reduce against lmc's one-shot kernel
(kernels/allreduce.py), float16 sums of decode sizes (batch x 4096), each timed as 64 calls captured in one CUDA
graph (as a decode step makes them: 2 per layer x 32 layers), median of 20 replays. Also checks that the one-shot
sum equals NCCL's within float16 rounding.

    python bench/bench_allreduce.py --out bench/results/allreduce_h200x2.json     # 2+ GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = (4096, 4 * 4096, 16 * 4096, 32 * 4096, 64 * 4096, 128 * 4096, 256 * 4096)  # batch 1 .. 256 at hidden 4096
CALLS = 64


def graph_time_us(fn, x: torch.Tensor) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(x, i % 2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(x, i % 2)
    times = []
    for _ in range(20):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / CALLS * 1e6)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, device_id=dev)
    from lmc.kernels.allreduce import OneShotAllReduce

    one_shot = OneShotAllReduce(dist.new_group(backend="gloo"), dev, torch.float16, max(SIZES))
    rows = []
    for n in SIZES:
        g = torch.Generator(device=dev).manual_seed(rank * 1000 + n)
        x = torch.randn(n, generator=g, device=dev, dtype=torch.float16)
        want = x.clone()
        dist.all_reduce(want)
        got = one_shot(x.clone(), 0)
        err = (got.float() - want.float()).abs().max().item()
        nccl_us = graph_time_us(lambda t, s: dist.all_reduce(t), x.clone())
        one_us = graph_time_us(lambda t, s: one_shot(t, s), x.clone())
        rows.append(dict(elements=n, bytes=2 * n, nccl_us=round(nccl_us, 2), one_shot_us=round(one_us, 2),
                         speedup=round(nccl_us / one_us, 2), max_abs_diff_vs_nccl=err))
        if rank == 0:
            print(rows[-1], flush=True)
    if rank == 0:
        result = dict(device=f"{world} x {torch.cuda.get_device_name()}", torch=torch.__version__,
                      nccl=".".join(map(str, torch.cuda.nccl.version())), calls_per_graph=CALLS,
                      date=time.strftime("%Y-%m-%d"), rows=rows)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, this machine shows {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    mp.spawn(worker, args=(args.world, 29500 + os.getpid() % 1000, args.out), nprocs=args.world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
