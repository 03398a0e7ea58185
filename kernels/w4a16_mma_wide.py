"""W4A16 for any number of rows of x on the tensor cores (the table takes it from 16 rows), from the same load-time
"mma fragment" layout as kernels/w4a16_mma.py (its docstring has the layout): the weight words are read once per
8 x TILES rows of x.

Why a second kernel: the 1-16 row kernel keeps per-group float32 partials (fresh HMMA accumulators, scaled once
per group), which costs 4 registers per (block, tile) on top of the running sums; at 4-8 tiles and two blocks a
warp that does not fit. Here the group scale goes into the A fragment instead, as Marlin does: each word
dequantizes to float16 (code - zero) * scale (LOP3 into 1024 + code, one exact HSUB2 / HFMA2 for the zero, one
HMUL2 for the scale: one rounding, the same value the dequant GEMM makes) and multiplies every tile's B fragment
straight into the running float32 accumulators. A warp owns BLOCKS 16-column blocks x TILES 8-row tiles of the
output: BLOCKS x TILES x 4 accumulator registers a lane; each dequantized word (4 LOP3 + 1 SHF + 4 HSUB2/HFMA2 +
4 HMUL2) feeds TILES HMMA.16816, one asm statement each, so that consecutive HMMAs use different accumulators. A
program covers 8 x TILES rows (`ROW_BLOCKS` programs per column set, adjacent in launch order so that they share
the words in L2); split-K as in the small kernel (the last split sums in split order). Measured on an H200
(bench/NOTES.md, session 16): 229-274 TFLOP/s at 64-256 rows, half of fp16 cuBLAS's wgmma; the table takes it for
the gate/up weight at 16 and 64 rows.

Off the GPU (TRITON_INTERPRET) the kernel gathers the same codes by index arithmetic (w4a16_mma._gather_group,
float32, the scale after the sum), so the layout, the row blocks, the split-K and both epilogues are checked on a
CPU; the fragment path itself is checked by the GPU tests.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from lmc.errors import LmcError
from lmc.kernels.pdl import pdl_launch, pdl_wait
from lmc.kernels.split_counters import split_counters
from lmc.kernels.w4a16_mma import (CHUNK, LANE_WORDS, _gather_group, _jit, _load_block, _mma_store, mma_eligible,
                                   prepare_launch)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: nothing here is called (mma_eligible says no)
    triton = None
    tl = None

TILES = (1, 2, 4, 8)  # 8-row tiles of x a program: 8 to 64 rows per read of the words


def _dequant_ptx() -> str:
    """$0 .. $15: the A fragments (4 registers each) of the lane's words 0-3; $16 .. $19 the words; $20 .. $23
    (zz, ss, zz, ss) of the lane's row pair (g, g + 8). Register r of word j: r = 0 / 2 the row g codes (s = 0, 1 /
    2, 3; the low / high byte pair), r = 1 / 3 row g + 8's; each (code - zero) * scale in float16."""
    lines = [".reg .b32 w, lo, hi, t, zl, zh, sl, sh, s16;",
             ".reg .b32 " + ", ".join(f"a{i}" for i in range(16)) + ";",
             "mov.b32 s16, 0x2C002C00;",  # float16 1/16 twice: (1024 + 16 code) / 16 = 64 + code
             "prmt.b32 zl, $20, $20, 0x1010;", "prmt.b32 zh, $20, $20, 0x3232;",  # 1024 + z_g, -(64 + z_g+8)
             "prmt.b32 sl, $21, $21, 0x1010;", "prmt.b32 sh, $21, $21, 0x3232;"]  # s_g, s_g+8
    for j in range(4):
        for i in range(2):  # byte pair 0 (s = 0, 1), then byte pair 1 (s = 2, 3) after a shift by 8
            src = f"${16 + j}"
            if i == 1:
                lines.append(f"shr.u32 w, {src}, 8;")
                src = "w"
            lo, hi = f"a{4 * j + 2 * i}", f"a{4 * j + 2 * i + 1}"
            lines += [f"lop3.b32 lo, {src}, 0x000f000f, 0x64006400, 0xea;",  # 1024 + code, rows g
                      f"lop3.b32 hi, {src}, 0x00f000f0, 0x64006400, 0xea;",  # 1024 + 16 code, rows g + 8
                      "sub.f16x2 t, lo, zl;", f"mul.rn.f16x2 {lo}, t, sl;",
                      "fma.rn.f16x2 t, hi, s16, zh;", f"mul.rn.f16x2 {hi}, t, sh;"]
    lines += [f"mov.b32 ${i}, a{i};" for i in range(16)]
    return "{\n" + "\n".join(lines) + "\n}"


