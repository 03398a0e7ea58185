"""Rank 0's step announcements to the follower ranks through shared memory: one writer, N readers, one host.

Over the gloo control group an announcement (a header and a payload broadcast) cost rank 0 ~0.55 ms per decode
step on 2 x H200, and the follower woke from a socket read after it (bench/results/profile_tp_int4_h200x2.json):
at batch 1 that host latency, not the GPUs, set the tensor-parallel step time. Here a message is a store into a
mapped file that the readers poll, a few µs end to end.

The file (in /dev/shm, mode 0600, a random name; rank 0 creates it before the followers start and unlinks it once
they have joined) holds int64 words:

    word 0                      published: messages written so far
    words 1 .. READERS_MAX      done[r]: messages reader r has finished copying out
    then SLOTS slots of 1 + SLOT_WORDS words: message k in slot k % SLOTS, [length n, words 0 .. n-1]

The writer fills slot k % SLOTS once every reader is done with message k - SLOTS, then publishes (word 0 = k + 1);
a reader waits for word 0 > k, copies slot k % SLOTS out, then sets done[r] = k + 1. A store-ordering fence
separates the data from the count that publishes it (`_fence`). A message longer than SLOT_WORDS does not fit: the
caller sends it another way (Shard: the payload over gloo).

Waiting spins (yielding the core each turn) for SPIN_S, then sleeps in growing steps up to IDLE_SLEEP_S (a server idle for days costs nothing),
checking every LIVENESS_S that the other side still runs (the owner's `alive` callable: rank 0 asks its
follower processes, a follower whether its parent is still rank 0).
"""
from __future__ import annotations

import mmap
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from lmc.errors import LmcError

READERS_MAX = 63
SLOTS = 4
SLOT_WORDS = 1 << 16  # 512 KiB of payload per message: a decode step's rows up to bucket x (4 + W) words
SLOT_BASE = 1 + READERS_MAX
FILE_WORDS = SLOT_BASE + SLOTS * (1 + SLOT_WORDS)
SPIN_S = 0.05
IDLE_SLEEP_S = 0.005
LIVENESS_S = 1.0
_FENCE = threading.Lock()


def _fence() -> None:
    """A full memory barrier: CPython's lock acquire and release are atomic operations with barrier semantics,
    so the stores before this call are visible to another process before the stores after it (x86 keeps store
    order anyway; ARM does not)."""
    with _FENCE:
        pass


class ChannelClosed(LmcError):
    """The other side of the channel exited."""


class _Mapped:
    def __init__(self, fd: int):
        self._map = mmap.mmap(fd, FILE_WORDS * 8)
        os.close(fd)
        self.words = np.frombuffer(self._map, dtype=np.int64)  # [FILE_WORDS]

    def slot(self, k: int) -> np.ndarray:
        start = SLOT_BASE + (k % SLOTS) * (1 + SLOT_WORDS)
        return self.words[start:start + 1 + SLOT_WORDS]  # [1 + SLOT_WORDS]: length, then the message

    def close(self) -> None:
        self.words = None
        self._map.close()


def _wait(ready, other_alive, what: str, timeout_s: float | None) -> None:
    """Return once ready() holds: spin, then sleep in growing steps; raise ChannelClosed when other_alive() fails
    (checked every LIVENESS_S) and LmcError past timeout_s."""
    if ready():
        return
    start = last_check = time.monotonic()
    sleep = 0.0
    while not ready():
        now = time.monotonic()
        if now - last_check >= LIVENESS_S:
            last_check = now
            if not other_alive():
                raise ChannelClosed(f"tensor-parallel {what} exited")
            if timeout_s is not None and now - start > timeout_s:
                raise LmcError(f"tensor-parallel {what} did not answer within {timeout_s:.0f} s")
        if now - start > SPIN_S:
            sleep = min(IDLE_SLEEP_S, sleep * 2 or 1e-5)
            time.sleep(sleep)
        else:
            os.sched_yield()  # spinning, but a rank computing on the same core goes first


class ChannelWriter:
    """Rank 0's end. `path` goes to the readers; unlink() once they have attached. `alive()`: whether every
    reader's process still runs."""

    def __init__(self, readers: int, alive, folder: str | None = None):
        if not 1 <= readers <= READERS_MAX:
            raise LmcError(f"a tensor-parallel channel serves 1..{READERS_MAX} followers, not {readers}")
        base = folder or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self.path = str(Path(base) / f"lmc-tp-{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:  # the pages are reserved now: a full /dev/shm is this error, not a SIGBUS at the first message
            os.posix_fallocate(fd, 0, FILE_WORDS * 8)
        except OSError as e:
            os.close(fd)
            os.unlink(self.path)
            raise LmcError(f"cannot make the tensor-parallel channel in {base} ({e}); free space there "
                           "(a container's /dev/shm is often 64 MB: docker run --shm-size 1g)") from None
        self._m = _Mapped(fd)
        self.readers, self.alive = readers, alive
        self.sent = 0

    def send(self, message: np.ndarray, timeout_s: float | None = None) -> None:
        """Publish int64 words [n <= SLOT_WORDS] to every reader (waits while the slot's previous message is
        still being read)."""
        n = message.shape[0]
        assert message.dtype == np.int64 and n <= SLOT_WORDS
        k, words = self.sent, self._m.words
        _wait(lambda: int(words[1:1 + self.readers].min()) >= k - SLOTS + 1, self.alive, "follower rank",
              timeout_s)
        slot = self._m.slot(k)
        slot[1:1 + n] = message
        slot[0] = n
        _fence()
        words[0] = k + 1
        self.sent = k + 1

    def unlink(self) -> None:
        """Remove the file's name (the mappings stay): nothing is left in /dev/shm, whatever happens next."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        self._m.close()


class ChannelReader:
    """A follower's end: reader `index` (0 .. readers - 1) of the file at `path`; `alive()`: whether the writer's
    process still runs."""

    def __init__(self, path: str, index: int, alive):
        fd = os.open(path, os.O_RDWR)
        self._m = _Mapped(fd)
        self.index, self.alive, self.received = index, alive, 0

    def receive(self, timeout_s: float | None = None) -> np.ndarray:
        """The next message: int64 words [n] (a copy)."""
        k, words = self.received, self._m.words
        _wait(lambda: int(words[0]) > k, self.alive, "rank 0", timeout_s)
        _fence()
        slot = self._m.slot(k)
        message = slot[1:1 + int(slot[0])].copy()
        _fence()
        words[1 + self.index] = k + 1
        self.received = k + 1
        return message

    def close(self) -> None:
        self._m.close()
