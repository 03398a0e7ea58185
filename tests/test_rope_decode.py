"""The decode attention kernel that also rotates q and writes the step's k and v (rotary_decode_attention on CUDA
over a float cache) against the two launches it replaces, rotary_write_kv then the decode kernel: the same output
and the same cache bytes (Triton interpreter, odd shapes; the gpu-marked tests compile it:
TRITON_INTERPRET=0 pytest -m gpu tests/test_rope_decode.py), the runtime's routing, and its sm_90 compile."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cuda_graph import PROMPTS, _engine, _greedy_logits, _workspace, gpu, needs_cuda
from test_kernels import _cos_sin, _gen, _LaunchSpy, needs_triton
from test_kernels import triton_interpreter  # noqa: F401 (fixture)

from lmc.errors import LmcError
from lmc.kernels import attention, rotary
from lmc.kernels.kv_quant import QuantizedKV
from lmc.runtime.model import PagedBatch

ROOT = Path(__file__).resolve().parents[1]
KV_LENS = (1, 17, 40)  # a one-token sequence (later splits empty), one past a block, one mid-block
SHAPES = [  # Hq, Hkv, D: GQA groups of 3 and 5 (head_dim not a power of 2), MHA
    (6, 2, 48),
    (10, 2, 80),
    (3, 3, 64),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _decode_step(Hq, Hkv, D, dtype, kv_lens=KV_LENS, block_size=16, device="cpu", seed=0):
    """A decode step as the runtime passes it: q, k, v strided views [B, H, D] of a fused qkv row, cos/sin [B, D/2]
    at each sequence's new position kv_len - 1, noisy caches (shuffled blocks, the new slots hold noise too), the
    new tokens' slots [B], block tables and kv lengths."""
    g = _gen(seed)
    B = len(kv_lens)
    n_blocks = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(n_blocks) + 2
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(B, max(n_blocks) + 1, dtype=torch.int32)  # a padding column
    used = 0
    for b, n in enumerate(n_blocks):
        tables[b, :n] = order[used:used + n]
        used += n
    k_cache, v_cache = (torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype).to(device) for _ in "kv")
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g).to(dtype).to(device)  # [B, (Hq + 2 Hkv) D]
    pos = torch.tensor(kv_lens) - 1  # [B]
    slots = tables[torch.arange(B), pos // block_size].long() * block_size + pos % block_size  # [B]
    cos, sin = (t.to(device) for t in _cos_sin(B, D, seed + 1))
    return dict(q=qkv[:, :Hq * D].view(B, Hq, D), k=qkv[:, Hq * D:(Hq + Hkv) * D].view(B, Hkv, D),
                v=qkv[:, (Hq + Hkv) * D:].view(B, Hkv, D), cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache,
                slot_mapping=slots.to(device), block_tables=tables.to(device),
                kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device))


def _two_launches(s: dict, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rotary_write_kv then the decode kernel, on copies of the caches: (output, k cache, v cache)."""
    k_cache, v_cache = s["k_cache"].clone(), s["v_cache"].clone()
    q = rotary.rotary_write_kv_triton(s["q"], s["k"], s["v"], s["cos"], s["sin"], k_cache, v_cache, s["slot_mapping"])
    out = attention.paged_decode_attention_triton(q, k_cache, v_cache, s["block_tables"], s["kv_lens"],
                                                  1 / math.sqrt(q.shape[-1]), **kw)
    return out, k_cache, v_cache


def _one_launch(s: dict, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode kernel with rope, on copies of the caches: (output, k cache, v cache)."""
    k_cache, v_cache = s["k_cache"].clone(), s["v_cache"].clone()
    rope = (s["k"], s["v"], s["cos"], s["sin"], s["slot_mapping"])
    out = attention.paged_decode_attention_triton(s["q"], k_cache, v_cache, s["block_tables"], s["kv_lens"],
                                                  1 / math.sqrt(s["q"].shape[-1]), rope=rope, **kw)
    return out, k_cache, v_cache


def _assert_same_bits(s: dict, **kw) -> None:
    inputs = {name: s[name].clone() for name in ("q", "k", "v", "cos", "sin")}
    (out, k_cache, v_cache), (ref, k_ref, v_ref) = _one_launch(s, **kw), _two_launches(s, **kw)
    assert out.dtype == s["q"].dtype and out.shape == s["q"].shape
    assert torch.equal(out, ref)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert not torch.equal(k_ref, s["k_cache"])  # the new slots were written
    assert all(torch.equal(s[name], t) for name, t in inputs.items())  # q, k, v, cos, sin untouched


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 4])
def test_rope_decode_equals_rotary_write_then_decode(Hq, Hkv, D, dtype, num_splits):
    """The new token lands in split 0 (kv_len 1; the others empty), in split 1 of 3 or 4 (kv_len 17: 16-token
    tiles) or in the last split; every split count gives the two launches' bits."""
    _assert_same_bits(_decode_step(Hq, Hkv, D, dtype), num_splits=num_splits, block_n=16)


