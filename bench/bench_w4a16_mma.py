"""The tensor-core W4A16 path for 1-8 rows (kernels/w4a16_mma.py) against lmc's tuned CUDA-core GEMV, per 8B
linear shape (tp 1 and one rank's share at tp 2; the gate/up weight with its SiLU epilogue as the runtime calls it).
The "gemv" column is whatever this GPU's table picks for the shape (the mma path itself where it has an entry).

    python bench/bench_w4a16_mma.py [--ms 1,2,4,8] [--out bench/results/w4a16_mma.json] [--write-table]
    TRITON_INTERPRET=1 python bench/bench_w4a16_mma.py --smoke     # CPU: every path runs, nothing is timed well

Per (M, shape): checks both against the float32 reference (relative error <= 1e-2), times the GEMV with this
GPU's tuning-table configuration and the mma path over a small grid of (warps, split_k), medians of CUDA-graph
replays of back-to-back calls rotating over enough weight copies to miss L2 (bench_w4a16.time_graph), and reports
µs and the weight bytes per second against a device-to-device copy. --write-table merges an "mma" entry into
this GPU's tuning table (kernels/w4a16_tuning.json) for every (M, K, N) where the best mma configuration beat the
table's own choice, with that choice as its fallback (lmc.kernels.w4a16_tuning); the runtime builds the mma layout
only on a GPU whose table has such entries.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_mma as MM
from lmc.kernels import w4a16_tuning as T

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import GROUP, SHAPES, TP2_SHAPES, _ints, _nbytes, _quant_set, _rel, _sets, copy_bandwidth, \
    environment, time_calls  # noqa: E402

SPLITS = (1, 2, 4, 8, 16)
SMOKE_GRID = ((1, 1, 2, 1, 1), (2, 3, 4, 2, 2))  # (warps, split_k, buffers, blocks, kw)
SMOKE_SHAPES = ((256, 96), (384, 64))


def _silu_ref(y: torch.Tensor) -> torch.Tensor:
    n = y.shape[1] // 2
    gate, up = y[:, :n].half().float(), y[:, n:].half().float()
    return gate * torch.sigmoid(gate) * up


def bench_shape(k: int, n: int, silu: bool, ms, grid, dev: str) -> list:
    sets = [_quant_set(k, n, dev)[1:] for _ in range(_sets(k * n // 2, dev))]
    frags = [MM.mma_layout(q, s, z, GROUP, silu) for q, s, z in sets]
    w_bytes = _nbytes(*sets[0])
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, device=dev).half() for _ in sets]
        q, s, z = sets[0]
        ref = W.w4a16_matmul_ref(xs[0].float(), q, s.float(), z.float(), GROUP)
        ref = _silu_ref(ref) if silu else ref
        device = torch.device(dev) if dev == "cuda" else None
        row = {"M": m, "K": k, "N": n, "silu": silu, "weight_bytes": w_bytes,
               "table": list(W.w4a16_config(m, n, k, device, mma=True)),  # what the table picks (may be mma)
               "fallback": list(W.w4a16_config(m, n, k, device))}  # what a weight without the layout takes
        if silu:  # the runtime's call: the table's choice, on the mma layout where it has an entry
            table = lambda i: W.w4a16_silu_matmul(xs[i], *sets[i], GROUP, mma=frags[i])  # noqa: E731
        else:
            table = lambda i: W.w4a16_matmul(xs[i], *sets[i], GROUP, mma=frags[i])  # noqa: E731
        path, kw = row["fallback"]
        if dev != "cuda" and path == "gemv":  # the CPU reference path has no kernel: time the GEMV launcher
            table = lambda i: W.w4a16_gemv_triton(xs[i], *sets[i], GROUP, silu_mul=silu, **kw)  # noqa: E731
        err = _rel(table(0).float(), ref)
        us = time_calls(table, len(sets), dev)
        row["gemv"] = {"us": us, "rel_err": err, "bytes_per_s": w_bytes / (us * 1e-6)}
        row["mma"] = []
        for warps, split, buffers, blocks, kw in grid:
            fn = (lambda i, w=warps, sp=split, bu=buffers, bl=blocks, kw_=kw: MM.w4a16_mma_triton(
                xs[i], *frags[i], GROUP, warps=w, split_k=sp, buffers=bu, blocks=bl, kw=kw_, silu_mul=silu))
            try:
                err = _rel(fn(0).float(), ref)
                us = time_calls(fn, len(sets), dev)
            except Exception as e:  # noqa: BLE001 -- a configuration the compiler rejects is reported, not fatal
                row["mma"].append({"warps": warps, "split_k": split, "buffers": buffers, "blocks": blocks, "kw": kw,
                                   "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            row["mma"].append({"warps": warps, "split_k": split, "buffers": buffers, "blocks": blocks, "kw": kw, "us": us, "rel_err": err,
                               "bytes_per_s": w_bytes / (us * 1e-6)})
        ok = [r for r in row["mma"] if "us" in r and r["rel_err"] < 1e-2]
        row["best_mma"] = min(ok, key=lambda r: r["us"]) if ok else None
        b = row["best_mma"]
        print(f"M={m} K={k} N={n}{' silu' if silu else ''}: gemv {row['gemv']['us']:.2f} us "
              f"({row['gemv']['bytes_per_s'] / 1e12:.2f} TB/s, err {row['gemv']['rel_err']:.1e}); mma "
              + (f"{b['us']:.2f} us ({b['bytes_per_s'] / 1e12:.2f} TB/s, err {b['rel_err']:.1e}) warps {b['warps']} "
                 f"split {b['split_k']} buffers {b['buffers']} blocks {b['blocks']} kw {b['kw']}" if b else "no correct result"), flush=True)
        rows.append(row)
    return rows


def table_entries(rows: list) -> list:
    """Tuning-table entries: the best mma configuration of each row where it beat the table's choice, with what a
    weight without the layout takes as its fallback."""
    out = []
    for r in rows:
        b = r["best_mma"]
        if b and b["us"] < r["gemv"]["us"]:
            path, config = r["fallback"]
            out.append({"m": r["M"], "k": r["K"], "n": r["N"], "path": "mma",
                        "config": {"warps": b["warps"], "split_k": b["split_k"], "buffers": b["buffers"],
                                   **({"blocks": 2} if b["blocks"] == 2 else {}),
                                   **({"kw": b["kw"]} if b["kw"] > 1 else {})},
                        "us": round(b["us"], 2), "fallback": {"path": path, "config": config}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=_ints, default=(1, 4, 8))
    ap.add_argument("--shapes", choices=("8b", "tp2", "both"), default="both")
    ap.add_argument("--out", default="bench/results/w4a16_mma.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU with TRITON_INTERPRET=1")
    ap.add_argument("--warps", type=_ints, default=(4, 8))
    ap.add_argument("--buffers", type=_ints, default=(2, 4), help="groups of words in flight")
    ap.add_argument("--blocks", type=_ints, default=(1, 2), help="16-column blocks a warp")
    ap.add_argument("--kw", type=_ints, default=(1,), help="warps of a program splitting each block's K (1, 2, 4)")
    ap.add_argument("--write-table", action="store_true", help="merge the mma winners into the tuning table")
    ap.add_argument("--table", default=str(T.TABLE_PATH), help="the tuning table --write-table merges into")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.smoke:
        print("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = SMOKE_SHAPES if args.smoke else \
        {"8b": SHAPES, "tp2": TP2_SHAPES, "both": SHAPES + TP2_SHAPES}[args.shapes]
    report = {"env": environment(dev), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "group_size": GROUP, "copy": copy_bandwidth(dev), "rows": []}
    print(f"{report['env']['device']}: copy {report['copy']['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    t0 = time.time()
    for k, n in shapes:
        silu = n in (28672, 14336) or (args.smoke and n == 64)  # the gate/up weights (their SiLU epilogue)
        grid = SMOKE_GRID if args.smoke else tuple((w, sp, bu, bl, kw) for w in args.warps for sp in SPLITS
                                                   for bu in args.buffers for bl in args.blocks for kw in args.kw
                                                   if w % kw == 0)
        report["rows"] += bench_shape(k, n, silu, args.ms, grid, dev)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.write_table:
        entries = table_entries(report["rows"])
        source = f"{report['command']} ({report['env']['time'][:10]}): mma for {len(entries)} (M, K, N)"
        T.write_tables(T.merge(T.read_tables(args.table), report["env"]["device"], entries, source), args.table)
        report["table_entries"] = entries
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"merged {len(entries)} mma entries for {report['env']['device']!r} into {args.table}")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
