"""Hostile outputs of the writing commands (`lmc convert`, `lmc quantize`): a user's folder or file at the output
path, `.` as the output, an output inside a workspace, a folder that cannot be written, a full disk, and Ctrl-C
while the finished output is renamed into place. Each is one line and a non-zero exit, and nothing of the
user's is lost or half-written."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import without_write_override

from lmc.compiler.convert import convert
from lmc.errors import WorkspaceError
from lmc.format.workspace import verify_workspace


def _cli(*args, cwd=None, preexec_fn=None, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "lmc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, preexec_fn=preexec_fn)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(r: subprocess.CompletedProcess, phrase: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and phrase in r.stderr, r.stderr
    assert r.stdout == ""


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_force_replaces_only_what_lmc_wrote(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("years of work")
    for flags in ((), ("--force",)):
        _one_line(_cli("convert", ckpt, "-o", mine, *flags), "lmc did not write")
    assert _tree(mine) == {"notes.txt": b"years of work"}
    a_file = tmp_path / "model.txt"
    a_file.write_text("keep")
    for flags in ((), ("--force",)):
        _one_line(_cli("convert", ckpt, "-o", a_file, *flags), "is a file")
    assert a_file.read_text() == "keep"
    with pytest.raises(WorkspaceError, match="lmc did not write"):  # quantize: before calibration starts
        from lmc.compiler.quantize import QuantizeOptions, quantize

        quantize(ckpt, mine, QuantizeOptions(calib_samples=0, w_group_size=32, device="cpu"), force=True, say=print)
    # what --force does replace: an lmc workspace, an empty folder, a symlink (the link, not what it points to)
    convert(ckpt, tmp_path / "ws")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(mine)
    for out in ("ws", "empty", "link"):
        convert(ckpt, tmp_path / out, dtype="float16", force=True)
        assert verify_workspace(tmp_path / out) == [] and not (tmp_path / out).is_symlink()
    assert _tree(mine) == {"notes.txt": b"years of work"} and _leftovers(tmp_path) == []


def test_dot_output_is_the_current_folder(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    ws = tmp_path / "ws"
    convert(ckpt, ws)
    r = _cli("convert", ckpt, "-o", ".", "--force", "--dtype", "float16", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert verify_workspace(ws) == [] and _leftovers(ws) == [] and _leftovers(tmp_path) == []
    assert '"dtype": "float16"' in (ws / "lmc.json").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    _one_line(_cli("convert", ckpt, "-o", ".", "--force", cwd=tmp_path / "mine"), "lmc did not write")
    assert _tree(tmp_path / "mine") == {"notes.txt": b"keep"}


def test_output_inside_a_workspace_or_under_a_file_is_refused(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    ws = tmp_path / "ws"
    convert(ckpt, ws)
    with pytest.raises(WorkspaceError, match="inside the workspace"):
        convert(ckpt, ws / "weights" / "more")
    assert verify_workspace(ws) == []
    (tmp_path / "a_file").write_text("keep")
    _one_line(_cli("convert", ckpt, "-o", tmp_path / "a_file" / "ws"), "not a folder")
    assert (tmp_path / "a_file").read_text() == "keep"


def test_unwritable_output_folder_is_one_line(checkpoint, tmp_path):
    prefix = without_write_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    ckpt = checkpoint("llama3")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (locked / "ws", locked / "sub" / "ws"):
            _one_line(_cli("convert", ckpt, "-o", out, prefix=prefix), "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("flags", [(), ("--dtype", "float16")], ids=["passthrough", "torch"])
def test_full_disk_is_one_line_and_keeps_the_previous_workspace(flags, checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    ws = tmp_path / "ws"
    convert(ckpt, ws, dtype="bfloat16")
    before = _tree(ws)
    r = _cli("convert", ckpt, "-o", ws, "--force", *flags, preexec_fn=_file_size_limit(64 * 1024))
    _one_line(r, "File too large")
    assert "free disk space" in r.stderr
    assert _tree(ws) == before and _leftovers(tmp_path) == []


def test_ctrl_c_while_renaming_into_place_loses_nothing(checkpoint, tmp_path, monkeypatch):
    import lmc.format.writing as writing

    ckpt = checkpoint("llama3")
    ws = tmp_path / "ws"
    convert(ckpt, ws)
    real = os.replace

    def interrupted(src, dst):  # Ctrl-C arrives right after the previous workspace was moved aside
        real(src, dst)
        if Path(dst).name == "old":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(writing.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, ws, dtype="float16", force=True)
    monkeypatch.undo()
    assert verify_workspace(ws) == [] and _leftovers(tmp_path) == []