def _mma1_ptx(pair: int) -> str:
    """One HMMA.16816: $0 .. $3 the new accumulators, $4 .. $7 the old, $8 .. $11 a word's A fragment, $12 .. $15
    the lane's x pairs (xa or xb): pair 0 takes $12, $13 (word 2h), pair 1 $14, $15 (word 2h + 1)."""
    return ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$8, $9, $10, $11}, "
            f"{{${12 + 2 * pair}, ${13 + 2 * pair}}}, {{$4, $5, $6, $7}};")


_DEQUANT_PTX = tl.constexpr(_dequant_ptx()) if tl is not None else None
_DEQUANT_IO = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 8)) if tl is not None else None
_MMA1_PTX = tuple(tl.constexpr(_mma1_ptx(p)) for p in range(2)) if tl is not None else ()
_MMA1_PTX_0, _MMA1_PTX_1 = _MMA1_PTX or (None, None)
_MMA1_IO = tl.constexpr(",".join(["=f"] * 4 + ["f"] * 4 + ["r"] * 8)) if tl is not None else None


@_jit
def _dequant(words, sz):
    """The lane's 4 words of one chunk and (zz, ss) -> 4 [L] int32 tensors: word j's A fragment (pack=4: a lane's 4
    elements of tensor j are its 4 registers)."""
    return tl.inline_asm_elementwise(asm=_DEQUANT_PTX, constraints=_DEQUANT_IO, args=[words, sz],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=4)


@_jit
def _mma1(acc, frag, xq, PAIR: tl.constexpr):
    """acc + one word's A fragment times pair PAIR of the x pairs xq (xa: words 0, 1; xb: words 2, 3)."""
    return tl.inline_asm_elementwise(asm=_MMA1_PTX_0 if PAIR == 0 else _MMA1_PTX_1, constraints=_MMA1_IO,
                                     args=[acc, frag, xq], dtype=tl.float32, is_pure=True, pack=4)


