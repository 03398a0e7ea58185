"""The W4A16 wgmma kernel (kernels/w4a16_wgmma.py, Gluon, sm_90a): a torch replay of its index arithmetic (the
same tables, the dequant PTX's bit operations, the epilogue mapping) against the mma layout's reference on odd
shapes, wrong tables caught, the sm_90a compile (which proves the register-A layout: a trivial convert_layout),
the launcher's errors and routing, and on a Hopper GPU the kernel itself."""

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

sys.path.insert(0, str(Path(__file__).parent))
from test_w4a16_mma import _quantized, _reference, dispatch_errors  # noqa: E402


def _case(m, n, k, group, silu, seed):
    q, s, z = _quantized(n, k, group, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    return x, qfrag, sz, (q, s, z)


def _err(got, want):
    return (got.float() - want).abs().max().item() / want.abs().max().item()


@pytest.mark.parametrize("m,n,k,group,silu,rows,split_k,warpgroups,ahead", [
    (5, 192, 384, 128, False, 16, 1, 1, 2), (5, 192, 384, 128, True, 8, 2, 2, 4),
    (37, 192, 320, 64, False, 32, 3, 1, 8), (37, 160, 384, 128, True, 64, 1, 2, 4),
    (130, 192, 384, 128, False, 128, 2, 1, 2), (130, 160, 320, 64, True, 16, 3, 1, 4),
    (37, 96, 320, 64, False, 256, 2, 2, 8), (130, 64, 384, 128, True, 64, 3, 1, 2),
    (130, 160, 320, 64, False, 128, 3, 2, 2), (37, 160, 640, 64, False, 64, 3, 2, 8),
    (130, 320, 384, 128, False, 128, 2, 4, 2), (37, 96, 320, 64, True, 128, 3, 4, 2)])
def test_emulation_matches_the_reference(m, n, k, group, silu, rows, split_k, warpgroups, ahead):
    """Row blocks past M, column sets past N (N not a multiple of 64 or 128: a partial set), splits with an odd
    number of chunks (G = 64) and a split with none (3 splits of 2 groups), both epilogues, 1, 2 and 4 warpgroups,
    passes of `ahead` chunks running past a split's end (those chunks add nothing)."""
    x, qfrag, sz, stored = _case(m, n, k, group, silu, seed=m + n + k)
    got = WG.emulate(x, qfrag, sz, group, rows=rows, split_k=split_k, silu_mul=silu, warpgroups=warpgroups,
                     ahead=ahead)
    assert got.shape == (m, n // 2 if silu else n) and got.dtype == torch.float16
    assert _err(got, MM.mma_reference(x, qfrag, sz, group, silu)) < 2e-3
    assert _err(got, _reference(x, *stored, group, silu)) < 2e-3


@pytest.mark.parametrize("tables", [
    {"x_perm": (0, 1, 3, 2)},  # j and s2 swapped in the x gather
    {"x_perm": (0, 3, 2, 1)},  # t and s2
    {"a_perm": (0, 5, 1, 3, 2, 4, 6)},  # t and s2 swapped in the A tile's columns
    {"a_perm": (0, 2, 1, 3, 4, 5, 6)},  # g and h in its rows (rows 16w + 2g + h)
    {"a_perm": (0, 5, 1, 4, 3, 2, 6)},  # j and s2
    {"a_view": (4, 8, 4, 4, 2, 2, 2), "a_perm": (0, 5, 1, 3, 4, 6, 2)}])  # s1 and t
def test_a_swapped_table_is_caught(tables):
    m, n, k, group = 19, 128, 256, 128
    x, qfrag, sz, _ = _case(m, n, k, group, False, seed=3)
    want = MM.mma_reference(x, qfrag, sz, group)
    assert _err(WG.emulate(x, qfrag, sz, group, rows=32), want) < 2e-3
    assert _err(WG.emulate(x, qfrag, sz, group, rows=32, **tables), want) > 0.05


def test_dequant_emulation_is_the_ptx():
    """The emulated dequant models the instructions the PTX has (and its output order), and a swapped output
    order is caught against the layout."""
    ptx = WG._dequant_ptx()
    assert ptx.count("lop3.b32") == 4 and ptx.count("shr.u32") == 1 and ptx.count("mul.rn.f16x2") == 4
    assert ptx.count("sub.f16x2") == 2 and ptx.count("fma.rn.f16x2") == 2
    assert "0x000f000f" in ptx and "0x00f000f0" in ptx and "0x2C002C00" in ptx
    assert [f"mov.b32 {{${2 * r}, ${2 * r + 1}}}, a{r};" in ptx for r in range(4)] == [True] * 4
    x, qfrag, sz, _ = _case(3, 64, 128, 128, False, seed=5)
    words = qfrag[0, 0].reshape(8, 16)  # block 0, chunk 0: row g, column 4t + j
    zz, ss = sz[0, 0, :, 0:1], sz[0, 0, :, 1:2]
    q = WG.dequant_emulated(words, zz, ss)
    a = WG.a_tile_emulated([v[None].expand(4, 8, 16).reshape(32, 16) for v in q])[:16]  # warp 0's 16 rows
    codes = (qfrag[0, 0].reshape(8, 4, 4)[..., None] >> (4 * torch.arange(8))) & 0xF  # [g, t, j, nibble]
    halves = sz[0, 0].view(torch.int16).view(torch.float16).float().reshape(8, 2, 2)  # [g, (zz, ss), lo/hi]
    for h in range(2):
        zero = halves[:, 0, 0] - 1024.0 if h == 0 else -halves[:, 0, 1] - 64.0
        scale = halves[:, 1, h]
        for s in range(4):
            col = 16 * torch.arange(4)[None, :] + 8 * (s // 2) + 2 * torch.arange(4)[:, None] + s % 2  # [t, j] -> kk
            want = ((codes[:, :, :, MM.nibble(h, s)].float() - zero[:, None, None]) * scale[:, None, None]).half()
            assert torch.equal(a[8 * h:8 * h + 8][:, col], want)  # row g + 8h, kk = 16j + 8 s2 + 2t + s1


def test_kk_order_is_the_b_tile_order():
    """kk_order (X_TMA's copy of x) puts each chunk's columns where `_x_tile` puts them (the B tile's rows)."""
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(3)).half()
    got = WG.kk_order(x)
    assert got.shape == x.shape and got.is_contiguous()
    for c in range(3):
        assert torch.equal(got[:, 64 * c:64 * c + 64], WG.x_tile_emulated(x[:, 64 * c:64 * c + 64]))
    assert not torch.equal(got, x)


def test_launcher_errors_and_availability():
    x, qfrag, sz, _ = _case(3, 64, 128, 128, False, seed=1)
    with pytest.raises(LmcError, match="rows"):
        WG.w4a16_wgmma_triton(x, qfrag, sz, 128, rows=24)
    with pytest.raises(LmcError, match="needs x"):
        WG.w4a16_wgmma_triton(x[:, :64], qfrag, sz, 128)
    with pytest.raises(LmcError, match="does not fit"):
        WG.w4a16_wgmma_triton(x, qfrag, sz, 64)
    with pytest.raises(LmcError, match="split_k"):
        WG.w4a16_wgmma_triton(x, qfrag, sz, 128, split_k=0)
    with pytest.raises(LmcError, match="warpgroups"):
        WG.w4a16_wgmma_triton(x, qfrag, sz, 128, warpgroups=3)
    for ahead, x_chunks in ((3, 1), (16, 1), (2, 2), (4, 3), (6, 2)):
        with pytest.raises(LmcError, match="ahead"):
            WG.w4a16_wgmma_triton(x, qfrag, sz, 128, ahead=ahead, x_chunks=x_chunks)
    with pytest.raises(LmcError, match="x_tma"):
        WG.w4a16_wgmma_triton(x, qfrag, sz, 128, ahead=4, x_chunks=2, x_tma=True)
    if not torch.cuda.is_available():
        with pytest.raises(LmcError, match="Hopper"):
            WG.w4a16_wgmma_triton(x, qfrag, sz, 128)
        with pytest.raises(LmcError, match="Hopper"):
            WG.w4a16_wgmma_triton(x, qfrag, sz, 128, x_tma=True)
    assert not WG.wgmma_available(torch.device("cpu")) and not WG.wgmma_available(None)


def test_rows_entries_route_to_the_wgmma_kernel(monkeypatch):
    from lmc.kernels import w4a16_tuning as T

    entry = {"m": 64, "k": 4096, "n": 4096, "path": "mma", "config": {"rows": 64, "split_k": 2},
             "fallback": {"path": "gemm", "config": {"block_m": 64}}}
    monkeypatch.setattr(T, "_tables", lambda: {"format": T.FORMAT, "default": "GPU", "devices": {
        "GPU": {"source": "test", "entries": [entry]}}})
    T._config.cache_clear()
    try:
        assert W._mma_launch({"rows": 64}) is WG.w4a16_wgmma_triton
        monkeypatch.setattr(W, "wgmma_available", lambda device: True)
        assert W.w4a16_config(200, 4096, 4096, mma=True) == ("mma", {"rows": 64, "split_k": 2})  # any M
        assert W.w4a16_config(17, 4096, 4096) == ("gemm", {"block_m": 64})  # no layout: the fallback
        monkeypatch.setattr(W, "wgmma_available", lambda device: False)  # not a Hopper / no Gluon: the fallback
        assert W.w4a16_config(64, 4096, 4096, mma=True) == ("gemm", {"block_m": 64})
    finally:
        T._config.cache_clear()


def _ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(90).path).exists()
    except Exception:  # noqa: BLE001 -- no NVIDIA backend or no ptxas: the compile test skips
        return False


def _compile_harness():
    """bench/compile_wgmma_sm90.py (builds the kernel for sm_90a without a GPU), or a skip: no Gluon or no ptxas."""
    if WG.gluon is None:
        pytest.skip("this Triton has no Gluon")
    if not _ptxas():
        pytest.skip("no ptxas")
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import compile_wgmma_sm90

    return compile_wgmma_sm90


@pytest.mark.parametrize("rows,warpgroups", [(16, 1), (64, 1), (128, 1), (128, 2), (256, 2)])
@pytest.mark.parametrize("pipeline,silu,split_k", [(False, False, 1), (True, False, 1), (False, True, 2),
                                                   (True, True, 2), (True, False, 2), (False, True, 1)])
def test_compiles_for_sm90a(rows, warpgroups, pipeline, silu, split_k):
    """The kernel builds for sm_90a with the installed Triton (no GPU): tracing it checks the register-A layout
    (convert_layout(..., assert_trivial=True)); the main loop has 4 HGMMA a chunk and no spills."""
    C = _compile_harness()
    r = C.report(rows, pipeline, silu, split_k, warpgroups=warpgroups)
    assert r["per_chunk"]["HGMMA"] == 4, r
    assert r["spill_bytes"] == 0, r
    assert r["per_chunk"]["HADD2/HFMA2/HMUL2"] == 32, r  # the dequant: 4 words a lane, 2 + 2 + 4 each
    assert r["per_chunk"]["LOP3/SHF/PRMT"] <= 40, r  # 4 + 1 a word, 4 PRMT, and some index arithmetic
    assert not any("C7515" in w for w in r["warnings"]), r  # ptxas did not serialize the wgmmas


@pytest.mark.parametrize("silu,split_k", [(False, 1), (True, 2)])
def test_four_warpgroups_fit_128_registers(silu, split_k):
    """Four warpgroups (512 threads: at most 128 registers a thread) at 128 rows with synchronous wgmma: the
    configuration that dequantizes each word once per 128 rows of x builds for sm_90a without spills."""
    C = _compile_harness()
    r = C.report(128, False, silu, split_k, warpgroups=4)
    assert r["per_chunk"]["HGMMA"] == 4 and r["spill_bytes"] == 0 and r["registers"] <= 128, r
    assert r["per_chunk"]["HADD2/HFMA2/HMUL2"] == 32, r


@pytest.mark.parametrize("rows,warpgroups,ahead,x_chunks", [
    (16, 1, 4, 1), (16, 1, 8, 2), (16, 2, 4, 2), (64, 1, 8, 1), (64, 2, 4, 2), (64, 2, 8, 1), (64, 2, 8, 2),
    (128, 2, 4, 2), (128, 2, 8, 2), (256, 2, 4, 1)])
@pytest.mark.parametrize("pipeline,silu,split_k", [(True, False, 1), (True, True, 2), (False, False, 2)])
def test_compiles_ahead_and_x_chunks_for_sm90a(rows, warpgroups, ahead, x_chunks, pipeline, silu, split_k):
    """The register ring (AHEAD chunks of words and scales in flight, the pass unrolled AHEAD times) and x stored
    X_CHUNKS chunks a barrier: 4 HGMMA and 32 dequant float16 ops a chunk, no spills, no C7515, and at most one
    barrier a store a warpgroup (x buffers of their own: Triton 3.6's membar pass adds none; at 256 rows it orders
    the 128-row halves of x stored into one buffer). (AHEAD 8 spills at 128 rows and one warpgroup, 256 any.)"""
    C = _compile_harness()
    r = C.report(rows, pipeline, silu, split_k, warpgroups=warpgroups, ahead=ahead, x_chunks=x_chunks)
    assert r["per_chunk"]["HGMMA"] == 4, r
    assert r["spill_bytes"] == 0, r
    assert r["per_chunk"]["HADD2/HFMA2/HMUL2"] == 32, r
    assert r["per_chunk"]["LOP3/SHF/PRMT"] <= 40, r
    import triton
    if triton.__version__.startswith("3.6"):  # the GPU machine's Triton (later ones' membar pass adds barriers
        #  around the asynchronous wgmmas, up to 3 a chunk)
        assert r["per_chunk"]["BAR"] <= (2 / x_chunks if rows < 256 else 3), r  # 256 rows: x in 128-row halves
    assert not any("C7515" in w for w in r["warnings"]), r


def _gpu_check(m, n, k, group, silu, rows, split_k, pipeline, warpgroups, seed, ahead=2, x_chunks=1, x_tma=False):
    q, s, z = _quantized(n, k, group, seed=seed, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    kw = dict(rows=rows, split_k=split_k, pipeline=pipeline, warpgroups=warpgroups, silu_mul=silu, ahead=ahead,
              x_chunks=x_chunks, x_tma=x_tma)
    got = WG.w4a16_wgmma_triton(x, qfrag, sz, group, **kw)
    assert got.shape == (m, n // 2 if silu else n) and got.dtype == torch.float16
    want = MM.mma_reference(x, qfrag, sz, group, silu)
    assert _err(got, want) < 3e-3
    assert _err(got, _reference(x, q, s, z, group, silu)) < 3e-3
    if not silu:  # against fp16 cuBLAS on the dequantized weight
        w = W.dequantize_int4_ref(q, s.float(), z.float(), group, k).half()  # [K, N]
        assert _err(got, (x @ w).float()) < 3e-3
    assert torch.equal(got, WG.w4a16_wgmma_triton(x, qfrag, sz, group, **kw))  # deterministic split-K sum
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group,silu,rows,split_k,pipeline,warpgroups", [
    (64, 4096, 4096, 128, False, 64, 1, True, 1), (64, 4096, 4096, 128, False, 64, 4, False, 1),
    (256, 4096, 4096, 128, False, 128, 1, True, 1), (256, 28672, 4096, 128, True, 128, 2, True, 1),
    (16, 4096, 14336, 128, False, 16, 4, True, 1), (16, 6144, 4096, 128, False, 16, 1, False, 1),
    (37, 192, 384, 128, True, 16, 3, True, 1), (130, 160, 320, 64, False, 64, 2, True, 1),
    (130, 160, 320, 64, True, 128, 1, False, 1), (5, 96, 640, 128, False, 8, 2, True, 1),
    (200, 96, 640, 64, False, 256, 3, True, 1), (17, 28672, 4096, 128, True, 32, 1, True, 1),
    (256, 4096, 4096, 128, False, 128, 2, True, 2), (256, 4096, 4096, 128, False, 256, 1, True, 2),
    (100, 28672, 4096, 128, True, 128, 1, False, 2), (37, 160, 640, 64, False, 64, 3, True, 2)])
def test_wgmma_kernel_on_hopper(m, n, k, group, silu, rows, split_k, pipeline, warpgroups):
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    _gpu_check(m, n, k, group, silu, rows, split_k, pipeline, warpgroups, seed=m + n + k)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group,silu,rows,split_k,pipeline,warpgroups,ahead,x_chunks", [
    (16, 4096, 4096, 128, False, 16, 8, True, 1, 4, 1), (16, 4096, 14336, 128, False, 16, 4, True, 1, 8, 2),
    (17, 28672, 4096, 128, True, 16, 4, True, 1, 8, 1), (64, 4096, 4096, 128, False, 64, 4, True, 2, 4, 2),
    (64, 28672, 4096, 128, True, 64, 1, True, 2, 8, 2), (256, 4096, 14336, 128, False, 64, 2, True, 2, 8, 1),
    (256, 4096, 4096, 128, False, 128, 1, True, 2, 4, 2), (200, 96, 640, 64, False, 256, 3, True, 2, 4, 1),
    (37, 192, 384, 128, True, 16, 3, True, 1, 4, 2), (130, 160, 320, 64, False, 64, 2, True, 2, 8, 2),
    (130, 160, 640, 64, True, 128, 1, False, 2, 8, 1), (5, 96, 640, 128, False, 8, 2, True, 1, 8, 2),
    (100, 4096, 4096, 128, False, 256, 1, True, 2, 4, 2), (37, 160, 640, 64, False, 64, 3, False, 2, 4, 2),
    (256, 4096, 4096, 128, False, 128, 4, False, 4, 2, 1), (256, 28672, 4096, 128, True, 128, 1, False, 4, 2, 1),
    (200, 320, 640, 64, False, 128, 3, False, 4, 2, 1), (130, 4096, 14336, 128, False, 128, 2, True, 4, 2, 1),
    (37, 96, 640, 128, True, 128, 1, False, 4, 4, 1)])
