"""Vision-language benchmark: a LLaVA-1.6-7B-shaped (LLaVA-NeXT, Vicuna-7B + CLIP ViT-L/14-336) random workspace,
time to first token and decode tok/s with one image + 128 prompt tokens per request, at batch 1 and 16.

The checkpoint is transformers' own random init of `LlavaNextForConditionalGeneration`, made on the device in fp16
and saved with save_pretrained (with a word-level tokenizer holding `<image>`, a chat template taking image parts
and the LLaVA-NeXT image processor settings), then `lmc convert`ed. Each request is a distinct random 672x672
image (best resolution 672x672: 4 tiles + the base, 2928 image tokens) and 128 words of text, EOS ignored.
TTFT counts preprocessing, the ViT, the projector and the prefill; requests of a batch are submitted together
(prefill_interval 1, so the engine admits them as its token budget allows). Decode tok/s is the output rate while
every request of the batch is decoding.

    python bench/bench_vlm.py --out bench/results/vlm_h200.json      # on the GPU machine (~4 min with the build)
    python bench/bench_vlm.py --smoke --out /tmp/vlm_smoke.json       # tiny shapes on the CPU, checks the script
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import versions  # noqa: E402

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA16_7B = dict(
    text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768),
    pinpoints=PINPOINTS_336, image_side=672, image_token_id=32000, batches=(1, 16), new_tokens=128)
SMOKE = dict(
    text=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1100, max_position_embeddings=4096, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2),
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                patch_size=14, projection_dim=32),
    pinpoints=[[56, 112], [112, 56], [112, 112]], image_side=112, image_token_id=1050, batches=(1, 4), new_tokens=16)
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
            "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
            " {% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def tokenizer_files(shape: dict) -> dict[str, bytes]:
    """Word-level tokenizer (token i is "t{i}") with `<image>` as an added special token at image_token_id."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    image_id = shape["image_token_id"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(image_id)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    assert tok.token_to_id("<image>") == image_id
    config = {"bos_token": "t1", "eos_token": "t2", "chat_template": TEMPLATE}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def build(shape: dict, work: Path, dev: str) -> tuple[Path, dict]:
    """The random HF LLaVA-NeXT folder (save_pretrained) and its lmc workspace; skipped when already built."""
    import transformers as tf

    hf, ws = work / "hf", work / "ws"
    timings = {}
    if not (hf / "config.json").is_file():
        t0 = time.perf_counter()
        cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**shape["vision"]),
                                 text_config=tf.LlamaConfig(**shape["text"]), image_token_id=shape["image_token_id"],
                                 image_grid_pinpoints=shape["pinpoints"])
        torch.manual_seed(0)
        with torch.device(dev):
            model = tf.LlavaNextForConditionalGeneration(cfg).to(torch.float16).eval()
        model.save_pretrained(hf)
        del model
        for name, data in tokenizer_files(shape).items():
            (hf / name).write_bytes(data)
        side = shape["vision"]["image_size"]
        (hf / "preprocessor_config.json").write_text(json.dumps({
            "size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}, "resample": 3,
            "image_grid_pinpoints": shape["pinpoints"], "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 1 / 255}))
        if dev == "cuda":
            torch.cuda.empty_cache()
        timings["hf_s"] = round(time.perf_counter() - t0, 1)
    if not (ws / "lmc.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lmc", "convert", str(hf), "-o", str(ws), "--force"], check=True)
        timings["convert_s"] = round(time.perf_counter() - t0, 1)
    print(f"built {timings}", flush=True)
    return ws, timings


def noise_image(side: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def run_batch(pipe, shape: dict, batch: int, seed: int) -> dict:
    """`batch` requests (each its own image + 128 words) submitted together: TTFT per request, decode rate."""
    from lmc.runtime.sampling import GenerationConfig

    words = " ".join(f"t{10 + (seed * 7 + i) % 900}" for i in range(128))
    start = time.perf_counter()
    encoded = [pipe.encode_with_images((words, noise_image(shape["image_side"], seed + i))) for i in range(batch)]
    prep_s = time.perf_counter() - start
    gen = GenerationConfig(max_new_tokens=shape["new_tokens"], ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in range(batch)]
    for i, out in pipe.engine.stream([ids for ids, _ in encoded], [gen] * batch, [placed for _, placed in encoded]):
        stamps[i] += [time.perf_counter()] * len(out.token_ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ttft = [(s[0] - start) * 1e3 for s in stamps]
    all_decoding, first_done = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    in_window = sum(sum(1 for t in s if all_decoding < t <= first_done) for s in stamps)
    per_request = [(len(s) - 1) / (s[-1] - s[0]) for s in stamps]
    return {"batch": batch, "prompt_tokens": len(encoded[0][0]), "image_tokens": encoded[0][1][0].image.num_tokens,
            "text_words": 128, "new_tokens": shape["new_tokens"], "preprocess_ms_total": round(prep_s * 1e3, 1),
            "ttft_ms": {"p50": round(statistics.median(ttft), 1), "max": round(max(ttft), 1), "min": round(min(ttft), 1)},
            "decode_tok_s": round(in_window / (first_done - all_decoding), 1) if first_done > all_decoding else None,
            "decode_tok_s_per_request_p50": round(statistics.median(per_request), 1),
            "wall_s": round(max(s[-1] for s in stamps) - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (about a minute)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmc_bench_vlm"), help="where the model is built")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args()
    from lmc.api import pipeline
    from lmc.runtime.config import EngineConfig

    shape = SMOKE if args.smoke else LLAVA16_7B
    dev = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    work = args.work / ("smoke" if args.smoke else "llava16_7b")
    t0 = time.perf_counter()
    ws, timings = build(shape, work, dev)
    engine_cfg = EngineConfig(device=dev, session_len=4096, max_batch_size=max(shape["batches"]), prefill_interval=1)
    result = {"bench": "vlm", "model": "random LLaVA-1.6-7B shape (llava-v1.6-vicuna-7b)" if not args.smoke else "smoke",
              "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "versions": versions(),
              "build": timings, "shape": {k: v for k, v in shape.items() if k != "batches"}, "rows": []}
    with pipeline(ws, backend_config=engine_cfg) as pipe:
        run_batch(pipe, shape, 1, seed=1000)  # warm-up: kernels, CUDA graphs
        for batch in shape["batches"]:
            row = run_batch(pipe, shape, batch, seed=batch * 100)
            result["rows"].append(row)
            print(f"batch {batch:>3}: prompt {row['prompt_tokens']} tokens ({row['image_tokens']} image), TTFT p50 "
                  f"{row['ttft_ms']['p50']} ms (max {row['ttft_ms']['max']}), decode {row['decode_tok_s']} tok/s", flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
