"""The tensor-core W4A16 paths (kernels/w4a16_mma.py for 1-16 rows, kernels/w4a16_mma_wide.py past 16): the mma
fragment layout against the stored format, a lane-by-lane simulation of both kernels' PTX (the m16n8k16 fragment
rules of the PTX ISA) against the reference, the kernels' interpreter paths on odd shapes, the table routing, and
on a GPU the mma.sync paths themselves."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from lmc.errors import LmcError
from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_mma as MM
from lmc.kernels import w4a16_mma_wide as MW
from lmc.kernels import w4a16_wgmma as WG


def _quantized(n: int, k: int, group: int, seed: int, device="cpu"):
    """lmc-int4-k8 tensors with random codes, scales and zeros (float16), and the float32 reference weight."""
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(0, 16, size=(k, n)).astype(np.int64))  # [K, N]
    packed = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        packed |= codes[j::8] << (4 * j)
    q = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
    scales = torch.from_numpy(rng.uniform(0.002, 0.02, size=(k // group, n))).half()
    zeros = torch.from_numpy(rng.integers(0, 16, size=(k // group, n)).astype(np.float32)).half()
    return q.to(device), scales.to(device), zeros.to(device)


def _reference(x, q, s, z, group, silu):
    ref = W.w4a16_matmul_ref(x.float(), q, s.float(), z.float(), group)  # [M, N]
    if silu:
        n = ref.shape[1] // 2
        gate, up = ref[:, :n].half().float(), ref[:, n:].half().float()
        return gate * torch.sigmoid(gate) * up
    return ref


def _f16_pair(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> float16 [..., 2] (low half first)."""
    return words.contiguous().reshape(-1).view(torch.int16).view(torch.float16).reshape(*words.shape, 2)


def _lop3(words: torch.Tensor, mask: int) -> torch.Tensor:
    return _f16_pair((words & mask) | 0x64006400)


def simulate_ptx(x: torch.Tensor, qfrag: torch.Tensor, sz: torch.Tensor, group: int, silu: bool,
                 wide_tiles: int | None = None) -> torch.Tensor:
    """What the kernels' PTX computes, lane by lane: the A fragment from each lane's words (LOP3, float16
    subtract / FMA), the B fragment from the x pairs the kernel loads, D = A B in float32 per the PTX ISA's
    m16n8k16 rules (A: a0,a1 row g cols 2t,2t+1; a2,a3 row g+8; a4..a7 cols + 8; B: b0,b1 rows 2t,2t+1 col g,
    b2,b3 rows + 8; C: c0,c1 row g cols 2t,2t+1; c2,c3 row g+8); returns out like the kernel (silu: silu(gate) *
    up). `_mma_group` (wide_tiles None): one row block of 1 or 2 tiles, the group scale on each group's float32
    sum. The wide kernel (wide_tiles = T): row blocks of 8T rows, the scale multiplied into A in float16
    (HMUL2) and every product summed straight into the accumulators."""
    nb, chunks, _ = qfrag.shape
    m = x.shape[0]
    words = qfrag.reshape(nb, chunks, 8, 4, 4)  # [b, c, g, t, j]
    x32 = x.half().contiguous().view(torch.int32)  # [M, K/2] pairs
    zz, ss = _f16_pair(sz[..., 0]), _f16_pair(sz[..., 1])  # [b, groups, g, 2]
    tiles = wide_tiles or (1 if m <= 8 else 2)  # B fragments per A fragment: x rows row0 + 8u + g in tile u
    sixteenth = torch.tensor(1 / 16, dtype=torch.float16)
    per_group = group // MM.CHUNK
    y = torch.zeros(m, nb * 16)
    cols = MM.block_columns(nb * 16, silu)  # [b, 16]
    for row0 in range(0, m, 8 * tiles):
        out = torch.zeros(nb, 16, 8 * tiles)  # [b, A row, C column of tile u at 8u + column]
        for grp in range(chunks // per_group):
            d = torch.zeros(nb, 16, 8 * tiles)
            zl, zh = zz[:, grp, :, 0], zz[:, grp, :, 1]  # [b, g]
            sl, sh = ss[:, grp, :, 0], ss[:, grp, :, 1]
            for c in range(grp * per_group, (grp + 1) * per_group):
                for j in range(4):
                    a = torch.zeros(nb, 16, 16, dtype=torch.float16)
                    bm = torch.zeros(16, 8 * tiles, dtype=torch.float16)
                    for g in range(8):
                        for t in range(4):
                            w = words[:, c, g, t, j]  # [b]
                            regs = []
                            for src in (w, w >> 8):
                                lo = _lop3(src, 0x000F000F) - zl[:, g, None]  # [b, 2]
                                hi = (_lop3(src, 0x00F000F0).float() * sixteenth.float()
                                      + zh[:, g, None].float()).half()  # exact: small integers
                                if wide_tiles:  # HMUL2: one float16 rounding
                                    lo, hi = lo * sl[:, g, None], hi * sh[:, g, None]
                                regs += [lo, hi]
                            a[:, g, 2 * t:2 * t + 2] = regs[0]
                            a[:, g + 8, 2 * t:2 * t + 2] = regs[1]
                            a[:, g, 2 * t + 8:2 * t + 10] = regs[2]
                            a[:, g + 8, 2 * t + 8:2 * t + 10] = regs[3]
                            for u in range(tiles):
                                row = min(row0 + 8 * u + g, m - 1)
                                pairs = x32[row, 32 * c + 8 * t:32 * c + 8 * t + 8]  # xa ++ xb
                                bm[2 * t:2 * t + 2, 8 * u + g] = _f16_pair(pairs[2 * j])
                                bm[2 * t + 8:2 * t + 10, 8 * u + g] = _f16_pair(pairs[2 * j + 1])
                    d += a.float() @ bm.float()  # one mma per tile: the same A, its own B
            if wide_tiles:
                out += d
            else:
                scale = torch.cat((sl, sh), dim=1).float()  # [b, 16]: rows g, then g + 8
                out += d * scale[:, :, None]
        for mm in range(row0, min(m, row0 + 8 * tiles)):
            y[mm, cols.reshape(-1)] = out[:, :, mm - row0].reshape(-1)
    if silu:
        n = nb * 8
        gate, up = y[:, :n].half().float(), y[:, n:].half().float()
        return gate * torch.sigmoid(gate) * up
    return y


def _check_launch(launch, m, n, k, group, silu, seed, **kw):
    """One launcher on random codes, odd shapes: the output's shape and dtype, and its values against the
    float32 reference."""
    q, s, z = _quantized(n, k, group, seed=seed)
    x = torch.randn(m, k).half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    got = launch(x, qfrag, sz, group, silu_mul=silu, **kw)
    assert got.shape == (m, n // 2 if silu else n) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), _reference(x, q, s, z, group, silu), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m,n,k,group,silu", [(1, 48, 256, 128, False), (3, 32, 192, 64, True),
                                              (8, 64, 384, 128, True), (5, 80, 128, 64, False)])
