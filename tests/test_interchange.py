"""Interchange: GPTQ and compressed-tensors checkpoints in, compressed-tensors out (docs/interchange.md).

GPTQ checkpoints are written here from the published layout (AutoGPTQ's pack loops; gptqmodel
does not install next to lmc's torch); compressed-tensors checkpoints are written and read back
by the `compressed-tensors` library itself (a test extra). The reference for every greedy
comparison is transformers running the checkpoint's dequantized weights, computed here
independently of lmc's codecs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.format.int4 import dequantize_lmc
from lmc.format.workspace import Workspace
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig

# odd shapes: K = 80 and 100 are not multiples of the group (32), N = 10 (k/v) and 100 (gate/up)
# not multiples of 8, K = 100 not a multiple of 8 (a part-filled qweight word)
ODD = dict(hidden_size=80, intermediate_size=100, num_attention_heads=8, num_key_value_heads=1)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = {"attention.w_qkv": LINEARS[:3], "attention.wo": LINEARS[3:4], "feed_forward.w13": LINEARS[4:6],
         "feed_forward.w2": LINEARS[6:]}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 43))]


def _quiet(*_):
    pass


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _float_state(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


# ----------------------------------------------------------------------------- GPTQ, from the published layout


def _gptq_quantize(w: torch.Tensor, g: int, sym: bool, group_of_column: np.ndarray):
    """GPTQ's quantizer per group (columns of a group need not be adjacent): codes [N, K], scales
    and zeros [N, ng] as numpy (zero 8 when symmetric)."""
    wf = w.double().numpy()
    n, k = wf.shape
    ng = int(group_of_column.max()) + 1
    codes = np.zeros((n, k), np.int64)
    scales = np.zeros((n, ng), np.float16)
    zeros = np.zeros((n, ng), np.int64)
    for grp in range(ng):
        cols = np.nonzero(group_of_column == grp)[0]
        x = wf[:, cols]
        lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        s = np.maximum(hi - lo, 1e-5) / 15
        s16 = s.astype(np.float16)
        z = np.full(n, 8) if sym else np.clip(np.round(-lo / s16.astype(np.float64)), 0, 15).astype(np.int64)
        codes[:, cols] = np.clip(np.round(x / s16.astype(np.float64)[:, None]) + z[:, None], 0, 15)
        scales[:, grp], zeros[:, grp] = s16, z
    return codes, scales, zeros


def _gptq_pack(codes: np.ndarray, zeros: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """AutoGPTQ's QuantLinear.pack loops (extended to K and N that are not multiples of 8):
    qweight [ceil(K/8), N] along K, qzeros [ng, ceil(N/8)] along N. v1 ("gptq") as GPTQModel
    saves it: the v2 words minus 0x11111111 (a zero of 0 borrows from the next nibble)."""
    n, k = codes.shape
    intweight = codes.T.astype(np.uint32)  # [K, N]
    qweight = np.zeros((-(-k // 8), n), np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(8 * row, min(8 * row + 8, k)):
            qweight[row] |= intweight[j] << (4 * (j - 8 * row))
    stored = zeros.T.astype(np.uint32)  # [ng, N]
    qzeros = np.zeros((stored.shape[0], -(-n // 8)), np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(8 * col, min(8 * col + 8, n)):
            qzeros[:, col] |= stored[:, j] << (4 * (j - 8 * col))
    if fmt == "gptq":
        qzeros = qzeros - np.uint32(0x11111111)  # uint32 arithmetic wraps like GPTQModel's int32 words
    return qweight.view(np.int32), qzeros.view(np.int32)


def write_gptq(ckpt: Path, out: Path, group_size: int = 32, sym: bool = False, fmt: str = "gptq",
               act_order: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint of the float checkpoint `ckpt`. act_order: None (g_idx = k // G), "groups"
    (g_idx relabels whole groups: foldable) or "columns" (a column permutation: real act-order).
    Returns {module: dequantized weight [N, K] float32}, computed from the stored integers."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    state = _float_state(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    out.mkdir(parents=True)
    tensors, dequant = {}, {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        if not module.endswith(LINEARS):
            tensors[name] = w.to(torch.float16)
            continue
        n, k = w.shape
        ng = -(-k // group_size)
        blocks = np.arange(k) // group_size
        if act_order == "groups":
            g_idx = rng.permutation(ng)[blocks]
        elif act_order == "columns":
            g_idx = blocks[np.argsort(rng.permutation(k))]
        else:
            g_idx = blocks
        codes, scales, zeros = _gptq_quantize(w, group_size, sym, g_idx)
        qweight, qzeros = _gptq_pack(codes, zeros, fmt)
        tensors.update({module + ".qweight": torch.from_numpy(qweight), module + ".qzeros": torch.from_numpy(qzeros),
                        module + ".scales": torch.from_numpy(scales.T.copy()),
                        module + ".g_idx": torch.from_numpy(g_idx.astype(np.int32))})
        s = torch.from_numpy(scales.astype(np.float32))[:, g_idx]  # [N, K]
        z = torch.from_numpy(zeros.astype(np.float32))[:, g_idx]
        dequant[module] = (torch.from_numpy(codes).float() - z) * s
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg.update(torch_dtype="float16", quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order is not None, "sym": sym,
        "checkpoint_format": fmt, "damp_percent": 0.01, "true_sequential": True, "static_groups": False})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ckpt.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return dequant


def _reference_model(ckpt: Path, dequant: dict[str, torch.Tensor], state: dict[str, torch.Tensor]):
    """transformers (float32) with the float checkpoint's architecture, the given linears and the other tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    new = {}
    for name in model.state_dict():
        module = name.removesuffix(".weight")
        new[name] = dequant[module] if module in dequant else state.get(name, state.get("model.embed_tokens.weight")).float()
    model.load_state_dict(new)
    return model


