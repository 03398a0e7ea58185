"""int4 weight quantization (asymmetric, grouped along K) and its two packed layouts.

Quantization follows AutoAWQ's `pseudo_quantize_tensor` with zero point, per group of G
consecutive input columns of `W [N, K]` (the last group may be partial):

    scale = clamp(max - min, 1e-5) / 15      zero = clamp(round(-min / scale), 0, 15)
    code  = clamp(round(w / scale) + zero, 0, 15)      w_q = (code - zero) * scale

with one deliberate difference: the group's [min, max] is widened to include 0 (as GPTQ's
quantizer does). Every group that straddles zero (practically all LLM weight groups) gets
AutoAWQ's numbers exactly; an all-positive or all-negative group gets zero = 0 or 15 and an
error <= scale / 2, where AutoAWQ would clamp the zero point and saturate the codes.
Scales are rounded to w's dtype when that is a 16-bit float (AutoAWQ computes in fp16), so
storing them in the model dtype loses nothing.

Layouts: lmc's own ("lmc-int4-k8") is defined once in lmc.format.int4; here is AWQ's:
- AWQ GEMM (AutoAWQ's WQLinear_GEMM, read by vLLM and transformers): qweight int32 [K, N/8]
  packs 8 output columns of one K row in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7];
  qzeros int32 [K/G, N/8] the same way; scales fp16 [K/G, N]. Needs K % G == 0 and N % 8 == 0.
"""
import torch

from lmc.errors import LmcError
from lmc.format.int4 import to_int32, to_uint32

_SHIFTS = tuple(range(0, 32, 4))  # nibble j lives in bits 4j .. 4j+3
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8c + _AWQ_ORDER[j]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes uint8 [N, K], scales f32 [N, ceil(K/G)], zeros f32 [N, ceil(K/G)])."""
    codes, scales, zeros = _quantize_groups(w, group_size)
    n, k = w.shape
    return codes.reshape(n, -1)[:, :k].to(torch.uint8).contiguous(), scales, zeros


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """(code - zero) * scale per group: [N, K] float32."""
    k = codes.shape[1]
    scale_k = scales.float().repeat_interleave(group_size, dim=1)[:, :k]  # [N, K]
    zero_k = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]  # [N, K]
    return (codes.float() - zero_k) * scale_k  # [N, K]


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize then dequantize w [N, K], returned in w.dtype (the AWQ search's inner loop)."""
    codes, scales, zeros = _quantize_groups(w, group_size)  # [N, ng, G], [N, ng], [N, ng]
    n, k = w.shape
    w_q = (codes - zeros[:, :, None]) * scales[:, :, None]  # [N, ng, G]
    return w_q.reshape(n, -1)[:, :k].to(w.dtype)


def _quantize_groups(w: torch.Tensor, group_size: int):
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


def awq_compatible(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether AWQ's GEMM layout can hold this linear (K % G == 0 and N % 8 == 0)."""
    return group_size >= 1 and in_features % group_size == 0 and out_features % 8 == 0


def pack_awq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [N, K], scales and zeros [N, K/G] -> AWQ GEMM (qweight, qzeros, scales).

    Layout: qweight int32 [K, N/8]; word qweight[k, c] holds the codes of output columns
    8c + [0, 2, 4, 6, 1, 3, 5, 7] at input row k, the j-th of those in bits 4j .. 4j+3.
    qzeros int32 [K/G, N/8] packs the zero points of group g the same way; scales fp16 [K/G, N].
    """
    n, k = codes.shape
    if not awq_compatible(n, k, group_size):
        raise LmcError(f"AWQ's GEMM layout needs in_features % group_size == 0 and "
                       f"out_features % 8 == 0, got [{n}, {k}] with group {group_size}: "
                       f"write lmc's own int4 layout for this weight")
    if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise LmcError(f"scales/zeros must be [{n}, {k // group_size}], got "
                       f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
    qweight = _pack_awq_rows(codes.t())  # [K, N/8]
    qzeros = _pack_awq_rows(zeros.t().round())  # [K/G, N/8]
    return qweight, qzeros, scales.t().to(torch.float16).contiguous()


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ GEMM tensors -> codes uint8 [N, K], scales and zeros float32 [N, K/G]."""
    k, n8 = qweight.shape
    if qzeros.shape != (k // group_size, n8) or scales.shape != (k // group_size, n8 * 8):
        raise LmcError(f"AWQ tensors do not fit together: qweight {tuple(qweight.shape)}, "
                       f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} for group "
                       f"{group_size}: check the checkpoint's group_size")
    codes = _unpack_awq_rows(qweight).t().to(torch.uint8).contiguous()  # [N, K]
    zeros = _unpack_awq_rows(qzeros).t().float().contiguous()  # [N, K/G]
    return codes, scales.t().float().contiguous(), zeros


def _pack_awq_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, N] values 0..15 -> int32 [R, N/8], AWQ's interleaved nibble order (see pack_awq)."""
    r, n = values.shape
    v = values.to(torch.int64).reshape(r, n // 8, 8)[:, :, list(_AWQ_ORDER)]  # [R, N/8, 8]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=values.device)  # [8]
    return to_int32((v << shifts).sum(dim=2))  # [R, N/8]


def _unpack_awq_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] in AWQ's nibble order -> int64 [R, N] values 0..15."""
    r, n8 = packed.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=packed.device)  # [8]
    nibbles = (to_uint32(packed)[:, :, None] >> shifts) & 0xF  # [R, N/8, 8], nibble j
    inverse = [_AWQ_ORDER.index(col) for col in range(8)]  # column col sits in nibble inverse[col]
    return nibbles[:, :, inverse].reshape(r, n8 * 8)  # [R, N]