def test_layout_decodes_to_the_stored_weight(m, n, k, group, silu):
    q, s, z = _quantized(n, k, group, seed=n + k)
    x = torch.randn(m, k)
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    assert qfrag.shape == (n // 16, k // 64, 128) and qfrag.dtype == torch.int32
    assert sz.shape == (n // 16, k // group, 8, 2)
    torch.testing.assert_close(MM.mma_reference(x, qfrag, sz, group, silu), _reference(x, q, s, z, group, silu),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("m,n,k,group,silu", [(1, 32, 128, 128, False), (3, 32, 128, 64, True),
                                              (8, 16, 192, 64, False), (13, 32, 128, 64, True)])
def test_ptx_fragments_simulated(m, n, k, group, silu):
    q, s, z = _quantized(n, k, group, seed=7 * n + k)
    x = torch.randn(m, k).half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    got = simulate_ptx(x, qfrag, sz, group, silu)
    torch.testing.assert_close(got, _reference(x, q, s, z, group, silu), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m,n,k,group,silu,tiles", [(19, 32, 128, 128, False, 2), (37, 32, 128, 64, True, 4),
                                                    (9, 16, 192, 64, False, 8)])
def test_wide_ptx_fragments_simulated(m, n, k, group, silu, tiles):
    """The wide kernel's PTX (the scale in the A fragment, float16) over row blocks, against the reference: its
    generated text has the instructions the simulation models."""
    q, s, z = _quantized(n, k, group, seed=3 * n + k + m)
    x = torch.randn(m, k).half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    got = simulate_ptx(x, qfrag, sz, group, silu, wide_tiles=tiles)
    torch.testing.assert_close(got, _reference(x, q, s, z, group, silu), rtol=3e-3, atol=3e-3)
    dequant = MW._dequant_ptx()
    assert dequant.count("lop3.b32") == 16 and dequant.count("mul.rn.f16x2") == 16  # 4 words x (lo, hi) x 2
    assert "{$12, $13}" in MW._mma1_ptx(0) and "{$14, $15}" in MW._mma1_ptx(1)  # word 2h + p: x pairs 2p, 2p + 1


@pytest.mark.parametrize("m,n,k,group,silu,warps,split_k,blocks,tiles", [
    (17, 48, 256, 128, False, 1, 1, 2, 2), (23, 96, 384, 128, True, 2, 3, 1, 4), (64, 32, 192, 64, False, 1, 2, 2, 8),
    (70, 128, 320, 64, True, 2, 1, 4, 4), (33, 96, 640, 128, False, 4, 5, 2, 1), (5, 64, 256, 128, True, 1, 2, 2, 8)])
def test_wide_kernel_interpreter(m, n, k, group, silu, warps, split_k, blocks, tiles):
    """The wide kernel's index path: row blocks (M not a multiple of 8 x tiles), blocks past N masked, split-K
    with the last split summing, both epilogues."""
    _check_launch(MW.w4a16_mma_wide_triton, m, n, k, group, silu, n * k + m, warps=warps, split_k=split_k,
                  blocks=blocks, tiles=tiles)


def test_wide_kernel_errors():
    q, s, z = _quantized(32, 128, 64, seed=1)
    qfrag, sz = MM.mma_layout(q, s, z, 64)
    with pytest.raises(LmcError, match="tiles in"):
        MW.w4a16_mma_wide_triton(torch.randn(20, 128).half(), qfrag, sz, 64, tiles=3)
    with pytest.raises(LmcError, match=r"needs x \[M, 128\]"):
        MW.w4a16_mma_wide_triton(torch.randn(20, 64).half(), qfrag, sz, 64)
    with pytest.raises(LmcError, match="does not fit"):
        MW.w4a16_mma_wide_triton(torch.randn(20, 128).half(), qfrag, sz, 128)
    with pytest.raises(LmcError, match="float16 x on CUDA"):
        MW.w4a16_mma_wide_triton(torch.randn(20, 128).half(), qfrag, sz, 64, asm=True)


@pytest.mark.parametrize("m,n,k,group,silu,warps,split_k,buffers,blocks", [
    (1, 48, 256, 128, False, 1, 1, 2, 1), (1, 80, 384, 128, False, 4, 3, 4, 1), (3, 32, 192, 64, True, 2, 2, 2, 1),
    (8, 96, 384, 128, True, 4, 1, 4, 1), (5, 112, 320, 64, False, 2, 4, 2, 1), (2, 64, 640, 128, True, 1, 5, 4, 1),
    (1, 64, 640, 128, True, 2, 2, 2, 1), (9, 48, 256, 128, False, 2, 2, 2, 1), (16, 64, 384, 64, True, 1, 3, 4, 1),
    (13, 80, 640, 128, False, 4, 1, 2, 1), (1, 80, 384, 128, False, 2, 3, 2, 2), (12, 96, 640, 128, True, 1, 2, 4, 2),
    (5, 32, 256, 128, True, 4, 1, 2, 2), (16, 112, 384, 64, False, 2, 2, 2, 2)])
def test_kernel_interpreter(m, n, k, group, silu, warps, split_k, buffers, blocks):
    """The kernel's index path (blocks past N masked, split-K with the last split summing, both epilogues)."""
    _check_launch(MM.w4a16_mma_triton, m, n, k, group, silu, n * k, warps=warps, split_k=split_k, buffers=buffers,
                  blocks=blocks)


@pytest.mark.parametrize("m,n,k,group,silu,warps,split_k,buffers,blocks,kw", [
    (1, 48, 640, 128, False, 2, 1, 2, 1, 2), (3, 64, 384, 64, True, 4, 1, 4, 1, 4), (9, 80, 896, 128, False, 4, 2, 2, 2, 2),
    (16, 96, 640, 128, True, 4, 3, 2, 2, 4), (1, 32, 128, 128, True, 2, 1, 2, 1, 2)])
def test_kernel_interpreter_warps_split_k(m, n, k, group, silu, warps, split_k, buffers, blocks, kw):
    """kw warps of a program split each block's groups (group counts not a multiple of kw, a warp with no group)
    and sum in shared memory, with and without the global split-K on top."""
    q, s, z = _quantized(n, k, group, seed=n * k + kw)
    x = torch.randn(m, k).half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    got = MM.w4a16_mma_triton(x, qfrag, sz, group, warps=warps, split_k=split_k, buffers=buffers, blocks=blocks,
                              kw=kw, silu_mul=silu)
    torch.testing.assert_close(got.float(), _reference(x, q, s, z, group, silu), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m,n,k,group,silu,warps,split_k,buffers,blocks,kw", [
    (16, 48, 640, 128, False, 2, 1, 2, 1, 1), (13, 96, 640, 128, True, 4, 3, 2, 2, 1), (9, 80, 896, 128, False, 8, 2, 4, 2, 2),
    (16, 64, 384, 64, True, 4, 1, 2, 1, 2), (5, 32, 128, 128, False, 2, 2, 2, 1, 1)])
def test_kernel_interpreter_row_warps(m, n, k, group, silu, warps, split_k, buffers, blocks, kw):
    """rw = 2: two warps of a block set take rows 0-7 and 8-15 of x (rows past M clamped, their stores masked: the
    last case has no row for the second warp), with kw warps splitting K and the global split-K on top; block
    counts that leave a program's last warps without a block."""
    q, s, z = _quantized(n, k, group, seed=n * k + 7)
    x = torch.randn(m, k).half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    got = MM.w4a16_mma_triton(x, qfrag, sz, group, warps=warps, split_k=split_k, buffers=buffers, blocks=blocks,
                              kw=kw, rw=2, silu_mul=silu)
    torch.testing.assert_close(got.float(), _reference(x, q, s, z, group, silu), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m,n,k,group,silu,warps,split_k,blocks,kw,stages", [
    (1, 48, 640, 128, False, 1, 1, 1, 1, 3), (3, 64, 384, 64, True, 2, 2, 1, 1, 4), (9, 80, 896, 128, False, 4, 2, 2, 2, 2),
    (16, 96, 640, 128, True, 4, 3, 2, 4, 6), (1, 32, 128, 128, True, 2, 1, 1, 2, 4), (13, 112, 1152, 128, False, 1, 5, 2, 1, 4),
    (1, 48, 640, 128, False, 1, 2, 1, 1, 8)])  # the last: stages past the groups (the whole share staged)