def _assert_dequantized_equal(ws_path: Path, dequant: dict[str, torch.Tensor], layers: int = 2):
    ws = Workspace(ws_path)
    g = ws.quantization["group_size"]
    for i in range(layers):
        for fused, modules in FUSED.items():
            base = f"layers.{i}.{fused}"
            want = torch.cat([dequant[f"model.layers.{i}.{m}"] for m in modules])  # [N, K]
            got = dequantize_lmc(ws.get(base + ".qweight"), ws.get(base + ".scales"), ws.get(base + ".zeros"), g,
                                 want.shape[1])  # [K, N]
            assert torch.equal(got.t(), want), base


def _assert_runs_like(ws_path: Path, reference) -> None:
    """First-token logits within 1e-3 and 12 greedy tokens equal to the transformers reference."""
    engine = Engine(str(ws_path), EngineConfig(device="cpu", cache_block_seq_len=16, session_len=128))
    ours = [r.logits[0] for r in engine.generate(PROMPTS, GenerationConfig(max_new_tokens=1, output_logits="generation"))]
    with torch.no_grad():
        for p, row in zip(PROMPTS, ours):
            ref = reference(torch.tensor([p])).logits[0, -1]
            assert float((row - ref).abs().max() / ref.abs().max()) <= 1e-3
        ref_tokens = reference.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, min_new_tokens=12,
                                        do_sample=False)[0, len(PROMPTS[0]):].tolist()
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    assert Engine(str(ws_path), EngineConfig(device="cpu")).generate([PROMPTS[0]], gen)[0].token_ids == ref_tokens


@pytest.mark.parametrize("sym,fmt,act_order", [(False, "gptq", None), (True, "gptq_v2", "groups"), (False, "gptq_v2", None),
                                               (True, "gptq", None)])
