"""What a workspace's lmc.json and manifest.json must hold, the tensor index a config implies, and
`verify_workspace`: the workspace format's rules that need no torch, so that `lmc verify` spends its time
hashing files rather than loading torch. lmc.format.workspace (the writer and the mmap reader) imports
everything here and re-exports it.

docs/workspace-format.md is the normative description of these rules.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator

from lmc.errors import LmcError, WorkspaceError
from lmc.format.archs import LINEAR_KEYS, Target, arch_spec, linear_parts, rank_config, tp_problem
from lmc.format.config import SIZE_LIMIT, ModelConfig
from lmc.format.hashing import BackgroundHashes
from lmc.format.int4_layout import LAYOUT, check_group_size, int4_shapes
from lmc.format.paths import NotRegularFile, confined, json_problem, read_capped
from lmc.format.vision import VisionConfig, vision_config_of, vision_tensors

FORMAT_VERSION = 2  # what this lmc writes (ACT_ORDER_VERSION where the quantization has act_order)
ACT_ORDER_VERSION = 3  # version 2 plus act-order linears (quantization.act_order, a `.perm` tensor each)
DIGESTS = {1: "sha256", 2: "blake3", 3: "blake3"}  # format version -> the digest of each file (manifest `files`, `source_files`)
DIGEST = DIGESTS[FORMAT_VERSION]
MAX_HEADER_BYTES = 100_000_000  # a safetensors header's limit in the safetensors library itself
MAX_JSON_BYTES = 64 << 20  # lmc.json and manifest.json: a real manifest is a few MB (126 layers x tp 8: ~4 MB)
SAFETENSORS_DTYPES = {  # torch dtype name -> (safetensors dtype string, bytes per element)
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int32": ("I32", 4),
    "int64": ("I64", 8),
    "uint8": ("U8", 1),
    "int8": ("I8", 1),
}
ITEM_BYTES = dict(SAFETENSORS_DTYPES.values())  # safetensors dtype string -> bytes per element
FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # lmc.json's dtype
QUANT_METHODS = ("awq", "smooth", "rtn", "gptq", "compressed-tensors", "awq-gptq", "awq-autoround")  # awq: scale + clip search (lmc or AutoAWQ);
# smooth: fixed 0.5 smoothing; rtn: round-to-nearest; gptq / compressed-tensors: converted from such a checkpoint;
# awq-gptq: lmc's scale search then GPTQ rounding; awq-autoround: lmc's scale search then tuned rounding


# ----------------------------------------------------------------------------- the tensor index a config implies


def rank_name(name: str, rank: int, tp: int, split: bool) -> str:
    """TurboMind's naming: with tp > 1, split tensors carry the rank before the last component."""
    if tp == 1 or not split:
        return name
    base, leaf = name.rsplit(".", 1)
    return f"{base}.{rank}.{leaf}"


def index_key(name: str, rank: int, tp: int) -> str:
    """A tensor's key in manifest.json: its name, prefixed by `rank:` when tp > 1."""
    return name if tp == 1 else f"{rank}:{name}"


def plain_shape(cfg: ModelConfig, target: Target) -> tuple[int, ...]:
    """Shape of a tensor that is not a linear: embeddings and lm_head [V, H], q/k norms [D], other norms [H]."""
    if target.key in ("q_norm", "k_norm"):
        return (cfg.head_dim,)
    if target.key is not None or target.name == "norm.weight":
        return (cfg.hidden_size,)
    return (cfg.vocab_size, cfg.hidden_size)


