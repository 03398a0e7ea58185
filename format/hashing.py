"""File digests at disk speed. A workspace records a digest of every file (format/manifest.py `DIGESTS`: BLAKE3
from format version 2, sha256 in version 1) and of the checkpoint it came from; hashing is most of the CPU time of
`lmc convert` and `lmc verify`, and BLAKE3 takes a quarter of sha256's (7.6 against 2.0 GB/s per core here).
Each file is read in 16 MiB chunks into one reused buffer (read and both hashes release the GIL; read, not a
memory map, so a file truncated meanwhile by another process gives a short digest rather than a SIGBUS that
kills the process), and `BackgroundHashes` hashes a list of files on worker threads while the caller does other
work. Imports no torch, so a command can start hashing before torch is loaded."""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import stat
import threading
from pathlib import Path

from lmc.errors import LmcError

CHUNK = 16 * 1024**2
WORKERS = min(8, os.cpu_count() or 2)  # files hashed at once
DIRECT_BLOCK = 4096  # O_DIRECT's alignment of offsets, lengths and buffers; a short read is a file's last


def hasher(algorithm: str):
    """A new hash object (update / hexdigest) of `algorithm`: "blake3" or "sha256"."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm != "blake3":
        raise ValueError(f"unknown digest {algorithm!r}")
    try:
        from blake3 import blake3
    except ImportError:
        raise LmcError("the blake3 package is missing (lmc hashes workspace files with BLAKE3): "
                       "pip install blake3") from None
    return blake3()


def file_digest(path: str | os.PathLike, algorithm: str, direct: bool = False) -> str:
    """Hex digest of a file; `direct`: read with O_DIRECT where the filesystem allows it (_digest_direct)."""
    if direct:
        hexdigest = _digest_direct(path, algorithm)
        if hexdigest is not None:
            return hexdigest
    digest = hasher(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # aggressive read-ahead
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _digest_direct(path: str | os.PathLike, algorithm: str) -> str | None:
    """Digest of a file read with O_DIRECT (None where it is refused: EINVAL on the open or the first read):
    the disk DMAs into three page-aligned buffers, read here and hashed on a thread of its own, so no page
    cache is filled. For files nobody reads next (`lmc verify`): on this project's VM a fresh page-cache page
    costs a host fault, and a buffered cold read of a 2 GB file took 4-5 s against 1.5 s this way
    (docs/benchmarks.md, "Conversion")."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    digest = hasher(algorithm)
    free, full = queue.SimpleQueue(), queue.SimpleQueue()
    for _ in range(3):
        free.put(mmap.mmap(-1, CHUNK))  # anonymous maps are page-aligned

    def hash_full() -> None:
        while (item := full.get()) is not None:
            buf, n = item
            digest.update(memoryview(buf)[:n])
            free.put(buf)

    worker = threading.Thread(target=hash_full, daemon=True, name="digest")
    worker.start()
    offset = 0
    try:
        while True:
            buf = free.get()
            try:
                n = os.preadv(fd, [buf], offset)
            except OSError as e:
                if e.errno == errno.EINVAL and offset == 0:
                    return None
                raise
            if n:
                full.put((buf, n))
                offset += n
            if n == 0 or n % DIRECT_BLOCK:  # end of file: nothing more, or its unaligned tail
                break
    finally:
        full.put(None)
        worker.join()
        os.close(fd)
    return digest.hexdigest()


class BackgroundHashes:
    """`algorithm` digests of the regular files among `paths`, hashed by `workers` daemon threads from
    construction on, largest file first. `digest(path)` waits for that file's result (re-raising its
    OSError); any other path is hashed then and there. `direct`: read with O_DIRECT where allowed."""

    def __init__(self, paths, algorithm: str, workers: int = WORKERS, direct: bool = False):
        hasher(algorithm)  # a missing package fails here, in the caller's thread
        self.algorithm, self._direct = algorithm, direct
        self._results: dict[Path, tuple[threading.Event, list]] = {}
        sizes = {}
        for p in paths:
            key = Path(p).resolve()
            try:
                info = key.stat()
            except OSError:
                continue  # hashed when asked for, which raises the error
            if stat.S_ISREG(info.st_mode) and key not in self._results:  # never a FIFO or a device
                self._results[key] = (threading.Event(), [])
                sizes[key] = info.st_size
        self._todo = sorted(sizes, key=sizes.get, reverse=True)
        self._lock = threading.Lock()
        for _ in range(min(workers, len(self._todo))):
            threading.Thread(target=self._work, daemon=True, name="digest").start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._todo:
                    return
                key = self._todo.pop(0)
            done, result = self._results[key]
            try:
                result.append(file_digest(key, self.algorithm, self._direct))
            except OSError as e:
                result.append(e)
            done.set()

    def digest(self, path: str | os.PathLike) -> str:
        entry = self._results.get(Path(path).resolve())
        if entry is None:
            return file_digest(path, self.algorithm, self._direct)
        done, result = entry
        done.wait()
        if isinstance(result[0], OSError):
            raise result[0]
        return result[0]
