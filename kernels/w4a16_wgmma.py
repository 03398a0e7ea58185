"""W4A16 on Hopper's wgmma (Gluon), from the load-time "mma fragment" layout of kernels/w4a16_mma.py (its docstring
has the layout; no new weight format): out^T [N, M] = W^T [N, K] . x^T [K, M] ("swap AB").

Why: the mma.sync kernels (w4a16_mma.py, w4a16_mma_wide.py) reach about half of fp16 cuBLAS at 64-256 rows
(bench/NOTES.md, session 16); cuBLAS runs wgmma. wgmma's A operand may live in registers, and its register
fragment per warp is mma.sync's m16n8k16 A fragment, so the mma layout's words dequantize straight into it.

One program = WARPGROUPS (1, 2 or 4) warpgroups = 64 output columns each (the wgmma M) x BM rows of x (the wgmma N,
8-256; the warpgroups share the x tile), over a run of K in 64-wide chunks (one [64, 64] A tile a warpgroup = 4
wgmma k16 steps):
  - warp w owns mma block 4 WARPGROUPS pid_n + w (rows 16w .. 16w + 15 of A); lane l = 4g + t loads the 4 words
    (block, chunk, 4l + j), j = 0..3, as one 16-byte load: the words tensor is [8 warps, 16] with row 8w + g and
    column 4t + j;
  - one inline-asm statement a word (`_dequant_ptx`: 4 LOP3 + 1 SHF + 2 HSUB2/HFMA2 + 4 HMUL2, and 4 PRMT
    shared by the lane's words) gives 8 float16 (code - zero) * scale, output o = 4 s2 + 2 h + s1 the code of row
    g + 8h at k = 16t + 4j + 2 s2 + s1 of the chunk (the group scale folded into A, as the wide kernel does: one
    float16 rounding, float32 running sums in the accumulator);
  - three joins (s2, then h, then s1: the last join is the fastest register) and a view/permute (`A_VIEW`,
    `A_PERM`) give the A tile: row 16w + 8h + g, column kk = 16j + 8 s2 + 2t + s1; its layout is wgmma's
    register-A layout (DotOperandLayout(0, NVMMADistributedLayout v3, k_width 2)) register for register, which
    `convert_layout(..., assert_trivial=True)` proves at compile time;
  - x: column kk of the A tile stands for k = 16t + 4j + 2 s2 + s1, so the B tile's row kk must hold x^T row k:
    the chunk of x is loaded in k order as float16 pairs [BM, 32] (8 pairs, two 16-byte loads, a lane), viewed
    as [BM, t, j, s2] and permuted (`X_VIEW`, `X_PERM`; the pairs move whole) into kk order, stored (STSM) to
    shared memory as int32 [BM, 32] (NVMMASharedLayout, 128-byte swizzle) and read by wgmma as the float16
    K-major B [64, BM] (a reinterpret of the same bytes, transposed view). Rows of x past M read row M - 1 (their
    output columns are never stored).
PIPELINE: asynchronous wgmma (warpgroup_mma_wait(1)), so that the next chunk's x store and dequant overlap the
current wgmma; else synchronous wgmma. AHEAD (2, 4, 8): a ring of AHEAD chunks' words and sz in registers, the
loop unrolled AHEAD times (`_pass`) so that each entry is reloaded in place, AHEAD chunks on, right after its
chunk's wgmma is issued (no register with a load in flight is copied); a pass runs whole (chunks from the
split's end on read its last chunk, their scales zeroed: they add nothing). x is loaded two chunks ahead (at 256
rows at use, 128 rows at a time, for registers) and stored X_CHUNKS (1, 2) chunks at a time, one barrier a
store, into two slots of X_CHUNKS buffers, each buffer an allocation of its own (Triton 3.6's membar pass puts a
barrier before every store into an allocation a wgmma read; per buffer it sees none). Two asynchronous
warpgroups add a barrier before a store (the slot was read two stores back; each warpgroup's wait covers only its
own wgmmas).
X_TMA (x_chunks 1): x permuted once into kk order in global memory (`kk_order`, a copy of x) and brought by TMA
into two sets of AHEAD stages ([BM, 64] float16, 128-byte swizzle: the B tile as wgmma reads it; rows past M zero),
an mbarrier a stage: a pass (AHEAD chunks) runs on one set while the other fills with the next pass's chunks, so
that the warpgroups meet at one barrier a pass instead of one a chunk, and no thread loads, permutes or stores x
(bench/NOTES.md session 30: the per-chunk x path was 22 % of the M = 256 gate/up kernel).
Epilogue: the float32 accumulator [64 WARPGROUPS, BM] is out^T: element (r, i) is out[row0 + i, col(4 WARPGROUPS
pid_n + r // 16, r % 16)] (w4a16_mma.block_columns), stored through a blocked layout (output columns
contiguous), rows past M and blocks past N/16 not stored. SILU (the gate/up layout): rows r % 16 < 8 are gate
columns, r % 16 >= 8 the matching up columns, both in one lane's registers (h is a register bit): split,
silu(gate) * up (each rounded to float16 first, as the unfused path reads them). SPLIT_K: float32 partials to a
workspace and the last split to arrive sums them in split order (lmc.kernels.split_counters), as the wide kernel
does.

Off the GPU nothing here runs: `emulate` (torch) replays the kernel's index arithmetic (the same tables, the
dequant's bit operations, the epilogue mapping) and the tests compare it with w4a16_mma.mma_reference; the compile
test builds the kernel for sm_90a (no GPU needed), which checks the register-A layout.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import functools

import torch

from lmc.errors import LmcError
from lmc.kernels.split_counters import split_counters
from lmc.kernels.w4a16_mma import CHUNK, LANE_WORDS, mma_eligible, prepare_launch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except (ImportError, AttributeError):  # no triton, or one without Gluon: wgmma_available says no
    triton = None
    gluon = None
    gl = None

ROWS = (8, 16, 32, 64, 128, 256)  # BM: rows of x a program (the wgmma N)
COLUMNS = 64  # output columns a warpgroup (the wgmma M: 4 warps x one 16-column block)
AHEADS = (2, 4, 8)  # chunks of words and scales in flight a warp (the register ring, unrolled)
WARPGROUPS = (1, 2, 4)  # warpgroups a program sharing its x tile (Triton wants a power of two of warps); 4 caps a
#                         thread at 128 registers (512 threads an SM): rows 128, PIPELINE 0 fits (bench/NOTES.md)

# The tables the kernel and `emulate` share. Dequant output o of a word: (s1, h, s2) = (o % 2, o // 2 % 2, o // 4).
A_VIEW = (4, 8, 4, 4, 2, 2, 2)  # the joined [8 W, 16, s2, h, s1] words tensor as [w, g, t, j, s2, h, s1] (W = 4 a
#                                 warpgroup: the kernel and `emulate` put the number of warps first)
A_PERM = (0, 5, 1, 3, 4, 2, 6)  # -> [w, h, g, j, s2, t, s1] = [16 W rows 16w + 8h + g, 64 kk = 16j + 8 s2 + 2t + s1]
X_VIEW = (4, 4, 2)  # a row of the x chunk in float16 pairs, k // 2 = 8t + 2j + s2, as [t, j, s2]
X_PERM = (0, 2, 3, 1)  # [BM, t, j, s2] -> [BM, j, s2, t]: pairs in kk order (kk // 2 = 8j + 4 s2 + t)


def _dequant_ptx() -> str:
    """$0 .. $7 the float16 outputs o = 4 s2 + 2 h + s1, $8 the word, $9 (zz), $10 (ss) of the lane's rows (g,
    g + 8) (w4a16_mma's sz pairs): (code - zero) * scale in float16 (the sub / fma exact, one rounding)."""
    lines = [".reg .b32 w, lo, hi, t, zl, zh, sl, sh, s16, a0, a1, a2, a3;",
             "mov.b32 s16, 0x2C002C00;",  # float16 1/16 twice: (1024 + 16 code) / 16 = 64 + code
             "prmt.b32 zl, $9, $9, 0x1010;", "prmt.b32 zh, $9, $9, 0x3232;",  # 1024 + z_g, -(64 + z_g+8)
             "prmt.b32 sl, $10, $10, 0x1010;", "prmt.b32 sh, $10, $10, 0x3232;"]  # s_g, s_g+8
    for s2 in range(2):  # byte pair 0 (s = 0, 1), then byte pair 1 (s = 2, 3) after a shift by 8
        src = "$8"
        if s2:
            lines.append("shr.u32 w, $8, 8;")
            src = "w"
        lo, hi = f"a{2 * s2}", f"a{2 * s2 + 1}"
        lines += [f"lop3.b32 lo, {src}, 0x000f000f, 0x64006400, 0xea;",  # 1024 + code, row g (h = 0)
                  f"lop3.b32 hi, {src}, 0x00f000f0, 0x64006400, 0xea;",  # 1024 + 16 code, row g + 8 (h = 1)
                  "sub.f16x2 t, lo, zl;", f"mul.rn.f16x2 {lo}, t, sl;",
                  "fma.rn.f16x2 t, hi, s16, zh;", f"mul.rn.f16x2 {hi}, t, sh;"]
    lines += [f"mov.b32 {{${2 * r}, ${2 * r + 1}}}, a{r};" for r in range(4)]  # a_r = (h, s2) = (r % 2, r // 2)
    return "{\n" + "\n".join(lines) + "\n}"


def _cx(value):
    return gl.constexpr(value) if gl is not None else value


_DEQUANT = _cx(_dequant_ptx())
_DEQUANT_IO = _cx(",".join(["=h"] * 8 + ["r"] * 3))
_A_VIEW, _A_PERM, _X_VIEW, _X_PERM = _cx(A_VIEW), _cx(A_PERM), _cx(X_VIEW), _cx(X_PERM)
if gl is not None:
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # 3.6: thread_barrier; later: barrier
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # 3.9 renamed it
    X_SMEM = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    X_SMEM32 = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2))  # same bytes


