"""kernels/gemv.py: the float GEMV candidate against its float32 reference under the interpreter, on shapes
that are not multiples of the blocks (rows and K left over, K shorter than one step, a strided W), and its
silu_mul mode (the MLP's gate/up GEMV with the activation fused) against GEMV then silu_mul, bit for bit."""
import pytest
import torch

from lmc.kernels import gemv
from lmc.kernels.silu_mul import silu_mul, silu_mul_ref, silu_mul_triton

needs_triton = pytest.mark.skipif(gemv.triton is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize("n,k,block_n,block_k,dtype", [
    (37, 300, 8, 128, torch.float32),  # rows and K left over
    (5, 60, 8, 64, torch.float32),  # K shorter than one step, fewer rows than a block
    (64, 256, 16, 128, torch.float16),  # exact multiples
    (33, 129, 4, 64, torch.float16),
])
def test_gemv_matches_reference(n, k, block_n, block_k, dtype):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(1, k, generator=g).to(dtype)
    y = gemv.gemv_triton(x, w, block_n=block_n, block_k=block_k)
    assert y.shape == (1, n) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y.float(), gemv.gemv_ref(x, w).float(), **tol)


@needs_triton
def test_gemv_reads_a_strided_weight():
    """W as a row slice of a wider matrix (stride along N > K, unit stride along K), as a tp shard view is."""
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(19, 200, generator=g)
    w = wide[:, 30:130]
    x = torch.randn(1, 100, generator=g)
    torch.testing.assert_close(gemv.gemv_triton(x, w, block_n=4, block_k=64), gemv.gemv_ref(x, w),
                               rtol=1e-5, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("half,k,block_n,block_k,dtype", [
    (37, 100, 8, 64, torch.float16),  # outputs and K left over: 4 gate + 4 up rows a program, the last one partial
    (37, 100, 8, 64, torch.bfloat16),
    (5, 60, 1, 64, torch.bfloat16),  # block_n 1 -> one gate and one up row a program; K shorter than one step
    (16, 256, 16, 128, torch.float16),  # exact multiples
    (21, 129, 4, 64, torch.float32),
])
def test_gemv_silu_mul_equals_gemv_then_silu_mul(half, k, block_n, block_k, dtype):
    """silu_mul=True on w13 [2I, K] (gate rows, then up rows) gives [1, I] equal bit for bit to silu_mul of the
    plain GEMV's [1, 2I] at the same settings (gate and up rounded to the dtype first, then silu_mul's float32
    math rounded once), and close to the float32 reference."""
    g = torch.Generator().manual_seed(half * 1000 + k)
    w13 = torch.randn(2 * half, k, generator=g).to(dtype)
    x = torch.randn(1, k, generator=g).to(dtype)
    fused = gemv.gemv_triton(x, w13, block_n=block_n, block_k=block_k, silu_mul=True)
    assert fused.shape == (1, half) and fused.dtype == dtype
    assert torch.equal(fused, silu_mul_triton(gemv.gemv_triton(x, w13, block_n=block_n, block_k=block_k)))
    ref = silu_mul_ref(gemv.gemv_ref(x, w13).float())
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused.float(), ref, **tol)


@needs_triton
def test_gemv_silu_mul_reads_a_strided_weight():
    """w13 as a column slice of a wider matrix (row stride > K): the up rows are found I row strides on."""
    g = torch.Generator().manual_seed(11)
    w13 = torch.randn(2 * 19, 200, generator=g).half()[:, 30:130]  # [38, 100], row stride 200
    x = torch.randn(1, 100, generator=g).half()
    fused = gemv.gemv_triton(x, w13, block_n=4, block_k=64, silu_mul=True)
    assert torch.equal(fused, silu_mul_triton(gemv.gemv_triton(x, w13, block_n=4, block_k=64)))
    assert torch.equal(fused, gemv.gemv_triton(x, w13.contiguous(), block_n=4, block_k=64, silu_mul=True))


def test_gemv_config_leaves_cpu_and_batches_to_torch():
    """Off CUDA, more than one token, mixed dtypes: no GEMV (None), so linear stays with F.linear."""
    w = torch.randn(8, 16, dtype=torch.float16)
    assert gemv.gemv_config(torch.randn(1, 16, dtype=torch.float16), w) is None
    assert gemv.gemv_config(torch.randn(2, 16, dtype=torch.float16), w) is None
    assert all(len(c) == 3 for table in gemv.TUNED.values() for c in table.values())


