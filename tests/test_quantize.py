"""lmc quantize: RTN reference, AWQ interchange round trip, runtime int4 logits, determinism, memory refusal."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc.compiler.convert import convert
from lmc.compiler.pack import dequantize_int4, quantize_int4, unpack_awq
from lmc.format.int4 import to_lmc_tensors
from lmc.compiler.quantize import QuantizeOptions, quantize
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig
from lmc.format.workspace import Workspace

# shapes every AWQ GEMM tensor can hold with group 32: K in {64, 128}, N multiple of 8
AWQ_SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
SMALL = dict(calib_samples=6, calib_seqlen=48, w_group_size=32, batch_size=4, search_samples=4, device="cpu")


def _quiet(*_):
    pass


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rtn_equals_direct_quantization(checkpoint, tmp_path):
    ckpt = checkpoint("qwen2", dtype=torch.float16)
    quantize(ckpt, tmp_path / "ws", QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True, device="cpu"), say=_quiet)
    convert(ckpt, tmp_path / "fp")
    ws, fp = Workspace(tmp_path / "ws"), Workspace(tmp_path / "fp")
    assert ws.quantization["method"] == "rtn" and ws.quantization["group_size"] == 32
    for base in ("layers.0.attention.w_qkv", "layers.1.feed_forward.w2", "layers.1.feed_forward.w13"):
        codes, scales, zeros = quantize_int4(fp.get(base + ".weight").float(), 32)  # K=72: a partial group
        expected = to_lmc_tensors(codes, scales, zeros, torch.float16)
        for leaf, want in zip((".qweight", ".scales", ".zeros"), expected):
            assert torch.equal(ws.get(base + leaf), want), base + leaf
    assert torch.equal(ws.get("layers.0.attention.w_qkv.bias"), fp.get("layers.0.attention.w_qkv.bias"))
    assert torch.equal(ws.get("tok_embeddings.weight"), fp.get("tok_embeddings.weight"))


def _dequantized_reference(awq_dir: Path, twin: Path):
    """transformers Llama with every linear replaced by the AWQ checkpoint's dequantized weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    state = load_file(awq_dir / "model.safetensors")
    g = json.loads((awq_dir / "config.json").read_text())["quantization_config"]["group_size"]
    new = {}
    for name in model.state_dict():
        base = name.removesuffix(".weight")
        if base + ".qweight" in state:
            codes, scales, zeros = unpack_awq(state[base + ".qweight"], state[base + ".qzeros"], state[base + ".scales"], g)
            new[name] = dequantize_int4(codes, scales, zeros, g)
        elif name in state:
            new[name] = state[name].float()
        elif name == "lm_head.weight":
            new[name] = state["model.embed_tokens.weight"].float()
    model.load_state_dict(new)
    return model


def test_awq_checkpoint_converts_and_runs_like_its_dequantized_weights(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    summary = quantize(ckpt, tmp_path / "awq", QuantizeOptions(**SMALL, method="awq"), say=_quiet)
    assert summary["format"] == "awq" and summary["method"] == "awq"
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True}
    prov = json.loads((tmp_path / "awq" / "lmc_provenance.json").read_text())
    assert prov["calibration"]["source"] == "bundled:ptb.train" and len(prov["calibration"]["windows_sha256"]) == 64
    for layer in summary["layers"]:  # r = 0 (plain RTN) is a candidate: AWQ never loses to it on the block loss
        for group in layer["groups"]:
            assert group["loss"] <= group["loss_rtn"]

    convert(tmp_path / "awq", tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    assert ws.quantization["method"] == "awq" and ws.get("layers.0.attention.w_qkv.qweight").dtype == torch.int32
    engine = Engine(str(tmp_path / "ws"), EngineConfig(device="cpu", cache_block_seq_len=16, session_len=128))
    ref_model = _dequantized_reference(tmp_path / "awq", ckpt)
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 43))]
    ours = [r.logits[0] for r in engine.generate(prompts, GenerationConfig(max_new_tokens=1, output_logits="generation"))]
    with torch.no_grad():
        for p, row in zip(prompts, ours):
            ref = ref_model(torch.tensor([p])).logits[0, -1]
            assert float((row - ref).abs().max() / ref.abs().max()) <= 1e-3
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    with torch.no_grad():
        ref_tokens = ref_model.generate(torch.tensor([prompts[0]]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 7:].tolist()
    assert Engine(str(tmp_path / "ws"), EngineConfig(device="cpu")).generate([prompts[0]], gen)[0].token_ids == ref_tokens


def test_same_inputs_same_bytes_and_partial_groups(checkpoint, tmp_path):
    ckpt = checkpoint("qwen3")  # hidden 72, head_dim 24: K=72 is not a multiple of 32 -> a workspace
    summary = quantize(ckpt, tmp_path / "a", QuantizeOptions(**SMALL), say=_quiet)
    assert summary["format"] == "workspace"
    quantize(ckpt, tmp_path / "b", QuantizeOptions(**SMALL), say=_quiet)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    engine = Engine(str(tmp_path / "a"), EngineConfig(device="cpu"))
    out = engine.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=5, ignore_eos=True))
    assert len(out[0].token_ids) == 5