def _gluon_jit(fn):
    return gluon.jit(fn) if gluon is not None else fn


if gl is not None and hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton >= 3.7
    @_gluon_jit
    def _as_f16(buf, BM: gl.constexpr):
        """An x buffer [BM, 32] int32 as the [BM, 64] float16 wgmma reads (the same bytes)."""
        return buf.reinterpret(gl.float16, [BM, 64], X_SMEM)
else:
    @_gluon_jit
    def _as_f16(buf, BM: gl.constexpr):
        """An x buffer [BM, 32] int32 as the [BM, 64] float16 wgmma reads (the same bytes)."""
        return buf._reinterpret(gl.float16, [BM, 64], X_SMEM)


# ----------------------------------------------------------------------------- the kernel


@_gluon_jit
def _load_x(x32, x_rows, c, WARPS: gl.constexpr):
    """x [R, 32] (float16 pairs) of chunk c in k order, x_rows [R] the rows' offsets in pairs."""
    X_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [WARPS, 1], [1, 0])  # 8 pairs (2 x 16 bytes) a lane
    ks = c * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, X_LAYOUT))
    return gl.load(x32 + x_rows[:, None] + ks[None, :])


@_gluon_jit
def _x_rows(row0, M, stride_x2, R: gl.constexpr, WARPS: gl.constexpr):
    """The pair offsets of rows row0 .. row0 + R - 1 of x; rows past M read row M - 1 (their columns are not
    stored)."""
    X_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [WARPS, 1], [1, 0])
    m = row0 + gl.arange(0, R, layout=gl.SliceLayout(1, X_LAYOUT))
    return gl.minimum(m, M - 1) * stride_x2


@_gluon_jit
def _load_words(qf_ptr, word_base, c):
    """Chunk c's words [8 WARPS, 16] (an entry of the words ring)."""
    return gl.load(qf_ptr + word_base + c * 128, eviction_policy="evict_first")


@_gluon_jit
def _load_sz(sz_ptr, sz_base, c, CHUNKS: gl.constexpr):
    """(zz, ss) [8 WARPS] of chunk c's group (an entry of the sz ring: one a group)."""
    grp = c // CHUNKS
    return gl.load(sz_ptr + sz_base + grp * 16), gl.load(sz_ptr + sz_base + grp * 16 + 1)


