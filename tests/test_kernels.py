"""The non-quantized kernels: each Triton launcher (TRITON_INTERPRET=1, CPU tensors) against its torch
reference, and each reference against an independent oracle (transformers' Llama ops, dense attention)."""
import os

# read as triton and each kernel are decorated, before their first import; TRITON_INTERPRET=0 (set by the
# caller) runs the gpu-marked tests on CUDA instead
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from lmc.kernels import attention, rmsnorm, rotary, silu_mul
from lmc.kernels.split_counters import split_counters


FP32 = dict(rtol=1e-5, atol=1e-5)
FP16 = dict(rtol=2e-3, atol=2e-3)
TOL = {torch.float32: FP32, torch.float16: FP16}
ATTN_TOL = {torch.float32: FP32, torch.float16: dict(rtol=4e-3, atol=4e-3)}  # p is rounded to fp16 before p @ v


@pytest.fixture(scope="module")
def triton_interpreter():
    """Skips without triton; fails, saying why, where triton was imported before TRITON_INTERPRET was set."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.sum, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; set it at the top of tests/conftest.py")


needs_triton = pytest.mark.usefixtures("triton_interpreter")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- RMSNorm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_ref_matches_hf_llama(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = _gen(0)
    x = torch.randn(7, 80, generator=g).to(dtype)
    res = torch.randn(7, 80, generator=g).to(dtype)
    hf = LlamaRMSNorm(80, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(80, generator=g) + 0.5)
        y, h = rmsnorm.rms_norm_ref(x, hf.weight, 1e-6, residual=res)
        assert torch.equal(h, x + res)  # the residual stream is rounded to the input dtype, like HF's add
        assert torch.equal(y, hf(h))
        y0, h0 = rmsnorm.rms_norm_ref(x, hf.weight, 1e-6)
        assert h0 is x and torch.equal(y0, hf(x))


@needs_triton
@pytest.mark.parametrize("shape", [(7, 80), (5, 333), (7, 3, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_triton_matches_ref(shape, with_residual, dtype):
    g = _gen(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    res = torch.randn(shape, generator=g).to(dtype) if with_residual else None
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    y, h = rmsnorm.rms_norm_triton(x, w, 1e-5, residual=res)
    y_ref, h_ref = rmsnorm.rms_norm_ref(x, w, 1e-5, residual=res)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    if with_residual:
        assert torch.equal(h, h_ref)
    else:
        assert h is x


def test_rms_norm_ref_columns_gives_them_in_that_order():
    g = _gen(2)
    x, res = torch.randn(3, 80, generator=g), torch.randn(3, 80, generator=g)
    w = torch.rand(80, generator=g) + 0.5
    perm = torch.randperm(80, generator=g).to(torch.int32)  # an act-order linear's input order: it reads y[:, perm]
    y, h = rmsnorm.rms_norm_ref(x, w, 1e-5, residual=res)
    y_perm, h_perm = rmsnorm.rms_norm_ref(x, w, 1e-5, residual=res, columns=perm)
    assert torch.equal(y_perm, y[:, perm.long()]) and torch.equal(h_perm, h)  # the residual stream keeps its order


@needs_triton
@pytest.mark.parametrize("shape", [(7, 80), (5, 333)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_triton_columns_matches_ref(shape, with_residual):
    g = _gen(3)
    x = (torch.randn(shape, generator=g) * 3).half()
    res = torch.randn(shape, generator=g).half() if with_residual else None
    w = (torch.rand(shape[-1], generator=g) + 0.5).half()
    perm = torch.randperm(shape[-1], generator=g).to(torch.int32)  # [H]
    y, h = rmsnorm.rms_norm_triton(x, w, 1e-5, residual=res, columns=perm)
    y_ref, h_ref = rmsnorm.rms_norm_ref(x, w, 1e-5, residual=res, columns=perm)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float16])
    assert torch.equal(h, h_ref) if with_residual else h is x


@needs_triton
@pytest.mark.parametrize("t,k", [(1, 80), (5, 1500), (3, 2049)])  # K past one 1024-column block, not a multiple
def test_gather_columns_triton_matches_index_select(t, k):
    from lmc.kernels import gather

    g = _gen(4)
    x = torch.randn(t, k, generator=g).half()
    columns = torch.randperm(k, generator=g).to(torch.int32)
    y = torch.empty_like(x)
    gather._gather_columns_kernel[(t, -(-k // gather.BLOCK))](x, columns, y, k, x.stride(0), y.stride(0),
                                                               BLOCK=gather.BLOCK, PDL=False)
    assert torch.equal(y, x[:, columns.long()])


# --- rotary ------------------------------------------------------------------------------------------------


def _cos_sin(T: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 4000, (T,), generator=_gen(seed)).float()  # [T]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))  # [D/2]
    freqs = pos[:, None] * inv_freq[None, :]  # [T, D/2]
    return freqs.cos(), freqs.sin()


def test_rotary_ref_matches_hf_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = _gen(2)
    q = torch.randn(7, 6, 64, generator=g)
    k = torch.randn(7, 2, 64, generator=g)
    cos, sin = _cos_sin(7, 64, seed=3)
    q_out, k_out = rotary.apply_rotary_ref(q, k, cos, sin)
    cos_full = torch.cat((cos, cos), dim=-1).double()  # [T, D]: HF repeats the frequencies
    sin_full = torch.cat((sin, sin), dim=-1).double()  # [T, D]
    q_hf, k_hf = apply_rotary_pos_emb(q.double(), k.double(), cos_full, sin_full, unsqueeze_dim=1)
    torch.testing.assert_close(q_out.double(), q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.double(), k_hf, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D", [(6, 2, 64), (3, 3, 128), (8, 1, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_triton_matches_ref(Hq, Hkv, D, dtype):
    g = _gen(4)
    T = 7
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).to(dtype)  # [T, (Hq + 2 Hkv) D], fused projection
    q = qkv[:, : Hq * D].view(T, Hq, D)  # strided views, as the runtime passes them
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    cos, sin = _cos_sin(T, D, seed=5)
    q_out, k_out = rotary.apply_rotary_triton(q, k, cos, sin)
    q_ref, k_ref = rotary.apply_rotary_ref(q, k, cos, sin)
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOL[dtype])
    assert torch.equal(qkv[:, : Hq * D].view(T, Hq, D), q)  # inputs untouched


def _rotary_kv_case(Hq, Hkv, D, dtype, device="cpu", T=5, block_size=3, num_blocks=6, seed=11):
    """Strided q/k/v views of a fused qkv, cos/sin, noisy caches and T distinct shuffled slots."""
    g = _gen(seed)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).to(dtype).to(device)  # [T, (Hq + 2 Hkv) D]
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    cos, sin = (t.to(device) for t in _cos_sin(T, D, seed=seed + 1))
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T].to(device)  # [T]
    return qkv, q, k, v, cos, sin, k_cache, v_cache, slots


def test_rotary_write_kv_ref_is_rotary_then_cache_write():
    qkv, q, k, v, cos, sin, k_cache, v_cache, slots = _rotary_kv_case(6, 2, 16, torch.float32)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = rotary.rotary_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slots)
    q_ref, k_ref = rotary.apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(q_out, q_ref)
    k0.view(-1, 2, 16)[slots] = k_ref
    v0.view(-1, 2, 16)[slots] = v
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D", [(6, 2, 64), (3, 3, 24), (8, 1, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_write_kv_triton_matches_ref(Hq, Hkv, D, dtype):
    qkv, q, k, v, cos, sin, k_cache, v_cache, slots = _rotary_kv_case(Hq, Hkv, D, dtype)
    qkv0 = qkv.clone()
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    q_ref = rotary.rotary_write_kv_ref(q, k, v, cos, sin, kc_ref, vc_ref, slots)
    q_out = rotary.rotary_write_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert q_out.dtype == dtype and q_out.shape == q.shape
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_cache, kc_ref, **TOL[dtype])  # rotated k at its slots, noise elsewhere untouched
    assert torch.equal(v_cache, vc_ref)  # v copied bit for bit
    assert torch.equal(qkv, qkv0)  # inputs untouched


@pytest.mark.gpu
def test_rotary_write_kv_on_cuda():
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    for dtype in (torch.float16, torch.float32):
        qkv, q, k, v, cos, sin, k_cache, v_cache, slots = _rotary_kv_case(32, 8, 128, dtype, "cuda", T=7,
                                                                            block_size=64, num_blocks=3)
        kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
        q_ref = rotary.rotary_write_kv_ref(q, k, v, cos, sin, kc_ref, vc_ref, slots)
        q_out = rotary.rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
        torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
        torch.testing.assert_close(k_cache, kc_ref, **TOL[dtype])
        assert torch.equal(v_cache, vc_ref)


# --- SiLU * mul --------------------------------------------------------------------------------------------


def test_silu_mul_ref_matches_definition():
    gu = torch.randn(7, 2 * 37, generator=_gen(6)) * 4
    gate, up = gu.double()[:, :37], gu.double()[:, 37:]
    expected = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(silu_mul.silu_mul_ref(gu).double(), expected, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("T,I", [(7, 37), (3, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_triton_matches_ref(T, I, dtype):
    gu = (torch.randn(T, 2 * I, generator=_gen(7)) * 4).to(dtype)
    out = silu_mul.silu_mul_triton(gu)
    assert out.shape == (T, I) and out.dtype == dtype
    torch.testing.assert_close(out, silu_mul.silu_mul_ref(gu), **TOL[dtype])


# --- paged attention ---------------------------------------------------------------------------------------


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, Hq, D]
    ks: list  # per sequence [n, Hkv, D], contiguous
    vs: list
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    kv_lens: torch.Tensor  # [B] int32
    q_lens: tuple
    scale: float


def _paged_case(q_lens, kv_lens, Hq, Hkv, D, block_size, dtype, seed=0) -> PagedCase:
    """Random K/V per sequence written through write_kv_cache into shuffled blocks; unused slots hold noise."""
    g = _gen(seed)
    n_blocks = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(n_blocks) + 3
    order = torch.randperm(num_blocks, generator=g)
    block_tables = torch.zeros(len(kv_lens), max(n_blocks) + 1, dtype=torch.int32)  # a padding column
    k_cache = (torch.randn(num_blocks, block_size, Hkv, D, generator=g) * 10).to(dtype)
    v_cache = (torch.randn(num_blocks, block_size, Hkv, D, generator=g) * 10).to(dtype)
    ks, vs, used = [], [], 0
    for b, n in enumerate(kv_lens):
        block_tables[b, : n_blocks[b]] = order[used: used + n_blocks[b]]
        used += n_blocks[b]
        ks.append(torch.randn(n, Hkv, D, generator=g).to(dtype))
        vs.append(torch.randn(n, Hkv, D, generator=g).to(dtype))
        pos = torch.arange(n)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size  # [n]
        attention.write_kv_cache(ks[b], vs[b], k_cache, v_cache, slots)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedCase(q, ks, vs, k_cache, v_cache, block_tables, cu, torch.tensor(kv_lens, dtype=torch.int32),
                     tuple(q_lens), 1.0 / math.sqrt(D))


def _dense_attention(c: PagedCase) -> torch.Tensor:
    """Causal softmax attention in fp64 from the contiguous K/V, with kv heads repeated for GQA."""
    out, start = [], 0
    for L, k, v in zip(c.q_lens, c.ks, c.vs):
        n, Hkv = k.shape[:2]
        group = c.q.shape[1] // Hkv
        q = c.q[start: start + L].double()  # [L, Hq, D]
        kr = k.double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        vr = v.double().repeat_interleave(group, dim=1)
        s = torch.einsum("lhd,nhd->hln", q, kr) * c.scale  # [Hq, L, n]
        future = torch.arange(n)[None, :] > torch.arange(n - L, n)[:, None]  # [L, n]
        p = s.masked_fill(future, float("-inf")).softmax(-1)
        out.append(torch.einsum("hln,nhd->lhd", p, vr))
        start += L
    return torch.cat(out)  # [T, Hq, D]


def test_write_kv_cache_writes_only_its_slots():
    g = _gen(8)
    k_cache = torch.randn(4, 5, 2, 16, generator=g)
    v_cache = torch.randn(4, 5, 2, 16, generator=g)
    k0, v0 = k_cache.clone(), v_cache.clone()
    k = torch.randn(3, 2, 16, generator=g)
    v = torch.randn(3, 2, 16, generator=g)
    slots = torch.tensor([17, 3, 9])  # block 3 offset 2, block 0 offset 3, block 1 offset 4
    attention.write_kv_cache(k, v, k_cache, v_cache, slots)
    for i, (blk, off) in enumerate([(3, 2), (0, 3), (1, 4)]):
        assert torch.equal(k_cache[blk, off], k[i]) and torch.equal(v_cache[blk, off], v[i])
        k0[blk, off], v0[blk, off] = k[i], v[i]
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)


@pytest.mark.parametrize("Hq,Hkv,D,block_size", [(4, 4, 64, 16), (6, 2, 128, 5), (8, 1, 80, 5)])
def test_prefill_ref_matches_dense(Hq, Hkv, D, block_size):
    c = _paged_case((7, 1, 12), (7, 30, 41), Hq, Hkv, D, block_size, torch.float32, seed=9)
    out = attention.paged_prefill_attention_ref(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_seqlens_q,
                                                c.kv_lens, c.scale)
    torch.testing.assert_close(out.double(), _dense_attention(c), **FP32)


@pytest.mark.parametrize("Hq,Hkv,D,block_size", [(4, 4, 64, 16), (6, 2, 128, 5), (8, 1, 80, 5)])
def test_decode_ref_matches_dense(Hq, Hkv, D, block_size):
    c = _paged_case((1, 1, 1), (1, 37, 16), Hq, Hkv, D, block_size, torch.float32, seed=10)
    out = attention.paged_decode_attention_ref(c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale)
    torch.testing.assert_close(out.double(), _dense_attention(c), **FP32)


PREFILL_CASES = [  # Hq, Hkv, D, block_size, dtype, block_m, block_n
    (4, 4, 64, 16, torch.float32, 16, 16),
    (6, 2, 128, 5, torch.float32, 16, 32),
    (8, 1, 80, 5, torch.float16, 16, 16),
    (6, 2, 64, 16, torch.float16, 64, 64),
]


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D,block_size,dtype,block_m,block_n", PREFILL_CASES)
def test_prefill_triton_matches_ref(Hq, Hkv, D, block_size, dtype, block_m, block_n):
    # a fresh prompt, a one-token chunk, and a chunk after a cached prefix (kv_len > q_len)
    c = _paged_case((7, 1, 19), (7, 30, 41), Hq, Hkv, D, block_size, dtype, seed=11)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_seqlens_q, c.kv_lens, c.scale)
    out = attention.paged_prefill_attention_triton(*args, block_m=block_m, block_n=block_n)
    assert out.shape == c.q.shape and out.dtype == dtype
    torch.testing.assert_close(out, attention.paged_prefill_attention_ref(*args), **ATTN_TOL[dtype])
    # the engine passes the longest run from its host copy of cu_seqlens_q (no sync): the same output
    from lmc.runtime.model import PagedBatch

    max_q = PagedBatch.longest_run(c.cu_seqlens_q.cpu())
    assert max_q == 19
    given = attention.paged_prefill_attention_triton(*args, block_m=block_m, block_n=block_n, max_q=max_q)
    assert torch.equal(given, out)


DECODE_CASES = [  # Hq, Hkv, D, block_size, dtype, num_splits, block_n
    (4, 4, 64, 16, torch.float32, 1, 16),
    (6, 2, 128, 5, torch.float32, 3, 16),
    (8, 1, 80, 5, torch.float16, 4, 16),
    (6, 2, 64, 16, torch.float16, 2, 64),
]


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D,block_size,dtype,num_splits,block_n", DECODE_CASES)
def test_decode_triton_matches_ref(Hq, Hkv, D, block_size, dtype, num_splits, block_n):
    # kv_len 1 leaves splits empty; 16 fills blocks exactly; 37 and 70 end mid-block
    c = _paged_case((1, 1, 1, 1), (1, 37, 70, 16), Hq, Hkv, D, block_size, dtype, seed=12)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale)
    out = attention.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=block_n)
    assert out.shape == c.q.shape and out.dtype == dtype
    torch.testing.assert_close(out, attention.paged_decode_attention_ref(*args), **ATTN_TOL[dtype])


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_triton_empty_sequence_gives_zeros(num_splits):
    c = _paged_case((1, 1), (9, 9), 6, 2, 64, 5, torch.float32, seed=13)
    kv_lens = torch.tensor([9, 0], dtype=torch.int32)  # a padding row, as in a fixed-size decode batch
    out = attention.paged_decode_attention_triton(c.q, c.k_cache, c.v_cache, c.block_tables, kv_lens, c.scale,
                                                  num_splits=num_splits, block_n=16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = attention.paged_decode_attention_ref(c.q[:1], c.k_cache, c.v_cache, c.block_tables[:1], kv_lens[:1],
                                               c.scale)
    torch.testing.assert_close(out[:1], ref, **FP32)


class _LaunchSpy:
    """Stands in for one of attention's Triton kernels: records its name at each launch, then launches it."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch


