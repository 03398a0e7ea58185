"""The 8B int4 decode step under two or more whole W4A16 tuning tables: each table's engine loaded in turn (the mma
layout is built at load only where the table has mma entries, so a table without them is a different engine, not
just other launches), and each batch's CUDA graph replayed alone (bench_decode.time_graph_replays: kernels only, no
host work). The tables take turns within each round (A, B, A, B, ...), so that clock drift favours neither.

    python bench/bench_decode_tables.py --tables kernels/w4a16_tuning.json,/tmp/candidate.json \
        --batches 1,16,64,128,256 --rounds 2 --out $OUT/decode_tables_h100.json
    python bench/bench_decode_tables.py --smoke --tables kernels/w4a16_tuning.json --batches 1,2 --out /tmp/t.json

The engine is built per table and round, and its graphs are captured under that table only (the table's cached
choices are forgotten between tables: bench_prefill.use_table). Writes JSON: per table and batch the graph ms of
each round, their median, and the int4 linears' choices at that batch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import free, time_graph_replays, versions, write_report  # noqa: E402
from bench_prefill import build, choices, use_table  # noqa: E402

from lmc.kernels import w4a16_tuning  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.engine import Engine  # noqa: E402


def one_round(ws: Path, table: Path, batches: list[int], kv_len: int, dev: str, replays: int) -> tuple[dict, dict]:
    """{batch: graph ms} for a fresh engine under `table`, and {batch: the first layer's int4 choices}."""
    use_table(table)
    engine = Engine(str(ws), EngineConfig(device=dev, session_len=kv_len + 256, max_batch_size=max(batches),
                                          cache_block_seq_len=64))
    vocab = engine.model.cfg.vocab_size
    ms, picked = {}, {}
    for b in batches:
        timed = time_graph_replays(engine, b, kv_len, vocab, replays=replays)
        if timed is None:
            raise RuntimeError("no CUDA graph to replay (needs CUDA and tp 1)")
        ms[b] = timed["ms"]
        picked[b] = choices(engine.model, b, dev)
        print(f"  {table}: B={b:<4} {ms[b]:.4f} ms", flush=True)
    del engine
    free(dev)
    return ms, picked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", required=True, help="comma-separated W4A16 tuning tables to take turns")
    ap.add_argument("--batches", default="1,16,64,128,256")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-len", type=int, default=256, help="tokens in each sequence's cache during the steps")
    ap.add_argument("--replays", type=int, default=300)
    ap.add_argument("--work", default="/tmp/lmc_bench_prefill", help="where the int4 workspace is built (reused)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny model (checks the script)")
    args = ap.parse_args()
    dev = "cuda"
    tables = [Path(t) for t in args.tables.split(",")]
    for t in tables:
        w4a16_tuning.read_tables(t)  # a bad table fails here, before the build
    batches = [int(v) for v in args.batches.split(",")]
    t0 = time.perf_counter()
    ws = build(Path(args.work), dev, args.smoke)
    built_s = time.perf_counter() - t0
    runs = {str(t): {b: [] for b in batches} for t in tables}
    picked = {}
    for r in range(args.rounds):
        for t in tables:
            ms, picked[str(t)] = one_round(ws, t, batches, args.kv_len, dev, args.replays)
            for b in batches:
                runs[str(t)][b].append(ms[b])
    rows = []
    for b in batches:
        row = {"batch": b}
        for t in tables:
            row[str(t)] = {"median_ms": statistics.median(runs[str(t)][b]), "runs_ms": runs[str(t)][b],
                           "choices": picked[str(t)][b]}
        rows.append(row)
        print(f"B={b}: " + ", ".join(f"{t}: {row[str(t)]['median_ms']:.3f} ms" for t in tables), flush=True)
    report = {"device": torch.cuda.get_device_name(), "env": versions(), "command": " ".join(sys.argv),
              "workspace": "random Llama-3-8B shape, int4 g128 RTN (bench_decode.write_int4), lm_head fp16",
              "timing": f"the decode step's CUDA graph replayed alone ({args.replays} replays, median of 5 chunks), "
                        f"kv len {args.kv_len}, a fresh engine per table and round, tables interleaved",
              "build_s": built_s, "rows": rows}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
