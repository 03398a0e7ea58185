"""Writing a workspace without torch: the safetensors layout of a shard, the pipelined write + digest of
each file, the manifest, and the atomic, exclusive claim on the output folder.

lmc.format.workspace writes tensors made by torch through these; lmc.compiler.passthrough writes byte
ranges of a source checkpoint through them, before torch is loaded. docs/workspace-format.md is the
normative description of the bytes.
"""
from __future__ import annotations

import errno
import glob
import json
import math
import mmap
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lmc.errors import WorkspaceError, one_line
from lmc.format.hashing import CHUNK, DIRECT_BLOCK, hasher
from lmc.format.manifest import DIGEST, SAFETENSORS_DTYPES, _read_json, check_manifest
from lmc.format.paths import TOKENIZER_FILES
from lmc.format.vision import PROCESSOR_FILES

ALIGN = 64  # bytes; data section start and (where sizes allow) every tensor
SHARD_BYTES = 2 * 1024**3

ITEMSIZE = {st: size for st, size in SAFETENSORS_DTYPES.values()}  # safetensors dtype string -> bytes per element


@dataclass(frozen=True)
class StSpec:
    """A tensor to write, by its safetensors dtype string (lmc.format.workspace.TensorSpec is the torch twin)."""
    name: str
    st_dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.st_dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def file_order(specs: list) -> list:
    """Order tensors in a file so that each starts aligned: those whose size keeps the next one
    64-byte aligned first, then the rest by decreasing item size (each stays element-aligned)."""
    return sorted(specs, key=lambda s: (s.nbytes % ALIGN != 0, -s.itemsize))