@_jit
def _prefetch_x(x_ptr, row0, grp, M, stride_xm, idx, GROUP: tl.constexpr, TILES: tl.constexpr):
    """Asks L1 for group grp's x lines of this program's rows (one 128-byte line per lane slot: 8 TILES rows x
    GROUP / 64 lines), so that the group's x loads, issued at use, do not wait on L2 (GPU only)."""
    slot = idx // 4  # pack=4: one prefetch a lane
    row = tl.minimum(row0 + slot % (8 * TILES), M - 1)
    line = (slot // (8 * TILES)) % (GROUP // 64)
    ptrs = x_ptr + row * stride_xm + grp * GROUP + line * 64  # [L] 64 float16 = one line
    tl.inline_asm_elementwise(asm="prefetch.global.L1 [$4];\nmov.b32 $0, 0;\nmov.b32 $1, 0;\nmov.b32 $2, 0;\n"
                                  "mov.b32 $3, 0;", constraints="=r,=r,=r,=r,l,l,l,l", args=[ptrs], dtype=tl.int32,
                              is_pure=False, pack=4)


@_jit
def _wide_kernel(x_ptr, qf_ptr, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_xm, stride_om, ROW_BLOCKS,
                 GROUP: tl.constexpr, WARPS: tl.constexpr, SPLIT_K: tl.constexpr, SILU: tl.constexpr,
                 TILES: tl.constexpr, BLOCKS: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr,
                 PDL: tl.constexpr):
    """Program (pid, split): column set pid // ROW_BLOCKS (BLOCKS blocks a warp: (set * WARPS + w) * BLOCKS + u),
    rows 8 TILES (pid % ROW_BLOCKS) .. + 8 TILES, over the split-th run of groups. Accumulator p = v * BLOCKS + u
    (tile v, block u); the next group's words and sz are loaded before this group's products (two in flight)."""
    L: tl.constexpr = 128 * WARPS
    CHUNKS: tl.constexpr = GROUP // 64
    PARTS: tl.constexpr = TILES * BLOCKS
    pid = tl.program_id(0)
    split = tl.program_id(1)
    col_set = pid // ROW_BLOCKS
    row0 = (pid % ROW_BLOCKS) * (8 * TILES)
    idx = tl.arange(0, L)  # [L] accumulator / word element of this program
    e = idx % 4
    lane = (idx // 4) % 32
    g = lane // 4
    t = lane % 4
    n_chunks = K // 64
    n_groups = K // GROUP
    run = tl.cdiv(n_groups, SPLIT_K)
    g_first = split * run
    g_last = tl.minimum(n_groups, g_first + run) - 1
    first = (col_set * WARPS + idx // 128) * BLOCKS  # [L] the warp's first block
    blocks = ()  # [L] per block u; a missing block reads the last one, nothing of it is stored
    bases = ()  # per block: (words, (zz, ss)) element offsets
    for u in tl.static_range(BLOCKS):
        b = tl.minimum(first + u, NB - 1)
        blocks = blocks + (b,)
        bases = bases + ((b * n_chunks * 128 + idx % 128, (b * n_groups * 8 + g) * 2 + e % 2),)
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    x_bases = ()  # per tile: the lane's x pairs (B fragment column g carries x row row0 + 8v + g)
    rows = ()  # per tile: the x row of accumulator element e (column 2t + e % 2; the interpreter's path)
    for v in tl.static_range(TILES):
        x_bases = x_bases + (tl.minimum(row0 + 8 * v + g, M - 1) * (stride_xm // 2) + 8 * t + e,)
        rows = rows + (tl.minimum(row0 + 8 * v + 2 * t + e % 2, M - 1),)
    accs = ()
    for p in tl.static_range(PARTS):
        accs = accs + (tl.zeros((L,), dtype=tl.float32),)
    buf_a = _load_blocks(qf_ptr, sz_ptr, bases, tl.minimum(g_first, g_last), CHUNKS, BLOCKS)
    buf_b = _load_blocks(qf_ptr, sz_ptr, bases, tl.minimum(g_first + 1, g_last), CHUNKS, BLOCKS)
    pdl_wait(PDL)
    for grp in range(g_first, g_last + 1, 2):
        if PREFETCH and ASM:
            _prefetch_x(x_ptr, row0, tl.minimum(grp + 1, g_last), M, stride_xm, idx, GROUP, TILES)
        accs = _wide_step(accs, buf_a, grp, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, blocks, g, e,
                          stride_xm, n_chunks, n_groups, CHUNKS, TILES, BLOCKS, ASM)
        buf_a = _load_blocks(qf_ptr, sz_ptr, bases, tl.minimum(grp + 2, g_last), CHUNKS, BLOCKS)
        if PREFETCH and ASM:
            _prefetch_x(x_ptr, row0, tl.minimum(grp + 2, g_last), M, stride_xm, idx, GROUP, TILES)
        accs = _wide_step(accs, buf_b, grp + 1, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, blocks, g, e,
                          stride_xm, n_chunks, n_groups, CHUNKS, TILES, BLOCKS, ASM)
        buf_b = _load_blocks(qf_ptr, sz_ptr, bases, tl.minimum(grp + 3, g_last), CHUNKS, BLOCKS)
    out_rows = out_ptr + row0 * stride_om  # this program's rows: M - row0 of them left
    if SPLIT_K == 1:
        _store_parts(accs, out_rows, M - row0, stride_om, NB, col_set, WARPS, SILU, TILES, BLOCKS)
    else:
        mine = ws_ptr + ((split * tl.num_programs(0) + pid) * PARTS) * L + idx
        for p in tl.static_range(PARTS):
            tl.store(mine + p * L, accs[p])
        tl.debug_barrier()  # every thread's partials are written before the counter says so
        counter = count_ptr + pid
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            sums = ()
            for p in tl.static_range(PARTS):
                total = tl.zeros((L,), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(ws_ptr + ((s * tl.num_programs(0) + pid) * PARTS + p) * L + idx,
                                     cache_modifier=".cg")
                sums = sums + (total,)
            _store_parts(sums, out_rows, M - row0, stride_om, NB, col_set, WARPS, SILU, TILES, BLOCKS)
            tl.atomic_xchg(counter, 0)  # ready for the next call (and the next CUDA-graph replay)


@_jit
def _load_blocks(qf_ptr, sz_ptr, bases, grp, CHUNKS: tl.constexpr, BLOCKS: tl.constexpr):
    """Group grp's (words of chunk 0, words of the last chunk, sz) per block."""
    out = ()
    for u in tl.static_range(BLOCKS):
        out = out + (_load_block(qf_ptr, sz_ptr, bases[u][0], bases[u][1], grp, CHUNKS),)
    return out


@_jit
def _wide_step(accs, buf, grp, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, blocks, g, e, stride_xm,
               n_chunks, n_groups, CHUNKS: tl.constexpr, TILES: tl.constexpr, BLOCKS: tl.constexpr,
               ASM: tl.constexpr):
    """accs plus group grp's products; a group past g_last (the unrolled loop's overhang) adds nothing (its scale
    is zeroed on the GPU path)."""
    valid = grp <= g_last
    grp = tl.minimum(grp, g_last)
    if ASM:
        keep = valid | (e % 2 == 0)  # (zz, ss) elements: zero the scale for the overhang
        for cc in tl.static_range(CHUNKS):
            frags = ()
            for u in tl.static_range(BLOCKS):
                frags = frags + (_dequant(buf[u][cc], tl.where(keep, buf[u][2], 0)),)
            c = grp * CHUNKS + cc
            for half in tl.static_range(2):  # words 0, 1 (x pairs xa), then 2, 3 (xb)
                xs = ()
                for v in tl.static_range(TILES):
                    xs = xs + (tl.load(x32 + x_bases[v] + c * 32 + 4 * half),)
                for pair in tl.static_range(2):  # word 2 half + pair: one HMMA per (tile, block), each its own
                    new = ()  # accumulator, so that consecutive HMMAs do not wait on each other
                    for v in tl.static_range(TILES):
                        for u in tl.static_range(BLOCKS):
                            new = new + (_mma1(accs[v * BLOCKS + u], frags[u][2 * half + pair], xs[v], pair),)
                    accs = new
        return accs
    new = ()
    for v in tl.static_range(TILES):
        for u in tl.static_range(BLOCKS):
            part = _gather_group(qf_ptr, x_ptr, sz_ptr, blocks[u], grp, g, e, rows[v], stride_xm, n_chunks,
                                 n_groups, CHUNKS)
            new = new + (accs[v * BLOCKS + u] + tl.where(valid, part, 0.0),)
    return new


@_jit
def _store_parts(accs, out_ptr, M, stride_om, NB, col_set, WARPS: tl.constexpr, SILU: tl.constexpr,
                 TILES: tl.constexpr, BLOCKS: tl.constexpr):
    for v in tl.static_range(TILES):
        for u in tl.static_range(BLOCKS):
            _mma_store(accs[v * BLOCKS + u], out_ptr, M, stride_om, NB, col_set, 8 * v, u, WARPS, BLOCKS, SILU)


def w4a16_mma_wide_triton(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int, *,
                          warps: int = 4, split_k: int = 1, blocks: int = 2, tiles: int = 8,
                          prefetch: bool = False, silu_mul: bool = False, out: torch.Tensor | None = None,
                          asm: bool | None = None) -> torch.Tensor:
    """x [M, K] (any M) -> [M, N] (silu_mul: silu(gate) * up [M, N/2]) in x.dtype from the mma layout: `tiles` 8-row
    tiles (1, 2, 4, 8) and `blocks` 16-column blocks a warp, `warps` warps a program, split_k programs per (column
    set, row block) over the groups of K; prefetch: ask L1 for the next group's x a group ahead. asm: the mma.sync
    path (float16 x on CUDA); None = on where it can run."""
    nb, chunks, lane_words = qfrag.shape
    k, n = chunks * CHUNK, nb * 16
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or lane_words != LANE_WORDS or m < 1:
        raise LmcError(f"w4a16_mma_wide_triton needs x [M, {k}], got {tuple(x.shape)}")
    if sz.shape != (nb, k // group_size, 8, 2) or not mma_eligible(k, n, group_size, silu_mul):
        raise LmcError(f"w4a16_mma_wide_triton: sz {tuple(sz.shape)} does not fit qfrag {tuple(qfrag.shape)} "
                       f"with G={group_size}")
    if tiles not in TILES or blocks not in (1, 2, 4):
        raise LmcError(f"w4a16_mma_wide_triton: tiles in {TILES} and blocks in (1, 2, 4), got {tiles}, {blocks}")
    x, out, asm = prepare_launch(x, n, silu_mul, out, asm)
    row_blocks = triton.cdiv(m, 8 * tiles)
    grid = (triton.cdiv(nb, warps * blocks) * row_blocks, split_k)
    ws = torch.empty((split_k, grid[0], tiles * blocks, 128 * warps), dtype=torch.float32, device=x.device) \
        if split_k > 1 else out
    counters = split_counters(x.device, grid[0]) if split_k > 1 else out
    _wide_kernel[grid](x, qfrag, sz, out, ws, counters, m, nb, k, x.stride(0), out.stride(0), row_blocks,
                       GROUP=group_size, WARPS=warps, SPLIT_K=split_k, SILU=silu_mul, TILES=tiles, BLOCKS=blocks,
                       PREFETCH=prefetch, ASM=asm, num_warps=warps, num_stages=1, **pdl_launch(x.device))
    return out