def workspace_tensors(cfg: ModelConfig, dtype: str, quantization: dict | None,
                      tp: int) -> Iterator[tuple[int, Target, str, str, tuple[int, ...]]]:
    """Every tensor a workspace of this config holds, rank by rank in name-table order (the order
    the converter writes them in): (rank, target, tensor name, safetensors dtype, shape)."""
    float_dtype = SAFETENSORS_DTYPES[dtype][0]
    for r in range(tp):
        for t in arch_spec(cfg).targets(cfg):
            if not t.linear:
                yield r, t, t.name, float_dtype, plain_shape(cfg, t)
                continue
            n = sum(linear_parts(rank_config(cfg, tp) if t.split == "col" else cfg, t.key)[0])  # this rank's N
            k = linear_parts(rank_config(cfg, tp) if t.split == "row" else cfg, t.key)[1]
            if quantization:
                tensors = {t.name + leaf: ("I32" if leaf == ".qweight" else float_dtype, shape)
                           for leaf, shape in int4_shapes(n, k, quantization["group_size"]).items()}
                if t.key in quantization.get("act_order", ()):  # stored input column j is input column perm[j]
                    tensors[t.name + ".perm"] = ("I32", (k,))
            else:
                tensors = {t.name + ".weight": (float_dtype, (n, k))}
            if cfg.qkv_bias and t.key == "w_qkv":
                tensors[t.name + ".bias"] = (float_dtype, (n,))
            for name, (dt, shape) in tensors.items():
                yield r, t, rank_name(name, r, tp, True), dt, shape


def expected_index(cfg: ModelConfig, dtype: str, quantization: dict | None, tp: int,
                   vision: VisionConfig | None = None) -> dict[str, tuple[str, tuple]]:
    """Every tensor a workspace of this config holds: {index key: (safetensors dtype, shape)}; a vision
    workspace's vision tensors are float, after the language model's (tp = 1 only)."""
    out = {index_key(name, r, tp): (dt, shape) for r, _, name, dt, shape in workspace_tensors(cfg, dtype, quantization, tp)}
    float_dtype = SAFETENSORS_DTYPES[dtype][0]
    for name, shape in (vision_tensors(vision) if vision else {}).items():
        out.update({index_key(name, r, tp): (float_dtype, shape) for r in range(tp)})
    return out


def index_problems(expected: dict[str, tuple[str, tuple]], have: dict[str, tuple[str, tuple]], arch: str) -> list[str]:
    """Differences between the tensors a config implies and those an index holds, one line each."""
    problems = [f"tensor {key}: missing (the {arch} config implies {dt}{list(shape)})"
                for key, (dt, shape) in expected.items() if key not in have]
    for key, (dt, shape) in have.items():
        want = expected.get(key)
        if want is None:
            problems.append(f"tensor {key}: not a tensor of this {arch} config")
        elif (dt, tuple(shape)) != (want[0], tuple(want[1])):
            problems.append(f"tensor {key}: {dt}{list(shape)}, the {arch} config implies {want[0]}{list(want[1])}")
    return problems


# ----------------------------------------------------------------------------- lmc.json and manifest.json, checked


def _read_json(path: Path):
    """The parsed file; one over MAX_JSON_BYTES is refused unread (a sparse 1 GiB one took 2 GB to parse)."""
    if not path.is_file():
        raise WorkspaceError(f"{path} is missing: not an lmc workspace (build one with `lmc convert`)")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(MAX_JSON_BYTES + 1) if size <= MAX_JSON_BYTES else b""
    if size > MAX_JSON_BYTES or len(raw) > MAX_JSON_BYTES:  # the second: it grew while read
        raise WorkspaceError(f"{path} is {max(size, len(raw))} bytes, over the {MAX_JSON_BYTES >> 20} MiB lmc reads: "
                             "not a file lmc wrote; rebuild the workspace")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError: also an integer over Python's digit limit
        raise WorkspaceError(f"{path} is not valid JSON ({json_problem(e)}); rebuild the workspace") from None


def check_version(meta: dict, path: Path) -> int:
    """The file's format_version, one this lmc reads (every version in DIGESTS)."""
    version = meta.get("format_version")
    if type(version) is not int or version not in DIGESTS:
        *first, last = map(str, DIGESTS)
        readable = f"{', '.join(first)} and {last}"
        raise WorkspaceError(
            f"{path} has workspace format_version {version!r} but this lmc reads versions {readable}; "
            "rebuild it with `lmc convert` from this lmc, or use the lmc that wrote it")
    return version


def _bad(path: Path, what: str) -> WorkspaceError:
    return WorkspaceError(f"{path}: {what}; rebuild the workspace with `lmc convert`")


