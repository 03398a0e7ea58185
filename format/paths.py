"""Paths named by files lmc reads (a manifest, a checkpoint's index), kept inside their folder.
Imports no torch."""
from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

MAX_TOKENIZER_FILE_BYTES = 128 << 20  # a tokenizer file (the largest real tokenizer.json are ~35 MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")  # what a workspace's tokenizer/ folder may hold


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
