"""The lmc-int4-k8 codec (docs/workspace-format.md), the one place its bits are defined.

A linear W [N, K] quantized to 4 bits, asymmetric, in groups of G consecutive input columns
(the last group may be partial) is stored as three tensors:

  qweight int32 [ceil(K/8), N]   qweight[r, n] holds the codes of W[n, 8r + j] for j = 0..7,
                                 code j in bits 4j .. 4j+3 (nibble 0 least significant);
                                 codes past K are 0
  scales  float [ceil(K/G), N]   in the model dtype
  zeros   float [ceil(K/G), N]   zero points 0..15, in the model dtype

  W[n, k] = (code[n, k] - zeros[k // G, n]) * scales[k // G, n]

The compiler packs with `to_lmc_tensors`, the kernels' torch references and the tests decode
with `dequantize_lmc`; the Triton kernels read the same bits (kernels/w4a16.py). The layout's facts
that need no torch (its name, group sizes, PACK, tensor shapes) live in lmc.format.int4_layout and are
re-exported here.
"""
from __future__ import annotations

import torch

from lmc.errors import LmcError
from lmc.format.int4_layout import GROUP_SIZES, LAYOUT, PACK, check_group_size, int4_shapes  # noqa: F401 - re-exported

_SHIFTS = tuple(range(0, 32, 4))  # nibble j lives in bits 4j .. 4j+3


def pack_lmc(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (0..15) -> qweight int32 [ceil(K/8), N] (layout above)."""
    n, k = codes.shape
    rows = -(-k // PACK)
    c = torch.zeros(rows * PACK, n, dtype=torch.int64, device=codes.device)  # [K8, N]
    c[:k] = codes.t().to(torch.int64)
    c = c.reshape(rows, PACK, n)  # [K8/8, 8, N]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=codes.device)[None, :, None]  # [1, 8, 1]
    return to_int32((c << shifts).sum(dim=1))  # [K8/8, N]


def unpack_lmc(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """qweight int32 [ceil(K/8), N] (layout above) -> codes uint8 [N, K]."""
    rows, n = qweight.shape
    if rows != -(-in_features // PACK):
        raise LmcError(f"qweight has {rows} packed rows, expected ceil({in_features} / 8)")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=qweight.device)[None, :, None]  # [1, 8, 1]
    # int32 throughout (4 bytes a code, not 8): the arithmetic shift's sign bits are masked off with the nibble
    c = ((qweight.to(torch.int32)[:, None, :] >> shifts) & 0xF).to(torch.uint8)  # [K8/8, 8, N]
    return c.reshape(rows * PACK, n)[:in_features].t().contiguous()  # [N, K]


def to_lmc_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [N, K], scales and zeros [N, ceil(K/G)] -> the workspace triplet (qweight, scales, zeros)."""
    return pack_lmc(codes), scales.t().to(dtype).contiguous(), zeros.t().to(dtype).contiguous()


def from_lmc_tensors(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of to_lmc_tensors: codes uint8 [N, K], scales and zeros float32 [N, ceil(K/G)]."""
    return (unpack_lmc(qweight, in_features), scales.t().float().contiguous(),
            zeros.t().float().contiguous())


def dequantize_lmc(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   in_features: int | None = None) -> torch.Tensor:
    """The workspace triplet -> W^T float32 [K, N] (K defaults to ceil(K/8) * 8, padding included)."""
    k = in_features if in_features is not None else qweight.shape[0] * PACK
    codes = unpack_lmc(qweight, k).t().float()  # [K, N]
    s = scales.float().repeat_interleave(group_size, dim=0)[:k]  # [K, N]
    z = zeros.float().repeat_interleave(group_size, dim=0)[:k]  # [K, N]
    return (codes - z) * s


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def to_uint32(words: torch.Tensor) -> torch.Tensor:
    """int32 -> int64 holding the same 32 bits as an unsigned value."""
    return words.to(torch.int64) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- round to nearest (RTN)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes uint8 [N, K], scales f32 [N, ceil(K/G)], zeros f32 [N, ceil(K/G)])."""
    codes, scales, zeros = quantize_groups(w, group_size)
    n, k = w.shape
    return codes.reshape(n, -1)[:, :k].to(torch.uint8).contiguous(), scales, zeros


def quantize_groups(w: torch.Tensor, group_size: int):
    """Codes as float [N, ng, G] (padded), scales and zeros float32 [N, ng]."""
    if w.dim() != 2 or not w.is_floating_point():
        raise LmcError(f"int4 quantization takes a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    if group_size < 1:
        raise LmcError(f"--w-group-size must be >= 1, got {group_size}")
    n, k = w.shape
    n_groups = -(-k // group_size)
    wf = w.float()  # [N, K]
    pad = n_groups * group_size - k
    if pad:
        wf = torch.cat([wf, wf[:, -1:].expand(n, pad)], dim=1)  # [N, ng*G]; repeats keep min/max
    g = wf.reshape(n, n_groups, group_size)  # [N, ng, G]
    w_max = g.amax(dim=2).clamp(min=0)  # [N, ng]
    w_min = g.amin(dim=2).clamp(max=0)  # [N, ng]
    scales = (w_max - w_min).clamp(min=1e-5) / 15  # [N, ng]
    if w.dtype in (torch.float16, torch.bfloat16):
        scales = scales.to(w.dtype).float()
    zeros = torch.round(-w_min / scales).clamp(0, 15)  # [N, ng]
    codes = (torch.round(g / scales[:, :, None]) + zeros[:, :, None]).clamp(0, 15)  # [N, ng, G]
    return codes, scales, zeros
