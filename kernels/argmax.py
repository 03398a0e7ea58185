"""Row argmax of greedy decode logits in one launch: the first index of each row's maximum, as torch.argmax.

torch reduces a [1, V] row with one block (27 µs per 8B decode step on an H200, V = 128256). Here program
(b, p) of a (B, P) grid reduces the p-th chunk of row b to (its maximum, the first index of it), stores that
pair to a small scratch and counts itself in row b's arrival counter (kernels/split_counters.py: an acq_rel
atomic after a barrier, as the split-K GEMV and the split-KV decode do); the last program of the row to arrive
reduces the row's P pairs, writes the index and sets the counter back to 0. P is chosen so that there are about
PROGRAMS_PER_SM programs an SM: each program has one load of BLOCK elements in flight at a time, so the loads
in flight, not the bytes, set the speed (two an SM ran 64 x 128256 float32 logits at ~1.1 TB/s, 31 µs on an H200:
bench/NOTES.md session 23).

Values are compared as int32 keys that order like the floats (float16 / bfloat16 are widened to float32, exactly):
+0.0 and -0.0 get the same key (torch compares them equal) and every NaN gets the key above +inf, so a row with a
NaN gives its first NaN, as torch.argmax does. Equal keys keep the smaller index, so ties give the first index.

Counters: row b uses counter b of the device's shared buffer; the other users index it from 0 too. They never
overlap in time: every user runs on the decode stream one after another, each leaves its counters at zero, and a
PDL kernel (this one included) touches them only after pdl_wait, when the kernel before it has completed.
"""
from __future__ import annotations

import torch

from lmc.kernels.pdl import pdl_launch, pdl_wait
from lmc.kernels.split_counters import split_counters

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: torch.argmax serves
    triton = None

BLOCK = 1024  # elements per program per loop step: 8 float32 per thread at 4 warps
PROGRAMS_PER_SM = 8  # programs of 4 warps: 32 warps an SM, half of Hopper's 64

if triton is not None:

    @triton.jit
    def _key(x):
        """float32 -> int32 keys ordered as the floats, ±0.0 equal, every NaN above +inf (the NaN test reads the
        bits, so no fast-math folding can drop it)."""
        bits = x.to(tl.int32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        key = tl.where(bits < 0, -magnitude, magnitude)
        return tl.where(magnitude > 0x7F800000, 0x7FFFFFFF, key)

    @triton.jit
    def _argmax_rows_kernel(x_ptr, out_ptr, parts_ptr, count_ptr, V, chunk, stride_x,
                            BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
        """Program (b, p) reduces x[b, p * chunk : (p + 1) * chunk] (chunk a multiple of BLOCK) to its largest key
        and that key's first index, stored at parts[b, 0, p] and parts[b, 1, p]; the row's last program to arrive
        writes out[b]. Keys of masked lanes are below -inf's, so they never win."""
        pdl_wait(PDL)
        b = tl.program_id(0)
        p = tl.program_id(1)
        P = tl.num_programs(1)
        NONE: tl.constexpr = -0x7FFFFFFF  # below every real key (-inf's is -0x7F800000)
        offs = tl.arange(0, BLOCK)
        row = x_ptr + b.to(tl.int64) * stride_x
        best_key = tl.full([BLOCK], NONE, tl.int32)  # per lane: the largest key so far and its first index
        best_idx = offs
        for start in range(p * chunk, tl.minimum(p * chunk + chunk, V), BLOCK):
            idx = start + offs  # [BLOCK]
            ok = idx < V
            key = tl.where(ok, _key(tl.load(row + idx, mask=ok, other=0.0).to(tl.float32)), NONE)
            better = key > best_key  # strict: a lane's earlier index wins a tie
            best_key = tl.where(better, key, best_key)
            best_idx = tl.where(better, idx, best_idx)
        top = tl.max(best_key, axis=0)
        first = tl.min(tl.where(best_key == top, best_idx, V), axis=0)
        parts = parts_ptr + b * 2 * P  # [2, P]: keys, then indices
        tl.store(parts + p, top)
        tl.store(parts + P + p, first)
        tl.debug_barrier()  # the pair is stored before the counter says so
        counter = count_ptr + b
        if tl.atomic_add(counter, 1, sem="acq_rel") == P - 1:
            offs_p = tl.arange(0, BLOCK_P)
            p_ok = offs_p < P
            keys = tl.load(parts + offs_p, mask=p_ok, other=NONE, cache_modifier=".cg")  # [BLOCK_P], from other SMs
            firsts = tl.load(parts + P + offs_p, mask=p_ok, other=V, cache_modifier=".cg")  # [BLOCK_P]
            top = tl.max(keys, axis=0)
            tl.store(out_ptr + b, tl.min(tl.where(keys == top, firsts, V), axis=0).to(tl.int64))
            tl.atomic_xchg(counter, 0)  # ready for the next call


def _default_chunk(logits: torch.Tensor, block: int) -> int:
    """Elements per program: a multiple of block, as few as makes B * P about PROGRAMS_PER_SM times the GPU's SMs."""
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 4
    per_row = -(-PROGRAMS_PER_SM * sms // logits.shape[0])  # programs wanted per row
    return -(-logits.shape[1] // (per_row * block)) * block


def argmax_rows_triton(logits: torch.Tensor, chunk: int | None = None, block: int = BLOCK) -> torch.Tensor:
    """logits [B, V] float32 / float16 / bfloat16 -> [B] int64, the first index of each row's maximum (a row's
    first NaN if it has one), in one launch. chunk: elements per program, a multiple of block (None: fill the
    GPU); block: elements per program per loop step, a power of two."""
    assert logits.dim() == 2 and logits.shape[1] > 0, f"logits {tuple(logits.shape)}: [B, V] with V > 0"
    assert logits.shape[1] < 2**31, "indices are int32 in the kernel"
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)  # [B]
    if B == 0:
        return out
    chunk = chunk or _default_chunk(logits, block)
    assert chunk % block == 0, f"chunk {chunk} is not a multiple of block {block}"
    P = -(-V // chunk)
    parts = torch.empty((B, 2, P), dtype=torch.int32, device=logits.device)  # [B, 2, P]: keys, first indices
    _argmax_rows_kernel[(B, P)](logits, out, parts, split_counters(logits.device, B), V, chunk, logits.stride(0),
                                BLOCK=block, BLOCK_P=triton.next_power_of_2(P), num_warps=4,
                                **pdl_launch(logits.device))
    return out


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for logits [B, V]: the Triton kernel on CUDA, torch elsewhere."""
    if logits.is_cuda and triton is not None:
        return argmax_rows_triton(logits)
    return logits.argmax(dim=-1)
