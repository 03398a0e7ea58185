"""W4A16 kernels: the reference unpacking of lmc-int4-k8, and both Triton paths (interpreter) against it."""

import os

# before triton is first imported: kernels run on CPU tensors. The GPU test needs TRITON_INTERPRET=0 pytest -m gpu.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from lmc.errors import LmcError
from lmc.kernels import w4a16 as W
from lmc.kernels.split_counters import split_counters


def _pack(codes: np.ndarray) -> torch.Tensor:
    """Independent packer: codes [N, K] in 0..15 -> int32 [ceil(K/8), N], code of W[n, 8r+j] in bits 4j..4j+3."""
    n, k = codes.shape
    words = np.zeros((-(-k // 8), n), dtype=np.uint32)
    for kk in range(k):
        words[kk // 8] |= codes[:, kk].astype(np.uint32) << np.uint32(4 * (kk % 8))
    return torch.from_numpy(words.view(np.int32).copy())


def _quantized(n: int, k: int, group: int, dtype, seed: int):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n, k))  # [N, K]
    groups = -(-k // group)
    scales = torch.from_numpy(rng.uniform(0.002, 0.02, size=(groups, n))).to(dtype)  # [K/G, N]
    zeros = torch.from_numpy(rng.integers(0, 16, size=(groups, n)).astype(np.float32)).to(dtype)  # [K/G, N]
    return codes, _pack(codes), scales, zeros


def test_nibble_order_golden():
    codes = np.arange(1, 9).reshape(1, 8)  # W[0, j] = j + 1
    q = _pack(codes)
    assert q.shape == (1, 1) and q.item() == np.array([0x87654321], dtype=np.uint32).view(np.int32)[0]
    w = W.dequantize_int4_ref(q, torch.ones(1, 1), torch.full((1, 1), 3.0), 32, 8)  # [8, 1]
    assert w[:, 0].tolist() == [float(j + 1 - 3) for j in range(8)]


@pytest.mark.parametrize("n,k,group", [(5, 200, 64), (3, 576, 128), (7, 203, 32), (4, 61, 128)])
def test_dequantize_ref_matches_codes(n, k, group):
    codes, q, scales, zeros = _quantized(n, k, group, torch.float16, seed=k)
    g = np.arange(k) // group
    want = (codes.T - zeros.float().numpy()[g]) * scales.float().numpy()[g]  # [K, N]
    got = W.dequantize_int4_ref(q, scales, zeros, group, k)
    assert got.shape == (k, n) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)


def test_matmul_ref_and_cpu_dispatch():
    codes, q, scales, zeros = _quantized(9, 203, 64, torch.float32, seed=1)
    x = torch.randn(2, 3, 203)
    g = np.arange(203) // 64
    w = torch.from_numpy((codes.T - zeros.numpy()[g]) * scales.numpy()[g]).float()  # [K, N]
    ref = W.w4a16_matmul_ref(x, q, scales, zeros, 64)
    torch.testing.assert_close(ref, x @ w, rtol=1e-5, atol=1e-5)
    assert torch.equal(W.w4a16_matmul(x, q, scales, zeros, 64), ref)  # CPU tensors take the reference


def test_shape_errors_are_typed():
    _, q, scales, zeros = _quantized(4, 200, 64, torch.float16, seed=2)
    with pytest.raises(LmcError, match="packed rows"):
        W.w4a16_matmul_ref(torch.randn(1, 208), q, scales, zeros, 64)
    with pytest.raises(LmcError, match="scales/zeros"):
        W.w4a16_matmul_ref(torch.randn(1, 200), q, scales, zeros, 32)
    with pytest.raises(LmcError, match="group size"):
        W.w4a16_matmul_ref(torch.randn(1, 200), q, scales, zeros, 48)


# M, N, K, G: partial last groups (200 % 64, 203 % 32, 576 % 128), K % 8 != 0 (203), N off the blocks
CASES = [(1, 75, 200, 64), (3, 75, 203, 32), (16, 40, 576, 128), (33, 75, 203, 64)]


def _triton_check(launch, m, n, k, group, dtype, **kw):
    pytest.importorskip("triton")
    _, q, scales, zeros = _quantized(n, k, group, dtype, seed=m * 1000 + k)
    x = torch.randn(m, k).to(dtype)
    ref = W.w4a16_matmul_ref(x, q, scales, zeros, group).float()
    out = torch.full((m, n), float("nan"), dtype=dtype)
    got = launch(x, q, scales, zeros, group, out=out, **kw)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype and torch.isfinite(got).all()
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < (2e-3 if dtype == torch.float16 else 1e-5), err


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k,group", CASES)
def test_gemv_triton(m, n, k, group, dtype):
    # depth 1 or 2 groups in flight (unrolled 2 or 3 times: odd group counts leave an overhang); M=3 and 33: rows past M in the last block of 2 or 4 rows; split_k=3 over K=200, G=64 (4 groups): runs
    # of 2, 2 and an empty third that still takes part in the last-split reduction
    # preload (M=3, 7 groups over 2 splits: runs of 4 and 3): two groups before the loop, g + 3 loaded at its end
    rows, split_k, depth, preload = {1: (1, 3, 2, False), 3: (2, 2, 1, True), 16: (4, 1, 2, False),
                                     33: (4, 3, 1, False)}[m]
    _triton_check(W.w4a16_gemv_triton, m, n, k, group, dtype, block_n=16, rows=rows, split_k=split_k, depth=depth,
                  preload=preload)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,half,k,group,rows,split_k", [(1, 37, 200, 64, 1, 3), (3, 37, 203, 32, 2, 1),
                                                        (5, 24, 576, 128, 4, 2)])
