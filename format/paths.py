"""Paths named by files lmc reads (a manifest, a checkpoint's index), kept inside their folder.
Imports no torch."""
from __future__ import annotations

from pathlib import Path, PurePosixPath


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