def test_no_search_scale_smooths_without_clipping(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    summary = quantize(ckpt, tmp_path / "s", QuantizeOptions(**SMALL, search_scale=False, workspace=True), say=_quiet)
    assert summary["method"] == "smooth"
    assert all(g == {"group": g["group"], "alpha": 0.5} for layer in summary["layers"] for g in layer["groups"])
    assert Workspace(tmp_path / "s").quantization["method"] == "smooth"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], capture_output=True, text=True)


def test_cli_memory_refusal_and_json(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    r = _cli("quantize", ckpt, "--work-dir", tmp_path / "big", "--calib-samples", 400000, "--calib-seqlen", 4096, "--device", "cpu")
    assert r.returncode == 1 and "not enough memory: predicted peak host memory" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "big").exists()
    r = _cli("quantize", ckpt, "-o", tmp_path / "q", "--calib-samples", 4, "--calib-seqlen", 32, "--w-group-size", 32,
             "--search-samples", 2, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["format"] == "awq" and len(summary["layers"]) == 2 and summary["peak_host_rss_bytes"] > 0
    seconds = summary["seconds"]  # the up-front NaN/Inf read is timed on its own, inside the total
    assert set(seconds) == {"total", "calibrate_quantize", "finite_check"}
    assert 0 <= seconds["finite_check"] < seconds["total"] and seconds["calibrate_quantize"] < seconds["total"]
    r = _cli("quantize", ckpt, "-o", tmp_path / "q", "--calib-samples", 4)
    assert r.returncode == 1 and "--force" in r.stderr


def test_a_run_that_cannot_fit_is_refused_before_the_text_is_tokenized(checkpoint, tmp_path, monkeypatch):
    """The memory prediction needs only the flags and the model, not the tokens: a hopeless run was refused after
    tokenizing the whole calibration text (8 of the CLI's 10 s above, minutes on a large corpus)."""
    from lmc.compiler import quantize as Q
    from lmc.errors import LmcError

    def tokenized(*_):
        raise AssertionError("the text was tokenized before the memory check")

    monkeypatch.setattr(Q, "calibration_ids", tokenized)
    with pytest.raises(LmcError, match="not enough memory"):
        quantize(checkpoint("llama3", **AWQ_SHAPES), tmp_path / "big",
                 QuantizeOptions(calib_samples=400000, calib_seqlen=4096, device="cpu", method="awq"), say=_quiet)
    assert not (tmp_path / "big").exists()


def test_calibration_ids_are_tokenized_once_per_tokenizer_and_text(checkpoint, tmp_path, monkeypatch):
    """quantize at two group sizes in one process tokenized PTB twice (8 s each with the test tokenizer); the ids are
    now kept for the same tokenizer files and text, read-only, and a different text or tokenizer tokenizes again."""
    from lmc.compiler import quantize as Q
    from lmc.compiler.readers import open_source
    from lmc.runtime.tokenizer import Tokenizer

    calls = []
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: calls.append(len(text)) or encode(self, text))
    monkeypatch.setattr(Q, "_ids_cache", {})
    text = tmp_path / "c.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    source = open_source(checkpoint("llama3", **AWQ_SHAPES))
    opts = QuantizeOptions(calib_dataset=str(text))
    first, info = Q.calibration_ids(source, opts)
    again, _ = Q.calibration_ids(source, opts)
    assert again is first and len(calls) == 1 and not first.flags.writeable and info["text_sha256"]
    text.write_text("another text entirely\n" * 50)
    other, _ = Q.calibration_ids(source, opts)
    assert len(calls) == 2 and not np.array_equal(other, first)
    assert len(Q._ids_cache) == 2
    source2 = open_source(checkpoint("llama3", **AWQ_SHAPES))  # the same tokenizer files: no new tokenization
    Q.calibration_ids(source2, opts)
    assert len(calls) == 2


