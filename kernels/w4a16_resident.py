"""W4A16 for one row of x with every weight word in registers before the PDL wait ("resident").

Why: at batch 1 an int4 linear's time on the GPU is mostly fixed cost, not bytes (bench/NOTES.md, session 20:
the 8B step without its linears takes 0.34 ms at tp 1 and 0.47 ms at tp 2, with them 2.07 / 1.61 ms, for 4.8 / 2.4
GB of weights that the copy bandwidth moves in 1.13 / 0.57 ms). Under PDL a kernel's programs become resident while
the kernel before it still runs (kernels/pdl.py); the GEMV kernels load one or two groups there, then wait. Here
each program loads its whole share of the weight (all of K for BLOCK_N columns) before the wait, so that for a
linear that follows a short kernel (the RMSNorm or all-reduce before qkv, the attention before wo) the weight
stream overlaps that kernel, and after the wait only x is read and the products are summed.

Layout read (the workspace's lmc-int4-k8, docs/workspace-format.md): qweight int32 [ceil(K/8), N], word [r, n]
holds W[n, 8r + j] in bits 4j .. 4j+3; scales, zeros [ceil(K/G), N]. The program's words are one
[G_PROG, GROUP/8, BLOCK_N] tile: packed row r = (group, row in group), so that a group's scale and zero
broadcast over its GROUP/8 rows without being expanded.

One program: BLOCK_N output columns x all of K; no split-K (nothing to sum across programs, no counters).
For shapes whose share fits the registers: K/8 x BLOCK_N words over the program's threads (e.g. 4096 x BLOCK_N
16 at 8 warps: 32 words a thread). `resident_config` says which shapes take it.
"""
from __future__ import annotations

import os

import torch

from lmc.errors import LmcError
from lmc.format.int4 import PACK
from lmc.kernels.pdl import pdl_launch, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the runtime takes the torch reference
    triton = None
    tl = None

MAX_WORDS_PER_THREAD = 32  # registers of words a thread (qkv / wo shapes of an 8B at tp 1 and 2: BLOCK_N 8-32)
NUM_WARPS = 8


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _w4a16_resident_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, K,
                           G_PROG: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """out[0, n] = sum_k x[0, k] W[n, k] for the program's BLOCK_N columns. G_PROG: groups covered (a power of
    two >= ceil(K / GROUP)); rows, groups and columns past the weight read as zero."""
    GP: tl.constexpr = GROUP // 8  # packed rows a group
    pid = tl.program_id(0)
    g = tl.arange(0, G_PROG)  # [G]
    p = tl.arange(0, GP)  # [GP]
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < N
    rows = g[:, None] * GP + p[None, :]  # [G, GP] packed row index
    row_ok = rows < tl.cdiv(K, 8)
    words = tl.load(qw_ptr + rows[:, :, None] * N + cols[None, None, :],  # [G, GP, BN] int32
                    mask=row_ok[:, :, None] & col_ok[None, None, :], other=0)
    sz_ok = (g < tl.cdiv(K, GROUP))[:, None] & col_ok[None, :]  # [G, BN]
    scale = tl.load(s_ptr + g[:, None] * N + cols[None, :], mask=sz_ok, other=0).to(tl.float32)  # [G, BN]
    zero = tl.load(z_ptr + g[:, None] * N + cols[None, :], mask=sz_ok, other=0).to(tl.float32)  # [G, BN]
    zero_m = (zero + 8388608.0)[:, None, :]  # [G, 1, BN]: 2**23 + zero (exact: zero is an integer 0..15)
    pdl_wait(PDL)  # x is the kernel before's output: read only from here
    acc = tl.zeros((G_PROG, GP, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(8):  # code j of each word is W[n, 8 r + j]
        k = rows * 8 + j  # [G, GP]
        xj = tl.load(x_ptr + k, mask=k < K, other=0).to(tl.float32)  # [G, GP]
        # OR-ing the code into the mantissa of 2**23 gives the float32 2**23 + code: minus 2**23 + zero is
        # code - zero, exact, in two integer ops and one add (no int -> float conversion)
        bits = ((words >> (4 * j)) & 0xF) | 0x4B000000  # [G, GP, BN]
        acc += (bits.to(tl.float32, bitcast=True) - zero_m) * xj[:, :, None]
    y = tl.sum(tl.sum(acc, axis=1) * scale, axis=0)  # [BN]: each group's sum times its scale
    tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


def _groups_per_program(k: int, group_size: int) -> int:
    return triton.next_power_of_2(-(-k // group_size))


def resident_config(n: int, k: int, group_size: int, device: torch.device) -> int | None:
    """BLOCK_N for a one-row product of this shape on the resident path, or None where it does not apply: off
    unless LMC_W4A16_RESIDENT=1 (measured in bench/NOTES.md, session 20), CUDA only, and the program's share at
    BLOCK_N >= 16 columns must fit MAX_WORDS_PER_THREAD words a thread (K <= 4096 at G 128: the qkv and wo
    weights of an 8B at tp 1 and 2, whose kernels follow short ones)."""
    if triton is None or device.type != "cuda" or os.environ.get("LMC_W4A16_RESIDENT", "0") != "1":
        return None
    words_per_column = _groups_per_program(k, group_size) * group_size // PACK
    block_n = MAX_WORDS_PER_THREAD * 32 * NUM_WARPS // words_per_column
    if block_n < 16:
        return None
    return min(triton.next_power_of_2(block_n + 1) // 2, 64)  # the largest power of two <= block_n, at most 64


def w4a16_resident_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int, *, block_n: int = 16, num_warps: int = NUM_WARPS,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] -> [1, N] in x.dtype (see the module's docstring); out: a [1, N] tensor to write (CUDA graphs)."""
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    m, k = x.shape
    n = qweight.shape[1]
    groups = -(-k // group_size)
    if m != 1 or qweight.shape[0] != -(-k // PACK) or scales.shape != (groups, n) or zeros.shape != (groups, n):
        raise LmcError(f"w4a16_resident_triton: x [1, K] with qweight [ceil(K/8), N]; got x {tuple(x.shape)}, "
                       f"qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}")
    if block_n & (block_n - 1) or group_size % PACK:
        raise LmcError(f"block_n must be a power of two and the group a multiple of 8, got {block_n}, {group_size}")
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)  # [1, N]
    assert out.shape == (1, n) and out.stride(1) == 1 and x.stride(1) == 1
    _w4a16_resident_kernel[(triton.cdiv(n, block_n),)](
        x, qweight, scales, zeros, out, n, k, G_PROG=_groups_per_program(k, group_size), GROUP=group_size,
        BLOCK_N=block_n, num_warps=num_warps, num_stages=1, **pdl_launch(x.device))
    return out
