"""O_DIRECT I/O of workspace files: the writer's DirectFile (every file lmc writes into a workspace) and
file_digest(direct=True) (what `lmc verify` reads with): identical bytes, hashes and file mode through the
direct and buffered paths, the buffered path taken where O_DIRECT is refused, a disk error raised in the caller."""
from __future__ import annotations

import errno

import os
import threading
from pathlib import Path

import pytest
from blake3 import blake3
import torch
from test_convert_bytes import DIGESTS, tree_digest

import lmc.format.hashing as hashing
import lmc.format.writing as writing
from lmc.compiler.convert import convert
from lmc.format.workspace import TensorSpec, verify_workspace, write_safetensors

SIZES = (0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 2 * 4 * 4096, 2 * 4 * 4096 + 1000)

def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("write", "digest") and t.is_alive()]

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))

@pytest.fixture
def small_blocks(monkeypatch):
    """Staging buffers and hash reads of 4 blocks, 1000-byte slices: pieces straddle buffers, tails need padding."""
    monkeypatch.setattr(writing, "STAGING", 4 * writing.DIRECT_BLOCK)
    monkeypatch.setattr(writing, "CHUNK", 1000)
    monkeypatch.setattr(hashing, "CHUNK", 4 * hashing.DIRECT_BLOCK)

@pytest.fixture
def direct(tmp_path):
    probe = writing.DirectFile.open(tmp_path / "probe")
    if probe is None:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    probe.close()
    assert (tmp_path / "probe").stat().st_size == 0
    (tmp_path / "probe").unlink()

def _refuse_direct_open(monkeypatch):
    real_open = os.open

    def open_(path, flags, mode=0o777, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", open_)

def _write(path: Path, data: bytes) -> tuple[dict, str]:
    out = writing.PipelinedWriter(path)
    try:
        out.write(data[: len(data) // 3])
        out.write(data[len(data) // 3:])
        record = out.close()
    finally:
        out.abort()
    return record, type(out.f).__name__

def _expected_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask

@pytest.mark.usefixtures("direct", "small_blocks")
def test_direct_and_buffered_files_are_identical(tmp_path, monkeypatch):
    payloads = {size: os.urandom(size) for size in SIZES}
    for size, data in payloads.items():
        record, kind = _write(tmp_path / f"direct{size}", data)
        assert kind == "DirectFile"
        assert (tmp_path / f"direct{size}").read_bytes() == data
        assert record == {"size": size, "blake3": blake3(data).hexdigest()}
        assert hashing.file_digest(tmp_path / f"direct{size}", "blake3", direct=True) == record["blake3"]
        assert (tmp_path / f"direct{size}").stat().st_mode & 0o777 == _expected_mode()
    _refuse_direct_open(monkeypatch)
    for size, data in payloads.items():
        record, kind = _write(tmp_path / f"buffered{size}", data)
        assert kind == "BufferedWriter"
        assert (tmp_path / f"buffered{size}").read_bytes() == data
        assert record == {"size": size, "blake3": blake3(data).hexdigest()}
        assert hashing.file_digest(tmp_path / f"buffered{size}", "blake3", direct=True) == record["blake3"]  # read buffered
        assert (tmp_path / f"buffered{size}").stat().st_mode & 0o777 == _expected_mode()

@pytest.mark.usefixtures("direct", "small_blocks")
def test_direct_read_sees_a_changed_byte_and_a_short_file(tmp_path):
    data = bytearray(os.urandom(5 * 4096 + 7))
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hashing.file_digest(path, "blake3", direct=True) == blake3(data).hexdigest()
    data[4 * 4096 + 3] ^= 1
    path.write_bytes(data)
    assert hashing.file_digest(path, "blake3", direct=True) == blake3(data).hexdigest()
    path.write_bytes(data[:4096])
    assert hashing.file_digest(path, "blake3", direct=True) == blake3(data[:4096]).hexdigest()

@pytest.mark.usefixtures("direct")
def test_direct_write_replaces_a_longer_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 50000)
    record, kind = _write(tmp_path / "f", b"abc" * 3000)
    assert kind == "DirectFile" and (tmp_path / "f").read_bytes() == b"abc" * 3000

@pytest.mark.usefixtures("small_blocks")
def test_refused_first_direct_write_falls_back_to_buffered(tmp_path, monkeypatch):
    """A filesystem that opens with O_DIRECT but refuses the aligned write (EINVAL): written buffered, no fd left open."""
    def pwrite(fd, data, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", pwrite)
    fds = _open_fds()
    data = os.urandom(3 * 4096 + 5)
    record, kind = _write(tmp_path / "f", data)
    assert kind == "BufferedWriter" and (tmp_path / "f").read_bytes() == data
    assert record == {"size": len(data), "blake3": blake3(data).hexdigest()}
    assert _open_fds() == fds

@pytest.mark.usefixtures("direct", "small_blocks")
def test_refused_first_direct_read_falls_back_to_buffered(tmp_path, monkeypatch):
    data = os.urandom(3 * 4096 + 5)
    (tmp_path / "f").write_bytes(data)

    def preadv(fd, buffers, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "preadv", preadv)
    fds = _open_fds()
    assert hashing.file_digest(tmp_path / "f", "blake3", direct=True) == blake3(data).hexdigest()
    assert _open_fds() == fds and not _writer_threads()

@pytest.mark.usefixtures("direct", "small_blocks")
def test_direct_write_error_reaches_the_caller(tmp_path, monkeypatch):
    """ENOSPC from a pwrite on the writer thread is raised in the caller's thread; threads stopped, fd closed."""
    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:  # the probe and two blocks go through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    fds = _open_fds()
    specs = [TensorSpec(f"t{i}", torch.float32, (64, 64)) for i in range(4)]
    with pytest.raises(OSError) as e:
        write_safetensors(tmp_path / "x.safetensors", specs, lambda name: torch.ones(64, 64))
    assert e.value.errno == errno.ENOSPC
    assert not _writer_threads() and _open_fds() == fds

@pytest.mark.usefixtures("direct", "small_blocks")
def test_convert_and_verify_through_direct_and_buffered_io(checkpoint, tmp_path, monkeypatch):
    real_open, opened = writing.DirectFile.open, []
    monkeypatch.setattr(writing.DirectFile, "open", staticmethod(lambda path: opened.append(real_open(path)) or opened[-1]))
    convert(checkpoint("llama3"), tmp_path / "direct")
    assert tree_digest(tmp_path / "direct") == DIGESTS["llama3-fp32"]
    assert opened and all(opened)
    assert verify_workspace(tmp_path / "direct") == []
    opened.clear()
    _refuse_direct_open(monkeypatch)
    convert(checkpoint("llama3"), tmp_path / "buffered")
    assert tree_digest(tmp_path / "buffered") == DIGESTS["llama3-fp32"]
    assert opened and not any(opened)
    assert verify_workspace(tmp_path / "buffered") == []
