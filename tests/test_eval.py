"""Perplexity: runtime vs transformers' loss on the same windows, and `lmc eval ppl` as a CLI gate."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ARCH_CASES, MIXED_TEXT

from lmc.calib.windows import eval_windows
from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.runtime.model import Model
from lmc.runtime.kv_cache import PagedKVCache
from lmc.runtime.perplexity import cached_hidden, perplexity
from lmc.runtime.tokenizer import Tokenizer
from lmc.format.workspace import Workspace

JSON_KEYS = {"ppl", "nll", "ppl_error", "windows", "windows_total", "seqlen", "tokens", "dataset", "split", "source",
             "text_source", "text_sha256", "text_tokens", "workspace", "device", "dtype", "batch_size", "seconds",
             "total_seconds", "quant_policy", "lm_head"}
SEQLEN = 33


def _hf_nll(ckpt, windows: torch.Tensor) -> float:
    """transformers' mean loss over every shifted token of the windows (CPU, fp32)."""
    from transformers import AutoModelForCausalLM

    folder = ckpt / "llama_twin" if (ckpt / "llama_twin").is_dir() else ckpt
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(hf(windows, labels=windows).loss)


def _lmc(*args, cache):
    env = {**os.environ, "LMC_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "lmc", "eval", "ppl", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join([MIXED_TEXT] * 12), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_perplexity_matches_transformers(case, checkpoint, tmp_path):
    ckpt = checkpoint(case)
    convert(ckpt, tmp_path / "ws")
    model = Model(Workspace(tmp_path / "ws"), torch.device("cpu"), torch.float32)
    windows = torch.randint(0, model.cfg.vocab_size, (5, 37), generator=torch.Generator().manual_seed(1))  # [5, 37]
    ref = _hf_nll(ckpt, windows)
    # a partial last batch and logit chunks that split windows, then one batch with the default chunking
    for kw in (dict(batch_size=2, chunk_rows=7), dict(batch_size=5)):
        r = perplexity(model, windows, **kw)
        assert (r["windows"], r["seqlen"], r["tokens"]) == (5, 37, 5 * 36)
        assert abs(r["nll"] - ref) <= 1e-4 * ref
        assert abs(r["ppl"] - torch.tensor(ref).exp().item()) <= 1e-4 * r["ppl"]


def test_cli_json_on_hf_folder_matches_transformers(checkpoint, text_file, tmp_path):
    """Whole text tokenized once as transformers' tokenizer(text) does, windows from token 0, tail dropped."""
    from transformers import AutoTokenizer

    ckpt = checkpoint("llama3")  # AutoTokenizer reads its tokenizer.json as saved (Qwen2Tokenizer rebuilds it)
    out = _lmc(ckpt, "--dataset", text_file, "--seqlen", SEQLEN, "--max-windows", 6, "--batch-size", 4,
               "--device", "cpu", "--json", cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert set(r) == JSON_KEYS
    ids = AutoTokenizer.from_pretrained(ckpt)(text_file.read_text(encoding="utf-8"))["input_ids"]
    assert len(ids) >= 7 * SEQLEN  # --max-windows really cuts
    windows = torch.tensor(ids[: 6 * SEQLEN]).view(6, SEQLEN)  # [6, S]
    ref = _hf_nll(ckpt, windows)
    assert abs(r["nll"] - ref) <= 1e-4 * ref
    assert abs(r["ppl"] - torch.tensor(ref).exp().item()) <= 1e-4 * r["ppl"]
    assert (r["windows"], r["seqlen"], r["tokens"], r["text_tokens"]) == (6, SEQLEN, 6 * (SEQLEN - 1), len(ids))
    assert r["windows_total"] == len(ids) // SEQLEN and r["ppl_error"] is None
    assert (r["dataset"], r["split"], r["source"], r["text_source"]) == (str(text_file), None, "file", str(text_file))
    assert r["text_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert (r["device"], r["dtype"], r["batch_size"], r["quant_policy"]) == ("cpu", "float32", 4, 0)
    assert r["workspace"].startswith(str(tmp_path / "cache")) and r["seconds"] >= 0


def test_fail_above_is_a_ci_gate(checkpoint, text_file, tmp_path):
    ws = tmp_path / "ws"
    convert(checkpoint("qwen2"), ws)
    ids = Tokenizer(ws / "tokenizer").encode(text_file.read_text(encoding="utf-8"))
    windows = torch.from_numpy(eval_windows(ids, SEQLEN))  # [n, S], all of them
    expected = perplexity(Model(Workspace(ws), torch.device("cpu"), torch.float32), windows)["ppl"]
    args = (ws, "--dataset", text_file, "--seqlen", SEQLEN, "--device", "cpu", "--fail-above")

    ok = _lmc(*args, expected * 1.001, cache=tmp_path / "cache")
    assert ok.returncode == 0, ok.stderr
    line = re.fullmatch(r"ppl (\S+) \((\S+), (\d+) of (\d+) windows x (\d+) tokens, (\d+) tokens predicted\)\n",
                        ok.stdout)
    assert line, ok.stdout
    n = windows.shape[0]
    assert line.groups()[1:] == (str(text_file), str(n), str(n), str(SEQLEN), str(n * (SEQLEN - 1)))
    assert float(line.group(1)) == pytest.approx(expected, abs=1e-3)

    bad = _lmc(*args, expected * 0.999, cache=tmp_path / "cache")
    assert bad.returncode == 1
    assert bad.stdout == ok.stdout  # the result is still printed
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("FAILED ppl ") and "--fail-above" in bad.stderr


def test_missing_dataset_is_one_line_error(tmp_path):
    out = _lmc(tmp_path / "no-model", "--dataset", tmp_path / "missing.txt", cache=tmp_path / "cache")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: text file not found:")
    assert "missing.txt" in out.stderr and out.stdout == ""


def test_usage_error_exits_2(tmp_path):
    out = _lmc(tmp_path, "--seqlen", 1, cache=tmp_path / "cache")
    assert out.returncode == 2 and "--seqlen" in out.stderr


def test_window_errors_are_user_errors(checkpoint, tmp_path):
    convert(checkpoint("qwen3"), tmp_path / "ws")
    model = Model(Workspace(tmp_path / "ws"), torch.device("cpu"), torch.float32)
    with pytest.raises(LmcError, match="outside the model's vocabulary of 416"):
        perplexity(model, torch.full((1, 9), 416))
    with pytest.raises(LmcError, match=">= 2 tokens"):
        perplexity(model, torch.zeros((3, 1), dtype=torch.int64))


def test_cli_reference_lists_every_command_and_option():
    """docs/cli.md is kept in step with the click definitions: each command and flag appears."""
    from pathlib import Path

    import click

    from lmc.cli import main

    doc = (Path(__file__).parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), cmd

    for name, cmd in walk(main, ["lmc"]):
        assert f"## `{name}`" in doc, f"docs/cli.md has no section for `{name}`: add one from `{name} --help`"
        for param in cmd.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-") and opt != "--help":
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", doc), \
                        f"docs/cli.md does not mention {opt} of `{name}`"


def test_cpu_default_scores_a_sample_and_says_how_much(checkpoint, tmp_path):
    words = MIXED_TEXT.split()
    text = tmp_path / "long.txt"
    text.write_text(" ".join(words[i % len(words)] + str(i % 13) for i in range(12000)), encoding="utf-8")
    ws = tmp_path / "ws"
    convert(checkpoint("llama3"), ws)
    total = len(Tokenizer(ws / "tokenizer").encode(text.read_text(encoding="utf-8"))) // 512
    assert total > 40
    out = _lmc(ws, "--dataset", text, "--device", "cpu", cache=tmp_path / "cache")  # --seqlen 512: 40 windows
    assert out.returncode == 0, out.stderr
    assert f", 40 of {total} windows x 512 tokens, {40 * 511} tokens predicted)" in out.stdout
    out = _lmc(ws, "--dataset", text, "--device", "cpu", "--seqlen", 256, "--json", cache=tmp_path / "cache")
    r = json.loads(out.stdout)
    assert (r["windows"], r["windows_total"], r["seqlen"]) == (80, r["text_tokens"] // 256, 256)
    out = _lmc(ws, "--dataset", text, "--device", "cpu", "--max-windows", total + 5, "--json", cache=tmp_path / "cache")
    assert json.loads(out.stdout)["windows"] == total  # asked for more than there are: all of them


def test_text_errors_name_the_dataset_flag(tmp_path):
    out = _lmc(tmp_path / "no-model", "--dataset", "c4", "--split", "validation", cache=tmp_path / "cache")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "pass a local file with --dataset PATH" in out.stderr and "--calib-dataset" not in out.stderr


def _scale_final_norm(ckpt, value: float) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], value)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("norm, reason", [(float("nan"), "NaN logits"), (1e6, "overflows")])
def test_non_finite_perplexity_is_valid_json_and_fails_the_gate(checkpoint, text_file, tmp_path, norm, reason):
    from lmc.compiler.convert import convert

    ckpt = checkpoint("llama3")
    _scale_final_norm(ckpt, norm)
    convert(ckpt, tmp_path / "ws", allow_nonfinite=True, say=lambda *_: None)  # convert refuses NaN weights otherwise
    args = (tmp_path / "ws", "--dataset", text_file, "--seqlen", SEQLEN, "--max-windows", 2, "--device", "cpu", "--json")

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON: {text}"))

    out = _lmc(*args, cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    r = strict(out.stdout)
    assert r["ppl"] is None and reason in r["ppl_error"] and set(r) == JSON_KEYS
    gated = _lmc(*args, "--fail-above", 1e9, cache=tmp_path / "cache")
    assert gated.returncode == 1 and strict(gated.stdout)["ppl"] is None
    assert gated.stderr.startswith("FAILED ppl ") and reason in gated.stderr and gated.stderr.count("\n") == 1


# --- through the KV cache (--quant-policy) -------------------------------------------------------------------


def _tiny_model(checkpoint, tmp_path) -> Model:
    convert(checkpoint("llama3"), tmp_path / "ws")
    return Model(Workspace(tmp_path / "ws"), torch.device("cpu"), torch.float32)


def _random_windows(model: Model, n: int, s: int) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (n, s), generator=torch.Generator().manual_seed(3))  # [n, S]


def test_chunks_through_a_float_cache_equal_the_dense_pass(checkpoint, tmp_path):
    """Policy 0 through the paged cache, in chunks that cross block boundaries (a 150-token window spans 3 blocks
    of 64) and do not divide the window, with a partial last batch: the dense pass's NLL to 1e-4 relative."""
    model = _tiny_model(checkpoint, tmp_path)
    windows = _random_windows(model, 3, 150)
    dense = perplexity(model, windows, batch_size=2)
    for chunk in (48, 64, 150):
        cached = perplexity(model, windows, batch_size=2, cache_chunk=chunk)
        assert (cached["windows"], cached["seqlen"], cached["tokens"]) == (3, 150, 3 * 149)
        assert abs(cached["nll"] - dense["nll"]) <= 1e-4 * dense["nll"], chunk


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantized_cache_costs_int8_little_and_int4_more(checkpoint, tmp_path):
    """A tiny random llama (head_dim 12) on random tokens, read from a quantized cache: int8's NLL within 1e-4 of
    the float NLL, int4's further off (measured: int8 1.0e-6 relative, int4 7.6e-6; a random model's logits are
    nearly flat, so the hidden states show it better). The chunk size does not change the hidden states (every
    token, its own chunk's too, is read back from the cache), so later chunks read earlier ones quantized."""
    model = _tiny_model(checkpoint, tmp_path)
    windows = _random_windows(model, 3, 150)
    nll = {p: perplexity(model, windows, batch_size=2, quant_policy=p)["nll"] for p in (0, 8, 4)}
    err8, err4 = abs(nll[8] / nll[0] - 1), abs(nll[4] / nll[0] - 1)
    assert 0 < err8 <= 1e-4 and err4 > 4 * err8, (err8, err4)
    hidden = {}
    for p in (0, 8, 4):
        cache = PagedKVCache(model.cfg, 3 * 3, 64, model.dtype, model.device, p)  # 3 windows x 3 blocks
        h64, h16 = (cached_hidden(model, windows, cache, chunk) for chunk in (64, 16))  # [3, 150, H]
        assert _rel(h16, h64) <= 1e-6, p  # measured: 0
        hidden[p] = h64
    # measured: int8 1.8e-3, int4 2.6e-2
    assert 1e-3 <= _rel(hidden[8], hidden[0]) <= 1e-2 and _rel(hidden[4], hidden[0]) >= 4 * _rel(hidden[8], hidden[0])
    with pytest.raises(LmcError, match="quant_policy 2 is not a KV cache policy"):
        perplexity(model, windows, quant_policy=2)


def test_cli_quant_policy_scores_through_the_cache(checkpoint, text_file, tmp_path):
    ws = tmp_path / "ws"
    convert(checkpoint("llama3"), ws)
    ids = Tokenizer(ws / "tokenizer").encode(text_file.read_text(encoding="utf-8"))
    windows = torch.from_numpy(eval_windows(ids, 70, 3))  # [3, 70]: two chunks of 64 and 6
    model = Model(Workspace(ws), torch.device("cpu"), torch.float32)
    out = _lmc(ws, "--dataset", text_file, "--seqlen", 70, "--max-windows", 3, "--device", "cpu", "--quant-policy", 4,
               "--json", cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["quant_policy"] == 4 and r["nll"] == pytest.approx(perplexity(model, windows, quant_policy=4)["nll"], rel=1e-6)
    assert r["nll"] != pytest.approx(perplexity(model, windows)["nll"], rel=1e-7)
    bad = _lmc(ws, "--quant-policy", 2, cache=tmp_path / "cache")
    assert bad.returncode == 2 and "--quant-policy" in bad.stderr
