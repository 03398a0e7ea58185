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


@functools.cache
def _env_cap_mib() -> float:
    """LMC_L2_PREFETCH_MB, read once: a number of MiB >= 0 (default 16)."""
    value = os.environ.get("LMC_L2_PREFETCH_MB", "16")
    try:
        cap = float(value)
    except ValueError:
        cap = -1.0
    if not cap >= 0:  # also NaN
        raise LmcError(f"LMC_L2_PREFETCH_MB={value!r}: set it to a number of MiB (0 turns the prefetch off), "
                       "or unset it")
    return cap


def prefetch_pieces(weight: torch.Tensor, num_warps: int) -> int:
    """A decode kernel's PREFETCH constexpr for this (constant) weight: 0 = no prefetch, else one piece a thread
    (a program's share of the weight in that many prefetch instructions, none repeated by another warp)."""
    nbytes = weight.numel() * weight.element_size()
    cap = _env_cap_mib() if PREFETCH_MIB is None else PREFETCH_MIB
    wanted = (0 < nbytes <= cap * 2**20 and nbytes % 16 == 0 and weight.data_ptr() % 16 == 0
              and weight.is_contiguous() and pdl_enabled(weight.device))
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