@_gluon_jit
def _fill_rings(qf_ptr, sz_ptr, word_base, sz_base, c_lo, last, CHUNKS: gl.constexpr, AHEAD: gl.constexpr,
                SZ_EVERY: gl.constexpr):
    """The rings before the first pass: chunks c_lo .. c_lo + AHEAD - 1's words, and their groups' (zz, ss) (one
    entry per SZ_EVERY chunks)."""
    ring = ()
    sring = ()
    for i in gl.static_range(AHEAD):
        ring = ring + (_load_words(qf_ptr, word_base, gl.minimum(c_lo + i, last)),)
        if i % SZ_EVERY == 0:
            sring = sring + (_load_sz(sz_ptr, sz_base, gl.minimum(c_lo + i, last), CHUNKS),)
    return ring, sring


@_gluon_jit
def _refill_rings(ring, sring, i: gl.constexpr, ahead_c, qf_ptr, sz_ptr, word_base, sz_base, CHUNKS: gl.constexpr,
                  SZ_EVERY: gl.constexpr):
    """Ring entry i reloaded in place with chunk ahead_c's words (its chunk's wgmma is issued); after a group's last
    chunk its sz entry too."""
    ring = ring[:i] + (_load_words(qf_ptr, word_base, ahead_c),) + ring[i + 1:]
    if i % SZ_EVERY == SZ_EVERY - 1:  # the group's last chunk: its (zz, ss) are free
        sring = sring[:i // SZ_EVERY] + (_load_sz(sz_ptr, sz_base, ahead_c, CHUNKS),) + sring[i // SZ_EVERY + 1:]
    return ring, sring


@_gluon_jit
def _x_get(x32, x_rows, c, X_AHEAD: gl.constexpr, WARPS: gl.constexpr):
    """Chunk c's x [BM, 32] pairs (X_AHEAD), else c itself (x is loaded at use, 128 rows at a time)."""
    if X_AHEAD:
        return _load_x(x32, x_rows, c, WARPS)
    else:
        return c


@_gluon_jit
def _x_store(x_buf, xv, x32, x_rows, BM: gl.constexpr, X_AHEAD: gl.constexpr, WARPS: gl.constexpr):
    """x of one chunk (registers, or loaded now from chunk xv) to shared memory in kk order."""
    if X_AHEAD:
        x_buf.store(_x_tile(xv, BM))  # int32 pairs; wgmma reads the same bytes as float16
    else:  # loaded now, 128 rows at a time (registers)
        row0, M, stride_x2 = x_rows
        for p in gl.static_range(BM // 128):
            part = _load_x(x32, _x_rows(row0 + 128 * p, M, stride_x2, 128, WARPS), xv, WARPS)
            x_buf.slice(128 * p, 128).store(_x_tile(part, 128))


@_gluon_jit
def _pass(acc, ring, sring, xr, c, c_hi, last, x_bufs, x32, x_rows, qf_ptr, sz_ptr, word_base, sz_base,
          A_LAYOUT: gl.constexpr, BM: gl.constexpr, PIPELINE: gl.constexpr, X_AHEAD: gl.constexpr,
          WARPS: gl.constexpr, CHUNKS: gl.constexpr, AHEAD: gl.constexpr, X_CHUNKS: gl.constexpr,
          SZ_EVERY: gl.constexpr):
    """Chunks c .. c + AHEAD - 1 (those from c_hi on add nothing: their scales zeroed). ring: the AHEAD chunks'
    words, entry i chunk c + i; each entry is reloaded (chunk + AHEAD) right after its chunk's wgmma is issued, in
    place (the pass is unrolled AHEAD times, so no register with a load in flight is copied); sring: their groups'
    (zz, ss), entry i // SZ_EVERY, reloaded after its last chunk (SZ_EVERY = CHUNKS: one a group, c and AHEAD
    multiples of CHUNKS; at 256 rows 1, one a chunk: holding them across chunks spills there). xr: x of
    the next two chunks (registers, or their chunk numbers at 256 rows). Per X_CHUNKS chunks one x store into a
    slot of X_CHUNKS buffers and one barrier, the two slots in turn (AHEAD / X_CHUNKS is even: the same turn every
    pass). x_bufs: 2 X_CHUNKS allocations of their own (not one indexed: Triton 3.6's membar pass would see every
    wgmma read conflict with the next store and put a barrier before each store)."""
    for i in gl.static_range(0, AHEAD, X_CHUNKS):
        if PIPELINE and WARPS > 4:  # the slot was read by the wgmmas two stores back: each warpgroup waited for
            _barrier()  # its own (warpgroup_mma_wait(1) since), this waits for the other warpgroup's wait
        for j in gl.static_range(X_CHUNKS):
            _x_store(x_bufs[(i // X_CHUNKS) % 2 * X_CHUNKS + j], xr[(i + j) % 2], x32, x_rows, BM, X_AHEAD, WARPS)
            nxt = _x_get(x32, x_rows, gl.minimum(c + i + j + 2, last), X_AHEAD, WARPS)
            if (i + j) % 2 == 0:
                xr = (nxt, xr[1])
            else:
                xr = (xr[0], nxt)
        fence_async_shared()
        _barrier()  # every warp's part of the x tiles is written before the wgmmas read them
        for j in gl.static_range(X_CHUNKS):
            zz, ss = sring[(i + j) // SZ_EVERY]
            a = _a_tile(ring[i + j], zz, gl.where(c + i + j < c_hi, ss, 0), A_LAYOUT, WARPS)
            b = _as_f16(x_bufs[(i // X_CHUNKS) % 2 * X_CHUNKS + j], BM).permute((1, 0))
            if PIPELINE:
                acc = warpgroup_mma(a, b, acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            else:
                acc = warpgroup_mma(a, b, acc)
            ring, sring = _refill_rings(ring, sring, i + j, gl.minimum(c + i + j + AHEAD, last), qf_ptr, sz_ptr,
                                        word_base, sz_base, CHUNKS, SZ_EVERY)
    return acc, ring, sring, xr


@_gluon_jit
def _a_tile(words, zz, ss, A_LAYOUT: gl.constexpr, WARPS: gl.constexpr):
    """The [16 WARPS, 64] float16 A tile of a chunk in wgmma's register-A layout (module docstring)."""
    zz2, _ = gl.broadcast(zz[:, None], words)
    ss2, _ = gl.broadcast(ss[:, None], words)
    q0, q1, q2, q3, q4, q5, q6, q7 = gl.inline_asm_elementwise(
        asm=_DEQUANT, constraints=_DEQUANT_IO, args=[words, zz2, ss2],
        dtype=(gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16),
        is_pure=True, pack=1)
    # q[4 s2 + 2 h + s1]; join over s2, then h, then s1 (the last join is the fastest register bit)
    t00 = gl.join(q0, q4)  # (h 0, s1 0)
    t01 = gl.join(q1, q5)  # (h 0, s1 1)
    t10 = gl.join(q2, q6)  # (h 1, s1 0)
    t11 = gl.join(q3, q7)  # (h 1, s1 1)
    v = gl.join(gl.join(t00, t10), gl.join(t01, t11))  # [8 WARPS, 16, s2, h, s1]
    a = gl.reshape(gl.permute(gl.reshape(v, [WARPS, _A_VIEW[1], _A_VIEW[2], _A_VIEW[3], _A_VIEW[4], _A_VIEW[5],
                                             _A_VIEW[6]]), (_A_PERM[0], _A_PERM[1], _A_PERM[2], _A_PERM[3], _A_PERM[4],
                                                           _A_PERM[5], _A_PERM[6])), [16 * WARPS, 64])
    return gl.convert_layout(a, A_LAYOUT, assert_trivial=True)


@_gluon_jit
def _x_tile(xv, BM: gl.constexpr):
    """x [BM, 32] float16 pairs in k order -> kk order (the B tile's rows, transposed)."""
    return gl.reshape(gl.permute(gl.reshape(xv, [BM, _X_VIEW[0], _X_VIEW[1], _X_VIEW[2]]),
                                 (_X_PERM[0], _X_PERM[1], _X_PERM[2], _X_PERM[3])), [BM, 32])


@_gluon_jit
def _wgmma_kernel(x_ptr, x_desc, qf_ptr, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_xm, stride_om,
                  ROW_BLOCKS, GROUP: gl.constexpr, BM: gl.constexpr, SPLIT_K: gl.constexpr, SILU: gl.constexpr,
                  PIPELINE: gl.constexpr, WARPGROUPS: gl.constexpr, AHEAD: gl.constexpr, X_CHUNKS: gl.constexpr,
                  X_TMA: gl.constexpr):
    """Program (pid, split): column set pid // ROW_BLOCKS (blocks 4 WARPGROUPS set + w, w the warp), rows BM
    (pid % ROW_BLOCKS) .. + BM, over the split-th run of groups. WARPGROUPS (1, 2, 4) warpgroups share the x tile,
    each its own 64 output columns."""
    WARPS: gl.constexpr = 4 * WARPGROUPS
    COLS: gl.constexpr = 64 * WARPGROUPS
    ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, BM, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_LAYOUT, k_width=2)
    WORDS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [WARPS, 1], [1, 0])  # row 8w + g, col 4t + j
    CHUNKS: gl.constexpr = GROUP // 64
    X_AHEAD: gl.constexpr = BM <= 128  # x loaded a chunk ahead (BM / WARPS registers a thread); 256 rows: at use
    SZ_EVERY: gl.constexpr = CHUNKS if X_AHEAD else 1  # chunks sharing one (zz, ss) load (256 rows: registers)
    pid = gl.program_id(0)
    split = gl.program_id(1)
    col_set = pid // ROW_BLOCKS
    row0 = (pid % ROW_BLOCKS) * BM
    n_chunks = K // 64
    n_groups = K // GROUP
    run = gl.cdiv(n_groups, SPLIT_K)
    c_lo = gl.minimum(split * run, n_groups) * CHUNKS
    c_hi = gl.minimum(split * run + run, n_groups) * CHUNKS  # this split's chunks: c_lo .. c_hi - 1 (maybe none)

    r = gl.arange(0, 8 * WARPS, layout=gl.SliceLayout(1, WORDS_LAYOUT))  # 8w + g
    col = gl.arange(0, 16, layout=gl.SliceLayout(0, WORDS_LAYOUT))  # 4t + j
    blk = gl.minimum(col_set * WARPS + r // 8, NB - 1)  # a missing block reads the last one; nothing of it is stored
    g = r % 8
    word_base = (blk * n_chunks * 128 + 16 * g)[:, None] + col[None, :]  # + c * 128: word 16g + 4t + j
    sz_base = (blk * n_groups * 8 + g) * 2  # + grp * 16: (zz, ss) of rows (g, g + 8)

    acc = gl.zeros([COLS, BM], gl.float32, ACC_LAYOUT)
    last = gl.maximum(c_hi - 1, 0)
    if X_TMA:
        acc = _main_tma(acc, x_desc, qf_ptr, sz_ptr, word_base, sz_base, row0, c_lo, c_hi, last, A_LAYOUT, BM,
                        PIPELINE, WARPS, CHUNKS, AHEAD, SZ_EVERY)
    else:
        acc = _main(acc, x_ptr, qf_ptr, sz_ptr, word_base, sz_base, row0, M, stride_xm, c_lo, c_hi, last, A_LAYOUT,
                    BM, PIPELINE, X_AHEAD, WARPS, CHUNKS, AHEAD, X_CHUNKS, SZ_EVERY)
    _epilogue(acc, out_ptr, ws_ptr, count_ptr, M, NB, stride_om, col_set, row0, split, pid, COLS, BM, SPLIT_K, SILU,
              WARPS, ACC_LAYOUT)


@_gluon_jit
def _main(acc, x_ptr, qf_ptr, sz_ptr, word_base, sz_base, row0, M, stride_xm, c_lo, c_hi, last,
          A_LAYOUT: gl.constexpr, BM: gl.constexpr, PIPELINE: gl.constexpr, X_AHEAD: gl.constexpr,
          WARPS: gl.constexpr, CHUNKS: gl.constexpr, AHEAD: gl.constexpr, X_CHUNKS: gl.constexpr,
          SZ_EVERY: gl.constexpr):
    """The main loop with x stored by the threads (`_pass`)."""
    if X_AHEAD:
        x_rows = _x_rows(row0, M, stride_xm // 2, BM, WARPS)
    else:
        x_rows = (row0, M, stride_xm // 2)
    x32 = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    x_bufs = ()
    for i in gl.static_range(2 * X_CHUNKS):  # two slots of X_CHUNKS chunks of x
        x_bufs = x_bufs + (gl.allocate_shared_memory(gl.int32, [BM, 32], X_SMEM32),)
    ring, sring = _fill_rings(qf_ptr, sz_ptr, word_base, sz_base, c_lo, last, CHUNKS, AHEAD, SZ_EVERY)
    xr = (_x_get(x32, x_rows, gl.minimum(c_lo, last), X_AHEAD, WARPS),
          _x_get(x32, x_rows, gl.minimum(c_lo + 1, last), X_AHEAD, WARPS))
    # the first pass peeled off: every path to the loop's end has issued a wgmma (an empty split adds zeros), which
    # keeps ptxas from serializing the async wgmmas (C7515: accumulators defined by other instructions)
    acc, ring, sring, xr = _pass(acc, ring, sring, xr, c_lo, c_hi, last, x_bufs, x32, x_rows, qf_ptr, sz_ptr,
                                 word_base, sz_base, A_LAYOUT, BM, PIPELINE, X_AHEAD, WARPS, CHUNKS, AHEAD, X_CHUNKS,
                                 SZ_EVERY)
    for c in range(c_lo + AHEAD, c_hi, AHEAD):  # AHEAD chunks a pass (those past c_hi add nothing)
        acc, ring, sring, xr = _pass(acc, ring, sring, xr, c, c_hi, last, x_bufs, x32, x_rows, qf_ptr, sz_ptr,
                                     word_base, sz_base, A_LAYOUT, BM, PIPELINE, X_AHEAD, WARPS, CHUNKS, AHEAD,
                                     X_CHUNKS, SZ_EVERY)
    if PIPELINE:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    return acc


@_gluon_jit
def _main_tma(acc, x_desc, qf_ptr, sz_ptr, word_base, sz_base, row0, c_lo, c_hi, last, A_LAYOUT: gl.constexpr,
              BM: gl.constexpr, PIPELINE: gl.constexpr, WARPS: gl.constexpr, CHUNKS: gl.constexpr,
              AHEAD: gl.constexpr, SZ_EVERY: gl.constexpr):
    """The main loop with x by TMA (`_pass_tma`): two sets of AHEAD stages, a pass on one while the other fills;
    passes go in pairs (set 0, set 1), so a split of an odd number of passes runs one pass of zeroed scales."""
    xs0 = ()
    xs1 = ()
    f0 = ()
    f1 = ()
    for i in gl.static_range(AHEAD):
        xs0 = xs0 + (gl.allocate_shared_memory(gl.float16, [BM, 64], X_SMEM),)
        xs1 = xs1 + (gl.allocate_shared_memory(gl.float16, [BM, 64], X_SMEM),)
        b0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        b1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(b0, count=1)
        mbarrier.init(b1, count=1)
        f0 = f0 + (b0,)
        f1 = f1 + (b1,)
    fence_async_shared()
    _barrier()  # the barriers are initialized before any thread waits on them
    _x_tma_set(x_desc, xs0, f0, row0, c_lo, last, BM, AHEAD)
    ring, sring = _fill_rings(qf_ptr, sz_ptr, word_base, sz_base, c_lo, last, CHUNKS, AHEAD, SZ_EVERY)
    # the first pair peeled off (as `_main`'s first pass: every path has issued a wgmma, no C7515)
    acc, ring, sring = _pair_tma(acc, ring, sring, c_lo, c_hi, last, xs0, f0, xs1, f1, 0, x_desc, row0, qf_ptr,
                                 sz_ptr, word_base, sz_base, A_LAYOUT, BM, PIPELINE, WARPS, CHUNKS, AHEAD, SZ_EVERY)
    for c in range(c_lo + 2 * AHEAD, c_hi, 2 * AHEAD):
        acc, ring, sring = _pair_tma(acc, ring, sring, c, c_hi, last, xs0, f0, xs1, f1,
                                     ((c - c_lo) // (2 * AHEAD)) & 1, x_desc, row0, qf_ptr, sz_ptr, word_base,
                                     sz_base, A_LAYOUT, BM, PIPELINE, WARPS, CHUNKS, AHEAD, SZ_EVERY)
    if PIPELINE:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    pairs = gl.maximum(gl.cdiv(c_hi - c_lo, 2 * AHEAD), 1)
    for i in gl.static_range(AHEAD):  # set 0's last fill (by the last pass) lands before the program ends
        mbarrier.wait(f0[i], pairs & 1)
    return acc


@_gluon_jit
def _epilogue(acc, out_ptr, ws_ptr, count_ptr, M, NB, stride_om, col_set, row0, split, pid, COLS: gl.constexpr,
              BM: gl.constexpr, SPLIT_K: gl.constexpr, SILU: gl.constexpr, WARPS: gl.constexpr,
              ACC_LAYOUT: gl.constexpr):
    """acc -> out (SPLIT_K 1), or the split's partials and, in the last split to arrive, their sum in split order."""
    if SPLIT_K == 1:
        _store_out(acc, out_ptr, M, stride_om, NB, col_set, row0, BM, SILU, WARPS)
    else:
        ri = gl.arange(0, COLS, layout=gl.SliceLayout(1, ACC_LAYOUT))
        ci = gl.arange(0, BM, layout=gl.SliceLayout(0, ACC_LAYOUT))
        idx = ri[:, None] * BM + ci[None, :]
        gl.store(ws_ptr + (split * gl.num_programs(0) + pid) * (COLS * BM) + idx, acc)
        _barrier()  # every thread's partials are written before the counter says so
        counter = count_ptr + pid
        if gl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            total = gl.zeros([COLS, BM], gl.float32, ACC_LAYOUT)
            for s in gl.static_range(SPLIT_K):
                total += gl.load(ws_ptr + (s * gl.num_programs(0) + pid) * (COLS * BM) + idx, cache_modifier=".cg")
            _store_out(total, out_ptr, M, stride_om, NB, col_set, row0, BM, SILU, WARPS)
            gl.atomic_xchg(counter, 0)  # ready for the next call (and the next CUDA-graph replay)


@_gluon_jit
def _store_out(acc, out_ptr, M, stride_om, NB, col_set, row0, BM: gl.constexpr, SILU: gl.constexpr,
               WARPS: gl.constexpr):
    """acc [16 WARPS, BM] (out^T of this program) -> out, rows past M and blocks past NB left alone."""
    if SILU:
        SILU_LAYOUT: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [1, WARPS], [0, 1])  # [8 WARPS, BM]
        v = gl.reshape(acc.to(gl.float16).to(gl.float32), [WARPS, 2, 8, BM])  # [w, h, g, i]
        gate, up = gl.split(gl.permute(v, (0, 2, 3, 1)))  # [w, g, i] each
        y = gl.reshape(gate / (1.0 + gl.exp(-gate)) * up, [8 * WARPS, BM])  # row 8w + g: column 8 (W set + w) + g
        y = gl.convert_layout(y.to(gl.float16), SILU_LAYOUT)
        cols = col_set * (8 * WARPS) + gl.arange(0, 8 * WARPS, layout=gl.SliceLayout(1, SILU_LAYOUT))
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(0, SILU_LAYOUT))
        ok = (cols < NB * 8)[:, None] & (rows < M)[None, :]
        gl.store(out_ptr + rows[None, :] * stride_om + cols[:, None], y, mask=ok)
    else:
        OUT_LAYOUT: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, WARPS], [0, 1])  # 8 columns a thread
        y = gl.convert_layout(acc.to(gl.float16), OUT_LAYOUT)
        cols = col_set * (16 * WARPS) + gl.arange(0, 16 * WARPS, layout=gl.SliceLayout(1, OUT_LAYOUT))
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT_LAYOUT))
        ok = (cols < NB * 16)[:, None] & (rows < M)[None, :]
        gl.store(out_ptr + rows[None, :] * stride_om + cols[:, None], y, mask=ok)


@_gluon_jit
def _x_tma_set(x_desc, xs, fulls, row0, c0, last, BM: gl.constexpr, AHEAD: gl.constexpr):
    """X_TMA: chunks c0 .. c0 + AHEAD - 1 of the kk-ordered x (rows row0 .. row0 + BM - 1; past M zeros) into a set
    of AHEAD stages, one TMA copy and one mbarrier each (chunks past the split's last read its last)."""
    for i in gl.static_range(AHEAD):
        mbarrier.expect(fulls[i], BM * 128)
        _tma_load(x_desc, [row0, gl.minimum(c0 + i, last) * 64], fulls[i], xs[i])


@_gluon_jit
def _pair_tma(acc, ring, sring, c, c_hi, last, xs0, f0, xs1, f1, phase, x_desc, row0, qf_ptr, sz_ptr, word_base,
              sz_base, A_LAYOUT: gl.constexpr, BM: gl.constexpr, PIPELINE: gl.constexpr, WARPS: gl.constexpr,
              CHUNKS: gl.constexpr, AHEAD: gl.constexpr, SZ_EVERY: gl.constexpr):
    """X_TMA: two passes, chunks c .. c + 2 AHEAD - 1: the first on set 0 (set 1 filling), the second on set 1
    (set 0 filling); `phase` the parity of this pair's fills."""
    acc, ring, sring = _pass_tma(acc, ring, sring, c, c_hi, last, xs0, f0, xs1, f1, phase, x_desc, row0, qf_ptr,
                                 sz_ptr, word_base, sz_base, A_LAYOUT, BM, PIPELINE, WARPS, CHUNKS, AHEAD, SZ_EVERY)
    return _pass_tma(acc, ring, sring, c + AHEAD, c_hi, last, xs1, f1, xs0, f0, phase, x_desc, row0, qf_ptr, sz_ptr,
                     word_base, sz_base, A_LAYOUT, BM, PIPELINE, WARPS, CHUNKS, AHEAD, SZ_EVERY)


@_gluon_jit
def _pass_tma(acc, ring, sring, c, c_hi, last, xs, fulls, xs_next, fulls_next, phase, x_desc, row0, qf_ptr, sz_ptr,
              word_base, sz_base, A_LAYOUT: gl.constexpr, BM: gl.constexpr, PIPELINE: gl.constexpr,
              WARPS: gl.constexpr, CHUNKS: gl.constexpr, AHEAD: gl.constexpr, SZ_EVERY: gl.constexpr):
    """X_TMA: chunks c .. c + AHEAD - 1 with x from the stage set xs (filled by TMA a pass ago; `phase` the
    parity of its fill), after one barrier that frees the other set (every warpgroup's wgmmas of the pass before
    are done) and the TMA copies that refill it with the next pass's chunks. Inside a pass the warpgroups do not
    wait for each other. Words and scales: the register ring, as `_pass`."""
    if PIPELINE:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])  # this warpgroup's wgmmas of the other set
    _barrier()  # ... and every other warpgroup's
    _x_tma_set(x_desc, xs_next, fulls_next, row0, c + AHEAD, last, BM, AHEAD)
    for i in gl.static_range(AHEAD):
        mbarrier.wait(fulls[i], phase)
        zz, ss = sring[i // SZ_EVERY]
        a = _a_tile(ring[i], zz, gl.where(c + i < c_hi, ss, 0), A_LAYOUT, WARPS)
        b = xs[i].permute((1, 0))  # [64, BM]: x^T, K-major
        if PIPELINE:
            acc = warpgroup_mma(a, b, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
        else:
            acc = warpgroup_mma(a, b, acc)
        ring, sring = _refill_rings(ring, sring, i, gl.minimum(c + i + AHEAD, last), qf_ptr, sz_ptr, word_base,
                                    sz_base, CHUNKS, SZ_EVERY)
    return acc, ring, sring


# ----------------------------------------------------------------------------- the emulation (torch, CPU)


def _halves(words: torch.Tensor) -> torch.Tensor:
    """int64 [...] holding 32-bit patterns -> float16 [..., 2] (low half first)."""
    w32 = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return w32.contiguous().view(torch.int16).view(torch.float16).reshape(*words.shape, 2)


def dequant_emulated(words: torch.Tensor, zz: torch.Tensor, ss: torch.Tensor) -> list[torch.Tensor]:
    """`_DEQUANT_PTX` on int32 words and their rows' (zz, ss), instruction by instruction: the 8 float16 outputs
    o = 0..7 (each shaped like words)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    zh_, sh_ = _halves(zz.to(torch.int64) & 0xFFFFFFFF), _halves(ss.to(torch.int64) & 0xFFFFFFFF)
    zl, zh = zh_[..., 0:1], zh_[..., 1:2]  # prmt 0x1010 / 0x3232: one half twice
    sl, sh = sh_[..., 0:1], sh_[..., 1:2]
    regs = []
    for s2 in range(2):
        src = w >> 8 if s2 else w  # shr.u32
        lo = _halves((src & 0x000F000F) | 0x64006400)  # lop3 0xea: (a & b) | c
        hi = _halves((src & 0x00F000F0) | 0x64006400)
        a_lo = ((lo - zl) * sl).half()  # sub.f16x2 (exact), mul.rn.f16x2 (fp16 operands: the product rounds once)
        a_hi = ((hi.float() * 0.0625 + zh.float()).half() * sh).half()  # fma.rn.f16x2 (exact here), mul.rn.f16x2
        regs += [a_lo, a_hi]  # a_r, r = h + 2 s2
    return [regs[o // 2][..., o % 2] for o in range(8)]  # mov.b32 {$2r, $2r + 1}, a_r


def a_tile_emulated(q: list[torch.Tensor], a_view=A_VIEW, a_perm=A_PERM) -> torch.Tensor:
    """`_a_tile`'s joins and view/permute on the 8 dequant outputs ([..., 8 W, 16] each, W warps) -> [..., 16 W,
    64]."""
    join = lambda a, b: torch.stack((a, b), dim=-1)  # noqa: E731 -- gl.join: a new last dimension
    t00, t01, t10, t11 = join(q[0], q[4]), join(q[1], q[5]), join(q[2], q[6]), join(q[3], q[7])
    v = join(join(t00, t10), join(t01, t11))  # [..., 32, 16, s2, h, s1]
    lead, warps = v.shape[:-5], v.shape[-5] // 8
    v = v.reshape(*lead, warps, *a_view[1:]).permute(*range(len(lead)), *(len(lead) + p for p in a_perm))
    return v.reshape(*lead, 16 * warps, 64)


def x_tile_emulated(xv: torch.Tensor, x_view=X_VIEW, x_perm=X_PERM) -> torch.Tensor:
    """`_x_tile` on x [BM, 64] float16 (k order) -> [BM, 64] in kk order (pairs moved whole, as the int32 view)."""
    bm = xv.shape[0]
    pairs = xv.reshape(bm, 32, 2)
    return pairs.reshape(bm, *x_view, 2).permute(*x_perm, len(x_perm)).reshape(bm, 64)


def emulate(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int, *, rows: int = 64,
            split_k: int = 1, silu_mul: bool = False, warpgroups: int = 1, ahead: int = 2, x_chunks: int = 1,
            a_view=A_VIEW, a_perm=A_PERM, x_view=X_VIEW, x_perm=X_PERM) -> torch.Tensor:
    """What `w4a16_wgmma_triton` computes, replayed in torch from the kernel's own index arithmetic: per program
    (column set, row block, split) the words gathered as [32, 16] (row 8w + g, column 4t + j), the dequant's bit
    operations, the joins and tables into the A tile, x permuted into kk order, A @ B in float32 per chunk, the
    split partials summed in split order, the epilogue's row -> column mapping; a split runs whole passes of
    `ahead` chunks (at least one), a chunk from c_hi on reading chunk c_hi - 1 with its scale zeroed. The tables
    can be swapped (the tests check that a wrong one fails)."""
    check_args(x, qfrag, sz, group_size, rows, split_k, silu_mul, warpgroups, ahead, x_chunks)
    nb, n_chunks, _ = qfrag.shape
    m, k = x.shape
    n_groups, chunks_per_group = k // group_size, group_size // CHUNK
    warps = 4 * warpgroups
    sets = -(-nb // warps)
    out = torch.zeros(m, nb * (8 if silu_mul else 16), dtype=torch.float16)
    r = torch.arange(8 * warps)
    blk = torch.clamp(torch.arange(sets)[:, None] * warps + r // 8, max=nb - 1)  # [sets, 8 W]
    g = r % 8
    flat_q, flat_sz = qfrag.reshape(-1), sz.reshape(-1)
    run = -(-n_groups // split_k)
    for row0 in range(0, m, rows):
        xr = x[torch.clamp(torch.arange(row0, row0 + rows), max=m - 1)].half()  # rows past M: row M - 1
        total = torch.zeros(sets, 16 * warps, rows)
        for split in range(split_k):
            acc = torch.zeros(sets, 16 * warps, rows)
            c_lo = min(split * run, n_groups) * chunks_per_group
            c_hi = min(split * run + run, n_groups) * chunks_per_group
            last = max(c_hi - 1, 0)
            passes = max(-(-(c_hi - c_lo) // ahead), 1)  # the first pass peeled: it runs even when empty
            for c_run in range(c_lo, c_lo + passes * ahead):
                c = min(c_run, last)
                word_idx = (blk * n_chunks * 128 + 16 * g)[..., None] + torch.arange(16) + c * 128  # [sets, 8W, 16]
                words = flat_q[word_idx]
                sz_idx = (blk * n_groups * 8 + g) * 2 + (c // chunks_per_group) * 16  # [sets, 8 W]
                zz, ss = flat_sz[sz_idx][..., None], flat_sz[sz_idx + 1][..., None]
                ss = ss if c_run < c_hi else torch.zeros_like(ss)  # gl.where(valid, ss, 0)
                a = a_tile_emulated(dequant_emulated(words, zz, ss), a_view, a_perm)  # [sets, 16 W, 64]
                b = x_tile_emulated(xr[:, 64 * c:64 * c + 64], x_view, x_perm)  # [BM, 64]
                acc += a.float() @ b.float().t()
            total += acc  # the last split sums the partials in split order
        if silu_mul:
            v = total.half().float().reshape(sets, warps, 2, 8, rows).permute(0, 1, 3, 4, 2)  # [set, w, g, i, h]
            gate, up = v[..., 0], v[..., 1]
            y = (gate * torch.sigmoid(gate) * up).reshape(sets * 8 * warps, rows)  # row 8 (W set + w) + g
        else:
            y = total.reshape(sets * 16 * warps, rows)  # row 16 W set + r
        y = y[:out.shape[1], :min(rows, m - row0)]
        out[row0:row0 + y.shape[1]] = y.t().half()
    return out


# ----------------------------------------------------------------------------- the launcher


@functools.cache
def _available(index: int) -> bool:
    return gluon is not None and torch.cuda.get_device_capability(index) == (9, 0)


def wgmma_available(device: torch.device | None) -> bool:
    """Whether the wgmma kernel runs on `device`: a CUDA device of capability 9.0 and a Triton with Gluon."""
    if device is None or device.type != "cuda" or gluon is None or not torch.cuda.is_available():
        return False
    return _available(device.index if device.index is not None else torch.cuda.current_device())


def kk_order(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] with each 64-wide chunk's columns in the A tile's kk order (the module docstring: column kk = 16j
    + 8 s2 + 2t + s1 holds k = 16t + 4j + 2 s2 + s1), contiguous: what the X_TMA path copies as it is."""
    m, k = x.shape
    return x.reshape(m, k // 64, 4, 4, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(m, k)  # [M, c, t, j, s2, s1] -> kk


def kk_columns(k: int, device=None) -> torch.Tensor:
    """[K] int32: column c of kk_order(x) is column kk_columns(K)[c] of x, the gather a kernel writing x can do
    instead of the copy (the RMSNorm before gate/up: kernels/rmsnorm.py's `columns`)."""
    return kk_order(torch.arange(k, dtype=torch.int32, device=device).view(1, k)).view(k).contiguous()  # [K]


def check_args(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int, rows: int, split_k: int,
               silu_mul: bool, warpgroups: int = 1, ahead: int = 2, x_chunks: int = 1, x_tma: bool = False,
               x_kk: bool = False) -> None:
    """The launcher's one-line errors (shared with `emulate`)."""
    nb, chunks, lane_words = qfrag.shape
    k, n = chunks * CHUNK, nb * 16
    if x.dim() != 2 or x.shape[1] != k or lane_words != LANE_WORDS or x.shape[0] < 1:
        raise LmcError(f"w4a16_wgmma_triton needs x [M, {k}], got {tuple(x.shape)}")
    if sz.shape != (nb, k // group_size, 8, 2) or not mma_eligible(k, n, group_size, silu_mul):
        raise LmcError(f"w4a16_wgmma_triton: sz {tuple(sz.shape)} does not fit qfrag {tuple(qfrag.shape)} with "
                       f"G={group_size}")
    if rows not in ROWS:
        raise LmcError(f"w4a16_wgmma_triton: rows (x rows a program) must be one of {ROWS}, got {rows}")
    if split_k < 1:
        raise LmcError(f"w4a16_wgmma_triton: split_k must be >= 1, got {split_k}")
    if warpgroups not in WARPGROUPS:
        raise LmcError(f"w4a16_wgmma_triton: warpgroups (of 64 columns a program) must be one of {WARPGROUPS}, got "
                       f"{warpgroups}")
    if x_tma and x_chunks != 1:
        raise LmcError(f"w4a16_wgmma_triton: x_tma brings x a pass at a time: x_chunks must be 1, got {x_chunks}")
    if x_kk and not x_tma:
        raise LmcError("w4a16_wgmma_triton: x_kk (x already in kk order) is for the x_tma path only")
    if ahead not in AHEADS or x_chunks not in (1, 2) or ahead % (2 * x_chunks):
        raise LmcError(f"w4a16_wgmma_triton: ahead (chunks of words in flight) must be one of {AHEADS} and x_chunks "
                       f"(chunks of x a barrier) 1 or 2 with ahead a multiple of 2 x_chunks, got {ahead}, {x_chunks}")


def w4a16_wgmma_triton(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int, *, rows: int = 64,
                       split_k: int = 1, pipeline: bool = True, warpgroups: int = 1, ahead: int = 2,
                       x_chunks: int = 1, x_tma: bool = False, silu_mul: bool = False,
                       out: torch.Tensor | None = None, x_kk: bool = False) -> torch.Tensor:
    """x [M, K] float16 -> [M, N] (silu_mul: silu(gate) * up [M, N/2]) float16 from the mma layout on wgmma:
    programs of 64 x `warpgroups` output columns (the warpgroups share the x tile) x `rows` rows of x, split_k
    programs over the groups of K (the last to finish sums in split order); pipeline: asynchronous wgmma over two
    x buffers; ahead: chunks of words and scales in flight a warp (2, 4, 8); x_chunks: chunks of x stored to shared
    memory a barrier (1, 2); x_tma: x permuted into kk order (`kk_order`) and brought by TMA, one barrier a pass
    of `ahead` chunks (x_chunks 1); x_kk: x is kk_order(x) already (written so by the kernel before: `kk_columns`),
    not copied again. Hopper (sm_90) only."""
    check_args(x, qfrag, sz, group_size, rows, split_k, silu_mul, warpgroups, ahead, x_chunks, x_tma, x_kk)
    if not (x.is_cuda and x.dtype == torch.float16 and wgmma_available(x.device)):
        raise LmcError("w4a16_wgmma_triton needs float16 x on a Hopper GPU (sm_90) and a Triton with Gluon")
    nb = qfrag.shape[0]
    m, k = x.shape
    x, out, _ = prepare_launch(x, nb * 16, silu_mul, out, True)
    row_blocks = triton.cdiv(m, rows)
    grid = (triton.cdiv(nb, 4 * warpgroups) * row_blocks, split_k)
    ws = torch.empty((split_k, grid[0], COLUMNS * warpgroups * rows), dtype=torch.float32, device=x.device) \
        if split_k > 1 else out
    counters = split_counters(x.device, grid[0]) if split_k > 1 else out
    x_desc = TensorDescriptor.from_tensor(x if x_kk else kk_order(x), [rows, 64], X_SMEM.value) if x_tma else x
    _wgmma_kernel[grid](x, x_desc, qfrag, sz, out, ws, counters, m, nb, k, x.stride(0), out.stride(0), row_blocks,
                        GROUP=group_size, BM=rows, SPLIT_K=split_k, SILU=silu_mul, PIPELINE=pipeline,
                        WARPGROUPS=warpgroups, AHEAD=ahead, X_CHUNKS=x_chunks, X_TMA=x_tma,
                        num_warps=4 * warpgroups)
    return out
