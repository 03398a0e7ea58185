"""Hostile inputs to `lmc convert`, `verify` and `inspect` found by fuzzing: each once lost a user's file, was
converted silently into something else, or ended in a traceback or a hang; each now gets one line, a non-zero exit
and nothing written."""
from __future__ import annotations

import json
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
