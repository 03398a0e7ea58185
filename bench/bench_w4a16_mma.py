"""The tensor-core W4A16 paths (kernels/w4a16_mma.py for 1-16 rows, kernels/w4a16_mma_wide.py from 9) against
what lmc's tuning table picks, per 8B linear shape (tp 1 and one rank's share at tp 2; the gate/up weight with its
SiLU epilogue as the runtime calls it). The "gemv" column is whatever this GPU's table picks for the shape (the
mma path itself where it has an entry); --fp16 adds fp16 cuBLAS (F.linear, no epilogue) on the same shape.

    python bench/bench_w4a16_mma.py [--ms 1,2,4,8] [--out bench/results/w4a16_mma.json] [--write-table]
    python bench/bench_w4a16_mma.py --ms 1,16 --warps 1,2,4,8 --stages 0,3,4,6   # + the pipelined loop
    python bench/bench_w4a16_mma.py --ms 64,256 --tiles 4,8 --fp16 --write-table   # the wide kernel
    python bench/bench_w4a16_mma.py --shapes 8b --ms 16,64,256 --fp16 --wgmma-rows 16,64,128   # + wgmma (sm_90)
    python bench/bench_w4a16_mma.py --ms 1 --hot-l2     # the same weight every call: L2-resident where it fits
    TRITON_INTERPRET=1 python bench/bench_w4a16_mma.py --smoke     # CPU: every path runs, nothing is timed well

Per (M, shape): checks both against the float32 reference (relative error <= 1e-2), times the GEMV with this
GPU's tuning-table configuration and the mma path over a small grid of (warps, split_k, ...; M > 16: the wide
kernel's tiles and blocks; --wgmma-rows: the wgmma kernel's rows x split-K x pipeline x warpgroups x ahead x
x_chunks on sm_90, each also with x by TMA with --wgmma-x-tma),
medians of CUDA-graph
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
import torch.nn.functional as F

from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_mma as MM
from lmc.kernels import w4a16_mma_wide as MW
from lmc.kernels import w4a16_wgmma as WG
from lmc.kernels import w4a16_tuning as T

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import GROUP, SHAPES, TP2_SHAPES, _ints, _nbytes, _quant_set, _rel, _sets, copy_bandwidth, \
    environment, time_calls  # noqa: E402

SPLITS = (1, 2, 4, 8, 16)
HEAD_SHAPES = ((4096, 128256),)  # (K, N) of the Llama-3-8B lm_head
SMOKE_GRID = ({"warps": 1, "split_k": 1, "buffers": 2, "blocks": 1, "kw": 1},
              {"warps": 2, "split_k": 3, "buffers": 4, "blocks": 2, "kw": 2},
              {"warps": 2, "split_k": 2, "buffers": 2, "blocks": 1, "kw": 1, "rw": 2})
SMOKE_WIDE = ({"warps": 1, "split_k": 2, "blocks": 2, "tiles": 4}, {"warps": 2, "split_k": 1, "blocks": 1, "tiles": 8})
SMOKE_SHAPES = ((256, 96), (384, 64))


def _silu_ref(y: torch.Tensor) -> torch.Tensor:
    n = y.shape[1] // 2
    gate, up = y[:, :n].half().float(), y[:, n:].half().float()
    return gate * torch.sigmoid(gate) * up


def mma_call(x, frag, silu: bool, config: dict):
    """One launch of the mma kernel a configuration names (the wgmma one where it has "rows", the wide one where
    it has "tiles")."""
    launch = WG.w4a16_wgmma_triton if "rows" in config else \
        MW.w4a16_mma_wide_triton if "tiles" in config else MM.w4a16_mma_triton
    return launch(x, *frag, GROUP, silu_mul=silu, **config)


def bench_shape(k: int, n: int, silu: bool, ms, grids, dev: str, fp16: bool, hot_l2: bool = False) -> list:
    n_sets = 1 if hot_l2 and dev == "cuda" else _sets(k * n // 2, dev)  # hot_l2: every call reads the same weight
    sets = [_quant_set(k, n, dev)[1:] for _ in range(n_sets)]
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
        if fp16:
            dense = [torch.randn(n, k, device=dev, dtype=torch.float16)
                     for _ in range(_sets(k * n * 2, dev))]  # [N, K], as many copies as miss L2
            dense_us = time_calls(lambda i: F.linear(xs[i % len(xs)], dense[i]), len(dense), dev)
            row["fp16_linear"] = {"us": dense_us}
            del dense
        row["mma"] = []
        for config in grids(m):
            fn = (lambda i, c=config: mma_call(xs[i], frags[i], silu, c))
            try:
                err = _rel(fn(0).float(), ref)
                us = time_calls(fn, len(sets), dev)
            except Exception as e:  # noqa: BLE001 -- a configuration the compiler rejects is reported, not fatal
                row["mma"].append({**config, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            row["mma"].append({**config, "us": us, "rel_err": err, "bytes_per_s": w_bytes / (us * 1e-6)})
        ok = [r for r in row["mma"] if "us" in r and r["rel_err"] < 1e-2]
        row["best_mma"] = min(ok, key=lambda r: r["us"]) if ok else None
        b = row["best_mma"]
        fp = f"; fp16 {row['fp16_linear']['us']:.2f} us" if fp16 else ""
        print(f"M={m} K={k} N={n}{' silu' if silu else ''}: table {row['gemv']['us']:.2f} us "
              f"({row['gemv']['bytes_per_s'] / 1e12:.2f} TB/s, err {row['gemv']['rel_err']:.1e}); mma "
              + (f"{b['us']:.2f} us ({b['bytes_per_s'] / 1e12:.2f} TB/s, err {b['rel_err']:.1e}) "
                 + " ".join(f"{key} {b[key]}" for key in CONFIG_KEYS if key in b) if b else "no correct result")
              + fp, flush=True)
        rows.append(row)
    return rows


CONFIG_KEYS = ("warps", "split_k", "buffers", "blocks", "kw", "rw", "stages", "tiles", "prefetch", "rows", "pipeline",
               "warpgroups", "ahead", "x_chunks", "x_tma")


def table_entries(rows: list) -> list:
    """Tuning-table entries: the best mma configuration of each row where it beat the table's choice, with what a
    weight without the layout takes as its fallback."""
    out = []
    for r in rows:
        b = r["best_mma"]
        if b and b["us"] < r["gemv"]["us"]:
            path, fallback = r["fallback"]
            config = {key: b[key] for key in CONFIG_KEYS if key in b}
            if "tiles" not in config and "rows" not in config:  # the 1-16 row kernel: its defaults left out
                config = {key: v for key, v in config.items() if (key, v) not in (("blocks", 1), ("kw", 1), ("rw", 1))}
            out.append({"m": r["M"], "k": r["K"], "n": r["N"], "path": "mma", "config": config,
                        "us": round(b["us"], 2), "fallback": {"path": path, "config": fallback}})
    return out


def _pairs(value: str) -> dict[int, tuple[int, ...]]:
    """"16:1,64:2" -> {16: (1,), 64: (2,)} (rows -> the warpgroups tried there)."""
    out = {}
    for item in value.split(","):
        rows, *wgs = (int(v) for v in item.split(":"))
        out[rows] = tuple(wgs)
    return out


def grid(m: int, args) -> list[dict]:
    """The configurations tried at M rows: the 1-16 row kernel's up to 16 rows; the wide kernel's from 9 rows
    (its tiles up to M / 8); the wgmma kernel's (--wgmma-rows, on sm_90) at any M, its rows up to 2M (and the
    smallest); --wgmma-only: the wgmma kernel's alone."""
    small, wide = [], []
    mma_sync = args.smoke or not args.wgmma_only
    if mma_sync and m <= MM.MAX_ROWS and not args.wide_only:
        small = list(SMOKE_GRID) if args.smoke else [
            {"warps": w, "split_k": sp, "blocks": bl, "kw": kw, **({"rw": rw} if rw > 1 else {}),
             **({"stages": st} if st else {"buffers": bu})}
            for w in args.warps for sp in args.splits for bl in args.blocks for kw in args.kw
            for rw in (args.rw if m > 8 else (1,)) if w % (kw * rw) == 0
            for st in args.stages for bu in (args.buffers if not st else args.buffers[:1])]
    if mma_sync and m > 8:
        tiles = [t for t in args.tiles if t <= -(-m // 8)]
        wide = list(SMOKE_WIDE) if args.smoke else [
            {"warps": w, "split_k": sp, "blocks": bl, "tiles": t, **({"prefetch": True} if pf else {})}
            for w in args.warps for sp in args.splits for bl in args.wide_blocks for t in tiles for pf in args.prefetch]
    wgmma = []
    if args.wgmma_rows and not args.smoke and WG.wgmma_available(torch.device("cuda")):
        rows = sorted({r for r in args.wgmma_rows if r < 2 * m} | {min(args.wgmma_rows)})  # no row block mostly empty
        pairs = getattr(args, "wgmma_pairs", None) or {}  # rows -> warpgroups (else every --wgmma-warpgroups)
        wgmma = [{"rows": r, "split_k": sp, "pipeline": bool(p), "warpgroups": wg, "ahead": ah, "x_chunks": xc}
                 for r in rows for sp in (args.wgmma_splits or args.splits) for p in args.wgmma_pipeline
                 for wg in pairs.get(r, args.wgmma_warpgroups) for ah in getattr(args, "wgmma_ahead", (2,))
                 for xc in getattr(args, "wgmma_x_chunks", (1,)) if ah % (2 * xc) == 0]
        if getattr(args, "wgmma_x_tma", False):  # each x_chunks 1 configuration again with x by TMA
            wgmma += [dict(c, x_tma=True) for c in wgmma if c["x_chunks"] == 1]
    return small + wide + wgmma


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=_ints, default=(1, 4, 8))
    ap.add_argument("--shapes", choices=("8b", "tp2", "both", "head"), default="both",
                    help="head: the 8B lm_head (4096 x 128,256) that --lm-head int4 quantizes at load")
    ap.add_argument("--out", default="bench/results/w4a16_mma.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU with TRITON_INTERPRET=1")
    ap.add_argument("--warps", type=_ints, default=(4, 8))
    ap.add_argument("--buffers", type=_ints, default=(2, 4), help="groups of words in flight")
    ap.add_argument("--blocks", type=_ints, default=(1, 2), help="16-column blocks a warp")
    ap.add_argument("--kw", type=_ints, default=(1,), help="warps of a program splitting each block's K (1, 2, 4)")
    ap.add_argument("--rw", type=_ints, default=(1,), help="row warps at 9-16 rows: 2 = two warps a block set, rows "
                    "0-7 and 8-15 (1, 2)")
    ap.add_argument("--stages", type=_ints, default=(0,),
                    help="1-16 rows: 0 = groups in registers (--buffers); 2+ = the pipelined loop's shared-memory ring")
    ap.add_argument("--tiles", type=_ints, default=(2, 4, 8),
                    help="the wide kernel (M > 16): 8-row tiles a program (those up to M / 8 are tried)")
    ap.add_argument("--wide-blocks", type=_ints, default=(1, 2), help="the wide kernel's 16-column blocks a warp")
    ap.add_argument("--wide-only", action="store_true", help="past 8 rows: time only the wide kernel's grid beside "
                    "the table's choice (not the 1-16 row kernel's)")
    ap.add_argument("--prefetch", type=_ints, default=(0,), help="the wide kernel: 1 = prefetch x a group ahead")
    ap.add_argument("--splits", type=_ints, default=SPLITS, help="split-K values tried")
    ap.add_argument("--wgmma-rows", type=_ints, default=(),
                    help="the wgmma kernel (Hopper): rows of x a program tried (8-256; those past 2M left out)")
    ap.add_argument("--wgmma-splits", type=_ints, default=(), help="the wgmma kernel's split-K values (default --splits)")
    ap.add_argument("--wgmma-pipeline", type=_ints, default=(1,), help="the wgmma kernel: 1 = async wgmma, 0 = sync")
    ap.add_argument("--wgmma-warpgroups", type=_ints, default=(1,),
                    help="the wgmma kernel: warpgroups a program (1, 2, 4; 64 output columns each, sharing the x tile)")
    ap.add_argument("--wgmma-ahead", type=_ints, default=(2,),
                    help="the wgmma kernel: 64-wide chunks of words and scales in flight a warp (2, 4, 8)")
    ap.add_argument("--wgmma-x-chunks", type=_ints, default=(1,),
                    help="the wgmma kernel: chunks of x stored a barrier (1, 2; ahead a multiple of 2 x_chunks)")
    ap.add_argument("--wgmma-x-tma", action="store_true",
                    help="the wgmma kernel: also each x_chunks 1 configuration with x by TMA (x_tma)")
    ap.add_argument("--wgmma-pairs", type=_pairs, default=None,
                    help="rows:warpgroups[:warpgroups..],... : the warpgroups tried at those rows (e.g. 16:1,64:2; "
                         "rows not named: --wgmma-warpgroups)")
    ap.add_argument("--wgmma-only", action="store_true",
                    help="time only the wgmma kernel's grid beside the table's choice (no mma.sync grids)")
    ap.add_argument("--fp16", action="store_true", help="also time fp16 cuBLAS (F.linear) on each shape")
    ap.add_argument("--hot-l2", action="store_true", help="one weight copy for all calls: the weight stays in L2 "
                    "where it fits (what on-chip weights would buy)")
    ap.add_argument("--write-table", action="store_true", help="merge the mma winners into the tuning table")
    ap.add_argument("--table", default=str(T.TABLE_PATH), help="the tuning table --write-table merges into")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.smoke:
        print("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = SMOKE_SHAPES if args.smoke else \
        {"8b": SHAPES, "tp2": TP2_SHAPES, "both": SHAPES + TP2_SHAPES, "head": HEAD_SHAPES}[args.shapes]
    report = {"env": environment(dev), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "group_size": GROUP, "copy": copy_bandwidth(dev), "hot_l2": args.hot_l2, "rows": []}
    print(f"{report['env']['device']}: copy {report['copy']['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    if args.wgmma_rows and not args.smoke and not WG.wgmma_available(torch.device("cuda")):
        print("--wgmma-rows: the wgmma kernel needs sm_90 and a Triton with Gluon; not timed here", flush=True)
    t0 = time.time()
    for k, n in shapes:
        silu = n in (28672, 14336) or (args.smoke and n == 64)  # the gate/up weights (their SiLU epilogue)
        report["rows"] += bench_shape(k, n, silu, args.ms, lambda m: grid(m, args), dev, args.fp16, args.hot_l2)
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
