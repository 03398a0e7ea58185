"""KV cache quantization on the GPU, Llama-3-8B shape: decode step time at long context and the requests a
fixed KV budget holds while serving, quant_policy 0 vs 8 vs 4.

    python bench/bench_kv.py --out bench/results/kv_quant_h200.json     # GPU: ~5 minutes with the build
    python bench/bench_kv.py --smoke --out /tmp/kv_smoke.json            # tiny shapes on the CPU, ~1 minute

One random fp16 model of the 8B shape (bench_decode.random_hf_model: transformers' init on the GPU) is
written once as an fp16 workspace by lmc's converter (bench_decode.write_float). Each policy then gets one
Engine on it (max_batch_size 256, session_len 16384, cache_max_entry_count 0.8, 64-token blocks):

1. Decode step time, KV length L in 1k / 4k / 16k x batch B in 1 / 16 / 64. B sequences of L tokens take
   their blocks from the engine's block manager, and the cache is filled by writing it directly (random
   fp16 K/V; random codes with plausible scales and zeros for 8 / 4) instead of prefilling: 64 x 16k tokens
   of 8B prefill would take minutes per policy. A step is GraphDecoder.step, the engine's CUDA-graph decode
   (input packing, graph replay, logits copy; no sampling): each sequence writes its token at position
   L - 1 and attends to L tokens. Median of --iters (20) timed steps after 3 warm-up steps (the first captures
   the bucket's graph). A (B, L) whose blocks exceed the policy's cache is skipped and recorded with the
   blocks it needs and the blocks the cache has (fp16 at 64 x 16k needs 128 GiB).
2. Serving: `lmc bench`'s client loop (lmc.bench: ShareGPT-like random lengths, 224 prompt / 200 output
   tokens mean, range ratio 0.5, EOS ignored) at concurrency 256 over --requests requests (default 512,
   capped so the run fits ~5 minutes), after a warm-up of 256 other requests cut to 8 output tokens. Every
   policy gets the same KV budget in bytes, --kv-budget-tokens tokens of fp16 KV (default 49152: 6 GiB on the 8B,
   less than the ~110k tokens 256 of these requests hold at their longest): the engine's blocks beyond the
   budget are reserved, so the scheduler sees only the budget. Reports output tok/s, the peak number of
   running requests (len(scheduler.running), sampled every millisecond), preemptions.

Writes JSON (device name, versions, settings, per policy: cache blocks and bytes, decode rows, serving).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import (LLAMA3_8B, TINY, free, random_hf_model, state_source, sync, versions,  # noqa: E402
                          wordlevel_tokenizer, write_float)

from lmc import bench as B  # noqa: E402
from lmc.kernels import attention  # noqa: E402
from lmc.kernels.kv_quant import QuantizedKV  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.cuda_graph import GraphDecoder  # noqa: E402
from lmc.runtime.engine import Engine  # noqa: E402
from lmc.runtime.kv_cache import bytes_per_block  # noqa: E402

POLICIES = (0, 8, 4)
FULL = dict(kv_lens=(1024, 4096, 16384), batches=(1, 16, 64), session_len=16384, concurrency=256, requests=512,
            input_len=B.SHAREGPT_PROMPT_MEAN, output_len=B.SHAREGPT_OUTPUT_MEAN, budget_tokens=49152, iters=20)
SMOKE = dict(kv_lens=(64, 256), batches=(1, 4), session_len=512, concurrency=8, requests=24, input_len=24,
             output_len=16, budget_tokens=256, iters=3)


def fill_cache(cache) -> None:
    """Random contents for every block: fp16 K/V ~ N(0, 1); codes uniform with scale 0.02 and zero -0.15
    (values in about [-0.15, 0.15] for int4, [-0.15, 5] for int8: finite, the speed does not depend on them)."""
    for store in cache.k + cache.v:
        if isinstance(store, QuantizedKV):
            store.codes.random_(0, 256)
            store.scales_zeros[..., 0].fill_(0.02)
            store.scales_zeros[..., 1].fill_(-0.15)
        else:
            store.normal_()


def decode_rows(engine: Engine, decoder: GraphDecoder, args, dev: str) -> list[dict]:
    """Step time of each (batch, kv length) that fits the cache (module docstring, 1.)."""
    bs = engine.cache.block_size
    per_token = bytes_per_block(engine.cfg, bs, engine.dtype, engine.config.quant_policy) / bs
    rows = []
    for kv_len in args.kv_lens:
        for batch in args.batches:
            per_seq = -(-kv_len // bs)
            row = {"kv_len": kv_len, "batch": batch, "blocks_needed": batch * per_seq,
                   "blocks_free": engine.blocks.num_free, "kv_bytes_read": int(batch * kv_len * per_token)}
            if row["blocks_needed"] > row["blocks_free"]:
                rows.append({**row, "skipped": "does not fit: the cache holds fewer blocks than the batch needs"})
                print(f"  B={batch:<3} L={kv_len:<6} skipped ({row['blocks_needed']} blocks > "
                      f"{row['blocks_free']} free)", flush=True)
                continue
            blocks = engine.blocks.allocate(row["blocks_needed"])
            seqs = [SimpleNamespace(tokens=[5], length=kv_len, blocks=blocks[i * per_seq:(i + 1) * per_seq])
                    for i in range(batch)]
            for _ in range(3):  # the first captures this bucket's graph
                decoder.step(seqs)
            times = []
            for _ in range(args.iters):
                sync(dev)
                t0 = time.perf_counter()
                decoder.step(seqs)
                sync(dev)
                times.append((time.perf_counter() - t0) * 1e3)
            engine.blocks.release(blocks)
            row.update(step_ms=statistics.median(times), step_ms_min=min(times),
                       kv_read_gb_s=row["kv_bytes_read"] / statistics.median(times) / 1e6)
            rows.append(row)
            print(f"  B={batch:<3} L={kv_len:<6} {row['step_ms']:8.3f} ms/step  (KV {row['kv_bytes_read'] / 2**30:.2f} "
                  f"GiB read)", flush=True)
    return rows


def serving(engine: Engine, args) -> dict:
    """`lmc bench` at args.concurrency with the KV budget (module docstring, 2.)."""
    bs = engine.cache.block_size
    per_block = bytes_per_block(engine.cfg, bs, engine.dtype, engine.config.quant_policy)
    fp16_per_token = bytes_per_block(engine.cfg, bs, torch.float16, 0) / bs
    budget_bytes = int(args.budget_tokens * fp16_per_token)
    budget_blocks = budget_bytes // per_block
    extra = engine.blocks.num_free - budget_blocks
    assert extra >= 0, f"the cache holds {engine.blocks.num_free} blocks, fewer than the budget's {budget_blocks}"
    engine.blocks.reserve(extra)  # the scheduler sees only the budget
    vocab = list(range(10, engine.cfg.vocab_size))
    requests = B.random_requests(args.requests, args.input_len, args.output_len, 0.5, vocab, seed=args.concurrency)
    warm = [B.BenchRequest(r.prompt_ids, min(r.output_len, 8))  # other prompts: no prefix-cache hits later
            for r in B.random_requests(args.concurrency, args.input_len, args.output_len, 0.5, vocab, seed=1)]
    peak = {"running": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak["running"] = max(peak["running"], len(engine.scheduler.running))
            time.sleep(0.001)

    engine.start()
    try:
        B.run_bench(warm, args.concurrency, B.engine_sender(engine), False)
        preempted = engine.stats().preemptions
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = B.run_bench(requests, args.concurrency, B.engine_sender(engine), False)
        sampling.set()
        sampler.join()
    finally:
        engine.stop()
    result.update(concurrency=args.concurrency, num_prompts=args.requests, peak_running=peak["running"],
                  preemptions=engine.stats().preemptions - preempted, budget_bytes=budget_bytes,
                  budget_blocks=budget_blocks, budget_tokens=budget_blocks * bs)
    print(f"  serving c={args.concurrency}: {result['output_throughput']:9.1f} out tok/s, peak running "
          f"{result['peak_running']}, {budget_blocks * bs} tokens of cache, {result['preemptions']} preemptions",
          flush=True)
    return result


def bench_policy(ws: Path, policy: int, args, dev: str) -> dict:
    t0 = time.perf_counter()
    engine = Engine(str(ws), EngineConfig(device=dev, quant_policy=policy, max_batch_size=args.concurrency,
                                          session_len=args.session_len, cache_block_seq_len=64))
    decoder = engine.decoder or GraphDecoder(engine)  # CPU (--smoke): the same padded step, eager
    cache = engine.cache
    fill_cache(cache)
    per_block = bytes_per_block(engine.cfg, cache.block_size, engine.dtype, policy)
    entry = {"quant_policy": policy, "load_s": time.perf_counter() - t0, "cache_blocks": cache.num_blocks,
             "bytes_per_block": per_block, "cache_gib": cache.num_blocks * per_block / 2**30,
             "cache_tokens": cache.num_blocks * cache.block_size, "cuda_graphs": engine.decoder is not None}
    print(f" policy {policy}: {entry['cache_blocks']} blocks ({entry['cache_gib']:.1f} GiB, "
          f"{entry['cache_tokens']} tokens)", flush=True)
    entry["decode"] = decode_rows(engine, decoder, args, dev)
    entry["serving"] = None if args.skip_serving else serving(engine, args)
    entry["graph_buckets"] = sorted(decoder.graphs)
    del engine, decoder, cache
    free(dev)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lmc_bench_kv")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    parser.add_argument("--requests", type=int, default=None, help="serving requests per policy (default 512)")
    parser.add_argument("--kv-budget-tokens", type=int, default=None,
                        help="serving KV budget in tokens of fp16 KV, the same bytes for every policy (default 49152)")
    parser.add_argument("--iters", type=int, default=None, help="timed decode steps per point (default 20)")
    parser.add_argument("--policies", default="0,8,4")
    parser.add_argument("--decode-kernel", choices=("mma", "fold"), default=None,
                        help="decode attention kernel for the quantized caches (default: the runtime's, "
                             "kernels.attention.QUANTIZED_DECODE_KERNEL)")
    parser.add_argument("--skip-serving", action="store_true", help="decode step times only")
    cli = parser.parse_args()
    if cli.decode_kernel:
        attention.QUANTIZED_DECODE_KERNEL = cli.decode_kernel
    dev = "cpu" if cli.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    args = SimpleNamespace(**(SMOKE if cli.smoke else FULL))
    args.requests = cli.requests or args.requests
    args.budget_tokens = cli.kv_budget_tokens or args.budget_tokens
    args.iters = cli.iters or args.iters
    args.skip_serving = cli.skip_serving
    shape = TINY if cli.smoke else LLAMA3_8B
    t_start = time.perf_counter()
    model, hf_config = random_hf_model(shape, dev, torch.float16)
    tok = wordlevel_tokenizer(shape["vocab_size"], shape["eos_token_id"] % shape["vocab_size"])
    ws = write_float(state_source(model.state_dict(), hf_config, tok, "random Llama-3-8B shape"),
                     Path(cli.work) / "fp16", torch.float16)
    del model
    free(dev)
    build_s = time.perf_counter() - t_start
    print(f"built {ws} in {build_s:.1f} s", flush=True)
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({platform.machine()})",
              "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "model": "tiny" if cli.smoke else "random Llama-3-8B shape, fp16 workspace", "build_s": build_s,
              "settings": {**vars(args), "decode_kernel": attention.QUANTIZED_DECODE_KERNEL, "block_size": 64, "cache_max_entry_count": 0.8, "range_ratio": 0.5,
                           "decode": "GraphDecoder.step over directly written cache blocks (module docstring)"},
              "policies": {}}
    out = Path(cli.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    for policy in (int(p) for p in cli.policies.split(",")):
        report["policies"][str(policy)] = bench_policy(ws, policy, args, dev)
        save()
    report["total_s"] = time.perf_counter() - t_start
    save()
    print(f"done in {report['total_s']:.1f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
