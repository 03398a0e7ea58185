"""Runtime vs transformers on CPU (fp32): logits of a ragged prefill and 32 decode steps, greedy tokens."""
from __future__ import annotations

import pytest
import torch
from conftest import ARCH_CASES

from lmc.compiler.convert import convert
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 31)), [3, 4], list(range(100, 170))]
STEPS = 32


def _reference(ckpt):
    from transformers import AutoModelForCausalLM

    folder = ckpt / "llama_twin" if (ckpt / "llama_twin").is_dir() else ckpt
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_logits_and_greedy_match_transformers(case, checkpoint, tmp_path):
    ckpt = checkpoint(case)
    convert(ckpt, tmp_path / "ws")
    engine = Engine(str(tmp_path / "ws"), EngineConfig(device="cpu", cache_block_seq_len=16, session_len=256))
    hf = _reference(ckpt)
    gen = GenerationConfig(max_new_tokens=STEPS, ignore_eos=True, output_logits="generation")
    with torch.no_grad():
        continuations = [hf.generate(torch.tensor([p]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)[0, len(p):].tolist()
                         for p in PROMPTS]
        ref_logits = [hf(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() for p, c in zip(PROMPTS, continuations)]

    # a ragged prefill of all prompts, then decode steps: the same greedy tokens, so the same contexts
    results = engine.generate(PROMPTS, gen)
    assert [r.token_ids for r in results] == continuations
    assert all(r.finish_reason == "length" and r.generate_token_len == STEPS for r in results)
    for r, ref in zip(results, ref_logits):
        assert r.logits.shape == ref.shape and _rel(r.logits, ref) <= 1e-4
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_dynamic_rope_past_max_positions(checkpoint, tmp_path):
    """Past max_position_embeddings, dynamic NTK rescales the base as transformers does."""
    ckpt = checkpoint("llama-dynamic", max_position_embeddings=24)
    convert(ckpt, tmp_path / "ws")
    engine = Engine(str(tmp_path / "ws"), EngineConfig(device="cpu", cache_block_seq_len=8, session_len=64))
    hf = _reference(ckpt)
    prompt = list(range(40, 70))  # 30 tokens > 24
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].float()
    (r,) = engine.generate([prompt], GenerationConfig(max_new_tokens=1, output_logits="generation"))
    assert _rel(r.logits[0], ref) <= 1e-4


def test_kv_cache_too_small_is_a_clear_error(checkpoint, tmp_path):
    from lmc.errors import LmcError

    convert(checkpoint("qwen2"), tmp_path / "ws")
    engine = Engine(str(tmp_path / "ws"), EngineConfig(device="cpu", cache_block_seq_len=16, session_len=256,
                                                       cache_max_entry_count=1.0,
                                                       cpu_cache_budget_gb=4 * 2 * 2 * 16 * 1 * 12 * 4 / 1024**3))
    assert engine.blocks.num_blocks == 4
    with pytest.raises(LmcError, match="does not fit the KV cache"):
        engine.generate([list(range(5, 70))], GenerationConfig(max_new_tokens=10))
    # three sequences that each grow to 2 blocks share 4 blocks: preemption, then recomputation
    out = engine.generate([[5, 6, 7]] * 3, GenerationConfig(max_new_tokens=20, ignore_eos=True))
    assert [r.token_ids for r in out[1:]] == [out[0].token_ids] * 2
    assert engine.scheduler.preemptions > 0 and engine.blocks.num_free == 4
    # one sequence longer than the whole cache ends with "length" when it runs out of blocks
    (r,) = engine.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=100, ignore_eos=True))
    assert r.finish_reason == "length" and r.input_token_len + r.generate_token_len == 4 * 16 + 1  # + the last token, sampled
