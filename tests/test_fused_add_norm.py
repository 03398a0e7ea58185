"""A linear that ends a block at one token, with the residual add and the next RMSNorm in its kernel's tail
(kernels/rmsnorm.py add_norm_when_done; the ADD_NORM of kernels/w4a16.py's GEMV and kernels/w4a16_mma.py):
the interpreter paths on odd shapes (columns past N masked, a partial group, split-K with the last split merging)
against the same kernel's plain output then rms_norm, the counter left at zero for the next call, the fallback
for every other case, and on a GPU the engine's greedy tokens with and without it.

GPU tests: TRITON_INTERPRET=0 pytest -m gpu tests/test_fused_add_norm.py
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from lmc.errors import LmcError
from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_mma as MM
from lmc.kernels.rmsnorm import AddNorm, rms_norm_ref
from lmc.kernels.split_counters import split_counters
from test_w4a16_mma import _quantized

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and TRITON_INTERPRET=0 (run: TRITON_INTERPRET=0 pytest -m gpu)")
EPS = 1e-5


def _residual_and_weight(n: int, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    residual = (4 * torch.randn(1, n, generator=g)).half().to(device)  # [1, N]
    weight = (1 + 0.3 * torch.randn(n, generator=g)).half().to(device)  # [N]
    return residual, weight


def _check(plain: torch.Tensor, fused: tuple[torch.Tensor, torch.Tensor], residual, weight):
    """fused (y, h) against rms_norm on the kernel's own plain output: h exactly (one rounding of the same sum),
    y to float16's last bit (the kernel's row sum runs in another order than torch's mean)."""
    y_want, h_want = rms_norm_ref(plain, weight, EPS, residual)
    y, h = fused
    assert torch.equal(h, h_want)
    torch.testing.assert_close(y.float(), y_want.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,k,group,warps,split_k,buffers,blocks,kw", [
    (80, 384, 128, 4, 1, 2, 1, 1),  # one program, N not a power of two (BLOCK_H 128, lanes past N masked)
    (80, 384, 128, 1, 3, 2, 1, 1),  # five programs x 3 splits: the done counter after the split merges
    (112, 320, 64, 2, 2, 4, 1, 1),  # group 64, an odd number of blocks a program
    (96, 640, 128, 2, 2, 2, 2, 1),  # two blocks a warp, the last warp's second block past N
    (48, 640, 128, 2, 1, 2, 1, 2)])  # two warps split K in shared memory
def test_mma_kernel_add_norm_tail(n, k, group, warps, split_k, buffers, blocks, kw):
    q, s, z = _quantized(n, k, group, seed=n + k + split_k)
    qfrag, sz = MM.mma_layout(q, s, z, group)
    x = torch.randn(1, k).half()  # [1, K]
    residual, weight = _residual_and_weight(n, seed=k)
    launch = dict(warps=warps, split_k=split_k, buffers=buffers, blocks=blocks, kw=kw)
    plain = MM.w4a16_mma_triton(x, qfrag, sz, group, **launch)  # [1, N]
    fused = MM.w4a16_mma_triton(x, qfrag, sz, group, add_norm=AddNorm(residual, weight, EPS), **launch)
    _check(plain, fused, residual, weight)
    assert not split_counters(x.device, 64).any()  # the last program set its counter back: the next call starts at 0
    again = MM.w4a16_mma_triton(x, qfrag, sz, group, add_norm=AddNorm(residual, weight, EPS), **launch)
    assert torch.equal(again[0], fused[0]) and torch.equal(again[1], fused[1])


@pytest.mark.parametrize("n,k,group,block_n,split_k,depth,preload", [
    (72, 300, 32, 32, 1, 1, False),  # a partial group (K % G), three column blocks, the last one short
    (72, 300, 32, 16, 4, 1, True),  # split-K: the done counter after each block's merge
    (40, 256, 64, 64, 3, 2, False)])  # one column block wider than N, depth 2
def test_gemv_kernel_add_norm_tail(n, k, group, block_n, split_k, depth, preload):
    from test_w4a16 import _quantized as quantized_k8

    _, q, s, z = quantized_k8(n, k, group, torch.float16, seed=n * k)
    x = torch.randn(1, k).half()
    residual, weight = _residual_and_weight(n, seed=n)
    launch = dict(block_n=block_n, split_k=split_k, depth=depth, preload=preload)
    plain = W.w4a16_gemv_triton(x, q, s, z, group, **launch)
    fused = W.w4a16_gemv_triton(x, q, s, z, group, add_norm=AddNorm(residual, weight, EPS), **launch)
    _check(plain, fused, residual, weight)
    assert not split_counters(x.device, 64).any()


