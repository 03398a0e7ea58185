"""`lmc quantize --method awq-gptq`: GPTQ rounding against RTN and brute force, recorded, reproducible, evaluable."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_ppl

from lmc.compiler import gptq
from lmc.compiler.pack import dequantize_int4, quantize_int4
from lmc.compiler.quantize import QuantizeOptions, quantize
from lmc.errors import LmcError
from lmc.format.workspace import Workspace

SMALL = dict(calib_samples=6, calib_seqlen=48, w_group_size=32, batch_size=4, search_samples=4, device="cpu")


def _quiet(*_):
    pass


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _correlated(t: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(t, k, generator=g) @ mix * torch.linspace(0.2, 3, k)  # [T, K]


def test_uncorrelated_inputs_give_round_to_nearest():
    """With H diagonal no error is fed forward: GPTQ's codes, scales and zeros are RTN's (K=80: a partial group)."""
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(1))
    h = torch.diag(torch.linspace(0.5, 2, 80)).double()
    codes, scales, zeros = gptq.gptq_quantize(w, h, 32, torch.float32)
    want = quantize_int4(w, 32)
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1]) and torch.equal(zeros, want[2])


def _reference_gptq(w: torch.Tensor, h: torch.Tensor, g: int) -> torch.Tensor:
    """GPTQ from the OBS update with the inverse Hessian of the remaining columns recomputed column by
    column (no Cholesky, no lazy blocks): the dequantized weights."""
    k = w.shape[1]
    h = h + torch.eye(k, dtype=h.dtype) * gptq.DAMP * torch.diagonal(h).mean()
    wq, hinv, out = w.double().clone(), torch.linalg.inv(h), torch.empty_like(w)
    for j in range(k):
        if j % g == 0:
            _, s, z = quantize_int4(wq[:, j:j + g].float(), g)
            s, z = s[:, 0].double(), z[:, 0].double()
        q = ((torch.round(wq[:, j] / s) + z).clamp(0, 15) - z) * s
        out[:, j] = q.float()
        e = (wq[:, j] - q) / hinv[0, 0]
        wq[:, j + 1:] -= e[:, None] * hinv[0, 1:][None, :]
        hinv = hinv[1:, 1:] - hinv[1:, :1] @ hinv[:1, 1:] / hinv[0, 0]
    return out


@pytest.mark.parametrize("k", [96, 80])
def test_matches_the_column_by_column_reference_and_beats_round_to_nearest(k):
    """Lazy 32-column blocks over the Cholesky factor give GPTQ's sequential OBS updates (K=80: a partial group)."""
    x = _correlated(512, k, 2)
    w = torch.randn(16, k, generator=torch.Generator().manual_seed(3))
    h = gptq.HessianSum()
    for part in x.split(100):
        h.add(part)
    want = (x.double().t() @ x.double()) / 512
    assert torch.allclose(h.mean(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    codes, scales, zeros = gptq.gptq_quantize(w, h.mean(), 32, torch.float32)
    got = dequantize_int4(codes, scales, zeros, 32)
    ref = _reference_gptq(w, h.mean(), 32)
    assert torch.isclose(got, ref, rtol=1e-5, atol=1e-6).float().mean() > 0.99  # float-order ties may round a few the other way
    err = lambda q: float((x @ (q - w).t()).pow(2).mean())  # noqa: E731
    rtn_err = err(dequantize_int4(*quantize_int4(w, 32), 32))
    assert err(got) < 0.9 * rtn_err and abs(err(got) - err(ref)) < 0.02 * err(ref), (err(got), err(ref), rtn_err)
    codes16, scales16, _ = gptq.gptq_quantize(w, h.mean(), 32, torch.float16)
    assert torch.equal(scales16, scales16.half().float()) and not torch.equal(scales16, scales)  # fed back as stored


def test_scaled_input_hessian():
    x, s = _correlated(64, 8, 4), torch.linspace(0.5, 2, 8)
    h = gptq.HessianSum()
    h.add(x)
    xs = (x / s).double()
    want = xs.t() @ xs / 64
    assert torch.allclose(h.mean(s), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_awq_gptq_is_recorded_reproducible_and_evaluable(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")  # K=72: partial groups of 32
    summary = quantize(ckpt, tmp_path / "a", QuantizeOptions(**SMALL, method="awq-gptq", workspace=True), say=_quiet)
    quantize(ckpt, tmp_path / "b", QuantizeOptions(**SMALL, method="awq-gptq", workspace=True), say=_quiet)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert summary["method"] == "awq-gptq"
    ws = Workspace(tmp_path / "a")
    assert ws.quantization["method"] == "awq-gptq"
    prov = ws.manifest["provenance"]
    assert prov["quantization"]["method"] == "awq-gptq", prov
    assert cli_ppl(tmp_path / "a") > 1


def test_awq_gptq_needs_the_search(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    for flags in (dict(calib_samples=0), dict(search_scale=False)):
        with pytest.raises(LmcError, match="--method awq-gptq needs calibration"):
            quantize(ckpt, tmp_path / "x", QuantizeOptions(**{**SMALL, **flags, "method": "awq-gptq"}), say=_quiet)
    proc = subprocess.run([sys.executable, "-m", "lmc", "quantize", str(ckpt), "-o", str(tmp_path / "y"), "--method", "gptq"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--method" in proc.stderr


def test_memory_prediction_counts_the_hessians():
    from lmc.compiler.memory import SourceRead, predict
    from lmc.format.archs import model_config_from_hf

    cfg = model_config_from_hf(dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    read = SourceRead(file_bytes=10**8, itemsize=2, temporaries=0)
    awq, gptq_run = (predict(cfg, 128, 512, 8, 4, 128, torch.device("cpu"), torch.float32, torch.float16, read,
                             held=(2**28, 2**28), gptq=flag).host_bytes for flag in (False, True))
    assert gptq_run - awq >= 8 * (3 * 576**2 + 1536**2) + 4 * 8 * 1536**2  # float64 X^T X of 4 inputs, one inverse
