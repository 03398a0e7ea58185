"""W4A16 matrix multiply: int4 weights in the "lmc-int4-k8" layout, float activations.

out[M, N] = x[M, K] @ W^T, where W[N, K] is stored as (docs/workspace-format.md):

  qweight  int32 [ceil(K / 8), N]   element [r, n] packs the 4-bit codes of W[n, 8r + j], j = 0..7,
                                    code j in bits 4j .. 4j+3 (nibble 0 least significant);
                                    codes past K are 0
  scales   float [ceil(K / G), N]   in the activation dtype
  zeros    float [ceil(K / G), N]   integer values 0..15
  W[n, k] = (code(k, n) - zeros[k // G, n]) * scales[k // G, n];  G in {32, 64, 128}, last group may be partial

Two Triton paths, both accumulating in float32:
  - decode (`w4a16_gemv_triton`, M = 1): CUDA-core GEMV; each program owns BLOCK_N output columns,
    streams coalesced [BLOCK_KP, BLOCK_N] tiles of packed words along N with the next tile's loads
    issued before the current tile is multiplied, and keeps a 2-D partial sum per thread so that the
    reduction over K happens once, at the end (float16 x on the GPU: each word's eight products in
    packed float16 by inline PTX, float32 from there on);
  - prefill (`w4a16_gemm_triton`, M > 1): tiled GEMM that dequantizes a [BLOCK_K, BLOCK_N] tile in
    registers (inline PTX for float16 on the GPU, float32 bit tricks otherwise) and feeds tl.dot.
Both can split K over several programs (`split_k`) and sum the float32 partials in a second kernel.
For large M (prefill of long prompts) a third path, `w4a16_dequant_matmul_triton`, writes W^T once in
the activation dtype and calls the library GEMM: the in-register-dequant GEMM runs 1.6-2x cuBLAS there
(Triton serialises dequant and wgmma inside a CTA), while the extra 2·K·N bytes are small next to M·K·N.
`w4a16_matmul` picks a path and block shapes from a table by M and N (measured on an H100), and falls
back to the torch reference (`w4a16_matmul_ref`) off CUDA or without Triton.
"""

from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from lmc.errors import LmcError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: w4a16_matmul runs the torch reference
    triton = None
    tl = None

GROUP_SIZES = (32, 64, 128)
PACK = 8  # int4 codes per int32 word along K


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- checks


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    if group_size not in GROUP_SIZES:
        raise LmcError(f"int4 group size must be 32, 64 or 128, got {group_size}; requantize with --w-group-size 128")
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
                  out: torch.Tensor | None):
    _check(x, qweight, scales, zeros, group_size)
    if triton is None:
        raise LmcError("the Triton W4A16 kernels need triton; install it (pip install triton) or run on CPU")
    if x.dim() != 2 or x.stride(1) != 1:
        raise LmcError("x must be a 2-D tensor with contiguous rows; call .contiguous() first")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LmcError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        raise LmcError("qweight, scales and zeros must be contiguous; load them with .contiguous()")
    if out is not None and (out.shape != (x.shape[0], qweight.shape[1]) or out.dtype != x.dtype or out.stride(1) != 1):
        raise LmcError(f"out must be a [{x.shape[0]}, {qweight.shape[1]}] {x.dtype} tensor with contiguous rows")


# ----------------------------------------------------------------------------- torch reference