def plan_shards(specs: list, max_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + spec.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


MAX_IN_FLIGHT = 256 * 1024**2  # bytes handed to a PipelinedWriter and not yet both written and hashed


STAGING = 8 * 1024**2  # bytes per O_DIRECT write; a multiple of DIRECT_BLOCK


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class DirectFile:
    """A file written with O_DIRECT: its bytes go to the disk by DMA instead of through fresh page-cache pages
    (on a VM with free page reporting a fresh page costs a host fault: 1-4 s of system time per 2 GB here,
    docs/benchmarks.md "Conversion"; a multi-GB artifact also stays out of the cache). write() copies into one
    reused page-aligned staging buffer and writes each full buffer whole; close() pads the last block with zeros,
    writes it and truncates the file to its size."""

    @classmethod
    def open(cls, path: Path) -> DirectFile | None:
        """`path` created or truncated for O_DIRECT writing (mode 0o666 & ~umask, as open(path, "wb") gives), or
        None where the OS or the filesystem refuses O_DIRECT (EINVAL on the open or on a first aligned write)."""
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise
        try:
            staging = mmap.mmap(-1, STAGING)  # anonymous maps are page-aligned
            os.pwrite(fd, memoryview(staging)[:DIRECT_BLOCK], 0)  # zeros, overwritten by the first block
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EINVAL:
                return None
            raise
        return cls(fd, staging)

    def __init__(self, fd: int, staging: mmap.mmap):
        self.fd = fd
        self.size = 0
        self._view = memoryview(staging)
        self._staging = np.frombuffer(staging, dtype=np.uint8)
        self._fill = 0

    def _flush(self, n: int) -> None:
        _pwrite_all(self.fd, self._view[:n], self.size - self._fill)
        self._fill = 0

    def write(self, data) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        while len(src):
            n = min(len(src), STAGING - self._fill)
            np.copyto(self._staging[self._fill:self._fill + n], src[:n])
            self._fill += n
            self.size += n
            src = src[n:]
            if self._fill == STAGING:
                self._flush(STAGING)

    def close(self) -> None:
        try:
            if self._fill:
                padded = -(-self._fill // DIRECT_BLOCK) * DIRECT_BLOCK
                self._staging[self._fill:padded] = 0
                self._flush(padded)
            os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)


class PipelinedWriter:
    """Writes a file and hashes it on two threads of its own while the caller makes the next bytes.

    `write(data)` queues `data` (anything with the buffer protocol; kept alive, not copied) in
    CHUNK slices and returns at once unless MAX_IN_FLIGHT bytes are queued. The file is written with
    O_DIRECT (DirectFile) where the filesystem allows it, else buffered. A thread's error is raised by
    the next write() or by close(). abort() stops both threads without raising."""

    def __init__(self, path: Path, digest: str = DIGEST):
        self.digest = digest
        self.hash = hasher(digest)  # a missing package fails before the file is opened
        self.f = DirectFile.open(path) or open(path, "wb")
        self.size = 0
        self._cond = threading.Condition()
        self._in_flight = 0
        self._error: BaseException | None = None
        self._queues = (queue.SimpleQueue(), queue.SimpleQueue())
        self._threads = [threading.Thread(target=self._drain, args=(q, work), daemon=True, name=name)
                         for q, work, name in zip(self._queues, (self.f.write, self.hash.update), ("write", "digest"))]
        for t in self._threads:
            t.start()

    def _drain(self, q: queue.SimpleQueue, work) -> None:
        while (item := q.get()) is not None:
            try:
                if self._error is None:
                    work(item[0])
            except BaseException as e:  # handed to the caller's thread
                with self._cond:
                    self._error = self._error or e
            with self._cond:
                item[1] -= 1
                if item[1] == 0:  # the other thread is done with it too
                    self._in_flight -= len(item[0])
                    self._cond.notify_all()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            with self._cond:
                self._cond.wait_for(lambda: self._in_flight < MAX_IN_FLIGHT or self._error is not None)
                if self._error is not None:
                    raise self._error
                self._in_flight += len(piece)
            item = [piece, len(self._queues)]
            for q in self._queues:
                q.put(item)
            self.size += len(piece)

    def _stop(self) -> None:
        if self._threads:
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join()
            self._threads = []
            try:
                self.f.close()
            except BaseException as e:  # raised by close(), not by abort()
                self._error = self._error or e

    def close(self) -> dict:
        self._stop()
        if self._error is not None:
            raise self._error
        return {"size": self.size, self.digest: self.hash.hexdigest()}

    def abort(self) -> None:
        self._error = self._error or WorkspaceError("writing stopped")
        self._stop()

def safetensors_header(ordered: list) -> tuple[bytes, dict[str, int]]:
    """The header of a safetensors file holding `ordered` specs in that order (the length word's payload,
    padded with spaces so the data section starts at a multiple of ALIGN), and each tensor's absolute data
    offset in the file."""
    header, starts, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for spec in ordered:
        header[spec.name] = {"dtype": spec.st_dtype, "shape": list(spec.shape), "data_offsets": [pos, pos + spec.nbytes]}
        starts[spec.name] = pos
        pos += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * ((-(8 + len(raw))) % ALIGN)
    return raw, {name: 8 + len(raw) + start for name, start in starts.items()}


def tensor_record(spec, rel: str, offset: int) -> dict:
    """A tensor's entry in manifest.json."""
    return {"file": rel, "dtype": spec.st_dtype, "shape": list(spec.shape), "offset": offset, "nbytes": spec.nbytes}


def bytes_record(data: bytes) -> dict:
    """A manifest `files` entry of a file holding `data`."""
    h = hasher(DIGEST)
    h.update(data)
    return {"size": len(data), DIGEST: h.hexdigest()}


def finish_workspace(tmp: Path, files: dict, tensors: dict, lmc_json: dict, tokenizer_files: dict[str, bytes],
                     provenance: dict | Callable[[], dict]) -> dict:
    """Write the tokenizer files, lmc.json and manifest.json beside the weights already in `tmp` (`files`: their
    records, `tensors`: the tensor index). `provenance` may be a function, called now. Returns the manifest."""
    for name, data in sorted(tokenizer_files.items()):
        (tmp / "tokenizer" / name).write_bytes(data)
        files[f"tokenizer/{name}"] = bytes_record(data)
    cfg_bytes = dump_json(lmc_json)
    (tmp / "lmc.json").write_bytes(cfg_bytes)
    files["lmc.json"] = bytes_record(cfg_bytes)
    manifest = {"format_version": lmc_json["format_version"], "files": dict(sorted(files.items())),
                "tensors": dict(sorted(tensors.items())),
                "provenance": provenance() if callable(provenance) else provenance}
    (tmp / "manifest.json").write_bytes(dump_json(manifest))
    return manifest


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def shard_name(rank: int | None, index: int, count: int) -> str:
    stem = "model" if rank is None else f"rank{rank}"
    return f"weights/{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


# ----------------------------------------------------------------------------- paths and the output claim


LMC_MARKERS = ("lmc.json", "lmc_provenance.json")  # one of these is at the top of every folder lmc writes
HF_OUTPUT_FILES = ("config.json", "model.safetensors", "lmc_provenance.json", *TOKENIZER_FILES, *PROCESSOR_FILES)  # what
# `lmc quantize --format awq|compressed-tensors` writes


def output_path(out) -> Path:
    """`out` as a path whose last part names the output folder: `.`, `..` or an empty path (the current folder or
    its parent) resolved, so that the lock, the temporary folder and the rename beside it are well-defined."""
    out = Path(out)
    return Path(os.path.realpath(out)) if out.name in ("", "..") else out


def _files_under(folder: Path) -> Iterator[str]:
    """Every file and link anywhere under `folder` (a link to a folder is not entered), as a relative POSIX path."""
    for parent, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(parent, d))]
        for name in files + links:
            yield Path(parent, name).relative_to(folder).as_posix()