def check_split_decode_merges_in_kernel(monkeypatch, args, kv_lens_2, kernel, num_splits, block_n, tol):
    """A split decode (args: q, caches, block tables, kv_lens, scale) launches one kernel, `kernel`'s: the last
    split of each (sequence, kv head) merges the splits, and leaves its counter at 0 (all counters are zero after
    the call), so a second call over other kv lengths kv_lens_2 (splits full, partial and empty elsewhere)
    reusing the counters matches the reference too."""
    launches = []
    for name in [n for n in vars(attention) if n.endswith("_kernel")]:
        monkeypatch.setattr(attention, name, _LaunchSpy(name, getattr(attention, name), launches))
    q, k_cache, v_cache, block_tables, kv_lens, scale = args
    for lens in (kv_lens, kv_lens_2):
        call = (q, k_cache, v_cache, block_tables, lens, scale)
        out = attention.paged_decode_attention_triton(*call, num_splits=num_splits, block_n=block_n, kernel=kernel)
        torch.testing.assert_close(out, attention.paged_decode_attention_ref(*call), **tol)
        assert not split_counters(q.device, 1).any()
    name = {"mma": "_decode_kernel", "fma": "_decode_fma_kernel", "fold": "_decode_fold_kernel"}[kernel]
    assert launches == [name, name]