def test_wgmma_ahead_on_hopper(m, n, k, group, silu, rows, split_k, pipeline, warpgroups, ahead, x_chunks):
    """AHEAD 4 and 8 (chunks past a split's end inside the last pass, a split shorter than one pass) and x stored
    two chunks a barrier, 1, 2 and 4 warpgroups, split-K, SiLU, odd M, G = 64."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    _gpu_check(m, n, k, group, silu, rows, split_k, pipeline, warpgroups, seed=m + n + k, ahead=ahead,
               x_chunks=x_chunks)


@pytest.mark.parametrize("rows,warpgroups,ahead,pipeline,silu,split_k", [
    (64, 2, 4, True, False, 4), (64, 1, 2, True, True, 1), (128, 4, 2, False, True, 1), (128, 2, 4, True, False, 2),
    (256, 2, 2, True, False, 1), (16, 1, 8, True, False, 3)])
def test_compiles_x_tma_for_sm90a(rows, warpgroups, ahead, pipeline, silu, split_k):
    """x by TMA: the kernel builds for sm_90a (register-A layout, no spills, no C7515), with TMA loads of x and
    fewer STSM than the plain kernel (x's stores gone; the epilogue's remain)."""
    C = _compile_harness()
    def opcodes(kernel):
        return [(i.split()[1] if i.startswith("@") else i.split()[0]).split(".")[0] for _, i in C.sass(kernel)[0]]

    r = C.compile_wgmma(rows, pipeline, silu, split_k, warpgroups=warpgroups, ahead=ahead, x_tma=True)
    info = C.ptxas_info(r)
    ops = opcodes(r)
    plain = opcodes(C.compile_wgmma(rows, pipeline, silu, split_k, warpgroups=warpgroups, ahead=ahead))
    assert ops.count("HGMMA") >= 4 * 2 * ahead and "UTMALDG" in ops and "UTMALDG" not in plain, ops
    assert ops.count("STSM") < plain.count("STSM"), (ops.count("STSM"), plain.count("STSM"))  # x's stores gone
    assert info["spill_bytes"] == 0, info
    assert not any("C7515" in w for w in info["warnings"]), info


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group,silu,rows,split_k,pipeline,warpgroups,ahead", [
    (256, 28672, 4096, 128, True, 128, 1, False, 4, 2), (256, 4096, 14336, 128, False, 64, 2, True, 2, 4),
    (64, 6144, 4096, 128, False, 64, 4, True, 2, 4), (37, 192, 384, 128, True, 16, 3, True, 1, 2),
    (130, 160, 640, 64, False, 64, 2, True, 2, 8), (5, 96, 640, 128, False, 8, 2, False, 1, 4),
    (200, 96, 640, 64, False, 256, 3, True, 2, 2), (100, 28672, 4096, 128, True, 128, 1, False, 4, 2),
    (37, 160, 1280, 64, False, 128, 1, True, 2, 2), (17, 4096, 4096, 128, False, 32, 5, True, 1, 4)])
def test_wgmma_x_tma_on_hopper(m, n, k, group, silu, rows, split_k, pipeline, warpgroups, ahead):
    """x by TMA: odd M (rows past M zero-filled), odd passes (a pair with a pass of zeroed scales), a split shorter
    than one pass, G = 64, SiLU, split-K, sync and async wgmma, 1, 2 and 4 warpgroups."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    _gpu_check(m, n, k, group, silu, rows, split_k, pipeline, warpgroups, seed=m + n + k, ahead=ahead, x_tma=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m,silu", [(256, True), (100, False)])
