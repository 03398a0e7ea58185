"""`lmc convert` without torch, for the commonest checkpoint: an HF folder of float safetensors converted
at tp 1 into the dtype its tensors already have.

Then every workspace tensor is one source tensor, or several concatenated along their rows (a fused
w_qkv / w13 is q, k, v or gate, up one after the other), so the workspace's bytes are its header plus
byte ranges of the source files. This module writes exactly the bytes the torch converter writes
(tests/test_passthrough.py compares them) but starts at once: the ranges are read from memory maps,
checked for NaN/Inf on their integer bits (numpy), and written and hashed on the writer's threads while
the source files are hashed for the provenance on others; torch is never imported.

`convert_passthrough` returns None, having written nothing, for anything else (a quantized, GGUF,
LLaVA, .bin or InternLM2 checkpoint, --tp > 1, a dtype change, a tensor table that does not match the
config, a malformed header): compiler/convert.py then converts it, and says what is wrong if anything is.
"""
from __future__ import annotations

import math
import mmap
import struct
import sys
from pathlib import Path

import numpy as np

from lmc.compiler.records import convert_command, lmc_json, provenance, session_window, window_note
from lmc.compiler.source_checks import check_vocabulary, dtype_name, float_source_shapes, ignorable_names, nonfinite
from lmc.compiler.source_files import read_tokenizer_files, weight_files
from lmc.errors import LmcError
from lmc.format.archs import arch_spec, model_config_from_hf
from lmc.format.hashing import CHUNK, BackgroundHashes
from lmc.format.manifest import DIGEST, SAFETENSORS_DTYPES, safetensors_header_of, workspace_tensors
from lmc.format.paths import MAX_CONFIG_BYTES, read_json
from lmc.format.vision import is_llava
from lmc.format.writing import (SHARD_BYTES, ITEMSIZE, PipelinedWriter, StSpec, atomic_output, file_order,
                                finish_workspace, plan_shards, safetensors_header, shard_name, tensor_record)