def test_gptq_converts_and_runs_like_its_dequantized_weights(sym, fmt, act_order, checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **ODD)
    dequant = write_gptq(ckpt, tmp_path / "gptq", sym=sym, fmt=fmt, act_order=act_order)
    convert(tmp_path / "gptq", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    assert ws.quantization == {"method": "gptq", "bits": 4, "group_size": 32, "layout": "lmc-int4-k8", "zero_point": True}
    assert ws.meta["dtype"] == "float16" and ws.manifest["provenance"]["source_format"] == "gptq"
    _assert_dequantized_equal(tmp_path / "ws", dequant)
    _assert_runs_like(tmp_path / "ws", _reference_model(ckpt, dequant, _float_state(tmp_path / "gptq")))


# ----------------------------------------------------------------------------- compressed-tensors, by its library

CT_GROUPED = dict(hidden_size=96, intermediate_size=160, num_attention_heads=8, num_key_value_heads=1, head_dim=12)


def write_compressed(ckpt: Path, out: Path, strategy: str = "group", group_size: int | None = 32,
                     symmetric: bool = False, ignore: tuple[str, ...] = ("lm_head",), num_bits: int = 4) -> None:
    """A checkpoint llm-compressor's way: the compressed-tensors library attaches the scheme,
    its own qparams (min/max) go in, ModelCompressor packs and writes config.json."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=list(ignore))
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight.float()  # [N, K]
                groups = w.reshape(w.shape[0], -1, group_size) if strategy == "group" else w[:, None, :]  # [N, ng, G]
                scale, zero = calculate_qparams(groups.amin(2), groups.amax(2), args)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for f in ckpt.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    assert ct.__version__


def _unpack_rows(words: np.ndarray, count: int) -> np.ndarray:
    """int32 [R, W] -> the 4-bit fields [R, count], field j of word w at bits 4j (the published packing)."""
    u = words.view(np.uint32).astype(np.int64)
    fields = np.stack([(u >> (4 * j)) & 0xF for j in range(8)], axis=-1)  # [R, W, 8]
    return fields.reshape(u.shape[0], -1)[:, :count]


def compressed_dequant(folder: Path) -> dict[str, torch.Tensor]:
    """{module: W [N, K] float32}: (q - zp) * scale from the stored tensors, q and zp signed (nibble - 8)."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    out = {}
    for name in state:
        if not name.endswith(".weight_packed"):
            continue
        module = name.removesuffix(".weight_packed")
        n, k = state[module + ".weight_shape"].tolist()
        q = _unpack_rows(state[name].numpy(), k) - 8  # [N, K]
        scale = state[module + ".weight_scale"].float()  # [N, ng]
        zp_name = module + ".weight_zero_point"
        zp = (_unpack_rows(state[zp_name].numpy().T.copy(), n).T - 8) if zp_name in state else np.zeros(scale.shape, np.int64)
        per_column = -(-k // scale.shape[1])  # G, or K for one scale per row
        idx = np.arange(k) // per_column
        out[module] = (torch.from_numpy(q - zp[:, idx]).float()) * scale[:, idx]
    return out


@pytest.mark.parametrize("strategy,symmetric", [("group", False), ("group", True), ("channel", False), ("channel", True)])
def test_compressed_tensors_converts_and_runs_like_its_dequantized_weights(strategy, symmetric, checkpoint, tmp_path):
    shapes = CT_GROUPED if strategy == "group" else ODD  # the library itself needs K % G == 0 for groups
    ckpt = checkpoint("llama3", **shapes)
    write_compressed(ckpt, tmp_path / "ct", strategy, 32 if strategy == "group" else None, symmetric)
    dequant = compressed_dequant(tmp_path / "ct")
    assert set(dequant) == {f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS}  # lm_head left in float
    convert(tmp_path / "ct", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    assert ws.quantization["method"] == "compressed-tensors" and ws.meta["dtype"] == "bfloat16"
    assert ws.quantization["group_size"] == (32 if strategy == "group" else 128)  # per channel: any lmc group holds it
    assert ws.manifest["provenance"]["source_format"] == "compressed-tensors"
    _assert_dequantized_equal(tmp_path / "ws", dequant)
    _assert_runs_like(tmp_path / "ws", _reference_model(ckpt, dequant, _float_state(tmp_path / "ct")))


def test_compressed_dequant_matches_the_library(checkpoint, tmp_path):
    """This file's reading of pack-quantized equals the library's own decompression (as transformers loads it)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt = checkpoint("llama3", **CT_GROUPED)
    write_compressed(ckpt, tmp_path / "ct", symmetric=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    weights = dict(model.named_parameters())
    for module, w in compressed_dequant(tmp_path / "ct").items():
        assert torch.equal(weights[module + ".weight"], w.to(torch.bfloat16)), module
