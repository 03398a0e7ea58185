"""Serving benchmark on one GPU: `lmc bench` over 8B-shaped fp16 and int4 workspaces at several concurrencies,
and transformers' batched `generate` on the same fp16 weights as the baseline, in one run.

The model is a random Llama-3-8B-shaped checkpoint (transformers' own init on the GPU, saved as an HF folder
with a word-level tokenizer), built into workspaces by lmc's own commands: `lmc convert` (fp16) and
`lmc quantize --calib-samples 0 --workspace` (RTN int4, g128). Requests use the random ShareGPT-like
lengths of `lmc bench` (224 prompt / 200 output tokens on average, range ratio 0.5), EOS ignored.

    python bench/bench_serving.py --out bench/results/serving_h200.json            # on the GPU machine
    python bench/bench_serving.py --smoke --out /tmp/serving_smoke.json            # tiny shapes, checks the script
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import LLAMA3_8B, TINY, random_hf_model, versions, wordlevel_tokenizer  # noqa: E402

from lmc import bench as B  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.engine import Engine  # noqa: E402


def build(shape: dict, work: Path, dev: str, formats: tuple[str, ...] = ("fp16", "int4")) -> dict[str, Path]:
    """The HF folder, then lmc's fp16 and int4 workspaces of it (those in `formats`; skipped when already built)."""
    hf, fp16, int4 = work / "hf", work / "fp16", work / "int4"
    timings = {}
    if not (hf / "config.json").is_file():
        t0 = time.perf_counter()
        model, _ = random_hf_model(shape, dev, torch.float16)
        model.save_pretrained(hf)
        for name, data in wordlevel_tokenizer(shape["vocab_size"], shape["eos_token_id"] % shape["vocab_size"]).items():
            (hf / name).write_bytes(data)
        del model
        torch.cuda.empty_cache()
        timings["hf_s"] = time.perf_counter() - t0
    for out, cmd in ((fp16, ["convert", str(hf), "-o", str(fp16), "--dtype", "float16", "--force"]),
                     (int4, ["quantize", str(hf), "-o", str(int4), "--calib-samples", "0", "--w-group-size", "128",
                             "--workspace", "--force"])):
        if out.name in formats and not (out / "lmc.json").is_file():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lmc", *cmd], check=True)
            timings[f"{out.name}_s"] = time.perf_counter() - t0
    print(f"built {timings}", flush=True)
    return {"hf": hf, "fp16": fp16, "int4": int4}


def lmc_runs(ws: Path, plan: list[tuple[int, int]], args) -> list[dict]:
    """One engine, `lmc bench`'s client loop at each (concurrency, requests)."""
    engine = Engine(str(ws), EngineConfig(max_batch_size=max(c for c, _ in plan), session_len=args.session_len))
    vocab = list(range(10, engine.cfg.vocab_size))
    warmup = engine.warmup()  # as `lmc bench` does: no kernel compiles inside a timed run (bench/NOTES.md, session 19)
    print(f"  {ws.name} warm-up {warmup}", flush=True)
    engine.start()
    rows = []
    try:
        for concurrency, n in plan:
            requests = B.random_requests(n, args.input_len, args.output_len, 0.5, vocab, seed=concurrency)
            warm = B.random_requests(min(n, 2 * concurrency), args.input_len, args.output_len, 0.5, vocab,
                                     seed=concurrency + 1)
            B.run_bench(warm, concurrency, B.engine_sender(engine), False)  # warm-up run (no prefix-cache hits)
            result = B.run_bench(requests, concurrency, B.engine_sender(engine), False)
            result.update(concurrency=concurrency, num_prompts=n, stats=vars(engine.stats()))
            rows.append(result)
            print(f"  {ws.name} c={concurrency:<4} n={n:<5} {result['output_throughput']:9.1f} out tok/s  "
                  f"TTFT p99 {result['ttft_ms']['p99']} ms  TPOT p50 {result['tpot_ms']['p50']} ms", flush=True)
    finally:
        engine.stop()
    del engine
    torch.cuda.empty_cache()
    return rows


def transformers_runs(hf: Path, batches: list[int], args) -> list[dict]:
    """transformers' batched generate: B prompts of input_len tokens, output_len new tokens each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16, device_map="cuda").eval()
    rows = []
    for batch in batches:
        ids = torch.randint(10, model.config.vocab_size, (batch, args.input_len), device="cuda")
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        assert out.shape[1] == args.input_len + args.output_len
        rows.append({"batch": batch, "seconds": seconds, "output_throughput": batch * args.output_len / seconds})
        print(f"  transformers B={batch:<4} {rows[-1]['output_throughput']:9.1f} out tok/s", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lmc_bench_serving")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few requests: checks the script")
    parser.add_argument("--skip", default="", help="comma-separated: fp16, int4, transformers")
    parser.add_argument("--build-only", action="store_true", help="build the workspaces and stop")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    skip = set(filter(None, args.skip.split(",")))
    args.input_len, args.output_len, args.session_len = (24, 16, 128) if args.smoke else (224, 200, 1024)
    # requests per concurrency: 1,000 where the run stays short; fewer at low concurrency (1,000 requests of
    # 200 tokens one at a time would take ~15 minutes of device time)
    plan = [(1, 4), (4, 16)] if args.smoke else [(1, 16), (16, 320), (64, 1000), (256, 1000)]
    work = Path(args.work)
    paths = build(TINY if args.smoke else LLAMA3_8B, work, "cuda")
    if args.build_only:
        return 0
    report = {"device": torch.cuda.get_device_name(), "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "host": platform.node(),
              "model": "random Llama-3-8B shape" if not args.smoke else "tiny", "settings": {
                  "input_len_mean": args.input_len, "output_len_mean": args.output_len, "range_ratio": 0.5,
                  "session_len": args.session_len, "plan": plan}, "lmc": {}, "transformers": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    for name in ("fp16", "int4"):
        if name not in skip:
            report["lmc"][name] = lmc_runs(paths[name], plan, args)
            save()
    if "transformers" not in skip:
        report["transformers"] = transformers_runs(paths["hf"], [4, 16] if args.smoke else [16, 64], args)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
