"""W4A16 for 1-16 rows of x on the tensor cores: int4 words re-laid at load time so that each lane's loaded word
dequantizes straight into its mma.sync fragment (the Marlin idea: no shared-memory round trip, no layout change).

Why: the CUDA-core GEMV (kernels/w4a16.py) spends ~24 SASS instructions per packed word (dequant, packed-float16
products, float32 sums, scale) and re-reads the weights for every 1-4 rows of x. Here a word costs 4 LOP3 + 1 SHF
+ 4 HSUB2/HFMA2 (the codes minus the zero, exact) + one HMMA.16816 per 8 rows of x (~14 instructions a word in
the loop on sm_90), and the group scale is one float32 FMA per output per group. Measured on an H200 (bench/NOTES.md,
session 15): 1.25-2.3x the GEMV at 2-8 rows, about even at 1 row, where both are bound by the bytes in flight.

The "mma fragment" layout (runtime only, made by `mma_layout` from the stored lmc-int4-k8 tensors; not a
workspace format). Output columns go in blocks of 16 (`block_columns`: plain 16b + r, or for a fused gate/up
weight the 8 gate columns 8b + r of block b in rows r < 8 and the matching up columns N/2 + 8b + r - 8 in rows
r >= 8, so that silu(gate) * up is one lane's business). K goes in chunks of 64; inside a chunk

    k = 64c + 16t + 4j + s      t = 0..3 (the lane's place in its quad), j = 0..3 (the word), s = 0..3

  qfrag int32 [N/16, K/64, 128]: element (b, c, 4l + j), lane l = 4g + t (g = 0..7), packs the 8 codes
        W[col(b, g + 8h), 64c + 16t + 4j + s]   (h = 0, 1; s = 0..3)   in nibble h + 2 (s // 2) + 4 (s % 2)
  so that LOP3 (word >> 8i) & 0x000F000F | 0x64006400 gives float16 1024 + code for (h = 0, s = 2i, 2i + 1) and
  the mask 0x00F000F0 gives 1024 + 16 code for h = 1: the four registers of the m16n8k16 A fragment of lane l
  (rows g, g + 8; mma columns 2t, 2t + 1, 2t + 8, 2t + 9 standing for s = 0, 1, 2, 3), and the B fragment of
  lane l is x[row, 64c + 16t + 4j + s] -- for word j the two pairs (s = 0, 1), (s = 2, 3): 16 bytes of x per
  lane and two words.
  sz int32 [N/16, K/G, 8, 2]: (b, group, g, 0) = float16 bits of (1024 + z_g, -(64 + z_{g+8})), (.., 1) =
        (s_g, s_{g+8}), where z_r, s_r are the zero and scale of column col(b, r) in that group.

The B fragment's column is the lane's g, so x row min(g, M - 1) rides in column g: up to 8 rows of x at the price
of one; past 8 rows each dequantized A fragment meets a second B fragment (rows 8 + g, TILES = 2). Element e of
the accumulator of lane l = 4g + t holds out[m, col(b, g + 8 (e // 2))] for m = 2t + e % 2 (+ 8 in tile 1). A warp
owns one block, or two (BLOCKS = 2), whose A fragments then share the lane's x registers. Or (rw = 2) two warps share
a block set, one taking rows 0-7 and the other rows 8-15, each with one tile: half the registers a warp, the words
read twice (the table's choice for wo and w2 at 16 rows on the H200).
Off the GPU (TRITON_INTERPRET) the kernel takes an index-arithmetic path (`ASM=False`) that gathers the same codes
from the same layout and sums in float32, so the layout, the split-K and the epilogues are checked on a CPU; the
fragment path itself is checked by the GPU tests.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from lmc.errors import LmcError
from lmc.format.int4 import unpack_lmc
from lmc.kernels.pdl import pdl_launch, pdl_wait
from lmc.kernels.split_counters import split_counters

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: nothing here is called (mma_eligible says no)
    triton = None
    tl = None

CHUNK = 64  # K per word column of a lane (4 words x 16)
LANE_WORDS = 128  # words per (block, chunk): 32 lanes x 4
MAX_ROWS = 16  # rows of x per call: the B fragment's 8 columns, twice (TILES = 2) past 8 rows


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# ----------------------------------------------------------------------------- the layout (torch, load time)


def block_columns(n: int, silu: bool) -> torch.Tensor:
    """col(b, r) as a [N/16, 16] int64 tensor: the stored column behind row r of block b."""
    b = torch.arange(n // 16)[:, None]
    r = torch.arange(16)[None, :]
    if not silu:
        return 16 * b + r
    return torch.where(r < 8, 8 * b + r, n // 2 + 8 * b + (r - 8))


def nibble(h, s):
    """The nibble of a word that holds the code of row g + 8h, k = 16t + 4j + s (the module docstring)."""
    return h + 2 * (s // 2) + 4 * (s % 2)


def mma_eligible(k: int, n: int, group_size: int, silu: bool = False) -> bool:
    """Whether a [K, N] int4 weight can take this path: whole 64-wide chunks inside whole groups, whole blocks."""
    return group_size in (64, 128) and k % group_size == 0 and n % (32 if silu else 16) == 0


def mma_layout(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(qfrag, sz) of the module docstring from lmc-int4-k8 qweight [K/8, N] int32, scales and zeros [K/G, N]
    (float16). Runs where the tensors are (the GPU at load time); transient memory ~4 bytes per weight (the
    codec's int32 unpack)."""
    kp, n = qweight.shape
    k = kp * 8
    if not mma_eligible(k, n, group_size, silu):
        raise LmcError(f"the mma layout needs G in (64, 128), K % G == 0 and N % {32 if silu else 16} == 0, got "
                       f"K={k} N={n} G={group_size}")
    codes = unpack_lmc(qweight, k).t()  # [K, N] uint8 (a view of the codec's [N, K])
    cols = block_columns(n, silu).to(qweight.device)  # [NB, 16]
    nb, chunks = n // 16, k // CHUNK
    w = codes[:, cols.reshape(-1)].reshape(chunks, 4, 4, 4, nb, 2, 8)  # [c, t, j, s, b, h, g]: row g + 8h of block b
    del codes
    qfrag = torch.zeros((nb, chunks, 8, 4, 4), dtype=torch.int32, device=qweight.device)  # [b, c, g, t, j]
    for h in range(2):
        for s in range(4):
            plane = w[:, :, :, s, :, h, :].permute(3, 0, 4, 1, 2).to(torch.int32)  # [b, c, g, t, j]
            qfrag |= plane << (4 * nibble(h, s))  # nibble 7 wraps into the sign bit
    qfrag = qfrag.reshape(nb, chunks, LANE_WORDS)

    def halves(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # float16 [..] x2 -> int32 (lo | hi << 16)
        lo = lo.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
        hi = hi.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
        return lo | (hi << 16)

    z = zeros.float()[:, cols].reshape(-1, nb, 2, 8)  # [groups, NB, h, g]
    sc = scales.float()[:, cols].reshape(-1, nb, 2, 8)
    zz = halves(1024.0 + z[:, :, 0], -(64.0 + z[:, :, 1]))  # [groups, NB, g]
    ss = halves(sc[:, :, 0], sc[:, :, 1])
    sz = torch.stack((zz, ss), dim=-1).permute(1, 0, 2, 3).contiguous()  # [NB, groups, 8, 2]
    return qfrag, sz


def mma_reference(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int,
                  silu: bool = False) -> torch.Tensor:
    """x [M, K] -> [M, N] (or silu(gate) * up [M, N/2]) in float32, decoded from the mma layout alone (the
    layout's test oracle: it reads nothing of the stored tensors)."""
    nb, chunks, _ = qfrag.shape
    k, n = chunks * CHUNK, nb * 16
    nib = torch.arange(8, device=qfrag.device, dtype=torch.int32)
    q = (qfrag.reshape(nb, chunks, 8, 4, 4)[..., None] >> (4 * nib)) & 0xF  # [b, c, g, t, j, nibble]
    h = torch.arange(2)[:, None]
    s = torch.arange(4)[None, :]
    q = q[..., nibble(h, s).reshape(-1)].reshape(nb, chunks, 8, 4, 4, 2, 4)  # [.., j, h, s]
    codes = q.permute(0, 5, 2, 1, 3, 4, 6).reshape(nb, 2, 8, k).float()  # [b, h, g, k]
    halves = sz.view(torch.int16).view(torch.float16).float().reshape(nb, -1, 8, 2, 2)  # [b, grp, g, (zz, ss), lo/hi]
    zero = torch.stack((halves[..., 0, 0] - 1024.0, -halves[..., 0, 1] - 64.0), dim=1)  # [b, h, grp, g]
    scale = torch.stack((halves[..., 1, 0], halves[..., 1, 1]), dim=1)
    zero = zero.permute(0, 1, 3, 2).repeat_interleave(group_size, dim=-1)  # [b, h, g, K]
    scale = scale.permute(0, 1, 3, 2).repeat_interleave(group_size, dim=-1)
    w = ((codes - zero) * scale).reshape(n, k)  # [N', K], rows in block order (b, h, g)
    y = x.float() @ w.t()  # [M, N'], column (b, h, g)
    if not silu:
        return y
    y = y.reshape(-1, nb, 2, 8)
    gate, up = y[:, :, 0].reshape(-1, n // 2), y[:, :, 1].reshape(-1, n // 2)
    return gate * torch.sigmoid(gate) * up


# ----------------------------------------------------------------------------- the kernel


def _group_ptx(chunks: int, tiles: int, blocks: int) -> str:
    """PTX of `_mma_group`: $0 .. $(4BT - 1) the new accumulators (block-major, then tile: B = blocks, T = tiles),
    then the old ones, then per chunk each block's 4 words and each tile's 8 x pairs (4 for words 0-1, 4 for words
    2-3), then each block's 4 sz elements (zz, ss, zz, ss). Each word is dequantized once and multiplied by every
    tile's B fragment; with two blocks both share the x registers."""
    per_chunk = 4 * blocks + 8 * tiles
    base = 8 * blocks * tiles
    chunk0 = [base + per_chunk * c for c in range(chunks)]
    sz = [base + per_chunk * chunks + 4 * u for u in range(blocks)]
    d = [[[f"d{u}{v}_{i}" for i in range(4)] for v in range(tiles)] for u in range(blocks)]
    lines = [".reg .b32 w, lo, hi, a0, a1, a2, a3, s16;", ".reg .f32 zero, fs0, fs1;",
             ".reg .b32 " + ", ".join(f"zl{u}, zh{u}" for u in range(blocks)) + ";",
             ".reg .f32 " + ", ".join(r for blk in d for regs in blk for r in regs) + ";", ".reg .b16 sl, sh;",
             "mov.b32 s16, 0x2C002C00;", "mov.f32 zero, 0f00000000;"]
    for u in range(blocks):
        lines += [f"prmt.b32 zl{u}, ${sz[u]}, ${sz[u]}, 0x1010;", f"prmt.b32 zh{u}, ${sz[u]}, ${sz[u]}, 0x3232;"]
    for c in range(chunks):
        for j in range(4):
            for u in range(blocks):
                word = f"${chunk0[c] + 4 * u + j}"
                for i, src in ((0, word), (1, "w")):
                    if i == 1:
                        lines.append(f"shr.u32 w, {word}, 8;")
                    lines += [f"lop3.b32 lo, {src}, 0x000f000f, 0x64006400, 0xea;",
                              f"lop3.b32 hi, {src}, 0x00f000f0, 0x64006400, 0xea;",
                              f"sub.f16x2 a{2 * i}, lo, zl{u};", f"fma.rn.f16x2 a{2 * i + 1}, hi, s16, zh{u};"]
                for v in range(tiles):
                    xq = chunk0[c] + 4 * blocks + 8 * v + 2 * j  # pairs (s = 0, 1) and (s = 2, 3) of word j, tile v
                    acc = "{zero, zero, zero, zero}" if c == 0 and j == 0 else "{" + ", ".join(d[u][v]) + "}"
                    lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{', '.join(d[u][v])}}}, "
                                 f"{{a0, a1, a2, a3}}, {{${xq}, ${xq + 1}}}, {acc};")
    for u in range(blocks):
        lines += [f"mov.b32 {{sl, sh}}, ${sz[u] + 1};", "cvt.f32.f16 fs0, sl;", "cvt.f32.f16 fs1, sh;"]
        for v in range(tiles):
            for i in range(4):
                out = 4 * (u * tiles + v) + i
                lines.append(f"fma.rn.f32 ${out}, {d[u][v][i]}, {'fs0' if i < 2 else 'fs1'}, "
                             f"${4 * blocks * tiles + out};")
    return "{\n" + "\n".join(lines) + "\n}"


