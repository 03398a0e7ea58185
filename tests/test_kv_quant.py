"""Quantized KV cache (quant_policy 8 and 4): the codec's error bound and bit layout, the fused rotary +
quantized cache write and the paged attention kernels against their torch references (Triton interpreter,
odd shapes), quantized against float attention, the cache's block budget, the config check, and the engine
end to end (CPU). The gpu-marked tests run compiled kernels and CUDA graphs:
TRITON_INTERPRET=0 pytest -m gpu tests/test_kv_quant.py
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from test_cuda_graph import PROMPTS, _engine, _greedy_logits, _rel, _same_prefix_rel, _workspace, gpu, needs_cuda
from test_kernels import ATTN_TOL, FP32, _cos_sin, _gen, check_split_decode_merges_in_kernel, needs_triton
from test_kernels import triton_interpreter  # noqa: F401 (fixture)

from lmc.errors import LmcError
from lmc.kernels import attention, rotary
from lmc.kernels.kv_quant import QuantizedKV, dequantize_kv_ref, quantize_kv_ref, store_groups

BITS = [8, 4]
LAYOUTS = [(8, None), (4, None), (4, 16), (4, 8)]  # bits, channels per (scale, zero) (None: one per vector)


def _groups(D: int, group: int | None) -> list[list[int]]:
    """The channels of each (scale, zero) pair, written out: the whole vector, or groups of `group`
    consecutive channels inside each half (a half's last group shorter)."""
    if group is None or group >= D:
        return [list(range(D))]
    half = D // 2
    return [list(range(h + a, h + min(a + group, half))) for h in (0, half) for a in range(0, half, group)]


# --- the codec ---------------------------------------------------------------------------------------------


def _hard_vectors(D: int, g: torch.Generator) -> torch.Tensor:
    """[10, 3, D] head vectors: plain, wide, tiny, constant, offset far from zero, one outlier, negatives."""
    base = torch.randn(10, 3, D, generator=g)
    rows = [base[0], base[1] * 300, base[2] * 1e-6, torch.full((3, D), 0.7), 100 + base[4] * 1e-3,
            base[5] + 5, -base[6].abs() - 2, base[7] * 4, base[8] / 8, base[9]]
    rows[5][:, 3] = 60.0  # an outlier channel
    return torch.stack(rows)  # [10, 3, D]


@pytest.mark.parametrize("bits,group", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [24, 80, 128])
def test_quantize_dequantize_error_at_most_half_a_scale(bits, group, dtype, D):
    """Per vector or per group (D 24 with 16 channels: one shorter group per half; D 80: 16 + 16 + 8)."""
    x = _hard_vectors(D, _gen(D + bits)).to(dtype)
    groups = _groups(D, group)
    codes, scales_zeros = quantize_kv_ref(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape == (10, 3, D * bits // 8)
    assert scales_zeros.dtype == torch.float16 and scales_zeros.shape == (10, 3, len(groups), 2)
    xf = x.float()
    err = (dequantize_kv_ref(codes, scales_zeros, bits, group) - xf).abs()
    for g, chans in enumerate(groups):
        xg = xf[..., chans]
        scale = scales_zeros[..., g, 0:1].float()  # [10, 3, 1]
        assert (err[..., chans] <= scale / 2 + xg.abs() * 2**-22).all()  # slack: the float32 rounding of c * s + z
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        exact_zero = scales_zeros[..., g, 1:2].float() == lo  # [10, 3, 1]
        if dtype == torch.float16:  # the minimum is a float16 number: it is the zero
            assert exact_zero.all()
        # where the zero is the minimum, the scale is LMDeploy's (max - min) / qmax, up to its float16 margin
        lmdeploy_scale = torch.clamp((hi - lo) / (2**bits - 1), min=2**-14)
        assert (scale[exact_zero] >= lmdeploy_scale[exact_zero]).all()
        assert (scale[exact_zero] <= lmdeploy_scale[exact_zero] * 1.002).all()


def test_code_layout_bits_8_and_4():
    """bits 8: byte d holds c[d]; bits 4: byte j holds c[j] in its low and c[j + D/2] in its high nibble."""
    s = 1 + 2**-10  # float16(qmax * (1 + 2^-10) / qmax): codes below are x rounded
    codes, sz = quantize_kv_ref(torch.tensor([[0.0, 255.0, 5.0, 10.0]]), 8)
    assert codes.tolist() == [[0, 255, 5, 10]] and sz.float().tolist() == [[[s, 0.0]]]
    codes, sz = quantize_kv_ref(torch.tensor([[-3.0, 12.0, 2.0, 7.0]]), 4)  # codes 0, 15, 5, 10
    assert codes.tolist() == [[0 | 5 << 4, 15 | 10 << 4]] and sz.float().tolist() == [[[s, -3.0]]]
    # groups of 2 channels: pairs (0, 1), (2, 3) of the first half, then (4, 5), (6, 7); codes 0, 15 in each
    codes, sz = quantize_kv_ref(torch.tensor([[-3.0, 12.0, 0.0, 30.0, 1.0, 16.0, 5.0, 35.0]]), 4, 2)
    assert codes.tolist() == [[0, 255, 0, 255]]
    assert sz.float().tolist() == [[[s, -3.0], [2 * s, 0.0], [s, 1.0], [2 * s, 5.0]]]


@pytest.mark.parametrize("D,group", [(24, 8), (24, 16), (64, 16), (80, 16)])
def test_grouped_layout_is_per_vector_codes_of_each_group(D, group):
    """4 bits in groups: pair g holds the (scale, zero) of the g-th group of _groups (first half's groups,
    then the second half's), and each group's codes are those of its channels quantized as a vector of their
    own; the bytes still pack c[j] | c[j + D/2] << 4."""
    x = _hard_vectors(D, _gen(D)).flatten(0, 1)  # [30, D]
    codes, sz = quantize_kv_ref(x, 4, group)
    unpack = lambda c: torch.cat((c & 15, c >> 4), dim=-1)  # noqa: E731 (bytes -> codes in channel order)
    for g, chans in enumerate(_groups(D, group)):  # every group here has an even number of channels
        alone_codes, alone_sz = quantize_kv_ref(x[:, chans], 4)
        assert torch.equal(sz[:, g], alone_sz[:, 0])
        assert torch.equal(unpack(codes)[:, chans], unpack(alone_codes))


def test_write_kv_cache_quantizes_into_its_slots_only():
    """K in groups of 4 channels (4 pairs per vector), V one pair per vector: each store in its own layout."""
    g = _gen(20)
    k_cache, v_cache = (QuantizedKV.empty(4, 5, 2, 16, 4, group, "cpu") for group in (4, 16))
    for c in (k_cache, v_cache):
        c.codes.copy_(torch.randint(0, 256, c.codes.shape, generator=g))
        c.scales_zeros.copy_(torch.randn(c.scales_zeros.shape, generator=g))
    before = [t.clone() for c in (k_cache, v_cache) for t in (c.codes, c.scales_zeros)]
    k, v = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    slots = torch.tensor([17, 3, 9])
    attention.write_kv_cache(k, v, k_cache, v_cache, slots)
    for x, c, (codes0, sz0), pairs in ((k, k_cache, before[:2], 4), (v, v_cache, before[2:], 1)):
        codes, sz = quantize_kv_ref(x, 4, c.group)  # [3, 2, 8], [3, 2, pairs, 2]
        codes0.view(-1, 2, 8)[slots], sz0.view(-1, 2, pairs, 2)[slots] = codes, sz
        assert torch.equal(c.codes, codes0) and torch.equal(c.scales_zeros, sz0)


# --- fused rotary + quantized write ------------------------------------------------------------------------


def _noisy_quantized(num_blocks, block_size, Hkv, D, bits, group, g, nan_scales=False) -> QuantizedKV:
    c = QuantizedKV.empty(num_blocks, block_size, Hkv, D, bits, group, "cpu")
    c.codes.copy_(torch.randint(0, 256, c.codes.shape, generator=g))
    c.scales_zeros.copy_(torch.full(c.scales_zeros.shape, math.nan) if nan_scales
                         else torch.randn(c.scales_zeros.shape, generator=g))
    return c


def _clone(c: QuantizedKV) -> QuantizedKV:
    return QuantizedKV(c.codes.clone(), c.scales_zeros.clone(), c.bits, c.group)


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("Hq,Hkv,D", [(6, 2, 64), (3, 3, 24), (8, 1, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_write_kv_quantized_triton_matches_ref(bits, Hq, Hkv, D, dtype):
    """The cache's layouts (store_groups): 4 bits keeps K in 16-channel groups (D 24: one of 12 per half;
    D 80: 16 + 16 + 8 per half) and V per vector."""
    g = _gen(21)
    T, block_size, num_blocks = 5, 3, 6
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).to(dtype)  # [T, (Hq + 2 Hkv) D], strided views below
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    cos, sin = _cos_sin(T, D, seed=22)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]  # [T]
    k_ref, v_ref = (_noisy_quantized(num_blocks, block_size, Hkv, D, bits, group, g) for group in store_groups(D, bits))
    k_tri, v_tri = _clone(k_ref), _clone(v_ref)
    q_rot, k_rot = rotary.apply_rotary_triton(q, k, cos, sin)  # the kernels' rotation (fused multiply-adds)
    attention.write_kv_cache(k_rot, v.contiguous(), k_ref, v_ref, slots)  # the reference quantizer
    q_tri = rotary.rotary_write_kv_triton(q, k, v, cos, sin, k_tri, v_tri, slots)
    assert torch.equal(q_tri, q_rot)
    for tri, ref in ((k_tri, k_ref), (v_tri, v_ref)):  # same float32 arithmetic: the same codes and scales
        assert torch.equal(tri.codes, ref.codes) and torch.equal(tri.scales_zeros, ref.scales_zeros)


# --- paged attention over quantized caches -----------------------------------------------------------------


@dataclass
class QuantCase:
    q: torch.Tensor  # [T, Hq, D]
    float_caches: tuple  # k, v [num_blocks, block_size, Hkv, D] float32 holding the same K/V
    quant_caches: tuple  # k, v QuantizedKV
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    kv_lens: torch.Tensor  # [B] int32
    scale: float


def _quant_case(q_lens, kv_lens, Hq, Hkv, D, block_size, dtype, bits, seed=0) -> QuantCase:
    """K/V per sequence written into shuffled blocks of a float and a quantized cache; the quantized cache's
    unused slots hold NaN scales, so any read past kv_len shows."""
    g = _gen(seed)
    n_blocks = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(n_blocks) + 3
    order = torch.randperm(num_blocks, generator=g)
    block_tables = torch.zeros(len(kv_lens), max(n_blocks) + 1, dtype=torch.int32)  # a padding column
    float_caches = (torch.zeros(num_blocks, block_size, Hkv, D), torch.zeros(num_blocks, block_size, Hkv, D))
    quant_caches = tuple(_noisy_quantized(num_blocks, block_size, Hkv, D, bits, group, g, nan_scales=True)
                         for group in store_groups(D, bits))  # the cache's layouts: 4 bits, K in groups
    used = 0
    for b, n in enumerate(kv_lens):
        block_tables[b, : n_blocks[b]] = order[used: used + n_blocks[b]]
        used += n_blocks[b]
        k = torch.randn(n, Hkv, D, generator=g).to(dtype)
        v = torch.randn(n, Hkv, D, generator=g).to(dtype)
        pos = torch.arange(n)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size  # [n]
        attention.write_kv_cache(k, v, *float_caches, slots)
        attention.write_kv_cache(k, v, *quant_caches, slots)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return QuantCase(q, float_caches, quant_caches, block_tables, cu, torch.tensor(kv_lens, dtype=torch.int32),
                     1.0 / math.sqrt(D))


PREFILL_CASES = [  # Hq, Hkv, D, block_size, dtype, block_m, block_n, bits
    (6, 2, 80, 5, torch.float32, 16, 16, 8),
    (6, 2, 80, 5, torch.float16, 16, 32, 4),
    (3, 3, 24, 7, torch.float32, 16, 16, 4),
    (2, 1, 64, 16, torch.float16, 64, 64, 8),
]


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D,block_size,dtype,block_m,block_n,bits", PREFILL_CASES)
def test_prefill_quantized_triton_matches_ref(Hq, Hkv, D, block_size, dtype, block_m, block_n, bits):
    # a fresh prompt, a one-token chunk, and a chunk after a cached prefix (kv_len > q_len)
    c = _quant_case((7, 1, 19), (7, 30, 41), Hq, Hkv, D, block_size, dtype, bits, seed=23)
    args = (c.q, *c.quant_caches, c.block_tables, c.cu_seqlens_q, c.kv_lens, c.scale)
    out = attention.paged_prefill_attention_triton(*args, block_m=block_m, block_n=block_n)
    assert out.shape == c.q.shape and out.dtype == dtype
    torch.testing.assert_close(out, attention.paged_prefill_attention_ref(*args), **ATTN_TOL[dtype])


DECODE_CASES = [  # Hq, Hkv, D, block_size, dtype, num_splits, block_n, bits
    (6, 2, 80, 5, torch.float32, 3, 16, 8),
    (8, 1, 80, 5, torch.float16, 4, 16, 4),
    (3, 3, 24, 7, torch.float32, 1, 16, 4),
    (4, 2, 128, 16, torch.float16, 2, 64, 8),
]


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D,block_size,dtype,num_splits,block_n,bits", DECODE_CASES)
def test_decode_quantized_triton_matches_ref(Hq, Hkv, D, block_size, dtype, num_splits, block_n, bits):
    # kv_len 1 leaves splits empty; 16 and 37 and 70 end mid-block for most block sizes
    c = _quant_case((1, 1, 1, 1), (1, 37, 70, 16), Hq, Hkv, D, block_size, dtype, bits, seed=24)
    args = (c.q, *c.quant_caches, c.block_tables, c.kv_lens, c.scale)
    out = attention.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=block_n)
    assert out.shape == c.q.shape and out.dtype == dtype
    torch.testing.assert_close(out, attention.paged_decode_attention_ref(*args), **ATTN_TOL[dtype])


@needs_triton
@pytest.mark.parametrize("bits", BITS)
def test_decode_quantized_empty_sequence_gives_zeros(bits):
    c = _quant_case((1, 1), (9, 9), 6, 2, 64, 5, torch.float32, bits, seed=25)
    kv_lens = torch.tensor([9, 0], dtype=torch.int32)  # a padding row
    out = attention.paged_decode_attention_triton(c.q, *c.quant_caches, c.block_tables, kv_lens, c.scale,
                                                  num_splits=2, block_n=16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = attention.paged_decode_attention_ref(c.q[:1], *c.quant_caches, c.block_tables[:1], kv_lens[:1], c.scale)
    torch.testing.assert_close(out[:1], ref, **FP32)


# measured (torch reference, this case): int8 0.0069 prefill / 0.0071 decode, int4 0.107 / 0.107 (K in 16-channel
# groups; one pair per vector: 0.120 / 0.133); rounding noise uniform in +-s/2, s = range / qmax (range ~5.5 for
# 128 N(0, 1) values), is s / sqrt(12): 0.0062 and 0.106, V's share at int4
QUANT_ERROR_BOUND = {8: 0.015, 4: 0.15}


@pytest.mark.parametrize("bits", BITS)
def test_quantized_attention_close_to_float_attention(bits):
    """Reference attention over the quantized cache against the same K/V in float32: the relative error
    (Frobenius norm of the difference over that of the float output) stays within QUANT_ERROR_BOUND."""
    c = _quant_case((40, 1, 64), (40, 150, 300), 8, 2, 128, 16, torch.float32, bits, seed=26)
    prefill = [attention.paged_prefill_attention_ref(c.q, *caches, c.block_tables, c.cu_seqlens_q, c.kv_lens, c.scale)
               for caches in (c.float_caches, c.quant_caches)]
    last = (c.cu_seqlens_q[1:] - 1).long()  # decode: each sequence's last query
    decode = [attention.paged_decode_attention_ref(c.q[last], *caches, c.block_tables, c.kv_lens, c.scale)
              for caches in (c.float_caches, c.quant_caches)]
    for exact, quantized in (prefill, decode):
        rel = float((quantized - exact).norm() / exact.norm())
        assert 0 < rel <= QUANT_ERROR_BOUND[bits], rel


def test_int4_key_groups_contain_outlier_channels():
    """Keys whose last 8 channels of each half are 8x the others (real keys after rotary have such channels,
    3-7x the median on SmolLM2): with one (scale, zero) per vector they set every channel's int4 step, and
    decode attention is off by 38 %; policy 4's 16-channel key groups keep them to their own groups: 16 %
    (measured; V is int4 per vector in both)."""
    from lmc.runtime.kv_cache import PagedKVCache

    g = _gen(30)
    n, Hq, Hkv, D, block_size = 256, 8, 2, 64, 16
    channel_scale = torch.ones(D)
    channel_scale[24:32] = channel_scale[56:64] = 8.0
    k = torch.randn(n, Hkv, D, generator=g) * channel_scale  # [n, Hkv, D]
    v = torch.randn(n, Hkv, D, generator=g)
    q = torch.randn(1, Hq, D, generator=g) * 0.5
    tables = torch.arange(n // block_size, dtype=torch.int32)[None]  # [1, n / block_size]
    kv_lens = torch.tensor([n], dtype=torch.int32)
    exact = attention.paged_decode_attention_ref(q, k.view(-1, block_size, Hkv, D), v.view(-1, block_size, Hkv, D),
                                                 tables, kv_lens, D**-0.5)
    cache = PagedKVCache(SimpleNamespace(num_layers=1, num_kv_heads=Hkv, head_dim=D), n // block_size, block_size,
                         torch.float32, torch.device("cpu"), quant_policy=4)
    per_vector_k = QuantizedKV.empty(n // block_size, block_size, Hkv, D, 4, D, "cpu")
    rel = {}
    for name, k_cache in (("groups", cache.k[0]), ("per vector", per_vector_k)):
        attention.write_kv_cache(k, v, k_cache, cache.v[0], torch.arange(n))
        out = attention.paged_decode_attention_ref(q, k_cache, cache.v[0], tables, kv_lens, D**-0.5)
        rel[name] = float((out - exact).norm() / exact.norm())
    assert cache.k[0].group == 16 and rel["groups"] <= 0.2 and rel["per vector"] >= 0.3, rel


# --- storage, budget, config -------------------------------------------------------------------------------


def _model_cfg(head_dim: int):
    return SimpleNamespace(num_layers=4, num_kv_heads=8, head_dim=head_dim, max_position_embeddings=4096)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_quantized_blocks_per_budget(head_dim):
    """fp16 float cache vs int8 codes plus a float16 scale and zero per head vector, and int4 codes with
    one pair per 16 channels of K and one per vector of V: about 1.9x and 3.1x the blocks for the same budget
    (bytes per K + V pair, D=64: 256 vs 136 and 48 + 36; D=128: 512 vs 264 and 96 + 68)."""
    from lmc.runtime.config import EngineConfig
    from lmc.runtime.kv_cache import bytes_per_block, plan_num_blocks

    cfg = _model_cfg(head_dim)
    pairs = 4 * 64 * 8  # layers, tokens per block, kv heads: K + V vector pairs
    assert bytes_per_block(cfg, 64, torch.float16) == pairs * 2 * head_dim * 2
    assert bytes_per_block(cfg, 64, torch.float16, 8) == pairs * 2 * (head_dim + 4)
    k4 = head_dim // 2 + 4 * (head_dim // 16)  # codes + a scale and zero per 16 channels
    assert bytes_per_block(cfg, 64, torch.float16, 4) == pairs * (k4 + head_dim // 2 + 4)
    blocks = {p: plan_num_blocks(cfg, EngineConfig(quant_policy=p, max_batch_size=10**6), torch.float16,
                                 torch.device("cpu")) for p in (0, 8, 4)}
    assert blocks[0] == int(2.0 * 1024**3 * 0.8) // bytes_per_block(cfg, 64, torch.float16)
    assert 1.85 <= blocks[8] / blocks[0] <= 2.0
    assert 3.0 <= blocks[4] / blocks[0] <= 3.2


@pytest.mark.parametrize("policy,k_pairs", [(8, 1), (4, 2)])
def test_paged_kv_cache_allocates_quantized_storage(policy, k_pairs):
    """head_dim 24: policy 4's K has one (scale, zero) per half (12 channels, under the 16 of a group)."""
    from lmc.runtime.kv_cache import PagedKVCache, bytes_per_block

    cfg = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=24)
    cache = PagedKVCache(cfg, 5, 7, torch.float16, torch.device("cpu"), quant_policy=policy)
    assert cache.quant_policy == policy and len(cache.k) == len(cache.v) == 3
    for layer, pairs in [(k, k_pairs) for k in cache.k] + [(v, 1) for v in cache.v]:
        assert isinstance(layer, QuantizedKV) and layer.bits == policy and layer.shape == (5, 7, 2, 24)
        assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (5, 7, 2, 24 * policy // 8)
        assert layer.scales_zeros.dtype == torch.float16 and layer.scales_zeros.shape == (5, 7, 2, pairs, 2)
    stored = sum(t.nbytes for layer in cache.k + cache.v for t in (layer.codes, layer.scales_zeros))
    assert stored == 5 * bytes_per_block(cfg, 7, torch.float16, policy)
    assert all(t.dtype == torch.float16 for t in PagedKVCache(cfg, 5, 7, torch.float16, torch.device("cpu")).k)


def test_engine_config_quant_policy():
    from lmc.runtime.config import EngineConfig

    for policy in (0, 4, 8):
        EngineConfig(quant_policy=policy).check()
    for policy in (1, 2, 16, -8):
        with pytest.raises(LmcError, match=f"quant_policy={policy} is not a KV cache policy") as e:
            EngineConfig(quant_policy=policy).check()
        assert "\n" not in str(e.value)


# --- the engine, end to end (CPU: the torch references) ----------------------------------------------------


def test_engine_quantized_cache_close_to_float_cache(checkpoint, tmp_path):
    """A tiny random llama, greedy through the public API: the first step's logits (the prefill's) with an int8
    cache within 2% of the float cache's, and every step's while the greedy contexts agree; int4 within 15%
    (measured: int8 0.51% and 0.43%, int4 6.3% and 6.4%). The first tokens agree with int8; 2 of the 3 texts
    agree to the end (the third parts at its 4th token: a random model's logits have near ties)."""
    ws = _workspace(checkpoint, tmp_path)
    engines = {p: _engine(ws, "cpu", quant_policy=p) for p in (0, 8, 4)}
    assert isinstance(engines[8].cache.k[0], QuantizedKV) and engines[4].cache.k[0].bits == 4
    runs = {p: _greedy_logits(e, PROMPTS, 16) for p, e in engines.items()}  # (tokens, [16, V] logits) per prompt
    first = {p: torch.stack([logits[0] for logits in runs[p][1]]) for p in runs}  # [B, V]
    assert 0 < _rel(first[8], first[0]) <= 0.02 and 0 < _rel(first[4], first[0]) <= 0.15
    assert 0 < _same_prefix_rel(runs[8], runs[0]) <= 0.02 and 0 < _same_prefix_rel(runs[4], runs[0]) <= 0.15
    assert [t[:3] for t in runs[8][0]] == [t[:3] for t in runs[0][0]]
    assert all(len(t) == 16 for p in runs for t in runs[p][0])


@pytest.mark.parametrize("policy", BITS)
def test_chunked_prefill_reads_earlier_quantized_chunks(checkpoint, tmp_path, policy):
    """Prompts prefilled 8 tokens a step (later chunks attend to the quantized K/V of earlier ones) give what
    one-step prefills give: every token reads the same quantized cache either way."""
    ws = _workspace(checkpoint, tmp_path)
    whole = _greedy_logits(_engine(ws, "cpu", quant_policy=policy), PROMPTS, 6)
    chunked = _greedy_logits(_engine(ws, "cpu", quant_policy=policy, max_prefill_token_num=8), PROMPTS, 6)
    assert chunked[0] == whole[0] and _same_prefix_rel(chunked, whole) <= 1e-5


@pytest.mark.parametrize("policy", BITS)
def test_padded_graph_step_with_quantized_cache_matches_eager_on_cpu(checkpoint, tmp_path, policy):
    """GraphDecoder's padded step (eager on CPU) over a quantized cache gives the engine's eager decode: the
    padding rows write and read only the scratch block's quantized slot."""
    from lmc.runtime.cuda_graph import GraphDecoder

    ws = _workspace(checkpoint, tmp_path)
    eager = _greedy_logits(_engine(ws, "cpu", quant_policy=policy), PROMPTS, 8)
    engine = _engine(ws, "cpu", quant_policy=policy)
    engine.decoder = GraphDecoder(engine)
    calls = []
    step = engine.decoder.step
    engine.decoder.step = lambda seqs: (calls.append(len(seqs)), step(seqs))[1]
    padded = _greedy_logits(engine, PROMPTS, 8)  # 3 sequences in the bucket of 4
    assert calls and padded[0] == eager[0] and _same_prefix_rel(padded, eager) <= 1e-5


# --- on a GPU ----------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantized_kernels_on_cuda(bits, dtype):
    """Compiled kernels at model sizes against the references: the fused write's codes within one step of the
    reference's (GPU float32 may round a tie the other way), attention within the float kernels' tolerance."""
    g = _gen(27)
    T, Hq, Hkv, D, block_size, num_blocks = 9, 32, 8, 128, 64, 4
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype).cuda() for h in (Hq, Hkv, Hkv))
    cos, sin = (t.cuda() for t in _cos_sin(T, D, seed=28))
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T].cuda()
    caches = [QuantizedKV.empty(num_blocks, block_size, Hkv, D, bits, group, "cuda")
              for _ in range(2) for group in store_groups(D, bits)]  # k, v (written by Triton), k, v (torch)
    rotary.rotary_write_kv_triton(q, k, v, cos, sin, caches[0], caches[1], slots)
    rotary.rotary_write_kv_ref(q, k, v, cos, sin, caches[2], caches[3], slots)
    for tri, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        deq = [dequantize_kv_ref(c.codes.flatten(0, 1)[slots], c.scales_zeros.flatten(0, 1)[slots], bits, c.group)
               for c in (tri, ref)]
        step = ref.scales_zeros.flatten(0, 1)[slots][..., 0].amax(-1, keepdim=True).float()  # the largest step
        assert ((deq[0] - deq[1]).abs() <= step * 1.01 + 0.02 * deq[1].abs() + 1e-3).all()

    c = _quant_case((7, 1, 130), (7, 300, 517), Hq, Hkv, D, block_size, dtype, bits, seed=29)
    qc, caches = c.q.cuda(), [QuantizedKV(x.codes.cuda(), x.scales_zeros.cuda(), bits, x.group) for x in c.quant_caches]
    tables, cu, kv_lens = c.block_tables.cuda(), c.cu_seqlens_q.cuda(), c.kv_lens.cuda()
    tol = dict(rtol=1e-2, atol=1e-2)
    out = attention.paged_prefill_attention(qc, *caches, tables, cu, kv_lens, c.scale)
    torch.testing.assert_close(out.float(), attention.paged_prefill_attention_ref(qc, *caches, tables, cu, kv_lens,
                                                                                c.scale).float(), **tol)
    last = (cu[1:] - 1).long()
    out = attention.paged_decode_attention(qc[last], *caches, tables, kv_lens, c.scale)
    torch.testing.assert_close(out.float(), attention.paged_decode_attention_ref(qc[last], *caches, tables, kv_lens,
                                                                               c.scale).float(), **tol)


@gpu
@needs_cuda
@pytest.mark.parametrize("policy", BITS)
def test_graph_decode_with_quantized_cache_on_gpu(checkpoint, tmp_path, policy):
    """CUDA graphs replay the quantized decode (fp32 workspace): the eager engine's greedy tokens and logits,
    with no capture falling back."""
    ws = _workspace(checkpoint, tmp_path)
    graph_engine = _engine(ws, "cuda", quant_policy=policy)
    eager_engine = _engine(ws, "cuda", cuda_graph=False, quant_policy=policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = _greedy_logits(graph_engine, PROMPTS, 24)
    assert not [w for w in caught if "lmc:" in str(w.message)] and graph_engine.decoder.graphs
    eager = _greedy_logits(eager_engine, PROMPTS, 24)
    assert graph[0] == eager[0] and _same_prefix_rel(graph, eager) <= 1e-4


# --- the fma decode kernel (CUDA-core dots on the codes) ---------------------------------------------------

FMA_DECODE_CASES = [  # Hq, Hkv, D, block_size, dtype, num_splits, block_n, bits: GQA groups 1/3/4/8, odd D and pages
    (6, 2, 80, 5, torch.float32, 3, 16, 8),
    (6, 2, 80, 5, torch.float16, 2, 16, 4),
    (3, 3, 24, 7, torch.float32, 1, 16, 4),
    (3, 3, 24, 7, torch.float16, 4, 32, 8),
    (8, 1, 128, 16, torch.float16, 4, 16, 4),
    (8, 1, 80, 16, torch.float32, 1, 32, 4),
    (8, 2, 128, 16, torch.float16, 2, 64, 8),
    (8, 2, 128, 5, torch.float32, 3, 16, 4),
]


# --- the fold decode kernel (tl.dot on the raw codes, scales and zeros on the score tiles) ------------------

FOLD_DECODE_CASES = [  # Hq, Hkv, D, block_size, dtype, num_splits, block_n, bits: GQA groups 1/3/4/8, odd D and pages
    (6, 2, 80, 5, torch.float32, 3, 16, 8),
    (6, 2, 80, 5, torch.float16, 2, 16, 4),  # 4 bits, D/2 = 40: key groups of 16, 16 and 8 per half
    (3, 3, 24, 7, torch.float32, 1, 16, 4),  # D/2 = 12: one key group of 12 per half
    (3, 3, 24, 7, torch.float16, 4, 32, 8),
    (8, 1, 128, 16, torch.float16, 4, 16, 4),
    (8, 1, 80, 16, torch.float32, 1, 32, 4),
    (8, 2, 128, 16, torch.float16, 2, 64, 8),
    (4, 1, 128, 7, torch.float16, 3, 32, 4),
]


@needs_triton
@pytest.mark.parametrize("kernel,Hq,Hkv,D,block_size,dtype,num_splits,block_n,bits",
                         [("fma", *case) for case in FMA_DECODE_CASES] + [("fold", *case) for case in FOLD_DECODE_CASES])
def test_decode_codes_kernels_match_ref(kernel, Hq, Hkv, D, block_size, dtype, num_splits, block_n, bits):
    """kernel="fma" and "fold" (the kernels that compute on the codes; fold dequantizes grouped 4-bit keys in the
    tile) against the reference on the cache's
    layouts (4 bits: K in 16-channel groups, D 24: one group of 12 per half, D 80: 16 + 16 + 8), kv lengths
    ending mid-block and mid-tile, splits left empty (kv_len 1) and an empty sequence (kv_len 0: zeros).
    fold: float16 q takes the folded 1024 offset (codes fed to the dot as 1024 + c), float32 q the codes."""
    c = _quant_case((1, 1, 1, 1, 1), (1, 37, 70, 16, 5), Hq, Hkv, D, block_size, dtype, bits,
                    seed={"fma": 31, "fold": 41}[kernel])
    kv_lens = c.kv_lens.clone()
    kv_lens[4] = 0
    args = (c.q, *c.quant_caches, c.block_tables, kv_lens, c.scale)
    out = attention.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=block_n, kernel=kernel)
    assert out.shape == c.q.shape and out.dtype == dtype
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    ref = attention.paged_decode_attention_ref(c.q[:4], *c.quant_caches, c.block_tables[:4], kv_lens[:4], c.scale)
    torch.testing.assert_close(out[:4], ref, **ATTN_TOL[dtype])


@needs_triton
def test_decode_fold_kernel_int4_default_splits(monkeypatch):
    """int4 launches that the default heuristic gives one KV split run INT4_FOLD_SPLITS splits (here 4: the table
    spans 70 blocks of 16 tokens, 1,120 >= 4 x 256) at BLOCK_N 64: the split ranges and their merge match the
    reference, short sequences leaving splits empty included."""
    c = _quant_case((1,) * 4, (1100, 1, 63, 517), 8, 4, 64, 16, torch.float16, 4, seed=48)
    launches = []
    kernel = attention._decode_fold_kernel
    monkeypatch.setattr(attention, "_decode_fold_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        lambda *a, **kw: (launches.append((grid, kw["BLOCK_N"])), kernel[grid](*a, **kw)))})())
    args = (c.q, *c.quant_caches, c.block_tables, c.kv_lens, c.scale)
    out = attention.paged_decode_attention_triton(*args, kernel="fold")
    assert launches == [((4, 4, 4), 64)]  # 16 programs fill the (CPU's 4) SMs: the heuristic alone gives 1 split
    torch.testing.assert_close(out, attention.paged_decode_attention_ref(*args), **ATTN_TOL[torch.float16])


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_fold_kernel_bfloat16(bits):
    """bfloat16 q runs the float16 path (q times the softmax scale, rounded to float16: the codes' operand 1024 + c
    is exact in float16 only): within one bfloat16 step of the reference."""
    c = _quant_case((1, 1, 1), (1, 37, 70), 8, 2, 80, 5, torch.bfloat16, bits, seed=46)
    args = (c.q, *c.quant_caches, c.block_tables, c.kv_lens, c.scale)
    out = attention.paged_decode_attention_triton(*args, num_splits=2, block_n=16, kernel="fold")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, attention.paged_decode_attention_ref(*args), rtol=1.6e-2, atol=1.6e-2)


@needs_triton
def test_decode_fold_kernel_offset_cancels_at_large_codes():
    """The folded 1024: keys and values whose codes sit near 255 with large zeros (|z| >> s), float16 q: the dot
    sums q (1024 + c) and the zero term takes 1024 s back out in float32; the result stays within float16
    attention's tolerance of the reference (an fp16 1024 * s rounding would be off by up to half a step)."""
    c = _quant_case((1, 1), (45, 9), 8, 2, 64, 16, torch.float16, 8, seed=42)
    for store in c.quant_caches:
        store.codes.clamp_(min=200)
        store.scales_zeros[..., 1] = torch.where(store.scales_zeros[..., 1].isnan(), store.scales_zeros[..., 1],
                                                 store.scales_zeros[..., 1] - 30.0)
    args = (c.q, *c.quant_caches, c.block_tables, c.kv_lens, c.scale)
    out = attention.paged_decode_attention_triton(*args, num_splits=2, block_n=16, kernel="fold")
    torch.testing.assert_close(out, attention.paged_decode_attention_ref(*args), **ATTN_TOL[torch.float16])


@needs_triton
@pytest.mark.parametrize("kernel,seeds", [("fma", (32, 33)), ("fold", (43, 44))])
def test_decode_codes_kernels_per_vector_int4_keys(kernel, seeds):
    """One (scale, zero) per K vector with 4 bits (the pre-group layout, still a valid QuantizedKV): the scale
    folded out of the two nibble halves' dots."""
    c = _quant_case((1, 1), (45, 9), 4, 2, 64, 16, torch.float32, 4, seed=seeds[0])
    k = c.quant_caches[0]
    per_vector = QuantizedKV.empty(*k.shape, 4, 64, "cpu")
    rows = torch.randn(k.shape[0] * k.shape[1], 2, 64, generator=_gen(seeds[1]))  # [slots, Hkv, D]
    per_vector.codes.view(-1, 2, 32)[:], per_vector.scales_zeros.view(-1, 2, 1, 2)[:] = quantize_kv_ref(rows, 4)
    args = (c.q, per_vector, c.quant_caches[1], c.block_tables, c.kv_lens, c.scale)
    out = attention.paged_decode_attention_triton(*args, num_splits=2, block_n=16, kernel="fold")
    torch.testing.assert_close(out, attention.paged_decode_attention_ref(*args), **FP32)


@needs_triton
@pytest.mark.parametrize("kernel,bits", [("mma", 8), ("fma", 4), ("fold", 8), ("fold", 4)])
def test_decode_quantized_last_split_merges(monkeypatch, kernel, bits):
    # 3 splits of 16-token tiles: kv_len 1, 9, 11 and 16 leave two splits empty, 37, 43 and 70 end the last one early
    c = _quant_case((1, 1, 1, 1), (1, 37, 70, 16), 8, 2, 64, 5, torch.float16, bits, seed=49)
    args = (c.q, *c.quant_caches, c.block_tables, c.kv_lens, c.scale)
    check_split_decode_merges_in_kernel(monkeypatch, args, torch.tensor([1, 9, 43, 11], dtype=torch.int32), kernel,
                                        3, 16, ATTN_TOL[torch.float16])


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_fold_kernel_on_cuda(bits, dtype):
    """The compiled fold kernel (float16: the inline-PTX code conversion) at the 8B shape against the reference."""
    c = _quant_case((1,) * 4, (1, 300, 517, 64), 32, 8, 128, 64, dtype, bits, seed=45)
    caches = [QuantizedKV(x.codes.cuda(), x.scales_zeros.cuda(), bits, x.group) for x in c.quant_caches]
    args = (c.q.cuda(), *caches, c.block_tables.cuda(), c.kv_lens.cuda(), c.scale)
    ref = attention.paged_decode_attention_ref(*args).float()
    for splits in (1, 4):
        out = attention.paged_decode_attention_triton(*args, num_splits=splits, kernel="fold")
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