def test_awq_checkpoint_splits_for_tp(checkpoint, tmp_path):
    from lmc.format.int4 import from_lmc_tensors
    from lmc.errors import LmcError

    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    quantize(ckpt, tmp_path / "awq", QuantizeOptions(calib_samples=0, w_group_size=32, device="cpu"), say=_quiet)
    convert(tmp_path / "awq", tmp_path / "tp1")
    convert(tmp_path / "awq", tmp_path / "tp2", tp=2)
    one, two = Workspace(tmp_path / "tp1"), Workspace(tmp_path / "tp2")

    def codes(ws, prefix, base, k):
        return from_lmc_tensors(*(ws.get(f"{prefix}{base}{leaf}") for leaf in (".qweight", ".scales", ".zeros")), k)

    # row-parallel w2 (K = intermediate 128): each rank holds half of K; column-parallel w13: half of each of gate, up
    full = codes(one, "", "layers.1.feed_forward.w2", 128)
    halves = [codes(two, f"{r}:", f"layers.1.feed_forward.w2.{r}", 64) for r in range(2)]
    for part in range(3):
        assert torch.equal(torch.cat([h[part] for h in halves], dim=1), full[part])
    full = codes(one, "", "layers.0.feed_forward.w13", 64)
    ranks = [codes(two, f"{r}:", f"layers.0.feed_forward.w13.{r}", 64) for r in range(2)]
    gate = torch.cat([r[0][:64] for r in ranks])
    up = torch.cat([r[0][64:] for r in ranks])
    assert torch.equal(torch.cat([gate, up]), full[0])
    quantize(ckpt, tmp_path / "awq64", QuantizeOptions(calib_samples=0, w_group_size=64, device="cpu"), say=_quiet)
    with pytest.raises(LmcError, match="would split an int4 group of 64"):
        convert(tmp_path / "awq64", tmp_path / "bad", tp=2)  # wo's K per rank: 64 / 2 = 32 < 64
    assert not (tmp_path / "bad").exists()


