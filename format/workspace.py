"""Workspace format v1: write (streaming, atomic, deterministic), read (mmap), verify.

docs/workspace-format.md is the normative description of what this module writes. The rules that need no
torch (lmc.json and manifest.json checks, the tensor index a config implies, `verify_workspace`) live in
lmc.format.manifest, the torch-free half of writing (shard layout, pipelined write and hash, manifest, the
atomic output claim) in lmc.format.writing; both are re-exported here.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmc.errors import WorkspaceError
from lmc.format.archs import check_within_window
from lmc.format.hashing import CHUNK, file_digest  # noqa: F401 - file_digest re-exported
from lmc.format.manifest import (DIGEST, DIGESTS, FLOAT_DTYPES, FORMAT_VERSION, QUANT_METHODS, SAFETENSORS_DTYPES,  # noqa: F401 - re-exported
                                 check_manifest, check_meta, check_quantization, check_version, expected_index,
                                 index_key, index_problems, index_problems_of, open_checked, plain_shape, rank_name,
                                 verify_workspace, workspace_tensors)
from lmc.format.paths import confined
from lmc.format.vision import vision_config_of
from lmc.format.writing import (ALIGN, SHARD_BYTES, PipelinedWriter, atomic_output, check_output, dump_json,  # noqa: F401 - re-exported
                                file_order, finish_workspace, plan_shards, safetensors_header, shard_name,
                                tensor_record)
from lmc.format.writing import _start_time  # noqa: F401 - tests read a process's start time through here

DTYPES = {getattr(torch, name): st for name, (st, _) in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors dtype string
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def st_dtype(self) -> str:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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

    Returns (file record {size, digest}, {name: absolute data offset}). The header is padded
    with spaces so the data section starts at a multiple of ALIGN.
    """
    ordered = file_order(specs)
    raw, offsets = safetensors_header(ordered)
    out = PipelinedWriter(path)
    try:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for spec in ordered:
            for block in _row_blocks(produce(spec.name), spec):
                out.write(_tensor_bytes(block))
        return out.close(), offsets
    finally:
        out.abort()


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
        shards = plan_shards(specs, shard_bytes)
        for i, shard in enumerate(shards):
            rel = shard_name(None if tp == 1 else rank, i, len(shards))
            record, offsets = write_safetensors(tmp / rel, shard, lambda name, r=rank: produce(r, name))
            files[rel] = record
            for spec in shard:
                tensors[index_key(spec.name, rank, tp)] = tensor_record(spec, rel, offsets[spec.name])
    return finish_workspace(tmp, files, tensors, lmc_json, tokenizer_files, provenance)


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
        """tokenizer/, refused when it is a link pointing outside the workspace (its files are read through it)."""
        path = confined(self.path, "tokenizer")
        if path is None:
            raise WorkspaceError(f"{self.path / 'tokenizer'} is a link pointing outside the workspace; rebuild the workspace")
        return path

    def tensor_names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def check_within_window(self, tokens: int, flag: str) -> None:
        """A sequence of `flag` tokens past the window this workspace records (lmc.json engine.attention_window) is
        refused (format.archs.check_within_window)."""
        check_within_window(tokens, self.meta.get("engine", {}).get("attention_window"), flag, self.path)

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
    checking each file's size and digest as it goes (a workspace of format version 1 stays one). Returns the
    manifest."""
    raw = (src / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    check_manifest(manifest, src, src / "manifest.json")
    for rel, record in manifest["files"].items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        out = PipelinedWriter(target, DIGESTS[manifest["format_version"]])
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
