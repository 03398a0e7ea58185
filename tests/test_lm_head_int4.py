"""--lm-head int4: the float lm_head quantized at load (RTN, lmc-int4-k8). The logits are exactly those of the
round-to-nearest weight, blockwise quantization equals one pass, the embedding of a tied model stays float,
the flag reaches the engine and `lmc eval ppl`, and a bad value is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.format.int4 import quantize_int4
from lmc.format.workspace import Workspace
from lmc.runtime import model as M
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig


def _rtn(w: torch.Tensor, group: int) -> torch.Tensor:
    """The round-to-nearest weight [N, K] in float32, written out from the codes (the test's reference)."""
    codes, scales, zeros = quantize_int4(w, group)  # [N, K], [N, ng], [N, ng]
    k = w.shape[1]
    return (codes.float() - zeros.repeat_interleave(group, 1)[:, :k]) * scales.repeat_interleave(group, 1)[:, :k]


@pytest.mark.parametrize("v,h,group", [(75, 200, 64), (40, 72, 128), (33, 256, 128)])
def test_quantized_head_is_the_rtn_weight_in_row_blocks(v, h, group, monkeypatch):
    # partial groups (200 = 3 x 64 + 8; 72 < 128), vocabularies off every block
    w = torch.randn(v, h, generator=torch.Generator().manual_seed(v)) * 0.05  # [V, H]
    x = torch.randn(5, h)  # [B, H]
    whole = M.quantize_lm_head(w, group, torch.float32)
    monkeypatch.setattr(M, "_QUANTIZE_ROWS", 16)  # blocks of 16 rows, the last one partial
    blocks = M.quantize_lm_head(w, group, torch.float32)
    assert isinstance(blocks, M.Int4Weight) and blocks.out_features == v
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(blocks, name), getattr(whole, name))
    ref = x @ _rtn(w, group).t()  # [B, V]
    torch.testing.assert_close(M.linear(x, blocks), ref, rtol=1e-5, atol=1e-5)
    dense = M.quantize_lm_head(w, group, torch.float32, dense=True)  # the CPU's path: the same weight, in float
    torch.testing.assert_close(dense, _rtn(w, group), rtol=0, atol=1e-6)
    assert (dense - w).abs().max() > 0  # it is quantized, not the float weight back


@pytest.mark.parametrize("case", ["llama3", "llama-linear-tied-mha"])
def test_model_logits_use_the_rtn_head_and_the_embedding_stays_float(case, checkpoint, tmp_path):
    convert(checkpoint(case), tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    cpu = torch.device("cpu")
    plain, int4 = M.Model(ws, cpu, torch.float32), M.Model(ws, cpu, torch.float32, lm_head="int4")
    assert torch.equal(int4.embed, plain.embed)  # tied: the head is quantized apart, the lookup table unchanged
    h = torch.randn(3, plain.cfg.hidden_size)  # [B, H]
    torch.testing.assert_close(int4.logits(h), h @ _rtn(plain.lm_head, M.LM_HEAD_GROUP).t(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(int4.logits(h), plain.logits(h), rtol=1e-4, atol=1e-4)


def test_an_int4_workspace_quantizes_its_head_in_its_own_group_size(checkpoint, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    opts = QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True, device="cpu")  # RTN
    quantize(checkpoint("llama3"), tmp_path / "q", opts, say=lambda *a: None, warn=lambda *a: None)
    ws = Workspace(tmp_path / "q")
    model = M.Model(ws, torch.device("cpu"), torch.float32, lm_head="int4")
    h = torch.randn(2, model.cfg.hidden_size)  # [B, H]
    head = ws.get("output.weight").float()  # [V, H]
    torch.testing.assert_close(model.logits(h), h @ _rtn(head, 32).t(), rtol=1e-5, atol=1e-5)


def test_engine_takes_the_setting_and_refuses_other_values(checkpoint, tmp_path):
    convert(checkpoint("llama3"), tmp_path / "ws")
    gen = GenerationConfig(max_new_tokens=3, ignore_eos=True, output_logits="generation")
    logits = {}
    for head in ("float", "int4"):
        engine = Engine(str(tmp_path / "ws"), EngineConfig(device="cpu", cpu_cache_budget_gb=0.05, threads=1,
                                                           lm_head=head))
        try:
            assert isinstance(engine.model.lm_head, torch.Tensor)  # the CPU runs the quantized head dense
            logits[head] = engine.generate([[5, 6, 7]], gen)[0].logits  # [3, V]
        finally:
            engine.close()
    assert logits["int4"].shape == logits["float"].shape and not torch.allclose(logits["int4"], logits["float"])
    with pytest.raises(LmcError, match="lm_head='int8' is not an lm_head precision"):
        EngineConfig(lm_head="int8").check()


def test_eval_ppl_cli_reports_the_int4_head(checkpoint, tmp_path):
    convert(checkpoint("llama3"), tmp_path / "ws")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)), encoding="utf-8")
    env = {**os.environ, "LMC_CACHE": str(tmp_path / "cache")}

    def ppl(*extra):
        run = subprocess.run([sys.executable, "-m", "lmc", "eval", "ppl", str(tmp_path / "ws"), "--dataset", str(text),
                              "--seqlen", "32", "--max-windows", "3", "--device", "cpu", "--json", *extra],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    plain, int4 = ppl(), ppl("--lm-head", "int4")
    assert plain["lm_head"] == "float" and int4["lm_head"] == "int4"
    assert int4["ppl"] != plain["ppl"] and abs(int4["ppl"] / plain["ppl"] - 1) < 0.2
    bad = subprocess.run([sys.executable, "-m", "lmc", "eval", "ppl", str(tmp_path / "ws"), "--lm-head", "int8"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "'int8' is not one of 'float', 'int4'" in bad.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("v,h", [(4096, 4096), (4104, 576), (1000, 1000)])
def test_quantized_head_on_cuda(v, h):
    """On the GPU in fp16: the mma layout where the shape takes it (4096 x 4096), the table's other paths
    elsewhere (N off 16, a partial group); logits at batch 1 and 16 against the RTN weight in float32."""
    if not torch.cuda.is_available() or os.environ["TRITON_INTERPRET"] == "1":
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    w = (torch.randn(v, h, generator=torch.Generator().manual_seed(h)) * 0.05).half().cuda()  # [V, H]
    head = M.quantize_lm_head(w, 128, torch.float16)
    assert isinstance(head, M.Int4Weight) and (head.mma is not None) == (v % 16 == 0 and h % 128 == 0)
    ref_w = _rtn(w.cpu(), 128).cuda()  # [V, H] float32, from the same fp16 weight
    for b in (1, 16):
        x = torch.randn(b, h, device="cuda").half()  # [B, H]
        ref = x.float() @ ref_w.t()  # [B, V]
        got = M.linear(x, head).float()
        assert ((got - ref).norm() / ref.norm()).item() < 5e-3
