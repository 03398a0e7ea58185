"""The resident W4A16 kernel (kernels/w4a16_resident.py): every word loaded before the PDL wait, one row of x;
interpreter runs against the torch reference on odd shapes, and where the runtime takes it."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from lmc.errors import LmcError
from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_resident as R

from test_w4a16 import _triton_check


# N, K, G: N off the block (75, 37), a partial last group (200 % 64, 203 % 32, 576 % 128), K % 8 != 0 (203), a group
# count that is not a power of two (200 / 64 -> 4 of which 1 is padding, 576 / 128 -> 5 of 8)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,group,block_n", [(75, 200, 64, 16), (37, 203, 32, 8), (40, 576, 128, 32),
                                               (8, 128, 128, 64)])
def test_resident_matches_reference(n, k, group, block_n, dtype):
    _triton_check(R.w4a16_resident_triton, 1, n, k, group, dtype, block_n=block_n, num_warps=2)


def test_resident_refuses_more_than_one_row_and_bad_blocks():
    pytest.importorskip("triton")
    q = torch.zeros(25, 16, dtype=torch.int32)
    s = torch.ones(4, 16)
    with pytest.raises(LmcError, match="x \\[1, K\\]"):
        R.w4a16_resident_triton(torch.randn(2, 200), q, s, s, 64)
    with pytest.raises(LmcError, match="power of two"):
        R.w4a16_resident_triton(torch.randn(1, 200), q, s, s, 64, block_n=12)


def test_resident_config_only_when_asked_on_cuda_and_when_the_share_fits(monkeypatch):
    pytest.importorskip("triton")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LMC_W4A16_RESIDENT", raising=False)
    assert R.resident_config(3072, 4096, 128, cuda) is None  # off by default
    monkeypatch.setenv("LMC_W4A16_RESIDENT", "1")
    assert R.resident_config(3072, 4096, 128, cpu) is None
    # 8 warps x 32 words a thread = 8,192 words a program: 16 columns of K = 4096 (512 words each), 32 of 2048
    assert R.resident_config(3072, 4096, 128, cuda) == 16 and R.resident_config(4096, 2048, 128, cuda) == 32
    assert R.resident_config(4096, 7168, 128, cuda) is None  # 56 groups -> 64: 1,024 words a column, 8 columns
    assert R.resident_config(8, 4096, 64, cuda) == 16


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and TRITON_INTERPRET=0")


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(3072, 4096), (4096, 2048), (6144, 4096), (4096, 7168), (75, 203)])
def test_resident_on_gpu_at_the_8b_shapes(n, k, monkeypatch):
    """Compiled (PDL on where the GPU has it), at the 8B's qkv / wo / w2 shapes at tp 1 and 2 with the block
    resident_config picks, and through w4a16_matmul when LMC_W4A16_RESIDENT=1: the torch reference's values."""
    from test_w4a16 import _quantized

    group = 128 if k % 128 == 0 else 32
    _, q, scales, zeros = _quantized(n, k, group, torch.float16, seed=n + k)
    q, scales, zeros = q.cuda(), scales.cuda(), zeros.cuda()
    x = torch.randn(1, k, device="cuda").half()
    ref = W.w4a16_matmul_ref(x.cpu(), q.cpu(), scales.cpu(), zeros.cpu(), group).float()
    monkeypatch.setenv("LMC_W4A16_RESIDENT", "1")
    block_n = R.resident_config(n, k, group, x.device) or 8
    for got in (R.w4a16_resident_triton(x, q, scales, zeros, group, block_n=block_n),
                W.w4a16_matmul(x, q, scales, zeros, group)):
        err = ((got.float().cpu() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, (n, k, err)
