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

Layouts: lmc's own ("lmc-int4-k8") is defined once in lmc.format.int4; here are the
checkpoint layouts lmc reads and writes (docs/interchange.md). Every one computes
W[n, k] = (code - zero) * scale with 4-bit codes and zero points, so they convert without loss:
- AWQ GEMM (AutoAWQ's WQLinear_GEMM, read by vLLM and transformers): qweight int32 [K, N/8]
  packs 8 output columns of one K row in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7];
  qzeros int32 [K/G, N/8] the same way; scales fp16 [K/G, N]. Needs K % G == 0 and N % 8 == 0.
- GPTQ (AutoGPTQ / GPTQModel QuantLinear, 4-bit, int32 words): see unpack_gptq.
- compressed-tensors pack-quantized (llm-compressor's W4A16, vLLM's int4 format): see
  unpack_compressed.
"""
import torch

from lmc.errors import LmcError
from lmc.format.int4 import GROUP_SIZES, pack_lmc, quantize_groups, quantize_int4, to_int32, to_uint32, unpack_lmc  # noqa: F401 - quantize_int4 re-exported

_SHIFTS = tuple(range(0, 32, 4))  # nibble j lives in bits 4j .. 4j+3
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8c + _AWQ_ORDER[j]


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """(code - zero) * scale per group: [N, K] float32."""
    k = codes.shape[1]
    scale_k = scales.float().repeat_interleave(group_size, dim=1)[:, :k]  # [N, K]
    zero_k = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]  # [N, K]
    return (codes.float() - zero_k) * scale_k  # [N, K]


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize then dequantize w [N, K], returned in w.dtype (the AWQ search's inner loop)."""
    codes, scales, zeros = quantize_groups(w, group_size)  # [N, ng, G], [N, ng], [N, ng]
    n, k = w.shape
    w_q = (codes - zeros[:, :, None]) * scales[:, :, None]  # [N, ng, G]
    return w_q.reshape(n, -1)[:, :k].to(w.dtype)


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


# ----------------------------------------------------------------------------- GPTQ


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, in_features: int,
                zero_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors -> codes uint8 [N, K], scales and zeros float32 [N, ng] (groups as stored).

    Layout (AutoGPTQ / GPTQModel QuantLinear, 4 bits, int32 words):
      qweight int32 [ceil(K/8), N]   packed along K: word [r, n] holds the codes of W[n, 8r + j]
                                     in bits 4j .. 4j+3, the same bits as lmc-int4-k8's qweight
      qzeros  int32 [ng, ceil(N/8)]  packed along N: word [g, c] holds the zero points of group g
                                     for output columns 8c + j in bits 4j .. 4j+3
      scales  float [ng, N]          ng = ceil(K/G), 1 for group_size -1
      g_idx   int32 [K]              the group of input column k (read by the caller)
    checkpoint_format "gptq" (v1, zero_offset 1) stores zero - 1 in every nibble; it is undone as
    GPTQModel does, adding 0x11111111 to the whole word (a zero of 0, stored as 15 with a borrow
    from the next nibble, comes back exactly). "gptq_v2" (zero_offset 0) stores the zero itself.
    Symmetric checkpoints have zero 8. W = (code - zero) * scale.
    """
    n = qweight.shape[1]
    codes = unpack_lmc(qweight, in_features)  # [N, K]
    words = to_int32((to_uint32(qzeros) + zero_offset * 0x11111111) & 0xFFFFFFFF)  # [ng, N/8], v2 zero points
    zeros = unpack_lmc(words.t(), n).t()  # [N, ng]
    return codes, scales.t().float().contiguous(), zeros.float().contiguous()


# ----------------------------------------------------------------------------- compressed-tensors


def unpack_compressed(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
                      in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors pack-quantized tensors -> codes uint8 [N, K], scales and zeros float32 [N, ng].

    Layout (compressed-tensors' PackedQuantizationCompressor, 4-bit int): values are signed,
    q in -8..7, stored as the nibble q + 8.
      weight_packed     int32 [N, ceil(K/8)]   packed along K in each row: word [n, r] holds
                                               W[n, 8r + j] in bits 4j .. 4j+3, the transpose of
                                               lmc-int4-k8's qweight; nibbles past K are 0
      weight_scale      float [N, ng]          ng = ceil(K/G) (strategy group) or 1 (channel)
      weight_zero_point int32 [ceil(N/8), ng]  asymmetric only; packed along N: word [c, g] holds
                                               the zero nibbles of rows 8c + j (zp + 8); symmetric: zp 0
      weight_shape      int   [2]              [N, K]
      weight_g_idx      int32 [K]              actorder "group" only: the group of input column k
    compressed-tensors computes (q - zp) * scale, which is (nibble - zero nibble) * scale: the
    nibbles are lmc's codes and zero points as they are.
    """
    n = weight_packed.shape[0]
    codes = unpack_lmc(weight_packed.t(), in_features)  # [N, K]
    scales = weight_scale.float()  # [N, ng]
    if weight_zero_point is None:
        zeros = torch.full_like(scales, 8.0)
    else:
        zeros = unpack_lmc(weight_zero_point, n).t().float()  # [N, ng]
    return codes, scales.contiguous(), zeros.contiguous()


