"""Hostile inputs of the run commands besides the workspace (text files, chat templates, stdin, the Python API)
that once got a traceback, a hang or unbounded memory: each now gets one line and a non-zero exit."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_checkpoint

from lmc.errors import LmcError


def _cli(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=60)


def _one_line(r: subprocess.CompletedProcess, phrase: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and phrase in r.stderr, r.stderr


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # no disk blocks: a huge file that costs nothing
    return path


# ----------------------------------------------------------------------------- --dataset / --calib-dataset files


def _text_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "dir.txt").mkdir()
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    return [(tmp_path / "fifo.txt", "not a regular file"), (tmp_path / "dir.txt", "not a regular file"),
            (tmp_path / "zero.txt", "not a regular file"),
            (_sparse(tmp_path / "huge.txt", 30 << 30), "lmc reads at most"),
            (_sparse(tmp_path / "huge.jsonl", 30 << 30), "lmc reads at most"),
            (tmp_path / "deep.jsonl", "deep.jsonl:1: not valid JSON"),
            (tmp_path / "bad.parquet", "not a readable parquet file")]


def test_text_files_that_are_not_text_are_one_line_without_reading_them(tmp_path):
    from lmc.calib.text import load_text

    for path, phrase in _text_cases(tmp_path):  # a pipe or /dev/zero once hung or read forever; 30 GB: MemoryError
        with pytest.raises(LmcError, match=phrase) as e:
            load_text(str(path), "test", purpose="calib")
        assert "\n" not in str(e.value)
        assert "--calib-dataset" in str(e.value) or phrase != "not a regular file"  # says which flag to fix


def test_a_parquet_column_that_decompresses_past_the_limit_is_refused(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lmc.calib import text

    pq.write_table(pa.table({"text": ["a" * 100_000] * 10}), tmp_path / "bomb.parquet", compression="zstd")
    assert (tmp_path / "bomb.parquet").stat().st_size < 10_000
    monkeypatch.setattr(text, "MAX_TEXT_FILE_BYTES", 500_000)  # the column is ~1 MB uncompressed
    with pytest.raises(LmcError, match="lmc reads at most 500000"):  # one value repeated through the dictionary
        text.load_text(str(tmp_path / "bomb.parquet"), "test")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")  # once: a TypeError joining the rows
    with pytest.raises(LmcError, match="'text' column holds int64, not strings"):
        text.load_text(str(tmp_path / "ints.parquet"), "test")
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\rthree\n")  # read as read_text reads it: universal newlines
    assert text.load_text(str(tmp_path / "crlf.txt"), "test").text == "one\ntwo\nthree\n"


def test_eval_dataset_that_is_a_pipe_is_one_line_naming_the_flag(tmp_path):
    os.mkfifo(tmp_path / "fifo.txt")
    r = _cli("eval", "ppl", tmp_path / "no-model", "--dataset", tmp_path / "fifo.txt")
    _one_line(r, "not a regular file")
    assert "--dataset" in r.stderr


# ----------------------------------------------------------------------------- --chat-template FILE


def test_chat_template_files_that_are_not_templates_are_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo.jinja")  # once: a hang
    (tmp_path / "zero.jinja").symlink_to("/dev/zero")  # once: read until MemoryError
    (tmp_path / "bin.jinja").write_bytes(b"\xff\xfe\x00binary")  # once: a UnicodeDecodeError traceback
    cases = [("fifo.jinja", "not a regular file"), ("zero.jinja", "not a regular file"), ("bin.jinja", "not UTF-8"),
             (_sparse(tmp_path / "huge.jinja", 100 << 20).name, "is over 1048576 bytes")]  # once: minutes compiling
    for name, phrase in cases:  # the template is read before the URL is reached or a model loads
        _one_line(_cli("chat", "http://127.0.0.1:9", "--chat-template", tmp_path / name, stdin=""), phrase)


def test_read_template_file_takes_a_real_template(tmp_path):
    from lmc.runtime.tokenizer import read_template_file

    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert read_template_file(tmp_path / "t.jinja").startswith("{% for m")
    (tmp_path / "bom.jinja").write_bytes(b"\xef\xbb\xbf{{ messages[0].content }}")  # 'UTF-8 with BOM': the mark
    assert read_template_file(tmp_path / "bom.jinja") == "{{ messages[0].content }}"  # was rendered into each prompt


# ----------------------------------------------------------------------------- lmc chat's standard input


def _reader(monkeypatch, data: str):
    from lmc import repl

    monkeypatch.setattr(repl, "MAX_MESSAGE_CHARS", 1000)
    monkeypatch.setattr(sys, "stdin", io.StringIO(data))
    return repl.LineReader(None)


def test_a_message_without_end_on_stdin_is_refused_with_bounded_memory(monkeypatch):
    reader = _reader(monkeypatch, "\0" * 5000)  # `lmc chat WS < /dev/zero` once read until MemoryError
    with pytest.raises(LmcError, match="over 1000 characters"):
        reader.message()
    reader = _reader(monkeypatch, '"""\n' + "a line\n" * 1000 + '"""\n')  # a block that never closes in time
    with pytest.raises(LmcError, match="over 1000 characters"):
        reader.message()
    reader = _reader(monkeypatch, "x" * 1000 + "\n" + '"""\nshort\nblock"""\n')  # at the limit: taken
    assert reader.message() == "x" * 1000 and reader.message() == "short\nblock" and reader.message() is None


# ----------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tokenizer_dir):
    from lmc.api import pipeline
    from lmc.compiler.convert import convert
    from lmc.runtime.config import EngineConfig

    root = tmp_path_factory.mktemp("api")
    convert(make_checkpoint("llama3", root / "ckpt", tokenizer_dir), root / "ws")
    with pipeline(root / "ws", backend_config=EngineConfig(device="cpu", session_len=128)) as p:
        yield p


@pytest.mark.parametrize("prompts, gen, phrase", [
    (123, None, "prompts are a string"), (None, None, "prompts are a string"), (b"hi", None, "prompts are a string"),
    ({"role": "user", "content": "hi"}, None, "prompts are a string"),  # once: two prompts, "role" and "content"
    ("hi", lambda G: {"max_new_tokens": 2}, "gen_config is a GenerationConfig"),
    ("hi", lambda G: G(n=10 ** 9), r"n must be in \[1, 128\]"),  # once: a MemoryError building 10^9 sequences
    ("hi", lambda G: G(stop_words=5), "stop_words must be a list of strings"),
    ("hi", lambda G: G(bad_words=[5]), "bad_words must be a list of strings"),
    ("hi", lambda G: G(min_p="x"), "min_p must be a number"),
    ("hi", lambda G: G(max_new_tokens=-1), "max_new_tokens must be at least 1"),
])
def test_pipeline_arguments_of_the_wrong_kind_are_one_line(pipe, prompts, gen, phrase):
    from lmc.runtime.sampling import GenerationConfig

    with pytest.raises(LmcError, match=phrase) as e:
        pipe(prompts, gen(GenerationConfig) if gen else None)
    assert "\n" not in str(e.value)


def test_pipeline_model_path_and_backend_config_of_the_wrong_kind(tmp_path):
    from lmc.api import pipeline

    with pytest.raises(LmcError, match="a model path is a string or a path, got int"):
        pipeline(123)
    with pytest.raises(LmcError, match="backend_config is a TurbomindEngineConfig"):
        pipeline(tmp_path, backend_config={"session_len": 5})


def test_a_url_of_another_scheme_and_an_unreadable_image_say_what_they_are(tmp_path):
    """`lmc chat ftp://host:1` said "ftp:/host:1 does not exist" (Path folds the slashes); an image that is not one
    named PIL's buffer object ("<_io.BytesIO object at 0x...>") in its message."""
    from lmc.api import resolve_workspace
    from lmc.runtime.image_processing import decode_image

    with pytest.raises(LmcError, match=r"^ftp://host:1 is a URL of a scheme lmc does not serve from"):
        resolve_workspace("ftp://host:1")
    with pytest.raises(LmcError, match="is not a readable image") as e:
        decode_image(b"root:x:0:0:root:/root:/bin/bash\n", "--image /etc/passwd")
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)