def test_gemv_silu_epilogue(m, half, k, group, rows, split_k, dtype):
    """silu_mul=True on a fused gate/up weight [K, 2I] writes silu(gate) * up [M, I]: bit-identical to the GEMV then
    silu_mul (same roundings), and close to the float32 reference. I = 37 and 24 are not multiples of the 8 gate
    columns a program owns; split_k=3 has an empty run; M=3 and 5 leave rows past M in the last row block."""
    pytest.importorskip("triton")
    from lmc.kernels.silu_mul import silu_mul_ref, silu_mul_triton

    _, q, scales, zeros = _quantized(2 * half, k, group, dtype, seed=m + k)
    x = torch.randn(m, k).to(dtype)
    kw = dict(block_n=16, rows=rows, split_k=split_k)
    out = torch.full((m, half), float("nan"), dtype=dtype)
    got = W.w4a16_gemv_triton(x, q, scales, zeros, group, silu_mul=True, out=out, **kw)
    assert got.data_ptr() == out.data_ptr()
    unfused = silu_mul_triton(W.w4a16_gemv_triton(x, q, scales, zeros, group, **kw))  # [M, I]
    assert torch.equal(got, unfused)
    ref = silu_mul_ref(W.w4a16_matmul_ref(x, q, scales, zeros, group)).float()
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < (4e-3 if dtype == torch.float16 else 1e-5), err
    with pytest.raises(LmcError, match="even N"):
        W.w4a16_gemv_triton(x, q[:, :-1].contiguous(), scales[:, :-1].contiguous(), zeros[:, :-1].contiguous(),
                            group, silu_mul=True)


def test_silu_matmul_dispatch_on_cpu():
    """Off CUDA w4a16_silu_matmul is the reference: matmul, then silu_mul."""
    from lmc.kernels.silu_mul import silu_mul_ref

    _, q, scales, zeros = _quantized(2 * 21, 203, 64, torch.float32, seed=9)
    x = torch.randn(2, 3, 203)
    want = silu_mul_ref(W.w4a16_matmul_ref(x, q, scales, zeros, 64))
    assert torch.equal(W.w4a16_silu_matmul(x, q, scales, zeros, 64), want) and want.shape == (2, 3, 21)


def test_gemv_split_counters_reset():
    """The split-K counters are back at zero after a call: a second call (a CUDA-graph replay) sums again."""
    pytest.importorskip("triton")
    _, q, scales, zeros = _quantized(40, 576, 128, torch.float32, seed=3)
    x = torch.randn(3, 576)
    ref = W.w4a16_matmul_ref(x, q, scales, zeros, 128)
    for _ in range(2):
        got = W.w4a16_gemv_triton(x, q, scales, zeros, 128, block_n=16, rows=2, split_k=3)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not split_counters(x.device, 1).any()


