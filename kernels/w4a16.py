"""W4A16 matrix multiply: int4 weights in the "lmc-int4-k8" layout, float activations.

out[M, N] = x[M, K] @ W^T, where W[N, K] is stored as (docs/workspace-format.md):

  qweight  int32 [ceil(K / 8), N]   element [r, n] packs the 4-bit codes of W[n, 8r + j], j = 0..7,
                                    code j in bits 4j .. 4j+3 (nibble 0 least significant);
                                    codes past K are 0
  scales   float [ceil(K / G), N]   in the activation dtype
  zeros    float [ceil(K / G), N]   integer values 0..15
  W[n, k] = (code(k, n) - zeros[k // G, n]) * scales[k // G, n];  G in {32, 64, 128}, last group may be partial

Two Triton paths, both accumulating in float32:
  - decode (`w4a16_gemv_triton`, M <= 4): CUDA-core GEMV; each program owns BLOCK_N output columns and 1-4 rows
    of x and walks K one quantization group at a time ([G/8, BLOCK_N] words, 16-byte loads along N), with the
    next groups' loads in flight (the loop is unrolled so no in-flight register is copied); float16 x on the
    GPU: each word dequantized once to float16 pairs and multiplied in packed float16 by inline PTX, float32
    from there on; split-K partials are summed by the last split to finish; for an MLP's fused gate/up weight
    the output is silu(gate) * up, computed where the sums are written (`w4a16_silu_matmul`);
  - prefill and batch decode (`w4a16_gemm_triton`, M > 1): tiled GEMM that dequantizes a [BLOCK_K, BLOCK_N]
    tile in registers (inline PTX for float16 on the GPU, float32 bit tricks otherwise) and feeds tl.dot;
    for small M it multiplies W_tile x_tile^T instead (`swap_ab`), so the weight tile is the MMA's tall side.
Both can split K over several programs (`split_k`); the GEMM sums the float32 partials in a second kernel.
For large M (prefill of long prompts) a third path, `w4a16_dequant_matmul_triton`, writes W^T once in
the activation dtype and calls the library GEMM: the in-register-dequant GEMM runs 1.6-2x cuBLAS there
(Triton serialises dequant and wgmma inside a CTA), while the extra 2·K·N bytes are small next to M·K·N.
`w4a16_matmul` picks a path and block shapes from the tuning table of the GPU it runs on (lmc.kernels.w4a16_tuning:
keyed by device name, then M class and nearest (K, N); written by `bench/bench_w4a16.py --sweep --write-table`),
resolved once per (device, M, N, K), and falls back to the torch reference (`w4a16_matmul_ref`) off CUDA or
without Triton.
"""

from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import functools

import torch

from lmc.errors import LmcError
from lmc.format.int4 import PACK, check_group_size, dequantize_lmc
from lmc.kernels.pdl import pdl_launch, pdl_wait
from lmc.kernels.silu_mul import silu_mul
from lmc.kernels.split_counters import split_counters
from lmc.kernels.w4a16_mma import MAX_ROWS as MMA_MAX_ROWS
from lmc.kernels.w4a16_mma import w4a16_mma_triton
from lmc.kernels.w4a16_mma_wide import w4a16_mma_wide_triton
from lmc.kernels.w4a16_wgmma import w4a16_wgmma_triton, wgmma_available
from lmc.kernels.w4a16_tuning import config_for

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: w4a16_matmul runs the torch reference
    triton = None
    tl = None



def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _jit_rows(fn):
    """triton.jit without specializing on the row count M (it only bounds masks): one compile serves every M of a
    configuration, so a step of a row count the warm-up did not meet compiles nothing (runtime/warmup.py)."""
    return triton.jit(fn, do_not_specialize=["M"]) if triton is not None else fn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- checks


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    check_group_size(group_size, "int4 group size")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise LmcError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}; "
                       "rebuild the workspace")
    k = x.shape[-1]
    n = qweight.shape[1]
    if qweight.shape[0] != _cdiv(k, PACK):
        raise LmcError(
            f"qweight has {qweight.shape[0]} packed rows but x has K={k} (expected ceil(K/8)={_cdiv(k, PACK)}); "
            "the workspace does not match this model, rebuild it")
    want = (_cdiv(k, group_size), n)
    if tuple(scales.shape) != want or tuple(zeros.shape) != want:
        raise LmcError(
            f"scales/zeros must be {list(want)} for K={k}, N={n}, G={group_size}, got "
            f"{list(scales.shape)} and {list(zeros.shape)}; check the workspace's group_size")


def _check_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  out: torch.Tensor | None, out_cols: int | None = None):
    _check(x, qweight, scales, zeros, group_size)
    if triton is None:
        raise LmcError("the Triton W4A16 kernels need triton; install it (pip install triton) or run on CPU")
    if x.dim() != 2 or x.stride(1) != 1:
        raise LmcError("x must be a 2-D tensor with contiguous rows; call .contiguous() first")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LmcError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        raise LmcError("qweight, scales and zeros must be contiguous; load them with .contiguous()")
    out_cols = qweight.shape[1] if out_cols is None else out_cols
    if out is not None and (out.shape != (x.shape[0], out_cols) or out.dtype != x.dtype or out.stride(1) != 1):
        raise LmcError(f"out must be a [{x.shape[0]}, {out_cols}] {x.dtype} tensor with contiguous rows")


# ----------------------------------------------------------------------------- torch reference


def dequantize_int4_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                        in_features: int) -> torch.Tensor:
    """W^T as float32 [K, N] from the lmc-int4-k8 tensors (K = in_features)."""
    _check(torch.empty(0, in_features), qweight, scales, zeros, group_size)
    return dequantize_lmc(qweight, scales, zeros, group_size, in_features)  # [K, N]


