"""kernels/gemv.py: the float GEMV candidate against its float32 reference under the interpreter, on shapes
that are not multiples of the blocks (rows and K left over, K shorter than one step, a strided W)."""
import pytest
import torch

from lmc.kernels import gemv

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