@needs_triton
@pytest.mark.parametrize("bias", [False, True])
def test_linear_takes_the_gemv_where_configured(monkeypatch, bias):
    """runtime.model.linear with a configured shape runs the GEMV (bias added after) and equals F.linear."""
    from lmc.runtime import model

    calls = []
    monkeypatch.setattr(model, "gemv_config", lambda x, w: calls.append(tuple(w.shape)) or (4, 64, 2))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(21, 100, generator=g)
    x = torch.randn(1, 100, generator=g)
    b = torch.randn(21, generator=g) if bias else None
    y = model.linear(x, w, b)
    assert calls == [(21, 100)]
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)


@needs_triton
def test_mlp_takes_the_fused_gemv_where_configured(monkeypatch):
    """mlp_hidden with a float w13 whose shape gemv_config finds runs one kernel (the GEMV in silu_mul mode, at the
    configured settings) and equals silu_mul(linear(h, w13)) bit for bit; where gemv_config says None (more than one
    token, an untuned shape) it stays silu_mul(linear(...))."""
    from lmc.runtime import model

    launches, configs = [], {}
    monkeypatch.setattr(model, "gemv_config", lambda x, w: configs.get((x.shape[0], tuple(w.shape))))
    real_gemv = model.gemv_triton
    monkeypatch.setattr(model, "gemv_triton",
                        lambda *a, **kw: launches.append(("gemv", kw.get("silu_mul", False))) or real_gemv(*a, **kw))
    monkeypatch.setattr(model, "silu_mul", lambda gu: launches.append(("silu_mul",)) or silu_mul(gu))
    g = torch.Generator().manual_seed(5)
    lw = {"w13": torch.randn(2 * 37, 100, generator=g).half()}
    h1 = torch.randn(1, 100, generator=g).half()
    unfused = silu_mul_triton(gemv.gemv_triton(h1, lw["w13"], 4, 64, 2))  # [1, 37]

    configs[(1, (74, 100))] = (4, 64, 2)
    fused = model.mlp_hidden(lw, h1)
    assert launches == [("gemv", True)] and torch.equal(fused, unfused)

    launches.clear()
    h3 = torch.randn(3, 100, generator=g).half()
    assert torch.equal(model.mlp_hidden(lw, h3), silu_mul(torch.nn.functional.linear(h3, lw["w13"])))
    assert launches == [("silu_mul",)]  # F.linear, then silu_mul

    launches.clear()
    del configs[(1, (74, 100))]
    assert torch.equal(model.mlp_hidden(lw, h1), silu_mul(torch.nn.functional.linear(h1, lw["w13"])))
    assert launches == [("silu_mul",)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gemv_on_cuda_matches_cublas_on_the_tuned_shapes():
    """Compiled, on this GPU's tuned shapes (or two 8B shapes elsewhere), in float16 and bfloat16: within float
    rounding of a float32 product, and `linear` dispatches to it exactly where gemv_config says."""
    from lmc.runtime import model

    table = gemv.TUNED.get(torch.cuda.get_device_name(), {(4096, 4096): (8, 512, 8), (2048, 4096): (8, 512, 8)})
    for (k, n), config in table.items():
        for dtype in (torch.float16, torch.bfloat16):
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            x = torch.randn(1, k, device="cuda", dtype=dtype)
            ref = x.float() @ w.float().t()
            y = gemv.gemv_triton(x, w, *config)
            assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
            torch.testing.assert_close(model.linear(x, w), y if gemv.gemv_config(x, w) else torch.nn.functional.linear(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gemv_silu_mul_on_cuda_at_the_8b_mlp_shapes():
    """Compiled, at the 8B's w13 (4096 -> 2 x 14336, tp 1) and one tp 2 rank's (4096 -> 2 x 7168), in float16 and
    bfloat16, at this GPU's tuned settings (the H200's elsewhere): bit for bit silu_mul of the plain GEMV, within
    float rounding of silu_mul(F.linear(...)), and mlp_hidden takes it exactly where gemv_config says."""
    from lmc.runtime import model

    h200 = gemv.TUNED["NVIDIA H200"]
    for k, half in ((4096, 14336), (4096, 7168)):
        for dtype in (torch.float16, torch.bfloat16):
            w13 = torch.randn(2 * half, k, device="cuda", dtype=dtype) / k ** 0.5
            x = torch.randn(1, k, device="cuda", dtype=dtype)
            config = gemv.gemv_config(x, w13) or h200[(k, 2 * half)]
            fused = gemv.gemv_triton(x, w13, *config, silu_mul=True)
            assert fused.shape == (1, half)
            assert torch.equal(fused, silu_mul(gemv.gemv_triton(x, w13, *config)))
            cublas = silu_mul(torch.nn.functional.linear(x, w13))
            tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=4e-2, atol=4e-2)
            torch.testing.assert_close(fused, cublas, **tol)
            assert torch.equal(model.mlp_hidden({"w13": w13}, x), fused if gemv.gemv_config(x, w13) else cublas)
