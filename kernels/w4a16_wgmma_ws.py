"""W4A16 on Hopper's wgmma with a producer warp (warp specialization): the wgmma kernel of kernels/w4a16_wgmma.py
(same mma-layout words, same dequant, same register-A tile) with its loads moved out of the consumer warps.

Why: at 64-256 rows the wgmma kernel's warpgroups each load their words into registers a few chunks ahead and
stage x through registers into shared memory (LDG, permute, STSM, barrier) every chunk; at 128-256 rows a program
runs out of registers (bench/NOTES.md, sessions 17-18), so each weight word is dequantized once per 64 rows and
latency is hidden only by a few chunks in flight. Here one producer warp issues TMA copies of x and of the words
into a ring of STAGES shared-memory slots, signalled by mbarriers; the consumer warpgroups hold only their
accumulator, one chunk's words and A tile, so a program can take 128-256 rows.

- x is copied by TMA, so it must already be in the A tile's kk order (kk = 16j + 8 s2 + 2t + s1 stands for k =
  16t + 4j + 2 s2 + s1 within each 64-wide chunk, w4a16_wgmma's X_VIEW / X_PERM): `permute_x` writes that copy of
  x once per call ([M, K] float16 -> [M, K] float16, a torch gather of 4-byte pairs). The slot is [BM, 64]
  float16, 128-byte swizzled (NVMMASharedLayout), read by wgmma as the K-major B [64, BM]; rows past M are zeros
  (TMA's out-of-bounds fill) and their outputs are not stored.
- Words: the mma layout [NB, chunks, 128] int32 seen as [NB, chunks x 128]; a slot holds the 4 WARPGROUPS blocks of
  the program's column set for one chunk ([4 WARPGROUPS, 128], unswizzled; blocks past NB are zeros). Warp w of
  consumer q reads block 4q + w's 128 words as [4, 128] (lane l = 4g + t: words 4l .. 4l + 3 = 16g + 4t + j, one
  16-byte shared load), exactly the [8 W, 16] tensor of the wgmma kernel, so its `_a_tile` applies unchanged.
- sz (the group's zero and scale pairs) the consumers load themselves (two 4-byte loads a warp a group, L2-hot).
- Partitions: consumer 0 is the default partition (4 warps), consumers 1 .. WARPGROUPS - 1 are 4-warp workers, the
  producer a 1-warp worker. Each consumer waits for `ready[s]`, dequantizes, issues its wgmma asynchronously, and
  after warpgroup_mma_wait(1) (the previous chunk's wgmma has read its slot) arrives on that slot's `empty` barrier
  (count WARPGROUPS); the producer waits for `empty[s]` before refilling the slot.
- Epilogue and split-K as the wgmma kernel (its `_store_out`), each consumer on its own 64 columns: with split-K
  each consumer writes float32 partials and the last split to arrive for that (program, consumer) sums them in
  split order (lmc.kernels.split_counters).

Off the GPU nothing here runs but `permute_x`'s torch path; the tests compare the kernel on a Hopper GPU with
w4a16_mma.mma_reference, and the compile test builds it for sm_90a without one (registers, spills).
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from lmc.errors import LmcError
from lmc.kernels import w4a16_wgmma as WG
from lmc.kernels.split_counters import split_counters
from lmc.kernels.w4a16_mma import CHUNK, prepare_launch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except (ImportError, AttributeError):  # no triton, or one without Gluon: WG.wgmma_available says no
    triton = None
    gluon = None
    gl = None

ROWS = (64, 128, 256)  # BM: rows of x a program (the wgmma N)
WARPGROUPS = (1, 2)  # consumer warpgroups a program, 64 output columns each, sharing the x slots
STAGES = (2, 3, 4, 6)  # shared-memory slots of (x, words) in the ring
PRODUCER_REGISTERS = 40  # the producer warp's register budget (setmaxnreg; it only issues TMA copies)

if gl is not None:
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # 3.6: the older name
    _PRODUCER_REGISTERS = gl.constexpr(PRODUCER_REGISTERS)
    W_SMEM = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))


def _gluon_jit(fn):
    return gluon.jit(fn) if gluon is not None else fn


def permute_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 64) -> the same values with each 64-wide chunk in the A tile's kk order: column
    64c + kk holds x[:, 64c + k], k = 16t + 4j + 2 s2 + s1 for kk = 16j + 8 s2 + 2t + s1 (float16 pairs move
    whole)."""
    m, k = x.shape
    return x.reshape(m, k // CHUNK, 4, 4, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(m, k)  # [m, c, t, j, s2, s1]
    #                                                                                     -> [m, c, j, s2, t, s1]


# ----------------------------------------------------------------------------- the kernel


@_gluon_jit
def _produce(x_desc, w_desc, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K,
             stride_om, ROW_BLOCKS, GROUP: gl.constexpr, BM: gl.constexpr, SPLIT_K: gl.constexpr,
             SILU: gl.constexpr, WARPGROUPS: gl.constexpr, STAGES: gl.constexpr):
    """The producer warp: chunk after chunk of this program's split, wait for the slot to be empty, then TMA x
    [BM, 64] and the words [4 WARPGROUPS, 128] into it, both completing on ready[slot]."""
    pid = gl.program_id(0)
    c_lo, c_hi = _split_chunks(K, GROUP, SPLIT_K)
    col_set = pid // ROW_BLOCKS
    row0 = (pid % ROW_BLOCKS) * BM
    for c in range(c_lo, c_hi):
        i = c - c_lo
        s = i % STAGES
        mbarrier.wait(empty.index(s), (i // STAGES & 1) ^ 1)  # a fresh barrier counts as phase 1 done
        mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        _tma_load(x_desc, [row0, c * 64], ready.index(s), x_bufs.index(s))
        _tma_load(w_desc, [col_set * 4 * WARPGROUPS, c * 128], ready.index(s), w_bufs.index(s))


@_gluon_jit
def _split_chunks(K, GROUP: gl.constexpr, SPLIT_K: gl.constexpr):
    """This program's chunks c_lo .. c_hi - 1: the split-th run of whole groups (maybe none)."""
    CHUNKS: gl.constexpr = GROUP // 64
    n_groups = K // GROUP
    run = gl.cdiv(n_groups, SPLIT_K)
    split = gl.program_id(1)
    return gl.minimum(split * run, n_groups) * CHUNKS, gl.minimum(split * run + run, n_groups) * CHUNKS


@_gluon_jit
def _consume(q: gl.constexpr, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K,
             stride_om, ROW_BLOCKS, GROUP: gl.constexpr, BM: gl.constexpr, SPLIT_K: gl.constexpr,
             SILU: gl.constexpr, WARPGROUPS: gl.constexpr, STAGES: gl.constexpr):
    """Consumer warpgroup q: 64 output columns (blocks 4 (WARPGROUPS col_set + q) + w) x BM rows."""
    ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BM, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_LAYOUT, k_width=2)
    SLOT_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])  # [4, 128]: warp w block 4q + w
    WORDS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])  # [32, 16]: the same registers
    SZ_LAYOUT: gl.constexpr = gl.SliceLayout(1, WORDS_LAYOUT)  # [32]: 8w + g
    CHUNKS: gl.constexpr = GROUP // 64
    pid = gl.program_id(0)
    col_set = pid // ROW_BLOCKS
    row0 = (pid % ROW_BLOCKS) * BM
    c_lo, c_hi = _split_chunks(K, GROUP, SPLIT_K)
    n_groups = K // GROUP
    r = gl.arange(0, 32, layout=SZ_LAYOUT)  # 8w + g
    blk = gl.minimum((col_set * WARPGROUPS + q) * 4 + r // 8, NB - 1)  # a missing block: nothing of it is stored
    sz_base = (blk * n_groups * 8 + r % 8) * 2  # + grp * 16: (zz, ss) of rows (g, g + 8)

    # the first chunk peeled (every split has one: the launcher refuses empty splits), so that every path to the
    # final wait has issued a wgmma: otherwise ptxas serializes them (C7515, accumulators defined by other code)
    acc = _chunk(gl.zeros([64, BM], gl.float32, ACC_LAYOUT), c_lo, c_lo, q, x_bufs, w_bufs, ready, empty, sz_ptr,
                 sz_base, A_LAYOUT, SLOT_LAYOUT, WORDS_LAYOUT, CHUNKS, STAGES)
    for c in range(c_lo + 1, c_hi):
        acc = _chunk(acc, c, c_lo, q, x_bufs, w_bufs, ready, empty, sz_ptr, sz_base, A_LAYOUT, SLOT_LAYOUT,
                     WORDS_LAYOUT, CHUNKS, STAGES)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    n_mine = c_hi - c_lo
    mbarrier.arrive(empty.index((n_mine + STAGES - 1) % STAGES))  # the last slot (nobody waits on it)

    cs = col_set * WARPGROUPS + q  # this warpgroup's 64 columns, as the wgmma kernel's one-warpgroup column set
    if SPLIT_K == 1:
        WG._store_out(acc, out_ptr, M, stride_om, NB, cs, row0, BM, SILU, 4)
    else:
        split = gl.program_id(1)
        unit = pid * WARPGROUPS + q  # (program, consumer): its own partials and counter
        units = gl.num_programs(0) * WARPGROUPS
        ri = gl.arange(0, 64, layout=gl.SliceLayout(1, ACC_LAYOUT))
        ci = gl.arange(0, BM, layout=gl.SliceLayout(0, ACC_LAYOUT))
        idx = ri[:, None] * BM + ci[None, :]
        gl.store(ws_ptr + (split * units + unit) * (64 * BM) + idx, acc)
        WG._barrier()  # every thread's partials are written before the counter says so
        counter = count_ptr + unit
        if gl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            total = gl.zeros([64, BM], gl.float32, ACC_LAYOUT)
            for sp in gl.static_range(SPLIT_K):
                total += gl.load(ws_ptr + (sp * units + unit) * (64 * BM) + idx, cache_modifier=".cg")
            WG._store_out(total, out_ptr, M, stride_om, NB, cs, row0, BM, SILU, 4)
            gl.atomic_xchg(counter, 0)  # ready for the next call (and the next CUDA-graph replay)


@_gluon_jit
def _chunk(acc, c, c_lo, q: gl.constexpr, x_bufs, w_bufs, ready, empty, sz_ptr, sz_base, A_LAYOUT: gl.constexpr,
           SLOT_LAYOUT: gl.constexpr, WORDS_LAYOUT: gl.constexpr, CHUNKS: gl.constexpr, STAGES: gl.constexpr):
    """Chunk c: wait for its slot, dequantize warpgroup q's words into the A tile, issue the wgmma asynchronously,
    and free the previous chunk's slot once that chunk's wgmma is done."""
    i = c - c_lo
    s = i % STAGES
    grp = c // CHUNKS
    zz = gl.load(sz_ptr + sz_base + grp * 16)
    ss = gl.load(sz_ptr + sz_base + grp * 16 + 1)
    mbarrier.wait(ready.index(s), i // STAGES & 1)
    words = w_bufs.index(s).slice(4 * q, 4).load(SLOT_LAYOUT)  # [4, 128]: one 16-byte load a lane
    words = gl.convert_layout(gl.reshape(words, [32, 16]), WORDS_LAYOUT, assert_trivial=True)  # row 8w + g
    a = WG._a_tile(words, zz, ss, A_LAYOUT, 4)
    b = x_bufs.index(s).permute((1, 0))  # [64, BM] float16, K-major
    acc = warpgroup_mma(a, b, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])  # the previous chunk's wgmma is done
    fence_async_shared()  # this warpgroup's reads of that slot come before the producer's next TMA into it
    mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)  # ... so its slot is free
    return acc


