"""DirectFile (lmc.format.writing): a workspace file written with O_DIRECT through an aligned staging buffer
has exactly the bytes a buffered write gives, at every size around the block and staging boundaries, and
falls back to buffered writes where O_DIRECT is missing or refused."""
import errno
import os

import pytest

from lmc.format import writing
from lmc.format.writing import DIRECT_ALIGN, DirectFile

STAGE = 4 * DIRECT_ALIGN  # a small staging buffer, so that the cases below cross it several times


@pytest.fixture(autouse=True)
def small_stage(monkeypatch):
    monkeypatch.setattr(writing, "CHUNK", STAGE)


def _pieces(sizes, seed=0):
    rng = __import__("random").Random(seed)
    return [bytes(rng.getrandbits(8) for _ in range(n)) for n in sizes]


CASES = [(), (1,), (DIRECT_ALIGN - 1,), (DIRECT_ALIGN,), (DIRECT_ALIGN + 1,), (STAGE - 1,), (STAGE,), (STAGE + 1,),
         (8, 4093, STAGE + 5, 1, 3 * STAGE, 700), (STAGE,) * 3, (7, STAGE - 7, DIRECT_ALIGN * 2 + 3)]


@pytest.mark.parametrize("sizes", CASES)
def test_direct_file_writes_the_bytes_given(tmp_path, sizes):
    pieces = _pieces(sizes)
    f = DirectFile(tmp_path / "out")
    for p in pieces:
        f.write(memoryview(p))
    f.close()
    data = (tmp_path / "out").read_bytes()
    assert data == b"".join(pieces) and f.size == len(data)


def test_direct_file_uses_o_direct_where_the_file_system_takes_it(tmp_path):
    """On the project's machines (ext4) the file is opened with O_DIRECT; a file system that refuses it
    at open (tmpfs) gives a buffered file: either way the bytes are right."""
    f = DirectFile(tmp_path / "out")
    try:
        if not hasattr(os, "O_DIRECT"):
            assert not f.direct
        else:
            flags = __import__("fcntl").fcntl(f.fd, __import__("fcntl").F_GETFL)
            assert bool(flags & os.O_DIRECT) == f.direct
    finally:
        f.close()


def test_direct_file_without_o_direct(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    pieces = _pieces((5, STAGE + 9, 1))
    f = DirectFile(tmp_path / "out")
    assert not f.direct
    for p in pieces:
        f.write(p)
    f.close()
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("sizes", [(STAGE + 3, 10), (100,)])
def test_direct_file_refused_at_the_first_write_falls_back(tmp_path, monkeypatch, sizes):
    """O_DIRECT accepted at open but the first aligned write fails with EINVAL (as on some FUSE file systems):
    the file is reopened buffered and every byte, the staged ones included, lands once."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_write, refused = os.write, []

    def write(fd, data):
        if not refused and f.direct:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    f = DirectFile(tmp_path / "out")
    if not f.direct:
        pytest.skip("this file system refuses O_DIRECT at open")
    monkeypatch.setattr(os, "write", write)
    pieces = _pieces(sizes, seed=1)
    for p in pieces:
        f.write(p)
    f.close()
    assert refused and not f.direct
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_direct_file_close_without_keep_drops_the_staged_bytes(tmp_path):
    """close(keep=False) (a failed write being given up) writes nothing more and raises nothing."""
    f = DirectFile(tmp_path / "out")
    f.write(b"x" * (STAGE + 10))
    f.close(keep=False)
    f.close()  # a second close is a no-op
    assert len((tmp_path / "out").read_bytes()) == (STAGE if f.direct else STAGE + 10)