@pytest.mark.parametrize("split_k,swap_ab", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k,group", CASES)
def test_gemm_triton(m, n, k, group, dtype, split_k, swap_ab):
    # split_k=3 at K=203: runs of 128 and 75, and an empty third run that must write zeros; swap_ab: W x^T tiles
    _triton_check(W.w4a16_gemm_triton, m, n, k, group, dtype, block_m=16, block_n=32, block_k=64, group_m=2,
                  split_k=split_k, swap_ab=swap_ab)


def test_gemv_dot_asm_needs_float16_on_cuda():
    pytest.importorskip("triton")
    _, q, scales, zeros = _quantized(75, 200, 64, torch.float16, seed=5)
    with pytest.raises(LmcError, match="dot_asm"):
        W.w4a16_gemv_triton(torch.randn(1, 200).half(), q, scales, zeros, 64, dot_asm=True)  # CPU, and N = 75


@pytest.mark.gpu
@pytest.mark.parametrize("rows,split_k,depth", [(1, 1, 1), (1, 3, 2), (4, 2, 2)])
@pytest.mark.parametrize("m,n,k,group", [(1, 76, 200, 64), (3, 76, 203, 32), (16, 40, 576, 128), (33, 76, 203, 64),
                                         (1, 4104, 4096, 128), (5, 4096, 14336, 128)])
def test_gemv_dot_asm_on_cuda(m, n, k, group, rows, split_k, depth):
    """The packed-float16 path (inline PTX; N % 4 == 0, here not always % 16) against the float32 reference and
    the float32-path GEMV; large activations (|x| up to 8000) stay finite wherever the true output fits in fp16."""
    if not torch.cuda.is_available() or os.environ["TRITON_INTERPRET"] == "1":
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    _, q, scales, zeros = _quantized(n, k, group, torch.float16, seed=m + k)
    q, scales, zeros = q.cuda(), scales.cuda(), zeros.cuda()
    kw = dict(block_n=16, rows=rows, split_k=split_k, depth=depth)
    for amp in (1.0, 8000.0 * min(1.0, (1000 / k) ** 0.5)):  # the big amplitude keeps most outputs in range
        x = (torch.rand(m, k, device="cuda") * 2 - 1).mul(amp).half()
        ref = W.w4a16_matmul_ref(x, q, scales, zeros, group).float()
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        W.w4a16_gemv_triton(x, q, scales, zeros, group, dot_asm=True, out=out, **kw)
        f32 = W.w4a16_gemv_triton(x, q, scales, zeros, group, dot_asm=False, **kw)
        fits = ref.abs() < 60000  # outputs fp16 can hold; past that the true result is inf anyway
        assert fits.float().mean() > 0.9
        assert torch.isfinite(out[fits]).all()
        err = ((out.float()[fits] - ref[fits]).norm() / ref[fits].norm()).item()
        err32 = ((f32.float()[fits] - ref[fits]).norm() / ref[fits].norm()).item()
        assert err < 2e-3 and err32 < 2e-4, (amp, err, err32)  # err32: the float16 output rounding


@pytest.mark.gpu
@pytest.mark.parametrize("m,half,k", [(1, 14336, 4096), (4, 14336, 4096), (1, 76, 200), (3, 12, 203)])
def test_silu_matmul_on_cuda(m, half, k):
    """The fused gate/up + SiLU GEMV as the model calls it (table config, packed-float16 path) equals the GEMV then
    silu_mul bit for bit, and the float32 reference within fp16 rounding, at the Llama-3-8B MLP shape and odd ones."""
    if not torch.cuda.is_available() or os.environ["TRITON_INTERPRET"] == "1":
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    from lmc.kernels.silu_mul import silu_mul, silu_mul_ref

    group = 128 if k % 128 == 0 else 32
    _, q, scales, zeros = _quantized(2 * half, k, group, torch.float16, seed=m + k)
    q, scales, zeros = q.cuda(), scales.cuda(), zeros.cuda()
    x = torch.randn(m, k, device="cuda").half()
    got = W.w4a16_silu_matmul(x, q, scales, zeros, group)  # [M, I]
    assert torch.equal(got, silu_mul(W.w4a16_matmul(x, q, scales, zeros, group)))
    ref = silu_mul_ref(W.w4a16_matmul_ref(x, q, scales, zeros, group)).float()
    assert ((got.float() - ref).norm() / ref.norm()).item() < 4e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k,group", CASES)
def test_dequant_then_matmul(m, n, k, group, dtype):
    _triton_check(W.w4a16_dequant_matmul_triton, m, n, k, group, dtype)
    _, q, scales, zeros = _quantized(n, k, group, dtype, seed=k)
    w_t = W.dequantize_int4_triton(q, scales, zeros, group, k, dtype, block_r=4, block_n=16)  # odd tiles
    assert torch.equal(w_t, W.dequantize_int4_ref(q, scales, zeros, group, k).to(dtype))


def test_dispatch_table_covers_every_m():
    for m in (1, 2, 3, 16, 17, 64, 65, 256, 257, 4096):
        path, kw = W.w4a16_config(m, 4096, 4096)
        assert path in ("gemv", "gemm", "dequant") and kw.get("num_warps", 4) in (1, 2, 4, 8)
    assert W.w4a16_config(2048, 4096, 4096)[0] == "dequant"
    for m in (1, 2, 3, 4):  # decode batches: the CUDA-core GEMV, all rows in one program
        path, kw = W.w4a16_config(m, 4096, 4096)
        assert path == "gemv" and kw["rows"] >= m


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(1, 328), (5, 328), (16, 328), (50, 328), (50, 9000), (200, 328), (200, 5000),
                                 (200, 9000), (300, 328)])