def pack_compressed(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """codes [N, K], scales and zeros [N, ng] -> the asymmetric pack-quantized tensors, by leaf
    (layout in unpack_compressed)."""
    n, k = codes.shape
    return {".weight_packed": pack_lmc(codes).t().contiguous(),  # [N, ceil(K/8)]
            ".weight_scale": scales.to(dtype).contiguous(),  # [N, ng]
            ".weight_zero_point": pack_lmc(zeros.round().to(torch.uint8).t()),  # [ceil(N/8), ng]
            ".weight_shape": torch.tensor([n, k], dtype=torch.int64)}


# ----------------------------------------------------------------------------- tensor tables

INT32_LEAVES = (".qweight", ".qzeros", ".weight_packed", ".weight_zero_point")  # packed words, every layout
INDEX_LEAVES = (".g_idx", ".weight_g_idx", ".weight_shape")  # integer tensors that are not packed
GROUP_INDEX_LEAF = {"gptq": ".g_idx", "compressed-tensors": ".weight_g_idx"}  # optional: the group of each column


def checkpoint_int4_shapes(method: str, n: int, k: int, group_size: int | None,
                           symmetric: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensors (by leaf) and shapes of one int4 linear W [N, K] in a checkpoint of `method`
    ("awq", "gptq", "compressed-tensors") with groups of group_size (None: one per output row);
    the optional group index (GROUP_INDEX_LEAF) is [K]. Layouts: pack_awq, unpack_gptq, unpack_compressed."""
    ng = 1 if group_size is None else -(-k // group_size)
    if method == "awq":
        return {".qweight": (k, n // 8), ".qzeros": (k // group_size, n // 8), ".scales": (k // group_size, n)}
    if method == "gptq":
        return {".qweight": (-(-k // 8), n), ".qzeros": (ng, -(-n // 8)), ".scales": (ng, n)}
    shapes = {".weight_packed": (n, -(-k // 8)), ".weight_scale": (n, ng), ".weight_shape": (2,)}
    if not symmetric:
        shapes[".weight_zero_point"] = (-(-n // 8), ng)
    return shapes


# ----------------------------------------------------------------------------- groups


def fold_group_size(group_size: int | None, where: str) -> int:
    """lmc's group size for a checkpoint's (None: one scale per output row): the largest of
    GROUP_SIZES that divides it, so that every lmc group lies inside one checkpoint group."""
    if group_size is None:
        return max(GROUP_SIZES)
    for g in sorted(GROUP_SIZES, reverse=True):
        if group_size % g == 0:
            return g
    raise LmcError(f"{where} has group_size {group_size}; lmc's int4 groups are {'/'.join(map(str, GROUP_SIZES))} "
                   "columns and must divide the checkpoint's group")


def _mixed_block(group_of_column: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int | None]:
    """The checkpoint group of each of lmc's groups of G consecutive columns [ceil(K/G)] (its first column's),
    and the first lmc group whose columns lie in different checkpoint groups (None: none)."""
    pad = -group_of_column.shape[0] % group_size
    padded = torch.cat([group_of_column, group_of_column[-1:].expand(pad)])  # [ceil(K/G)*G]
    blocks = padded.to(torch.int64).reshape(-1, group_size)  # [ceil(K/G), G]
    labels = blocks[:, 0]  # [ceil(K/G)]
    if blocks.is_meta:
        return labels, None
    mixed = (blocks != labels[:, None]).any(dim=1).nonzero()
    return labels, int(mixed[0]) if mixed.numel() else None


def input_order(group_of_column: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Act-order's column order: None when every lmc group of G consecutive input columns already lies in one
    checkpoint group (no act-order, static groups, or a g_idx that only relabels whole groups); otherwise the
    input columns sorted by their group (stable) [K] int64, so that column j of the reordered weight is input
    column order[j] and each checkpoint group's columns are consecutive (GPTQ's desc_act gives every group G
    columns in the order the Hessian chose)."""
    if _mixed_block(group_of_column, group_size)[1] is None:
        return None
    return torch.sort(group_of_column.to(torch.int64), stable=True).indices  # [K]


def group_labels(group_of_column: torch.Tensor, group_size: int, n_groups: int, where: str) -> torch.Tensor:
    """The group of each input column [K] (GPTQ's g_idx, or k // G, in the order the weight is stored: after
    input_order's reordering for act-order) -> the checkpoint group of each of lmc's groups of G consecutive
    columns [ceil(K/G)]: scales[:, labels] are then lmc's scales. Exact when each lmc group's columns share one
    checkpoint group; otherwise (groups whose sizes G does not divide) refused."""
    k = group_of_column.shape[0]
    labels, b = _mixed_block(group_of_column, group_size)
    if b is not None:
        raise LmcError(f"{where}: g_idx puts input columns {b * group_size}..{min(k, (b + 1) * group_size) - 1} "
                       f"(after sorting by group) in different quantization groups: its groups are not whole "
                       f"multiples of lmc's {group_size}-column groups; the checkpoint's g_idx does not match its "
                       "group_size (corrupt or not GPTQ): re-download it, or quantize the float model with "
                       "`lmc quantize`")
    if not labels.is_meta and (bool((labels < 0).any()) or bool((labels >= n_groups).any())):
        raise LmcError(f"{where}: g_idx names a group outside 0..{n_groups - 1}; the checkpoint is corrupt")
    return labels