def w4a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype: dequantize, then matmul in float32."""
    k = x.shape[-1]
    w = dequantize_int4_ref(qweight, scales, zeros, group_size, k)  # [K, N]
    out = x.reshape(-1, k).float() @ w  # [M, N]
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])


# ----------------------------------------------------------------------------- Triton kernels
#
# Dequantization without int->float conversions: OR-ing a 4-bit code c into the mantissa of the float32
# 2**23 (bits 0x4B000000) gives exactly 2**23 + c, so (bits as float32) - (2**23 + zero) = c - zero, exact.


@_jit
def _code_minus_zero(packed, j: tl.constexpr, zero_m):
    """Code j of every word of packed [KP, BN] int32 minus its zero, as float32 (zero_m = 2**23 + zero)."""
    bits = ((packed >> (4 * j)) & 0xF) | 0x4B000000  # float32 bits of 2**23 + code
    return bits.to(tl.float32, bitcast=True) - zero_m


@_jit
def _dequant8_f16_asm(packed, zero, scale):
    """Eight float16 values (code j - zero) * scale, j = 0..7, of every int32 word (GPU only).

    LOP3 (word >> 4i) & 0x000F000F | 0x64006400 puts codes i and i + 4 into the two halves of a
    register as float16 1024 + code; one packed subtract of 1024 + zero (exact) and one packed
    multiply (one rounding, as in float32 then rounded) give two weights: ~2 instructions per weight."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 w, z2, s2, q0, q1, q2, q3;
        .reg .b16 zp, magic;
        mov.b16 magic, 0x6400;
        add.rn.f16 zp, $9, magic;
        mov.b32 z2, {zp, zp};
        mov.b32 s2, {$10, $10};
        lop3.b32 q0, $8, 0x000f000f, 0x64006400, 0xea;
        shr.u32 w, $8, 4;
        lop3.b32 q1, w, 0x000f000f, 0x64006400, 0xea;
        shr.u32 w, $8, 8;
        lop3.b32 q2, w, 0x000f000f, 0x64006400, 0xea;
        shr.u32 w, $8, 12;
        lop3.b32 q3, w, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 q0, q0, z2;
        sub.f16x2 q1, q1, z2;
        sub.f16x2 q2, q2, z2;
        sub.f16x2 q3, q3, z2;
        mul.f16x2 q0, q0, s2;
        mul.f16x2 q1, q1, s2;
        mul.f16x2 q2, q2, s2;
        mul.f16x2 q3, q3, s2;
        mov.b32 {$0, $4}, q0;
        mov.b32 {$1, $5}, q1;
        mov.b32 {$2, $6}, q2;
        mov.b32 {$3, $7}, q3;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
        args=[packed, zero, scale],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )


@_jit
def _dequant_tile(packed, scale, zero, DTYPE: tl.constexpr, ASM: tl.constexpr, K_MINOR: tl.constexpr = False):
    """packed [KP, BN] int32 (word [r, n] = codes of W[n, 8r + j] in bits 4j..4j+3), scale and zero
    [KP, BN] -> W^T tile [8 * KP, BN] in DTYPE, row 8r + j. Each thread unpacks the words it loaded;
    the joins keep the 8 codes of a word in that thread. ASM: float16 only, on the GPU.
    K_MINOR: the three are [BN, KP] (word [n, r]) and W comes back as [BN, 8 * KP], column 8r + j."""
    if ASM:
        w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_f16_asm(packed, zero, scale)
    else:
        zero_m = zero.to(tl.float32) + 8388608.0  # 2**23 + zero
        scale = scale.to(tl.float32)
        w0 = _code_minus_zero(packed, 0, zero_m) * scale
        w1 = _code_minus_zero(packed, 1, zero_m) * scale
        w2 = _code_minus_zero(packed, 2, zero_m) * scale
        w3 = _code_minus_zero(packed, 3, zero_m) * scale
        w4 = _code_minus_zero(packed, 4, zero_m) * scale
        w5 = _code_minus_zero(packed, 5, zero_m) * scale
        w6 = _code_minus_zero(packed, 6, zero_m) * scale
        w7 = _code_minus_zero(packed, 7, zero_m) * scale
    w = tl.join(tl.join(tl.join(w0, w1), tl.join(w2, w3)), tl.join(tl.join(w4, w5), tl.join(w6, w7)))
    if K_MINOR:  # [n, r, b0, b1, b2] -> [n, r, b2, b1, b0] -> [BN, 8 * KP], column 8r + j
        w = tl.reshape(tl.permute(w.to(DTYPE), (0, 1, 4, 3, 2)), (packed.shape[0], packed.shape[1] * 8))
    else:  # [r, n, b0, b1, b2] = code b0 + 2 b1 + 4 b2 -> [r, b2, b1, b0, n] -> [8 * KP, BN], row 8r + j
        w = tl.reshape(tl.permute(w.to(DTYPE), (0, 4, 3, 2, 1)), (packed.shape[0] * 8, packed.shape[1]))
    return w


@_jit
def _dequant_pairs_f16_asm(packed, za, zb):
    """(code - zero) / 16 of every int32 word as four float16 pairs (GPU only): q0 = (c0, c4), q1 = (c1, c5),
    q2 = (c2, c6), q3 = (c3, c7), each an int32 holding two halves (low half first).

    LOP3 (word >> 8s) & 0x000F000F | 0x64006400 gives float16 1024 + c (codes 2s and 2s + 4), the mask
    0x00F000F0 gives 1024 + 16 c (codes 2s + 1 and 2s + 5); one HFMA2 by 1/16 (resp. 1/256) plus
    za = -(64 + z/16) (resp. zb = -(4 + z/16)) leaves (c - z) / 16 exactly: 9 instructions per word."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 w, t0, t1, t2, t3, s16, s256;
        mov.b32 s16, 0x2C002C00;
        mov.b32 s256, 0x1C001C00;
        lop3.b32 t0, $4, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 t1, $4, 0x00f000f0, 0x64006400, 0xea;
        shr.u32 w, $4, 8;
        lop3.b32 t2, w, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 t3, w, 0x00f000f0, 0x64006400, 0xea;
        fma.rn.f16x2 $0, t0, s16, $5;
        fma.rn.f16x2 $1, t1, s256, $6;
        fma.rn.f16x2 $2, t2, s16, $5;
        fma.rn.f16x2 $3, t3, s256, $6;
        }""",
        constraints="=r,=r,=r,=r,r,r,r",
        args=[packed, za, zb],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True,
        pack=1,
    )