@needs_triton
def test_decode_triton_last_split_merges(monkeypatch):
    # 3 splits of 16-token tiles: kv_len 1, 9, 11 and 16 leave two splits empty, 37, 43 and 70 end the last one early
    c = _paged_case((1, 1, 1, 1), (1, 37, 70, 16), 6, 2, 64, 5, torch.float16, seed=14)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale)
    check_split_decode_merges_in_kernel(monkeypatch, args, torch.tensor([1, 9, 43, 11], dtype=torch.int32), "mma", 3,
                                        16, ATTN_TOL[torch.float16])


# --- CPU path without triton -------------------------------------------------------------------------------


def test_cpu_dispatch_works_without_triton():
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` fail
import torch
from lmc.kernels.attention import paged_decode_attention, write_kv_cache
from lmc.kernels.rmsnorm import rms_norm
from lmc.kernels.rotary import apply_rotary
from lmc.kernels.silu_mul import silu_mul
x = torch.randn(3, 8)
y, h = rms_norm(x, torch.ones(8), 1e-6, residual=x)
q, k = apply_rotary(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.ones(3, 4), torch.zeros(3, 4))
assert silu_mul(torch.randn(3, 8)).shape == (3, 4)
kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
write_kv_cache(k, k, kc, vc, torch.tensor([0, 1, 2]))
o = paged_decode_attention(q[:1], kc, vc, torch.tensor([[0]], dtype=torch.int32), torch.tensor([3]), 0.5)
assert torch.isfinite(y).all() and torch.isfinite(o).all()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