def test_wgmma_x_tma_in_a_cuda_graph(m, silu):
    """x by TMA inside a captured CUDA graph (the decode step's): the kk-ordered copy of x and the TMA descriptor
    built at capture stay valid on replay, so a replay on new x equals an eager call on it."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    n, k = 1024, 4096
    q, s, z = _quantized(n, k, 128, seed=7, device="cuda")
    qfrag, sz = MM.mma_layout(q, s, z, 128, silu)
    kw = dict(rows=128, split_k=1, pipeline=True, warpgroups=2, ahead=2, x_tma=True, silu_mul=silu)
    x = torch.randn(m, k, device="cuda").half()
    WG.w4a16_wgmma_triton(x, qfrag, sz, 128, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = WG.w4a16_wgmma_triton(x, qfrag, sz, 128, **kw)
    for seed in (1, 2):
        x.copy_(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).half())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, WG.w4a16_wgmma_triton(x, qfrag, sz, 128, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 64, 256])
def test_dispatch_to_wgmma_on_hopper(m, monkeypatch):
    """w4a16_matmul / w4a16_silu_matmul through a "rows" table entry."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    monkeypatch.setattr(W, "config_for", lambda name, m_, n_, k_, mma: (
        ("mma", {"rows": 64, "split_k": 2}) if mma else ("gemm", {})))
    assert max(dispatch_errors(m)) < 3e-3


