"""An L2 prefetch of a small float weight before the PDL wait: a batch-1 decode GEMV of a few MB is bound by
latency, not bandwidth, and under PDL its programs start while the kernel before them (the attention, the
all-reduce + RMSNorm) still runs. Each program asks L2 for its own share of the weight with
`cp.async.bulk.prefetch.L2` (fire and forget, no registers held) before it waits, so that the weight streams in
during the previous kernel and the GEMV's own loads hit L2.

Measured on 2 x H200 (bench/NOTES.md, session 17, the 8B shape): with a cap of 16 MiB only tp 2's float wo
(2048 x 4096, 16 MiB) is prefetched, and the fp16 tp 2 step is 16 µs shorter; a cap of 48 MiB (qkv and wo at
tp 1 and tp 2) made the fp16 tp 1 step 0.14 ms longer, and the int4 GEMVs (which already load their first groups
before the wait) lost 9-38 µs at 16 MiB, so they do not prefetch. Session 13 prefetched every float GEMV's whole
weight and lost 1 ms at tp 1 (the 235 MB gate/up flooded the memory queues).

LMC_L2_PREFETCH_MB (read once; default 16, 0 = never): the largest weight prefetched. Off the GPU, under
TRITON_INTERPRET, without PDL or before sm_90 nothing is prefetched.

Ahead of the linear (session 21, not yet measured on a GPU: off by default): at a decode step of 1-7 sequences the
rotary kernel, which runs before the decode attention, gets up to 64 extra programs that ask L2 for the first
LMC_L2_AHEAD_MB MiB of the words that wo's kernel will stream (`prefetch_ahead`) and end. Memory is idle while the
attention runs (~8 µs a layer at batch 1 against ~2 µs for wo's 8.4 MB of int4 words), so wo could read from L2
what it now waits for from HBM.
"""
from __future__ import annotations

import functools
import os

import torch

from lmc.errors import LmcError
from lmc.kernels.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: nothing here is called
    triton = None

PREFETCH_MIB: float | None = None  # the largest weight prefetched, MiB (0 = off); None: LMC_L2_PREFETCH_MB or 16
AHEAD_MIB: float | None = None  # MiB of the next linear's words asked for ahead of it (0 = off); None: LMC_L2_AHEAD_MB or 0
AHEAD_SHARE = 128 * 1024  # bytes a program that prefetches ahead asks for (at most 64 programs)


def _read_mib(name: str, default: str) -> float:
    """Environment variable `name`: a number of MiB >= 0."""
    value = os.environ.get(name, default)
    try:
        cap = float(value)
    except ValueError:
        cap = -1.0
    if not cap >= 0:  # also NaN
        raise LmcError(f"{name}={value!r}: set it to a number of MiB (0 turns the prefetch off), or unset it")
    return cap


@functools.cache
def _env_cap_mib() -> float:
    """LMC_L2_PREFETCH_MB, read once: a number of MiB >= 0 (default 16)."""
    return _read_mib("LMC_L2_PREFETCH_MB", "16")


@functools.cache
def _env_ahead_mib() -> float:
    """LMC_L2_AHEAD_MB, read once: a number of MiB >= 0 (default 0: off)."""
    return _read_mib("LMC_L2_AHEAD_MB", "0")


def ahead_wanted() -> bool:
    """Whether decode steps ask L2 for the next linear's words ahead of it (LMC_L2_AHEAD_MB > 0)."""
    return (_env_ahead_mib() if AHEAD_MIB is None else AHEAD_MIB) > 0


def _prefetchable(t: torch.Tensor) -> bool:
    """Whether a bulk L2 prefetch can cover t: contiguous, 16-byte aligned, on a device with PDL (sm_90 CUDA; not
    the CPU or the interpreter)."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and pdl_enabled(t.device)


def prefetch_ahead(words: torch.Tensor | None, num_warps: int) -> tuple[int, int, int]:
    """(bytes, PARTS, programs) for a kernel whose extra programs ask L2 for the start of `words` (a later
    kernel's constant weight): the first LMC_L2_AHEAD_MB MiB in whole 16-byte units, one piece a thread, a share of
    ~AHEAD_SHARE bytes a program; (0, 0, 0) where nothing is asked (off, no words, no PDL: the CPU and the
    interpreter, unaligned or strided words)."""
    cap = _env_ahead_mib() if AHEAD_MIB is None else AHEAD_MIB
    if words is None or cap <= 0 or not _prefetchable(words):
        return 0, 0, 0
    nbytes = min(words.numel() * words.element_size(), int(cap * 2**20)) // 16 * 16
    return (nbytes, 32 * num_warps, min(64, -(-nbytes // AHEAD_SHARE))) if nbytes else (0, 0, 0)


def prefetch_pieces(weight: torch.Tensor, num_warps: int) -> int:
    """A decode kernel's PREFETCH constexpr for this (constant) weight: 0 = no prefetch, else one piece a thread
    (a program's share of the weight in that many prefetch instructions, none repeated by another warp)."""
    nbytes = weight.numel() * weight.element_size()
    cap = _env_cap_mib() if PREFETCH_MIB is None else PREFETCH_MIB
    wanted = 0 < nbytes <= cap * 2**20 and nbytes % 16 == 0 and _prefetchable(weight)
    return 32 * num_warps if wanted else 0


if triton is not None:

    @triton.jit
    def prefetch_parts(total_bytes, share, shares, PARTS: tl.constexpr):
        """(start, size) in bytes, [PARTS] each: the share-th of `shares` equal parts of [0, total_bytes), cut
        into PARTS pieces of whole 16-byte units (size 0 for an empty piece)."""
        units = total_bytes.to(tl.int64) // 16
        lo = share.to(tl.int64) * units // shares  # this program's share, in 16-byte units
        hi = (share.to(tl.int64) + 1) * units // shares
        q = tl.arange(0, PARTS).to(tl.int64)  # [PARTS]
        start = lo + q * (hi - lo) // PARTS
        end = lo + (q + 1) * (hi - lo) // PARTS
        return start * 16, (end - start) * 16

    @triton.jit
    def l2_prefetch(base_ptr, total_bytes, share, shares, PARTS: tl.constexpr):
        """Ask L2 for this program's share of the total_bytes bytes at base_ptr (16-byte aligned, whole 16-byte
        units): the programs of a grid, each with its own share, prefetch the weight once, PARTS instructions a
        program."""
        start, size = prefetch_parts(total_bytes, share, shares, PARTS)
        addr = base_ptr.to(tl.pointer_type(tl.int8), bitcast=True) + start  # [PARTS]
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [addr, size.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