def _foreign_file(folder: Path) -> str | None:
    """A file in `folder` that is not part of an lmc output, or None where --force may replace the folder: an empty
    folder, a workspace whose manifest.json lists every file in it (one with an unreadable manifest may hold only
    lmc.json and manifest.json), an HF checkpoint of `lmc quantize` holding only the files it writes. A folder
    with neither marker gives its first file."""
    try:
        if (folder / "lmc.json").is_file():
            listed = {"lmc.json", "manifest.json"}
            try:
                manifest = _read_json(folder / "manifest.json")
                check_manifest(manifest, folder, folder / "manifest.json")
                listed.update(manifest["files"])
            except WorkspaceError:
                pass
            return next((rel for rel in _files_under(folder) if rel not in listed), None)
        if (folder / "lmc_provenance.json").is_file():
            return next((e.name for e in os.scandir(folder) if e.name not in HF_OUTPUT_FILES
                         or not e.is_file(follow_symlinks=False)), None)
        return next(iter(sorted(os.listdir(folder))), None)
    except OSError as e:
        return e.filename or folder.name


def check_existing(out: Path, force: bool, appeared: bool = False) -> None:
    """Refuse what is at `out` unless --force may replace it: a symlink (the link goes, not what it points to),
    an empty folder or a folder lmc wrote that holds nothing else (_foreign_file). A user's file or folder is never
    deleted, with or without --force."""
    if not os.path.lexists(out):
        return
    if appeared and not force:
        raise WorkspaceError(f"{out} appeared while it was being written; pass --force to replace it")
    if not out.is_symlink():
        if not out.is_dir():
            raise WorkspaceError(f"{out} is a file; lmc writes a folder there: move the file away or choose another --output")
        foreign = _foreign_file(out)
        if foreign is not None:
            marked = any(os.path.isfile(out / name) for name in LMC_MARKERS)
            what = ("which the lmc output there does not list" if marked
                    else f"and no {' or '.join(LMC_MARKERS)}, so lmc did not write it")
            raise WorkspaceError(f"{out} holds {foreign}, {what}; --force replaces only an lmc output and never "
                                 "deletes a file of yours: move it away or choose another --output")
    if not force:
        raise WorkspaceError(f"{out} already exists; pass --force to replace it")


def check_parent(out: Path) -> None:
    """Refuse an output whose folder cannot be made or written (a file on the way, no write permission), or that
    lies inside a workspace (which would then fail `lmc verify`), before anything long starts."""
    parent = out.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise WorkspaceError(f"cannot create {out}: {parent} is not a folder; choose another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkspaceError(f"cannot create {out}: {parent} is not writable by this user; choose an --output in a "
                             "folder you can write to")
    for folder in (parent.resolve(), *parent.resolve().parents):
        if (folder / "lmc.json").is_file() and (folder / "manifest.json").is_file():
            raise WorkspaceError(f"{out} is inside the workspace {folder} (which would then fail `lmc verify`); "
                                 "choose an --output outside it")


def check_output(out: Path, inputs=(), force: bool = False) -> None:
    """Refuse an output that is or contains one of the inputs (symlinks resolved), that exists and may not be
    replaced (check_existing), or whose folder cannot hold it (check_parent)."""
    out = output_path(out)
    real = out.resolve()
    for src in inputs:
        src_real = Path(src).resolve()
        if src_real == real or real in src_real.parents:
            raise WorkspaceError(f"output {out} {'is' if src_real == real else 'contains'} the input {src}; "
                                 "write to a folder outside the input")
    check_existing(out, force)
    check_parent(out)


