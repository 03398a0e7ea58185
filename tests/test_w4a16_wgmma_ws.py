"""The producer-warp W4A16 wgmma kernel (kernels/w4a16_wgmma_ws.py, Gluon, sm_90a): x permuted into the A tile's
kk order as the wgmma kernel's tables say, the launcher's errors and routing, the sm_90a compile (register budget,
no spills), and on a Hopper GPU the kernel against the mma layout's reference on odd shapes."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest
import torch

from lmc.errors import LmcError
from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_mma as MM
from lmc.kernels import w4a16_wgmma as WG
from lmc.kernels import w4a16_wgmma_ws as WS

sys.path.insert(0, str(Path(__file__).parent))
from test_w4a16_mma import _quantized, _reference, dispatch_errors  # noqa: E402
from test_w4a16_wgmma import _case, _err, _ptxas  # noqa: E402


def test_permute_x_is_the_wgmma_kernels_x_tile():
    """permute_x's chunk c is the B tile the wgmma kernel stores for chunk c (X_VIEW / X_PERM), for every chunk
    and row (odd M), and a permutation of x's values (nothing lost or repeated)."""
    x = torch.randn(7, 320, generator=torch.Generator().manual_seed(3)).half()
    xp = WS.permute_x(x)
    assert xp.shape == x.shape and xp.is_contiguous()
    for c in range(5):
        assert torch.equal(xp[:, 64 * c:64 * c + 64], WG.x_tile_emulated(x[:, 64 * c:64 * c + 64]))
    assert torch.equal(xp.sort(dim=1).values, x.sort(dim=1).values)
    assert not torch.equal(xp, x)


def test_launcher_errors():
    x, qfrag, sz, _ = _case(3, 64, 256, 64, False, seed=1)
    for kw, match in (({"rows": 32}, "rows"), ({"warpgroups": 4}, "warpgroups"), ({"stages": 5}, "stages"),
                      ({"split_k": 3}, "empty"), ({"split_k": 0}, "split_k")):
        with pytest.raises(LmcError, match=match):
            WS.w4a16_wgmma_ws_triton(x, qfrag, sz, 64, **kw)
    WS.check_args(x, qfrag, sz, 64, 64, 2, False, 1, 4)  # 4 groups in 2 splits: fine
    if not torch.cuda.is_available():
        with pytest.raises(LmcError, match="Hopper"):
            WS.w4a16_wgmma_ws_triton(x, qfrag, sz, 64)


def test_stages_entries_route_to_the_producer_warp_kernel():
    assert W._mma_launch({"rows": 128, "stages": 4}) is WS.w4a16_wgmma_ws_triton
    assert W._mma_launch({"rows": 128}) is WG.w4a16_wgmma_triton


def test_register_budget():
    """One consumer: 8 warps at 128 registers (two programs an SM), the consumer gets the rest of the program's
    32K after the producer's warpgroup at 40; two consumers: 12 warps at 168, 232 each."""
    assert WS.consumer_registers(1) == 216 and WS.consumer_registers(2) == 232
    for wg in WS.WARPGROUPS:
        assert WS.MAXNREG[wg] * 32 * 4 * (wg + 1) <= 65536


@pytest.mark.parametrize("rows,warpgroups,stages,silu,split_k", [
    (128, 1, 4, False, 1), (128, 1, 4, True, 2), (64, 1, 6, False, 1), (128, 2, 4, False, 2), (256, 2, 3, True, 1)])
def test_compiles_for_sm90a(rows, warpgroups, stages, silu, split_k):
    """The kernel builds for sm_90a with the installed Triton (no GPU): warp specialization, TMA, mbarriers, the
    register-A tile (a trivial convert_layout), within the launch's register cap, no spills."""
    if WG.gluon is None:
        pytest.skip("this Triton has no Gluon")
    if not _ptxas():
        pytest.skip("no ptxas")
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import compile_wgmma_sm90 as C

    kernel = C.compile_ws(rows, silu, split_k, warpgroups=warpgroups, stages=stages)
    info = C.ptxas_info(kernel)
    assert info["spill_bytes"] == 0 and info["registers"] <= WS.MAXNREG[warpgroups], info
    assert not any("C7515" in w for w in info["warnings"]), info  # the peeled first chunk
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx


def _gpu_check(m, n, k, group, silu, rows, split_k, warpgroups, stages, seed):
    q, s, z = _quantized(n, k, group, seed=seed, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    kw = dict(rows=rows, split_k=split_k, warpgroups=warpgroups, stages=stages, silu_mul=silu)
    got = WS.w4a16_wgmma_ws_triton(x, qfrag, sz, group, **kw)
    assert got.shape == (m, n // 2 if silu else n) and got.dtype == torch.float16
    assert _err(got, MM.mma_reference(x, qfrag, sz, group, silu)) < 3e-3
    assert _err(got, _reference(x, q, s, z, group, silu)) < 3e-3
    assert torch.equal(got, WS.w4a16_wgmma_ws_triton(x, qfrag, sz, group, **kw))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group,silu,rows,split_k,warpgroups,stages", [
    (256, 4096, 4096, 128, False, 128, 1, 1, 4), (256, 4096, 4096, 128, False, 128, 2, 2, 4),
    (256, 28672, 4096, 128, True, 256, 1, 2, 3), (130, 28672, 4096, 128, True, 128, 1, 1, 4),
    (200, 4096, 14336, 128, False, 128, 4, 1, 6), (5, 96, 640, 64, False, 64, 2, 1, 2),
    (37, 160, 640, 64, True, 128, 3, 2, 3), (130, 320, 384, 128, False, 256, 1, 2, 4),
    (64, 6144, 4096, 128, False, 64, 4, 2, 2), (255, 192, 320, 64, False, 128, 1, 1, 6)])
def test_ws_kernel_on_hopper(m, n, k, group, silu, rows, split_k, warpgroups, stages):
    """Odd M (rows past M zero-filled by TMA), partial column sets (N not a multiple of 64 x warpgroups), G = 64,
    split-K, SiLU, 1 and 2 consumers, 2-6 slots (more chunks than slots: the ring wraps)."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    _gpu_check(m, n, k, group, silu, rows, split_k, warpgroups, stages, seed=m + n + k)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 256])
def test_dispatch_to_ws_on_hopper(m, monkeypatch):
    """w4a16_matmul / w4a16_silu_matmul through a "stages" table entry."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    monkeypatch.setattr(W, "config_for", lambda name, m_, n_, k_, mma: (
        ("mma", {"rows": 128, "split_k": 1, "warpgroups": 1, "stages": 4}) if mma else ("gemm", {})))
    assert max(dispatch_errors(m)) < 3e-3