def test_kernel_interpreter_pipelined(m, n, k, group, silu, warps, split_k, blocks, kw, stages):
    """The pipelined main loop (stages > 0: one group an iteration, Triton's pipeliner streams words, sz and x
    through shared memory): group runs not a multiple of stages or kw, a warp with no group, splits of one group."""
    q, s, z = _quantized(n, k, group, seed=n * k + stages)
    x = torch.randn(m, k).half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    got = MM.w4a16_mma_triton(x, qfrag, sz, group, warps=warps, split_k=split_k, blocks=blocks, kw=kw, stages=stages,
                              silu_mul=silu)
    torch.testing.assert_close(got.float(), _reference(x, q, s, z, group, silu), rtol=2e-3, atol=2e-3)


def test_eligibility_and_errors():
    assert MM.mma_eligible(4096, 6144, 128) and MM.mma_eligible(14336, 4096, 128)
    assert not MM.mma_eligible(4096, 6144, 32) and not MM.mma_eligible(4000, 4096, 128)
    assert not MM.mma_eligible(4096, 40, 128) and not MM.mma_eligible(4096, 48, 128, silu=True)
    q, s, z = _quantized(48, 256, 128, seed=1)
    with pytest.raises(LmcError, match="mma layout"):
        MM.mma_layout(q, s, z, 128, silu=True)
    qfrag, sz = MM.mma_layout(q, s, z, 128)
    with pytest.raises(LmcError, match="M <= 16"):
        MM.w4a16_mma_triton(torch.zeros(17, 256).half(), qfrag, sz, 128)
    with pytest.raises(LmcError, match="kw"):
        MM.w4a16_mma_triton(torch.zeros(1, 256).half(), qfrag, sz, 128, warps=2, kw=4)
    with pytest.raises(LmcError, match="rw"):
        MM.w4a16_mma_triton(torch.zeros(1, 256).half(), qfrag, sz, 128, warps=2, kw=2, rw=2)
    with pytest.raises(LmcError, match="needs float16 x on CUDA"):
        MM.w4a16_mma_triton(torch.zeros(1, 256).half(), qfrag, sz, 128, asm=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group,silu,warps,split_k,buffers,blocks", [
    (1, 4096, 4096, 128, False, 4, 4, 2, 1), (1, 28672, 4096, 128, True, 4, 1, 4, 1),
    (1, 4096, 14336, 128, False, 4, 8, 4, 1), (3, 96, 384, 64, True, 2, 2, 2, 1), (8, 6144, 4096, 128, False, 4, 2, 4, 1),
    (5, 112, 320, 64, False, 1, 3, 2, 1), (16, 28672, 4096, 128, True, 4, 4, 2, 1),
    (11, 4096, 14336, 128, False, 8, 16, 2, 1), (9, 96, 384, 64, True, 1, 3, 4, 1),
    (1, 28672, 4096, 128, True, 4, 2, 2, 2), (16, 4096, 14336, 128, False, 4, 8, 4, 2), (7, 80, 384, 128, False, 2, 3, 2, 2),
    (13, 96, 640, 128, True, 1, 2, 4, 2)])