def write_failed(out: Path, error: OSError) -> WorkspaceError:
    """An OSError met while writing `out` (a full disk, a file size limit, a permission) as one line."""
    full = error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    advice = "free disk space (or raise the file size limit, `ulimit -f`) and run again" if full else "fix that and run again"
    where = f" ({error.filename})" if error.filename else ""
    return WorkspaceError(f"writing {out} failed: {error.strerror or one_line(error)}{where}; nothing was changed at "
                          f"{out}: {advice}")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process pid (tells its owner from a later process given the same pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_token() -> str:
    """This process as written into lock files and temporary folder names: `pid-starttime`."""
    return f"{os.getpid()}-{_start_time(os.getpid()) or 0}"


def _alive(token: str | None) -> bool:
    pid, _, start = (token or "").partition("-")
    if not pid.isdigit():
        return False
    if os.path.isdir("/proc/self"):
        return _start_time(int(pid)) == start
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LOCK_GRACE_S = 10  # an empty lock file this young is being written by its owner


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _claim(lock: Path, out: Path, token: str) -> None:
    """Create `lock` (O_EXCL) holding our token; take over a lock whose owner is dead."""
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_token(lock)
            if holder is None:  # removed meanwhile
                continue
            fresh = not holder and time.time() - _mtime(lock) < _LOCK_GRACE_S
            if fresh or _alive(holder):
                raise WorkspaceError(f"{out} is being written by another lmc (process {holder.partition('-')[0] or '?'}); "
                                     f"wait for it to finish, or remove {lock} if no lmc is running") from None
            grave = lock.with_name(f"{lock.name}.stale-{token}")
            try:
                os.rename(lock, grave)
            except FileNotFoundError:
                continue
            if _read_token(grave) != holder:  # a live owner replaced the stale lock meanwhile: give it back
                os.rename(grave, lock)
            grave.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return
    raise WorkspaceError(f"could not claim {lock}; remove it if no lmc is running")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _release(lock: Path, token: str) -> None:
    if _read_token(lock) == token:
        lock.unlink(missing_ok=True)


def _sweep(out: Path) -> None:
    """Remove temporary and replaced folders of `out` left by a process that died (SIGKILL, power loss).
    One that died between the two renames of a replace left `out` missing: its previous folder is put back."""
    for kind in ("old", "tmp"):
        prefix = f".{out.name}.{kind}-"
        for entry in out.parent.glob(glob.escape(prefix) + "*"):
            owner = entry.name[len(prefix):].rpartition("-")[0]  # `pid-starttime`, then mkdtemp's suffix
            if entry.is_dir() and not entry.is_symlink() and owner and not _alive(owner):
                if kind == "old" and (entry / "old").exists() and not os.path.lexists(out):
                    os.replace(entry / "old", out)
                shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) in the main thread, so `finally` blocks clean up; a second
    SIGTERM during that cleanup is ignored. The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (main thread only) until the block ends, then deliver them: the renames that put an
    output in place are never cut in half by Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _put_in_place(tmp: Path, out: Path, token: str) -> None:
    """Rename the finished `tmp` to `out`, replacing what is there (check_existing allowed it); on a failed rename
    the previous `out` is put back."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{token}-", dir=out.parent))
    try:
        os.replace(out, trash / "old")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash / "old", out)
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_output(out: Path, force: bool, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it into place only when the body succeeds.

    Refuses an output that is or contains an input, or what check_output refuses. The claim on `out` is
    exclusive: a lock file `.NAME.lock` beside it holds the owner's `pid-starttime` for the duration. Temporary
    folders are named `.NAME.tmp-<pid-starttime>-*`; those of dead owners are removed here. SIGTERM exits
    through the cleanup; Ctrl-C and SIGTERM wait for the final renames. An OSError (a full disk, a permission)
    becomes one WorkspaceError line."""
    out = output_path(out)
    check_output(out, inputs, force)
    token = _owner_token()
    lock = out.parent / f".{out.name}.lock"
    with _sigterm_raises():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _claim(lock, out, token)
        except OSError as e:
            raise write_failed(out, e) from None
        try:
            _sweep(out)
            check_existing(out, force)  # another writer may have finished before we claimed it
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{token}-", dir=out.parent))
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a workspace is an ordinary folder
                yield tmp
                check_existing(out, force, appeared=True)
                with _signals_held():
                    _put_in_place(tmp, out, token)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise write_failed(out, e) from None
        finally:
            _release(lock, token)