@needs_triton
def test_rope_decode_leaves_other_slots_alone():
    """Only the new tokens' slots change: the rest of the caches keep their noise."""
    s = _decode_step(6, 2, 48, torch.float32)
    _, k_cache, v_cache = _one_launch(s, num_splits=3, block_n=16)
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool).flatten()  # [slots]
    untouched[s["slot_mapping"]] = False
    for got, before in ((k_cache, s["k_cache"]), (v_cache, s["v_cache"])):
        assert torch.equal(got.flatten(0, 1)[untouched], before.flatten(0, 1)[untouched])
        assert not torch.equal(got.flatten(0, 1)[~untouched], before.flatten(0, 1)[~untouched])


@needs_triton
def test_rope_decode_reuses_the_split_counters():
    """Two calls in a row (as CUDA-graph replays): the counters the last split resets serve the second call."""
    for kv_lens in ((40, 1, 17), (33, 16, 2)):
        _assert_same_bits(_decode_step(10, 2, 80, torch.float16, kv_lens=kv_lens), num_splits=3, block_n=16)


def test_rope_decode_refuses_quantized_caches():
    s = _decode_step(6, 2, 64, torch.float16)
    k_cache, v_cache = (QuantizedKV.empty(*s["k_cache"].shape, 8, 64, "cpu") for _ in "kv")
    with pytest.raises(AssertionError, match="mma, float cache"):
        attention.paged_decode_attention_triton(s["q"], k_cache, v_cache, s["block_tables"], s["kv_lens"], 0.1,
                                                rope=(s["k"], s["v"], s["cos"], s["sin"], s["slot_mapping"]))


