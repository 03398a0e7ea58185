"""Workspace format v1: write (streaming, atomic, deterministic), read (mmap), verify.

docs/workspace-format.md is the normative description of what this module writes.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from lmc.errors import WorkspaceError
from lmc.format.config import ModelConfig

FORMAT_VERSION = 1
ALIGN = 64  # bytes; data section start and (where sizes allow) every tensor
SHARD_BYTES = 2 * 1024**3

DTYPES = {  # torch dtype <-> safetensors dtype string
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.int8: "I8",
}
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


class _HashingWriter:
    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> dict:
        self.f.close()
        return {"size": self.size, "sha256": self.sha.hexdigest()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path: Path, specs: list[TensorSpec], produce: Callable[[str], torch.Tensor]) -> tuple[dict, dict]:
    """Write one safetensors file, calling `produce(name)` for each tensor in file order.

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
    out = _HashingWriter(path)
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
    for spec in ordered:
        t = produce(spec.name)
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise AssertionError(f"{spec.name}: produced {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}")
        offsets[spec.name] = data_start + header[spec.name]["data_offsets"][0]
        out.write(_tensor_bytes(t))
    return out.close(), offsets


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def shard_name(rank: int | None, index: int, count: int) -> str:
    stem = "model" if rank is None else f"rank{rank}"
    return f"weights/{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


@contextmanager
def atomic_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it into place only when the body succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise WorkspaceError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a workspace is an ordinary folder
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_workspace(
    tmp: Path,
    lmc_json: dict,
    rank_specs: list[list[TensorSpec]],
    produce: Callable[[int, str], torch.Tensor],
    tokenizer_files: dict[str, bytes],
    provenance: dict,
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Write a complete workspace into `tmp` (an empty folder). `rank_specs[r]` lists rank r's
    tensors; `produce(rank, name)` returns one. Returns the manifest."""
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
                "tensors": dict(sorted(tensors.items())), "provenance": provenance}
    (tmp / "manifest.json").write_bytes(dump_json(manifest))
    return manifest


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WorkspaceError(f"{path} is missing: not an lmc workspace (build one with `lmc convert`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkspaceError(f"{path} is not valid JSON ({e}); rebuild the workspace") from None


def check_version(meta: dict, path: Path) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise WorkspaceError(
            f"{path} has workspace format_version {version!r} but this lmc reads version {FORMAT_VERSION}; "
            "rebuild it with `lmc convert` from this lmc, or use the lmc that wrote it")


class Workspace:
    """A workspace opened for reading. Tensors are zero-copy views of memory-mapped shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise WorkspaceError(f"{self.path} is not a folder: pass a workspace made by `lmc convert`")
        self.meta = _read_json(self.path / "lmc.json")
        check_version(self.meta, self.path / "lmc.json")
        self.manifest = _read_json(self.path / "manifest.json")
        check_version(self.manifest, self.path / "manifest.json")
        self.config = ModelConfig.from_dict(self.meta["model"])
        self.dtype = getattr(torch, self.meta["dtype"])
        self.quantization = self.meta.get("quantization")
        self.tp = self.meta.get("tp", 1)
        self._maps: dict[str, mmap.mmap] = {}

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def tensor_names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def _map(self, rel: str) -> mmap.mmap:
        if rel not in self._maps:
            path = self.path / rel
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


# ----------------------------------------------------------------------------- verify


def verify_workspace(path: str | os.PathLike) -> list[str]:
    """Check format version, every file's size and sha256, and every tensor's header entry.
    Returns a list of problems, each one line naming the file or tensor; empty when sound."""
    path = Path(path)
    try:
        ws_meta = _read_json(path / "lmc.json")
        check_version(ws_meta, path / "lmc.json")
        manifest = _read_json(path / "manifest.json")
        check_version(manifest, path / "manifest.json")
    except WorkspaceError as e:
        return [str(e)]
    problems = []
    for rel, record in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != record["size"]:
            problems.append(f"{rel}: size {f.stat().st_size} bytes, manifest says {record['size']} (truncated or altered)")
        elif sha256_file(f) != record["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (file altered or corrupt)")
    listed = set(manifest["files"])
    for f in sorted((path / "weights").glob("*")) if (path / "weights").is_dir() else []:
        if f"weights/{f.name}" not in listed:
            problems.append(f"weights/{f.name}: not in the manifest")
    if problems:
        return problems
    headers: dict[str, dict] = {}
    for name, entry in manifest["tensors"].items():
        rel = entry["file"]
        if rel not in headers:
            with open(path / rel, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                headers[rel] = {"start": 8 + n, "header": json.loads(fh.read(n))}
        h = headers[rel]
        tensor_name = name.split(":", 1)[-1]
        t = h["header"].get(tensor_name)
        if t is None:
            problems.append(f"tensor {name}: not in {rel}")
            continue
        begin, end = t["data_offsets"]
        if t["dtype"] != entry["dtype"] or t["shape"] != entry["shape"]:
            problems.append(f"tensor {name}: {rel} has {t['dtype']}{t['shape']}, index says {entry['dtype']}{entry['shape']}")
        elif h["start"] + begin != entry["offset"] or end - begin != entry["nbytes"]:
            problems.append(f"tensor {name}: offset/size in {rel} disagree with the index")
        elif TensorSpec(name, DTYPE_NAMES[t["dtype"]], tuple(t["shape"])).nbytes != end - begin:
            problems.append(f"tensor {name}: byte size does not match its shape and dtype")
    return problems
