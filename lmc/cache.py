"""The workspace cache: a source given to `generate`, `chat` or `eval ppl` is converted once into
$LMC_CACHE/workspaces/<name>-<key> (default ~/.cache/lmc) and reused.

The key is a sha256 over the files a conversion reads (weights, config.json, tokenizer files) and
the lmc version that converts them. Hashing gigabytes on every run is slow, so index.json keeps,
per source path, the (size, mtime_ns) of every file in it and the key they gave; the files are
hashed again only when one of those changed, or a file came or went. A workspace's "last used"
time is its folder's mtime, set on every use. Workspaces are written by `convert` through
`atomic_output` (a temporary folder renamed into place), index.json by a rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lmc

INDEX = "index.json"


def cache_root() -> Path:
    return Path(os.environ.get("LMC_CACHE", Path.home() / ".cache" / "lmc"))


def cached_workspace(src: Path) -> Path:
    """The cached workspace of a source (HF folder or GGUF file), converted first when missing."""
    from lmc.compiler.convert import convert

    src = src.resolve()
    root = cache_root()
    index = _read_index(root)
    stats = _file_stats(src)
    entry = index["sources"].get(str(src))
    changed = entry is None or entry["files"] != stats
    if changed:
        entry = index["sources"][str(src)] = {"files": stats, "key": content_key(src)}
    name = f"{src.name}-{entry['key']}"
    target = root / "workspaces" / name
    if not (target / "lmc.json").is_file():
        convert(src, target, force=True)
    if changed or index["workspaces"].get(name) != {"source": str(src)}:
        index["workspaces"][name] = {"source": str(src)}
        _write_index(root, index)
    os.utime(target)  # last used
    return target


def content_key(src: Path) -> str:
    """A short sha256 over the bytes conversion reads from `src`, and the lmc version."""
    from lmc.compiler.llava import PROCESSOR_FILES
    from lmc.compiler.readers import TOKENIZER_FILES, open_source
    from lmc.format.workspace import DIGEST, FORMAT_VERSION, file_digest

    files = list(open_source(src).reader.source_files())
    if src.is_dir():
        files += [src / name for name in ("config.json", *TOKENIZER_FILES, *PROCESSOR_FILES) if (src / name).is_file()]
    sha = hashlib.sha256(f"lmc {lmc.__version__} format {FORMAT_VERSION};".encode())
    for f in sorted(set(files)):
        sha.update(f"{f.name}:{file_digest(f, DIGEST)};".encode())
    return sha.hexdigest()[:16]


def _file_stats(src: Path) -> dict[str, list[int]]:
    """{name: [size, mtime_ns]} of the file, or of every file directly in the folder."""
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    return {f.name: [(st := f.stat()).st_size, st.st_mtime_ns] for f in files}


def _read_index(root: Path) -> dict:
    try:
        index = json.loads((root / INDEX).read_text())
        if isinstance(index.get("sources"), dict) and isinstance(index.get("workspaces"), dict):
            return index
    except (OSError, ValueError, AttributeError):  # missing or damaged: start afresh (costs one hash per source)
        pass
    return {"sources": {}, "workspaces": {}}


def _write_index(root: Path, index: dict) -> None:
    """Replace index.json in one rename (two processes racing lose one entry: one more hash later)."""
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}.", dir=root)
    with os.fdopen(fd, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    os.replace(tmp, root / INDEX)


# ----------------------------------------------------------------------------- lmc cache list / clean


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    source: str | None  # None: not in the index (made by another lmc, or the index was lost)
    size: int  # bytes of its files
    last_used: float  # seconds since the epoch
    stale: bool  # its source is gone, or now converts to another workspace


def entries() -> list[Entry]:
    """Every cached workspace, least recently used first."""
    root = cache_root()
    folder = root / "workspaces"
    if not folder.is_dir():
        return []
    index = _read_index(root)
    out = []
    for ws in folder.iterdir():
        if ws.name.startswith(".") or not ws.is_dir():
            continue  # a conversion in progress (atomic_output's temporary folder)
        source = (index["workspaces"].get(ws.name) or {}).get("source")
        current = index["sources"].get(source) if source else None
        stale = source is not None and (not Path(source).exists()
                                        or (current is not None and not ws.name.endswith("-" + current["key"])))
        size = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file())
        out.append(Entry(ws.name, str(ws), source, size, ws.stat().st_mtime, stale))
    return sorted(out, key=lambda e: e.last_used)


def clean(everything: bool = False, older_than_days: float | None = None) -> list[Entry]:
    """Remove stale workspaces (default), all of them, or those unused for more than the given days."""
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    root = cache_root()
    removed = [e for e in entries()
               if everything or (e.last_used < cutoff if cutoff is not None else e.stale)]
    index = _read_index(root)
    for e in removed:
        shutil.rmtree(e.path, ignore_errors=True)
        index["workspaces"].pop(e.name, None)
    if everything:
        for tmp in (root / "workspaces").glob(".*"):  # left by conversions that were killed
            shutil.rmtree(tmp, ignore_errors=True)
    index["sources"] = {path: rec for path, rec in index["sources"].items() if Path(path).exists()}
    if (root / INDEX).is_file():
        _write_index(root, index)
    return removed


def entry_dict(e: Entry) -> dict:
    return {**asdict(e), "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(e.last_used))}
