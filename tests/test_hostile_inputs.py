"""Hostile checkpoint and workspace inputs that once got past the checks (a traceback, a silent conversion, an
unbounded loop, a file read outside its folder): each now gets one line, a non-zero exit and nothing written."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmc.compiler.convert import convert
from lmc.errors import LmcError, WorkspaceError
from lmc.format.workspace import Workspace


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], capture_output=True, text=True, timeout=120)


def _one_line(r: subprocess.CompletedProcess, phrase: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and phrase in r.stderr, r.stderr


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_header(shard: Path, change, tail: bytes = b"") -> None:
    """Apply `change` to a safetensors file's parsed header, keep its data (plus `tail`)."""
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:] + tail)


@pytest.fixture
def workspace(checkpoint, tmp_path) -> Path:
    ws = tmp_path / "ws"
    convert(checkpoint("llama3"), ws)
    return ws


# ----------------------------------------------------------------------------- safetensors data section


def test_overlapping_or_trailing_tensor_data_is_refused(checkpoint, tmp_path):
    """Two tensors sharing bytes (a hole elsewhere) or bytes after the last tensor: the safetensors library refuses
    such a file; the torch-free converter took it and wrote a workspace with one tensor's data in another's place."""
    overlap = checkpoint("llama3")
    _edit_header(overlap / "model.safetensors", lambda h: h["model.layers.0.input_layernorm.weight"].__setitem__(
        "data_offsets", list(h["model.norm.weight"]["data_offsets"])))
    _one_line(_cli("convert", overlap, "-o", tmp_path / "a"), "invalid offset for tensor")
    trailing = checkpoint("llama3")
    _edit_header(trailing / "model.safetensors", lambda h: None, tail=b"\0" * 64)
    with pytest.raises(LmcError, match="not fully covered"):
        convert(trailing, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- absurd sizes


def test_absurd_layer_count_is_refused_at_once(checkpoint, workspace, tmp_path):
    """num_hidden_layers 2**24 - 1 passed the size check and every tensor table was built for it (1M layers: 30 s
    and 2.5 GB; this one did not finish in 120 s)."""
    ckpt = checkpoint("llama3")
    _edit_json(ckpt / "config.json", lambda c: c.update(num_hidden_layers=(1 << 24) - 1))
    start = time.perf_counter()
    _one_line(_cli("convert", ckpt, "-o", tmp_path / "a"), "num_layers=16777215 must be a positive integer (below 4096)")
    assert time.perf_counter() - start < 60 and not (tmp_path / "a").exists()
    from lmc.format.writing import bytes_record

    _edit_json(workspace / "lmc.json", lambda m: m["model"].update(num_layers=(1 << 24) - 1))
    _edit_json(workspace / "manifest.json",
               lambda m: m["files"].__setitem__("lmc.json", bytes_record((workspace / "lmc.json").read_bytes())))
    with pytest.raises(WorkspaceError, match="num_layers=16777215"):
        Workspace(workspace)


def test_absurd_session_len_in_lmc_json_is_refused(workspace):
    """lmc.json's engine.session_len sized the block tables: 10**15 asked numpy for 114 TiB (a traceback); a
    smaller absurd value would have been allocated."""
    from lmc.format.writing import bytes_record

    _edit_json(workspace / "lmc.json", lambda m: m.update(engine={"session_len": 10**15}))
    _edit_json(workspace / "manifest.json",
               lambda m: m["files"].__setitem__("lmc.json", bytes_record((workspace / "lmc.json").read_bytes())))
    with pytest.raises(WorkspaceError, match="engine session_len 1000000000000000 is not a positive integer below 16777216"):
        Workspace(workspace)


# ----------------------------------------------------------------------------- GGUF metadata


def test_gguf_without_heads_or_first_layer_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf

    from lmc.compiler.gguf import GGUFReader

    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    key = b"llama.attention.head_count\x04\x00\x00\x00"  # the key, then its type (uint32), then its value
    at = data.index(key) + len(key)
    (tmp_path / "heads.gguf").write_bytes(data[:at] + struct.pack("<I", 0) + data[at + 4:])
    with pytest.raises(LmcError, match="head_count is 0, not a positive integer"):  # was ZeroDivisionError
        GGUFReader(tmp_path / "heads.gguf").config_dict()
    q = data.index(b"blk.0.attn_q.weight")
    (tmp_path / "noq.gguf").write_bytes(data[:q] + b"blk.9.attn_q.weight" + data[q + 19:])
    with pytest.raises(LmcError, match="has no blk.0.attn_q.weight"):  # was KeyError
        GGUFReader(tmp_path / "noq.gguf").config_dict()


# ----------------------------------------------------------------------------- source tokenizer and .bin files


@pytest.mark.parametrize("name,text", [("tokenizer_config.json", "{bad"), ("tokenizer_config.json", "[1]"),
                                       ("generation_config.json", "{bad")])
def test_source_tokenizer_json_that_is_not_an_object_is_refused(name, text, checkpoint, tmp_path):
    """Such a file was copied into the workspace, which then failed in `lmc generate` with a traceback."""
    ckpt = checkpoint("llama3")
    (ckpt / name).write_text(text)
    for dtype in ("auto", "float16"):  # the torch-free converter, then the torch one
        with pytest.raises(LmcError, match=f"{name} is not a JSON object"):
            convert(ckpt, tmp_path / dtype, dtype=dtype)
        assert not (tmp_path / dtype).exists()


def test_tokenizer_transformers_cannot_build_is_one_line(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(LmcError, match="transformers could not build one") as e:
        convert(ckpt, tmp_path / "ws")
    assert "\n" not in str(e.value) and not (tmp_path / "ws").exists()


def test_bin_checkpoint_of_objects_is_one_line(checkpoint, tmp_path):
    """A .bin holding a list (was a TypeError traceback) or a Python object torch's weights_only refuses (was
    torch's six-line message advising weights_only=False)."""
    import fractions

    for i, obj in enumerate(([1, 2], {"x": fractions.Fraction(1, 3)})):
        ckpt = checkpoint("llama3")
        (ckpt / "model.safetensors").unlink()
        torch.save(obj, ckpt / "pytorch_model.bin")
        with pytest.raises(LmcError, match="not a state dict|never unpickles") as e:
            convert(ckpt, tmp_path / str(i))
        assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
        assert not (tmp_path / str(i)).exists()


# ----------------------------------------------------------------------------- a workspace's tokenizer folder


@pytest.mark.parametrize("name,text,message", [
    ("tokenizer_config.json", "{bad", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json is not a JSON object"),
    ("generation_config.json", "{bad", "generation_config.json is not valid JSON"),
    ("tokenizer.json", '{"a": 1}', "tokenizer.json is not readable by the tokenizers library"),
    ("tokenizer_config.json", json.dumps({"chat_template": [{"x": 1}]}), "chat_template is neither a string"),
])
def test_malformed_workspace_tokenizer_files_are_one_line(name, text, message, workspace):
    from lmc.runtime.tokenizer import Tokenizer

    (workspace / "tokenizer" / "chat_template.jinja").unlink()  # else tokenizer_config.json's template is not read
    (workspace / "tokenizer" / name).write_text(text)
    with pytest.raises(WorkspaceError, match=message) as e:
        Tokenizer(workspace / "tokenizer")
    assert "\n" not in str(e.value)


def test_workspace_tokenizer_links_pointing_outside_are_not_read(workspace, tmp_path):
    """An unlisted tokenizer file (or the tokenizer folder itself) linked to a file outside the workspace was read
    by `lmc generate`: the outside template rendered the prompt."""
    from lmc.runtime.tokenizer import Tokenizer

    outside = tmp_path / "outside.jinja"
    outside.write_text("OUTSIDE {{ messages[0].content }}")
    template = workspace / "tokenizer" / "chat_template.jinja"
    template.unlink()
    template.symlink_to(outside)
    _edit_json(workspace / "manifest.json", lambda m: m["files"].pop("tokenizer/chat_template.jinja"))
    with pytest.raises(WorkspaceError, match="chat_template.jinja is a link pointing outside"):
        Tokenizer(Workspace(workspace).tokenizer_dir)
    _one_line(_cli("generate", workspace, "hi", "--max-new-tokens", "1", "--device", "cpu"), "link pointing outside")
    template.unlink()
    (workspace / "tokenizer").rename(tmp_path / "tok")
    (workspace / "tokenizer").symlink_to(tmp_path / "tok")
    _edit_json(workspace / "manifest.json",
               lambda m: [m["files"].pop(k) for k in [k for k in m["files"] if k.startswith("tokenizer/")]])
    with pytest.raises(WorkspaceError, match="tokenizer is a link pointing outside the workspace"):
        Workspace(workspace).tokenizer_dir


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_workspace_tokenizer_file_that_is_a_pipe_is_one_line_not_a_hang(name, workspace):
    """A pipe in place of a tokenizer file blocked Tokenizer() forever (a plain read waits for a writer)."""
    import os

    from lmc.runtime.tokenizer import Tokenizer

    (workspace / "tokenizer" / name).unlink(missing_ok=True)
    os.mkfifo(workspace / "tokenizer" / name)
    with pytest.raises(WorkspaceError, match=f"{name} is not readable text .not a regular file") as e:
        Tokenizer(workspace / "tokenizer")
    assert "\n" not in str(e.value)


def test_read_capped_stops_at_its_limit_and_never_blocks_on_a_pipe(tmp_path):
    import os

    from lmc.format.paths import NotRegularFile, read_capped

    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_capped(tmp_path / "f", 10) == b"x" * 11  # limit + 1: the caller sees it is too long
    assert read_capped(tmp_path / "f", 100) == b"x" * 100
    os.mkfifo(tmp_path / "pipe")
    for path in (tmp_path / "pipe", tmp_path):
        with pytest.raises(NotRegularFile):
            read_capped(path, 10)
    with pytest.raises(FileNotFoundError):
        read_capped(tmp_path / "missing", 10)


@pytest.mark.parametrize("rope", [{"type": "llama3"}, {"type": "linear"}, {"factor": 2.0}])
def test_rope_scaling_without_its_keys_is_one_line(workspace, rope):
    """A rope_scaling entry lacking type or factor was a 47-line TypeError traceback (an extra key was refused)."""
    from lmc.format.writing import bytes_record

    _edit_json(workspace / "lmc.json", lambda m: m["model"].update(rope_scaling=rope))
    _edit_json(workspace / "manifest.json",
               lambda m: m["files"].__setitem__("lmc.json", bytes_record((workspace / "lmc.json").read_bytes())))
    _one_line(_cli("inspect", workspace), "rope_scaling is malformed (it needs type and factor")