def _group_io(chunks: int, tiles: int, blocks: int) -> str:
    n_acc = 4 * blocks * tiles
    return ",".join(["=f"] * n_acc + ["f"] * n_acc + ["r"] * ((4 * blocks + 8 * tiles) * chunks + 4 * blocks))


_COMBOS = ((1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 2, 1), (2, 1, 2), (2, 2, 2))  # (chunks, tiles, blocks)
_GROUP_PTX = {c: tl.constexpr(_group_ptx(*c)) for c in _COMBOS} if tl is not None else {}
_GROUP_IO = {c: tl.constexpr(_group_io(*c)) for c in _COMBOS} if tl is not None else {}
_PTX_111, _PTX_121, _PTX_211, _PTX_221, _PTX_212, _PTX_222 = (_GROUP_PTX.get(c) for c in _COMBOS)
_IO_111, _IO_121, _IO_211, _IO_221, _IO_212, _IO_222 = (_GROUP_IO.get(c) for c in _COMBOS)


@_jit
def _mma_group(accs, wa, wb, x0, x1, CHUNKS: tl.constexpr, TILES: tl.constexpr, BLOCKS: tl.constexpr):
    """accs + scale * (codes - zero) @ x over one group, per accumulator element (GPU only; pack=4: each call is one
    lane's 4 accumulators per (block, tile)). accs = (block 0 tile 0, block 0 tile 1, block 1 tile 0, block 1
    tile 1); wa, wb = (words of chunk 0, words of chunk 1, sz) of block 0 and 1; x0, x1 = (xa, xb, ya, yb) of
    chunk 0 and 1 (ya, yb: tile 1's). Entries a configuration does not use come back as they went in."""
    a00, a01, a10, a11 = accs
    if BLOCKS == 2:
        if TILES == 2:
            a00, a01, a10, a11 = tl.inline_asm_elementwise(
                asm=_PTX_222, constraints=_IO_222,
                args=[a00, a01, a10, a11, wa[0], wb[0], x0[0], x0[1], x0[2], x0[3], wa[1], wb[1], x1[0], x1[1],
                      x1[2], x1[3], wa[2], wb[2]],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            a00, a10 = tl.inline_asm_elementwise(
                asm=_PTX_212, constraints=_IO_212,
                args=[a00, a10, wa[0], wb[0], x0[0], x0[1], wa[1], wb[1], x1[0], x1[1], wa[2], wb[2]],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    elif CHUNKS == 2:
        if TILES == 2:
            a00, a01 = tl.inline_asm_elementwise(
                asm=_PTX_221, constraints=_IO_221,
                args=[a00, a01, wa[0], x0[0], x0[1], x0[2], x0[3], wa[1], x1[0], x1[1], x1[2], x1[3], wa[2]],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            a00 = tl.inline_asm_elementwise(
                asm=_PTX_211, constraints=_IO_211, args=[a00, wa[0], x0[0], x0[1], wa[1], x1[0], x1[1], wa[2]],
                dtype=tl.float32, is_pure=True, pack=4)
    else:
        if TILES == 2:
            a00, a01 = tl.inline_asm_elementwise(
                asm=_PTX_121, constraints=_IO_121, args=[a00, a01, wa[0], x0[0], x0[1], x0[2], x0[3], wa[2]],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            a00 = tl.inline_asm_elementwise(
                asm=_PTX_111, constraints=_IO_111, args=[a00, wa[0], x0[0], x0[1], wa[2]], dtype=tl.float32,
                is_pure=True, pack=4)
    return a00, a01, a10, a11


@_jit
def _gather_group(qf_ptr, x_ptr, sz_ptr, b, grp, g, e, out_row, stride_xm, n_chunks, n_groups,
                  CHUNKS: tl.constexpr):
    """The interpreter's path: each accumulator element (row g + 8h, h = e // 2) gathers its row's codes of group
    grp from the layout, subtracts the zero and multiplies by its x row in float32: sum_k (code - z) x, and the
    row's scale."""
    h = e // 2
    kk = tl.arange(0, 64)  # [64] k inside a chunk: 16t + 4j + s
    s = kk % 4
    nib = h[:, None] + 2 * (s // 2)[None, :] + 4 * (s % 2)[None, :]  # [L, 64]: nibble(h, s)
    sz_off = (b * n_groups + grp) * 16 + 2 * g  # [L]: the (zz, ss) of row g's lane quad
    zz = tl.load(sz_ptr + sz_off)
    ss = tl.load(sz_ptr + sz_off + 1)
    zero = tl.where(h == 0, _pair_half(zz, h) - 1024.0, -_pair_half(zz, h) - 64.0)  # [L]
    scale = _pair_half(ss, h)  # [L]
    part = tl.zeros(e.shape, dtype=tl.float32)
    for cc in tl.static_range(CHUNKS):
        c = grp * CHUNKS + cc + 0 * e  # [L] (grp may be per element)
        word_off = (b * n_chunks + c)[:, None] * 128 + 4 * (4 * g[:, None] + (kk // 16)[None, :]) \
            + ((kk // 4) % 4)[None, :]  # [L, 64]: word j of lane 4g + t, k = 16t + 4j + s
        code = ((tl.load(qf_ptr + word_off) >> (4 * nib)) & 0xF).to(tl.float32)  # [L, 64]
        xk = tl.load(x_ptr + out_row[:, None] * stride_xm + (c * 64)[:, None] + kk[None, :]).to(tl.float32)  # [L, 64]
        part += tl.sum((code - zero[:, None]) * xk, axis=1)
    return part * scale


@_jit
def _pair_half(word, hi):
    """float16 half hi (0 or 1, per element) of int32 words, as float32."""
    bits = tl.where(hi == 1, (word >> 16) & 0xFFFF, word & 0xFFFF)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@_jit
def _w4a16_mma_kernel(x_ptr, qf_ptr, sz_ptr, out_ptr, ws_ptr, count_ptr, M, NB, K, stride_xm, stride_om,
                      GROUP: tl.constexpr, WARPS: tl.constexpr, SPLIT_K: tl.constexpr, SILU: tl.constexpr,
                      BUFFERS: tl.constexpr, TILES: tl.constexpr, BLOCKS: tl.constexpr, KW: tl.constexpr,
                      STAGES: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr, RW: tl.constexpr = 1):
    """Program (pid, split): BLOCKS column blocks per KW x RW warps, (pid * WARPS / (KW RW) + w // (KW RW)) *
    BLOCKS + u, over the split-th run of groups, of which warp w takes every KW-th from w % KW on (KW > 1: the
    warps' sums meet in shared memory at the end, a split-K with no counter and no partials in global memory).
    RW = 2 (row warps): warps w and w + KW share their blocks and words and take rows 0-7 and 8-15 of x (one
    8-row tile each: TILES = 1), so that 16 rows cost a warp what 8 do; both warps load the words. Per group one
    _mma_group call per lane; STAGES > 0: the pipelined loop (below); else BUFFERS groups' words and sz in flight
    (the loop unrolled per buffer, so that no register holding a load in flight is copied); x, an L1 hit after the
    first warp, is loaded at use. SPLIT_K > 1: float32 fragments to ws, the last split to arrive sums them in split order
    (deterministic) and writes out (lmc.kernels.split_counters)."""
    L: tl.constexpr = 128 * WARPS
    CHUNKS: tl.constexpr = GROUP // 64
    pid = tl.program_id(0)
    split = tl.program_id(1)
    idx = tl.arange(0, L)  # [L] accumulator / word element of this program
    e = idx % 4
    lane = (idx // 4) % 32
    g = lane // 4
    t = lane % 4
    kp = (idx // 128) % KW  # [L] the warp's place among the KW warps of its blocks
    r8 = 8 * ((idx // (128 * KW)) % RW)  # [L] the warp's first row of x (RW = 2: 0 or 8)
    b0 = (pid * (WARPS // (KW * RW)) + idx // (128 * KW * RW)) * BLOCKS  # [L] the warp's first block
    ba = tl.minimum(b0, NB - 1)  # a missing block reads the last one; nothing of it is stored
    bb = tl.minimum(b0 + BLOCKS - 1, NB - 1)  # the warp's second block (its first again with BLOCKS == 1)
    n_chunks = K // 64
    n_groups = K // GROUP
    run = tl.cdiv(n_groups, SPLIT_K)
    g_first = split * run
    g_last = tl.minimum(n_groups, g_first + run) - 1
    # B fragment column g of tile v carries x row 8v + g; accumulator element e of lane (g, t) is column 2t + e % 2
    rows = (tl.minimum(r8 + 2 * t + e % 2, M - 1), tl.minimum(8 + 2 * t + e % 2, M - 1))  # [L] x2: per tile
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    x_bases = (tl.minimum(r8 + g, M - 1) * (stride_xm // 2) + 8 * t + e,  # [L] int32 pairs: the lane's 16 bytes of x
               tl.minimum(8 + g, M - 1) * (stride_xm // 2) + 8 * t + e)  # per chunk (xa; xb at +4), per tile
    bases = (ba * n_chunks * 128 + idx % 128, (ba * n_groups * 8 + g) * 2 + e % 2,  # block 0: words, (zz, ss)
             bb * n_chunks * 128 + idx % 128, (bb * n_groups * 8 + g) * 2 + e % 2)  # block 1
    zero = tl.zeros((L,), dtype=tl.float32)
    accs = (zero, zero, zero, zero)  # (block, tile): (0, 0), (0, 1), (1, 0), (1, 1)
    first = g_first + kp  # [L] the warp's first group; its i-th is first + KW i
    if STAGES > 0:  # Triton's software pipeliner streams the words through a ring of STAGES groups in shared
        # memory (cp.async). The ring's first STAGES - 1 groups are copied in the loop's prologue, before the PDL
        # wait, which the first iteration does: with STAGES past the groups of a warp, its whole share of the words
        # lands on chip while the kernel before runs (weights are constant data: the PDL contract allows it). x
        # and sz are loaded at use by inline PTX the pipeliner leaves alone (x volatile: it stays after the wait).
        # The pipeliner reorders a loop's body, so the wait's order is made a data dependency: x's addresses
        # add the zero the wait returns (first iteration; carried after).
        after_wait = e * 0  # [L] int32
        if not ASM:  # the index path (bfloat16 x on a GPU) loads x with tl.load: it waits before the loop
            pdl_wait(PDL)
        for step in tl.range(g_first, g_last + 1, KW, num_stages=STAGES):
            if step == g_first:
                after_wait = _pdl_wait_zero(e, PDL and ASM)
            grp = step + kp  # [L] the warp's group (past g_last: adds nothing)
            buf = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(grp, g_last), CHUNKS, BLOCKS, OPAQUE=ASM)
            accs = _group_step(accs, buf, grp, g_last, qf_ptr, x_ptr, x32, sz_ptr,
                               (x_bases[0] + after_wait, x_bases[1] + after_wait), rows, ba, bb, g, e, stride_xm,
                               n_chunks, n_groups, CHUNKS, TILES, BLOCKS, ASM, OPAQUE=ASM)
        pdl_wait(PDL)  # the stores after it (and a split with no group); free once the wait has returned
    else:
        accs = _buffered_groups(accs, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, bases, ba, bb, g, e, first, g_first,
                                g_last, stride_xm, n_chunks, n_groups, CHUNKS, TILES, BLOCKS, KW, BUFFERS, ASM, PDL)
    accs = (_warp_sum(accs[0], WARPS, KW), _warp_sum(accs[1], WARPS, KW), _warp_sum(accs[2], WARPS, KW),
            _warp_sum(accs[3], WARPS, KW))
    _mma_finish(accs, out_ptr, ws_ptr, count_ptr, M, stride_om, NB, pid, split, tl.arange(0, L // KW), WARPS // KW,
                SPLIT_K, SILU, TILES, BLOCKS, RW)


@_jit
def _buffered_groups(accs, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, bases, ba, bb, g, e, first, g_first, g_last,
                     stride_xm, n_chunks, n_groups, CHUNKS: tl.constexpr, TILES: tl.constexpr, BLOCKS: tl.constexpr,
                     KW: tl.constexpr, BUFFERS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """The hand-unrolled main loop: BUFFERS groups' words and sz in registers, the first loaded before the PDL
    wait."""
    bufa = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(first, g_last), CHUNKS, BLOCKS)
    bufb = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(first + KW, g_last), CHUNKS, BLOCKS)
    bufc, bufd = bufa, bufa
    if BUFFERS == 4:
        bufc = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(first + 2 * KW, g_last), CHUNKS, BLOCKS)
        bufd = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(first + 3 * KW, g_last), CHUNKS, BLOCKS)
    pdl_wait(PDL)
    for step in range(g_first, g_last + 1, BUFFERS * KW):
        grp = step - g_first + first  # [L]
        accs = _group_step(accs, bufa, grp, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, ba, bb, g, e,
                           stride_xm, n_chunks, n_groups, CHUNKS, TILES, BLOCKS, ASM)
        bufa = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(grp + BUFFERS * KW, g_last), CHUNKS, BLOCKS)
        accs = _group_step(accs, bufb, grp + KW, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, ba, bb, g, e,
                           stride_xm, n_chunks, n_groups, CHUNKS, TILES, BLOCKS, ASM)
        bufb = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(grp + (BUFFERS + 1) * KW, g_last), CHUNKS, BLOCKS)
        if BUFFERS == 4:
            accs = _group_step(accs, bufc, grp + 2 * KW, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, ba, bb,
                               g, e, stride_xm, n_chunks, n_groups, CHUNKS, TILES, BLOCKS, ASM)
            bufc = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(grp + 6 * KW, g_last), CHUNKS, BLOCKS)
            accs = _group_step(accs, bufd, grp + 3 * KW, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, ba, bb,
                               g, e, stride_xm, n_chunks, n_groups, CHUNKS, TILES, BLOCKS, ASM)
            bufd = _load_group(qf_ptr, sz_ptr, bases, tl.minimum(grp + 7 * KW, g_last), CHUNKS, BLOCKS)
    return accs


@_jit
def _warp_sum(acc, WARPS: tl.constexpr, KW: tl.constexpr):
    """[128 WARPS] -> [128 WARPS / KW]: the sum over each run of KW warps (one block's K parts)."""
    if KW == 1:
        return acc
    return tl.reshape(tl.sum(tl.reshape(acc, (WARPS // KW, KW, 128)), axis=1), (128 * (WARPS // KW),))


@_jit
def _mma_finish(accs, out_ptr, ws_ptr, count_ptr, M, stride_om, NB, pid, split, idx, WARPS: tl.constexpr,
                SPLIT_K: tl.constexpr, SILU: tl.constexpr, TILES: tl.constexpr, BLOCKS: tl.constexpr,
                RW: tl.constexpr = 1):
    """Writes out (SPLIT_K == 1), or this split's fragments to ws [split, program, block, tile, L] and, in the
    last split to arrive, their sum in split order (lmc.kernels.split_counters). WARPS: the program's warps after
    the KW sum (its warps / KW; RW of them share a block set)."""
    L: tl.constexpr = 128 * WARPS
    PARTS: tl.constexpr = BLOCKS * TILES
    if SPLIT_K == 1:
        _mma_store_all(accs, out_ptr, M, stride_om, NB, pid, WARPS, SILU, TILES, BLOCKS, RW)
    else:
        mine = ws_ptr + ((split * tl.num_programs(0) + pid) * PARTS) * L + idx
        tl.store(mine, accs[0])
        if TILES == 2:
            tl.store(mine + L, accs[1])
        if BLOCKS == 2:
            tl.store(mine + TILES * L, accs[2])
            if TILES == 2:
                tl.store(mine + 3 * L, accs[3])
        tl.debug_barrier()  # every thread's partials are written before the counter says so
        counter = count_ptr + pid
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            z = tl.zeros((L,), dtype=tl.float32)
            t00, t01, t10, t11 = z, z, z, z
            for s in tl.static_range(SPLIT_K):
                theirs = ws_ptr + ((s * tl.num_programs(0) + pid) * PARTS) * L + idx
                t00 += tl.load(theirs, cache_modifier=".cg")
                if TILES == 2:
                    t01 += tl.load(theirs + L, cache_modifier=".cg")
                if BLOCKS == 2:
                    t10 += tl.load(theirs + TILES * L, cache_modifier=".cg")
                    if TILES == 2:
                        t11 += tl.load(theirs + 3 * L, cache_modifier=".cg")
            _mma_store_all((t00, t01, t10, t11), out_ptr, M, stride_om, NB, pid, WARPS, SILU, TILES, BLOCKS, RW)
            tl.atomic_xchg(counter, 0)  # ready for the next call (and the next CUDA-graph replay)


@_jit
def _mma_store_all(accs, out_ptr, M, stride_om, NB, pid, WARPS: tl.constexpr, SILU: tl.constexpr,
                   TILES: tl.constexpr, BLOCKS: tl.constexpr, RW: tl.constexpr = 1):
    _mma_store(accs[0], out_ptr, M, stride_om, NB, pid, 0, 0, WARPS, BLOCKS, SILU, RW)
    if TILES == 2:
        _mma_store(accs[1], out_ptr, M, stride_om, NB, pid, 8, 0, WARPS, BLOCKS, SILU, RW)
    if BLOCKS == 2:
        _mma_store(accs[2], out_ptr, M, stride_om, NB, pid, 0, 1, WARPS, BLOCKS, SILU, RW)
        if TILES == 2:
            _mma_store(accs[3], out_ptr, M, stride_om, NB, pid, 8, 1, WARPS, BLOCKS, SILU, RW)


@_jit
def _load_group(qf_ptr, sz_ptr, bases, grp, CHUNKS: tl.constexpr, BLOCKS: tl.constexpr, OPAQUE: tl.constexpr = False):
    """Group grp's words (a 16-byte load per lane and chunk; streamed once, so marked evict-first to leave L1 to x)
    and (zz, ss, zz, ss), per block: ((chunk 0, chunk 1, sz) of block 0, the same of block 1 (block 0's again with
    BLOCKS == 1))."""
    wa = _load_block(qf_ptr, sz_ptr, bases[0], bases[1], grp, CHUNKS, OPAQUE)
    wb = wa
    if BLOCKS == 2:
        wb = _load_block(qf_ptr, sz_ptr, bases[2], bases[3], grp, CHUNKS, OPAQUE)
    return wa, wb


@_jit
def _load_block(qf_ptr, sz_ptr, word_base, sz_base, grp, CHUNKS: tl.constexpr, OPAQUE: tl.constexpr = False):
    w0 = tl.load(qf_ptr + word_base + (grp * CHUNKS) * 128, eviction_policy="evict_first")
    w1 = tl.load(qf_ptr + word_base + (grp * CHUNKS + CHUNKS - 1) * 128, eviction_policy="evict_first")
    if OPAQUE:  # the pipelined loop: sz by a load the pipeliner leaves alone (words alone through shared memory)
        return w0, w1, _ld_sz(sz_ptr + sz_base + grp * 16)
    return w0, w1, tl.load(sz_ptr + sz_base + grp * 16)


@_jit
def _group_step(accs, buf, grp, g_last, qf_ptr, x_ptr, x32, sz_ptr, x_bases, rows, ba, bb, g, e, stride_xm, n_chunks,
                n_groups, CHUNKS: tl.constexpr, TILES: tl.constexpr, BLOCKS: tl.constexpr, ASM: tl.constexpr,
                OPAQUE: tl.constexpr = False):
    """accs plus group grp's contribution; a group past g_last (the unrolled loop's overhang) adds nothing.
    x_bases: the lane's x pairs per tile (B fragment column g); rows: the x row of each accumulator element per
    tile (the interpreter's path)."""
    valid = grp <= g_last
    grp = tl.minimum(grp, g_last)
    if ASM:
        wa, wb = buf
        keep = valid | (e % 2 == 0)  # a zero scale (ss) for the overhang
        wa = (wa[0], wa[1], tl.where(keep, wa[2], 0))
        wb = (wb[0], wb[1], tl.where(keep, wb[2], 0))
        c0 = grp * CHUNKS
        x0 = _load_x(x32, x_bases, c0, TILES, OPAQUE)
        x1 = _load_x(x32, x_bases, c0 + CHUNKS - 1, TILES, OPAQUE)
        return _mma_group(accs, wa, wb, x0, x1, CHUNKS, TILES, BLOCKS)
    a00, a01, a10, a11 = accs
    a00 += tl.where(valid, _gather_group(qf_ptr, x_ptr, sz_ptr, ba, grp, g, e, rows[0], stride_xm, n_chunks,
                                         n_groups, CHUNKS), 0.0)
    if TILES == 2:
        a01 += tl.where(valid, _gather_group(qf_ptr, x_ptr, sz_ptr, ba, grp, g, e, rows[1], stride_xm, n_chunks,
                                             n_groups, CHUNKS), 0.0)
    if BLOCKS == 2:
        a10 += tl.where(valid, _gather_group(qf_ptr, x_ptr, sz_ptr, bb, grp, g, e, rows[0], stride_xm, n_chunks,
                                             n_groups, CHUNKS), 0.0)
        if TILES == 2:
            a11 += tl.where(valid, _gather_group(qf_ptr, x_ptr, sz_ptr, bb, grp, g, e, rows[1], stride_xm,
                                                 n_chunks, n_groups, CHUNKS), 0.0)
    return a00, a01, a10, a11


@_jit
def _load_x(x32, x_bases, c, TILES: tl.constexpr, OPAQUE: tl.constexpr = False):
    """The lane's x pairs of chunk c: (xa, xb) of tile 0 (pairs 8t .. 8t + 3 and 8t + 4 .. 8t + 7), then tile 1's
    (tile 0's again with TILES == 1, unused)."""
    if OPAQUE:
        xa = _ld_x4(x32 + x_bases[0] + c * 32)
        xb = _ld_x4(x32 + x_bases[0] + c * 32 + 4)
        ya, yb = xa, xb
        if TILES == 2:
            ya = _ld_x4(x32 + x_bases[1] + c * 32)
            yb = _ld_x4(x32 + x_bases[1] + c * 32 + 4)
        return xa, xb, ya, yb
    xa = tl.load(x32 + x_bases[0] + c * 32)
    xb = tl.load(x32 + x_bases[0] + c * 32 + 4)
    ya, yb = xa, xb
    if TILES == 2:
        ya = tl.load(x32 + x_bases[1] + c * 32)
        yb = tl.load(x32 + x_bases[1] + c * 32 + 4)
    return xa, xb, ya, yb


@_jit
def _pdl_wait_zero(e, WAIT: tl.constexpr):
    """pdl_wait as inline PTX (griddepcontrol.wait, then launch_dependents: lmc.kernels.pdl), returning zeros like
    e [L] int32: values that exist only once the kernel before has completed, for addresses that must not be read
    earlier (GPU only; zeros without WAIT)."""
    if WAIT:
        return tl.inline_asm_elementwise("griddepcontrol.wait;\ngriddepcontrol.launch_dependents;\nmov.b32 $0, 0;\n"
                                         "mov.b32 $1, 0;\nmov.b32 $2, 0;\nmov.b32 $3, 0;", "=r,=r,=r,=r,r,r,r,r", [e],
                                         dtype=tl.int32, is_pure=False, pack=4)
    return e * 0


@_jit
def _ld_x4(ptr):
    """A lane's 4 consecutive int32 (16-byte aligned) by one vector load in inline PTX (GPU only): Triton's
    software pipeliner does not see it, so in the pipelined loop x stays a register load at use (an L1 hit); not
    pure, so that it is not hoisted above the PDL wait (x is the kernel before's output)."""
    return tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l,l,l,l", [ptr],
                                     dtype=tl.int32, is_pure=False, pack=4)


@_jit
def _ld_sz(ptr):
    """A lane's (zz, ss, zz, ss): one 8-byte load of the pair its elements 0, 1 point at, repeated (GPU only; not
    pipelined, as _ld_x4)."""
    return tl.inline_asm_elementwise("ld.global.v2.b32 {$0, $1}, [$4];\nmov.b32 $2, $0;\nmov.b32 $3, $1;",
                                     "=r,=r,=r,=r,l,l,l,l", [ptr], dtype=tl.int32, is_pure=True, pack=4)


@_jit
def _mma_store(acc, out_ptr, M, stride_om, NB, pid, ROW0: tl.constexpr, U: tl.constexpr, WARPS: tl.constexpr,
               BLOCKS: tl.constexpr, SILU: tl.constexpr, RW: tl.constexpr = 1):
    """Accumulator element e of lane (g, t) of warp w is out[m = ROW0 + 8 (w % RW) + 2t + e % 2,
    col(b, g + 8 (e // 2))], b the warp's block U, (pid * WARPS / RW + w // RW) * BLOCKS + U. SILU: elements 0, 1
    are gate columns 8b + g, elements 2, 3 the matching up columns (same lane): out[m, 8b + g] = silu(gate) * up,
    both rounded to out's dtype first (what the unfused silu_mul reads)."""
    dtype = out_ptr.dtype.element_ty
    if SILU:
        v = tl.reshape(acc.to(dtype).to(tl.float32), (acc.shape[0] // 4, 2, 2))  # [lanes, e // 2, e % 2]
        gate, up = tl.split(tl.permute(v, (0, 2, 1)))  # [lanes, e % 2] each
        q = tl.arange(0, acc.shape[0] // 4)[:, None]  # [lanes, 1]: warp * 32 + lane
        i = tl.arange(0, 2)[None, :]  # [1, 2]: e % 2
        lane = q % 32
        b = (pid * (WARPS // RW) + q // (32 * RW)) * BLOCKS + U
        m = ROW0 + 8 * ((q // 32) % RW) + 2 * (lane % 4) + i  # [lanes, 2]
        tl.store(out_ptr + m * stride_om + 8 * b + lane // 4, (gate * tl.sigmoid(gate) * up).to(dtype),
                 mask=(b < NB) & (m < M))
    else:
        idx = tl.arange(0, acc.shape[0])
        e = idx % 4
        lane = (idx // 4) % 32
        b = (pid * (WARPS // RW) + idx // (128 * RW)) * BLOCKS + U
        m = ROW0 + 8 * ((idx // 128) % RW) + 2 * (lane % 4) + e % 2
        tl.store(out_ptr + m * stride_om + 16 * b + lane // 4 + 8 * (e // 2), acc.to(dtype),
                 mask=(b < NB) & (m < M))


def prepare_launch(x: torch.Tensor, n: int, silu_mul: bool, out: torch.Tensor | None,
                   asm: bool | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The mma launchers' common part: (x with 16-byte aligned rows of pairs, out [M, N] or [M, N/2] (silu_mul),
    allocated if None, whether the mma.sync path runs: float16 x on CUDA; None = where it can)."""
    if out is None:
        out = torch.empty((x.shape[0], n // 2 if silu_mul else n), dtype=x.dtype, device=x.device)
    can_asm = x.is_cuda and x.dtype == torch.float16
    asm = can_asm if asm is None else asm
    if asm and not can_asm:
        raise LmcError("the mma.sync path needs float16 x on CUDA")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:  # 16-byte rows of pairs
        x = x.contiguous().clone()
    return x, out, asm


def w4a16_mma_triton(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group_size: int, *, warps: int = 4,
                     split_k: int = 1, buffers: int = 2, blocks: int = 1, kw: int = 1, stages: int = 0,
                     rw: int = 1, silu_mul: bool = False, out: torch.Tensor | None = None,
                     asm: bool | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) -> [M, N] (silu_mul: silu(gate) * up [M, N/2]) in x.dtype from the mma layout.
    `blocks` (1 or 2; 1 with G = 64) 16-column blocks a warp (two share the x registers), `warps` warps a
    program; split_k splits the groups of K over that many
    programs per block set (the last to finish sums in split order). stages 0: `buffers` groups of words in
    registers; stages >= 2: the pipelined loop, words through a shared-memory ring of that many groups, the first
    stages - 1 copied before the PDL wait. rw = 2: two warps share each block set, one for rows 0-7 of x and one for
    rows 8-15 (one tile each; both load the words). asm: the mma.sync path (float16 x
    on CUDA); None = on where it can run."""
    nb, chunks, lane_words = qfrag.shape
    k, n = chunks * CHUNK, nb * 16
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or lane_words != LANE_WORDS or not 1 <= m <= MAX_ROWS:
        raise LmcError(f"w4a16_mma_triton needs x [M <= {MAX_ROWS}, {k}], got {tuple(x.shape)}")
    if sz.shape != (nb, k // group_size, 8, 2) or not mma_eligible(k, n, group_size, silu_mul):
        raise LmcError(f"w4a16_mma_triton: sz {tuple(sz.shape)} does not fit qfrag {tuple(qfrag.shape)} with "
                       f"G={group_size}")
    x, out, asm = prepare_launch(x, n, silu_mul, out, asm)
    tiles = 1 if m <= 8 or rw == 2 else 2
    blocks = blocks if group_size == 128 else 1  # two blocks a warp: written for two chunks a group
    if kw not in (1, 2, 4) or warps % kw:
        raise LmcError(f"w4a16_mma_triton: kw (warps splitting K) must be 1, 2 or 4 and divide warps={warps}, got {kw}")
    if rw not in (1, 2) or warps % (kw * rw):
        raise LmcError(f"w4a16_mma_triton: rw (row warps) must be 1 or 2, with kw * rw dividing warps={warps}, "
                       f"got {rw}")
    grid = (triton.cdiv(nb, warps // (kw * rw) * blocks), split_k)
    ws = torch.empty((split_k, grid[0], blocks * tiles, 128 * (warps // kw)), dtype=torch.float32,
                     device=x.device) if split_k > 1 else out
    counters = split_counters(x.device, grid[0]) if split_k > 1 else out
    _w4a16_mma_kernel[grid](x, qfrag, sz, out, ws, counters, m, nb, k, x.stride(0), out.stride(0),
                            GROUP=group_size, WARPS=warps, SPLIT_K=split_k, SILU=silu_mul, BUFFERS=buffers,
                            TILES=tiles, BLOCKS=blocks, KW=kw, STAGES=stages, ASM=asm, RW=rw, num_warps=warps,
                            num_stages=1, **pdl_launch(x.device))
    return out