def test_mma_path_on_cuda(m, n, k, group, silu, warps, split_k, buffers, blocks):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a GPU with mma.sync m16n8k16 (sm_80+)")
    q, s, z = _quantized(n, k, group, seed=n + k, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    got = MM.w4a16_mma_triton(x, qfrag, sz, group, warps=warps, split_k=split_k, buffers=buffers, blocks=blocks,
                              silu_mul=silu)
    want = _reference(x, q, s, z, group, silu)
    err = (got.float() - want).abs().max().item() / want.abs().max().item()
    assert err < 2e-3, err
    again = MM.w4a16_mma_triton(x, qfrag, sz, group, warps=warps, split_k=split_k, buffers=buffers,
                                blocks=blocks, silu_mul=silu)
    assert torch.equal(got, again)  # deterministic: split partials summed in split order


def test_tuning_mma_entries_fall_back_without_the_layout(monkeypatch):
    from lmc.kernels import w4a16_tuning as T

    gemv = {"m": 1, "k": 4096, "n": 4096, "path": "gemv", "config": {"block_n": 64}}
    mma = {"m": 1, "k": 4096, "n": 28672, "path": "mma", "config": {"warps": 8, "split_k": 2, "buffers": 2},
           "fallback": {"path": "gemv", "config": {"block_n": 32}}}
    entries = [gemv, mma]
    assert T.select(entries, 1, 28672, 4096, mma=True) == ("mma", {"warps": 8, "split_k": 2, "buffers": 2})
    assert T.select(entries, 1, 28672, 4096) == ("gemv", {"block_n": 32})  # no mma layout: the fallback
    assert T.select(entries, 1, 4096, 4096, mma=True) == ("gemv", {"block_n": 64})  # mma lost on this shape
    tables = {"format": T.FORMAT, "default": "A", "devices": {"A": {"source": "", "entries": [gemv]},
                                                              "B": {"source": "", "entries": entries}}}
    monkeypatch.setattr(T, "_tables", lambda: tables)
    assert T.has_mma("B") and not T.has_mma("A") and not T.has_mma("unknown GPU") and not T.has_mma(None)


def test_rows_past_the_mma_kernel_take_the_fallback(monkeypatch):
    from lmc.kernels import w4a16_tuning as T

    entry = {"m": 16, "k": 4096, "n": 4096, "path": "mma", "config": {"warps": 4},
             "fallback": {"path": "gemm", "config": {"block_m": 16}}}
    tables = {"format": T.FORMAT, "default": "A", "devices": {"A": {"source": "", "entries": [entry]}}}
    monkeypatch.setattr(T, "_tables", lambda: tables)
    T._config.cache_clear()
    try:  # a table whose largest M class is mma: M = 17 would select it, but the kernel takes 16 rows
        assert W.w4a16_config(16, 4096, 4096, mma=True) == ("mma", {"warps": 4})
        assert W.w4a16_config(17, 4096, 4096, mma=True) == ("gemm", {"block_m": 16})
        wide = {"m": 64, "k": 4096, "n": 4096, "path": "mma", "config": {"warps": 4, "tiles": 8},
                "fallback": {"path": "dequant", "config": {"block_m": 64}}}
        tables["devices"]["A"]["entries"].append(wide)
        T._config.cache_clear()  # an entry with tiles: the wide kernel, at any M of its class
        assert W.w4a16_config(17, 4096, 4096, mma=True) == ("mma", {"warps": 4, "tiles": 8})
        assert W.w4a16_config(200, 4096, 4096, mma=True) == ("mma", {"warps": 4, "tiles": 8})
        assert W.w4a16_config(64, 4096, 4096) == ("dequant", {"block_m": 64})  # no layout: the fallback
        assert W._mma_launch({"tiles": 8}) is MW.w4a16_mma_wide_triton
        assert W._mma_launch({"warps": 4}) is MM.w4a16_mma_triton
    finally:
        T._config.cache_clear()


def test_shipped_h200_table_has_mma_entries_with_fallbacks():
    from lmc.kernels import w4a16_tuning as T

    entries = T.read_tables()["devices"]["NVIDIA H200"]["entries"]
    mma = [e for e in entries if e["path"] == "mma"]
    assert mma and all(e["fallback"]["path"] in ("gemv", "gemm", "dequant") for e in mma)
    assert all(e["m"] <= MM.MAX_ROWS or e["config"].get("tiles") in MW.TILES or e["config"].get("rows") in WG.ROWS
               for e in mma)  # past 16: the wide one or the wgmma one


def test_bench_table_entries_keep_the_fallback():
    """bench_w4a16_mma --write-table: an entry only where mma beat the table's choice, the mma configuration as
    its config (the 1-16 row kernel's defaults left out) and what a weight without the layout takes as its
    fallback (once written with the mma configuration in both places)."""
    from conftest import load_bench

    bench = load_bench("bench_w4a16_mma.py")
    gemm = ["gemm", {"block_m": 16, "split_k": 4}]
    rows = [{"M": 16, "K": 4096, "N": 4096, "gemv": {"us": 10.0}, "fallback": gemm,
             "best_mma": {"warps": 2, "split_k": 4, "blocks": 2, "tiles": 2, "us": 9.0}},
            {"M": 8, "K": 4096, "N": 4096, "gemv": {"us": 10.0}, "fallback": gemm,
             "best_mma": {"warps": 4, "split_k": 8, "buffers": 2, "blocks": 1, "kw": 1, "us": 7.0}},
            {"M": 64, "K": 4096, "N": 4096, "gemv": {"us": 10.0}, "fallback": gemm,
             "best_mma": {"warps": 4, "split_k": 1, "blocks": 2, "tiles": 8, "us": 12.0}}]  # lost: no entry
    entries = bench.table_entries(rows)
    assert [(e["m"], e["config"]) for e in entries] == [
        (16, {"warps": 2, "split_k": 4, "blocks": 2, "tiles": 2}), (8, {"warps": 4, "split_k": 8, "buffers": 2})]
    assert all(e["fallback"] == {"path": "gemm", "config": {"block_m": 16, "split_k": 4}} for e in entries)


def test_shipped_table_entries_fit_their_launchers():
    """Every entry's keywords are parameters of the launcher its path names (an mma entry's own and its
    fallback's), so that no table row can reach a kernel with another kernel's configuration."""
    import inspect

    from lmc.kernels import w4a16_tuning as T

    launchers = {"gemv": W.w4a16_gemv_triton, "gemm": W.w4a16_gemm_triton, "dequant": W.w4a16_dequant_matmul_triton}
    wgmma = {"m": 64, "k": 4096, "n": 4096, "path": "mma", "config": {"rows": 64, "split_k": 2, "pipeline": True},
             "fallback": {"path": "gemm", "config": {"block_m": 64}}}  # the shape of a "rows" entry, checked too
    assert W._mma_launch(wgmma["config"]) is WG.w4a16_wgmma_triton
    devices = dict(T.read_tables()["devices"])
    devices["(a wgmma entry)"] = {"entries": [wgmma]}
    for device, table in devices.items():
        for e in table["entries"]:
            pairs = [(e["path"], e["config"])] + ([(e["fallback"]["path"], e["fallback"]["config"])]
                                                  if e["path"] == "mma" else [])
            for path, config in pairs:
                launch = W._mma_launch(config) if path == "mma" else launchers[path]
                assert set(config) <= set(inspect.signature(launch).parameters), (device, e)


def test_loader_builds_the_layout_only_where_it_runs(monkeypatch):
    from lmc.runtime import model

    monkeypatch.setattr(model, "has_mma", lambda name: True)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(model, "device_name", lambda device: "NVIDIA H200")
    assert model.mma_wanted(cuda, torch.float16, 4096, 28672, 128, silu=True)
    assert not model.mma_wanted(torch.device("cpu"), torch.float16, 4096, 28672, 128, silu=True)
    assert not model.mma_wanted(cuda, torch.bfloat16, 4096, 4096, 128, silu=False)  # the PTX takes float16 x
    assert not model.mma_wanted(cuda, torch.float16, 4096, 4096, 32, silu=False)  # groups of 32
    monkeypatch.setenv("LMC_INT4_MMA", "0")
    assert not model.mma_wanted(cuda, torch.float16, 4096, 4096, 128, silu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 12, 16])