# |bits| at or above an exponent of all ones is Inf or NaN: (integer view, magnitude mask, exponent mask)
NONFINITE_BITS = {"F16": (np.uint16, 0x7FFF, 0x7C00), "BF16": (np.uint16, 0x7FFF, 0x7F80),
                  "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000)}
# Source bytes asked for ahead of use (madvise WILLNEED): a cold memory map read page fault by page fault ran at
# 0.7-0.95 GB/s on this project's CI disk, 3.2 GB/s with the kernel reading ahead (bench/NOTES.md, session 12)
PREFETCH_BYTES = 512 * 1024**2


class _Range:
    """One source tensor: its file, absolute byte range, safetensors dtype and shape."""

    def __init__(self, file: Path, start: int, end: int, dtype: str, shape: tuple[int, ...]):
        self.file, self.start, self.end, self.dtype, self.shape = file, start, end, dtype, shape


def _tiles(ranges: list[tuple[int, int]], length: int) -> bool:
    """The (start, end) ranges, sorted, cover [0, length) exactly: no overlap, hole or trailing byte (the
    safetensors library's own rule, so both converters take the same files)."""
    at = 0
    for start, end in sorted(ranges):
        if start != at:
            return False
        at = end
    return at == length


def _tensor_table(files: list[Path]) -> dict[str, _Range] | None:
    """Every tensor of the safetensors `files`, or None if a header is malformed, a range runs past its file,
    does not hold its shape or overlaps another, the data section has a hole or trailing bytes, or a name is in
    two files (the torch converter then says which)."""
    table = {}
    for f in files:
        try:
            data_start, header = safetensors_header_of(f)
            size = f.stat().st_size
        except (OSError, ValueError):
            return None
        ranges = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                start, end = entry["data_offsets"]
                shape = tuple(entry["shape"])
                dtype = entry["dtype"]
            except (TypeError, KeyError, ValueError):
                return None
            if not (isinstance(dtype, str) and dtype in ITEMSIZE and all(type(d) is int and d >= 0 for d in shape)
                    and type(start) is int and type(end) is int and 0 <= start <= end and data_start + end <= size):
                return None
            ok = end - start == math.prod(shape) * ITEMSIZE[dtype]
            if not ok or name in table:
                return None
            table[name] = _Range(f, data_start + start, data_start + end, dtype, shape)
            ranges.append((start, end))
        if not _tiles(ranges, size - data_start):
            return None
    return table


def _plan(path: Path, dtype: str, tp: int | None, vision_tower) -> tuple | None:
    """(config, sliding window (records.session_window), dtype name, weight files, tensor table, {workspace tensor: its source tensors}) when the
    checkpoint at `path` converts as byte ranges; None otherwise."""
    if tp not in (None, 1) or vision_tower is not None or not path.is_dir() or (path / "lmc.json").exists():
        return None
    try:
        hf_config = read_json(path / "config.json", MAX_CONFIG_BYTES, "")  # capped, never waits on a pipe
        kind, files = weight_files(path)
        if not isinstance(hf_config, dict) or "quantization_config" in hf_config or is_llava(hf_config) or kind != "st":
            return None
        cfg = model_config_from_hf(hf_config)
        window = session_window(hf_config, cfg)
    except (OSError, ValueError, RecursionError, LmcError):
        return None
    table = _tensor_table(files)
    targets = arch_spec(cfg).targets(cfg)
    if table is None or any(t.fuse == "internlm2_qkv" for t in targets):
        return None
    name = dtype_name(dtype, hf_config)
    st_dtype = SAFETENSORS_DTYPES[name][0]
    expected = {}
    for t in targets:
        expected.update(float_source_shapes(cfg, t))
    have = set(table)
    if set(expected) - have or have - set(expected) - ignorable_names(cfg, have):
        return None
    if any(table[n].shape != shape or table[n].dtype != st_dtype for n, shape in expected.items()):
        return None
    sources = {}  # workspace tensor -> (its source tensors in row order, the target's sources for messages)
    for _, t, tensor, _, _ in workspace_tensors(cfg, name, None, 1):
        leaf = tensor[len(t.name):]  # ".weight" or ".bias" of a linear
        sources[tensor] = ([s + leaf for s in t.sources] if t.linear else [t.sources[0]], t.sources)
    return cfg, window, name, files, table, sources


def _finite(data: memoryview, dtype: str, scratch: np.ndarray) -> bool:
    """No NaN or Inf among the `dtype` values in `data`: the largest magnitude bits stay below all-ones
    exponents (one AND into `scratch` and one max per CHUNK; no copy of the tensor)."""
    kind, magnitude, exponent = NONFINITE_BITS[dtype]
    step = CHUNK // np.dtype(kind).itemsize
    values = np.frombuffer(data, kind)
    for i in range(0, len(values), step):
        part = values[i:i + step]
        bits = scratch.view(kind)[:len(part)]
        np.bitwise_and(part, magnitude, out=bits)
        if int(bits.max()) >= exponent:
            return False
    return True


class _Prefetch:
    """Asks the kernel to read the source ranges of the next PREFETCH_BYTES of tensors, in the order they will be
    used (madvise WILLNEED on their pages; a no-op where mmap has no madvise)."""

    def __init__(self, maps: dict, ranges: list[_Range]):
        self.maps, self.ranges, self.next, self.ahead = maps, ranges, 0, 0

    def used(self, nbytes: int) -> None:
        """`nbytes` more of the ranges were consumed: keep PREFETCH_BYTES asked for beyond them."""
        self.ahead -= nbytes
        while self.ahead < PREFETCH_BYTES and self.next < len(self.ranges):
            r = self.ranges[self.next]
            self.next += 1
            self.ahead += r.end - r.start
            start = r.start - r.start % mmap.PAGESIZE
            end = min(r.end, len(self.maps[r.file]))  # a file that shrank since it was planned: only advice lost
            if hasattr(mmap, "MADV_WILLNEED") and end > start:
                self.maps[r.file].madvise(mmap.MADV_WILLNEED, start, end - start)


def convert_passthrough(src, out, dtype: str = "auto", tp: int | None = None, force: bool = False,
                        progress: bool | None = None, allow_nonfinite: bool = False, say=None,
                        hashes: BackgroundHashes | None = None, model_format: str | None = None,
                        vision_tower=None) -> dict | None:
    """Convert `src` into a workspace at `out` as compiler.convert.convert would, without torch; None (nothing
    written) when `src` is not a float safetensors checkpoint kept in its dtype at tp 1."""
    say = say or (lambda m: print(m, file=sys.stderr))
    path = Path(src)
    if model_format not in (None, "hf"):
        return None
    plan = _plan(path, dtype, tp, vision_tower)
    if plan is None:
        return None
    cfg, window, name, files, table, sources = plan
    tokenizer = read_tokenizer_files(path)
    if "tokenizer.json" not in tokenizer:  # the torch converter builds one with transformers
        return None
    check_vocabulary(tokenizer["tokenizer.json"], path, cfg)
    hashes = hashes or BackgroundHashes(files + [path / n for n in ("config.json", "lmc_provenance.json")], DIGEST)
    specs = [StSpec(tensor, st, shape) for _, _, tensor, st, shape in workspace_tensors(cfg, name, None, 1)]
    command = convert_command("hf", dtype, 1, allow_nonfinite, False)
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=sum(s.nbytes for s in specs), disable=not show, desc="convert", unit="B", unit_scale=True,
               unit_divisor=1024)
    mapped = {}
    for f in files:  # each holds a header, so none is empty
        with open(f, "rb") as fh:
            mapped[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    maps = {f: memoryview(m) for f, m in mapped.items()}
    scratch = np.empty(CHUNK, np.uint8)
    with atomic_output(Path(out), force, [path, *files]) as tmp:
        (tmp / "weights").mkdir()
        (tmp / "tokenizer").mkdir()
        records, tensors = {}, {}
        shards = plan_shards(specs, SHARD_BYTES)
        prefetch = _Prefetch(mapped, [table[s] for shard in shards for spec in file_order(shard)
                                      for s in sources[spec.name][0]])
        prefetch.used(0)
        for i, shard in enumerate(shards):
            rel = shard_name(None, i, len(shards))
            ordered = file_order(shard)
            raw, offsets = safetensors_header(ordered)
            writer = PipelinedWriter(tmp / rel)
            try:
                writer.write(struct.pack("<Q", len(raw)))
                writer.write(raw)
                for spec in ordered:
                    names, origin = sources[spec.name]
                    parts = [table[s] for s in names]
                    views = [maps[p.file][p.start:p.end] for p in parts]
                    prefetch.used(sum(p.end - p.start for p in parts))
                    if not all(_finite(v, p.dtype, scratch) for v, p in zip(views, parts)):
                        nonfinite(spec.name, origin, name, allow_nonfinite, say)
                    for view in views:
                        writer.write(view)
                    bar.update(spec.nbytes)
                records[rel] = writer.close()
            finally:
                writer.abort()
            tensors.update({spec.name: tensor_record(spec, rel, offsets[spec.name]) for spec in shard})
        manifest = finish_workspace(tmp, records, tensors, lmc_json(cfg, name, 1, None, window=window), tokenizer,
                                    lambda: provenance(path, files, "hf", command, hashes))
    bar.close()
    if window is not None:
        say(window_note(cfg, window))
    return manifest
