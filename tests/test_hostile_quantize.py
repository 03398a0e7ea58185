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
