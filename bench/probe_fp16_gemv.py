"""fp16 y = x W^T at M = 1 (batch-1 decode) on the Llama-3-8B linears, at tp 1 and one rank's tp 2 shapes, through
the ways torch offers: F.linear (cuBLAS(Lt) GEMM; it may pick split-K and a separate reduce kernel), torch.mv
(cuBLAS GEMV), and F.linear with fp16 reduced-precision split-K reductions disallowed; and lmc's candidate
(kernels/gemv.py) over a small grid of block shapes and warps, its best with PDL (as the decode chain launches
it) and without. Each is timed as a CUDA graph of back-to-back calls rotating over enough weight copies to defeat
L2; µs per call and GB/s of weight read. GPU only.

    python bench/probe_fp16_gemv.py --out bench/results/probe_fp16_gemv_h200.json
    python bench/probe_fp16_gemv.py --groups lm_head --out bench/results/probe_fp16_gemv_lm_head_h200.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lmc.kernels import gemv

SHAPES = {"tp1": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],  # (K, N): qkv, wo, w13, w2
          "tp2": [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)],
          "lm_head": [(4096, 128256), (4096, 64128)]}  # the 8B lm_head whole (tp 1) and split over 2 ranks
L2_BYTES = 60 * 1024**2
GRID = [(bn, bk, warps) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for warps in (2, 4, 8)]  # candidate


def triton_way(block_n: int, block_k: int, warps: int, pdl: bool):
    def fn(x, w):
        y = torch.empty((1, w.shape[0]), dtype=x.dtype, device=x.device)
        launch = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
        gemv._gemv_kernel[(-(-w.shape[0] // block_n),)](x[0], w, y, w.shape[0], w.shape[1], w.stride(0), 0,
                                                       BLOCK_N=block_n, BLOCK_K=block_k, SILU=False, PREFETCH=False,
                                                       num_warps=warps, num_stages=1, **launch)
        return y
    return fn


def time_graph(fn, weights, x, calls: int = 64, reps: int = 20) -> float:
    """µs per call: a CUDA graph of `calls` calls rotating over `weights`, median of `reps` replays."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in weights:
            fn(x, w)  # warm up (cuBLAS picks its kernel, workspace allocated)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(x, weights[i % len(weights)])
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--groups", default="tp1,tp2", help=f"comma-separated shape groups: {', '.join(SHAPES)}")
    args = ap.parse_args()
    groups = args.groups.split(",")
    if not set(groups) <= set(SHAPES):
        ap.error(f"--groups: {args.groups!r}; the groups are {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        raise SystemExit("probe_fp16_gemv.py needs a CUDA GPU")
    ways = {
        "linear": lambda x, w: F.linear(x, w),
        "mv": lambda x, w: torch.mv(w, x[0]),
    }
    rows = []
    for tp in groups:
        for k, n in SHAPES[tp]:
            copies = max(2, -(-2 * L2_BYTES // (k * n * 2)))
            weights = [torch.randn(n, k, dtype=torch.float16, device="cuda") for _ in range(copies)]
            x = torch.randn(1, k, dtype=torch.float16, device="cuda")
            ref = F.linear(x.float(), weights[0].float())
            for name, fn in [*ways.items(), ("linear_no_reduced_precision", ways["linear"])]:
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = name != "linear_no_reduced_precision"
                err = ((fn(x, weights[0]).float().reshape(1, n) - ref).abs().max() / ref.abs().max()).item()
                us = time_graph(fn, weights, x)
                rows.append(dict(tp=tp, k=k, n=n, way=name, us=round(us, 2), gb_s=round(k * n * 2 / us / 1e3, 1),
                                 rel_err=err))
                print(rows[-1], flush=True)
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
            pdl = gemv.pdl_launch(x.device).get("PDL", False)
            best = None
            for bn, bk, warps in GRID:
                fn = triton_way(bn, bk, warps, pdl)
                err = ((fn(x, weights[0]).float() - ref).abs().max() / ref.abs().max()).item()
                us = time_graph(fn, weights, x)
                if err < 1e-2 and (best is None or us < best[0]):
                    best = (us, bn, bk, warps, err)
            for use_pdl in sorted({pdl, False}, reverse=True):
                us = time_graph(triton_way(*best[1:4], use_pdl), weights, x)
                rows.append(dict(tp=tp, k=k, n=n, way=f"lmc_gemv{'_pdl' if use_pdl else ''}", us=round(us, 2),
                                 gb_s=round(k * n * 2 / us / 1e3, 1), rel_err=best[4],
                                 block_n=best[1], block_k=best[2], warps=best[3]))
                print(rows[-1], flush=True)
            del weights
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               command=f"python bench/probe_fp16_gemv.py --groups {args.groups} --out {args.out}", rows=rows)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
