"""Quantization wall time and peak memory: `lmc quantize` on a random-weight checkpoint.

    python bench/bench_quantize.py --shape llama3-8b --out bench/results/quantize_8b_h100.json   (GPU)

Builds a Llama-3-8B-shaped random fp16 checkpoint (with a small BPE tokenizer trained on PTB so
calibration has real token windows), then times `lmc quantize` on it in a subprocess and
records the child's peak host RSS and the peak GPU memory it reports.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048),
}


def make_checkpoint(shape: str, out: Path) -> float:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmc.calib.text import load_text

    start = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = load_text("ptb", "train").text
    tok.train_from_iterator([text[i:i + 100000] for i in range(0, 2_000_000, 100000)],
                            trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)  # the same random checkpoint every run, so runs compare on the same weights
    torch.set_default_dtype(torch.float16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="5GB")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def write_profile(stats_file: Path, out: Path) -> None:
    """The profile's top 60 functions by cumulative and by own time, as text."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=text)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default="/tmp/lmc-bench-quantize")
    ap.add_argument("--out", default="bench/results/quantize.json")
    ap.add_argument("--profile", default=None, help="run the quantize under cProfile; write its top functions here")
    args = ap.parse_args()
    work = Path(args.work)
    src, dst = work / "src", work / "awq"
    build_s = make_checkpoint(args.shape, src)
    profiler = ["-m", "cProfile", "-o", str(work / "quantize.prof")] if args.profile else []
    cmd = [sys.executable, *profiler, "-m", "lmc", "quantize", str(src), "-o", str(dst), "--calib-samples", str(args.samples),
           "--calib-seqlen", str(args.seqlen), "--w-group-size", str(args.group_size), "--batch-size", str(args.batch_size),
           "--json", "--force"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        sys.exit(proc.returncode)
    summary = json.loads(proc.stdout)
    result = {
        "shape": args.shape, "config": SHAPES[args.shape], "samples": args.samples, "seqlen": args.seqlen,
        "group_size": args.group_size, "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "build_checkpoint_seconds": round(build_s, 1),
        "quantize_wall_seconds": round(wall, 1), "quantize_minutes": round(wall / 60, 2),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "peak_device_gib": round(summary.get("peak_device_bytes", 0) / 2**30, 2),
        "stage_seconds": summary.get("seconds"), "profiled": bool(args.profile),
        "predicted": summary["memory_predicted"], "format": summary["format"], "method": summary["method"],
        "per_layer_seconds": [layer["seconds"] for layer in summary["layers"]],
        "ratios": [[g.get("ratio") for g in layer["groups"]] for layer in summary["layers"]],
        "command": " ".join(cmd[1:]).replace(str(work), "<work>"), "stderr_tail": proc.stderr[-500:],
    }
    if args.profile:
        write_profile(work / "quantize.prof", Path(args.profile))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("shape", "device", "quantize_minutes", "peak_host_rss_gib", "peak_device_gib")}))


if __name__ == "__main__":
    main()