def dequantize_int4_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                        in_features: int) -> torch.Tensor:
    """W^T as float32 [K, N] from the lmc-int4-k8 tensors (K = in_features)."""
    _check(torch.empty(0, in_features), qweight, scales, zeros, group_size)
    kp, n = qweight.shape
    shifts = 4 * torch.arange(PACK, dtype=torch.int32, device=qweight.device)  # [8]
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]: code of W[n, 8r + j]
    codes = codes.reshape(kp * PACK, n)[:in_features]  # [K, N]
    group = torch.arange(in_features, device=qweight.device) // group_size  # [K]
    return (codes.float() - zeros.float()[group]) * scales.float()[group]  # [K, N]


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
def _dequant_tile(packed, scale, zero, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """packed [KP, BN] int32 (word [r, n] = codes of W[n, 8r + j] in bits 4j..4j+3), scale and zero
    [KP, BN] -> W^T tile [8 * KP, BN] in DTYPE, row 8r + j. Each thread unpacks the words it loaded;
    the joins keep the 8 codes of a word in that thread. ASM: float16 only, on the GPU."""
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
    w = tl.permute(w.to(DTYPE), (0, 4, 3, 2, 1))  # [r, n, b0, b1, b2] = code b0 + 2 b1 + 4 b2 -> [r, b2, b1, b0, n]
    return tl.reshape(w, (packed.shape[0] * 8, packed.shape[1]))  # [8 * KP, BN], row 8r + j


@_jit
def _dot8_f16_asm(packed, zero, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum_j (code j - zero) * x_j / 16 over the eight codes of every int32 word, as float32 (GPU only).

    Per word: LOP3 (word >> 4i) & 0x000F000F | 0x64006400 holds codes i and i + 4 as float16 1024 + code;
    one packed FMA by 1/16 minus (1024 + zero) / 16 gives (code - zero) / 16 exactly; four packed
    multiply-adds with the x pairs (x_i, x_i+4) and one float32 add of the two halves finish it:
    ~2.5 instructions per weight. The 1/16 keeps the four-term float16 sums finite for |x| < ~17000."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 w, s2, z2, q0, q1, q2, q3, p0, p1, p2, p3, acc;
        .reg .b16 zh, m16, m64, lo, hi;
        .reg .f32 flo, fhi;
        mov.b16 m16, 0xAC00;
        mov.b16 m64, 0xD400;
        fma.rn.f16 zh, $2, m16, m64;
        mov.b32 z2, {zh, zh};
        mov.b32 s2, 0x2C002C00;
        lop3.b32 q0, $1, 0x000f000f, 0x64006400, 0xea;
        shr.u32 w, $1, 4;
        lop3.b32 q1, w, 0x000f000f, 0x64006400, 0xea;
        shr.u32 w, $1, 8;
        lop3.b32 q2, w, 0x000f000f, 0x64006400, 0xea;
        shr.u32 w, $1, 12;
        lop3.b32 q3, w, 0x000f000f, 0x64006400, 0xea;
        fma.rn.f16x2 q0, q0, s2, z2;
        fma.rn.f16x2 q1, q1, s2, z2;
        fma.rn.f16x2 q2, q2, s2, z2;
        fma.rn.f16x2 q3, q3, s2, z2;
        mov.b32 p0, {$3, $7};
        mov.b32 p1, {$4, $8};
        mov.b32 p2, {$5, $9};
        mov.b32 p3, {$6, $10};
        mul.rn.f16x2 acc, q0, p0;
        fma.rn.f16x2 acc, q1, p1, acc;
        fma.rn.f16x2 acc, q2, p2, acc;
        fma.rn.f16x2 acc, q3, p3, acc;
        mov.b32 {lo, hi}, acc;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.f32 flo, flo, fhi;
        mov.b32 $0, flo;
        }""",
        constraints="=r,r,h,h,h,h,h,h,h,h,h",
        args=[packed, zero, x0, x1, x2, x3, x4, x5, x6, x7],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


@_jit
def _gemv_x(x_row, rows, j: tl.constexpr, K, ASM: tl.constexpr):
    k = rows * 8 + j  # [KP]
    x = tl.load(x_row + k, mask=k < K, other=0.0)  # [KP]: x[8r + j]
    return x if ASM else x.to(tl.float32)


@_jit
def _gemv_tile(x_row, qw_ptr, s_ptr, z_ptr, r0, offs_r, offs_n, N, K, GROUP: tl.constexpr, ASM: tl.constexpr):
    """Loads of one decode step: packed words [KP, BN], scale [KP, BN] (float32), zero [KP, BN] (float16
    with ASM, else 2**23 + zero in float32), and x[8r + j] for j = 0..7 as eight [KP] vectors."""
    kp_total = tl.cdiv(K, 8)
    rows = r0 + offs_r  # [KP] packed rows
    w_mask = (rows < kp_total)[:, None] & (offs_n < N)[None, :]
    packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)  # [KP, BN] int32
    sz_off = ((rows * 8) // GROUP)[:, None] * N + offs_n[None, :]  # [KP, BN]: all 8 codes share a group
    scale = tl.load(s_ptr + sz_off, mask=w_mask, other=0.0).to(tl.float32)  # [KP, BN]
    zero = tl.load(z_ptr + sz_off, mask=w_mask, other=0.0)  # [KP, BN]
    if not ASM:
        zero = zero.to(tl.float32) + 8388608.0  # 2**23 + zero
    xs = (_gemv_x(x_row, rows, 0, K, ASM), _gemv_x(x_row, rows, 1, K, ASM), _gemv_x(x_row, rows, 2, K, ASM),
          _gemv_x(x_row, rows, 3, K, ASM), _gemv_x(x_row, rows, 4, K, ASM), _gemv_x(x_row, rows, 5, K, ASM),
          _gemv_x(x_row, rows, 6, K, ASM), _gemv_x(x_row, rows, 7, K, ASM))
    return packed, scale, zero, xs


@_jit
def _gemv_bcast(v, like):
    return tl.broadcast_to(v[:, None], like.shape)  # [KP] -> [KP, BN]


@_jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, dst_ptr,
    M, N, K, stride_xm, stride_dm, stride_ds,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_ASM: tl.constexpr,
):
    """Decode path, one row of x per program. qweight [ceil(K/8), N] int32: word [r, n] holds
    W[n, 8r + j] in bits 4j..4j+3.

    Program (m, pid_n) owns out[m, BLOCK_N cols]. Each step loads a [BLOCK_KP, BLOCK_N] tile of
    packed words (16-byte loads along N) and its x values while the previous tile is being
    multiplied (explicit prefetch: two tiles in flight), and accumulates per thread in a
    [BLOCK_KP, BLOCK_N] float32 tile; the reduction over K runs once, at the end. With SPLIT_K > 1,
    program (m, pid_n, s) covers the s-th of SPLIT_K runs of whole tiles along K and writes float32
    partial sums to dst[s] (reduced by _splitk_sum_kernel). DOT_ASM (float16 x, GPU only): each word's
    eight products are summed by _dot8_f16_asm in packed float16, then scaled in float32."""
    m = tl.program_id(0)  # rows of x are the fastest grid axis: programs sharing weights run together
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_r = tl.arange(0, BLOCK_KP)  # [KP]
    x_row = x_ptr + m * stride_xm
    kp_total = tl.cdiv(K, 8)
    kp_run = tl.cdiv(tl.cdiv(kp_total, SPLIT_K), BLOCK_KP) * BLOCK_KP  # packed rows per split, whole tiles
    r_start = tl.program_id(2) * kp_run
    acc = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)
    packed, scale, zero, xs = _gemv_tile(x_row, qw_ptr, s_ptr, z_ptr, r_start, offs_r, offs_n, N, K, GROUP,
                                         DOT_ASM)
    for r0 in range(r_start, min(kp_total, r_start + kp_run), BLOCK_KP):
        nxt = _gemv_tile(x_row, qw_ptr, s_ptr, z_ptr, r0 + BLOCK_KP, offs_r, offs_n, N, K, GROUP, DOT_ASM)
        if DOT_ASM:
            part = _dot8_f16_asm(packed, zero, _gemv_bcast(xs[0], packed), _gemv_bcast(xs[1], packed),
                                 _gemv_bcast(xs[2], packed), _gemv_bcast(xs[3], packed), _gemv_bcast(xs[4], packed),
                                 _gemv_bcast(xs[5], packed), _gemv_bcast(xs[6], packed),
                                 _gemv_bcast(xs[7], packed))  # [KP, BN]: sum_j (code j - zero) x_j / 16
        else:
            part = xs[0][:, None] * _code_minus_zero(packed, 0, zero)  # [KP, BN]
            for j in tl.static_range(1, 8):
                part += xs[j][:, None] * _code_minus_zero(packed, j, zero)
        acc += part * scale
        packed, scale, zero, xs = nxt
    out = tl.sum(acc, axis=0)  # [BN]
    if DOT_ASM:
        out = out * 16.0
    dst = dst_ptr + tl.program_id(2) * stride_ds + m * stride_dm + offs_n
    tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=offs_n < N)


@_jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, dst_ptr,
    M, N, K, stride_xm, stride_dm, stride_ds,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DEQ_ASM: tl.constexpr,
):
    """Prefill path. qweight [ceil(K/8), N] int32: word [r, n] holds W[n, 8r + j] in bits 4j..4j+3.

    Each step loads x[BM, BK] and a [BK/8, BN] tile of packed words, dequantizes it in registers to
    W^T[BK, BN] (_dequant_tile) and accumulates tl.dot in float32. Programs walk GROUP_M row blocks
    per column band so that a band of weights is reused from L2. With SPLIT_K > 1, program
    (pid, s) covers the s-th of SPLIT_K runs of whole BLOCK_K tiles along K and writes float32
    partial sums to dst[s] (reduced by _splitk_sum_kernel); otherwise it writes out directly."""
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, min(K, k_start + k_run), BLOCK_K):
        k = k0 + offs_k  # [BK]
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=m_mask[:, None] & (k < K)[None, :], other=0.0)  # [BM, BK]
        rows = k0 // 8 + offs_r  # [KP] packed rows
        w_mask = (rows < kp_total)[:, None] & n_mask[None, :]
        packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)  # [KP, BN] int32
        sz_off = ((rows * 8) // GROUP)[:, None] * N + offs_n[None, :]  # [KP, BN]
        scale = tl.load(s_ptr + sz_off, mask=w_mask, other=0.0)  # [KP, BN]
        zero = tl.load(z_ptr + sz_off, mask=w_mask, other=0.0)  # [KP, BN]
        w = _dequant_tile(packed, scale, zero, xt.dtype, DEQ_ASM)  # [BK, BN]
        acc = tl.dot(xt, w, acc)
    dst = dst_ptr + tl.program_id(1) * stride_ds + offs_m[:, None] * stride_dm + offs_n[None, :]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@_jit
def _splitk_sum_kernel(part_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[M, N] = sum over s of part[s, M, N] (float32 partials, fixed order: deterministic)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index into [M, N]
    mask = idx < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + idx, mask=mask, other=0.0)
    tl.store(out_ptr + (idx // N) * stride_om + idx % N, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _splitk_sum(part: torch.Tensor, out: torch.Tensor):
    split_k, m, n = part.shape
    _splitk_sum_kernel[(_cdiv(m * n, 1024),)](part, out, m, n, out.stride(0), SPLIT_K=split_k, BLOCK=1024,
                                              num_warps=4)


def w4a16_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, *, block_n: int = 32, block_kp: int = 64, split_k: int = 1,
                      num_warps: int = 4, num_stages: int = 1, dot_asm: bool | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode path: x [M, K] (M small; rows re-read the weights, from L2) -> [M, N] in x.dtype.
    split_k > 1 splits K over that many programs and sums their float32 partials in a second kernel.
    dot_asm: packed-float16 products per word (inline PTX); None = on for float16 x on CUDA."""
    _check_triton(x, qweight, scales, zeros, group_size, out)
    m, k = x.shape
    n = qweight.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    asm_ok = x.is_cuda and x.dtype == torch.float16
    if dot_asm is None:
        dot_asm = asm_ok
    elif dot_asm and not asm_ok:
        raise LmcError("dot_asm needs float16 activations on CUDA; pass dot_asm=None")
    dst = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _w4a16_gemv_kernel[(m, _cdiv(n, block_n), split_k)](
        x, qweight, scales, zeros, dst, m, n, k, x.stride(0), dst.stride(-2), dst.stride(0) if split_k > 1 else 0,
        GROUP=group_size, BLOCK_N=block_n, BLOCK_KP=block_kp, SPLIT_K=split_k, DOT_ASM=dot_asm,
        num_warps=num_warps, num_stages=num_stages)
    if split_k > 1:
        _splitk_sum(dst, out)
    return out


def w4a16_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, *, block_m: int = 64, block_n: int = 128, block_k: int = 128,
                      group_m: int = 8, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill path: x [M, K] -> [M, N] in x.dtype (tensor cores). split_k > 1 splits K over that
    many programs per output tile (more programs for small M x N) and sums their float32 partials
    in a second kernel."""
    _check_triton(x, qweight, scales, zeros, group_size, out)
    m, k = x.shape
    n = qweight.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    dst = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (_cdiv(m, block_m) * _cdiv(n, block_n), split_k)
    _w4a16_gemm_kernel[grid](
        x, qweight, scales, zeros, dst, m, n, k, x.stride(0), dst.stride(-2), dst.stride(0) if split_k > 1 else 0,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, SPLIT_K=split_k,
        DEQ_ASM=x.is_cuda and x.dtype == torch.float16, num_warps=num_warps, num_stages=num_stages)
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


# (largest M, largest N, smallest K, path, launcher keywords); the first row whose bounds hold wins
# (None: any). Measured at the Llama-3-8B shapes (bench/NOTES.md, "W4A16 kernel" on an H100 and
# "Decode step v2" on an H200 for M = 1): each row is within 6 % of the best configuration the sweep
# found for every shape it covers (M = 1: within 8 %). split_k buys programs where M x N alone gives
# too few for 132 SMs.
_TABLE = (
    (1, None, 8192, "gemv", dict(block_n=8, block_kp=256, num_warps=4)),
    (1, 8192, None, "gemv", dict(block_n=16, block_kp=128, num_warps=4)),
    (1, None, None, "gemv", dict(block_n=32, block_kp=64, num_warps=4)),
    (16, None, None, "gemm", dict(block_m=16, block_n=32, block_k=256, group_m=1, split_k=2, num_warps=4,
                                  num_stages=3)),
    (64, 8192, None, "gemm", dict(block_m=64, block_n=128, block_k=64, group_m=8, split_k=4, num_warps=4,
                                  num_stages=4)),
    (64, None, None, "gemm", dict(block_m=128, block_n=128, block_k=64, group_m=8, split_k=2, num_warps=8,
                                  num_stages=3)),
    (256, 8192, None, "gemm", dict(block_m=128, block_n=128, block_k=64, group_m=8, split_k=4, num_warps=8,
                                   num_stages=3)),
    (None, None, None, "dequant", dict()),
)


def w4a16_config(m: int, n: int, k: int) -> tuple[str, dict]:
    """The path ("gemv", "gemm" or "dequant") and launcher keywords that w4a16_matmul uses for an [M, K] x [K, N] product."""
    for max_m, max_n, min_k, path, kw in _TABLE:
        if (max_m is None or m <= max_m) and (max_n is None or n <= max_n) and (min_k is None or k >= min_k):
            return path, dict(kw)
    raise AssertionError("the last table row has no bounds")


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype: Triton on CUDA, the torch reference elsewhere.

    out, if given, is a [M, N] tensor (M = rows of x) that the Triton paths write into (CUDA graphs)."""
    if triton is None or not x.is_cuda:
        ref = w4a16_matmul_ref(x, qweight, scales, zeros, group_size)
        return ref if out is None else out.copy_(ref.reshape(out.shape))
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m, n = x2.shape[0], qweight.shape[1]
    path, kw = w4a16_config(m, n, k)
    launch = {"gemv": w4a16_gemv_triton, "gemm": w4a16_gemm_triton, "dequant": w4a16_dequant_matmul_triton}[path]
    return launch(x2, qweight, scales, zeros, group_size, out=out, **kw).reshape(*x.shape[:-1], n)
