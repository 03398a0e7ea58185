"""Float GEMV for batch-1 decode, y [1, N] = x [1, K] W^T with W [N, K] as nn.Linear stores it (K contiguous).
At M = 1 cuBLAS reads the 8B linears at 2.1-3.9 TB/s on an H200; this kernel read them at 3.2-4.3 TB/s in the
same run (bench/probe_fp16_gemv.py, probe_fp16_gemv_h200.json: 1.11-1.56x faster on all eight tp 1 and tp 2
shapes, PDL on). The runtime's `linear` takes it for one-token float products whose (K, N) this GPU's table
holds (`gemv_config`); every other product stays with cuBLAS.

One program per BLOCK_N rows of W, the whole of K in BLOCK_K steps: a [BLOCK_N, BLOCK_K] tile times x's
chunk, accumulated in float32 elementwise and summed over K once at the end, rounded once to y's dtype. With
PDL the first weight tile is requested before the wait for the kernel that wrote x (weights are constant).

With `silu_mul=True` the weight is an MLP's fused gate/up w13 [2I, K] (gate rows [0, I), up rows [I, 2I), the
layout kernels/silu_mul.py reads) and the GEMV writes silu(gate) * up [1, I] itself: the one-token float MLP is
one kernel instead of GEMV + silu_mul, bit-identical to the two (the same roundings in the same order).
"""
from __future__ import annotations

import torch

from lmc.errors import LmcError
from lmc.kernels.l2_prefetch import l2_prefetch, prefetch_pieces
from lmc.kernels.pdl import pdl_launch, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch reference serves
    triton = None

if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, w_bytes,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, PREFETCH: tl.constexpr,
                     PDL: tl.constexpr):
        """SILU: N is I, the outputs; program p reads gate rows p * BLOCK_N/2 + [0, BLOCK_N/2) and the matching
        up rows (I further on) as one [BLOCK_N, BLOCK_K] tile, and writes silu(gate) * up to y [1, I].
        PREFETCH (0 = off): the program's share of the w_bytes of W into L2 first, in PREFETCH pieces
        (lmc.kernels.l2_prefetch)."""
        if PREFETCH:
            l2_prefetch(w_ptr, w_bytes, tl.program_id(0), tl.num_programs(0), PREFETCH)
        HALF: tl.constexpr = BLOCK_N // 2
        if SILU:
            lane = tl.arange(0, BLOCK_N)  # [BLOCK_N]
            out_rows = tl.program_id(0) * HALF + lane % HALF  # [BLOCK_N]: the output each row feeds
            rows = out_rows + (lane // HALF) * N  # [BLOCK_N]: HALF gate rows, then the matching HALF up rows
            row_mask = out_rows < N
        else:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
            row_mask = rows < N
        cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
        pdl_wait(PDL)  # x is the previous kernel's output
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0)  # [BLOCK_K]
            nxt = k0 + BLOCK_K + cols
            w_next = tl.load(w_rows + nxt[None, :], mask=row_mask[:, None] & (nxt < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w = w_next
        y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)  # [BLOCK_N], rounded once as the plain GEMV stores it
        if SILU:  # then silu_mul's math on the rounded gate and up: float32, rounded once
            gate, up = tl.split(tl.permute(tl.reshape(y.to(tl.float32), (2, HALF)), (1, 0)))  # [HALF] each
            outs = tl.program_id(0) * HALF + tl.arange(0, HALF)  # [HALF]
            tl.store(y_ptr + outs, (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty), mask=outs < N)
        else:
            tl.store(y_ptr + rows, y, mask=row_mask)


# (K, N) -> (BLOCK_N, BLOCK_K, num_warps), per GPU name: the probe's fastest of 36 launch settings per shape
TUNED = {"NVIDIA H200": {
    (4096, 6144): (16, 512, 4), (4096, 4096): (8, 512, 8), (4096, 28672): (4, 1024, 4), (14336, 4096): (4, 1024, 4),
    (4096, 3072): (8, 1024, 4), (2048, 4096): (8, 512, 8), (4096, 14336): (8, 512, 4), (7168, 4096): (8, 512, 8),
    (4096, 128256): (8, 256, 4), (4096, 64128): (4, 512, 2),  # the lm_head, whole and over 2 ranks
}}
_DEVICE_TABLES: dict[int, dict] = {}


def gemv_config(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int] | None:
    """The launch settings for x [1, K] @ w [N, K]^T on x's GPU, or None (cuBLAS): not one token, not CUDA, not
    float16 / bfloat16 in both, w not unit-stride along K, or (K, N) not in this GPU's table."""
    if (triton is None or not x.is_cuda or x.dim() != 2 or x.shape[0] != 1 or x.dtype != w.dtype
            or x.dtype not in (torch.float16, torch.bfloat16) or w.dim() != 2 or w.stride(1) != 1):
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_TABLES:
        _DEVICE_TABLES[index] = TUNED.get(torch.cuda.get_device_name(index), {})
    return _DEVICE_TABLES[index].get((w.shape[1], w.shape[0]))


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, K] (or [K]), w [N, K] -> [1, N] in x's dtype, accumulated in float32."""
    return (x.reshape(1, -1).float() @ w.float().t()).to(x.dtype)


def gemv_triton(x: torch.Tensor, w: torch.Tensor, block_n: int = 8, block_k: int = 512, num_warps: int = 4,
                num_stages: int = 1, silu_mul: bool = False) -> torch.Tensor:
    """y [1, N] = x [1, K] w^T for w [N, K] with unit stride along K. silu_mul: w is w13 [2I, K] (gate rows,
    then up rows) and y [1, I] = silu(x gate^T) * (x up^T), exactly silu_mul(gemv_triton(x, w13))."""
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    N, K = w.shape
    x = x.reshape(-1)
    assert x.shape == (K,) and x.is_contiguous() and w.stride(1) == 1, (tuple(x.shape), tuple(w.shape), w.stride())
    if silu_mul:
        # The (K, 2I) settings were tuned for the plain GEMV over 2I rows: with block_n // 2 gate rows and as many
        # up rows per program, each program reads the same bytes as the tuned launch and the grid is as large.
        assert N % 2 == 0, f"w13 has {N} rows, not gate and up halves"
        N //= 2
        block_n = 2 * max(block_n // 2, 1)
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, block_n // 2 if silu_mul else block_n),)
    _gemv_kernel[grid](x, w, y, N, K, w.stride(0), w.numel() * w.element_size(), BLOCK_N=block_n, BLOCK_K=block_k,
                       SILU=silu_mul, PREFETCH=prefetch_pieces(w, num_warps), num_warps=num_warps,
                       num_stages=num_stages, **pdl_launch(x.device))
    return y
