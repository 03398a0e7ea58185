"""The L2 prefetch before the PDL wait (kernels/l2_prefetch.py): the programs' pieces cover a weight exactly once,
the float GEMV asks for it only for small contiguous weights with PDL on, the compiled kernel issues it before
griddepcontrol.wait, and on a GPU it changes no output bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import load_bench

from lmc.errors import LmcError
from lmc.kernels import gemv, l2_prefetch

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _pieces_kernel(start_ptr, size_ptr, total_bytes, PARTS: tl.constexpr):
    share = tl.program_id(0)
    start, size = l2_prefetch.prefetch_parts(total_bytes, share, tl.num_programs(0), PARTS)
    offs = share * PARTS + tl.arange(0, PARTS)  # [PARTS]
    tl.store(start_ptr + offs, start)
    tl.store(size_ptr + offs, size)


@pytest.mark.parametrize("units,shares,parts", [(12345, 7, 32), (50, 132, 32), (1_000_003, 5, 64), (3, 1, 128)])
def test_pieces_cover_the_weight_once(units, shares, parts):
    """Sorted by start, the non-empty pieces of all programs tile [0, total) with whole 16-byte units, and each
    program's pieces lie inside its own share."""
    total = 16 * units
    start = torch.full((shares * parts,), -1, dtype=torch.int64)
    size = torch.full((shares * parts,), -1, dtype=torch.int64)
    _pieces_kernel[(shares,)](start, size, total, PARTS=parts)
    assert bool((start % 16 == 0).all()) and bool((size % 16 == 0).all()) and bool((size >= 0).all())
    owner = torch.arange(shares).repeat_interleave(parts)  # [shares * parts]
    share_lo, share_hi = owner * units // shares * 16, (owner + 1) * units // shares * 16
    assert bool((start >= share_lo).all()) and bool((start + size <= share_hi).all())
    keep = size > 0
    order = torch.argsort(start[keep])
    s, n = start[keep][order], size[keep][order]
    assert s[0].item() == 0 and (s + n)[-1].item() == total
    assert torch.equal(s[1:], (s + n)[:-1])  # no gap, no overlap


def test_pieces_only_for_small_contiguous_weights_with_pdl(monkeypatch):
    w = torch.empty(64, 1024, dtype=torch.float16)  # 128 KiB
    monkeypatch.setattr(l2_prefetch, "PREFETCH_MIB", 1.0)
    assert l2_prefetch.prefetch_pieces(w, 4) == 0  # on the CPU: no PDL
    monkeypatch.setattr(l2_prefetch, "pdl_enabled", lambda device: True)
    assert l2_prefetch.prefetch_pieces(w, 4) == 128 and l2_prefetch.prefetch_pieces(w, 1) == 32
    assert l2_prefetch.prefetch_pieces(w[:, :1000], 4) == 0  # not contiguous
    assert l2_prefetch.prefetch_pieces(torch.empty(2**20, dtype=torch.float16), 4) == 0  # 2 MiB > the cap
    monkeypatch.setattr(l2_prefetch, "PREFETCH_MIB", 0.0)
    assert l2_prefetch.prefetch_pieces(w, 4) == 0  # LMC_L2_PREFETCH_MB=0: off


@pytest.mark.parametrize("value,cap", [(None, 16.0), ("0", 0.0), ("8.5", 8.5), ("lots", None), ("-1", None),
                                       ("nan", None)])
def test_the_cap_comes_from_the_environment_or_one_clear_error(monkeypatch, value, cap):
    if value is None:
        monkeypatch.delenv("LMC_L2_PREFETCH_MB", raising=False)
    else:
        monkeypatch.setenv("LMC_L2_PREFETCH_MB", value)
    l2_prefetch._env_cap_mib.cache_clear()
    try:
        if cap is None:
            with pytest.raises(LmcError, match="LMC_L2_PREFETCH_MB=.*number of MiB") as info:
                l2_prefetch.prefetch_pieces(torch.empty(64, dtype=torch.float16), 4)
            assert "\n" not in str(info.value)
        else:
            assert l2_prefetch._env_cap_mib() == cap
    finally:
        l2_prefetch._env_cap_mib.cache_clear()


def _compile_sm90():
    return load_bench("compile_decode_sm90.py")


def _captured(module, name: str, call):
    """The (args, kwargs) of the one launch of module.name that call() makes, with PDL on."""
    compiler = _compile_sm90()
    fn, capture = getattr(module, name), compiler._Capture()
    setattr(module, name, capture)
    try:
        call()
    finally:
        setattr(module, name, fn)
    (args, kwargs), = capture.launches
    kwargs["PDL"] = True
    return compiler, fn, args, kwargs


def prefetch_in_ptx() -> dict:
    """sm_90 PTX facts of the float GEMV compiled with PREFETCH (one piece a thread) and without (run with
    TRITON_INTERPRET=0: the compiler needs the kernels as JIT functions)."""
    x, w = torch.zeros(1, 4096, dtype=torch.float16), torch.zeros(4096, 4096, dtype=torch.float16)
    compiler, fn, args, kwargs = _captured(gemv, "_gemv_kernel", lambda: gemv.gemv_triton(x, w))
    facts = {}
    for pieces in (32 * kwargs["num_warps"], 0):
        ptx = compiler.compile_launch(fn, args, {**kwargs, "PREFETCH": pieces}).asm["ptx"]
        facts[str(pieces)] = {"prefetches": ptx.count("cp.async.bulk.prefetch.L2.global"),
                              "before_wait": ptx.find("cp.async.bulk.prefetch") < ptx.index("griddepcontrol.wait")}
    return facts


def test_compiled_gemv_prefetches_before_the_pdl_wait():
    """sm_90 PTX of the float GEMV with PREFETCH: one predicated bulk L2 prefetch, ahead of griddepcontrol.wait;
    with PREFETCH 0 none."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
    if run.returncode == 3:
        pytest.skip(f"cannot compile for sm_90 here: {run.stdout.strip()}")
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    (on_key, on), (_, off) = sorted(facts.items(), key=lambda kv: -int(kv[0]))
    assert int(on_key) > 0 and on == {"prefetches": 1, "before_wait": True}, facts
    assert off["prefetches"] == 0, facts


@pytest.mark.gpu
def test_prefetch_changes_no_output_bit_on_cuda(monkeypatch):
    """The float GEMV at tp 2's wo shape and a plain one, prefetch on and off: the same bits."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs sm_90 (PDL, cp.async.bulk.prefetch)")
    torch.manual_seed(0)
    for n, k, silu in ((4096, 2048, False), (2 * 1000, 4096, True)):
        x = torch.randn(1, k, device="cuda").half()
        w = torch.randn(n, k, device="cuda").half()
        monkeypatch.setattr(l2_prefetch, "PREFETCH_MIB", 0.0)
        off = gemv.gemv_triton(x, w, 8, 512, 8, silu_mul=silu)
        monkeypatch.setattr(l2_prefetch, "PREFETCH_MIB", 64.0)
        assert l2_prefetch.prefetch_pieces(w, 8) == 256
        on = gemv.gemv_triton(x, w, 8, 512, 8, silu_mul=silu)
        torch.cuda.synchronize()
        assert torch.equal(on, off), (n, k, silu)


if __name__ == "__main__":  # the compile test's subprocess: python tests/test_l2_prefetch.py
    try:
        facts = prefetch_in_ptx()
    except FileNotFoundError as exc:  # a Triton without the CUDA back end's ptxas
        print(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        sys.exit(3)
    print(json.dumps(facts))