def test_bench_grid_and_table_entries_carry_the_wgmma_keys(monkeypatch):
    """bench_w4a16_mma --wgmma-rows: the grid times the wgmma kernel where it runs (rows up to 2M), --wgmma-only
    leaves the mma.sync grids out, and a winning configuration becomes a "rows" entry."""
    import argparse

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import bench_w4a16_mma as B

    args = argparse.Namespace(smoke=False, wgmma_only=True, wgmma_rows=(16, 64, 128), wgmma_splits=(1, 2),
                              wgmma_pipeline=(1,), wgmma_warpgroups=(1,), splits=(1,), warps=(4,), buffers=(2,), blocks=(1,), kw=(1,),
                              tiles=(8,), wide_blocks=(2,), prefetch=(0,), wgmma_ahead=(2,), wgmma_x_chunks=(1,))
    monkeypatch.setattr(B.WG, "wgmma_available", lambda device: True)
    assert [(c["rows"], c["split_k"]) for c in B.grid(64, args)] == [(16, 1), (16, 2), (64, 1), (64, 2)]
    assert {c["rows"] for c in B.grid(16, args)} == {16} and {c["rows"] for c in B.grid(256, args)} == {16, 64, 128}
    args.wgmma_only = False
    assert any("tiles" in c for c in B.grid(64, args)) and any("rows" in c for c in B.grid(64, args))
    assert all(key in B.CONFIG_KEYS for key in ("rows", "pipeline", "warpgroups"))
    args.wgmma_warpgroups = (1, 2)
    assert {c.get("warpgroups") for c in B.grid(64, args) if "rows" in c} == {1, 2}
    args.wgmma_ahead, args.wgmma_x_chunks, args.wgmma_pairs = (2, 4, 8), (1, 2), B._pairs("16:1,64:2")
    g = [c for c in B.grid(64, args) if "rows" in c]
    assert {(c["rows"], c["warpgroups"]) for c in g} == {(16, 1), (64, 2)}
    assert {(c["ahead"], c["x_chunks"]) for c in g} == {(2, 1), (4, 1), (4, 2), (8, 1), (8, 2)}  # 2 with 2: no
    assert all(key in B.CONFIG_KEYS for key in ("ahead", "x_chunks", "x_tma"))
    args.wgmma_x_tma = True  # each x_chunks 1 configuration once more with x by TMA
    g2 = [c for c in B.grid(64, args) if "rows" in c]
    assert [c for c in g2 if not c.get("x_tma")] == g
    assert [dict(c, x_tma=True) for c in g if c["x_chunks"] == 1] == [c for c in g2 if c.get("x_tma")]
    args.wgmma_x_tma = False
    rows = [{"M": 64, "K": 4096, "N": 4096, "gemv": {"us": 10.0}, "fallback": ["gemm", {"block_m": 64}],
             "best_mma": {"rows": 64, "split_k": 2, "pipeline": True, "warpgroups": 2, "ahead": 8, "x_chunks": 2,
                          "us": 6.0, "rel_err": 1e-3}}]
    (entry,) = B.table_entries(rows)
    assert entry["config"] == {"split_k": 2, "rows": 64, "pipeline": True, "warpgroups": 2, "ahead": 8,
                               "x_chunks": 2}
    assert entry["path"] == "mma"
    assert W._mma_launch(entry["config"]) is WG.w4a16_wgmma_triton