def test_dispatch_on_cuda(m, n, dtype):
    """Every table row's path on the GPU (GEMV, swap-AB and plain GEMM, dequant) against the reference."""
    if not torch.cuda.is_available() or os.environ["TRITON_INTERPRET"] == "1":
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    k, group = 1000, 128  # partial last group, N off the blocks
    _, q, scales, zeros = _quantized(n, k, group, dtype, seed=m)
    q, scales, zeros = q.cuda(), scales.cuda(), zeros.cuda()
    x = torch.randn(m, k, device="cuda").to(dtype)
    ref = W.w4a16_matmul_ref(x, q, scales, zeros, group).float()
    got = W.w4a16_matmul(x, q, scales, zeros, group)
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert got.dtype == dtype and err < (2e-3 if dtype == torch.float16 else 1e-2), err


# ----------------------------------------------------------------------------- tuning tables (lmc.kernels.w4a16_tuning)


def _entry(m, k, n, split_k):
    return {"m": m, "k": k, "n": n, "path": "gemv", "config": {"split_k": split_k}}


def test_tuning_select_m_class_then_nearest_shape():
    from lmc.kernels.w4a16_tuning import select

    entries = [_entry(1, 4096, 4096, 1), _entry(1, 4096, 28672, 2), _entry(1, 14336, 4096, 3),
               _entry(16, 4096, 4096, 4), _entry(2048, 4096, 4096, 5)]
    pick = lambda m, n, k: select(entries, m, n, k)[1]["split_k"]  # noqa: E731
    assert pick(1, 4096, 4096) == 1 and pick(1, 28672, 4096) == 2 and pick(1, 4096, 14336) == 3
    assert pick(1, 576, 576) == 1  # a small model's shapes: the nearest on a log scale
    assert pick(1, 20000, 4096) == 2 and pick(1, 4096, 11000) == 3
    assert pick(2, 4096, 4096) == 4 and pick(16, 4096, 4096) == 4  # M class: the smallest entry M >= M
    assert pick(17, 4096, 4096) == 5 and pick(100000, 4096, 4096) == 5  # past the largest: the largest


