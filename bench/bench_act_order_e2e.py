"""The decode of an act-order (GPTQ desc_act) Llama-3-8B-shaped checkpoint end to end, beside the same weights
quantized without act-order: `lmc convert` of each GPTQ checkpoint, then the engine's decode (bench_decode's
`bench_lmc`, CUDA graphs). bench/NOTES.md session 29: `bench/bench_act_order.py` sums the act-order pieces of one
layer (the norms' column gathers, wo's input gather) to ~6 % of the batch-1 step; this measures the step.

    python bench/bench_act_order_e2e.py --batches 1,16 --out bench/results/act_order_e2e_h200.json

The checkpoints are written here, on the GPU, from one random model (transformers' init, bench_decode's
random_hf_model): GPTQ v1 words ("gptq" checkpoint_format, asymmetric, g128), round-to-nearest per group. With
act-order each input has a random column order (q/k/v share one, gate/up share one, as GPTQ's Hessian order is),
the groups taken in that order, g_idx = a column's place in it // 128: what AutoGPTQ / GPTQModel write with
desc_act (tests/test_interchange.py builds the tiny ones the same way, in numpy). `--smoke`: a tiny model on the
CPU or GPU (checks the script).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import (LLAMA3_8B, TINY, bench_lmc, free, random_hf_model, versions,  # noqa: E402
                          wordlevel_tokenizer, write_report)

from lmc.compiler.convert import convert  # noqa: E402
from lmc.format.workspace import Workspace  # noqa: E402

GROUP = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_ORDER = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def pack_rows(codes: torch.Tensor, minus: int = 0) -> torch.Tensor:
    """[R, C] codes 0..15 (int64) -> [R / 8, C] int32: word r holds rows 8r .. 8r + 7, row 8r + j at bits 4j
    (GPTQ's qweight along K, and transposed its qzeros along N), less `minus` modulo 2^32."""
    r, c = codes.shape
    shifts = 4 * torch.arange(8, device=codes.device).view(1, 8, 1)
    words = ((codes.view(r // 8, 8, c) << shifts).sum(1) - minus) % 2 ** 32  # [R / 8, C] in 0 .. 2^32 - 1
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def gptq_linear(w: torch.Tensor, order: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One linear w [N, K] as GPTQ v1 tensors (qweight [K/8, N], qzeros [K/G, N/8], scales [K/G, N] float16, g_idx
    [K] int32), asymmetric round-to-nearest per group; order [K]: the column order the groups are taken in (act-order),
    None: columns in place."""
    n, k = w.shape
    ng = k // GROUP
    order = torch.arange(k, device=w.device) if order is None else order
    wp = w.float()[:, order].view(n, ng, GROUP)  # [N, ng, G]: the groups in quantization order
    lo = wp.amin(-1).clamp(max=0)  # [N, ng]
    hi = wp.amax(-1).clamp(min=0)
    scale = ((hi - lo).clamp(min=1e-5) / 15).half()  # [N, ng]
    zero = (-lo / scale.float()).round().clamp(0, 15)  # [N, ng]
    codes_p = ((wp / scale.float()[..., None]).round() + zero[..., None]).clamp(0, 15).long()  # [N, ng, G]
    codes = torch.empty(n, k, dtype=torch.long, device=w.device)  # [N, K]
    codes[:, order] = codes_p.view(n, k)
    g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
    g_idx[order] = (torch.arange(k, device=w.device) // GROUP).int()  # a column's place in the order // G
    # qzeros [ng, N / 8] packed along N; v1 ("gptq"): the v2 words minus 0x11111111, wrapping as int32 words do
    qzeros = pack_rows(zero.long(), minus=0x11111111).t().contiguous()
    return {"qweight": pack_rows(codes.t().contiguous()), "qzeros": qzeros, "scales": scale.t().contiguous(),
            "g_idx": g_idx}


def write_gptq(state: dict, hf_config: dict, tokenizer: dict, out: Path, act_order: bool, seed: int = 0) -> Path:
    """A GPTQ checkpoint folder of the float state dict (one safetensors file, config.json with its
    quantization_config, the tokenizer files)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors, orders = {}, {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in LINEARS or not name.endswith(".weight"):
            tensors[name] = w.half().cpu().contiguous()
            continue
        order = None
        if act_order:
            key = (module.rsplit(".", 1)[0], SHARED_ORDER.get(leaf, leaf))
            if key not in orders:
                orders[key] = torch.randperm(w.shape[1], generator=gen).to(w.device)
            order = orders[key]
        tensors.update({f"{module}.{leaf_name}": t.cpu() for leaf_name, t in gptq_linear(w, order).items()})
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = {**hf_config, "torch_dtype": "float16", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": False,
        "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True, "static_groups": False}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for fname, data in tokenizer.items():
        (out / fname).write_bytes(data)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/act_order_e2e.json")
    ap.add_argument("--work", default="/tmp/lmc_bench_act_order")
    ap.add_argument("--batches", default=None, help="comma-separated decode batch sizes (default 1,16; smoke 1,2)")
    ap.add_argument("--modes", default="graph", help="comma-separated lmc modes to time: graph, eager")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and few tokens (checks the script)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args.batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (1, 2) if args.smoke else (1, 16)
    args.modes = [m for m in ("graph", "eager") if m in args.modes.split(",")]
    args.prompt_tokens, args.new_tokens = (8, 6) if args.smoke else (128, 256)
    args.session_len = 128 if args.smoke else 512
    args.repeats, args.step_iters = (1, 3) if args.smoke else (3, 50)
    shape = {**TINY, "hidden_size": 256} if args.smoke else LLAMA3_8B  # smoke: two groups a row, so orders matter
    work = Path(args.work)
    t0 = time.perf_counter()
    model, hf_config = random_hf_model(shape, dev, torch.float16)
    state = dict(model.state_dict())
    del model
    tokenizer = wordlevel_tokenizer(shape["vocab_size"], shape["eos_token_id"] % shape["vocab_size"])
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "env": versions(),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "model": "random Llama-3-8B shape" if not args.smoke else "tiny", "group_size": GROUP,
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "batches": list(args.batches), "repeats": args.repeats}, "runs": {}}
    for act_order in (False, True):
        name = "act_order" if act_order else "plain"
        t1 = time.perf_counter()
        ckpt = write_gptq(state, hf_config, tokenizer, work / f"gptq-{name}", act_order)
        written = time.perf_counter() - t1
        t1 = time.perf_counter()
        ws_path = work / f"ws-{name}"
        convert(ckpt, ws_path, force=True, progress=False)
        converted = time.perf_counter() - t1
        shutil.rmtree(ckpt)
        ws = Workspace(ws_path)
        perms = sorted(n for n in ws.manifest["tensors"] if n.endswith(".perm"))
        print(f"{name}: checkpoint {written:.1f} s, convert {converted:.1f} s, format version "
              f"{ws.manifest['format_version']}, {len(perms)} .perm tensors", flush=True)
        free(dev)
        rows = bench_lmc(ws_path, dev, args, shape["vocab_size"])
        report["runs"][name] = {"checkpoint_s": written, "convert_s": converted, "perm_tensors": len(perms),
                                "rows": rows}
    del state
    for plain, act in zip(report["runs"]["plain"]["rows"], report["runs"]["act_order"]["rows"]):
        ratio = act["step_ms"] / plain["step_ms"]
        act["vs_plain"] = ratio
        print(f"{act['engine']} B={act['batch']}: act-order {act['step_ms']:.3f} ms/step, plain "
              f"{plain['step_ms']:.3f} ({100 * (ratio - 1):+.1f} %)", flush=True)
    report["total_s"] = time.perf_counter() - t0
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
