"""Token windows: seeded random windows for calibration, consecutive ones for evaluation.

`sample_windows` draws starts exactly as LMDeploy's calib_dataloader does: Python's `random`
seeded with `seed`, then `randint(0, n_tokens - seqlen)` (both ends inclusive) once per sample,
so the same token ids, seed and sizes give LMDeploy's windows.
"""
import hashlib
import random
from collections.abc import Sequence

import numpy as np

from lmc.errors import LmcError


def sample_windows(token_ids: Sequence[int] | np.ndarray, n_samples: int, seqlen: int,
                   seed: int) -> np.ndarray:
    """`n_samples` random windows of `seqlen` tokens, as int64 [n_samples, seqlen]."""
    ids = _as_ids(token_ids)  # [T]
    if n_samples < 1 or seqlen < 1:
        raise LmcError(f"--calib-samples ({n_samples}) and --calib-seqlen ({seqlen}) must be >= 1")
    if ids.size < seqlen:
        raise LmcError(f"the calibration text has {ids.size} tokens, fewer than --calib-seqlen "
                       f"{seqlen}: lower --calib-seqlen or use a longer text")
    rng = random.Random(seed)
    starts = np.array([rng.randint(0, ids.size - seqlen) for _ in range(n_samples)], np.int64)  # [S]
    return ids[starts[:, None] + np.arange(seqlen, dtype=np.int64)]  # [S, seqlen]


def eval_windows(token_ids: Sequence[int] | np.ndarray, seqlen: int,
                 max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows from token 0, tail dropped: int64 [n, seqlen]."""
    ids = _as_ids(token_ids)  # [T]
    if seqlen < 1:
        raise LmcError(f"the evaluation window length must be >= 1, got {seqlen}")
    n = ids.size // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise LmcError(f"the evaluation text has {ids.size} tokens, fewer than one window of "
                       f"{seqlen}: use a shorter window or a longer text")
    return ids[: n * seqlen].reshape(n, seqlen)  # [n, seqlen]


def windows_sha256(windows: np.ndarray) -> str:
    """sha256 of the windows' token ids as contiguous little-endian int64 bytes, row-major."""
    return hashlib.sha256(np.ascontiguousarray(windows, dtype="<i8").tobytes()).hexdigest()


def _as_ids(token_ids) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]  # a tokenizer's [1, T] batch
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise LmcError(f"token ids must be a 1-D integer sequence, got shape {ids.shape} "
                       f"of {ids.dtype}")
    return ids.astype(np.int64)  # [T]
