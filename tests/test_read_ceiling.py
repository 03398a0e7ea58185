"""bench/read_ceiling.py: its reader sums exactly the buffer it is given (odd sizes, shares not a multiple of the
block), and the byte count is the mma layout's."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def rc():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("read_ceiling_under_test", BENCH / "read_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def test_layout_bytes_match_the_mma_layout(rc):
    from lmc.kernels import w4a16_mma as MM

    k, n = 256, 48
    q = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    s = torch.rand(k // 128, n).half()
    z = torch.randint(0, 16, (k // 128, n)).half()
    qfrag, sz = MM.mma_layout(q, s, z, 128)
    assert rc.layout_bytes(k, n) == qfrag.numel() * 4 + sz.numel() * 4
