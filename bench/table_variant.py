"""Replace one entry of the W4A16 tuning table in place, for an A/B inside the decode step (run it on a throwaway copy
of the repository, e.g. the device machine's): the table's entries are timed one kernel at a time, and the step
can prefer another (bench/NOTES.md, session 21: M = 1 4096x6144 on an H200). `--restore` puts back the table saved
by the first call (and forgets it); calls before a restore add up.

    python bench/table_variant.py --device "NVIDIA H200" --m 1 --shape 4096x6144 --path mma \
        --config '{"warps": 4, "split_k": 8, "buffers": 2}'
    python bench/bench_tp.py --formats int4 --batches 1 --tp1-only --step-only --skip-check --skip-bench --out ...
    python bench/table_variant.py --restore
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmc.kernels import w4a16_tuning as T  # noqa: E402

SAVED = Path("/tmp/lmc_w4a16_tuning_saved.json")


def replace_entry(tables: dict, device: str, m: int, k: int, n: int, path: str, config: dict) -> dict:
    """The entry (m, k, n) of `device` set to (path, config); an mma entry keeps a non-mma fallback (the old
    entry's, or its fallback), a non-mma entry drops it. Raises KeyError if the table has no such entry."""
    entry = next((e for e in tables["devices"][device]["entries"] if (e["m"], e["k"], e["n"]) == (m, k, n)), None)
    if entry is None:
        raise KeyError(f"{device!r} has no entry for M = {m}, {k}x{n}")
    old = {"path": entry["path"], "config": entry["config"]}
    fallback = entry.get("fallback") or old
    entry.update(path=path, config=config)
    entry.pop("fallback", None)
    if path == "mma":
        entry["fallback"] = fallback
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device")
    ap.add_argument("--m", type=int)
    ap.add_argument("--shape", help="KxN")
    ap.add_argument("--path", choices=T.PATHS)
    ap.add_argument("--config", help="the launcher keywords, JSON")
    ap.add_argument("--restore", action="store_true")
    args = ap.parse_args()
    if args.restore:
        if SAVED.exists():
            shutil.copyfile(SAVED, T.TABLE_PATH)
            SAVED.unlink()
        return
    if not SAVED.exists():
        shutil.copyfile(T.TABLE_PATH, SAVED)
    tables = T.read_tables(T.TABLE_PATH)  # earlier replacements stay (several entries at once)
    k, n = (int(v) for v in args.shape.split("x"))
    entry = replace_entry(tables, args.device, args.m, k, n, args.path, json.loads(args.config))
    T.write_tables(tables, T.TABLE_PATH)
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