@_gluon_jit
def _consume_0(x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_om, ROW_BLOCKS,
               GROUP: gl.constexpr, BM: gl.constexpr, SPLIT_K: gl.constexpr, SILU: gl.constexpr,
               WARPGROUPS: gl.constexpr, STAGES: gl.constexpr):
    _consume(0, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_om, ROW_BLOCKS,
             GROUP, BM, SPLIT_K, SILU, WARPGROUPS, STAGES)


@_gluon_jit
def _consume_1(x_desc, w_desc, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K,
               stride_om, ROW_BLOCKS, GROUP: gl.constexpr, BM: gl.constexpr, SPLIT_K: gl.constexpr,
               SILU: gl.constexpr, WARPGROUPS: gl.constexpr, STAGES: gl.constexpr):
    """Consumer 1 as a worker partition (the workers share one signature: the producer's)."""
    _consume(1, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_om, ROW_BLOCKS,
             GROUP, BM, SPLIT_K, SILU, WARPGROUPS, STAGES)


@_gluon_jit
def _ws_kernel(x_desc, w_desc, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_om, ROW_BLOCKS,
               GROUP: gl.constexpr, BM: gl.constexpr, SPLIT_K: gl.constexpr, SILU: gl.constexpr,
               WARPGROUPS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr):
    """Program (pid, split): column set pid // ROW_BLOCKS (4 WARPGROUPS blocks), rows BM (pid % ROW_BLOCKS) ..
    + BM, over the split-th run of groups."""
    x_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BM, 64], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, 4 * WARPGROUPS, 128], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=WARPGROUPS)
    fence_async_shared()
    # (the argument tuples written out in the call: a tuple assigned to a name turns its constexprs into tensors)
    if WARPGROUPS == 1:
        gl.warp_specialize([
            (_consume_0, (x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_om,
                          ROW_BLOCKS, GROUP, BM, SPLIT_K, SILU, WARPGROUPS, STAGES)),
            (_produce, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K,
                        stride_om, ROW_BLOCKS, GROUP, BM, SPLIT_K, SILU, WARPGROUPS, STAGES))],
            [1], [_PRODUCER_REGISTERS])
    else:
        gl.warp_specialize([
            (_consume_0, (x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_om,
                          ROW_BLOCKS, GROUP, BM, SPLIT_K, SILU, WARPGROUPS, STAGES)),
            (_consume_1, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB,
                          K, stride_om, ROW_BLOCKS, GROUP, BM, SPLIT_K, SILU, WARPGROUPS, STAGES)),
            (_produce, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K,
                        stride_om, ROW_BLOCKS, GROUP, BM, SPLIT_K, SILU, WARPGROUPS, STAGES))],
            [4, 1], [CONSUMER_REGISTERS, _PRODUCER_REGISTERS])