def test_tuning_table_shipped_for_h100_and_h200():
    """The shipped JSON reads back; both GPUs have an entry for every swept M class at the four 8B shapes; the
    H100's entries are the H200's (session 32: the same sm_90 die, A/B'd in the H100's decode step,
    bench/results/decode_tables_h100.json), so both build the mma layout; a GPU without a table does not."""
    from lmc.kernels.w4a16_tuning import PATHS, has_mma, read_tables

    tables = read_tables()
    assert tables["default"] == "NVIDIA H100 80GB HBM3"
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        entries = tables["devices"][name]["entries"]
        have = {(e["m"], e["k"], e["n"]) for e in entries}
        assert have >= {(m, k, n) for m in (1, 2, 4, 16, 64, 256, 2048)
                        for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))}
        assert all(e["path"] in PATHS for e in entries)
        assert all(e["fallback"]["path"] in PATHS and e["fallback"]["path"] != "mma"
                   for e in entries if e["path"] == "mma")
        assert has_mma(name)
    assert not has_mma("Some Future GPU")  # the default's fallbacks, one copy of each weight
    h100 = {(e["m"], e["k"], e["n"]): e for e in tables["devices"]["NVIDIA H100 80GB HBM3"]["entries"]}
    assert tables["devices"]["NVIDIA H100 80GB HBM3"]["entries"] == tables["devices"]["NVIDIA H200"]["entries"]
    assert h100[(1, 4096, 4096)]["config"] == dict(block_n=64, rows=1, split_k=8, depth=1, num_warps=2, preload=True)
    assert h100[(16, 14336, 4096)]["fallback"]["config"]["swap_ab"]
    assert h100[(2048, 4096, 28672)]["path"] == "dequant"


def test_tuning_unknown_gpu_gets_default_and_one_hint(capsys):
    from lmc.kernels import w4a16_tuning as T

    default = T.config_for(None, 16, 6144, 4096)
    assert T.config_for("NVIDIA H100 80GB HBM3", 16, 6144, 4096) == default
    assert capsys.readouterr().err == ""
    for _ in range(3):
        assert T.config_for("Some Future GPU", 16, 6144, 4096) == default
        assert T.config_for("Some Future GPU", 1, 6144, 4096)[0] == "gemv"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'Some Future GPU'" in err and T.TUNE_HINT in err


def test_tuning_merge_and_write_round_trip(tmp_path):
    """A sweep's entries replace the same (m, k, n) of its GPU, keep the rest; a new GPU starts from the default's
    entries; the file reads back and other GPUs are untouched."""
    from lmc.kernels import w4a16_tuning as T

    tables = T.read_tables()
    new = [{"m": 16, "k": 4096, "n": 6144, "path": "gemv", "config": {"block_n": 16, "rows": 4}, "us": 3.5},
           {"m": 3, "k": 4096, "n": 6144, "path": "gemm", "config": {"block_m": 16}, "us": 3.0}]
    merged = T.merge(tables, "NVIDIA H200", new, "test sweep")
    path = tmp_path / "t.json"
    T.write_tables(merged, path)
    back = T.read_tables(path)
    assert back["devices"]["NVIDIA H100 80GB HBM3"] == tables["devices"]["NVIDIA H100 80GB HBM3"]
    h200 = back["devices"]["NVIDIA H200"]
    assert len(h200["entries"]) == len(tables["devices"]["NVIDIA H200"]["entries"]) + 1
    assert T.select(h200["entries"], 16, 6144, 4096) == ("gemv", {"block_n": 16, "rows": 4})
    assert T.select(h200["entries"], 3, 6144, 4096) == ("gemm", {"block_m": 16})  # the new M class 3
    assert T.select(h200["entries"], 1, 6144, 4096) == T.select(tables["devices"]["NVIDIA H200"]["entries"], 1,
                                                                6144, 4096)
    assert h200["source"].endswith("; test sweep")
    fresh = T.merge(tables, "New GPU", new[:1], "s")["devices"]["New GPU"]
    assert len(fresh["entries"]) == len(tables["devices"][tables["default"]]["entries"])
    assert fresh["source"].startswith("seeded from NVIDIA H100")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other", "devices": {}}')
    with pytest.raises(ValueError, match="lmc-w4a16-tuning-1"):
        T.read_tables(bad)


