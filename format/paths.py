"""Paths named by files lmc reads (a manifest, a checkpoint's index), kept inside their folder.
Imports no torch."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from lmc.errors import LmcError

MAX_TOKENIZER_FILE_BYTES = 128 << 20  # a tokenizer file (the largest real tokenizer.json are ~35 MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")  # what a workspace's tokenizer/ folder may hold


MAX_CONFIG_BYTES = 16 << 20  # a checkpoint's config.json (real ones are a few KB)
MAX_INDEX_BYTES = 64 << 20  # a *.index.json (one line per tensor: a few MB for the largest models)


class NotRegularFile(OSError):
    """A path that names a folder, a device or a pipe where a file's bytes are wanted."""


def read_capped(path: Path, limit: int) -> bytes:
    """At most limit + 1 bytes of the regular file at `path`, so a caller sees a file over `limit` as too long
    without reading it all. A folder, device or pipe raises NotRegularFile without blocking (the open is
    non-blocking and the type is checked on the open file); a missing file raises FileNotFoundError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile("not a regular file (a folder, a device or a pipe)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def confined(root: Path, rel, resolve: bool = True) -> Path | None:
    """`root / rel` when `rel` is a canonical relative POSIX path that stays inside `root`, else None.

    With `resolve`, symlinks are followed too (a workspace: a link pointing outside is refused).
    A source folder passes resolve=False: Hugging Face's cache links every file to ../../blobs."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or pure.as_posix() != rel or any(part in (".", "..") for part in pure.parts):
        return None
    path = Path(root) / rel
    if resolve:
        base, real = Path(root).resolve(), path.resolve()
        if base not in real.parents:
            return None
    return path


def json_problem(error: ValueError | RecursionError) -> str:
    """Why json.loads refused a file, in words: its own message, or what a bare ValueError or RecursionError means."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        return str(error)
    return f"a number too long to read: {str(error).split(';')[0]}"  # an integer over sys.get_int_max_str_digits()


def read_file(path: Path, limit: int, advice: str) -> bytes:
    """The bytes of the regular file at `path`, read through read_capped; anything else is one LmcError line ending
    in `advice`: missing, a folder, device or pipe (never waited on), over `limit` bytes."""
    try:
        raw = read_capped(path, limit)
    except FileNotFoundError:
        raise LmcError(f"{path} is missing; {advice}") from None
    except NotRegularFile as e:
        raise LmcError(f"{path} is {e}; {advice}") from None
    except OSError as e:
        raise LmcError(f"{path} cannot be read ({e.strerror}); {advice}") from None
    if len(raw) > limit:
        raise LmcError(f"{path} is over {limit >> 20} MiB, more than such a file ever holds; {advice}")
    return raw


def read_json(path: Path, limit: int, advice: str):
    """The parsed JSON of the regular file at `path` (read_file), or one LmcError line ending in `advice`."""
    try:
        return json.loads(read_file(path, limit, advice))
    except (ValueError, RecursionError) as e:
        raise LmcError(f"{path} is not valid JSON ({json_problem(e)}); {advice}") from None
