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

Layouts:
- lmc ("lmc-int4-k8", docs/workspace-format.md): qweight int32 [ceil(K/8), N] packs 8
  consecutive K codes of one output column; scales and zeros [ceil(K/G), N] in the model dtype.
- AWQ GEMM (AutoAWQ's WQLinear_GEMM, read by vLLM and transformers): qweight int32 [K, N/8]
  packs 8 output columns of one K row in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7];
  qzeros int32 [K/G, N/8] the same way; scales fp16 [K/G, N]. Needs K % G == 0 and N % 8 == 0.
"""
import torch

from lmc.errors import LmcError

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


def pack_lmc(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> qweight int32 [ceil(K/8), N].

    Layout: qweight[r, n] holds the codes of W[n, 8r + j] for j = 0..7, code j in bits
    4j .. 4j+3 (nibble 0 least significant); codes past K are 0.
    """
    n, k = codes.shape
    rows = -(-k // 8)
    c = torch.zeros(rows * 8, n, dtype=torch.int64, device=codes.device)  # [K8, N]
    c[:k] = codes.t().to(torch.int64)
    c = c.reshape(rows, 8, n)  # [K8/8, 8, N]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=codes.device)[None, :, None]  # [1, 8, 1]
    return _to_int32((c << shifts).sum(dim=1))  # [K8/8, N]


def unpack_lmc(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """qweight int32 [ceil(K/8), N] (layout of pack_lmc) -> codes uint8 [N, K]."""
    rows, n = qweight.shape
    if rows != -(-in_features // 8):
        raise LmcError(f"qweight has {rows} packed rows, expected ceil({in_features} / 8)")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=qweight.device)[None, :, None]  # [1, 8, 1]
    c = (_to_uint32(qweight)[:, None, :] >> shifts) & 0xF  # [K8/8, 8, N]
    return c.reshape(rows * 8, n)[:in_features].t().to(torch.uint8).contiguous()  # [N, K]


def to_lmc_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Workspace triplet: qweight int32 [ceil(K/8), N], scales and zeros [ceil(K/G), N] in dtype."""
    return pack_lmc(codes), scales.t().to(dtype).contiguous(), zeros.t().to(dtype).contiguous()


def from_lmc_tensors(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of to_lmc_tensors: codes uint8 [N, K], scales and zeros float32 [N, ceil(K/G)]."""
    return (unpack_lmc(qweight, in_features), scales.t().float().contiguous(),
            zeros.t().float().contiguous())


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
    return _to_int32((v << shifts).sum(dim=2))  # [R, N/8]


def _unpack_awq_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] in AWQ's nibble order -> int64 [R, N] values 0..15."""
    r, n8 = packed.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=packed.device)  # [8]
    nibbles = (_to_uint32(packed)[:, :, None] >> shifts) & 0xF  # [R, N/8, 8], nibble j
    inverse = [_AWQ_ORDER.index(col) for col in range(8)]  # column col sits in nibble inverse[col]
    return nibbles[:, :, inverse].reshape(r, n8 * 8)  # [R, N]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _to_uint32(words: torch.Tensor) -> torch.Tensor:
    """int32 -> int64 holding the same 32 bits as an unsigned value."""
    return words.to(torch.int64) & 0xFFFFFFFF