def test_shipped_wgmma_entries_are_launchable():
    """Every shipped table entry that routes to the wgmma kernel ("rows") passes its launcher's checks at the
    entry's shape (rows, warpgroups, ahead, x_chunks, split_k): a typo in the table fails here, not on the GPU."""
    from lmc.kernels.w4a16_tuning import read_tables

    n_checked = 0
    for device in read_tables()["devices"].values():
        for e in device["entries"]:
            if e["path"] != "mma" or "rows" not in e["config"]:
                continue
            k, n, silu = e["k"], e["n"], e["n"] in (28672, 14336)  # the gate/up shapes run the SiLU epilogue
            x = torch.empty(e["m"], k, dtype=torch.float16, device="meta")
            qfrag = torch.empty(n // 16, k // MM.CHUNK, MM.LANE_WORDS, dtype=torch.int32, device="meta")
            sz = torch.empty(n // 16, k // 128, 8, 2, dtype=torch.int32, device="meta")
            cfg = e["config"]
            WG.check_args(x, qfrag, sz, 128, cfg["rows"], cfg["split_k"], silu, cfg.get("warpgroups", 1),
                          cfg.get("ahead", 2), cfg.get("x_chunks", 1), cfg.get("x_tma", False))
            n_checked += 1
    assert n_checked >= 10  # the H200's wgmma entries (table v4)


def test_h200_prefill_classes_past_256_rows():
    """The H200 table past 256 rows (session 31's prefill A/B): gate/up at 257-512 rows on the wgmma kernel with x
    by TMA, from 513 rows the dequant pass (the same kernel lost in the 2048-token prefill); qkv / wo / w2 the
    dequant pass at every M past 256."""
    from lmc.kernels import w4a16_tuning as T

    def pick(m, n, k):
        return T.select(T.read_tables()["devices"]["NVIDIA H200"]["entries"], m, n, k, mma=True)

    for m in (257, 400, 512):
        path, config = pick(m, 28672, 4096)
        assert path == "mma" and config["x_tma"] and config["rows"] == 128
    for m in (513, 2048, 8192):
        assert pick(m, 28672, 4096)[0] == "dequant"
    for m in (257, 512, 1024, 8192):
        assert [pick(m, n, k)[0] for n, k in ((6144, 4096), (4096, 4096), (4096, 14336))] == ["dequant"] * 3


def test_the_tuning_table_path_is_read_at_call_time(tmp_path, monkeypatch):
    """w4a16_tuning.TABLE_PATH pointed at another table (bench/bench_prefill.py's A/B) is the one read once the
    caches are cleared, not the path the module started with."""
    from lmc.kernels import w4a16_tuning as T

    tables = T.read_tables()
    entries = tables["devices"]["NVIDIA H200"]["entries"]
    other = {**tables, "devices": {**tables["devices"], "NVIDIA H200": {
        "source": "test", "entries": [{**e, "path": "dequant", "config": {}} if e["m"] == 512 else e for e in entries]}}}
    path = tmp_path / "table.json"
    T.write_tables(other, path)
    try:
        T._tables.cache_clear()
        T._config.cache_clear()
        assert T.config_for("NVIDIA H200", 512, 28672, 4096, True)[0] == "mma"
        monkeypatch.setattr(T, "TABLE_PATH", path)
        T._tables.cache_clear()
        T._config.cache_clear()
        assert T.config_for("NVIDIA H200", 512, 28672, 4096, True) == ("dequant", {})
    finally:
        monkeypatch.undo()
        T._tables.cache_clear()
        T._config.cache_clear()


def test_kk_columns_gather_is_the_kk_order_copy():
    """x[:, kk_columns(K)] is kk_order(x): the RMSNorm before gate/up can write x in the TMA path's order."""
    x = torch.randn(3, 384)
    cols = WG.kk_columns(384)
    assert cols.dtype == torch.int32 and torch.equal(torch.sort(cols).values, torch.arange(384, dtype=torch.int32))
    assert torch.equal(x[:, cols.long()], WG.kk_order(x))


def test_x_kk_only_with_the_tma_path():
    x, qfrag, sz, _ = _case(5, 96, 640, 128, False, seed=3)
    with pytest.raises(LmcError, match="x_kk"):
        WG.check_args(x, qfrag, sz, 128, 64, 1, False, x_tma=False, x_kk=True)
    q, s, z = _quantized(96, 640, 128, seed=3)
    with pytest.raises(LmcError, match="kk order"):  # on the CPU no product reads x in kk order
        W.w4a16_silu_matmul(x, q, s, z, 128, (qfrag, sz), x_kk=True)


def _gate_up_layer(m, k, n, group, act_order, device):
    from lmc.runtime import model as M

    q, s, z = _quantized(n, k, group, seed=m, device=device)
    w13 = M.Int4Weight(q, s, z, group, MM.mma_layout(q, s, z, group, True), True)
    lw = {"w13": w13}
    if act_order:
        lw["w13_in"] = torch.randperm(k, generator=torch.Generator().manual_seed(m)).int().to(device)
    return lw


X_TMA_CONFIG = {"rows": 128, "split_k": 1, "pipeline": True, "warpgroups": 2, "ahead": 2, "x_chunks": 1, "x_tma": True}


@pytest.mark.parametrize("act_order", [False, True])
def test_ffn_norm_columns_follow_the_table(act_order, monkeypatch):
    """The norm before the MLP writes x in the gate/up kernel's kk order (after an act-order w13_in) exactly where
    the table sends that product to the TMA path; elsewhere w13_in; LMC_KK_NORM=0 never."""
    from lmc.runtime import model as M

    lw = _gate_up_layer(9, 384, 192, 128, act_order, "cpu")
    monkeypatch.setattr(M, "wgmma_available", lambda device: True)
    M.add_kk_columns(lw)
    kk = lw["w13_in_kk"]
    h = torch.randn(4, 384)
    base = h if not act_order else h[:, lw["w13_in"].long()]
    assert torch.equal(h[:, kk.long()], WG.kk_order(base))  # the composed gather is kk_order after w13_in
    monkeypatch.setattr(M, "x_in_kk_order", lambda m, n, k, device, mma: m > 100 and (n, k) == (192, 384))
    assert M.ffn_norm_columns(lw, 101) == (kk, True)
    assert M.ffn_norm_columns(lw, 100) == (lw.get("w13_in"), False)
    monkeypatch.setenv("LMC_KK_NORM", "0")
    off = _gate_up_layer(9, 384, 192, 128, act_order, "cpu")
    M.add_kk_columns(off)
    assert "w13_in_kk" not in off and M.ffn_norm_columns(off, 101) == (off.get("w13_in"), False)


@pytest.mark.gpu
@pytest.mark.parametrize("m,act_order", [(200, False), (77, True)])
def test_ffn_norm_in_kk_order_feeds_the_gate_up_kernel(m, act_order, monkeypatch):
    """On the GPU: the RMSNorm writing x in kk order (add_kk_columns / ffn_norm_columns) then the gate/up kernel
    told so gives what the plain norm and the kernel's own kk_order copy give; the residual stream is unchanged."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    from lmc.kernels.rmsnorm import rms_norm
    from lmc.runtime import model as M

    k, n = 512, 768
    lw = _gate_up_layer(m, k, n, 128, act_order, "cuda")
    monkeypatch.setattr(W, "w4a16_config", lambda m_, n_, k_, device=None, mma=False: ("mma", dict(X_TMA_CONFIG)))
    M.add_kk_columns(lw)
    columns, x_kk = M.ffn_norm_columns(lw, m)
    assert x_kk and columns is lw["w13_in_kk"]
    g = torch.Generator(device="cuda").manual_seed(m)
    a, res = (torch.randn(m, k, device="cuda", generator=g).half() for _ in range(2))
    weight = (1 + 0.2 * torch.randn(k, device="cuda", generator=g)).half()
    h_kk, r_kk = rms_norm(a, weight, 1e-5, res, columns)
    h, r = rms_norm(a, weight, 1e-5, res, lw.get("w13_in"))
    assert torch.equal(r_kk, r)
    # the gathered row sums its squares in another order: the statistics may round apart by an ulp
    torch.testing.assert_close(h_kk, WG.kk_order(h), rtol=2e-3, atol=2e-3)
    kk = WG.kk_columns(k, "cuda").long()
    y = torch.empty_like(h_kk)  # [M, K]: h_kk in w13_in's order (what the kernel's own copy would start from)
    y[:, kk] = h_kk
    assert torch.equal(WG.kk_order(y), h_kk)
    assert torch.equal(M.mlp_hidden(lw, h_kk, True), M.mlp_hidden(lw, y, False))  # no copy, the same kernel input


@pytest.mark.gpu
def test_model_prefill_with_the_norm_writing_kk_order(checkpoint, tmp_path, monkeypatch):
    """A whole int4 model (tp 1, float16) whose gate/up product the table sends to the x_tma path past 64 rows:
    each layer's gate/up kernel gets x from the norm in kk order (x_kk) and copies nothing; without w13_in_kk
    (what LMC_KK_NORM=0 loads) it gets the plain norm and copies; the hidden states agree within float16 rounding
    (the norm's statistics may round apart by an ulp), and at 64 rows the table's own choice runs unchanged."""
    if not torch.cuda.is_available() or not WG.wgmma_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU (sm_90) and a Triton with Gluon")
    from lmc.compiler.quantize import QuantizeOptions, quantize
    from lmc.format.workspace import Workspace
    from lmc.runtime import model as M

    ws = tmp_path / "int4"
    ckpt = checkpoint("llama3", hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)
    quantize(ckpt, ws, QuantizeOptions(calib_samples=0, w_group_size=128, workspace=True, dtype="float16",
                                       device="cpu"), say=lambda *_: None)
    table_config = W.w4a16_config

    def config(m, n, k, device=None, mma=False):  # the gate/up product (2 x 384 columns) past 64 rows: x_tma
        return ("mma", dict(X_TMA_CONFIG)) if (n, k) == (768, 256) and m > 64 and mma else \
            table_config(m, n, k, device, mma)
    monkeypatch.setattr(W, "w4a16_config", config)
    calls = []
    launch = W.w4a16_wgmma_triton

    def spy(*args, **kw):  # the gate/up calls' x_kk (the table sends the other linears here too)
        if kw.get("silu_mul"):
            calls.append(kw.get("x_kk", False))
        return launch(*args, **kw)
    monkeypatch.setattr(W, "w4a16_wgmma_triton", spy)
    model = M.Model(Workspace(ws), torch.device("cuda"), torch.float16)
    if not all(isinstance(lw["w13"], M.Int4Weight) and lw["w13"].mma is not None for lw in model.layers):
        pytest.skip("this GPU's table gives the int4 linears no mma layout")
    assert all("w13_in_kk" in lw for lw in model.layers)

    def hidden(tokens):
        ids = torch.randint(0, model.cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1)).cuda()
        with torch.inference_mode():
            return model.hidden(ids, torch.arange(tokens, device="cuda"), M.DenseCausal(1, tokens), tokens - 1)

    kk = hidden(100)
    assert calls == [True] * len(model.layers)
    for lw in model.layers:
        del lw["w13_in_kk"]
    calls.clear()
    plain = hidden(100)
    assert calls == [False] * len(model.layers)
    torch.testing.assert_close(kk, plain, rtol=2e-2, atol=2e-2)
    calls.clear()
    hidden(64)
    assert True not in calls