def _dot_pairs_ptx() -> str:
    """The PTX of `_dot_pairs_f16_asm`: $0..$3 the four words' float32 sums, $4 + 4i + w operand q_i of word w,
    $20..$23 the row's four x pairs (x0, x1) .. (x6, x7)."""
    lines = [".reg .b32 a0, a1, a2, a3, acc;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;",
             "prmt.b32 a0, $20, $22, 0x5410;", "prmt.b32 a1, $20, $22, 0x7632;",  # (x0, x4), (x1, x5)
             "prmt.b32 a2, $21, $23, 0x5410;", "prmt.b32 a3, $21, $23, 0x7632;"]  # (x2, x6), (x3, x7)
    for w in range(4):  # per word: HMUL2, three HFMA2, then the two halves added in float32
        lines += [f"mul.rn.f16x2 acc, ${4 + w}, a0;", f"fma.rn.f16x2 acc, ${8 + w}, a1, acc;",
                  f"fma.rn.f16x2 acc, ${12 + w}, a2, acc;", f"fma.rn.f16x2 acc, ${16 + w}, a3, acc;",
                  "mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", f"add.f32 ${w}, flo, fhi;"]
    return "{\n" + "\n".join(lines) + "\n}"


_DOT_PAIRS_PTX = tl.constexpr(_dot_pairs_ptx()) if tl is not None else None  # a jit function reads constexpr globals


@_jit
def _dot_pairs_f16_asm(q0, q1, q2, q3, xq):
    """sum_j (c_j - z) / 16 * x_j of four neighbouring words (four columns, one packed row), as float32 (GPU only).

    pack=4: each call sees four consecutive elements of every operand, which for a [rows, BN] tile with
    four int32 per thread along N (16-byte loads) are four columns of one packed row r. xq is the
    [rows, BN] tile whose element at column n holds x[8r + 2(n % 4)] and x[8r + 2(n % 4) + 1] as a
    float16 pair, so the four xq operands are the row's x pairs (x0, x1) .. (x6, x7): four PRMT regroup
    them as (x0, x4) .. (x3, x7) to match q0 .. q3, shared by the four words. Per word one HMUL2, three
    HFMA2 (four float16 terms per half: finite for |x| < ~17000) and one float32 add of the halves."""
    return tl.inline_asm_elementwise(
        asm=_DOT_PAIRS_PTX,
        constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        args=[q0, q1, q2, q3, xq],
        dtype=tl.float32,
        is_pure=True,
        pack=4,
    )


@_jit
def _half_pair(v):
    """float32 [BN] -> int32 [BN] holding float16(v) in both halves."""
    h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@_jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0)
    return tl.load(ptrs)


@_jit
def _gemv_row_part(x_row, x_pairs, xq_loaded, packed, zero_m, q0, q1, q2, q3, rows, row_ok, K,
                   LOADED: tl.constexpr, MASKED: tl.constexpr, ASM: tl.constexpr):
    """One row of x times one group tile: [GP, BN] float32 partial sums (before the group scale)."""
    if ASM:  # x_pairs: the row's x as int32 float16 pairs, element [r, n] = pair n % 4 of packed row r
        xq = xq_loaded if LOADED else _load(x_pairs, row_ok, MASKED)  # [GP, BN] int32
        return _dot_pairs_f16_asm(q0, q1, q2, q3, xq)
    part = tl.zeros(packed.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        k = rows * 8 + j  # [GP]
        xj = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)  # [GP]: x[8r + j]
        part += xj[:, None] * _code_minus_zero(packed, j, zero_m)
    return part


@_jit
def _pair_of_column(offs_n):
    """n % 4 for the block's columns offs_n [BN] (ASM path), from lane positions: runs of four columns start at
    multiples of 4 (BN, BN/2 and, with SILU, N/2 are multiples of 4), and written so the compiler sees runs of
    four contiguous pairs (16-byte x loads) whatever it can prove about offs_n."""
    return tl.arange(0, offs_n.shape[0]) % 4


