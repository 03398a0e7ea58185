"""W4A16 matrix multiply: int4 weights in the "lmc-int4-k8" layout, float activations.

out[M, N] = x[M, K] @ W^T, where W[N, K] is stored as (docs/workspace-format.md):

  qweight  int32 [ceil(K / 8), N]   element [r, n] packs the 4-bit codes of W[n, 8r + j], j = 0..7,
                                    code j in bits 4j .. 4j+3 (nibble 0 least significant);
                                    codes past K are 0
  scales   float [ceil(K / G), N]   in the activation dtype
  zeros    float [ceil(K / G), N]   integer values 0..15
  W[n, k] = (code(k, n) - zeros[k // G, n]) * scales[k // G, n];  G in {32, 64, 128}, last group may be partial

Two Triton paths, both fp32-accumulating:
  - decode (`w4a16_gemv_triton`): CUDA-core GEMV for a few rows; each program owns BLOCK_N output
    columns, streams coalesced [BLOCK_KP, BLOCK_N] tiles of packed words along N, and keeps a 2-D
    partial sum per thread so that the reduction over K happens once, at the end;
  - prefill (`w4a16_gemm_triton`): tiled GEMM, dequantizes a [BLOCK_K, BLOCK_N] tile in registers and
    feeds tl.dot (tensor cores).
`w4a16_matmul` picks a path and block shapes from a table by M (and N, K), and falls back to the torch
reference (`w4a16_matmul_ref`) off CUDA or without Triton.
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
        raise LmcError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}; rebuild the workspace")
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
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
):
    """Decode path. qweight [ceil(K/8), N] int32: word [r, n] holds W[n, 8r + j] in bits 4j..4j+3.

    Program (pid_n, pid_m) owns out[BLOCK_M rows, BLOCK_N cols]. Each step loads a [BLOCK_KP, BLOCK_N]
    tile of packed words (16-byte loads along N, pipelined across steps) and the matching scale and
    zero rows (all 8 codes of a word share one group, since G is a multiple of 8)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_r = tl.arange(0, BLOCK_KP)  # [KP]
    m_mask = offs_m < M
    n_mask = offs_n < N
    kp_total = tl.cdiv(K, 8)
    acc = tl.zeros((BLOCK_M, BLOCK_KP, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, kp_total, BLOCK_KP):
        rows = r0 + offs_r  # [KP] packed rows
        w_mask = (rows < kp_total)[:, None] & n_mask[None, :]
        packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)  # [KP, BN] int32
        sz_off = ((rows * 8) // GROUP)[:, None] * N + offs_n[None, :]  # [KP, BN]
        scale = tl.load(s_ptr + sz_off, mask=w_mask, other=0.0).to(tl.float32)  # [KP, BN]
        zero_m = tl.load(z_ptr + sz_off, mask=w_mask, other=0.0).to(tl.float32) + 8388608.0  # [KP, BN] 2**23 + zero
        part = tl.zeros((BLOCK_M, BLOCK_KP, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            bits = ((packed >> (4 * j)) & 0xF) | 0x4B000000  # [KP, BN] float32 bits of 2**23 + code
            w = bits.to(tl.float32, bitcast=True) - zero_m  # [KP, BN] code - zero
            k = rows * 8 + j  # [KP]
            xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                         mask=m_mask[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)  # [BM, KP]
            part += xj[:, :, None] * w[None, :, :]
        acc += part * scale[None, :, :]
    out = tl.sum(acc, axis=1)  # [BM, BN]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@_jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DEQ_F16: tl.constexpr,
):
    """Prefill path. qweight [ceil(K/8), N] int32: word [r, n] holds W[n, 8r + j] in bits 4j..4j+3.

    Each step loads x[BM, BK] and a [BK/8, BN] tile of packed words, unpacks it to [BK/8, 8, BN]
    (row 8r + j = code j of word r, so a reshape gives W^T[BK, BN] in K order), dequantizes in
    registers and accumulates tl.dot in float32. Programs walk GROUP_M row blocks per column band
    so that a band of weights is reused from L2."""
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
    shifts = 4 * tl.arange(0, 8)  # [8]
    m_mask = offs_m < M
    n_mask = offs_n < N
    kp_total = tl.cdiv(K, 8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # [BK]
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=m_mask[:, None] & (k < K)[None, :], other=0.0)  # [BM, BK]
        rows = k0 // 8 + offs_r  # [KP] packed rows
        w_mask = (rows < kp_total)[:, None] & n_mask[None, :]
        packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)  # [KP, BN] int32
        sz_off = ((rows * 8) // GROUP)[:, None] * N + offs_n[None, :]  # [KP, BN]
        scale = tl.load(s_ptr + sz_off, mask=w_mask, other=0.0)  # [KP, BN]
        zero = tl.load(z_ptr + sz_off, mask=w_mask, other=0.0)  # [KP, BN]
        codes = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [KP, 8, BN]
        if DEQ_F16:
            # float16 bits 0x6400 | c = 1024 + c; minus (1024 + zero) is exact, one rounding in the multiply
            c16 = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # [KP, 8, BN]
            w = (c16 - (zero.to(tl.float16) + 1024.0)[:, None, :]) * scale.to(tl.float16)[:, None, :]
        else:
            c32 = (codes | 0x4B000000).to(tl.float32, bitcast=True)  # [KP, 8, BN] 2**23 + code
            zero_m = zero.to(tl.float32) + 8388608.0  # [KP, BN]
            w = (c32 - zero_m[:, None, :]) * scale.to(tl.float32)[:, None, :]  # [KP, 8, BN]
        w = tl.reshape(w.to(xt.dtype), (BLOCK_K, BLOCK_N))  # [BK, BN], row 8r + j
        acc = tl.dot(xt, w, acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- launchers


def w4a16_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, *, block_m: int = 1, block_n: int = 32, block_kp: int = 64,
                      num_warps: int = 4, num_stages: int = 3, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode path: x [M, K] (M small) -> [M, N] in x.dtype."""
    _check_triton(x, qweight, scales, zeros, group_size, out)
    m, k = x.shape
    n = qweight.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    grid = (_cdiv(n, block_n), _cdiv(m, block_m))
    _w4a16_gemv_kernel[grid](
        x, qweight, scales, zeros, out, m, n, k, x.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KP=block_kp,
        num_warps=num_warps, num_stages=num_stages)
    return out


def w4a16_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, *, block_m: int = 64, block_n: int = 128, block_k: int = 128,
                      group_m: int = 8, deq_f16: bool = False, num_warps: int = 4, num_stages: int = 3,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill path: x [M, K] -> [M, N] in x.dtype (tensor cores). deq_f16 dequantizes in float16
    arithmetic (float16 activations only)."""
    _check_triton(x, qweight, scales, zeros, group_size, out)
    if deq_f16 and x.dtype != torch.float16:
        raise LmcError("deq_f16 needs float16 activations; pass deq_f16=False")
    m, k = x.shape
    n = qweight.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    grid = (_cdiv(m, block_m) * _cdiv(n, block_n),)
    _w4a16_gemm_kernel[grid](
        x, qweight, scales, zeros, out, m, n, k, x.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        DEQ_F16=deq_f16, num_warps=num_warps, num_stages=num_stages)
    return out


# ----------------------------------------------------------------------------- dispatch

# (largest M, path, launcher keywords); first row whose M bound holds wins. Measured on an H100
# (bench/NOTES.md, "W4A16 kernel"); N and K enter through w4a16_config.
_TABLE = (
    (1, "gemv", dict(block_m=1, block_n=32, block_kp=64, num_warps=4, num_stages=3)),
    (2, "gemv", dict(block_m=2, block_n=32, block_kp=32, num_warps=4, num_stages=3)),
    (16, "gemm", dict(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)),
    (64, "gemm", dict(block_m=64, block_n=64, block_k=128, group_m=8, num_warps=4, num_stages=4)),
    (256, "gemm", dict(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)),
    (None, "gemm", dict(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)),
)


def w4a16_config(m: int, n: int, k: int) -> tuple[str, dict]:
    """The path ("gemv" or "gemm") and launcher keywords that w4a16_matmul uses for an [M, K] x [K, N] product."""
    for max_m, path, kw in _TABLE:
        if max_m is None or m <= max_m:
            return path, dict(kw)
    raise AssertionError("the last table row has no M bound")


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
    launch = w4a16_gemv_triton if path == "gemv" else w4a16_gemm_triton
    return launch(x2, qweight, scales, zeros, group_size, out=out, **kw).reshape(*x.shape[:-1], n)
