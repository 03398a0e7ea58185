"""`lmc quantize --method awq-autoround`: the tuned quantizer against RTN, its tuning lowering the layer's error,
recorded, reproducible, evaluable."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import cli_ppl

from lmc.compiler import autoround
from lmc.compiler.pack import dequantize_int4, quantize_int4
from lmc.compiler.quantize import QuantizeOptions, quantize
from lmc.errors import LmcError
from lmc.format.workspace import Workspace

SMALL = dict(calib_samples=6, calib_seqlen=48, w_group_size=32, batch_size=4, search_samples=4, device="cpu")


def _quiet(*_):
    pass


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_identity_rounding_is_round_to_nearest():
    """V = 0 and factors 1 give pack.quantize_int4's codes, scales and zeros (K=80: a partial group)."""
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(1))
    codes, scales, zeros = autoround.final_codes(w, autoround.Rounding.identity(w, 32), 32, torch.float32)
    want = quantize_int4(w, 32)
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1]) and torch.equal(zeros, want[2])
    got16 = autoround.final_codes(w, autoround.Rounding.identity(w, 32), 32, torch.float16)[1]
    assert torch.equal(got16, got16.half().float())  # scales as stored


def test_offsets_move_codes_and_factors_clip():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    r = autoround.Rounding.identity(w, 32)
    base = autoround.final_codes(w, r, 32, torch.float32)
    r.offset += 0.5
    up = autoround.final_codes(w, r, 32, torch.float32)
    assert (up[0].int() >= base[0].int()).all() and (up[0] != base[0]).float().mean() > 0.3
    r = autoround.Rounding.identity(w, 32)
    r.high *= 0.5
    r.low *= 0.5
    clipped = autoround.final_codes(w, r, 32, torch.float32)
    assert torch.allclose(clipped[1], base[1] * 0.5, rtol=1e-6)


def test_tuning_lowers_the_layer_error():
    """A two-linear block y = W2 relu(W1 x): the tuned rounding's output error on the calibration windows is
    below round-to-nearest's (which is where tuning starts), and codes differ from RTN's."""
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g) / 4
    x = torch.randn(16, 8, 32, generator=g) * torch.linspace(0.1, 3, 32)  # [n, S, K], uneven channels

    def forward(ws, xb):
        return torch.relu(xb @ ws["w1"].t()) @ ws["w2"].t()

    weights = {"w1": w1, "w2": w2}
    target = forward(weights, x)
    rounding, log = autoround.tune(forward, weights, x, target, 32, torch.float32, iters=100, batch=16)

    def error(rs):
        return float((forward({k: autoround.fake_quantize(w, rs[k], 32) for k, w in weights.items()}, x) - target).pow(2).mean())

    rtn = error({k: autoround.Rounding.identity(w, 32) for k, w in weights.items()})
    tuned = error(rounding)
    assert tuned < 0.95 * rtn, (tuned, rtn)
    assert log["loss"] <= log["loss_identity"]
    rtn_w1 = dequantize_int4(*quantize_int4(w1, 32), 32)
    assert not torch.equal(autoround.fake_quantize(w1, rounding["w1"], 32), rtn_w1)


def test_awq_autoround_is_recorded_reproducible_and_evaluable(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")  # K=72: partial groups of 32
    opts = QuantizeOptions(**SMALL, method="awq-autoround", workspace=True)
    summary = quantize(ckpt, tmp_path / "a", opts, say=_quiet)
    quantize(ckpt, tmp_path / "b", opts, say=_quiet)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert summary["method"] == "awq-autoround"
    for layer in summary["layers"]:
        assert layer["tuning"]["loss"] < layer["tuning"]["loss_identity"], layer["tuning"]
    ws = Workspace(tmp_path / "a")
    assert ws.quantization["method"] == "awq-autoround"
    assert ws.manifest["provenance"]["quantization"]["method"] == "awq-autoround"
    assert cli_ppl(tmp_path / "a") > 1


def test_awq_autoround_needs_the_search_and_the_cpu(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    for flags in (dict(calib_samples=0), dict(search_scale=False)):
        with pytest.raises(LmcError, match="--method awq-autoround needs calibration"):
            quantize(ckpt, tmp_path / "x", QuantizeOptions(**{**SMALL, **flags, "method": "awq-autoround"}), say=_quiet)
    if torch.cuda.is_available():
        with pytest.raises(LmcError, match="--device cpu"):
            quantize(ckpt, tmp_path / "x", QuantizeOptions(**{**SMALL, "device": "cuda", "method": "awq-autoround"}), say=_quiet)


def test_memory_prediction_counts_the_tuning():
    from lmc.compiler.memory import SourceRead, predict
    from lmc.format.archs import model_config_from_hf

    cfg = model_config_from_hf(dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    read = SourceRead(file_bytes=10**8, itemsize=2, temporaries=0)
    awq, tuned = (predict(cfg, 128, 512, 8, 4, 128, torch.device("cpu"), torch.float32, torch.float16, read,
                          held=(2**28, 2**28), tune_batch=b).host_bytes for b in (0, autoround.BATCH))
    assert tuned - awq >= 2 * 128 * 512 * 576 * 4  # the quantized stream's input and output of every window
