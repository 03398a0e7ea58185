"""Hostile inputs to `lmc convert`, `verify` and `inspect` found by fuzzing: each once lost a user's file, was
converted silently into something else, or ended in a traceback or a hang; each now gets one line, a non-zero exit
and nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hostile_inputs import _cli, _edit_header, _edit_json, _one_line  # noqa: F401 - shared helpers

from lmc.compiler.convert import convert
from lmc.errors import LmcError, WorkspaceError


@pytest.fixture
def f16(checkpoint):
    """A tiny float16 Llama 3 checkpoint (float16: the torch-free converter takes it at --dtype auto)."""
    return lambda case="llama3", **kw: checkpoint(case, dtype=torch.float16, **kw)


# ----------------------------------------------------------------------------- --force and a user's files


def test_force_never_deletes_a_file_the_workspace_does_not_list(f16, tmp_path):
    """--force replaced any folder holding an lmc.json: a user's data.csv beside an lmc.json of '{}', or notes.txt
    and weights/mine.bin put into a real workspace, were deleted with it."""
    src = f16()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "lmc.json").write_text("{}")
    (fake / "data.csv").write_text("a,b\n")
    _one_line(_cli("convert", src, "-o", fake, "--force"), "holds data.csv")
    assert (fake / "data.csv").read_text() == "a,b\n"

    ws = tmp_path / "ws"
    convert(src, ws)
    for extra in ("notes.txt", "weights/mine.bin"):
        (ws / extra).write_text("mine")
        with pytest.raises(WorkspaceError, match=f"holds {extra}, which the lmc output there does not list"):
            convert(src, ws, force=True)
        assert (ws / extra).read_text() == "mine"
        (ws / extra).unlink()
    convert(src, ws, force=True)  # a genuine workspace is still replaced

    hf = tmp_path / "hf"  # an `lmc quantize` HF checkpoint holds only the files it writes
    hf.mkdir()
    for name in ("lmc_provenance.json", "config.json", "model.safetensors", "data.csv"):
        (hf / name).write_text("{}")
    with pytest.raises(WorkspaceError, match="holds data.csv"):
        convert(src, hf, force=True)
    (hf / "data.csv").unlink()
    convert(src, hf, force=True)
    assert (hf / "manifest.json").is_file()


# ----------------------------------------------------------------------------- safetensors tensors


@pytest.mark.parametrize("dtype", ["auto", "float32"])  # the torch-free converter, then the torch one
def test_tensor_in_two_shards_is_refused_naming_both(dtype, f16, tmp_path):
    """A tensor in two safetensors files was converted silently, the last file's copy winning."""
    from safetensors.torch import load_file, save_file

    src = f16()
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    save_file(state, src / "a.safetensors", metadata={"format": "pt"})
    save_file({"model.norm.weight": torch.full_like(state["model.norm.weight"], 7.0)}, src / "b.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(LmcError, match=r"tensor model.norm.weight is in both \S*a.safetensors and \S*b.safetensors") as e:
        convert(src, tmp_path / "ws", dtype=dtype)
    assert "\n" not in str(e.value) and not (tmp_path / "ws").exists()


@pytest.mark.parametrize("st_dtype,torch_dtype", [("U16", "uint16"), ("I16", "int16"), ("U32", "uint32"),
                                                  ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"),
                                                  ("F8_E5M2", "float8_e5m2"), ("C64", "complex64")])
def test_tensor_of_an_unread_dtype_is_one_line(st_dtype, torch_dtype, f16, tmp_path):
    """A safetensors dtype outside lmc's table was a KeyError traceback."""
    from safetensors.torch import load_file, save_file

    src = f16()
    name = "model.layers.0.input_layernorm.weight"
    state = load_file(src / "model.safetensors")
    state[name] = torch.ones(state[name].shape).to(getattr(torch, torch_dtype))
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmcError, match=f"tensor {name} in \\S*model.safetensors has dtype {st_dtype}, which lmc "
                                       "does not convert") as e:
        convert(src, tmp_path / "ws")
    assert "\n" not in str(e.value) and not (tmp_path / "ws").exists()


# ----------------------------------------------------------------------------- config.json values


@pytest.mark.parametrize("change,message", [
    ({"tie_word_embeddings": "false"}, "config value tie_word_embeddings='false' must be true or false"),
    ({"attention_bias": "false"}, "config value qkv_bias='false' must be true or false"),
    ({"attention_bias": 0}, "config value qkv_bias=0 must be true or false"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "config value rope_theta=0.0 must be a positive number"),
])
def test_config_values_are_not_coerced(change, message, f16, tmp_path):
    """bool() made "false" true (lm_head.weight then dropped as if tied, q/k/v biases expected), and a rope_theta of
    0 was replaced by 10000 (`x or 10000.0`)."""
    src = f16()
    _edit_json(src / "config.json", lambda c: c.update(change))
    for dtype in ("auto", "float32"):
        with pytest.raises(LmcError, match=message.replace("(", r"\(")) as e:
            convert(src, tmp_path / dtype, dtype=dtype)
        assert "\n" not in str(e.value) and not (tmp_path / dtype).exists()


