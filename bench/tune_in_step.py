"""Tune W4A16 table entries where they run: inside the 8B decode step, not kernel by kernel.

Session 21 (bench/NOTES.md) found that a kernel timed alone, or after an RMSNorm in a short chain, can rank the
configurations of one shape differently from the step (M = 1 qkv on an H200: the mma kernel is 0.5 µs slower
alone and 0.6 µs faster in the step). This script A/Bs table variants in the step: each variant replaces one or
more entries of kernels/w4a16_tuning.json (bench/table_variant.py's `replace_entry`), a fresh
`bench/bench_tp.py --step-only` process times the step, the table is restored, and the shipped table (`base`)
runs between the variants, `--repeats` rounds, after one discarded warm-up run. A variant wins only if every one
of its runs is faster than every base run; `--write-table` then writes the fastest winner into the table (run it
on a copy of the repository whose table you mean to change, e.g. the device machine's, and bring the table back).

    python bench/tune_in_step.py --variants bench/variants_tp2_m1_h200.json --tp 2 --batch 1 --repeats 3 \
        --work /tmp/w --out $OUT/tune_tp2_m1_h200.json [--write-table]

Variants file: [{"name": "qkv_mma", "replace": [{"device": "NVIDIA H200", "m": 1, "shape": "4096x3072",
"path": "mma", "config": {"warps": 4, "split_k": 8, "buffers": 2}}]}, ...]; a variant may instead (or as well)
set environment variables for its runs, {"name": "no_fused_rope", "env": {"LMC_FUSED_ROPE": "0"}}: the same
interleaving and the same rule for an A/B switch of the runtime.

`--measure graph` (tp 1): time the step's CUDA graph replayed alone (300 replays, CUDA events;
bench_decode.time_graph_replays) instead of 20 engine steps with their host work: the kernels only, for table A/Bs
whose effect is smaller than the step's run-to-run spread (batch 16: 2.84-3.03 ms in sessions 21-22).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from lmc.kernels import w4a16_tuning as T  # noqa: E402
from table_variant import replace_entry  # noqa: E402


def _replace_all(tables: dict, variant: dict | None) -> None:
    """The variant's table replacements (none for the base, or for an environment-only variant), in place."""
    for r in (variant or {}).get("replace", []):
        k, n = (int(v) for v in r["shape"].split("x"))
        replace_entry(tables, r["device"], r["m"], k, n, r["path"], r["config"])


def apply(variant: dict | None, table: Path, saved: Path) -> None:
    """The table at `table` = the saved one with the variant's replacements (none for the base)."""
    tables = T.read_tables(saved)
    _replace_all(tables, variant)
    T.write_tables(tables, table)


REPLACE_KEYS = {"device", "m", "shape", "path", "config"}


def read_variants(path: Path) -> list[dict]:
    """The variants file, checked before any run: a list of {name, replace: [{device, m, shape "KxN", path,
    config}], env: {NAME: value}} with unique names and at least one replacement or variable each; a ValueError
    naming the first problem otherwise."""
    try:
        variants = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a JSON variants file ({e})") from None
    if not isinstance(variants, list) or not variants:
        raise ValueError(f"{path}: expected a non-empty JSON list of variants")
    names = set()
    for i, v in enumerate(variants):
        where = f"{path}: variant {i}"
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"] or v["name"] in names:
            raise ValueError(f"{where}: needs a unique, non-empty \"name\"")
        names.add(v["name"])
        replace, env = v.get("replace", []), v.get("env", {})
        if not isinstance(replace, list) or not isinstance(env, dict) or not (replace or env):
            raise ValueError(f"{where} ({v['name']}): needs a \"replace\" list or an \"env\" object")
        for r in replace:
            if not isinstance(r, dict) or set(r) != REPLACE_KEYS or not isinstance(r["config"], dict) \
                    or not isinstance(r["shape"], str) or len(r["shape"].split("x")) != 2 \
                    or not all(d.isdigit() for d in r["shape"].split("x")):
                raise ValueError(f"{where} ({v['name']}): a replacement needs exactly {sorted(REPLACE_KEYS)}, "
                                 f"shape as \"KxN\" and config an object, got {r!r}"[:300])
        if not all(isinstance(k, str) and isinstance(val, str) for k, val in env.items()):
            raise ValueError(f"{where} ({v['name']}): env values must be strings")
    return variants


def wins(base: list[float], runs: list[float]) -> bool:
    """Every run of the variant faster than every base run (the step's spread between runs of one table is wider
    than most single-entry effects: a median would pick noise)."""
    return bool(base and runs) and max(runs) < min(base)