def test_decode_fuses_rope_on_cuda_over_a_float_cache(monkeypatch):
    """The routing of rotary_decode_attention: one launch on CUDA over a float cache from FUSED_ROPE_MIN_BATCH
    sequences, two below it, with a quantized cache, on the CPU (the torch references) or with LMC_FUSED_ROPE=0
    (read once per process)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    float_cache = torch.zeros(1, 16, 2, 64, dtype=torch.float16)
    quantized = QuantizedKV.empty(1, 16, 2, 64, 8, 64, "cpu")
    for value, fused in ((None, True), ("1", True), ("0", False)):
        if value is None:
            monkeypatch.delenv("LMC_FUSED_ROPE", raising=False)
        else:
            monkeypatch.setenv("LMC_FUSED_ROPE", value)
        rotary._fused_rope_on.cache_clear()
        big, small = rotary.FUSED_ROPE_MIN_BATCH, rotary.FUSED_ROPE_MIN_BATCH - 1
        assert rotary.decode_fuses_rope(cuda, float_cache, big) is fused
        assert not rotary.decode_fuses_rope(cuda, float_cache, small)
        assert not rotary.decode_fuses_rope(cuda, quantized, big) and not rotary.decode_fuses_rope(cpu, float_cache, big)
    rotary._fused_rope_on.cache_clear()


def test_fused_rope_min_batch_from_the_environment(monkeypatch):
    """LMC_FUSED_ROPE_MIN_BATCH=N moves the threshold (read once); anything but a whole number >= 1 is one
    LmcError line naming the variable."""
    cuda = torch.device("cuda")
    float_cache = torch.zeros(1, 16, 2, 64, dtype=torch.float16)
    monkeypatch.delenv("LMC_FUSED_ROPE", raising=False)
    rotary._fused_rope_on.cache_clear()
    try:
        monkeypatch.setenv("LMC_FUSED_ROPE_MIN_BATCH", "4")
        rotary._fused_rope_min_batch.cache_clear()
        assert rotary.decode_fuses_rope(cuda, float_cache, 4) and not rotary.decode_fuses_rope(cuda, float_cache, 3)
        for bad in ("0", "-2", "abc", "2.5", ""):
            monkeypatch.setenv("LMC_FUSED_ROPE_MIN_BATCH", bad)
            rotary._fused_rope_min_batch.cache_clear()
            with pytest.raises(LmcError, match="LMC_FUSED_ROPE_MIN_BATCH"):
                rotary.decode_fuses_rope(cuda, float_cache, 16)
    finally:
        monkeypatch.delenv("LMC_FUSED_ROPE_MIN_BATCH", raising=False)
        rotary._fused_rope_min_batch.cache_clear()
        rotary._fused_rope_on.cache_clear()


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
def test_paged_batch_decode_routes_through_the_fused_kernel(monkeypatch, fused):
    """PagedBatch.rotate_attend at decode: where decode_fuses_rope (forced here, the CPU tensors running the
    interpreter) one launch of the decode kernel with rope, the two launches' bits; else the references (on the
    CPU), within rounding. Prefill never takes it."""
    s = _decode_step(6, 2, 48, torch.float32)
    ref, k_ref, v_ref = _two_launches(s)
    monkeypatch.setattr(rotary, "decode_fuses_rope", lambda device, k_cache, batch: fused)
    launches, ropes = [], []
    monkeypatch.setattr(attention, "_decode_kernel", _LaunchSpy("_decode_kernel", attention._decode_kernel, launches))
    triton_launch = attention.paged_decode_attention_triton
    monkeypatch.setattr(rotary, "paged_decode_attention_triton",
                        lambda *a, rope=None, **kw: ropes.append(rope) or triton_launch(*a, rope=rope, **kw))
    batch = PagedBatch([s["k_cache"].clone()], [s["v_cache"].clone()], s["slot_mapping"], s["block_tables"],
                       s["kv_lens"], None)
    out = batch.rotate_attend(0, s["q"], s["k"], s["v"], s["cos"], s["sin"], 1 / math.sqrt(48))
    assert launches == (["_decode_kernel"] if fused else []) and len(ropes) == int(fused)
    if fused:
        assert ropes[0][0] is s["k"] and ropes[0][4] is s["slot_mapping"]
        assert torch.equal(out, ref) and torch.equal(batch.k_cache[0], k_ref) and torch.equal(batch.v_cache[0], v_ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.k_cache[0], k_ref, rtol=1e-5, atol=1e-5)
    prefill = PagedBatch([s["k_cache"].clone()], [s["v_cache"].clone()], s["slot_mapping"], s["block_tables"],
                         s["kv_lens"], torch.arange(4, dtype=torch.int32))
    prefill.rotate_attend(0, s["q"], s["k"], s["v"], s["cos"], s["sin"], 1 / math.sqrt(48))
    assert len(ropes) == int(fused)


def test_rope_decode_kernel_compiles_for_sm90():
    """The fused kernel compiles for sm_90 with the installed Triton and its bundled ptxas (no GPU needed), at the
    8B shape, without spilling (bench/compile_decode_sm90.py)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell").exists():
        pytest.skip("this Triton bundles no ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_decode_sm90.py"), "--bits", "16", "--kernels",
                        "mma", "--rope"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "spills 0 B stored / 0 B loaded" in r.stdout, r.stdout


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv,D,block_size", [(6, 2, 48, 16), (10, 2, 80, 16), (3, 3, 64, 16),
                                                  (32, 8, 128, 64), (28, 4, 128, 64)])
def test_rope_decode_equals_rotary_write_then_decode_on_cuda(Hq, Hkv, D, block_size, dtype):
    """Compiled: the same bits as the two launches, at the default split count and at forced ones."""
    kv_lens = (1, 17, 40, 300, 1000)
    s = _decode_step(Hq, Hkv, D, dtype, kv_lens=kv_lens, block_size=block_size, device="cuda")
    for num_splits in (None, 1, 2, 3, 4, 7):
        _assert_same_bits(s, num_splits=num_splits)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_rope_engine_equals_two_launches_on_gpu(checkpoint, tmp_path, monkeypatch, dtype):
    """CUDA-graph decode with the fused kernel (at every batch size here) and with LMC_FUSED_ROPE=0: the same
    tokens and logits, bit for bit."""
    ws = _workspace(checkpoint, tmp_path, dtype)
    monkeypatch.setattr(rotary, "FUSED_ROPE_MIN_BATCH", 1)
    runs = []
    for value in ("0", "1"):
        monkeypatch.setenv("LMC_FUSED_ROPE", value)
        rotary._fused_rope_on.cache_clear()
        runs.append(_greedy_logits(_engine(ws, "cuda"), PROMPTS))
    rotary._fused_rope_on.cache_clear()
    (tokens_two, logits_two), (tokens_one, logits_one) = runs
    assert tokens_one == tokens_two
    assert all(torch.equal(a, b) for a, b in zip(logits_one, logits_two))