def test_dispatch_with_the_mma_layout_on_cuda(m):
    """w4a16_matmul / w4a16_silu_matmul with the layout: this GPU's table picks mma or its fallback."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    k, n, group = 4096, 28672, 128
    q, s, z = _quantized(n, k, group, seed=m, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    plain = MM.mma_layout(q, s, z, group)
    silu = MM.mma_layout(q, s, z, group, silu=True)
    for got, want in ((W.w4a16_matmul(x, q, s, z, group, mma=plain), _reference(x, q, s, z, group, False)),
                      (W.w4a16_silu_matmul(x, q, s, z, group, mma=silu), _reference(x, q, s, z, group, True))):
        err = (got.float() - want).abs().max().item() / want.abs().max().item()
        assert err < 2e-3, err


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,silu,warps,split_k,blocks,kw,rw", [
    (1, 4096, 4096, False, 8, 2, 1, 4, 1), (1, 6144, 4096, False, 8, 4, 1, 2, 1), (16, 28672, 4096, True, 8, 1, 2, 2, 1),
    (5, 96, 640, True, 4, 1, 1, 4, 1),
    # row warps: two warps a block set, rows 0-7 and 8-15
    (16, 4096, 14336, False, 8, 8, 2, 1, 2), (16, 28672, 4096, True, 4, 2, 2, 1, 2), (11, 6144, 4096, False, 8, 4, 2, 2, 2),
    (16, 96, 640, True, 2, 3, 1, 1, 2)])
def test_mma_warps_split_k_on_cuda(m, n, k, silu, warps, split_k, blocks, kw, rw):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a GPU with mma.sync m16n8k16 (sm_80+)")
    q, s, z = _quantized(n, k, 128, seed=n + kw + 2 * rw, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    qfrag, sz = MM.mma_layout(q, s, z, 128, silu)
    got = MM.w4a16_mma_triton(x, qfrag, sz, 128, warps=warps, split_k=split_k, blocks=blocks, kw=kw, rw=rw,
                              silu_mul=silu)
    want = _reference(x, q, s, z, 128, silu)
    assert (got.float() - want).abs().max().item() / want.abs().max().item() < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,silu,warps,split_k,blocks,kw,stages", [
    (1, 4096, 4096, False, 1, 8, 1, 1, 4), (1, 28672, 4096, True, 2, 1, 2, 1, 3), (1, 4096, 14336, False, 4, 8, 1, 2, 6),
    (16, 28672, 4096, True, 4, 2, 2, 1, 4), (11, 6144, 4096, False, 2, 4, 1, 1, 2), (5, 96, 640, True, 1, 3, 2, 1, 4),
    (16, 4096, 14336, False, 8, 4, 2, 2, 3)])
def test_mma_pipelined_on_cuda(m, n, k, silu, warps, split_k, blocks, kw, stages):
    """The pipelined loop's cp.async ring on the GPU against the float32 reference, and deterministic."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a GPU with mma.sync m16n8k16 and cp.async (sm_80+)")
    q, s, z = _quantized(n, k, 128, seed=n + stages, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    qfrag, sz = MM.mma_layout(q, s, z, 128, silu)
    cfg = dict(warps=warps, split_k=split_k, blocks=blocks, kw=kw, stages=stages, silu_mul=silu)
    got = MM.w4a16_mma_triton(x, qfrag, sz, 128, **cfg)
    want = _reference(x, q, s, z, 128, silu)
    assert (got.float() - want).abs().max().item() / want.abs().max().item() < 2e-3
    assert torch.equal(got, MM.w4a16_mma_triton(x, qfrag, sz, 128, **cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,stages", [(1, 4096, 4096, 5), (1, 6144, 4096, 9), (3, 4096, 14336, 12)])
def test_mma_staged_after_a_pdl_kernel_in_a_graph(m, n, k, stages):
    """The pipelined loop with its words staged before the PDL wait, right after a PDL kernel that writes its x
    (the RMSNorm), replayed in a CUDA graph as the decode step is: x is read only after the wait (the result
    matches the reference on x the norm wrote in that replay, not the x of the replay before)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs PDL (sm_90+)")
    from lmc.kernels.rmsnorm import rms_norm_triton

    q, s, z = _quantized(n, k, 128, seed=stages, device="cuda")
    qfrag, sz = MM.mma_layout(q, s, z, 128)
    h = torch.empty(m, k, device="cuda", dtype=torch.float16)
    w = torch.rand(k, device="cuda").half() + 0.5
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    cfg = dict(warps=1, split_k=8, stages=stages)

    def step():
        x, _ = rms_norm_triton(h, w, 1e-5)  # [M, K], a PDL kernel
        MM.w4a16_mma_triton(x, qfrag, sz, 128, out=out, **cfg)
        return x

    h.normal_()
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x = step()
    for seed in range(3):
        torch.manual_seed(seed)
        h.normal_()  # new input each replay: a read of x before the wait would see the last replay's
        graph.replay()
        torch.cuda.synchronize()
        want = _reference(x, q, s, z, 128, False)
        assert (out.float() - want).abs().max().item() / want.abs().max().item() < 2e-3, seed


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group,silu,warps,split_k,blocks,tiles", [
    (64, 4096, 4096, 128, False, 4, 4, 2, 8), (256, 28672, 4096, 128, True, 4, 1, 2, 8),
    (100, 4096, 14336, 128, False, 8, 2, 1, 4), (17, 96, 384, 64, True, 2, 3, 2, 2), (40, 112, 640, 128, False, 1, 2, 4, 4),
    (9, 6144, 4096, 128, False, 4, 1, 2, 1), (129, 96, 320, 64, True, 2, 1, 1, 8)])
def test_wide_path_on_cuda(m, n, k, group, silu, warps, split_k, blocks, tiles):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a GPU with mma.sync m16n8k16 (sm_80+)")
    q, s, z = _quantized(n, k, group, seed=n + k + m, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    qfrag, sz = MM.mma_layout(q, s, z, group, silu)
    kw = dict(warps=warps, split_k=split_k, blocks=blocks, tiles=tiles, silu_mul=silu)
    got = MW.w4a16_mma_wide_triton(x, qfrag, sz, group, **kw)
    want = _reference(x, q, s, z, group, silu)
    err = (got.float() - want).abs().max().item() / want.abs().max().item()
    assert err < 3e-3, err
    assert torch.equal(got, MW.w4a16_mma_wide_triton(x, qfrag, sz, group, **kw))  # deterministic split-K sum


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 24, 64, 100, 256])
def test_dispatch_past_16_rows_on_cuda(m):
    """w4a16_matmul / w4a16_silu_matmul with the layout past 16 rows: this GPU's table picks the wide kernel or
    its fallback."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    assert max(dispatch_errors(m)) < 3e-3


def dispatch_errors(m: int) -> tuple[float, float]:
    """Relative max errors of w4a16_matmul and w4a16_silu_matmul with the mma layout on CUDA at m rows of the
    4096 x 14336 weight, against the float reference (whatever kernel this GPU's table picks)."""
    k, n, group = 4096, 14336, 128
    q, s, z = _quantized(n, k, group, seed=m, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    plain, silu = MM.mma_layout(q, s, z, group), MM.mma_layout(q, s, z, group, silu=True)
    pairs = ((W.w4a16_matmul(x, q, s, z, group, mma=plain), _reference(x, q, s, z, group, False)),
             (W.w4a16_silu_matmul(x, q, s, z, group, mma=silu), _reference(x, q, s, z, group, True)))
    return tuple((got.float() - want).abs().max().item() / want.abs().max().item() for got, want in pairs)


def test_table_variant_replaces_one_entry_and_keeps_an_mma_fallback():
    """bench/table_variant.py (the in-step A/B of a table entry): a GEMV entry made mma gets the old GEMV as its
    fallback (weights without the mma layout still take a kernel), an mma entry made GEMV drops its fallback,
    and the H200 table's M = 1 4096x6144 entry, set to mma by that A/B, falls back to the GEMV."""
    import sys
    from pathlib import Path

    from lmc.kernels import w4a16_tuning as T

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import table_variant

    tables = T.read_tables()
    gemv = dict(next(e for e in tables["devices"]["NVIDIA H200"]["entries"] if (e["m"], e["k"], e["n"]) == (1, 4096, 4096)))
    got = table_variant.replace_entry(tables, "NVIDIA H200", 1, 4096, 4096, "mma", {"warps": 4, "split_k": 8})
    assert got["fallback"] == {"path": gemv["path"], "config": gemv["config"]}
    back = table_variant.replace_entry(tables, "NVIDIA H200", 1, 4096, 4096, "gemv", gemv["config"])
    assert "fallback" not in back and back["config"] == gemv["config"]
    with pytest.raises(KeyError, match="no entry"):
        table_variant.replace_entry(tables, "NVIDIA H200", 1, 4096, 4097, "gemv", {})
    assert T.select(T.read_tables()["devices"]["NVIDIA H200"]["entries"], 1, 6144, 4096, mma=True) == \
        ("mma", {"warps": 4, "split_k": 8, "buffers": 2})
    assert T.select(T.read_tables()["devices"]["NVIDIA H200"]["entries"], 1, 6144, 4096)[0] == "gemv"


def test_tune_in_step_keeps_only_a_variant_faster_in_every_run_and_restores_the_table(tmp_path):
    """bench/tune_in_step.py over a fake step timer that reads the table the way the step would: the variant whose
    every run beats every base run wins, one that overlaps the base does not, the table file is byte-identical
    after the runs (also when a run fails), and --write-table's writer puts the winner in with a source note."""
    import json
    import sys
    from pathlib import Path

    from lmc.kernels import w4a16_tuning as T

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import tune_in_step

    table = tmp_path / "table.json"
    table.write_bytes(T.TABLE_PATH.read_bytes())
    before = table.read_bytes()
    h200 = "NVIDIA H200"
    fast = {"name": "fast", "replace": [{"device": h200, "m": 1, "shape": "4096x4096", "path": "mma",
                                         "config": {"warps": 4, "split_k": 8, "buffers": 2}}]}
    noisy = {"name": "noisy", "replace": [{"device": h200, "m": 1, "shape": "14336x4096", "path": "mma",
                                           "config": {"warps": 8, "split_k": 8, "buffers": 2}}]}
    times = {"base": iter([9.0, 2.05, 2.06, 2.052]), "fast": iter([2.03, 2.035, 2.031]),
             "noisy": iter([2.04, 2.07, 2.045])}

    def measure(env: dict) -> float:
        assert env == {}
        entries = {(e["m"], e["k"], e["n"]): e for e in T.read_tables(table)["devices"][h200]["entries"]}
        if entries[(1, 4096, 4096)]["path"] == "mma":
            return next(times["fast"])
        return next(times["noisy" if entries[(1, 14336, 4096)]["config"]["split_k"] == 8 else "base"])

    result = tune_in_step.tune([fast, noisy], measure, 3, table)
    assert table.read_bytes() == before
    assert result["base_runs_ms"] == [2.05, 2.06, 2.052]  # the first (warm-up) run is dropped
    assert [(r["name"], r["wins"]) for r in result["variants"]] == [("fast", True), ("noisy", False)]
    assert result["best"] == "fast"
    tune_in_step.write_winner(result, [fast, noisy], table, "a note")
    tables = T.read_tables(table)
    entry = next(e for e in tables["devices"][h200]["entries"] if (e["m"], e["k"], e["n"]) == (1, 4096, 4096))
    assert entry["path"] == "mma" and entry["fallback"]["path"] == "gemv"
    assert tables["devices"][h200]["source"].endswith("; fast by bench/tune_in_step.py (a note)")

    table.write_bytes(before)

    def failing(env: dict) -> float:  # the warm-up (base) runs, the variant's run crashes
        entries = T.read_tables(table)["devices"][h200]["entries"]
        if any((e["m"], e["k"], e["n"], e["path"]) == (1, 4096, 4096, "mma") for e in entries):
            raise RuntimeError("the step crashed")
        return 2.0

    with pytest.raises(RuntimeError):
        tune_in_step.tune([fast], failing, 2, table)
    assert table.read_bytes() == before
    assert tune_in_step.wins([2.0, 2.1], [1.9, 1.99]) and not tune_in_step.wins([2.0, 2.1], [1.9, 2.05])
    shipped = json.loads((Path(__file__).parents[1] / "bench" / "variants_tp2_m1_h200.json").read_text())
    for variant in shipped:  # every entry the pending tp 2 A/B names exists in the table
        tune_in_step.apply(variant, tmp_path / "applied.json", table)

    seen = []  # an environment variant: its runs get its variables, the base's none, the table untouched
    env_result = tune_in_step.tune([{"name": "no_fused_rope", "env": {"LMC_FUSED_ROPE": "0"}}],
                                   lambda env: seen.append(env) or (1.9 if env else 2.0), 2, table)
    assert seen == [{}, {}, {"LMC_FUSED_ROPE": "0"}, {}, {"LMC_FUSED_ROPE": "0"}] and env_result["best"] == "no_fused_rope"
    assert table.read_bytes() == before
    tune_in_step.write_winner(env_result, [{"name": "no_fused_rope", "env": {"LMC_FUSED_ROPE": "0"}}], table, "n")
    assert table.read_bytes() == before  # nothing of it goes into the table


def test_tune_in_step_checks_the_variants_file_before_any_run(tmp_path):
    """A malformed variants file is one line naming the first problem (no traceback, nothing run); the shipped
    files pass."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import tune_in_step

    from lmc.kernels import w4a16_tuning as T

    for shipped in ("variants_tp2_m1_h200.json", "variants_m16_h200.json", "variants_staged_h200.json"):
        for variant in tune_in_step.read_variants(Path(__file__).resolve().parents[1] / "bench" / shipped):
            tune_in_step.apply(variant, tmp_path / "applied.json", T.TABLE_PATH)  # each names an existing entry
    good = {"device": "NVIDIA H200", "m": 1, "shape": "4096x4096", "path": "mma", "config": {"warps": 4}}
    cases = {"{": "cannot read", "[]": "non-empty", '[{"replace": []}]': "name",
             '[{"name": "a"}]': "replace", '[{"name": "a", "env": {"X": 1}}]': "strings",
             json.dumps([{"name": "a", "replace": [dict(good, shape="4096")]}]): "KxN",
             json.dumps([{"name": "a", "replace": [{k: v for k, v in good.items() if k != "path"}]}]): "exactly",
             json.dumps([{"name": "a", "env": {"X": "1"}}, {"name": "a", "env": {"Y": "1"}}]): "unique"}
    for text, problem in cases.items():
        path = tmp_path / "v.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=problem):
            tune_in_step.read_variants(path)
    path.write_text("[]")
    run = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "tune_in_step.py"),
                          "--variants", str(path), "--out", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "non-empty" in run.stderr

