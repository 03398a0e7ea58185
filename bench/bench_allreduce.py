"""Tensor-parallel all-reduce latency on the GPUs of one host: NCCL's all_reduce against lmc's one-shot kernel
(kernels/allreduce.py), float16 sums of decode sizes (batch x 4096), each timed as 64 calls captured in one CUDA
graph (as a decode step makes them: 2 per layer x 32 layers), median of 20 replays; and the decode step's form,
the sum fused with the residual add and RMSNorm (`add_rms_norm`, rows of 4096) against NCCL then lmc's RMSNorm.
Also checks that the one-shot sums equal NCCL's within float16 rounding. --module times other implementations of
the same interface beside it (e.g. the previous commit's kernels/allreduce.py copied to a file), in the same run,
under keys prefixed with each file's stem.

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
HIDDEN = 4096


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


def load_module(path: str | None):
    if path is None:
        from lmc.kernels import allreduce
        return allreduce
    import importlib.util

    spec = importlib.util.spec_from_file_location("allreduce_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nccl_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """What tensor parallel does without the one-shot kernel: NCCL's sum, then lmc's fused add + RMSNorm."""
    from lmc.kernels.rmsnorm import rms_norm

    dist.all_reduce(x)
    return rms_norm(x, weight, 1e-5, residual)


def time_impl(one_shot, n: int, rank: int, dev: torch.device) -> dict:
    """One implementation's plain and fused times at n elements (rows of HIDDEN), checked against NCCL."""
    from lmc.kernels.rmsnorm import rms_norm

    g = torch.Generator(device=dev).manual_seed(rank * 1000 + n)
    x = torch.randn(n, generator=g, device=dev, dtype=torch.float16)
    want = x.clone()
    dist.all_reduce(want)
    err = (one_shot(x.clone(), 0).float() - want.float()).abs().max().item()
    rows = x.view(-1, HIDDEN)  # [T, H]
    residual = torch.randn(rows.shape, generator=g, device=dev, dtype=torch.float16)
    weight = torch.rand(HIDDEN, generator=g, device=dev, dtype=torch.float16) + 0.5
    want_y, _ = rms_norm(want.view(-1, HIDDEN), weight, 1e-5, residual)
    got_y, _ = one_shot.add_rms_norm(rows, residual, weight, 1e-5, 1)  # slots alternate
    norm_err = (got_y.float() - want_y.float()).abs().max().item()
    return dict(one_shot_us=round(graph_time_us(lambda t, s: one_shot(t, s), x.clone()), 2),
                fused_us=round(graph_time_us(lambda t, s: one_shot.add_rms_norm(t, residual, weight, 1e-5, s),
                                             rows.clone()), 2),
                max_abs_diff_vs_nccl=err, fused_max_abs_diff=norm_err)


def worker(rank: int, world: int, port: int, out: str, others: list[str]) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, device_id=dev)
    gloo = dist.new_group(backend="gloo")
    impls = {"lmc": load_module(None).OneShotAllReduce(gloo, dev, torch.float16, max(SIZES))}
    for path in others:
        impls[Path(path).stem] = load_module(path).OneShotAllReduce(gloo, dev, torch.float16, max(SIZES))
    rows = []
    for n in SIZES:
        x = torch.randn(n, device=dev, dtype=torch.float16)
        residual, weight = torch.randn_like(x).view(-1, HIDDEN), torch.ones(HIDDEN, device=dev, dtype=torch.float16)
        row = dict(elements=n, bytes=2 * n,
                   nccl_us=round(graph_time_us(lambda t, s: dist.all_reduce(t), x.clone()), 2),
                   nccl_norm_us=round(graph_time_us(lambda t, s: nccl_add_norm(t, residual, weight),
                                                    x.clone().view(-1, HIDDEN)), 2))
        for name, one_shot in impls.items():
            for key, value in time_impl(one_shot, n, rank, dev).items():
                row[key if name == "lmc" else f"{name}_{key}"] = value
        row["speedup"] = round(row["nccl_us"] / row["one_shot_us"], 2)
        rows.append(row)
        if rank == 0:
            print(rows[-1], flush=True)
    if rank == 0:
        result = dict(device=f"{world} x {torch.cuda.get_device_name()}", torch=torch.__version__,
                      nccl=".".join(map(str, torch.cuda.nccl.version())), calls_per_graph=CALLS,
                      date=time.strftime("%Y-%m-%d"), other_modules=others, rows=rows)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--module", action="append", default=[],
                    help="a file with another OneShotAllReduce to time beside lmc's (keys <file stem>_*); repeatable")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, this machine shows {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    mp.spawn(worker, args=(args.world, 29500 + os.getpid() % 1000, args.out, args.module), nprocs=args.world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
