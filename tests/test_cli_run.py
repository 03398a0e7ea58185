"""The CLI's run commands as a user meets them: interrupting a stream, a closed stdout, a long chat."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lmc.compiler.convert import convert


@pytest.fixture
def long_ws(checkpoint, tmp_path):
    convert(checkpoint("llama3", max_position_embeddings=200000), tmp_path / "ws")
    return tmp_path / "ws"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal gives it, also when pytest runs in the background


def _start(*args) -> subprocess.Popen:
    # A test run started in the background of a shell inherits SIGINT ignored, and so would lmc (Python installs
    # its KeyboardInterrupt handler only where SIGINT is at its default): give the child the terminal's default.
    return subprocess.Popen([sys.executable, "-m", "lmc", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_default_sigint)


ENDLESS = ("--device", "cpu", "--temperature", "0", "--max-new-tokens", "150000", "--min-new-tokens", "150000",
           "--session-len", "199000")


def test_ctrl_c_during_streaming_exits_130_cleanly(long_ws):
    p = _start("generate", long_ws, "hello", *ENDLESS)
    assert p.stdout.read(20)  # streaming has begun
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=180)  # (a loaded CI machine is slow to load torch in the child)
    assert p.returncode == 130, err
    assert b"interrupted" in err and b"terminate called" not in err and b"Traceback" not in err


def test_closed_stdout_exits_130_cleanly(long_ws):
    p = _start("generate", long_ws, "hello", *ENDLESS)
    assert p.stdout.read(20)
    p.stdout.close()  # as `| head -c 20` does
    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    err = p.stderr.read()
    assert p.returncode == 130, err
    assert b"terminate called" not in err and b"Traceback" not in err and b"Exception ignored" not in err


def test_chat_drops_the_oldest_turns_past_session_len(checkpoint, tmp_path):
    convert(checkpoint("qwen2"), tmp_path / "ws")
    lines = "".join(f"turn {i} " + "words " * 12 + "\n" for i in range(6)) + "exit\n"
    r = subprocess.run([sys.executable, "-m", "lmc", "chat", tmp_path / "ws", "--device", "cpu", "--temperature", "0",
                        "--max-new-tokens", "8", "--session-len", "120"], input=lines, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dropped the" in r.stderr and "oldest messages" in r.stderr
    assert "error" not in r.stderr  # every turn was answered, none refused as too long


@pytest.mark.parametrize("flag,value", [("--max-batch-size", "0"), ("--top-p", "0"), ("--temperature", "-1"),
                                        ("--quant-policy", "3"), ("--session-len", "1"), ("--max-new-tokens", "0")])
def test_out_of_range_flags_are_usage_errors(flag, value, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmc", "generate", tmp_path, "hi", flag, value], capture_output=True, text=True)
    assert r.returncode == 2 and flag in r.stderr


@pytest.mark.parametrize("command,flag,value", [
    ("generate", "--temperature", "nan"), ("generate", "--top-p", "nan"), ("generate", "--repetition-penalty", "inf"),
    ("generate", "--cache-max-entry-count", "nan"), ("serve", "--drain-timeout", "inf"),
    ("eval", "--fail-above", "nan"), ("cache", "--older-than", "nan")])
def test_nan_and_inf_flags_are_usage_errors(command, flag, value, tmp_path):
    """nan passed every click.FloatRange bound (its comparisons are all false): --temperature nan exited 1 later,
    or not at all; --fail-above nan failed every run. Now a usage error (exit 2) naming the flag, before any load."""
    args = {"generate": ["generate", tmp_path, "hi"], "serve": ["serve", tmp_path], "eval": ["eval", "ppl", tmp_path],
            "cache": ["cache", "clean"]}[command]
    r = subprocess.run([sys.executable, "-m", "lmc", *args, flag, value], capture_output=True, text=True)
    assert r.returncode == 2 and flag in r.stderr and "is not a finite number" in r.stderr, r.stderr


def test_bench_reports_every_request_and_its_latencies(checkpoint, tmp_path):
    import json

    convert(checkpoint("qwen2"), tmp_path / "ws")
    r = subprocess.run([sys.executable, "-m", "lmc", "bench", tmp_path / "ws", "--num-prompts", "24", "--concurrency", "5",
                        "--input-len", "12", "--output-len", "6", "--range-ratio", "0.5", "--device", "cpu", "--json",
                        "--out", tmp_path / "b.json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == json.loads((tmp_path / "b.json").read_text())
    assert out["completed"] == 24 and out["failed"] == 0 and out["concurrency"] == 5
    assert 24 * 3 <= out["completion_tokens"] <= 24 * 9 and out["stats"]["kv_blocks_used"] == 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert set(out[key]) == {"mean", "p50", "p90", "p99"} and out[key]["p50"] <= out[key]["p99"]
    assert out["output_throughput"] == pytest.approx(out["completion_tokens"] / out["duration_s"], rel=0.01)
    assert out["warmup"] is None  # a CPU engine has nothing to compile: no warm-up

    sharegpt = [{"conversations": [{"from": "human", "value": "tell me about the quick brown fox " * 2},
                                   {"from": "gpt", "value": "the fox jumps over the lazy dog " * 2}]}] * 5
    (tmp_path / "sg.json").write_text(json.dumps(sharegpt))
    r = subprocess.run([sys.executable, "-m", "lmc", "bench", tmp_path / "ws", "--num-prompts", "5", "--concurrency", "2",
                        "--dataset", tmp_path / "sg.json", "--device", "cpu", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completed"] == 5
    r = subprocess.run([sys.executable, "-m", "lmc", "bench", tmp_path / "ws", "--concurrency", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--concurrency" in r.stderr


@pytest.mark.parametrize("content,phrase", [
    ("5", "its top level is int"), ('[{"conversations": 5}]', "0 usable conversations"),
    ('[{"conversations": [1, 2]}]', "0 usable conversations"), ("[" * 100000, "not a readable ShareGPT JSON file")])
def test_bench_refuses_malformed_datasets_and_a_missing_out_folder_before_running(content, phrase, checkpoint, tmp_path):
    """Malformed ShareGPT files were tracebacks (TypeError, AttributeError, RecursionError); an --out in a missing
    folder failed only after the whole run."""
    convert(checkpoint("qwen2"), tmp_path / "ws")
    (tmp_path / "d.json").write_text(content)
    r = subprocess.run([sys.executable, "-m", "lmc", "bench", tmp_path / "ws", "--num-prompts", "2", "--device", "cpu",
                        "--dataset", tmp_path / "d.json"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and phrase in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "lmc", "bench", tmp_path / "ws", "--device", "cpu",
                        "--out", tmp_path / "missing" / "b.json"], capture_output=True, text=True)
    assert r.returncode == 1 and "the folder" in r.stderr and "does not exist" in r.stderr and \
        r.stderr.count("\n") == 1, r.stderr


def test_text_that_is_not_utf8_is_one_line_not_a_traceback(checkpoint, tmp_path):
    """A prompt argument or a chat line of bytes that are not UTF-8 reaches Python as lone surrogates, which the
    tokenizer library refused with a TypeError traceback."""
    convert(checkpoint("qwen2"), tmp_path / "ws")
    ws = str(tmp_path / "ws").encode()
    r = subprocess.run([sys.executable.encode(), b"-m", b"lmc", b"generate", ws, b"a\xffb", b"--device", b"cpu",
                        b"--max-new-tokens", b"2"], capture_output=True, timeout=300)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert "holds U+DCFF at character" in err and "a lone surrogate" in err, err
    # chat says so, drops that line and answers the next
    r = subprocess.run([sys.executable.encode(), b"-m", b"lmc", b"chat", ws, b"--device", b"cpu", b"--max-new-tokens",
                        b"2"], input=b"a\xffb\nhello\nexit\n", capture_output=True, timeout=300)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "Traceback" not in err and err.count("a lone surrogate") == 1, err
