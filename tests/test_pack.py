"""int4 quantization math and both packed layouts (lmc-int4-k8 and AWQ GEMM)."""
import pytest
import torch

from lmc.compiler import pack
from lmc.format import int4
from lmc.errors import LmcError


def _codes(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)  # [N, K]


def _weight(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(dtype)  # [N, K]


def _autoawq_fake_quant(w, group_size):
    """AutoAWQ's pseudo_quantize_tensor (zero point, 4 bits), as published, for K % G == 0."""
    n, k = w.shape
    g = w.float().reshape(-1, group_size)
    max_val, min_val = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 15
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    w_q = (torch.clamp(torch.round(g / scales) + zeros, 0, 15) - zeros) * scales
    return w_q.reshape(n, k), scales.reshape(n, -1), zeros.reshape(n, -1)


def _autoawq_pack(intweight_kn):
    """AutoAWQ's WQLinear_GEMM column loop: [R, N] ints -> int32 [R, N/8]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    r, n = intweight_kn.shape
    out = torch.zeros(r, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            out[:, col] |= intweight_kn[:, col * 8 + order_map[i]].to(torch.int64) << (i * 4)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


# ---- lmc layout ---------------------------------------------------------------------------

def test_lmc_nibble_order_hand_checked():
    codes = torch.arange(8, dtype=torch.uint8)[None, :]  # [1, 8]: W[0, k] has code k
    qweight = int4.pack_lmc(codes)
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 1)
    assert qweight.item() == 0x76543210
    top = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)  # nibble 7 = bits 28..31
    assert int4.pack_lmc(top).item() == 0xF0000000 - 2**32


@pytest.mark.parametrize("n,k", [(5, 13), (3, 1), (7, 8), (1, 29)])
def test_lmc_round_trip_odd_shapes(n, k):
    codes = _codes(n, k, seed=n * 100 + k)
    qweight = int4.pack_lmc(codes)
    assert qweight.shape == (-(-k // 8), n)
    assert torch.equal(int4.unpack_lmc(qweight, k), codes)
    if k % 8:  # codes past K are 0
        tail = (qweight[-1].to(torch.int64) & 0xFFFFFFFF) >> (4 * (k % 8))
        assert torch.count_nonzero(tail) == 0


def test_lmc_column_layout():
    codes = _codes(6, 19, seed=3)
    qweight = int4.pack_lmc(codes).to(torch.int64) & 0xFFFFFFFF
    for n in range(6):
        for k in range(19):
            assert (qweight[k // 8, n] >> (4 * (k % 8))) & 0xF == codes[n, k]


def test_lmc_tensors_match_spec_dequant():
    n, k, gs = 9, 45, 16  # K not a multiple of 8 nor of G
    w = _weight(n, k, seed=4)
    codes, scales, zeros = pack.quantize_int4(w, gs)
    qweight, s_ws, z_ws = int4.to_lmc_tensors(codes, scales, zeros, torch.float32)
    assert qweight.shape == (6, n) and s_ws.shape == (3, n) and z_ws.shape == (3, n)
    assert s_ws.dtype == z_ws.dtype == torch.float32
    raw = qweight.to(torch.int64) & 0xFFFFFFFF
    spec = torch.empty(n, k)
    for kk in range(k):  # docs/workspace-format.md: (code - zeros[k//G, n]) * scales[k//G, n]
        code = (raw[kk // 8] >> (4 * (kk % 8))) & 0xF  # [N]
        spec[:, kk] = (code - z_ws[kk // gs]) * s_ws[kk // gs]
    assert torch.equal(spec, pack.dequantize_int4(codes, scales, zeros, gs))
    back = int4.from_lmc_tensors(qweight, s_ws, z_ws, k)
    assert torch.equal(back[0], codes) and torch.equal(back[1], scales) and torch.equal(back[2], zeros)


def test_lmc_tensors_half_dtype():
    w = _weight(8, 40, seed=5, dtype=torch.float16)
    codes, scales, zeros = pack.quantize_int4(w, 32)
    _, s_ws, z_ws = int4.to_lmc_tensors(codes, scales, zeros, torch.float16)
    assert s_ws.dtype == z_ws.dtype == torch.float16
    assert torch.equal(s_ws.float().t(), scales)  # fp16 weights give fp16-exact scales
    assert torch.equal(z_ws.float().t(), zeros)


# ---- AWQ GEMM layout ----------------------------------------------------------------------

def test_awq_nibble_order_hand_checked():
    codes = torch.arange(8, dtype=torch.uint8)[:, None]  # [8, 1]: output column n has code n
    zeros = torch.arange(8, dtype=torch.float32)[:, None]  # [8, 1]
    scales = torch.full((8, 1), 0.5)
    qweight, qzeros, s16 = pack.pack_awq(codes, scales, zeros, group_size=1)
    assert qweight.shape == (1, 1) and qzeros.shape == (1, 1) and s16.shape == (1, 8)
    assert qweight.item() == 0x75316420  # nibbles hold columns 0, 2, 4, 6, 1, 3, 5, 7
    assert qzeros.item() == 0x75316420
    assert s16.dtype == torch.float16


@pytest.mark.parametrize("n,k,gs", [(24, 96, 32), (8, 64, 64), (40, 27, 9)])
def test_awq_matches_autoawq_loop_and_round_trips(n, k, gs):
    codes = _codes(n, k, seed=n + k)
    zeros = _codes(n, k // gs, seed=n * k).float()
    scales = torch.rand(n, k // gs, generator=torch.Generator().manual_seed(gs)) + 0.01
    scales = scales.half().float()  # AWQ stores fp16 scales
    qweight, qzeros, s16 = pack.pack_awq(codes, scales, zeros, gs)
    assert qweight.shape == (k, n // 8) and qzeros.shape == (k // gs, n // 8)
    assert torch.equal(qweight, _autoawq_pack(codes.t()))
    assert torch.equal(qzeros, _autoawq_pack(zeros.t().to(torch.int64)))
    c2, s2, z2 = pack.unpack_awq(qweight, qzeros, s16, gs)
    assert torch.equal(c2, codes) and torch.equal(s2, scales) and torch.equal(z2, zeros)


def test_awq_to_lmc_conversion_keeps_dequant():
    n, k, gs = 16, 64, 32
    w = _weight(n, k, seed=6, dtype=torch.float16)
    codes, scales, zeros = pack.quantize_int4(w, gs)
    c, s, z = pack.unpack_awq(*pack.pack_awq(codes, scales, zeros, gs), gs)
    lmc = int4.from_lmc_tensors(*int4.to_lmc_tensors(c, s, z, torch.float16), k)
    assert torch.equal(pack.dequantize_int4(*lmc, gs), pack.dequantize_int4(codes, scales, zeros, gs))


@pytest.mark.parametrize("n,k,gs", [(16, 100, 32), (12, 64, 32)])
def test_awq_rejects_unpackable_shapes(n, k, gs):
    assert not pack.awq_compatible(n, k, gs)
    codes = _codes(n, k)
    ng = -(-k // gs)
    with pytest.raises(LmcError, match="lmc's own int4 layout"):
        pack.pack_awq(codes, torch.ones(n, ng), torch.zeros(n, ng), gs)


# ---- quantization math --------------------------------------------------------------------

@pytest.mark.parametrize("n,k,gs", [(7, 300, 128), (5, 33, 32), (3, 17, 64)])
def test_quantize_error_within_half_scale(n, k, gs):
    w = _weight(n, k, seed=k)
    codes, scales, zeros = pack.quantize_int4(w, gs)
    ng = -(-k // gs)
    assert codes.dtype == torch.uint8 and codes.shape == (n, k)
    assert scales.shape == zeros.shape == (n, ng) and scales.dtype == zeros.dtype == torch.float32
    assert int(codes.max()) <= 15 and bool((scales > 0).all())
    assert torch.equal(zeros, zeros.round()) and bool(((zeros >= 0) & (zeros <= 15)).all())
    err = (pack.dequantize_int4(codes, scales, zeros, gs) - w).abs()  # [N, K]
    half = scales.repeat_interleave(gs, dim=1)[:, :k] / 2  # [N, K]
    assert bool((err <= half * (1 + 1e-5)).all())


def test_quantize_partial_group_uses_only_its_columns():
    w = _weight(4, 40, seed=7)
    _, scales, zeros = pack.quantize_int4(w, 32)
    _, s_tail, z_tail = pack.quantize_int4(w[:, 32:].contiguous(), 8)  # the tail as its own group
    assert torch.equal(scales[:, 1:], s_tail) and torch.equal(zeros[:, 1:], z_tail)


def test_matches_autoawq_on_groups_that_straddle_zero():
    w = _weight(6, 256, seed=8)
    ref_wq, ref_s, ref_z = _autoawq_fake_quant(w, 64)
    _, scales, zeros = pack.quantize_int4(w, 64)
    assert torch.equal(scales, ref_s) and torch.equal(zeros, ref_z)
    assert torch.equal(pack.fake_quantize_int4(w, 64), ref_wq)


def test_zero_point_on_one_signed_groups():
    pos = torch.tensor([[0.9, 1.5, 2.0, 1.25]])  # all positive: range widened to [0, 2]
    codes, scales, zeros = pack.quantize_int4(pos, 4)
    assert zeros.item() == 0.0 and scales.item() == pytest.approx(2.0 / 15)
    assert codes.tolist() == [[7, 11, 15, 9]]  # round(w / (2/15)): 6.75, 11.25, 15, 9.375
    err = (pack.dequantize_int4(codes, scales, zeros, 4) - pos).abs()
    assert bool((err <= scales / 2 + 1e-7).all())
    neg = -pos
    codes, scales, zeros = pack.quantize_int4(neg, 4)
    assert zeros.item() == 15.0 and scales.item() == pytest.approx(2.0 / 15)
    err = (pack.dequantize_int4(codes, scales, zeros, 4) - neg).abs()
    assert bool((err <= scales / 2 + 1e-7).all())


def test_all_zero_group_is_exact():
    w = torch.zeros(2, 8)
    codes, scales, zeros = pack.quantize_int4(w, 8)
    assert bool((scales > 0).all()) and torch.count_nonzero(codes) == 0
    assert torch.equal(pack.fake_quantize_int4(w, 8), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quantize_equals_quantize_dequantize(dtype):
    w = _weight(5, 70, seed=9, dtype=dtype)  # partial last group
    w_q = pack.fake_quantize_int4(w, 32)
    assert w_q.dtype == dtype and w_q.shape == w.shape
    codes, scales, zeros = pack.quantize_int4(w, 32)
    assert torch.equal(w_q, pack.dequantize_int4(codes, scales, zeros, 32).to(dtype))


def test_deterministic():
    w = _weight(11, 77, seed=10)
    a = pack.quantize_int4(w, 16)
    b = pack.quantize_int4(w.clone(), 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(int4.pack_lmc(a[0]), int4.pack_lmc(b[0]))


def test_bad_inputs_raise():
    with pytest.raises(LmcError):
        pack.quantize_int4(torch.zeros(4), 4)
    with pytest.raises(LmcError):
        pack.quantize_int4(torch.zeros(2, 4), 0)
    with pytest.raises(LmcError):
        int4.unpack_lmc(torch.zeros(2, 3, dtype=torch.int32), 30)
