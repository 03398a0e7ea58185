"""bench/read_ceiling.py: its reader sums exactly the buffer it is given (odd sizes, shares not a multiple of the
block), and the byte count is the mma layout's."""
import sys

import pytest
import torch
from conftest import BENCH, load_bench


@pytest.fixture(scope="module")
def rc():
    return load_bench("read_ceiling.py")


@pytest.mark.parametrize("n,programs,warps", [(1000, 3, 1), (4099, 7, 2), (517, 1, 1)])
def test_reader_sums_each_share(rc, n, programs, warps):
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32)
    out = torch.zeros(programs, dtype=torch.int32)
    rc.read_launch(src, out, programs, warps, pdl=False)
    block = 128 * warps
    share = -(-(-(-n // programs)) // block) * block
    launched = -(-n // share)
    parts = torch.nn.functional.pad(src.long(), (0, launched * share - n)).view(launched, share)
    want = (parts.sum(1) + 2**31) % 2**32 - 2**31
    assert torch.equal(out[:launched].long(), want)
    assert torch.equal(rc.share_sums(src, programs, warps), want)  # the bench's own check, without the copy


def test_layout_bytes_match_the_mma_layout(rc):
    from lmc.kernels import w4a16_mma as MM

    k, n = 256, 48
    q = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    s = torch.rand(k // 128, n).half()
    z = torch.randint(0, 16, (k // 128, n)).half()
    qfrag, sz = MM.mma_layout(q, s, z, 128)
    assert rc.layout_bytes(k, n) == qfrag.numel() * 4 + sz.numel() * 4


def test_ncu_summary_of_the_committed_h200_report():
    """bench/ncu_w4a16.py --summarize: one row per profiled kernel of the committed ncu report, each named by the
    call that launched it, with the numbers bench/NOTES.md (session 22) quotes."""
    mod = load_bench("ncu_w4a16.py")
    rows = mod.summarize((BENCH / "results" / "ncu_w4a16_m1_m16_h200.txt").read_text())
    assert [r["call"] for r in rows] == [f"M={m} K={k} N={n}{' silu' if n == 28672 else ''}"
                                         for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
                                         for m in (1, 16)]
    w13 = rows[4]
    assert (w13["kernel"], w13["grid"], w13["block"]) == ("_w4a16_mma_kernel", "224,1,1", "256,1,1")
    assert (w13["us"], w13["dram_pct"], w13["occupancy_pct"], w13["registers"]) == (23.33, 57.66, 21.23, 104.0)
    assert w13["stall"]["cycles"] == 4.9 and "L1TEX" in w13["stall"]["on"] and w13["cycles_per_issue"] == 9.9
    assert all(r["dram_pct"] is not None and r["stall"] for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
@pytest.mark.parametrize("script", ["read_ceiling.py", "ncu_w4a16.py"])
def test_needs_cuda_without_smoke(script, capsys, monkeypatch):
    """Without CUDA and without --smoke: one line saying so, exit 2 (not torch's traceback)."""
    mod = load_bench(script)
    monkeypatch.setattr(sys, "argv", [script])
    assert mod.main() == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"bench/{script} needs CUDA (or --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1)"]
