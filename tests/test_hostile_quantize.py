"""Hostile input to `lmc quantize` and `lmc eval ppl`: calibration and evaluation texts, flag values and source
checkpoints that once gave a traceback, a late failure or a silently wrong output. Each is one `error: ...` line and
exit 1 (exit 2 for an out-of-range flag), with no output folder left behind. The commands run in-process (click's
CliRunner) to keep the file fast; a traceback shows as an exception other than SystemExit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmc.calib.text import load_text
from lmc.cli import main
from lmc.errors import LmcError

# shapes every AWQ GEMM tensor can hold with group 32 (as tests/test_quantize.py)
AWQ_SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
FAST = ("--device", "cpu", "--w-group-size", "32", "--calib-samples", "2", "--calib-seqlen", "16", "--search-samples",
        "2", "--method", "awq")


def _lmc(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(r, phrase: str, code: int = 1) -> None:
    """Exit `code` through sys.exit (not an uncaught exception), one `error:` line on stderr naming `phrase`."""
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and phrase in r.stderr, r.stderr


def _usage(r, flag: str) -> None:
    """A usage error (exit 2) naming the flag."""
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2 and flag in r.stderr, (r.exit_code, r.stderr)


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Hello world, hello again. " * 40, encoding="utf-8")
    return path


@pytest.fixture
def small(checkpoint):
    return checkpoint("llama3", **AWQ_SHAPES)


# ----------------------------------------------------------------------------- texts


@pytest.mark.parametrize("name, phrase", [("missing.txt", "text file not found"), ("calib.csv", "unknown dataset")])
def test_a_bad_calibration_text_is_named_before_the_checkpoint_is_opened(tmp_path, monkeypatch, name, phrase):
    """A missing or unknown --calib-dataset is one line before the source is opened (it was reported after the
    checkpoint was read and checked: seconds on an 8B); the source here would fail to open if it were tried."""
    import lmc.compiler.quantize as quantize

    def no_open(src):
        raise AssertionError("the checkpoint was opened before the calibration text was checked")

    monkeypatch.setattr(quantize, "open_source", no_open)
    r = _lmc("quantize", tmp_path / "model", "-o", tmp_path / "q", "--calib-dataset", tmp_path / name, *FAST)
    _one_line(r, phrase)
    assert not (tmp_path / "q").exists()


def test_jsonl_text_with_an_unpaired_surrogate_is_one_line(small, tmp_path):
    """{"text": "\\ud800"} is valid JSON that decodes to a lone surrogate, which no UTF-8 text holds: hashing the
    text raised UnicodeEncodeError (a traceback from quantize and eval ppl alike). Now one line naming the line."""
    bad = tmp_path / "calib.jsonl"
    bad.write_text(json.dumps({"text": "fine text " * 20}) + "\n" + json.dumps({"text": "bad \ud800 text"}) + "\n")
    r = _lmc("quantize", small, "-o", tmp_path / "q", "--calib-dataset", bad, *FAST)
    _one_line(r, f"{bad}:2: the 'text' field holds an unpaired surrogate escape (\\ud800)")
    assert not (tmp_path / "q").exists()
    with pytest.raises(LmcError, match="unpaired surrogate"):
        load_text(str(bad), "test", purpose="eval", flag="--dataset")


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flag, value", [("--calib-samples", -1), ("--calib-seqlen", 1), ("--batch-size", 0),
                                         ("--search-samples", 0), ("--search-samples", -3), ("--w-bits", 8),
                                         ("--w-group-size", 48), ("--w-group-size", 0)])
def test_out_of_range_quantize_flags_are_usage_errors(flag, value, tmp_path):
    """--search-samples 0 (or below) ran the whole calibration forward of layer 0, then raised IndexError on an
    empty list of kept windows; the others were exit 1 where docs/cli.md says an out-of-range value is a usage error.
    Now all exit 2 naming the flag, before the source is opened (it does not even exist here)."""
    r = _lmc("quantize", tmp_path / "no-such-model", "-o", tmp_path / "q", flag, value)
    _usage(r, flag)
    assert not (tmp_path / "q").exists()


def test_search_samples_below_one_is_refused_by_the_api_too(small, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    with pytest.raises(LmcError, match="--search-samples 0: the scale and clip search needs at least 1 window"):
        quantize(small, tmp_path / "q", QuantizeOptions(calib_samples=2, calib_seqlen=16, w_group_size=32, search_samples=0,
                                                        device="cpu", method="awq"), say=lambda m: None)
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- source checkpoints


def _poison(ckpt: Path, name: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state[name][3] = value
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_allow_nonfinite_with_autoround_writes_and_reports_strict_json(small, text, tmp_path):
    """--allow-nonfinite with the CPU's default method (awq-autoround): a NaN weight made every tuning step's loss
    NaN, no step was 'best', and tune_layer subscripted None (TypeError traceback, nothing written, where awq and
    awq-gptq wrote). Now the layer falls back to min-max rounding; and the --json summary, which held NaN and
    Infinity (not JSON: jq and JSON.parse refuse them), says null."""
    _poison(small, "model.layers.1.mlp.down_proj.weight", float("nan"))
    r = _lmc("quantize", small, "-o", tmp_path / "q", "--calib-dataset", text, "--device", "cpu", "--w-group-size", 32,
             "--calib-samples", 4, "--calib-seqlen", 16, "--search-samples", 2, "--allow-nonfinite", "--json")
    assert r.exit_code == 0, (repr(r.exception), r.stderr)
    summary = _strict_json(r.stdout)
    assert summary["method"] == "awq-autoround" and "WARNING: tensor layers.1.feed_forward.w2.weight" in r.stderr
    assert summary["layers"][1]["tuning"]["loss"] is None and summary["layers"][0]["tuning"]["loss"] > 0
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_calib_seqlen_past_the_sliding_window_is_refused_before_calibration(checkpoint, text, tmp_path):
    """A Mistral model with sliding_window 16 calibrated on 32-token windows: lmc's calibration attends over the
    whole window (it has no sliding-window attention), so the statistics and the searched scales came from a model
    that is not this one past token 16, silently (exit 0). eval ppl --seqlen and --session-len already refused
    this; now quantize does too, naming the longest length, and --calib-seqlen 16 (or RTN) runs."""
    src = checkpoint("mistral", **AWQ_SHAPES)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    r = _lmc("quantize", src, "-o", tmp_path / "q", "--calib-dataset", text, "--device", "cpu", "--w-group-size", 32,
             "--calib-samples", 2, "--calib-seqlen", 32, "--method", "awq")
    _one_line(r, "--calib-seqlen 32 is longer than the sliding attention window")
    assert "pass --calib-seqlen 16 or less" in r.stderr and not (tmp_path / "q").exists()
    r = _lmc("quantize", src, "-o", tmp_path / "q", "--calib-dataset", text, *FAST)  # --calib-seqlen 16
    assert r.exit_code == 0, (repr(r.exception), r.stderr)


def test_nan_in_the_last_layer_is_refused_before_calibration(small, text, tmp_path, monkeypatch):
    """A NaN weight in layer 1 of 2 was found only when the layer loop loaded it, after calibrating every layer
    before it (hours on a large model, for a damaged checkpoint). Now every layer is checked before the loop."""
    import lmc.compiler.quantize as q

    def calibration_started(*args, **kwargs):
        raise AssertionError("the layer loop started before the weights were checked")

    _poison(small, "model.layers.1.mlp.down_proj.weight", float("nan"))
    monkeypatch.setattr(q, "run_layers", calibration_started)
    r = _lmc("quantize", small, "-o", tmp_path / "q", "--calib-dataset", text, *FAST)
    _one_line(r, "tensor layers.1.feed_forward.w2.weight (from model.layers.1.mlp.down_proj) has NaN or Inf values")
    assert "--allow-nonfinite" in r.stderr and not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- lmc eval ppl


@pytest.mark.parametrize("value", ["0.5", "0", "-1"])
def test_fail_above_below_one_is_a_usage_error(value, tmp_path):
    """A perplexity is exp(mean NLL) >= 1, so --fail-above 0.5 (a log-likelihood or a typo) failed every run after
    scoring the whole text; its help also read '[x<=None]'. Now exit 2 naming the flag before anything loads."""
    r = _lmc("eval", "ppl", tmp_path / "no-such-model", "--fail-above", value)
    _usage(r, "--fail-above")
    assert "x>=1" in r.stderr
    help_text = " ".join(_lmc("eval", "ppl", "--help").stdout.split())
    assert "--fail-above X exit 1" in help_text and "x<=None" not in help_text
