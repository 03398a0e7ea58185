"""Decode attention alone, one layer of the Llama-3-8B shape (32 q heads, 8 KV heads, head_dim 128, 64-token
blocks): the kernel's launch settings (KV splits, BLOCK_N, warps, pipeline stages) per cache policy at long
context, to pick the quantized caches' defaults, for each decode kernel of --kernels (mma: tl.dot on dequantized
tiles; fma: CUDA-core dots on the codes; fold: tl.dot on the raw codes, scales and zeros applied to the score
tiles, grouped int4 keys dequantized in the tile; fma and fold read quantized caches only, the fp16 cache is timed
with mma), for the cache policies of --policies. Random caches (fp16 N(0, 1); codes uniform,
scale 0.02, zero -0.15), blocks in a random order; time = triton.testing.do_bench median.

    python bench/bench_kv_kernel.py --out bench/results/kv_kernel_h200.json     # GPU, ~2 minutes per kernel
    python bench/bench_kv_kernel.py --kernels mma,fma --out bench/results/kv_kernel_fma_h200.json
    python bench/bench_kv_kernel.py --kernels mma,fold --out bench/results/kv_kernel_fold_h200.json
    python bench/bench_kv_kernel.py --kernels fold --policies 0,4 --out /tmp/kv_kernel_int4.json  # int4 vs fp16
    python bench/bench_kv_kernel.py --kernels fold --policies 4 --points 64x4096,64x16384,16x16384 \
        --out bench/results/kv_kernel_int4_splits_h200.json
    python bench/bench_kv_kernel.py --smoke --kernels mma,fma,fold --out /tmp/kv_kernel_smoke.json  # CPU interpreter
    python bench/bench_kv_kernel.py --graph --policies 0 --points 1x256,16x256,64x256,16x1024,64x1024 \
        --splits 1,2,3,4,8,16 --block-ns 32,64,128 --out bench/results/kv_kernel_fp16_splits_h200.json  # explicit grid

Alone is not in the step: the split count that is fastest here lost 65-180 µs in the 8B batch-16 decode graph
(bench/NOTES.md, session 24); A/B a setting in the step before changing a default.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the CPU runs the kernels in Triton's interpreter, chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import versions  # noqa: E402

from lmc.kernels import attention  # noqa: E402
from lmc.kernels.kv_quant import QuantizedKV, store_groups  # noqa: E402


def caches(policy: int, blocks: int, page: int, hkv: int, d: int, dev: str, dtype: torch.dtype):
    if policy == 0:
        return [torch.randn(blocks, page, hkv, d, dtype=dtype, device=dev) for _ in range(2)]
    out = []
    for group in store_groups(d, policy):
        store = QuantizedKV.empty(blocks, page, hkv, d, policy, group, dev)
        store.codes.random_(0, 256)
        store.scales_zeros[..., 0].fill_(0.02)
        store.scales_zeros[..., 1].fill_(-0.15)
        out.append(store)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--kernels", default="mma",
                    help="comma-separated decode kernels to time: mma, fma, fold (e.g. --kernels mma,fold)")
    ap.add_argument("--policies", default="0,8,4", help="comma-separated cache policies (0: the fp16 reference)")
    ap.add_argument("--points", default="16x16384,64x4096", help="comma-separated BATCHxKV_LEN points (GPU runs)")
    ap.add_argument("--splits", default="", help="comma-separated KV split counts: with --block-ns / --warps / "
                    "--stages, a grid of explicit launch settings of the mma kernel for every policy (the fp16 "
                    "cache included), in place of the built-in grids")
    ap.add_argument("--block-ns", default="64", help="with --splits: comma-separated BLOCK_N values")
    ap.add_argument("--warps", default="4", help="with --splits: comma-separated warp counts")
    ap.add_argument("--stages", default="2", help="with --splits: comma-separated pipeline stage counts")
    ap.add_argument("--graph", action="store_true", help="time with do_bench_cudagraph (no launch overhead)")
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    if not set(kernels) <= {"mma", "fma", "fold"}:
        ap.error(f"--kernels {args.kernels}: a comma-separated list of mma, fma, fold")
    policies = [int(p) for p in args.policies.split(",")]
    if not set(policies) <= {0, 8, 4}:
        ap.error(f"--policies {args.policies}: a comma-separated list of 0, 8, 4")
    dev = "cpu" if args.smoke else "cuda"
    hq, hkv, d, page = (4, 2, 32, 16) if args.smoke else (32, 8, 128, 64)
    try:
        points = [(2, 64)] if args.smoke else [tuple(int(x) for x in p.split("x", 1)) for p in args.points.split(",")]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) <= 0 for p in points):
        ap.error(f"--points {args.points}: comma-separated BATCHxKV_LEN, e.g. 16x16384,64x4096")
    default = (1, 64, 4, 2)  # split multiplier, BLOCK_N, warps, stages: today's settings
    grid = [default, (4, 64, 4, 2)] if args.smoke else \
        list(itertools.product((1, 4), (64, 128), (4, 8), (2,))) + [(4, 64, 4, 3), (4, 128, 8, 3), (1, 128, 4, 3),
                                                                    (1, 256, 4, 2)]
    try:
        explicit = list(itertools.product(*([int(x) for x in a.split(",")] for a in (
            args.splits, args.block_ns, args.warps, args.stages)))) if args.splits else []
    except ValueError:
        ap.error("--splits, --block-ns, --warps and --stages take comma-separated integers")
    if not args.splits and (args.block_ns, args.warps, args.stages) != ("64", "4", "2"):
        ap.error("--block-ns, --warps and --stages set the explicit grid: give --splits with them")
    fma_grid = [(1, 16, 1, 2), (4, 32, 2, 2)] if args.smoke else \
        list(itertools.product((1, 4, 8), (16, 32, 64), (1, 2, 4), (2,)))  # the fma kernel: small tiles, few warps
    from triton.testing import do_bench, do_bench_cudagraph

    rows = []
    for policy in policies:
        for batch, kv_len in points:
            per_seq = -(-kv_len // page)
            blocks = batch * per_seq
            dtype = torch.float16 if dev == "cuda" else torch.float32  # the interpreter's dots: float32
            k_cache, v_cache = caches(policy, blocks, page, hkv, d, dev, dtype)
            tables = torch.randperm(blocks, device=dev, dtype=torch.int32).reshape(batch, per_seq)
            kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=dev)
            q = torch.randn(batch, hq, d, dtype=dtype, device=dev)
            kv_bytes = sum(c.codes.numel() + c.scales_zeros.numel() * 2 if isinstance(c, QuantizedKV)
                           else c.numel() * 2 for c in (k_cache, v_cache))
            base_splits = attention._default_num_splits(q, batch * hkv, per_seq * page, 64)
            runs = [("mma", c) for c in explicit] if explicit else \
                [("mma", c) for c in (grid if policy else [default]) if "mma" in kernels or not policy] + \
                [("fma", c) for c in fma_grid if policy and "fma" in kernels] + \
                [("fold", c) for c in grid if policy and "fold" in kernels]  # mma's launch grid
            for kernel, (first, block_n, warps, stages) in runs:  # first: the split count (explicit) or its multiplier
                splits = first if explicit else max(1, min(base_splits * first, -(-kv_len // block_n)))
                fn = lambda: attention.paged_decode_attention_triton(  # noqa: E731
                    q, k_cache, v_cache, tables, kv_lens, 0.088, num_splits=splits, block_n=block_n,
                    num_warps=warps, num_stages=stages, kernel=kernel)
                config = dict(kernel=kernel, policy=policy, batch=batch, kv_len=kv_len, splits=splits, block_n=block_n,
                              warps=warps, stages=stages, default_splits=base_splits)
                try:
                    timer = do_bench_cudagraph if args.graph else do_bench
                    ms = timer(fn, rep=20) if dev == "cuda" else (fn(), 0.0)[1]
                except Exception as e:  # a config that does not compile (shared memory) is recorded, not fatal
                    rows.append(dict(config, error=str(e).splitlines()[0][:200]))
                    continue
                row = dict(config, us=round(ms * 1e3, 1),
                           kv_tb_s=round(kv_bytes / (ms * 1e-3) / 1e12, 3) if ms else None)
                rows.append(row)
                print(row, flush=True)
            del k_cache, v_cache
    best = {}
    for r in rows:
        if "us" in r:
            key = f"{r['kernel']} policy {r['policy']} B={r['batch']} L={r['kv_len']}"
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for k, r in best.items():
        print("best", k, r, flush=True)
    result = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", versions=versions(),
                  date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), rows=rows, best=best)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    failed = [r for r in rows if "error" in r]
    if args.smoke and failed:  # every smoke setting runs in the interpreter: an error is a broken script or kernel
        print(f"{len(failed)} of {len(rows)} smoke settings failed, the first: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
