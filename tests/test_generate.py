"""Front ends and generation behaviour: pipeline, sampling, stop words, streaming, chat over a pipe."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import MIXED_TEXT

from lmc.api import pipeline
from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.runtime.config import EngineConfig
from lmc.runtime.sampling import GenerationConfig
from lmc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture
def workspace(checkpoint, tmp_path):
    convert(checkpoint("qwen2"), tmp_path / "ws")
    return tmp_path / "ws"


def test_incremental_detokenization_never_splits_characters(workspace):
    tok = Tokenizer(workspace / "tokenizer")
    ids = tok.encode(MIXED_TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == MIXED_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # multi-byte characters were held back until complete


def test_pipeline_batch_seed_and_stop_words(workspace):
    pipe = pipeline(workspace, backend_config=EngineConfig(device="cpu", max_batch_size=2))
    greedy = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    batch = pipe(["Hi, please introduce yourself", "上海是", "hello"], greedy)
    singles = [pipe(p, greedy) for p in ["Hi, please introduce yourself", "上海是", "hello"]]
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]  # continuous batching changes nothing
    assert [r.index for r in batch] == [0, 1, 2] and all(r.generate_token_len == 12 for r in batch)
    sampled = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, random_seed=7, ignore_eos=True)
    a, b = pipe("hello", sampled), pipe("hello", sampled)
    other = pipe("hello", GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, random_seed=8, ignore_eos=True))
    assert a.token_ids == b.token_ids and a.token_ids != other.token_ids
    full = pipe("hello", greedy).text
    word = full[3:6]
    assert word, full
    stopped = pipe("hello", GenerationConfig(max_new_tokens=12, ignore_eos=True, stop_words=[word]))
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.find(word)]


def test_eos_stops_generation(workspace):
    pipe = pipeline(workspace, backend_config=EngineConfig(device="cpu"))
    free = pipe("hello", GenerationConfig(max_new_tokens=8, ignore_eos=True))
    eos = free.token_ids[2]
    pipe.engine.eos_ids = {eos}
    stopped = pipe("hello", GenerationConfig(max_new_tokens=8))
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]


def test_session_len_and_bad_config(workspace):
    pipe = pipeline(workspace, backend_config=EngineConfig(device="cpu", session_len=40))
    r = pipe("hello", GenerationConfig(max_new_tokens=100, ignore_eos=True))
    assert r.finish_reason == "length" and r.input_token_len + r.generate_token_len == 40
    with pytest.raises(LmcError, match="session_len is 40"):
        pipe("hello " * 50, GenerationConfig(max_new_tokens=4))
    with pytest.raises(LmcError, match="quant_policy=3"):
        pipeline(workspace, backend_config=EngineConfig(device="cpu", quant_policy=3))


def _lmc(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_generate_json_and_chat_over_a_pipe(workspace, checkpoint, tmp_path):
    r = _lmc("generate", workspace, "上海是", "--json", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_tokens"] == len(out["token_ids"]) <= 6 and out["finish_reason"] in ("stop", "length")
    pipe = pipeline(workspace, backend_config=EngineConfig(device="cpu"))
    gen = GenerationConfig(max_new_tokens=5)
    first = pipe("Hello there", gen).text
    second = pipe([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                   {"role": "user", "content": "And again"}], gen).text
    r = _lmc("chat", workspace, "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu",
             stdin="Hello there\nAnd again\nexit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second}\n"  # the second turn saw the first one's history


def test_hf_folder_is_converted_once_into_the_cache(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    env = {"LMC_CACHE": str(tmp_path / "cache")}
    a = _lmc("generate", ckpt, "hello", "--json", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", env=env)
    b = _lmc("generate", ckpt, "hello", "--json", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", env=env)
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    cached = list((tmp_path / "cache" / "workspaces").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()
    r = _lmc("generate", tmp_path / "missing", "hello")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
