"""The add + RMSNorm of one decode token in the next GEMV's prologue (kernels/rmsnorm.py `PendingNorm`, the NORM
forms of kernels/gemv.py and kernels/w4a16.py, runtime/model.py `add_rms_norm`): under the interpreter, each GEMV
fed a PendingNorm equals rms_norm + the unfused GEMV bit for bit (output and new residual stream), and a decode
step with the fusion equals one without it; on a GPU (`pytest -m gpu`) the same at the 8B shapes and settings."""
import numpy as np
import pytest
import torch

from lmc.compiler.convert import convert
from lmc.format.workspace import Workspace
from lmc.kernels import gemv
from lmc.kernels import rmsnorm
from lmc.kernels import w4a16 as W
from lmc.kernels.rmsnorm import PendingNorm, rms_norm_triton
from lmc.kernels.silu_mul import silu_mul

needs_triton = pytest.mark.skipif(rmsnorm.triton is None, reason="needs triton (TRITON_INTERPRET=1 on the CPU)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EPS = 1e-5


def _pending(h: int, dtype, seed: int, device="cpu") -> PendingNorm:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, h, generator=g) * 3).to(dtype).to(device)  # [1, H], a block's output
    residual = torch.randn(1, h, generator=g).to(dtype).to(device)
    weight = (torch.rand(h, generator=g) + 0.5).to(dtype).to(device)
    return PendingNorm.of(x, residual, weight, EPS)