# ----------------------------------------------------------------------------- JSON files: huge numbers, pipes, sizes

BIG_INT = '{"x": ' + "9" * 5000 + "}"  # over Python's 4300-digit limit: json.loads raises a bare ValueError


def _sharded(src: Path) -> Path:
    """`src` with its weights in two shards named by a model.safetensors.index.json; returns the index."""
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, src / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src / "model.safetensors.index.json"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer_config.json"])
def test_source_json_with_a_huge_integer_is_one_line(name, f16, tmp_path):
    """An integer of over 4300 digits raised a ValueError traceback from readers that caught only JSONDecodeError."""
    src = f16()
    _sharded(src)
    (src / name).write_text(BIG_INT)
    for dtype in ("auto", "float32"):
        with pytest.raises(LmcError, match={"config.json": "config.json is not valid JSON .a number too long",
                                            "model.safetensors.index.json": "index.json is malformed",
                                            "tokenizer_config.json": "tokenizer_config.json is not a JSON object"}[name]) as e:
            convert(src, tmp_path / dtype, dtype=dtype)
        assert "\n" not in str(e.value) and not (tmp_path / dtype).exists()
    _one_line(_cli("convert", src, "-o", tmp_path / "cli"), name)


@pytest.mark.parametrize("name", ["lmc.json", "manifest.json"])
def test_workspace_json_with_a_huge_integer_is_one_line(name, f16, tmp_path):
    from lmc.format.writing import bytes_record

    ws = tmp_path / "ws"
    convert(f16(), ws)
    (ws / name).write_text((ws / name).read_text().replace('"format_version": 2', '"format_version": ' + "2" * 5000))
    if name == "lmc.json":
        _edit_json(ws / "manifest.json", lambda m: m["files"].__setitem__("lmc.json", bytes_record((ws / name).read_bytes())))
    for args in (("verify", ws), ("inspect", ws), ("convert", ws, "-o", tmp_path / "copy")):
        r = _cli(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{name} is not valid JSON (a number too long to read" in r.stderr + r.stdout, r.stderr + r.stdout
    assert not (tmp_path / "copy").exists()


def _cli_quick(*args) -> subprocess.CompletedProcess:
    """_cli with a timeout short enough that a hang fails the test soon."""
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("what", ["config.json", "shard", "index"])
def test_pipe_in_place_of_a_source_file_is_one_line_not_a_hang(what, f16, tmp_path):
    """A FIFO as config.json or a weight shard hung `lmc convert` at --tp 1 (the torch-free planner read it)."""
    src = f16()
    index = _sharded(src)
    target = {"config.json": src / "config.json", "shard": src / "model-00001-of-00002.safetensors",
              "index": index}[what]
    target.unlink()
    os.mkfifo(target)
    r = _cli_quick("convert", src, "-o", tmp_path / "ws")
    _one_line(r, f"{target.name} is not a regular file")
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_huge_config_or_index_is_refused_unread(name, f16, tmp_path):
    """An 8 GiB (sparse) config.json or index was read whole: a MemoryError."""
    src = f16()
    _sharded(src)
    with open(src / name, "r+b") as f:
        f.truncate(8 << 30)
    r = subprocess.run(["prlimit", f"--as={3 << 30}", sys.executable, "-m", "lmc", "convert", src, "-o", tmp_path / "ws"],
                       capture_output=True, text=True, timeout=120)
    _one_line(r, f"{name} is over")
    assert not (tmp_path / "ws").exists()


# ----------------------------------------------------------------------------- GGUF metadata of the wrong type


def _gguf_with(path: Path, monkeypatch, **meta) -> Path:
    """write_tiny_gguf's file with metadata keys set (value, GGUF type, array item type) or removed (None)."""
    gguf = pytest.importorskip("gguf")
    from gguf.gguf_writer import GGUFValue
    from test_gguf import write_tiny_gguf

    real = gguf.GGUFWriter.write_header_to_file

    def patched(self, *args, **kwargs):
        for key, spec in meta.items():
            if spec is None:
                self.kv_data[0].pop(key, None)
            else:
                self.kv_data[0][key] = GGUFValue(*spec)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", patched)
    write_tiny_gguf(path)
    return path


@pytest.mark.parametrize("key,spec,what", [
    ("llama.rope.freq_base", ("abc", "STRING", None), "not a positive number"),
    ("llama.rope.freq_base", ([1.0, 2.0], "ARRAY", "FLOAT32"), "not a positive number"),
    ("llama.rope.freq_base", (float("nan"), "FLOAT32", None), "not a positive number"),
    ("llama.rope.freq_base", (0.0, "FLOAT32", None), "not a positive number"),
    ("llama.attention.layer_norm_rms_epsilon", ("x", "STRING", None), "not a positive number"),
    ("general.architecture", (["llama"], "ARRAY", "STRING"), "not a string"),
    ("general.sampling.temp", ("hot", "STRING", None), "not a finite number"),
    ("general.sampling.top_p", (float("nan"), "FLOAT32", None), "not a finite number"),
    ("tokenizer.ggml.eos_token_id", ([2, 3], "ARRAY", "UINT32"), "not a token id"),
])
def test_gguf_metadata_of_the_wrong_type_is_one_line(key, spec, what, monkeypatch, tmp_path):
    """Such values were tracebacks (ValueError, TypeError: unhashable list) or, for a NaN top_p, a literal NaN
    written into the workspace's generation_config.json."""
    from gguf import GGUFValueType

    from lmc.compiler.gguf import GGUFReader

    value, kind, item = spec
    path = _gguf_with(tmp_path / "bad.gguf", monkeypatch,
                      **{key: (value, GGUFValueType[kind], item and GGUFValueType[item])})
    with pytest.raises(LmcError, match=f"GGUF metadata {key} is .*, {what}; the file is corrupt") as e:
        reader = GGUFReader(path)
        reader.config_dict()
        reader.generation_config()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- sliding-window attention


@pytest.mark.parametrize("dtype", ["auto", "float32"])  # the torch-free converter, then the torch one
def test_sliding_window_model_caps_the_session_length_at_its_window(dtype, f16, tmp_path):
    """A Mistral model with sliding_window 16 (MistralConfig's default is 4096, so Mistral-7B-v0.1 has one) was
    converted as full attention over its whole context, silently unlike the model past the window; lmc has no
    sliding-window attention, so the workspace's session length is now capped at the window, with one warning."""
    from lmc.format.workspace import Workspace

    src = f16("mistral")
    _edit_json(src / "config.json", lambda c: c.update(sliding_window=16))
    said = []
    convert(src, tmp_path / "ws", dtype=dtype, say=said.append)
    assert Workspace(tmp_path / "ws").meta["engine"] == {"session_len": 16, "cache_block_seq_len": 64,
                                                         "attention_window": 16}
    assert len(said) == 1 and "sliding window of 16 tokens" in said[0] and "capped at 16 tokens" in said[0]
    _edit_json(src / "config.json", lambda c: c.pop("sliding_window"))  # absent: MistralConfig's 4096 > this context
    said.clear()
    convert(src, tmp_path / "ws2", dtype=dtype, say=said.append)
    engine = Workspace(tmp_path / "ws2").meta["engine"]
    assert engine["session_len"] == json.loads((src / "config.json").read_text())["max_position_embeddings"]
    assert "attention_window" not in engine and said == []


def test_a_session_longer_than_the_sliding_window_is_refused(f16, tmp_path):
    """The window cap was only the workspace's default: `--session-len 64` (or pipeline(session_len=64), or
    lmc eval ppl --seqlen 64) ran full attention past a 16-token window, silently unlike the model; now one line
    (as vLLM refuses a max_model_len past the model's). Up to the window it runs, and plain models are untouched."""
    from lmc.format.workspace import Workspace
    from lmc.runtime.config import EngineConfig
    from lmc.runtime.engine import Engine

    src = f16("mistral")
    _edit_json(src / "config.json", lambda c: c.update(sliding_window=16))
    convert(src, tmp_path / "ws", say=lambda m: None)
    with pytest.raises(LmcError, match=r"--session-len 17 is longer than the sliding attention window .* \(16 tokens\)"
                                       r".*pass --session-len 16 or less"):
        Engine(str(tmp_path / "ws"), EngineConfig(session_len=17, device="cpu", max_batch_size=1))
    assert Engine(str(tmp_path / "ws"), EngineConfig(session_len=16, device="cpu", max_batch_size=1)).session_len == 16
    assert Engine(str(tmp_path / "ws"), EngineConfig(device="cpu", max_batch_size=1)).session_len == 16
    _one_line(_cli("generate", tmp_path / "ws", "hi", "--session-len", "64", "--device", "cpu"),
              "--session-len 64 is longer than the sliding attention window")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 50)
    _one_line(_cli("eval", "ppl", tmp_path / "ws", "--dataset", text, "--seqlen", "32", "--device", "cpu"),
              "--seqlen 32 is longer than the sliding attention window")
    _edit_json(tmp_path / "ws" / "lmc.json", lambda m: m["engine"].update(attention_window=0))
    with pytest.raises(WorkspaceError, match="engine attention_window 0 is not a positive integer"):
        Workspace(tmp_path / "ws")


def test_qwen2_sliding_window_and_a_malformed_window(f16, tmp_path):
    from lmc.format.workspace import Workspace

    src = f16("qwen2")
    _edit_json(src / "config.json", lambda c: (c.update(use_sliding_window=True, sliding_window=16, max_window_layers=1),
                                               c.pop("layer_types", None)))
    convert(src, tmp_path / "ws", say=lambda m: None)
    assert Workspace(tmp_path / "ws").meta["engine"]["session_len"] == 16
    _edit_json(src / "config.json", lambda c: c.update(sliding_window="16"))
    with pytest.raises(LmcError, match="config value sliding_window='16' must be a positive integer or null"):
        convert(src, tmp_path / "ws2")
    assert not (tmp_path / "ws2").exists()