def test_awq_fallback_says_why_on_stderr_and_records_what_was_written(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **AWQ_SHAPES)  # K = 64 for q/k/v, o and gate/up: not a multiple of the default 128
    r = _cli("quantize", ckpt, "-o", tmp_path / "q", "--calib-samples", 4, "--calib-seqlen", 32, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert ("note: writing an lmc workspace instead of an HF AWQ GEMM checkpoint: model.layers.*.self_attn.q_proj has "
            "K=64 input features, not a multiple of --w-group-size 128") in r.stderr
    assert "--w-group-size 64 gives an HF checkpoint" in r.stderr and "note" not in r.stdout
    assert "(workspace, awq-autoround)" in r.stdout  # --method auto on the CPU
    prov = Workspace(tmp_path / "q").manifest["provenance"]
    quant = prov["quantization"]
    assert quant["format"] == "workspace" and "workspace" not in quant
    assert quant["search_samples"] == 8 and quant["device"] == "cpu"  # resolved: 8 on the CPU
    assert "--search-samples 8 --device cpu " in prov["command"] and "--search-samples auto" not in prov["command"]
    assert prov["command"].endswith("--method awq-autoround") and quant["method"] == "awq-autoround"


def test_help_says_when_the_awq_output_falls_back():
    from lmc.cli import quantize as command

    helps = {p.name: " ".join(p.help.split()) for p in command.params if p.help}
    for name in ("w_group_size", "workspace"):
        assert "K" in helps[name] and "multiple of" in helps[name] and "N" in helps[name] and "8" in helps[name], name
    assert "workspace is written instead" in helps["w_group_size"]


def test_predicted_host_memory_bounds_the_measured_peak(checkpoint, tmp_path):
    """In a fresh process, as a user runs it: the peak RSS stays under the prediction, which is not a wild guess."""
    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(3000)))  # a short text: tokenizing it sets no peak
    runs = {"rtn": ("--calib-samples", 0),
            "awq": ("--calib-dataset", text, "--calib-samples", 8, "--calib-seqlen", 64, "--search-samples", 4)}
    for name, args in runs.items():
        r = _cli("quantize", ckpt, "-o", tmp_path / name, "--w-group-size", 32, "--device", "cpu", "--json", *args)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        mem, peak = summary["memory_predicted"], summary["peak_host_rss_bytes"]
        assert mem["host_held"] > 100 * 2**20, name  # torch and the rest, loaded before the prediction, count
        assert peak <= mem["host_bytes"], (name, peak, mem)
        assert mem["host_bytes"] - mem["host_held"] <= 3 * (peak - mem["host_held"]) + 2**26, (name, peak, mem)


