"""The Python API: `pipeline(path, backend_config=EngineConfig(...))`, as LMDeploy spells it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from lmc.errors import LmcError
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine, Response
from lmc.runtime.sampling import GenerationConfig


def resolve_workspace(path: str | os.PathLike) -> Path:
    """A workspace as is; an HF folder or GGUF file converted once into a cached workspace (as
    `lmdeploy chat` accepts an HF folder): see lmc.cache."""
    path = Path(path)
    if (path / "lmc.json").is_file():
        return path
    if not path.exists():
        raise LmcError(f"{path} does not exist; pass a workspace, a Hugging Face model folder or a .gguf file")
    from lmc.cache import cached_workspace

    return cached_workspace(path)


Prompt = str | list[dict]


class Pipeline:
    def __init__(self, model_path: str | os.PathLike, backend_config: EngineConfig | None = None):
        self.engine = Engine(str(resolve_workspace(model_path)), backend_config)
        self.tokenizer = self.engine.tokenizer

    def encode(self, prompt: Prompt, chat_template: bool = True) -> list[int]:
        """A string is one user turn under the model's chat template; a list is the messages."""
        if isinstance(prompt, str) and not chat_template:
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.encode_chat(messages)

    def __call__(self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | None = None,
                 chat_template: bool = True) -> Response | list[Response]:
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        out = self.engine.generate([self.encode(p, chat_template) for p in batch], gen_config)
        return out[0] if single else out

    def stream_infer(self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | None = None,
                     chat_template: bool = True) -> Iterator[tuple[int, str, str | None]]:
        """Yield (index, text delta, finish_reason) as tokens come (runs generation in a thread)."""
        import queue
        import threading

        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        ids = [self.encode(p, chat_template) for p in batch]
        q: queue.Queue = queue.Queue()
        errors = []

        def work():
            try:
                self.engine.generate(ids, gen_config, on_delta=lambda i, d, t, f: q.put((i, d, f)))
            except Exception as e:  # handed to the consumer below
                errors.append(e)
            finally:
                q.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (item := q.get()) is not None:
            yield item
        thread.join()
        if errors:
            raise errors[0]


def pipeline(model_path: str | os.PathLike, backend_config: EngineConfig | None = None) -> Pipeline:
    return Pipeline(model_path, backend_config)