@_jit
def _gemv_group(x_ptr, x32_ptr, g, g_last, m0, M, K, stride_xm, offs_g, offs_n, n_ok,
                acc0, acc1, acc2, acc3, packed, scale, zero, xq0,
                GROUP: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr, ASM: tl.constexpr):
    """Multiply the loaded group tile (packed [GP, BN], scale and zero [BN], and with ASM the first row's x pairs
    xq0 [GP, BN]) by up to four rows of x; a group past
    g_last (the unrolled loop's overhang, loaded as g_last) adds nothing."""
    scale = tl.where(g <= g_last, scale, 0.0)  # [BN]
    g = tl.minimum(g, g_last)
    rows = g * (GROUP // 8) + offs_g  # [GP] packed rows of group g
    row_ok = (rows < tl.cdiv(K, 8))[:, None] & n_ok[None, :]  # [GP, BN]
    pair_off = rows[:, None] * 4 + _pair_of_column(offs_n)[None, :]  # [GP, BN]: int32 index of x pair n % 4 of row r
    if ASM:
        zf = zero.to(tl.float32) * 0.0625  # [BN]
        q0, q1, q2, q3 = _dequant_pairs_f16_asm(packed, _half_pair(-64.0 - zf)[None, :],
                                                _half_pair(-4.0 - zf)[None, :])  # [GP, BN] x4: (c - z) / 16 pairs
        zero_m = zero
        scale = scale.to(tl.float32) * 16.0  # [BN]
    else:
        q0, q1, q2, q3 = packed, packed, packed, packed  # unused off the PTX path
        zero_m = (zero.to(tl.float32) + 8388608.0)[None, :]  # 2**23 + zero
        scale = scale.to(tl.float32)
    stride_p = stride_xm // 2
    r0 = tl.minimum(m0, M - 1)  # rows past M repeat the last row; their results are not stored
    acc0 += _gemv_row_part(x_ptr + r0 * stride_xm, x32_ptr + r0 * stride_p + pair_off, xq0, packed, zero_m,
                           q0, q1, q2, q3, rows, row_ok, K, True, MASKED, ASM) * scale[None, :]
    if ROWS > 1:
        r1 = tl.minimum(m0 + 1, M - 1)
        acc1 += _gemv_row_part(x_ptr + r1 * stride_xm, x32_ptr + r1 * stride_p + pair_off, xq0, packed,
                               zero_m, q0, q1, q2, q3, rows, row_ok, K, False, MASKED, ASM) * scale[None, :]
    if ROWS > 2:
        r2 = tl.minimum(m0 + 2, M - 1)
        acc2 += _gemv_row_part(x_ptr + r2 * stride_xm, x32_ptr + r2 * stride_p + pair_off, xq0, packed,
                               zero_m, q0, q1, q2, q3, rows, row_ok, K, False, MASKED, ASM) * scale[None, :]
        r3 = tl.minimum(m0 + 3, M - 1)
        acc3 += _gemv_row_part(x_ptr + r3 * stride_xm, x32_ptr + r3 * stride_p + pair_off, xq0, packed,
                               zero_m, q0, q1, q2, q3, rows, row_ok, K, False, MASKED, ASM) * scale[None, :]
    return acc0, acc1, acc2, acc3


@_jit
def _gemv_load_x(x32_row, g, K, offs_g, offs_n, n_ok, GROUP: tl.constexpr, MASKED: tl.constexpr):
    """The first row's x over group g as float16 pairs [GP, BN] int32 (element [r, n] = pair n % 4 of packed
    row r)."""
    rows = g * (GROUP // 8) + offs_g  # [GP]
    w_ok = (rows < tl.cdiv(K, 8))[:, None] & n_ok[None, :]
    return _load(x32_row + rows[:, None] * 4 + _pair_of_column(offs_n)[None, :], w_ok, MASKED)  # [GP, BN] int32


@_jit
def _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, g, N, K, offs_g, offs_n, n_ok, GROUP: tl.constexpr,
                     MASKED: tl.constexpr, ASM: tl.constexpr, LOAD_X: tl.constexpr = True):
    """Loads of group g: packed words [GP, BN] (16-byte loads along N), scale and zero [BN], and with ASM and
    LOAD_X the first row's x pairs [GP, BN] (`_gemv_load_x`), so that x is in flight too."""
    rows = g * (GROUP // 8) + offs_g  # [GP]
    w_ok = (rows < tl.cdiv(K, 8))[:, None] & n_ok[None, :]
    packed = _load(qw_ptr + rows[:, None] * N + offs_n[None, :], w_ok, MASKED)  # [GP, BN] int32
    scale = _load(s_ptr + g * N + offs_n, n_ok, MASKED)  # [BN]
    zero = _load(z_ptr + g * N + offs_n, n_ok, MASKED)  # [BN]
    xq = packed  # unused off the PTX path
    if ASM and LOAD_X:
        xq = _gemv_load_x(x32_row, g, K, offs_g, offs_n, n_ok, GROUP, MASKED)
    return packed, scale, zero, xq


@_jit
def _gemv_write(val, m, M, offs_n, n_ok, out_cols, out_ok, out_ptr, stride_om, SILU: tl.constexpr,
                HALF: tl.constexpr):
    """out[m] from the column block's float32 sums val [BN]. SILU: val holds HALF gate columns then the HALF
    matching up columns; out[m, out_cols] = silu(gate) * up, both rounded to out's dtype first (what the
    unfused silu_mul reads), computed in float32 as silu_mul does."""
    dtype = out_ptr.dtype.element_ty
    if SILU:
        gate, up = tl.split(tl.permute(tl.reshape(val.to(dtype).to(tl.float32), (2, HALF)), (1, 0)))  # [HALF] x2
        ok = out_ok & (out_cols * 0 + m < M)  # [HALF]
        tl.store(out_ptr + m * stride_om + out_cols, (gate * tl.sigmoid(gate) * up).to(dtype), mask=ok)
    else:
        ok = n_ok & (offs_n * 0 + m < M)  # [BN]
        tl.store(out_ptr + m * stride_om + offs_n, val.to(dtype), mask=ok)


@_jit
def _gemv_store(acc, m, M, N, offs_n, n_ok, out_cols, out_ok, out_ptr, ws_ptr, stride_om, split,
                SPLIT_K: tl.constexpr, SILU: tl.constexpr, HALF: tl.constexpr):
    val = tl.sum(acc, axis=0)  # [BN]
    if SPLIT_K == 1:
        _gemv_write(val, m, M, offs_n, n_ok, out_cols, out_ok, out_ptr, stride_om, SILU, HALF)
    else:
        tl.store(ws_ptr + (split * M + m) * N + offs_n, val, mask=n_ok & (offs_n * 0 + m < M))


@_jit
def _gemv_finish(m, M, N, offs_n, n_ok, out_cols, out_ok, out_ptr, ws_ptr, stride_om, SPLIT_K: tl.constexpr,
                 SILU: tl.constexpr, HALF: tl.constexpr):
    """Last split of a column block: out[m] = sum over splits of the float32 partials, in split order."""
    ok = n_ok & (offs_n * 0 + m < M)  # [BN]
    total = tl.zeros(offs_n.shape, dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=ok, other=0.0, cache_modifier=".cg")
    _gemv_write(total, m, M, offs_n, n_ok, out_cols, out_ok, out_ptr, stride_om, SILU, HALF)


@_jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr, DEPTH: tl.constexpr,
    MASKED: tl.constexpr, ASM: tl.constexpr, SILU: tl.constexpr, PRELOAD: tl.constexpr, PDL: tl.constexpr,
):
    """Decode path: up to four rows of x per program. qweight [ceil(K/8), N] int32: word [r, n] holds
    W[n, 8r + j] in bits 4j..4j+3; a quantization group is GROUP / 8 packed rows.

    Program (pid_m, pid_n, split) owns out[ROWS rows, BLOCK_N cols] and walks the split-th run of whole
    groups. Per group: one [GROUP/8, BLOCK_N] tile of packed words and the group's scale and zero
    vectors, loaded while the previous group is multiplied (explicit prefetch); each word is
    dequantized once for all rows; a [GROUP/8, BLOCK_N] float32 partial sum per row, reduced over K at
    the end; DEPTH (1 or 2) groups are loaded ahead of the one being multiplied. SPLIT_K > 1: each split writes float32 partials to ws[split, M, N], and the last split to
    arrive at a column block (counter in count_ptr, reset after use) sums them in split order
    (deterministic). ASM (float16 x on the GPU, even row stride): packed-float16 dequant and products.
    MASKED: N % BLOCK_N or K % GROUP is not zero (bounds checks on every load). PDL: see lmc.kernels.pdl.
    SILU (the fused gate/up weight of an MLP, gate in columns [0, N/2), up in [N/2, N)): program pid_n owns gate
    columns pid_n * BLOCK_N/2 + [0, BLOCK_N/2) and the matching up columns, and writes silu(gate) * up to
    out[:, N/2] (`_gemv_write`): the activation costs no kernel and no [M, N] round trip through memory."""
    if ASM:  # the launcher checked N % 4 == 0 (SILU: N % 8); saying so lets every [GP, BN] tile load 16 bytes
        N = (N // 4) * 4  # per thread, which the pack=4 products rely on (four columns of one row per call)
    half_n = (N // 8) * 4 if ASM else N // 2  # SILU: gate (and up) columns, a multiple of 4 with ASM
    pid_m = tl.program_id(0)  # rows of x fastest: programs sharing weights run together (L2)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    m0 = pid_m * ROWS
    HALF: tl.constexpr = BLOCK_N // 2
    if SILU:
        lane = tl.arange(0, BLOCK_N)
        out_cols = pid_n * HALF + tl.arange(0, HALF)  # [BN/2] output (gate) columns
        out_ok = out_cols < half_n
        col = pid_n * HALF + lane % HALF  # [BN]
        offs_n = col + (lane // HALF) * half_n  # [BN]: HALF gate columns, then the matching up columns
        n_ok = col < half_n
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = offs_n < N
        out_cols, out_ok = offs_n, n_ok  # unused
    offs_g = tl.arange(0, GROUP // 8)  # [GP]
    x32_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    n_groups = tl.cdiv(K, GROUP)
    run = tl.cdiv(n_groups, SPLIT_K)
    g_first = split * run
    g_last = tl.minimum(n_groups, g_first + run) - 1
    acc0 = tl.zeros((GROUP // 8, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((GROUP // 8, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((GROUP // 8, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((GROUP // 8, BLOCK_N), dtype=tl.float32)
    x32_row = x32_ptr + tl.minimum(m0, M - 1) * (stride_xm // 2)  # the first row's x as float16 pairs
    # Software pipeline unrolled DEPTH + 1 times, so that no register holding a load in flight is ever copied
    # (a copy would wait for the load): while one group is multiplied, the next DEPTH are in flight. Groups past
    # the run are clamped to g_last (a cached reload) and multiplied with a zero scale.
    # With PDL the prologue's weight loads are issued before waiting for the previous kernel (they overlap its
    # tail); x, the output, the partials and the counters are touched only after the wait. PRELOAD (DEPTH 1):
    # the prologue requests two groups, not one, and the loop loads group g + 3 after multiplying g + 1 instead
    # of g + 1 before multiplying g (same loads in flight, a larger head start: short runs gain; the tuning table
    # says where).
    pa, sa, za, xa = _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, tl.minimum(g_first, g_last), N, K, offs_g,
                                      offs_n, n_ok, GROUP, MASKED, ASM, not PDL)
    pb, sb, zb, xb = pa, sa, za, xa
    if DEPTH == 2 or PRELOAD:
        pb, sb, zb, xb = _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, tl.minimum(g_first + 1, g_last), N, K,
                                          offs_g, offs_n, n_ok, GROUP, MASKED, ASM, not PDL)
    pdl_wait(PDL)
    if PDL and ASM:
        xa = _gemv_load_x(x32_row, tl.minimum(g_first, g_last), K, offs_g, offs_n, n_ok, GROUP, MASKED)
        if DEPTH == 2 or PRELOAD:
            xb = _gemv_load_x(x32_row, tl.minimum(g_first + 1, g_last), K, offs_g, offs_n, n_ok, GROUP, MASKED)
    for g in range(g_first, g_last + 1, DEPTH + 1):
        if DEPTH == 2:
            pc, sc, zc, xc = _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, tl.minimum(g + 2, g_last), N, K,
                                              offs_g, offs_n, n_ok, GROUP, MASKED, ASM)
        elif not PRELOAD:
            pb, sb, zb, xb = _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, tl.minimum(g + 1, g_last), N, K,
                                              offs_g, offs_n, n_ok, GROUP, MASKED, ASM)
        acc0, acc1, acc2, acc3 = _gemv_group(x_ptr, x32_ptr, g, g_last, m0, M, K, stride_xm, offs_g, offs_n, n_ok,
                                             acc0, acc1, acc2, acc3, pa, sa, za, xa, GROUP, ROWS, MASKED, ASM)
        pa, sa, za, xa = _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, tl.minimum(g + DEPTH + 1, g_last), N, K,
                                          offs_g, offs_n, n_ok, GROUP, MASKED, ASM)
        acc0, acc1, acc2, acc3 = _gemv_group(x_ptr, x32_ptr, g + 1, g_last, m0, M, K, stride_xm, offs_g, offs_n,
                                             n_ok, acc0, acc1, acc2, acc3, pb, sb, zb, xb, GROUP, ROWS, MASKED, ASM)
        if DEPTH == 2:
            pb, sb, zb, xb = _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, tl.minimum(g + 4, g_last), N, K,
                                              offs_g, offs_n, n_ok, GROUP, MASKED, ASM)
            acc0, acc1, acc2, acc3 = _gemv_group(x_ptr, x32_ptr, g + 2, g_last, m0, M, K, stride_xm, offs_g, offs_n,
                                                 n_ok, acc0, acc1, acc2, acc3, pc, sc, zc, xc, GROUP, ROWS, MASKED,
                                                 ASM)
        elif PRELOAD:
            pb, sb, zb, xb = _gemv_load_group(qw_ptr, s_ptr, z_ptr, x32_row, tl.minimum(g + 3, g_last), N, K,
                                              offs_g, offs_n, n_ok, GROUP, MASKED, ASM)
    _gemv_store(acc0, m0, M, N, offs_n, n_ok, out_cols, out_ok, out_ptr, ws_ptr, stride_om, split, SPLIT_K, SILU,
                HALF)
    if ROWS > 1:
        _gemv_store(acc1, m0 + 1, M, N, offs_n, n_ok, out_cols, out_ok, out_ptr, ws_ptr, stride_om, split, SPLIT_K,
                    SILU, HALF)
    if ROWS > 2:
        _gemv_store(acc2, m0 + 2, M, N, offs_n, n_ok, out_cols, out_ok, out_ptr, ws_ptr, stride_om, split, SPLIT_K,
                    SILU, HALF)
        _gemv_store(acc3, m0 + 3, M, N, offs_n, n_ok, out_cols, out_ok, out_ptr, ws_ptr, stride_om, split, SPLIT_K,
                    SILU, HALF)
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partials are written before the counter says so
        counter = count_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            for r in tl.static_range(ROWS):
                _gemv_finish(m0 + r, M, N, offs_n, n_ok, out_cols, out_ok, out_ptr, ws_ptr, stride_om, SPLIT_K,
                             SILU, HALF)
            tl.atomic_xchg(counter, 0)  # ready for the next call (and the next CUDA-graph replay)


@_jit_rows
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, dst_ptr,
    M, N, K, stride_xm, stride_dm, stride_ds,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DEQ_ASM: tl.constexpr, SWAP_AB: tl.constexpr, KMAJOR: tl.constexpr,
    PDL: tl.constexpr,
):
    """Prefill path. qweight [ceil(K/8), N] int32: word [r, n] holds W[n, 8r + j] in bits 4j..4j+3.

    Each step loads x[BM, BK] and a [BK/8, BN] tile of packed words (with the scale and zero vectors of its
    group when BLOCK_K divides GROUP, else per packed row), dequantizes it in registers to
    W^T[BK, BN] (_dequant_tile) and accumulates tl.dot in float32. Programs walk GROUP_M row blocks
    per column band so that a band of weights is reused from L2. With SPLIT_K > 1, program
    (pid, s) covers the s-th of SPLIT_K runs of whole BLOCK_K tiles along K and writes float32
    partial sums to dst[s] (reduced by _splitk_sum_kernel); otherwise it writes out directly.
    KMAJOR: qw_ptr is qweight^T [N, ceil(K/8)] (`w4a16_kmajor`), loaded as [BN, BK/8] tiles whose words run along
    K in each thread, so the dequantized tile is K-minor and goes to shared memory in 16-byte stores (sm_90 SASS
    of the M = 16 swap-AB tile: 8 STS.128 a step instead of 64 STS.U16)."""
    pdl_wait(PDL)
    BLOCK_KP: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % size_m
    pid_n = (pid % band) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    offs_r = tl.arange(0, BLOCK_KP)  # [KP]
    m_mask = offs_m < M
    n_mask = offs_n < N
    kp_total = tl.cdiv(K, 8)
    k_run = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # K per split, whole tiles
    k_start = tl.program_id(1) * k_run
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, min(K, k_start + k_run), BLOCK_K):
        k = k0 + offs_k  # [BK]
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=m_mask[:, None] & (k < K)[None, :], other=0.0)  # [BM, BK]
        rows = k0 // 8 + offs_r  # [KP] packed rows
        if KMAJOR:  # qweight^T [N, ceil(K/8)]: each thread's words run along K
            w_mask = n_mask[:, None] & (rows < kp_total)[None, :]  # [BN, KP]
            packed = tl.load(qw_ptr + offs_n[:, None] * kp_total + rows[None, :], mask=w_mask, other=0)
            scale = tl.broadcast_to(tl.load(s_ptr + (k0 // GROUP) * N + offs_n, mask=n_mask, other=0.0)[:, None],
                                    (BLOCK_N, BLOCK_KP))  # [BN, KP]: the launcher checked that BLOCK_K divides G
            zero = tl.broadcast_to(tl.load(z_ptr + (k0 // GROUP) * N + offs_n, mask=n_mask, other=0.0)[:, None],
                                   (BLOCK_N, BLOCK_KP))
            w_t = _dequant_tile(packed, scale, zero, xt.dtype, DEQ_ASM, True)  # [BN, BK]
            if SWAP_AB:
                acc = tl.dot(w_t, tl.trans(xt), acc)  # [BN, BM]
            else:
                acc = tl.dot(xt, tl.trans(w_t), acc)  # [BM, BN]
        else:
            w_mask = (rows < kp_total)[:, None] & n_mask[None, :]
            packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)  # [KP, BN] int32
            if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale and zero per column, loaded once
                scale = tl.broadcast_to(tl.load(s_ptr + (k0 // GROUP) * N + offs_n, mask=n_mask, other=0.0)[None, :],
                                        (BLOCK_KP, BLOCK_N))  # [KP, BN]
                zero = tl.broadcast_to(tl.load(z_ptr + (k0 // GROUP) * N + offs_n, mask=n_mask, other=0.0)[None, :],
                                       (BLOCK_KP, BLOCK_N))  # [KP, BN]
            else:
                sz_off = ((rows * 8) // GROUP)[:, None] * N + offs_n[None, :]  # [KP, BN]
                scale = tl.load(s_ptr + sz_off, mask=w_mask, other=0.0)  # [KP, BN]
                zero = tl.load(z_ptr + sz_off, mask=w_mask, other=0.0)  # [KP, BN]
            w = _dequant_tile(packed, scale, zero, xt.dtype, DEQ_ASM)  # [BK, BN]
            if SWAP_AB:  # out^T = W x^T: the weight tile is the MMA's tall operand, the few rows of x the narrow one
                acc = tl.dot(tl.trans(w), tl.trans(xt), acc)  # [BN, BM]
            else:
                acc = tl.dot(xt, w, acc)  # [BM, BN]
    dst = dst_ptr + tl.program_id(1) * stride_ds + offs_m[:, None] * stride_dm + offs_n[None, :]  # [BM, BN]
    if SWAP_AB:
        acc = tl.trans(acc)  # [BM, BN]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@_jit_rows
def _splitk_sum_kernel(part_ptr, out_ptr, M, N, stride_ps, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    """out[M, N] = sum over s of part[s, :M, N] (float32 partials, split s at s * stride_ps; fixed order:
    deterministic)."""
    pdl_wait(PDL)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index into [M, N]
    mask = idx < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + idx, mask=mask, other=0.0)
    tl.store(out_ptr + (idx // N) * stride_om + idx % N, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _splitk_partials(split_k: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """float32 [split_k, M, N] partials with each split's rows padded to a multiple of 16: the split stride is
    then a multiple of 16 whatever M is, so the kernels compiled for one M serve every M (Triton specializes
    integer arguments on divisibility by 16; a new one at serving time is a compile that stalls the step)."""
    return torch.empty((split_k, _cdiv(m, 16) * 16, n), dtype=torch.float32, device=device)[:, :m]  # [S, M, N]


def _splitk_sum(part: torch.Tensor, out: torch.Tensor):
    """out [M, N] = part [S, M, N] summed over S; part's rows contiguous within a split (_splitk_partials)."""
    split_k, m, n = part.shape
    assert part.stride(1) == n and part.stride(2) == 1
    _splitk_sum_kernel[(_cdiv(m * n, 1024),)](part, out, m, n, part.stride(0), out.stride(0), SPLIT_K=split_k,
                                              BLOCK=1024, num_warps=4, **pdl_launch(out.device))


def w4a16_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, *, block_n: int = 32, rows: int = 1, split_k: int = 1, depth: int = 1,
                      num_warps: int = 1, preload: bool = False, dot_asm: bool | None = None,
                      silu_mul: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode path: x [M, K] (M small) -> [M, N] in x.dtype; `rows` (1, 2 or 4) rows of x per program share
    each dequantized word, further row blocks re-read the weights (from L2). split_k > 1 splits the groups
    of K over that many programs per column block; the last to finish sums the float32 partials. depth (1 or 2):
    groups loaded ahead of the one being multiplied; preload (depth 1): two groups requested before the PDL wait,
    not one. dot_asm: packed-float16 dequant and products (inline PTX;
    needs N % 4 == 0); None = on for float16 x on CUDA where N % 4 == 0 (N % 8 with silu_mul).
    silu_mul: W is an MLP's fused gate/up weight (gate in columns [0, N/2)); returns silu(gate) * up [M, N/2]."""
    n = qweight.shape[1]
    if silu_mul and n % 2:
        raise LmcError(f"silu_mul needs the fused gate/up weight (an even N), got N={n}")
    n_out = n // 2 if silu_mul else n
    _check_triton(x, qweight, scales, zeros, group_size, out, n_out)
    if rows not in (1, 2, 4) or depth not in (1, 2) or (preload and depth != 1):
        raise LmcError(f"rows must be 1, 2 or 4 and depth 1 or 2 (1 with preload), got {rows} and {depth}")
    m, k = x.shape
    if out is None:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)  # [M, N] or [M, N/2]
    asm_ok = x.is_cuda and x.dtype == torch.float16 and n % (8 if silu_mul else 4) == 0
    if dot_asm is None:
        dot_asm = asm_ok
    elif dot_asm and not asm_ok:
        raise LmcError("dot_asm needs float16 activations on CUDA and N % 4 == 0; pass dot_asm=None")
    if dot_asm:  # the pack=4 products need a tile of at least four words per thread: no replicated elements
        block_n = max(block_n, 1024 * num_warps // group_size)  # (G/8) * BN >= 4 * 32 * num_warps
    if dot_asm and (k % PACK or x.stride(0) % PACK or x.data_ptr() % 16):  # x is read as 16-byte rows of pairs
        padded = torch.zeros((m, _cdiv(k, PACK) * PACK), dtype=x.dtype, device=x.device)  # [M, ceil(K/8)*8]
        padded[:, :k] = x
        x = padded
    cols_per_program = block_n // 2 if silu_mul else block_n  # output columns
    grid = (_cdiv(m, rows), _cdiv(n_out, cols_per_program), split_k)
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    counters = split_counters(x.device, grid[0] * grid[1]) if split_k > 1 else out
    _w4a16_gemv_kernel[grid](
        x, qweight, scales, zeros, out, ws, counters, m, n, k, x.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_N=block_n, ROWS=rows, SPLIT_K=split_k, DEPTH=depth,
        MASKED=bool(n_out % cols_per_program or k % group_size), ASM=dot_asm, SILU=silu_mul, PRELOAD=preload,
        num_warps=num_warps,
        num_stages=1, **pdl_launch(x.device))
    return out


def w4a16_kmajor(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [ceil(K/8), N] -> its K-major copy [N, ceil(K/8)] (same words), for w4a16_gemm_triton's
    qweight_kmajor: made once per weight (at load), never per call."""
    return qweight.t().contiguous()


def w4a16_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, *, block_m: int = 64, block_n: int = 128, block_k: int = 128,
                      group_m: int = 8, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
                      swap_ab: bool = False, qweight_kmajor: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill path: x [M, K] -> [M, N] in x.dtype (tensor cores). split_k > 1 splits K over that
    many programs per output tile (more programs for small M x N) and sums their float32 partials
    in a second kernel. swap_ab: each step computes W_tile x_tile^T (BLOCK_N as the MMA's M side), for
    small M where BLOCK_M = 16 would leave the MMA mostly idle. qweight_kmajor: `w4a16_kmajor(qweight)`,
    read instead of qweight (needs block_k to divide group_size)."""
    _check_triton(x, qweight, scales, zeros, group_size, out)
    if qweight_kmajor is not None and (qweight_kmajor.shape != qweight.shape[::-1] or group_size % block_k
                                       or not qweight_kmajor.is_contiguous()):
        raise LmcError(f"qweight_kmajor must be w4a16_kmajor(qweight) {list(qweight.shape[::-1])} and block_k "
                       f"({block_k}) must divide the group size ({group_size})")
    m, k = x.shape
    n = qweight.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    dst = out if split_k == 1 else _splitk_partials(split_k, m, n, x.device)  # [S, M, N]
    grid = (_cdiv(m, block_m) * _cdiv(n, block_n), split_k)
    _w4a16_gemm_kernel[grid](
        x, qweight if qweight_kmajor is None else qweight_kmajor, scales, zeros, dst, m, n, k, x.stride(0),
        dst.stride(-2), dst.stride(0) if split_k > 1 else 0,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, SPLIT_K=split_k,
        DEQ_ASM=x.is_cuda and x.dtype == torch.float16, SWAP_AB=swap_ab, KMAJOR=qweight_kmajor is not None,
        num_warps=num_warps, num_stages=num_stages,
        **pdl_launch(x.device))
    if split_k > 1:
        _splitk_sum(dst, out)
    return out


# ----------------------------------------------------------------------------- dispatch

@_jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """W^T [K, N] in the activation dtype from one [BLOCK_R, BLOCK_N] tile of packed words."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # packed rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (K + 7) // 8
    mask = (offs_r[:, None] < rows) & (offs_n[None, :] < N)
    packed = tl.load(qw_ptr + offs_r[:, None] * N + offs_n[None, :], mask=mask, other=0)  # [BR, BN] int32
    group = (offs_r * 8) // GROUP  # G is a multiple of 8: the 8 codes of a word share one group
    scale = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0.0)  # [BR, BN]
    zero = tl.load(z_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    w = _dequant_tile(packed, scale, zero, out_ptr.dtype.element_ty, False)  # [8 * BR, BN], row 8r + j
    offs_k = tl.program_id(0) * BLOCK_R * 8 + tl.arange(0, BLOCK_R * 8)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def dequantize_int4_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                           in_features: int, dtype: torch.dtype, block_r: int = 16, block_n: int = 128) -> torch.Tensor:
    """W^T [K, N] in `dtype` (the large-M path: dequantize once, then cuBLAS)."""
    if triton is None:
        raise LmcError("Triton is not installed: pip install triton")
    n = qweight.shape[1]
    out = torch.empty(in_features, n, dtype=dtype, device=qweight.device)  # [K, N]
    grid = (_cdiv(qweight.shape[0], block_r), _cdiv(n, block_n))
    _dequant_kernel[grid](qweight, scales, zeros, out, n, in_features, GROUP=group_size, BLOCK_R=block_r,
                          BLOCK_N=block_n)
    return out


def w4a16_dequant_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized W^T: one pass writing W^T [K, N], then the library GEMM. Pays 2·K·N bytes
    written and read again, which large M amortises (prefill)."""
    _check(x, qweight, scales, zeros, group_size)
    w_t = dequantize_int4_triton(qweight, scales, zeros, group_size, x.shape[1], x.dtype)  # [K, N]
    return torch.matmul(x, w_t, out=out)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | None) -> str | None:
    """The GPU model the tuning tables are keyed by (None off CUDA)."""
    if device is None or device.type != "cuda":
        return None
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def w4a16_config(m: int, n: int, k: int, device: torch.device | None = None, mma: bool = False) -> tuple[str, dict]:
    """The path ("gemv", "gemm", "dequant" or "mma") and launcher keywords that w4a16_matmul uses for an [M, K] x
    [K, N] product on `device` (a CUDA device: its GPU model's table in lmc.kernels.w4a16_tuning; None: the
    default); mma: the weight has the mma layout (kernels/w4a16_mma.py), which "mma" entries need. An mma entry
    with "tiles" runs the wide kernel (any M, kernels/w4a16_mma_wide.py), one with "rows" the wgmma kernel (any M,
    kernels/w4a16_wgmma.py; where it cannot run, e.g. no Gluon, the entry's fallback); one without either, the
    1-16 row kernel, so past 16 rows it gives its fallback."""
    name = device_name(device)
    path, kw = config_for(name, m, n, k, mma)
    if path == "mma" and (("rows" in kw and not wgmma_available(device))
                          or (m > MMA_MAX_ROWS and "tiles" not in kw and "rows" not in kw)):
        return config_for(name, m, n, k, False)
    return path, kw


def _mma_launch(kw: dict):
    """The mma kernel an entry's keywords name: the wgmma one where they give "rows", the wide one where they
    give "tiles", else the 1-16 row kernel."""
    if "rows" in kw:
        return w4a16_wgmma_triton
    return w4a16_mma_wide_triton if "tiles" in kw else w4a16_mma_triton


def x_in_kk_order(m: int, n: int, k: int, device: torch.device | None, mma: bool) -> bool:
    """Whether the [M, K] x [K, N] product runs the wgmma kernel with x by TMA, which reads x with each 64-wide
    chunk's columns in the A tile's order (kernels/w4a16_wgmma.kk_order, a copy per call): the kernel that writes
    x may write it in that order instead (`kk_columns`) and say so with x_kk."""
    return device is not None and _reads_kk(*w4a16_config(m, n, k, device, mma), device)


def _reads_kk(path: str, kw: dict, device: torch.device) -> bool:
    """Whether a product the table gives (path, kw) on `device` reads x in kk order (x_in_kk_order)."""
    return triton is not None and device.type == "cuda" and path == "mma" and bool(kw.get("x_tma"))


def w4a16_silu_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, mma: tuple[torch.Tensor, torch.Tensor] | None = None,
                      x_kk: bool = False) -> torch.Tensor:
    """An MLP's gate/up product and activation: x [..., K] -> silu(gate) * up [..., N/2] in x.dtype, where W is the
    fused gate/up weight (gate in columns [0, N/2), the w13 layout). On the GEMV and mma paths (decode) one kernel
    does both (the activation in its epilogue); elsewhere w4a16_matmul, then silu_mul. mma: the weight's
    (qfrag, sz) in the gate/up mma layout (`mma_layout(..., silu=True)`), or None. x_kk: x's columns are already in
    the wgmma kernel's k order (only where x_in_kk_order says the product takes it)."""
    k = x.shape[-1]
    m, n = x.numel() // max(k, 1), qweight.shape[1]
    path, kw = w4a16_config(m, n, k, x.device, mma is not None)
    if x_kk and not _reads_kk(path, kw, x.device):
        raise LmcError(f"w4a16_silu_matmul: x in kk order, but the {m}x{k}x{n} product here does not read it so "
                       "(x_in_kk_order)")
    if triton is None or not x.is_cuda or path not in ("gemv", "mma"):
        return silu_mul(w4a16_matmul(x, qweight, scales, zeros, group_size))
    if path == "mma":
        out = _mma_launch(kw)(x.reshape(m, k).contiguous(), *mma, group_size, silu_mul=True, **kw,
                              **({"x_kk": True} if x_kk else {}))
    else:
        out = w4a16_gemv_triton(x.reshape(m, k).contiguous(), qweight, scales, zeros, group_size, silu_mul=True,
                                **kw)
    return out.reshape(*x.shape[:-1], n // 2)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, out: torch.Tensor | None = None,
                 mma: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype: Triton on CUDA, the torch reference elsewhere.

    out, if given, is a [M, N] tensor (M = rows of x) that the Triton paths write into (CUDA graphs).
    mma: the weight's (qfrag, sz) in the plain mma layout (kernels/w4a16_mma.py), or None."""
    if triton is None or not x.is_cuda:
        ref = w4a16_matmul_ref(x, qweight, scales, zeros, group_size)
        return ref if out is None else out.copy_(ref.reshape(out.shape))
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m, n = x2.shape[0], qweight.shape[1]
    path, kw = w4a16_config(m, n, k, x.device, mma is not None)
    if path == "mma":
        return _mma_launch(kw)(x2, *mma, group_size, out=out, **kw).reshape(*x.shape[:-1], n)
    launch = {"gemv": w4a16_gemv_triton, "gemm": w4a16_gemm_triton, "dequant": w4a16_dequant_matmul_triton}[path]
    return launch(x2, qweight, scales, zeros, group_size, out=out, **kw).reshape(*x.shape[:-1], n)
