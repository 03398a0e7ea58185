"""The workspace cache: a source given to `generate`, `chat` or `eval ppl` is converted once into
$LMC_CACHE/workspaces/<name>-<key> (default ~/.cache/lmc) and reused.

The key is a sha256 over the files a conversion reads (weights, config.json, tokenizer files) and
the lmc version that converts them. Hashing gigabytes on every run is slow, so index.json keeps,
per source path, the (size, mtime_ns) of every file in it and the key they gave; the files are
hashed again only when one of those changed, or a file came or went. A workspace's "last used"
time is its folder's mtime, set on every use. Workspaces are written by `convert` through
`atomic_output` (a temporary folder renamed into place), index.json by a rename.

index.json is a hint, never trusted: one that is damaged, over MAX_INDEX_BYTES or holds a record of the wrong
shape (a key that is not 16 hex digits could lead out of the cache) loses those records, which costs a hash.
A cache entry is a real folder in workspaces/ named <name>-<key> and holding lmc.json: `lmc cache clean` follows
no link and removes no folder the cache did not write (LMC_CACHE set to a user's folder loses nothing).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lmc
from lmc.errors import LmcError
from lmc.format.paths import read_capped

INDEX = "index.json"
MAX_INDEX_BYTES = 16 << 20  # a record per source is a few hundred bytes: a larger index.json is damaged
KEY = re.compile(r"[0-9a-f]{16}")  # what content_key returns
NAME = re.compile(r".+-[0-9a-f]{16}")  # a cached workspace's folder: <source name>-<key>
LEFTOVER = re.compile(r"\..+\.(tmp|old|removing)-.+")  # a killed conversion's or removal's hidden folder


def cache_root() -> Path:
    """$LMC_CACHE, or ~/.cache/lmc when it is unset or empty (an empty one is not the current folder)."""
    return Path(os.environ.get("LMC_CACHE") or Path.home() / ".cache" / "lmc")


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
        _check_writable(target.parent)
        convert(src, target, force=True)
    if changed or index["workspaces"].get(name) != {"source": str(src)}:
        index["workspaces"][name] = {"source": str(src)}
        try:
            _write_index(root, index)
        except LmcError:  # a read-only cache still serves its workspaces: the index is only a hint
            pass
    try:
        os.utime(target)  # last used
    except OSError:  # a read-only cache still serves its workspaces; their last use goes unrecorded
        pass
    return target


def _check_writable(folder: Path) -> None:
    """Refuse, in one line naming LMC_CACHE, a cache folder that cannot be created or written to (convert's
    own message would name an --output the user never gave)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    what = "is not writable by this user" if existing.is_dir() else "is not a folder"
    raise LmcError(f"cannot convert into the workspace cache: {existing} {what}; set LMC_CACHE to a folder you "
                   "can write to, or convert with `lmc convert` and pass the workspace")


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
    """index.json's well-formed records; a missing, damaged or oversized index, or a record of the wrong shape,
    is dropped (it costs one hash per source)."""
    try:
        path = root / INDEX
        data = read_capped(path, MAX_INDEX_BYTES)  # a pipe or device: NotRegularFile, an OSError
        if len(data) > MAX_INDEX_BYTES:
            raise ValueError(f"{path} is over {MAX_INDEX_BYTES} bytes")
        index = json.loads(data)
    except (OSError, ValueError, RecursionError):  # missing or damaged: start afresh
        index = None
    index = index if isinstance(index, dict) else {}
    sources, workspaces = index.get("sources"), index.get("workspaces")
    return {"sources": {src: rec for src, rec in (sources.items() if isinstance(sources, dict) else ())
                        if isinstance(rec, dict) and isinstance(rec.get("files"), dict)
                        and isinstance(rec.get("key"), str) and KEY.fullmatch(rec["key"])},
            "workspaces": {name: rec for name, rec in (workspaces.items() if isinstance(workspaces, dict) else ())
                           if isinstance(rec, dict) and isinstance(rec.get("source"), str)}}


def _write_index(root: Path, index: dict) -> None:
    """Replace index.json in one rename (two processes racing lose one entry: one more hash later)."""
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}.", dir=root)
        with os.fdopen(fd, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(tmp, root / INDEX)
    except OSError as e:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise LmcError(f"cannot write {root / INDEX} ({e.strerror or e}); set LMC_CACHE to a folder you can "
                       "write to") from None


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
        if ws.name.startswith(".") or not _is_workspace(ws):
            continue  # a conversion in progress (atomic_output's temporary folder), a link, what lmc did not write
        source = (index["workspaces"].get(ws.name) or {}).get("source")
        current = index["sources"].get(source) if source else None
        stale = source is not None and (not Path(source).exists()
                                        or (current is not None and not ws.name.endswith("-" + current["key"])))
        try:
            out.append(Entry(ws.name, str(ws), source, _size(ws), ws.lstat().st_mtime, stale))
        except OSError:  # removed meanwhile (another `lmc cache clean`)
            continue
    return sorted(out, key=lambda e: e.last_used)


def _is_workspace(path: Path) -> bool:
    """A real folder (not a link) named <name>-<key> and holding lmc.json: what the cache wrote there."""
    return bool(NAME.fullmatch(path.name)) and path.is_dir() and not path.is_symlink() and (path / "lmc.json").is_file()


def _size(folder: Path) -> int:
    """Bytes of the regular files under `folder`, links not followed."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(parent, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def clean(everything: bool = False, older_than_days: float | None = None) -> list[Entry]:
    """Remove stale workspaces (default), all of them, or those unused for more than the given days."""
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    root = cache_root()
    removed = [e for e in entries()
               if everything or (e.last_used < cutoff if cutoff is not None else e.stale)]
    index = _read_index(root)
    for e in removed:
        _remove(Path(e.path), root)
        index["workspaces"].pop(e.name, None)
    if everything:
        for tmp in (root / "workspaces").glob(".*"):  # left by conversions that were killed, or by _remove
            if LEFTOVER.fullmatch(tmp.name) and tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
    index["sources"] = {path: rec for path, rec in index["sources"].items() if Path(path).exists()}
    if (root / INDEX).is_file():
        _write_index(root, index)
    return removed


def _remove(ws: Path, root: Path) -> None:
    """Remove a cached workspace: first renamed to a hidden name in one step (so that a removal that fails
    half way leaves no half workspace under its name; `clean --all` removes the rest), then deleted."""
    hidden = ws.with_name(f".{ws.name}.removing-{os.getpid()}")
    try:
        os.rename(ws, hidden)
        shutil.rmtree(hidden)
    except FileNotFoundError:  # removed meanwhile by another `lmc cache clean`
        return
    except OSError as e:
        raise LmcError(f"cannot remove {ws} ({e.strerror or e}); check the permissions of the cache "
                       f"{root} (LMC_CACHE)") from None


def entry_dict(e: Entry) -> dict:
    return {**asdict(e), "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(e.last_used))}
