"""W4A16 configurations timed as the decode step runs them: in a CUDA graph, each linear launched under PDL right after
an RMSNorm kernel, weights cycling through copies larger than L2 (so every byte comes from memory), against the
same linear timed alone (a graph of linears only, as the tuning sweeps time them).

Why (bench/NOTES.md, session 21): inside the 8B batch-1 step the mma kernel beat the GEMV on qkv (4096x6144) by
~0.6 µs a call, where timed alone it is 0.5 µs slower, so the table's isolated timing picked the wrong kernel.
This prices candidates in a chain without building the whole step. Candidates: what the step A/B of session 21
tried, per Llama-3-8B M = 1 shape (`CANDIDATES`).

    python bench/chain_w4a16.py --out bench/results/chain_w4a16_m1_h200.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import versions  # noqa: E402
from kernel_boundary import graph_us  # noqa: E402

from lmc.kernels.rmsnorm import rms_norm_triton  # noqa: E402
from lmc.kernels.w4a16 import _mma_launch, device_name, w4a16_gemv_triton  # noqa: E402
from lmc.kernels.w4a16_mma import mma_layout  # noqa: E402

GROUP = 128
L2_BYTES = 256 * 2**20  # weight copies per shape add up to at least this (H200 L2: 50 MB)


def _gemv(bn, split, warps, preload=False):
    return ("gemv", dict(block_n=bn, rows=1, split_k=split, depth=1, num_warps=warps, preload=preload))


def _mma(**cfg):
    return ("mma", cfg)


CANDIDATES = {  # (name, K, N, silu): [(label, (path, config)), ...], the first the H200 table's choice before session 21
    ("qkv", 4096, 6144, False): [("gemv s8", _gemv(32, 8, 1)), ("mma w4 s8", _mma(warps=4, split_k=8, buffers=2)),
                                 ("mma w8 s8", _mma(warps=8, split_k=8, buffers=2)),
                                 ("mma w4 s4", _mma(warps=4, split_k=4, buffers=2)),
                                 ("gemv s4", _gemv(32, 4, 1)), ("gemv s16", _gemv(32, 16, 1))],
    ("wo", 4096, 4096, False): [("gemv s8", _gemv(64, 8, 2, True)), ("mma w4 s8", _mma(warps=4, split_k=8, buffers=2)),
                                ("gemv s4", _gemv(64, 4, 2, True)), ("gemv s16", _gemv(64, 16, 2, True))],
    ("w2", 14336, 4096, False): [("mma w8 s16", _mma(warps=8, split_k=16, buffers=2)),
                                 ("mma w8 s8", _mma(warps=8, split_k=8, buffers=2)),
                                 ("mma w4 s16 b2", _mma(warps=4, split_k=16, buffers=2, blocks=2))],
    ("w13", 4096, 28672, True): [("mma w8 s1 b2 kw2", _mma(warps=8, split_k=1, buffers=2, blocks=2, kw=2)),
                                 ("mma w4 s2 b2", _mma(warps=4, split_k=2, buffers=2, blocks=2)),
                                 ("mma w4 s1 b2 kw4", _mma(warps=4, split_k=1, buffers=2, blocks=2, kw=4))],
}


def _weights(k: int, n: int, silu: bool, copies: int, dev) -> list[dict]:
    """`copies` random int4 weights [K, N] in both layouts (lmc-int4-k8 for the GEMV, mma fragments)."""
    out = []
    for _ in range(copies):
        q = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=dev)  # [K/8, N] random codes
        s = (torch.rand(k // GROUP, n, device=dev) * 0.01 + 0.002).half()  # [K/G, N]
        z = torch.randint(0, 16, (k // GROUP, n), device=dev).half()
        out.append(dict(q=q, s=s, z=z, mma=mma_layout(q, s, z, GROUP, silu)))
    return out


def _linear(path: str, cfg: dict, silu: bool):
    def run(x, w):
        if path == "gemv":
            return w4a16_gemv_triton(x, w["q"], w["s"], w["z"], GROUP, silu_mul=silu, **cfg)
        return _mma_launch(cfg)(x, *w["mma"], GROUP, silu_mul=silu, **cfg)
    return run


def time_shape(k: int, n: int, silu: bool, candidates, reps: int, replays: int) -> list[dict]:
    dev = torch.device("cuda")
    per_copy = k * n // 2 + 2 * (k // GROUP) * n * 2
    weights = _weights(k, n, silu, max(2, -(-L2_BYTES // per_copy)), dev)
    x = torch.randn(1, k, device=dev).half()  # [1, K]: the norm's input, constant (PDL orders the chain anyway)
    norm_w = torch.ones(k, device=dev).half()
    rows = []
    for label, (path, cfg) in candidates:
        linear = _linear(path, cfg, silu)

        def chain():
            for i in range(reps):
                xn, _ = rms_norm_triton(x, norm_w, 1e-5)  # [1, K]
                linear(xn, weights[i % len(weights)])

        def alone():
            for i in range(reps):
                linear(x, weights[i % len(weights)])

        def norms():
            for _ in range(reps):
                rms_norm_triton(x, norm_w, 1e-5)

        for fn in (chain, alone, norms):
            fn()  # compile
        torch.cuda.synchronize()
        pair = graph_us(chain, replays) / reps
        row = {"config": label, "path": path, "launch": cfg, "pair_us": round(pair, 3),
               "in_chain_us": round(pair - graph_us(norms, replays) / reps, 3),
               "alone_us": round(graph_us(alone, replays) / reps, 3)}
        print(f"  {k}x{n}{' silu' if silu else ''} {label:<18} norm + linear {row['pair_us']:7.3f} µs  "
              f"(linear in chain {row['in_chain_us']:7.3f}, alone {row['alone_us']:7.3f})", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(name for name, *_ in CANDIDATES), help="of qkv, wo, w2, w13")
    ap.add_argument("--reps", type=int, default=64, help="norm + linear pairs a graph")
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("chain_w4a16: needs a CUDA GPU", file=sys.stderr)
        return 1
    wanted = set(args.shapes.split(","))
    result = {"device": device_name(torch.device("cuda")), "versions": versions(), "command": " ".join(sys.argv),
              "what": "µs of an RMSNorm + W4A16 linear pair at M = 1 in a CUDA graph (PDL), the linear's share "
                      "(pair minus the norms alone), and the linear alone", "shapes": []}
    for (name, k, n, silu), candidates in CANDIDATES.items():
        if name in wanted:
            result["shapes"].append({"name": name, "k": k, "n": n, "silu": silu,
                                     "rows": time_shape(k, n, silu, candidates, args.reps, args.replays)})
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
