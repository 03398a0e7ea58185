"""Tensor parallel on 2 GPUs: the 8B-shaped fp16 and int4 workspaces at tp = 1 and tp = 2, in one run.

For each format: the tp = 2 workspace is cut from the tp = 1 one (`lmc convert WS -o WS_tp2 --tp 2`);
greedy tokens of 3 short prompts at tp = 1 and tp = 2 computed in float32 (the check: equal tokens) and
in the stored dtype (recorded: fp16 sums in another order may flip a near-tie); batch-1 and batch-16
decode (CUDA graphs, pipelined greedy) and `lmc bench` (ShareGPT-like random lengths, 224 / 200 tokens
mean) at concurrency 256 at both tp. The workspaces are bench_serving.py's (same folder, built if absent).
tp = 2 runs once per LMC_TP_ALLREDUCE mode (--allreduce) and LMC_TP_LM_HEAD mode (--lm-head): result keys
`tp2[_MODE]_lm_head_LM` (`tp2` alone: NCCL; files before the split lm_head have no `_lm_head_` part: replicated).

    python bench/bench_tp.py --out bench/results/tp_h200x2.json                 # on a 2-GPU machine
    python bench/bench_tp.py --smoke --out /tmp/tp_smoke.json                   # tiny shapes (CPU: gloo ranks)
    python bench/bench_tp.py --allreduce one-shot --lm-head split,replicated --skip-bench --formats fp16,int4 \
        --tp1-from bench/results/tp_h200x2_v1.json --out bench/results/tp_h200x2_v5.json   # split vs replicated
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import LLAMA3_8B, TINY, prompts_for, time_decode_step, time_graph_replays, timed_generate, \
    versions  # noqa: E402
from bench_serving import build  # noqa: E402

from lmc import bench as B  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.engine import Engine  # noqa: E402
from lmc.runtime.sampling import GenerationConfig  # noqa: E402


def split(ws: Path, tp: int) -> Path:
    out = ws.with_name(f"{ws.name}_tp{tp}")
    if not (out / "lmc.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lmc", "convert", str(ws), "-o", str(out), "--tp", str(tp), "--force"],
                       check=True)
        print(f"split {ws.name} for tp={tp} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def greedy(ws: Path, dev: str, dtype: str | None, vocab: int) -> list[list[int]]:
    """16 greedy tokens after each of 3 short prompts (15 prompt tokens in all: the int4 kernels' float32
    configs cover M <= 16)."""
    engine = Engine(str(ws), EngineConfig(device=dev, dtype=dtype, session_len=256, max_batch_size=4,
                                          cache_max_entry_count=0.3))
    try:
        prompts = [prompts_for(1, n, vocab, seed=n)[0] for n in (5, 7, 3)]
        return [r.token_ids for r in engine.generate(prompts, GenerationConfig(max_new_tokens=16, ignore_eos=True))]
    finally:
        engine.close()


def speed(ws: Path, dev: str, vocab: int, args) -> dict:
    """Decode at each of --batches (median of 3 runs), then lmc bench at each concurrency."""
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine(str(ws), EngineConfig(device=dev, session_len=args.session_len,
                                          max_batch_size=max(*args.concurrency, *batches)))  # every batch runs at once
    out = {"decode": [], "bench": []}
    try:
        if dev == "cuda" and not args.no_warmup:  # as `lmc bench` does: no kernel compiles inside a timed run (bench/NOTES.md, session 19)
            out["warmup"] = engine.warmup()
        for batch in batches:
            prompts = prompts_for(batch, args.prompt_tokens, vocab)
            timed_generate(engine, prompts, 4, dev)  # capture this bucket's graph on every rank
            # a pure decode step with every sequence running (timed_generate's steps include the prefill chunks
            # and partial batches once batch x prompt tokens passes max_prefill_token_num: batch >= 128 here)
            log = {}
            step_only = time_decode_step(engine, batch, args.prompt_tokens + args.new_tokens // 2, vocab, dev, 20, log)
            row = {"batch": batch, "step_only_ms": step_only, "step_only_log": log}  # each step (session 20: bimodal)
            if args.graph_replays:  # the step's graph alone (tp 1): the kernels without the host's share
                row["graph"] = time_graph_replays(engine, batch, args.prompt_tokens + args.new_tokens // 2, vocab,
                                                  args.graph_replays)
            if not args.step_only:
                runs = sorted((timed_generate(engine, prompts, args.new_tokens, dev) for _ in range(3)),
                              key=lambda r: r["step_ms"])
                best = runs[1]
                row.update(step_ms=best["step_ms"], tok_s=best["tok_s"], ttft_ms=best["ttft_ms"],
                           step_ms_runs=[r["step_ms"] for r in runs])
            out["decode"].append(row)
            print(f"  {ws.name} B={batch:<3} " + (f"{row['step_ms']:8.3f} ms/step {row['tok_s']:9.1f} tok/s, "
                                                  if "step_ms" in row else "") +
                  f"step only {step_only:8.3f} ms", flush=True)
        engine.start()
        for c in () if args.skip_bench else args.concurrency:
            requests = B.random_requests(args.num_prompts, args.input_len, args.output_len, 0.5,
                                         list(range(10, vocab)), seed=c)
            warm = B.random_requests(c, args.input_len, args.output_len, 0.5, list(range(10, vocab)), seed=c + 1)
            B.run_bench(warm, c, B.engine_sender(engine), False)  # warm-up run (other prompts: no prefix-cache hits)
            result = B.run_bench(requests, c, B.engine_sender(engine), False)
            result.update(concurrency=c, num_prompts=args.num_prompts, stats=vars(engine.stats()))
            out["bench"].append(result)
            print(f"  {ws.name} bench c={c} {result['output_throughput']:9.1f} out tok/s  TPOT p50 "
                  f"{result['tpot_ms']['p50']} ms", flush=True)
    finally:
        engine.close()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/lmc_bench_serving")
    ap.add_argument("--formats", default="fp16,int4")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip-check", nargs="?", const="fp16,int4", default="",
                    help="skip the float32 greedy check (of these formats; all without a value)")
    ap.add_argument("--tp1-from", help="take the tp = 1 speed from this earlier result file (same device) instead "
                    "of measuring it again")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-bench", action="store_true", help="decode only, no lmc bench")
    ap.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes")
    ap.add_argument("--tp1-only", action="store_true", help="tp = 1 alone (one GPU): A/Bs of single-GPU changes")
    ap.add_argument("--step-only", action="store_true",
                    help="decode speed from full decode steps only (time_decode_step), no generate runs")
    ap.add_argument("--graph-replays", type=int, default=0,
                    help="also time the decode step's CUDA graph alone, replayed N times (tp 1; row key graph)")
    ap.add_argument("--no-warmup", action="store_true", help="skip Engine.warmup (each bucket's graph is captured at "
                    "its first decode, as before session 19)")
    ap.add_argument("--stored-check", action="store_true", help="also compare greedy tokens in the stored dtype")
    ap.add_argument("--allreduce", default="one-shot", help="comma-separated LMC_TP_ALLREDUCE modes for tp 2: one-shot "
                    "(kernels/allreduce.py, the runtime's default), nccl; the greedy check runs under the first")
    ap.add_argument("--lm-head", default="split", help="comma-separated LMC_TP_LM_HEAD modes for tp 2: split (each "
                    "rank computes V / 2 of the logits, the runtime's default), replicated (rank 0 all of them); the "
                    "greedy check runs under the first")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and torch.cuda.device_count() < 2 and not args.smoke and not args.tp1_only:
        ap.error("needs 2 GPUs")
    shape = TINY if args.smoke else LLAMA3_8B
    args.prompt_tokens, args.new_tokens = (16, 8) if args.smoke else (128, 64)
    args.input_len, args.output_len, args.session_len = (24, 16, 128) if args.smoke else (224, 200, 1024)
    args.concurrency, args.num_prompts = ((4,), 8) if args.smoke else ((256,), 512)
    work = Path(args.work)
    if dev == "cuda":
        paths = build(shape, work, dev, tuple(args.formats.split(",")))
    else:  # smoke on the CPU: bench_serving builds on CUDA only
        from lmc.compiler.convert import convert

        paths = {"fp16": work / "fp16"}
        if not (work / "fp16" / "lmc.json").is_file():
            from bench_decode import random_hf_model, wordlevel_tokenizer

            model, _ = random_hf_model(shape, "cpu", torch.float16)
            model.save_pretrained(work / "hf")
            for name, data in wordlevel_tokenizer(shape["vocab_size"], shape["eos_token_id"]).items():
                (work / "hf" / name).write_bytes(data)
            convert(work / "hf", work / "fp16", dtype="float16")
    report = {"device": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if dev == "cuda" else "cpu",
              "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "model": "tiny" if args.smoke else "random Llama-3-8B shape", "settings": {
                  "decode_prompt_tokens": args.prompt_tokens, "decode_new_tokens": args.new_tokens,
                  "bench_input_len_mean": args.input_len, "bench_output_len_mean": args.output_len,
                  "num_prompts": args.num_prompts, "concurrency": args.concurrency}, "formats": {}}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    for fmt in filter(None, args.formats.split(",")):
        if fmt not in paths:
            continue
        one = paths[fmt]
        two = None if args.tp1_only else split(one, 2)
        entry = report["formats"].setdefault(fmt, {})
        modes, heads = args.allreduce.split(","), args.lm_head.split(",")
        os.environ["LMC_TP_ALLREDUCE"] = modes[0]  # the followers are spawned: they inherit it
        os.environ["LMC_TP_LM_HEAD"] = heads[0]
        if fmt not in args.skip_check.split(",") and two is not None:
            for dtype in ("float32", None) if args.stored_check else ("float32",):
                name = dtype or "stored"
                t1, t2 = greedy(one, dev, dtype, shape["vocab_size"]), greedy(two, dev, dtype, shape["vocab_size"])
                entry[f"greedy_{name}"] = {"tp1": t1, "tp2": t2, "equal": t1 == t2}
                print(f"  {fmt} greedy {name}: tp2 == tp1 {t1 == t2}", flush=True)
                save()
        if not args.skip_speed:
            if args.tp1_from:
                entry["tp1"] = json.loads(Path(args.tp1_from).read_text())["formats"][fmt]["tp1"]
                entry["tp1_from"] = args.tp1_from
            else:
                entry["tp1"] = speed(one, dev, shape["vocab_size"], args)
            save()
            for mode in modes if two is not None else ():
                for head in heads:
                    os.environ["LMC_TP_ALLREDUCE"], os.environ["LMC_TP_LM_HEAD"] = mode, head
                    suffix = ("" if mode == "nccl" else f"_{mode}") + f"_lm_head_{head}"
                    key = "tp2" + suffix
                    entry[key] = speed(two, dev, shape["vocab_size"], args)
                    d1, d2 = entry["tp1"]["decode"], entry[key]["decode"]
                    speedup = {f"decode_b{a['batch']}": (b["tok_s"] / a["tok_s"] if "tok_s" in a else
                                                          a["step_only_ms"] / b["step_only_ms"]) for a, b in zip(d1, d2)}
                    if not args.skip_bench:
                        speedup["bench_c256"] = (entry[key]["bench"][0]["output_throughput"]
                                                 / entry["tp1"]["bench"][0]["output_throughput"])
                    entry["speedup" + suffix] = speedup
                    print(f"  {fmt} speedup tp2/tp1 ({mode}, lm_head {head}) {speedup}", flush=True)
                    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