def test_add_norm_takes_one_row_and_no_silu():
    q, s, z = _quantized(32, 128, 128, seed=3)
    qfrag, sz = MM.mma_layout(q, s, z, 128)
    residual, weight = _residual_and_weight(32, seed=1)
    with pytest.raises(LmcError, match="one row and no silu_mul"):
        MM.w4a16_mma_triton(torch.randn(2, 128).half(), qfrag, sz, 128,
                            add_norm=AddNorm(residual.expand(2, 32), weight, EPS))
    with pytest.raises(LmcError, match="one row and no silu_mul"):
        W.w4a16_gemv_triton(torch.randn(1, 128).half(), q, s, z, 128, add_norm=AddNorm(residual[:, :16], weight, EPS))


def test_matmul_add_norm_elsewhere_is_the_linear_then_rms_norm():
    """Off CUDA (and for more than one row, or a path without the tail) it is the plain linear, then rms_norm."""
    _, q, s, z = __import__("test_w4a16")._quantized(72, 300, 32, torch.float16, seed=2)
    residual, weight = _residual_and_weight(72, seed=2)
    for rows in (1, 3):
        x = torch.randn(rows, 300).half()
        res = residual.expand(rows, 72).contiguous()
        y, h = W.w4a16_matmul_add_norm(x, q, s, z, 32, AddNorm(res, weight, EPS))
        y_want, h_want = rms_norm_ref(W.w4a16_matmul(x, q, s, z, 32), weight, EPS, res)
        assert torch.equal(y, y_want) and torch.equal(h, h_want)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k,path", [(4096, 4096, "gemv"), (4096, 14336, "mma"), (4096, 4096, "mma")])
def test_fused_add_norm_on_cuda_at_8b_shapes(n, k, path):
    q, s, z = _quantized(n, k, 128, seed=k, device="cuda")
    x = torch.randn(1, k, device="cuda").half()
    residual, weight = _residual_and_weight(n, seed=7, device="cuda")
    if path == "mma":
        qfrag, sz = MM.mma_layout(q, s, z, 128)
        launch = dict(warps=8, split_k=16, buffers=2)
        plain = MM.w4a16_mma_triton(x, qfrag, sz, 128, **launch)
        runs = [MM.w4a16_mma_triton(x, qfrag, sz, 128, add_norm=AddNorm(residual, weight, EPS), **launch)
                for _ in range(3)]
    else:
        launch = dict(block_n=64, split_k=8, num_warps=2, preload=True)
        plain = W.w4a16_gemv_triton(x, q, s, z, 128, **launch)
        runs = [W.w4a16_gemv_triton(x, q, s, z, 128, add_norm=AddNorm(residual, weight, EPS), **launch)
                for _ in range(3)]
    _check(plain, runs[0], residual, weight)
    assert all(torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1]) for r in runs)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", ["gemv", "mma"])
def test_engine_greedy_tokens_with_and_without_the_fused_add_norm(checkpoint, tmp_path, monkeypatch, case):
    """An int4 engine on CUDA (CUDA graphs on): greedy tokens and one-token logits equal with LMC_FUSED_ADD_NORM=1
    and =0, and the fused kernels ran (hidden 72, G 32: the GEMV, no mma layout; hidden 256, G 128: mma)."""
    from lmc.compiler.quantize import QuantizeOptions, quantize
    from lmc.runtime.config import EngineConfig
    from lmc.runtime.engine import Engine
    from lmc.runtime.sampling import GenerationConfig

    shape = {} if case == "gemv" else dict(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    group = 32 if case == "gemv" else 128
    src = checkpoint("llama3", dtype=torch.float16, **shape)
    ws = tmp_path / "int4"
    quantize(src, ws, QuantizeOptions(calib_samples=0, w_group_size=group, workspace=True, dtype="float16",
                                      device="cpu"), say=lambda *_: None)
    launched = []
    for name in ("w4a16_gemv_triton", "w4a16_mma_triton"):
        real = getattr(W, name)
        monkeypatch.setattr(W, name, lambda *a, _real=real, _name=name, **kw: (
            launched.append(_name) if kw.get("add_norm") is not None else None, _real(*a, **kw))[1])
    prompts = [[5, 17, 33, 2 * i + 40] for i in range(3)]
    results = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("LMC_FUSED_ADD_NORM", fused)
        engine = Engine(str(ws), EngineConfig(device="cuda", session_len=64, max_batch_size=4))
        try:
            out = engine.generate(prompts[:1], GenerationConfig(max_new_tokens=12, ignore_eos=True))
            results[fused] = out[0].token_ids
        finally:
            engine.close()
        if fused == "1":
            assert f"w4a16_{case}_triton" in launched, launched
            launched.clear()
        else:
            assert launched == []
    assert results["1"] == results["0"]