def _count(value, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _check_keys(obj, required: tuple[str, ...], optional: tuple[str, ...], path: Path, what: str) -> None:
    if not isinstance(obj, dict):
        raise _bad(path, f"{what} is not a JSON object")
    missing = [k for k in required if k not in obj]
    if missing:
        raise _bad(path, f"{what} lacks {missing[0]!r}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise _bad(path, f"{what} has unknown key {unknown[0]!r}")


def format_version(quantization: dict | None) -> int:
    """The format version this lmc writes for a workspace with this quantization entry: ACT_ORDER_VERSION where it
    has act-order linears (so that an lmc without them refuses the workspace by its version), else FORMAT_VERSION."""
    return ACT_ORDER_VERSION if quantization and quantization.get("act_order") else FORMAT_VERSION


def check_quantization(q, path: Path, version: int = FORMAT_VERSION, tp: int = 1) -> None:
    """lmc.json's quantization entry: null, or 4-bit lmc-int4-k8 with zero points in groups of 32/64/128, and
    (format version 3, tp 1) the linear keys stored in act-order."""
    if q is None:
        return
    _check_keys(q, ("method", "bits", "group_size", "layout", "zero_point"), ("act_order",), path, "quantization")
    if "act_order" in q:
        keys = q["act_order"]
        if (not isinstance(keys, list) or not keys or any(type(k) is not str or k not in LINEAR_KEYS for k in keys)
                or keys != sorted(set(keys), key=LINEAR_KEYS.index)):
            raise _bad(path, f"quantization act_order {keys!r} is not a non-empty list of linear keys "
                             f"({', '.join(LINEAR_KEYS)}) in that order")
        if version < ACT_ORDER_VERSION:
            raise _bad(path, f"quantization act_order needs format_version {ACT_ORDER_VERSION}, the file says {version}")
        if tp != 1:
            raise _bad(path, f"quantization act_order with tp {tp}: act-order workspaces are tp 1")
    if q["method"] not in QUANT_METHODS:
        raise _bad(path, f"quantization method {q['method']!r} is not one of {', '.join(QUANT_METHODS)}")
    if type(q["bits"]) is not int or q["bits"] != 4:
        raise _bad(path, f"quantization bits {q['bits']!r}: lmc reads 4-bit weights only")
    try:
        check_group_size(q["group_size"], "quantization group_size")
    except LmcError as e:
        raise _bad(path, str(e)) from None
    if q["layout"] != LAYOUT:
        raise _bad(path, f"quantization layout {q['layout']!r} is not one this lmc reads ({LAYOUT})")
    if q["zero_point"] is not True:
        raise _bad(path, f"quantization zero_point {q['zero_point']!r}: lmc's int4 layout has zero points")


def check_meta(meta, path: Path) -> ModelConfig:
    """Every value of lmc.json, checked; returns its model config."""
    if not isinstance(meta, dict):
        raise _bad(path, "not a JSON object")
    check_version(meta, path)
    _check_keys(meta, ("format_version", "model", "dtype", "quantization", "tp"), ("engine", "vision"), path, "lmc.json")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        vision = vision_config_of(meta)
        if vision and (vision.text_hidden_size != cfg.hidden_size or vision.image_token_id >= cfg.vocab_size):
            raise LmcError(f"the vision entry does not fit the model (text_hidden_size {vision.text_hidden_size}, "
                           f"image_token_id {vision.image_token_id})")
    except LmcError as e:
        raise WorkspaceError(f"{path}: {e}") from None
    if meta["dtype"] not in FLOAT_DTYPES:
        raise _bad(path, f"dtype {meta['dtype']!r} is not one of {', '.join(FLOAT_DTYPES)}")
    if not _count(meta["tp"], 1):
        raise _bad(path, f"tp {meta['tp']!r} is not a positive integer")
    tp = meta["tp"]
    check_quantization(meta["quantization"], path, meta["format_version"], tp)
    problem = tp_problem(cfg, tp, (meta["quantization"] or {}).get("group_size"))
    if problem:  # "--tp N does not divide ...; choose ...": the reason, without convert's advice
        raise _bad(path, f"tp {tp} cannot split this model: " + problem.split(";")[0].removeprefix(f"--tp {tp} "))
    engine = meta.get("engine", {})
    _check_keys(engine, (), ("session_len", "cache_block_seq_len", "attention_window"), path, "engine")
    for key, value in engine.items():
        if not _count(value, 1) or value >= SIZE_LIMIT:
            raise _bad(path, f"engine {key} {value!r} is not a positive integer below {SIZE_LIMIT}")
    return cfg


def check_manifest(manifest, root: Path, path: Path) -> None:
    """Every value of manifest.json, checked; every path it names must stay inside `root`."""
    if not isinstance(manifest, dict):
        raise _bad(path, "not a JSON object")
    digest = DIGESTS[check_version(manifest, path)]
    _check_keys(manifest, ("format_version", "files", "tensors", "provenance"), (), path, "manifest.json")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["tensors"], dict):
        raise _bad(path, "files and tensors must be JSON objects")
    if not isinstance(manifest["provenance"], dict):
        raise _bad(path, "provenance is not a JSON object")
    for rel, record in manifest["files"].items():
        if rel == "manifest.json" or confined(root, rel) is None:
            raise _bad(path, f"file {rel!r} is not a path inside the workspace (absolute, `..`, or a link pointing out)")
        _check_keys(record, ("size", digest), (), path, f"file {rel!r}")
        hexdigest = record[digest]
        if not _count(record["size"]) or not (isinstance(hexdigest, str) and len(hexdigest) == 64
                                              and set(hexdigest) <= set("0123456789abcdef")):
            raise _bad(path, f"file {rel!r} needs a size (bytes) and a {digest} (64 hex digits)")
    for name, entry in manifest["tensors"].items():
        _check_keys(entry, ("file", "dtype", "shape", "offset", "nbytes"), (), path, f"tensor {name!r}")
        if not isinstance(entry["file"], str) or entry["file"] not in manifest["files"]:
            raise _bad(path, f"tensor {name!r} is in file {entry['file']!r}, which the manifest does not list")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in ITEM_BYTES:
            raise _bad(path, f"tensor {name!r} has dtype {entry['dtype']!r}, not one of {', '.join(ITEM_BYTES)}")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_count(s) for s in shape):
            raise _bad(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not _count(entry["offset"]) or entry["nbytes"] != ITEM_BYTES[entry["dtype"]] * math.prod(shape):
            raise _bad(path, f"tensor {name!r} has offset {entry['offset']!r} and nbytes {entry['nbytes']!r}, "
                             f"which do not fit its dtype and shape")


def implied_count(cfg: ModelConfig, dtype: str, quantization: dict | None, tp: int,
                  vision: VisionConfig | None = None) -> int:
    """How many tensors expected_index holds, counted from rank 0's alone (every rank holds as many)."""
    rank0 = sum(1 for _ in itertools.takewhile(lambda t: t[0] == 0, workspace_tensors(cfg, dtype, quantization, tp)))
    return tp * (rank0 + (len(vision_tensors(vision)) if vision else 0))


def index_problems_of(meta: dict, cfg: ModelConfig, manifest: dict) -> list[str]:
    """Differences between manifest.json's tensor index and the one lmc.json's config implies, one line each.
    An implied index far larger than the manifest's is one problem, not built (a crafted tp and sizes could
    imply billions of tensors)."""
    have = {name: (e["dtype"], tuple(e["shape"])) for name, e in manifest["tensors"].items()}
    vision = vision_config_of(meta)
    implied = implied_count(cfg, meta["dtype"], meta["quantization"], meta["tp"], vision)
    if implied > 2 * len(have) + 64:
        return [f"the manifest lists {len(have)} tensors but the {cfg.architecture} config (tp {meta['tp']}) "
                f"implies {implied}"]
    expected = expected_index(cfg, meta["dtype"], meta["quantization"], meta["tp"], vision)
    return index_problems(expected, have, cfg.architecture)


def open_checked(path: Path) -> tuple[dict, ModelConfig, dict]:
    """lmc.json and manifest.json, every value checked: (meta, config, manifest) or WorkspaceError."""
    for name in ("lmc.json", "manifest.json"):
        if (path / name).is_symlink() and confined(path, name) is None:
            raise WorkspaceError(f"{path / name} is a link pointing outside the workspace; rebuild the workspace")
    meta = _read_json(path / "lmc.json")
    cfg = check_meta(meta, path / "lmc.json")
    manifest = _read_json(path / "manifest.json")
    check_manifest(manifest, path, path / "manifest.json")
    if manifest["format_version"] != meta["format_version"]:
        raise _bad(path, f"lmc.json is format version {meta['format_version']} but manifest.json is "
                         f"{manifest['format_version']}")
    return meta, cfg, manifest


# ----------------------------------------------------------------------------- verify


def safetensors_header_of(path: Path) -> tuple[int, dict]:
    """(data section start, header) of a safetensors file; ValueError when it is malformed or not a regular file
    (a pipe is never waited on)."""
    try:
        read_capped(path, 0)  # the file's type, checked without blocking
    except NotRegularFile as e:
        raise ValueError(str(e)) from None
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > path.stat().st_size:
            raise ValueError("header length past the end of the file")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"header of {n} bytes, over the {MAX_HEADER_BYTES} the safetensors library reads")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"header is not JSON ({json_problem(e)})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return 8 + n, header