def _unfused(p: PendingNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """What the decode step computed before: the RMSNorm kernel's (normed, new residual)."""
    return rms_norm_triton(p.x, p.weight, p.eps, p.residual)


# ----------------------------------------------------------------------------- the row's statistics

if rmsnorm.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_of_squares_kernel(h_ptr, out_ptr, H, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        h = tl.load(h_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        tl.store(out_ptr, rmsnorm.sum_of_squares(h))


def _sum_of_squares(h: torch.Tensor) -> torch.Tensor:
    out = torch.empty(1, dtype=torch.float32)
    _sum_of_squares_kernel[(1,)](h, out, h.numel(), BLOCK=triton.next_power_of_2(h.numel()))
    return out


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sum_of_squares_is_order_free_and_rounded_once(dtype):
    """The mean square every norm takes: the same bits for any order of the row's elements (a different layout
    adds in a different order; a float32 sum's bits do change with it, shown here too), and the float64 sum of the
    squares rounded once to float32, for rows of ordinary and of very large / small magnitudes."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-3, 3e3) if dtype == torch.float16 else (1.0, 1e-15, 1e15):
        h = (torch.randn(4099, generator=g) * scale).to(dtype)
        want = torch.tensor([(h.double() ** 2).sum().item()], dtype=torch.float32)
        got = _sum_of_squares(h)
        assert torch.equal(got, want), (got, want)
        orders = [torch.randperm(h.numel(), generator=g) for _ in range(4)]
        assert all(torch.equal(_sum_of_squares(h[o].contiguous()), got) for o in orders)
        float_sums = {np.cumsum((h[o].float() ** 2).numpy(), dtype=np.float32)[-1] for o in orders}  # in order
        assert len(float_sums) > 1  # a float32 sum in another order: other bits
    assert _sum_of_squares(torch.zeros(100, dtype=dtype)).item() == 0.0


@needs_triton
def test_pending_norm_materializes_into_its_residual():
    """materialize is the RMSNorm kernel, writing the new residual stream into the tensor allocated up front."""
    p = _pending(300, torch.float16, 1)
    target = p.new_residual
    y = p.materialize()
    want_y, want_h = _unfused(p)
    assert torch.equal(y, want_y) and torch.equal(target, want_h) and p.new_residual is target


# ----------------------------------------------------------------------------- the float GEMV


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("h,n,block_n,block_k,warps", [
    (300, 37, 4, 64, 2),  # H not a multiple of the step, N odd (silu: 37 outputs), the last block partial
    (576, 33, 8, 128, 4),  # SmolLM2's hidden size
    (72, 5, 2, 128, 1),  # H shorter than one step
    (1100, 9, 4, 256, 1),  # the statistics over 3 chunks (512 per warp), the last one partial
])
def test_float_gemv_prologue_equals_rms_norm_then_gemv(dtype, silu, h, n, block_n, block_k, warps):
    p = _pending(h, dtype, h + n)
    x, residual = p.x.clone(), p.residual.clone()
    w = torch.randn(2 * n if silu else n, h, generator=torch.Generator().manual_seed(n)).to(dtype)
    y = gemv.gemv_triton(p, w, block_n, block_k, warps, silu_mul=silu)
    normed, new_residual = _unfused(p)
    assert torch.equal(y, gemv.gemv_triton(normed, w, block_n, block_k, warps, silu_mul=silu))
    assert torch.equal(p.new_residual, new_residual)
    assert torch.equal(p.x, x) and torch.equal(p.residual, residual)  # the inputs are left as they were


# ----------------------------------------------------------------------------- the int4 GEMV


def _pack_codes(rng, n: int, k: int, group: int, dtype):
    """Random lmc-int4-k8 tensors: qweight [ceil(K/8), N] (codes past K zero), scales and zeros [ceil(K/G), N]."""
    codes = rng.integers(0, 16, size=(n, k)).astype(np.uint32)  # [N, K]
    words = np.zeros((-(-k // 8), n), dtype=np.uint32)
    for kk in range(k):
        words[kk // 8] |= codes[:, kk] << np.uint32(4 * (kk % 8))
    groups = -(-k // group)
    scales = torch.from_numpy(rng.uniform(0.002, 0.02, size=(groups, n))).to(dtype)
    zeros = torch.from_numpy(rng.integers(0, 16, size=(groups, n)).astype(np.float32)).to(dtype)
    return torch.from_numpy(words.view(np.int32).copy()), scales, zeros


INT4_CASES = [  # (N, K, group, launcher keywords)
    (38, 200, 64, dict(block_n=16)),  # K with a partial group, one split
    (37, 200, 32, dict(block_n=16, split_k=2)),  # N odd (plain form only), two splits
    (40, 200, 32, dict(block_n=8, split_k=4, depth=2)),  # 7 groups over 4 splits, two groups ahead
    (40, 96, 32, dict(block_n=8, split_k=4, preload=True)),  # 3 groups over 4 splits: the last split is empty
    (24, 576, 128, dict(block_n=8, split_k=2, num_warps=2)),
    (24, 1100, 128, dict(block_n=8, split_k=3)),  # 3 chunks of 512, 9 groups over 3 splits (the last partial)
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("n,k,group,kw", INT4_CASES)
def test_int4_gemv_prologue_equals_rms_norm_then_gemv(dtype, silu, n, k, group, kw):
    if silu and n % 2:
        pytest.skip("the fused gate/up weight has an even N")
    qweight, scales, zeros = _pack_codes(np.random.default_rng(n * k), n, k, group, dtype)
    p = _pending(k, dtype, n + k)
    y = W.w4a16_gemv_triton(p, qweight, scales, zeros, group, silu_mul=silu, **kw)
    normed, new_residual = _unfused(p)
    assert torch.equal(y, W.w4a16_gemv_triton(normed, qweight, scales, zeros, group, silu_mul=silu, **kw))
    assert torch.equal(p.new_residual, new_residual)


@needs_triton
def test_int4_gemv_prologue_reads_only_the_row_it_wrote(monkeypatch):
    """Every program reads the normed row from a scratch row that it stored itself (its split's groups, the empty
    split's too): with every fresh allocation full of NaN, nothing NaN comes out."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    qweight, scales, zeros = _pack_codes(np.random.default_rng(5), 40, 96, 32, torch.float16)
    for kw in (dict(block_n=8, split_k=4), dict(block_n=8, split_k=1), dict(block_n=16, split_k=2, depth=2)):
        p = _pending(96, torch.float16, 6)
        y = W.w4a16_gemv_triton(p, qweight, scales, zeros, 32, **kw)
        monkeypatch.setattr(torch, "empty", real_empty)
        normed, new_residual = _unfused(p)
        assert torch.equal(y, W.w4a16_gemv_triton(normed, qweight, scales, zeros, 32, **kw))
        assert torch.equal(p.new_residual, new_residual)
        monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))


@needs_triton
def test_int4_matmul_materializes_a_pending_norm_off_the_gemv():
    """On the CPU (the torch reference) w4a16_matmul and w4a16_silu_matmul run the norm first: the same result as
    on the materialized row, and the new residual written."""
    qweight, scales, zeros = _pack_codes(np.random.default_rng(2), 38, 200, 64, torch.float32)
    for fn in (W.w4a16_matmul, W.w4a16_silu_matmul):
        p = _pending(200, torch.float32, 3)
        normed, new_residual = _unfused(p)
        assert torch.equal(fn(p, qweight, scales, zeros, 64), fn(normed, qweight, scales, zeros, 64))
        assert torch.equal(p.new_residual, new_residual)


# ----------------------------------------------------------------------------- the decode step


def test_add_rms_norm_runs_the_norm_off_cuda_and_for_batches(monkeypatch):
    """Only one token on CUDA leaves the norm pending (and not under LMC_NORM_PROLOGUE=0); on the CPU add_rms_norm
    is rms_norm."""
    from types import SimpleNamespace

    from lmc.runtime import model

    g = torch.Generator().manual_seed(4)
    x, res, w = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g), torch.rand(64, generator=g)
    assert not model.fuses_norm(x)
    y, h = model.add_rms_norm(x, res, w, EPS)
    want = rmsnorm.rms_norm(x, w, EPS, res)
    assert torch.equal(y, want[0]) and torch.equal(h, want[1])
    if rmsnorm.triton is not None:
        assert model.fuses_norm(SimpleNamespace(is_cuda=True, shape=(1, 64)))
        assert not model.fuses_norm(SimpleNamespace(is_cuda=True, shape=(2, 64)))
        monkeypatch.setenv("LMC_NORM_PROLOGUE", "0")
        assert not model.fuses_norm(SimpleNamespace(is_cuda=True, shape=(1, 64)))


def _decode_logits(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill `prompt`, then `steps` greedy one-token steps through Model.hidden over the paged cache: each
    step's logits [1, V] and the tokens."""
    from lmc.runtime.kv_cache import PagedKVCache
    from lmc.runtime.model import PagedBatch

    block = 16
    cache = PagedKVCache(model.cfg, 4, block, model.dtype, torch.device("cpu"))
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    n = len(prompt)
    paged = PagedBatch(cache.k, cache.v, torch.arange(n), table, torch.tensor([n], dtype=torch.int32),
                       torch.tensor([0, n], dtype=torch.int32))
    logits = model.logits(model.hidden(torch.tensor(prompt), torch.arange(n), paged, n - 1)[-1:])  # [1, V]
    out, tokens = [], []
    for pos in range(n, n + steps):
        tokens.append(int(logits.argmax(-1)))
        paged = PagedBatch(cache.k, cache.v, torch.tensor([pos]), table, torch.tensor([pos + 1], dtype=torch.int32),
                           None)
        logits = model.logits(model.hidden(torch.tensor(tokens[-1:]), torch.tensor([pos]), paged, pos))
        out.append(logits)
    return out, tokens


@needs_triton
@pytest.mark.parametrize("case", ["llama3", "qwen3"])  # qwen3: q / k norms and no MLP bias
def test_decode_step_with_the_norm_in_the_gemv_prologue_is_bit_identical(case, checkpoint, tmp_path, monkeypatch):
    """A float16 model on the CPU with every one-token linear on the GEMV (the interpreter) and add_rms_norm
    leaving the norm pending as it does on CUDA: the same logits bit for bit, step after step, as with the norm
    run by its own kernel; and the steps ran one RMSNorm kernel each (the first layer's input norm) instead of
    2 x layers + 1, plus the final norm materialized."""
    from lmc.runtime import model as M

    convert(checkpoint(case), tmp_path / "ws")
    model = M.Model(Workspace(tmp_path / "ws"), torch.device("cpu"), torch.float16)
    norms, finals = [], []
    monkeypatch.setattr(M, "gemv_config", lambda x, w: (4, 64, 2) if x.shape[0] == 1 else None)
    monkeypatch.setattr(M, "rms_norm", lambda *a, **kw: norms.append(a[0].shape[0]) or rms_norm_triton(*a, **kw))
    real_materialize = PendingNorm.materialize
    monkeypatch.setattr(PendingNorm, "materialize", lambda self: finals.append(1) or real_materialize(self))
    prompt = [1, 17, 99, 5, 230]
    qk = 2 if model.cfg.qk_norm else 0  # the q and k norms (rms_norm too) of every layer
    layers = model.cfg.num_layers

    monkeypatch.setattr(M, "fuses_norm", lambda x: False)
    want, want_tokens = _decode_logits(model, prompt, 3)
    assert norms.count(1) == 3 * (1 + 2 * layers) and not finals

    norms.clear()
    monkeypatch.setattr(M, "fuses_norm", lambda x: x.shape[0] == 1)  # as on CUDA
    got, tokens = _decode_logits(model, prompt, 3)
    assert tokens == want_tokens
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert norms.count(1) == 3 and len(finals) == 3  # per step: the first norm, and the final one materialized
    assert sum(1 for t in norms if t > 1) == 1 + 2 * layers + qk * layers + qk * layers * 3  # prefill's, q/k norms


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
def test_prologue_gemvs_on_cuda_at_the_8b_shapes():
    """Compiled, at this GPU's settings (the H200's elsewhere) for the 8B's qkv and w13: the float GEMV and the
    int4 GEMV (inline PTX in float16) fed a PendingNorm equal the RMSNorm kernel + the unfused GEMV bit for bit,
    output and new residual, in float16 and bfloat16."""
    h200 = gemv.TUNED["NVIDIA H200"]
    for n, silu in ((6144, False), (28672, True)):
        for dtype in (torch.float16, torch.bfloat16):
            p = _pending(4096, dtype, n, "cuda")
            w = torch.randn(n, 4096, device="cuda", dtype=dtype) / 64
            config = gemv.gemv_config(p.x, w) or h200[(4096, n)]
            y = gemv.gemv_triton(p, w, *config, silu_mul=silu)
            normed, new_residual = _unfused(p)
            assert torch.equal(y, gemv.gemv_triton(normed, w, *config, silu_mul=silu))
            assert torch.equal(p.new_residual, new_residual)

            p = _pending(4096, dtype, n + 1, "cuda")
            qweight, scales, zeros = (t.cuda() for t in _pack_codes(np.random.default_rng(n), n, 4096, 128, dtype))
            path, kw = W.w4a16_config(1, n, 4096, p.x.device)
            assert path == "gemv"
            y = (W.w4a16_silu_matmul if silu else W.w4a16_matmul)(p, qweight, scales, zeros, 128)
            normed, new_residual = _unfused(p)
            assert torch.equal(y, W.w4a16_gemv_triton(normed, qweight, scales, zeros, 128, silu_mul=silu, **kw))
            assert torch.equal(p.new_residual, new_residual)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["fp16", "int4"])
def test_decode_with_the_norm_in_the_gemv_prologue_on_cuda(fmt, checkpoint, tmp_path, monkeypatch):
    """A tiny float16 model (float or int4 weights) on CUDA, every one-token float linear forced onto the GEMV:
    greedy decode steps give the same logits bit for bit with the norm in the GEMV prologue as with the norm
    kernel (add_rms_norm told not to fuse)."""
    from lmc.compiler.quantize import QuantizeOptions, quantize
    from lmc.runtime import model as M
    from lmc.runtime.kv_cache import PagedKVCache
    from lmc.runtime.model import PagedBatch

    ckpt = checkpoint("llama3")
    if fmt == "int4":
        quantize(ckpt, tmp_path / "ws", QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True,
                                                        device="cpu"), say=lambda *a, **kw: None)
    else:
        convert(ckpt, tmp_path / "ws")
    dev = torch.device("cuda")
    model = M.Model(Workspace(tmp_path / "ws"), dev, torch.float16)
    monkeypatch.setattr(M, "gemv_config", lambda x, w: (4, 64, 2) if x.shape[0] == 1 else None)

    def run() -> list[torch.Tensor]:
        cache = PagedKVCache(model.cfg, 4, 16, torch.float16, dev)
        table = torch.tensor([[0, 1]], dtype=torch.int32, device=dev)
        prompt = torch.tensor([1, 17, 99, 5, 230], device=dev)
        n = prompt.numel()
        paged = PagedBatch(cache.k, cache.v, torch.arange(n, device=dev), table,
                           torch.tensor([n], dtype=torch.int32, device=dev),
                           torch.tensor([0, n], dtype=torch.int32, device=dev))
        logits = model.logits(model.hidden(prompt, torch.arange(n, device=dev), paged, n - 1)[-1:])
        out = []
        for pos in range(n, n + 6):
            token = logits.argmax(-1)  # [1]
            paged = PagedBatch(cache.k, cache.v, torch.tensor([pos], device=dev), table,
                               torch.tensor([pos + 1], dtype=torch.int32, device=dev), None)
            logits = model.logits(model.hidden(token, torch.tensor([pos], device=dev), paged, pos))
            out.append(logits)
        return out

    fused = run()
    monkeypatch.setattr(M, "fuses_norm", lambda x: False)
    unfused = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused, strict=True))