def test_memory_prediction_grows_with_calibration_size():
    from lmc.compiler.memory import SourceRead, predict
    from lmc.format.archs import model_config_from_hf

    cfg = model_config_from_hf(dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    read = SourceRead(file_bytes=10**8, itemsize=2, temporaries=0)

    def host(samples: int, seqlen: int) -> int:
        return predict(cfg, samples, seqlen, 8, 4, 64, torch.device("cpu"), torch.float32, torch.float16, read,
                       held=(2**28, 2**28)).host_bytes

    assert host(0, 512) < host(8, 512) < host(32, 512) < host(64, 512) < host(64, 1024)
    # at least the activations (two [n, S, H] float32 buffers) and the int64 windows of the 32 more windows
    assert host(64, 512) - host(32, 512) >= 32 * 512 * (2 * 576 * 4 + 8)
    tokenized = predict(cfg, 8, 512, 8, 4, 64, torch.device("cpu"), torch.float32, torch.float16, read,
                        held=(2**28, 2**33))
    assert tokenized.host_bytes == 2**33 and tokenized.fits()  # a past peak (tokenizing) is the peak; it needs nothing


def _stderr_on_a_terminal(*args) -> str:
    """Run the CLI with stderr on a pseudo-terminal (so it shows progress unless told not to); what it wrote there."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))  # a new pty is 0 columns wide: no bar fits
    proc = subprocess.Popen([sys.executable, "-m", "lmc", *map(str, args)], stdout=subprocess.DEVNULL, stderr=side)
    os.close(side)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait() == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_names_the_searched_group_on_a_terminal_and_is_quiet_with_json(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", **AWQ_SHAPES)
    flags = ("--calib-samples", 4, "--calib-seqlen", 32, "--w-group-size", 32, "--search-samples", 2, "--device", "cpu",
             "--method", "awq")
    shown = _stderr_on_a_terminal("quantize", ckpt, "-o", tmp_path / "a", *flags)
    for stage in ("forward", "scale attention_norm->w_qkv", "scale ffn_norm->w13", "scale up->w2", "clip w_qkv", "clip w2"):
        assert stage in shown, stage
    assert "layer 1" in shown and "quantize" in shown
    quiet = _stderr_on_a_terminal("quantize", ckpt, "-o", tmp_path / "b", *flags, "--json")
    assert "scale" not in quiet and "layer" not in quiet and "it/s" not in quiet and "step/s" not in quiet


def test_calib_dtype_auto_follows_the_cpu_flags(tmp_path):
    from lmc.compiler.quantize import auto_calib_dtype, resolve_options

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n")
    assert auto_calib_dtype(torch.device("cpu"), str(info)) == "bfloat16"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n")
    assert auto_calib_dtype(torch.device("cpu"), str(info)) == "float32"
    assert auto_calib_dtype(torch.device("cpu"), str(tmp_path / "absent")) == "float32"
    assert auto_calib_dtype(torch.device("cuda")) == "stored"
    assert resolve_options(QuantizeOptions(device="cpu")).calib_dtype == auto_calib_dtype(torch.device("cpu"))
    assert resolve_options(QuantizeOptions(device="cpu", calib_dtype="float32")).calib_dtype == "float32"
    # --method auto: awq-autoround on the CPU, awq where there is nothing to tune
    assert resolve_options(QuantizeOptions(device="cpu")).method == "awq-autoround"
    assert resolve_options(QuantizeOptions(device="cpu", calib_samples=0)).method == "awq"
    assert resolve_options(QuantizeOptions(device="cpu", search_scale=False)).method == "awq"
    assert resolve_options(QuantizeOptions(device="cpu", method="awq-gptq")).method == "awq-gptq"


def test_bfloat16_calibration_quantizes_the_float_weights(checkpoint, tmp_path):
    """Under --calib-dtype bfloat16 only the forwards run in bf16: a tensor no scale touches (GQA: the qkv bias
    is not folded) is written with the source's fp16 bytes, not bf16-rounded; the provenance records the dtype;
    an unknown dtype is one clear error. (Quality: bench/bench_quality.py, docs/benchmarks.md.)"""
    ckpt = checkpoint("qwen2", dtype=torch.float16)
    convert(ckpt, tmp_path / "fp")
    fp = Workspace(tmp_path / "fp")
    for dtype in ("bfloat16", "float32"):
        quantize(ckpt, tmp_path / dtype, QuantizeOptions(**SMALL, workspace=True, calib_dtype=dtype), say=_quiet)
        ws = Workspace(tmp_path / dtype)
        assert torch.equal(ws.get("layers.0.attention.w_qkv.bias"), fp.get("layers.0.attention.w_qkv.bias"))
        assert ws.manifest["provenance"]["quantization"]["calib_dtype"] == dtype
    from lmc.errors import LmcError

    with pytest.raises(LmcError, match="--calib-dtype"):
        quantize(ckpt, tmp_path / "bad", QuantizeOptions(**SMALL, workspace=True, calib_dtype="float8"), say=_quiet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_hf_repack_on_the_gpu_gives_the_cpu_bits(fmt):
    """quantize's HF writer repacks on the quantize device: the packed words must not depend on it."""
    from lmc.compiler.quantize import _pack_hf
    from lmc.format.int4 import from_lmc_tensors

    gen = torch.Generator().manual_seed(0)
    n, k, g = 264, 384, 128
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)  # [N, K]
    scales = torch.rand(n, k // g, generator=gen) + 0.01  # [N, K/G]
    zeros = torch.randint(0, 16, (n, k // g), generator=gen).float()  # [N, K/G]
    triplet = to_lmc_tensors(codes, scales, zeros, torch.float16)
    packed = {}
    for device in ("cpu", "cuda"):
        c, s, z = from_lmc_tensors(*(t.to(device) for t in triplet), k)
        packed[device] = {leaf: t.cpu() for leaf, t in _pack_hf(fmt, c, s, z, g, torch.float16).items()}
    assert packed["cpu"].keys() == packed["cuda"].keys()
    for leaf, t in packed["cpu"].items():
        assert t.dtype == packed["cuda"][leaf].dtype and torch.equal(t, packed["cuda"][leaf]), leaf