def _unlisted(path: Path, listed: set[str]) -> list[str]:
    """Files (and links) anywhere in the workspace that the manifest does not list, but manifest.json."""
    found = []
    for folder, dirs, files in os.walk(path):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]  # os.walk does not enter them
        for name in files + links:
            rel = Path(folder, name).relative_to(path).as_posix()
            if rel not in listed and rel != "manifest.json":
                found.append(rel)
    return sorted(found)


def verify_workspace(path: str | os.PathLike) -> list[str]:
    """Check lmc.json and manifest.json (every value, every path inside the folder), every file's size
    and digest, that no unlisted file sits anywhere in the folder, that the tensor index is exactly
    what the config implies, and every tensor's header entry. The files are hashed on threads
    (lmc.format.hashing.WORKERS). Imports no torch: `lmc verify` takes the time of reading and hashing.
    Returns a list of problems, each one line naming the file or tensor; empty when sound."""
    path = Path(path)
    try:
        if not path.is_dir():
            raise WorkspaceError(f"{path} is not a folder: pass a workspace made by `lmc convert`")
        meta, cfg, manifest = open_checked(path)
    except WorkspaceError as e:
        return [str(e)]
    problems = []
    sized = {rel for rel, record in manifest["files"].items()
             if (path / rel).is_file() and (path / rel).stat().st_size == record["size"]}
    digest = DIGESTS[manifest["format_version"]]
    hashes = BackgroundHashes([path / rel for rel in sized], digest, direct=True)  # no page cache for what nobody reads next
    for rel, record in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif rel not in sized:
            problems.append(f"{rel}: size {f.stat().st_size} bytes, manifest says {record['size']} (truncated or altered)")
        elif hashes.digest(f) != record[digest]:
            problems.append(f"{rel}: {digest} mismatch (file altered or corrupt)")
    problems += [f"{rel}: not in the manifest (remove it, or rebuild the workspace)"
                 for rel in _unlisted(path, set(manifest["files"]))]
    problems += index_problems_of(meta, cfg, manifest)
    if problems:
        return problems
    headers: dict[str, tuple[int, dict] | str] = {}
    for name, entry in manifest["tensors"].items():
        rel = entry["file"]
        if rel not in headers:
            try:
                headers[rel] = safetensors_header_of(path / rel)
            except ValueError as e:
                headers[rel] = str(e)
                problems.append(f"{rel}: not a safetensors file ({e})")
        if isinstance(headers[rel], str):
            continue
        start, header = headers[rel]
        tensor_name = name.split(":", 1)[-1]
        t = header.get(tensor_name)
        if t is None:
            problems.append(f"tensor {name}: not in {rel}")
            continue
        try:
            begin, end = t["data_offsets"]
            dtype, shape = t["dtype"], t["shape"]
            if dtype != entry["dtype"] or shape != entry["shape"]:
                problems.append(f"tensor {name}: {rel} has {dtype}{shape}, index says {entry['dtype']}{entry['shape']}")
            elif start + begin != entry["offset"] or end - begin != entry["nbytes"]:
                problems.append(f"tensor {name}: offset/size in {rel} disagree with the index")
            elif start + end > (path / rel).stat().st_size:
                problems.append(f"tensor {name}: its data runs past the end of {rel}")
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {name}: malformed entry in the header of {rel}")
    return problems
