"""Workspace format v1: write (streaming, atomic, deterministic), read (mmap), verify.

docs/workspace-format.md is the normative description of what this module writes. The rules that need no
torch (lmc.json and manifest.json checks, the tensor index a config implies, `verify_workspace`) live in
lmc.format.manifest and are re-exported here.
"""
from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import queue
import shutil
import signal
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from lmc.errors import WorkspaceError
from lmc.format.hashing import CHUNK, sha256_file  # noqa: F401 - sha256_file re-exported
from lmc.format.manifest import (FLOAT_DTYPES, FORMAT_VERSION, QUANT_METHODS, SAFETENSORS_DTYPES,  # noqa: F401 - re-exported
                                 check_manifest, check_meta, check_quantization, check_version, expected_index,
                                 index_key, index_problems, index_problems_of, open_checked, plain_shape, rank_name,
                                 verify_workspace, workspace_tensors)
from lmc.format.paths import confined
from lmc.format.vision import vision_config_of

ALIGN = 64  # bytes; data section start and (where sizes allow) every tensor
SHARD_BYTES = 2 * 1024**3

DTYPES = {getattr(torch, name): st for name, (st, _) in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors dtype string
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _file_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Order tensors in a file so that each starts aligned: those whose size keeps the next one
    64-byte aligned first, then the rest by decreasing item size (each stays element-aligned)."""
    return sorted(specs, key=lambda s: (s.nbytes % ALIGN != 0, -s.dtype.itemsize))


def _plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
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


MAX_IN_FLIGHT = 256 * 1024**2  # bytes handed to a _PipelinedWriter and not yet both written and hashed


class _PipelinedWriter:
    """Writes a file and hashes it on two threads of its own while the caller makes the next bytes.

    `write(data)` queues `data` (anything with the buffer protocol; kept alive, not copied) in
    CHUNK slices and returns at once unless MAX_IN_FLIGHT bytes are queued. A thread's error is
    raised by the next write() or by close(). abort() stops both threads without raising."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0
        self._cond = threading.Condition()
        self._in_flight = 0
        self._error: BaseException | None = None
        self._queues = (queue.SimpleQueue(), queue.SimpleQueue())
        self._threads = [threading.Thread(target=self._drain, args=(q, work), daemon=True, name=name)
                         for q, work, name in zip(self._queues, (self.f.write, self.sha.update), ("write", "sha256"))]
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
            self.f.close()

    def close(self) -> dict:
        self._stop()
        if self._error is not None:
            raise self._error
        return {"size": self.size, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self._error = self._error or WorkspaceError("writing stopped")
        self._stop()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def _row_blocks(made, spec: TensorSpec) -> list[torch.Tensor]:
    """What a producer made for `spec`, a tensor or its row blocks (concatenated along dim 0 they are
    the tensor), as row blocks checked against the spec."""
    blocks = [made] if isinstance(made, torch.Tensor) else list(made)
    rows = sum(b.shape[0] if b.dim() else 1 for b in blocks)
    shapes_fit = all(b.dim() == len(spec.shape) and tuple(b.shape[1:]) == spec.shape[1:] for b in blocks)
    if not blocks or any(b.dtype != spec.dtype for b in blocks) or not shapes_fit or (spec.shape and rows != spec.shape[0]):
        got = [f"{b.dtype} {tuple(b.shape)}" for b in blocks]
        raise AssertionError(f"{spec.name}: produced {', '.join(got) or 'nothing'}, planned {spec.dtype} {spec.shape}")
    return blocks


def write_safetensors(path: Path, specs: list[TensorSpec], produce: Callable[[str], object]) -> tuple[dict, dict]:
    """Write one safetensors file, calling `produce(name)` for each tensor in file order; it returns
    the tensor or its row blocks (a list of tensors whose concatenation along dim 0 is the tensor).
    The bytes are written and hashed on two threads while the next tensor is made.

    Returns (file record {size, sha256}, {name: absolute data offset}). The header is padded
    with spaces so the data section starts at a multiple of ALIGN.
    """
    ordered = _file_order(specs)
    header, offsets, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for spec in ordered:
        header[spec.name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [pos, pos + spec.nbytes]}
        pos += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * ((-(8 + len(raw))) % ALIGN)
    data_start = 8 + len(raw)
    out = _PipelinedWriter(path)
    try:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for spec in ordered:
            blocks = _row_blocks(produce(spec.name), spec)
            offsets[spec.name] = data_start + header[spec.name]["data_offsets"][0]
            for block in blocks:
                out.write(_tensor_bytes(block))
        return out.close(), offsets
    finally:
        out.abort()


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def shard_name(rank: int | None, index: int, count: int) -> str:
    stem = "model" if rank is None else f"rank{rank}"
    return f"weights/{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


# ----------------------------------------------------------------------------- paths and the output claim


def check_output(out: Path, inputs=(), force: bool = False) -> None:
    """Refuse an output that is or contains one of the inputs (symlinks resolved), or that exists without force."""
    real = Path(out).resolve()
    for src in inputs:
        src_real = Path(src).resolve()
        if src_real == real or real in src_real.parents:
            raise WorkspaceError(f"output {out} {'is' if src_real == real else 'contains'} the input {src}; "
                                 "write to a folder outside the input")
    if os.path.lexists(out) and not force:
        raise WorkspaceError(f"{out} already exists; pass --force to replace it")


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
def atomic_output(out: Path, force: bool, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it into place only when the body succeeds.

    Refuses an output that is or contains an input. The claim on `out` is exclusive: a lock file
    `.NAME.lock` beside it holds the owner's `pid-starttime` for the duration. Temporary folders
    are named `.NAME.tmp-<pid-starttime>-*`; those of dead owners are removed here. SIGTERM exits
    through the cleanup."""
    out = Path(out)
    check_output(out, inputs, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = _owner_token()
    lock = out.parent / f".{out.name}.lock"
    with _sigterm_raises():
        _claim(lock, out, token)
        try:
            _sweep(out)
            check_output(out, (), force)  # another writer may have finished before we claimed it
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{token}-", dir=out.parent))
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a workspace is an ordinary folder
                yield tmp
                if os.path.lexists(out):
                    if not force:
                        raise WorkspaceError(f"{out} appeared while it was being written; pass --force to replace it")
                    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{token}-", dir=out.parent))
                    os.replace(out, trash / "old")
                    os.replace(tmp, out)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            _release(lock, token)


def write_workspace(
    tmp: Path,
    lmc_json: dict,
    rank_specs: list[list[TensorSpec]],
    produce: Callable[[int, str], torch.Tensor],
    tokenizer_files: dict[str, bytes],
    provenance: dict | Callable[[], dict],
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Write a complete workspace into `tmp` (an empty folder). `rank_specs[r]` lists rank r's
    tensors; `produce(rank, name)` returns one, or its row blocks (write_safetensors). `provenance`
    is the manifest's record, or a function that returns it, called once the weights are written
    (the converter's waits for the source hashes). Returns the manifest."""
    (tmp / "weights").mkdir()
    (tmp / "tokenizer").mkdir()
    files, tensors = {}, {}
    tp = len(rank_specs)
    for rank, specs in enumerate(rank_specs):
        shards = _plan_shards(specs, shard_bytes)
        for i, shard in enumerate(shards):
            rel = shard_name(None if tp == 1 else rank, i, len(shards))
            record, offsets = write_safetensors(tmp / rel, shard, lambda name, r=rank: produce(r, name))
            files[rel] = record
            for spec in shard:
                key = spec.name if tp == 1 else f"{rank}:{spec.name}"
                tensors[key] = {"file": rel, "dtype": DTYPES[spec.dtype], "shape": list(spec.shape),
                                "offset": offsets[spec.name], "nbytes": spec.nbytes}
    for name, data in sorted(tokenizer_files.items()):
        (tmp / "tokenizer" / name).write_bytes(data)
        files[f"tokenizer/{name}"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    cfg_bytes = dump_json(lmc_json)
    (tmp / "lmc.json").write_bytes(cfg_bytes)
    files["lmc.json"] = {"size": len(cfg_bytes), "sha256": hashlib.sha256(cfg_bytes).hexdigest()}
    manifest = {"format_version": FORMAT_VERSION, "files": dict(sorted(files.items())),
                "tensors": dict(sorted(tensors.items())),
                "provenance": provenance() if callable(provenance) else provenance}
    (tmp / "manifest.json").write_bytes(dump_json(manifest))
    return manifest


# ----------------------------------------------------------------------------- reading


class Workspace:
    """A workspace opened for reading. Tensors are zero-copy views of memory-mapped shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise WorkspaceError(f"{self.path} is not a folder: pass a workspace made by `lmc convert`")
        self.meta, self.config, self.manifest = open_checked(self.path)
        problems = index_problems_of(self.meta, self.config, self.manifest)
        if problems:
            raise WorkspaceError(f"{self.path}/manifest.json: {problems[0]}; rebuild the workspace with `lmc convert`")
        self.dtype = getattr(torch, self.meta["dtype"])
        self.quantization = self.meta["quantization"]
        self.tp = self.meta["tp"]
        self.vision = vision_config_of(self.meta)  # None: a text-only workspace
        self._maps: dict[str, mmap.mmap] = {}

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def tensor_names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def _map(self, rel: str) -> mmap.mmap:
        if rel not in self._maps:
            path = confined(self.path, rel)
            if path is None:
                raise WorkspaceError(f"{self.path}: {rel} leads outside the workspace; run `lmc verify {self.path}`")
            if not path.is_file():
                raise WorkspaceError(f"{path} is missing; run `lmc verify {self.path}` and rebuild the workspace")
            with open(path, "rb") as f:
                self._maps[rel] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[rel]

    def get(self, name: str) -> torch.Tensor:
        entry = self.manifest["tensors"].get(name)
        if entry is None:
            raise WorkspaceError(f"tensor {name} is not in {self.path}/manifest.json; rebuild the workspace")
        buf = self._map(entry["file"])
        if entry["offset"] + entry["nbytes"] > len(buf):
            raise WorkspaceError(f"{self.path / entry['file']} is truncated; run `lmc verify` and rebuild the workspace")
        dtype = DTYPE_NAMES[entry["dtype"]]
        count = entry["nbytes"] // dtype.itemsize
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=entry["offset"]) if count else torch.empty(0, dtype=dtype)
        return flat.view(entry["shape"])

    def has(self, name: str) -> bool:
        return name in self.manifest["tensors"]


def copy_workspace(src: Path, dst: Path) -> dict:
    """Copy a workspace's listed files and manifest byte for byte into the empty folder `dst`,
    checking each file's size and sha256 as it goes. Returns the manifest."""
    raw = (src / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    check_manifest(manifest, src, src / "manifest.json")
    for rel, record in manifest["files"].items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        out = _PipelinedWriter(target)
        try:
            with open(confined(src, rel), "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    out.write(chunk)
            written = out.close()
        finally:
            out.abort()
        if written != record:
            raise WorkspaceError(f"{src / rel} does not match its manifest entry; run `lmc verify {src}`")
    (dst / "manifest.json").write_bytes(raw)
    return manifest
