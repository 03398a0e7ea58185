"""One prefill forward of a Llama-3-8B-shaped int4 workspace (random weights, RTN g128) at several prompt lengths,
under two or more W4A16 tuning tables in the same process: an A/B of table entries past 256 rows, where a prefill
chunk (up to `max_prefill_token_num` tokens) runs every linear.

    python bench/bench_prefill.py --tables kernels/w4a16_tuning.json,/tmp/before.json --lengths 512,1024,2048,8192 \
        --out bench/results/prefill_h200.json

Each timing is `Model.hidden` over one sequence of T tokens (no KV cache: the dense causal attention of perplexity
and calibration; the linears are the same calls a paged prefill makes), CUDA events, the median of `--repeats`
runs, eager or (`--graph`) a CUDA graph of it replayed (the kernels alone: an eager 8B prefill of 512 tokens waits
on the host's launches); the tables take turns (A, B, A, B, ...) so that clock drift does not favour one. The tables are switched by
pointing lmc.kernels.w4a16_tuning at each file and clearing its caches: no kernel is timed per call in lmc, so the
model (and its mma layouts) is loaded once.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (LLAMA3_8B, TINY, random_hf_model, state_source, versions, wordlevel_tokenizer,  # noqa: E402
                          write_int4, write_report)

from lmc.kernels import w4a16_tuning  # noqa: E402
from lmc.kernels.w4a16 import w4a16_config  # noqa: E402
from lmc.format.workspace import Workspace  # noqa: E402
from lmc.runtime.model import DenseCausal, Model  # noqa: E402


def use_table(path: Path) -> None:
    """lmc's W4A16 dispatch reads `path` from now on (its cached choices forgotten)."""
    w4a16_tuning.TABLE_PATH = Path(path)
    w4a16_tuning._tables.cache_clear()
    w4a16_tuning._config.cache_clear()


def build(work: Path, dev: str, smoke: bool) -> Path:
    """The int4 workspace (kept in `work` and reused by a later run)."""
    ws = work / ("tiny-int4" if smoke else "llama3-8b-int4")
    if (ws / "lmc.json").exists():
        return ws
    shape = TINY if smoke else LLAMA3_8B
    model, hf_config = random_hf_model(shape, dev, torch.float16)
    tok = wordlevel_tokenizer(shape["vocab_size"], shape["eos_token_id"] % shape["vocab_size"])
    source = state_source(model.state_dict(), hf_config, tok, "random Llama-3-8B shape")
    write_int4(source, ws, dev)
    del model, source
    torch.cuda.empty_cache()
    return ws


def prefill(model: Model, length: int, vocab: int, dev: str):
    """A callable running one Model.hidden over `length` tokens (fixed ids)."""
    ids = torch.randint(0, vocab, (length,), device=dev, generator=torch.Generator(dev).manual_seed(length))
    positions = torch.arange(length, device=dev)

    def run():
        with torch.inference_mode():
            model.hidden(ids, positions, DenseCausal(1, length), length - 1)
    return run


def captured(run) -> torch.cuda.CUDAGraph:
    """`run` as a CUDA graph (its kernels only: the host's launch time, which dominates an eager prefill of a few
    hundred tokens, left out)."""
    run()  # every kernel compiled and every table choice made before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def timed(fn) -> float:
    """ms of one call of fn on the GPU's clock."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def choices(model: Model, rows: int, dev: str) -> dict:
    """What the table in use gives the first layer's int4 linears at `rows` rows: {name: [path, config]}."""
    out = {}
    for name, w in model.layers[0].items():
        if hasattr(w, "qweight"):
            k, n = w.qweight.shape[0] * 8, w.qweight.shape[1]
            out[name] = list(w4a16_config(rows, n, k, torch.device(dev), w.mma is not None))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", required=True, help="comma-separated W4A16 tuning tables to take turns")
    ap.add_argument("--lengths", default="512,1024,2048,8192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="/tmp/lmc_bench_prefill")
    ap.add_argument("--out", required=True)
    ap.add_argument("--graph", action="store_true", help="time CUDA graph replays of the prefill (kernels only)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model (checks the script)")
    args = ap.parse_args()
    dev = "cuda"
    tables = [Path(t) for t in args.tables.split(",")]
    for t in tables:
        w4a16_tuning.read_tables(t)  # a bad table fails here, before the build
    lengths = [int(v) for v in args.lengths.split(",")]
    t0 = time.perf_counter()
    ws = build(Path(args.work), dev, args.smoke)
    built_s = time.perf_counter() - t0
    model = Model(Workspace(ws), torch.device(dev), torch.float16)
    vocab = model.cfg.vocab_size
    times: dict[str, dict[int, list[float]]] = {str(t): {n: [] for n in lengths} for t in tables}
    for n in lengths:
        run = prefill(model, n, vocab, dev)
        fns = {}
        for t in tables:
            use_table(t)
            fns[t] = captured(run).replay if args.graph else run
            if not args.graph:
                run()  # compiled before any timing
        for _ in range(args.repeats):
            for t in tables:
                use_table(t)
                times[str(t)][n].append(timed(fns[t]))
        del fns
        torch.cuda.empty_cache()
    rows = []
    for n in lengths:
        row = {"tokens": n}
        for t in tables:
            ms = times[str(t)][n]
            use_table(t)
            row[str(t)] = {"median_ms": statistics.median(ms), "runs_ms": ms,
                           "tokens_per_s": n / statistics.median(ms) * 1e3, "choices": choices(model, n, dev)}
        rows.append(row)
        print(f"T={n}: " + ", ".join(f"{t}: {row[str(t)]['median_ms']:.2f} ms" for t in tables), flush=True)
    report = {"device": torch.cuda.get_device_name(), "env": versions(), "command": " ".join(sys.argv),
              "workspace": "random Llama-3-8B shape, int4 g128 RTN (bench_decode.write_int4), lm_head fp16",
              "timing": f"Model.hidden over one sequence (DenseCausal), {'CUDA graph replays' if args.graph else 'eager'}, "
                        f"CUDA events, median of {args.repeats}, tables interleaved", "build_s": built_s, "rows": rows}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