@pytest.mark.parametrize("m,n,k,group,block_k,split_k,swap_ab", [
    (5, 75, 203, 64, 64, 3, True),  # one scale/zero vector per tile (BLOCK_K = G), a partial last group, empty split
    (16, 40, 576, 128, 32, 4, True),  # BLOCK_K < G: four tiles per group
    (33, 75, 203, 32, 64, 2, False),  # BLOCK_K > G: per-row scales, as before
    (2, 72, 384, 128, 128, 3, False),  # M = 2 on the tensor-core path, BLOCK_K = G, splits of one tile
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemm_tile_group_vectors(m, n, k, group, block_k, split_k, swap_ab, dtype):
    """The GEMM's per-tile scale/zero vectors (BLOCK_K divides G) and per-row loads (BLOCK_K > G), swap-AB and split-K,
    on shapes off every block."""
    _triton_check(W.w4a16_gemm_triton, m, n, k, group, dtype, block_m=16, block_n=32, block_k=block_k, group_m=2,
                  split_k=split_k, swap_ab=swap_ab)


@pytest.mark.parametrize("m,rows,split_k", [(9, 4, 2), (16, 4, 8), (13, 2, 3)])
def test_gemv_for_m_up_to_16(m, rows, split_k):
    """The CUDA-core GEMV as a sweep candidate for M = 5..16: row blocks past the first re-read the weights; rows
    past M in the last block are not stored; split_k = 8 over 4 groups leaves empty runs."""
    _triton_check(W.w4a16_gemv_triton, m, 75, 512, 128, torch.float16, block_n=16, rows=rows, split_k=split_k)


def test_config_on_a_cuda_device_name(monkeypatch):
    """w4a16_config with a CUDA device reads that GPU's table (its name resolved once per device index)."""
    from lmc.kernels import w4a16_tuning as T

    names = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: names.append(i) or "NVIDIA H200")
    W._device_name.cache_clear()
    try:
        got = [W.w4a16_config(16, 6144, 4096, torch.device("cuda", 0)) for _ in range(3)]
        assert got[0] == T.config_for("NVIDIA H200", 16, 6144, 4096) and names == [0]
    finally:
        W._device_name.cache_clear()


@pytest.mark.parametrize("m,n,k,group,block_k,split_k,swap_ab", [
    (5, 75, 203, 64, 64, 3, True),  # partial last group, K % 8 != 0, an empty third split
    (16, 40, 576, 128, 32, 4, True),  # four tiles per group
    (33, 75, 203, 32, 32, 1, False),  # the plain GEMM, rows past M
    (2, 72, 384, 128, 128, 2, False),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemm_kmajor(m, n, k, group, block_k, split_k, swap_ab, dtype):
    """The GEMM reading the K-major copy of qweight (w4a16_kmajor: [N, ceil(K/8)]) on shapes off every block,
    swap-AB and split-K included; a wrong copy or a BLOCK_K that does not divide G is refused."""
    _, q, scales, zeros = _quantized(n, k, group, dtype, seed=m * 1000 + k)  # the weights _triton_check makes
    qt = W.w4a16_kmajor(q)
    assert qt.shape == (n, -(-k // 8)) and torch.equal(qt.t(), q)
    _triton_check(W.w4a16_gemm_triton, m, n, k, group, dtype, block_m=16, block_n=32, block_k=block_k, group_m=2,
                  split_k=split_k, swap_ab=swap_ab, qweight_kmajor=qt)
    x = torch.randn(m, k).to(dtype)
    with pytest.raises(LmcError, match="qweight_kmajor"):
        W.w4a16_gemm_triton(x, q, scales, zeros, group, block_k=block_k, qweight_kmajor=q.t())
    with pytest.raises(LmcError, match="divide the group size"):
        W.w4a16_gemm_triton(x, q, scales, zeros, group, block_k=2 * group, qweight_kmajor=qt)


@pytest.mark.parametrize("m", [1, 5, 16, 17, 42, 255])
def test_split_k_partials_stride_is_a_multiple_of_16_for_every_m(m):
    """The GEMM's split-K partials keep a split stride divisible by 16 whatever M is (Triton would otherwise
    compile the kernel again for each divisibility of M x N: a stall mid-serving); test_gemm_* check the sums."""
    from lmc.kernels.w4a16 import _splitk_partials

    for n in (48, 13, 4096):
        part = _splitk_partials(3, m, n, torch.device("cpu"))
        assert part.shape == (3, m, n) and part.stride(0) % 16 == 0 and part.stride()[1:] == (n, 1)