# ----------------------------------------------------------------------------- the launcher


# Registers a thread at launch (the partitions then move them with setmaxnreg): one consumer + the producer's
# warpgroup = 8 warps at 128 (two programs an SM); two consumers = 12 warps at 168 (one program an SM).
MAXNREG = {1: 128, 2: 168}


def consumer_registers(warpgroups: int) -> int:
    """Registers a consumer thread gets: a program's share of the 64K (MAXNREG over its warps) less the producer's
    warpgroup (its one warp still takes a warpgroup's registers) at PRODUCER_REGISTERS, over the consumers' 128
    threads each, rounded down to 8."""
    total = MAXNREG[warpgroups] * 128 * (warpgroups + 1)
    return (total - 128 * PRODUCER_REGISTERS) // (128 * warpgroups) // 8 * 8


def check_args(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int, rows: int, split_k: int,
               silu_mul: bool, warpgroups: int, stages: int) -> None:
    """The launcher's one-line errors (the layout's are the wgmma kernel's)."""
    WG.check_args(x, qfrag, sz, group_size, 64, split_k, silu_mul, 1)
    if rows not in ROWS:
        raise LmcError(f"w4a16_wgmma_ws: rows (x rows a program) must be one of {ROWS}, got {rows}")
    if warpgroups not in WARPGROUPS:
        raise LmcError(f"w4a16_wgmma_ws: warpgroups (consumers of 64 columns) must be one of {WARPGROUPS}, got "
                       f"{warpgroups}")
    if stages not in STAGES:
        raise LmcError(f"w4a16_wgmma_ws: stages (shared-memory slots) must be one of {STAGES}, got {stages}")
    n_groups = x.shape[1] // group_size
    if split_k > 1 and (split_k - 1) * -(-n_groups // split_k) >= n_groups:
        raise LmcError(f"w4a16_wgmma_ws: split_k {split_k} leaves a split of {n_groups} groups empty; use fewer")


def w4a16_wgmma_ws_triton(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int, *,
                          rows: int = 128, split_k: int = 1, warpgroups: int = 2, stages: int = 4,
                          silu_mul: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float16 -> [M, N] (silu_mul: silu(gate) * up [M, N/2]) float16 from the mma layout on wgmma with a
    TMA producer warp: programs of 64 x `warpgroups` output columns x `rows` rows of x, `stages` slots in flight,
    split_k programs over the groups of K (the last to finish sums in split order). Hopper (sm_90) only."""
    check_args(x, qfrag, sz, group_size, rows, split_k, silu_mul, warpgroups, stages)
    if not (x.is_cuda and x.dtype == torch.float16 and WG.wgmma_available(x.device)):
        raise LmcError("w4a16_wgmma_ws_triton needs float16 x on a Hopper GPU (sm_90) and a Triton with Gluon")
    nb, n_chunks, _ = qfrag.shape
    m, k = x.shape
    x, out, _ = prepare_launch(x, nb * 16, silu_mul, out, True)
    xp = permute_x(x)  # [M, K] float16, contiguous
    x_desc = TensorDescriptor.from_tensor(xp, [rows, 64], WG.X_SMEM.value)
    w_desc = TensorDescriptor.from_tensor(qfrag.view(nb, n_chunks * 128), [4 * warpgroups, 128], W_SMEM.value)
    row_blocks = triton.cdiv(m, rows)
    grid = (triton.cdiv(nb, 4 * warpgroups) * row_blocks, split_k)
    units = grid[0] * warpgroups
    ws = torch.empty((split_k, units, 64 * rows), dtype=torch.float32, device=x.device) if split_k > 1 else out
    counters = split_counters(x.device, units) if split_k > 1 else out
    _ws_kernel[grid](x_desc, w_desc, sz, out, ws, counters, m, nb, k, out.stride(0), row_blocks,
                     GROUP=group_size, BM=rows, SPLIT_K=split_k, SILU=silu_mul, WARPGROUPS=warpgroups,
                     STAGES=stages, CONSUMER_REGISTERS=consumer_registers(warpgroups), num_warps=4,
                     maxnreg=MAXNREG[warpgroups])
    return out