def tune(variants: list[dict], measure: Callable[[dict], float], repeats: int, table: Path) -> dict:
    """Times the base and each variant `repeats` times (interleaved, after one discarded base run) with
    `measure(env)` (ms a step, the table at `table` already set, env the variant's environment variables); the
    table is restored after every run, whatever happens."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "table.json"
        shutil.copyfile(table, saved)
        try:
            measure({})  # warm-up: the first run of a machine compiles and builds, and is slower
            runs: dict[str, list[float]] = {"base": []}
            for _ in range(repeats):
                for v in [None] + variants:
                    apply(v, table, saved)
                    try:
                        ms = measure((v or {}).get("env", {}))
                    finally:
                        shutil.copyfile(saved, table)
                    runs.setdefault("base" if v is None else v["name"], []).append(ms)
                    print(f"  {'base' if v is None else v['name']:<24} {ms:8.3f} ms", flush=True)
        finally:
            shutil.copyfile(saved, table)
    base = runs["base"]
    rows = [{"name": v["name"], "replace": v.get("replace", []), "env": v.get("env", {}), "runs_ms": runs[v["name"]],
             "median_ms": statistics.median(runs[v["name"]]), "wins": wins(base, runs[v["name"]])} for v in variants]
    winners = sorted((r for r in rows if r["wins"]), key=lambda r: r["median_ms"])
    return {"base_runs_ms": base, "base_median_ms": statistics.median(base), "variants": rows,
            "best": winners[0]["name"] if winners else None}


def write_winner(result: dict, variants: list[dict], table: Path, note: str) -> None:
    """The best winner's replacements into the table, with a line in each touched device's source (an
    environment variable that won is reported, not written)."""
    best = next(v for v in variants if v["name"] == result["best"])
    tables = T.read_tables(table)
    _replace_all(tables, best)
    for device in {r["device"] for r in best.get("replace", [])}:
        dev = tables["devices"][device]
        dev["source"] += f"; {best['name']} by bench/tune_in_step.py ({note})"
    T.write_tables(tables, table)


def bench_tp_step(args, out: Path) -> Callable[[dict], float]:
    """`measure` for the real thing: one bench_tp.py process, the step time of args.batch at args.tp."""
    cmd = [sys.executable, str(Path(__file__).parent / "bench_tp.py"), "--work", args.work, "--formats", args.format,
           "--batches", str(args.batch), "--step-only", "--skip-check", "--skip-bench", "--out", str(out)]
    if args.measure == "graph":
        cmd += ["--graph-replays", "300"]
    if args.tp == 1:
        cmd.append("--tp1-only")
    if args.smoke:
        cmd.append("--smoke")

    def measure(env: dict) -> float:
        run = cmd if args.tp == 1 or not out.exists() else cmd + ["--tp1-from", str(out)]  # tp 1 timed once
        subprocess.run(run, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **env})
        entry = json.loads(out.read_text())["formats"][args.format]
        key = "tp1" if args.tp == 1 else next(k for k in entry if k.startswith("tp2"))
        row = next(d for d in entry[key]["decode"] if d["batch"] == args.batch)
        if args.measure == "graph":
            if not row.get("graph"):
                raise RuntimeError("--measure graph: bench_tp.py timed no graph (needs CUDA graphs at tp 1)")
            return row["graph"]["ms"]
        return row["step_only_ms"]

    return measure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", required=True, help="JSON file: a list of {name, replace: [...]}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, choices=(1, 2), default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--measure", choices=("step", "graph"), default="step", help="step: engine decode steps (host "
                    "included); graph: the step's CUDA graph replayed alone (tp 1)")
    ap.add_argument("--work", default="/tmp/lmc_bench_serving")
    ap.add_argument("--write-table", action="store_true", help="write the fastest winner into the table")
    ap.add_argument("--smoke", action="store_true",
                    help="bench_tp.py --smoke (tiny fp16 model, CPU): checks the script")
    args = ap.parse_args()
    if args.measure == "graph" and (args.tp != 1 or args.smoke):
        print("error: --measure graph times tp 1 CUDA graphs (no --tp 2, no --smoke)", file=sys.stderr)
        return 2
    try:
        variants = read_variants(Path(args.variants))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        result = tune(variants, bench_tp_step(args, Path(tmp) / "step.json"), args.repeats, T.TABLE_PATH)
    result.update(device=device, command=" ".join(sys.argv), tp=args.tp, batch=args.batch, format=args.format)
    if args.write_table and result["best"]:
        write_winner(result, variants, T.TABLE_PATH, f"{args.format} batch {args.batch} tp {args.tp}: "
                     f"{result['base_median_ms']:.3f} -> "
                     f"{next(r['median_ms'] for r in result['variants'] if r['name'] == result['best']):.3f} ms")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"best: {result['best']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
