"""The Python API, as LMDeploy spells it: `pipeline(path, backend_config=...)`, then call it, stream it or chat.

    with pipeline("./ws", backend_config=TurbomindEngineConfig(session_len=4096)) as pipe:
        print(pipe(["Hi, please introduce yourself", "Shanghai is"], GenerationConfig(max_new_tokens=64)))
        for item in pipe.stream_infer("Tell me a story"):
            print(item.text, end="")

Prompts are a string (one user turn under the model's chat template), a list of messages
(`[{"role": ..., "content": ...}]`), or a list of either for a batch. A vision-language workspace (LLaVA) also
takes `(text, image)` or `(text, [images])` tuples, as LMDeploy spells them, and messages whose content holds
`{"type": "image_url", "image_url": {"url": ...}}` parts; an image is a PIL image, a path, a URL or a data URL
(`lmc.vl.load_image`):

    pipe(("describe this image", load_image("cat.jpg")))
    pipe([("what is this?", "a.png"), ("and this?", "b.png")])
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from lmc.errors import LmcError
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine, Response, merge_outputs
from lmc.runtime.sampling import GenerationConfig
from lmc.runtime.vision import image_parts, multimodal_prompt


def resolve_workspace(path: str | os.PathLike) -> Path:
    """A workspace as is; an HF folder or GGUF file converted once into a cached workspace (as
    `lmdeploy chat` accepts an HF folder): see lmc.cache."""
    if not isinstance(path, (str, os.PathLike)):
        raise LmcError(f"a model path is a string or a path, got {type(path).__name__}")
    text, path = os.fspath(path), Path(path)
    if (path / "lmc.json").is_file():
        return path
    if not path.exists():
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(text)):  # Path() folds "ftp://h" into "ftp:/h"
            raise LmcError(f"{text} is a URL of a scheme lmc does not serve from; a server is http:// or https://, "
                           "a model a local path")
        raise LmcError(f"{path} does not exist; pass a workspace, a Hugging Face model folder or a .gguf file")
    from lmc.cache import cached_workspace

    return cached_workspace(path)


Prompt = str | list[dict] | tuple


def _is_single(prompts) -> bool:
    return isinstance(prompts, (str, tuple)) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict))


@dataclass
class Session:
    """A conversation for `Pipeline.chat`: the turns so far and the last reply."""

    history: list[tuple[str, str]] = field(default_factory=list)  # (user prompt, assistant reply)
    response: Response | None = None

    def messages(self, prompt: str) -> list[dict]:
        out = []
        for user, assistant in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out + [{"role": "user", "content": prompt}]


class Pipeline:
    def __init__(self, model_path: str | os.PathLike, backend_config: EngineConfig | None = None):
        if backend_config is not None and not isinstance(backend_config, EngineConfig):
            raise LmcError(f"backend_config is a TurbomindEngineConfig (lmc's EngineConfig), got "
                           f"{type(backend_config).__name__}")
        self.engine = Engine(str(resolve_workspace(model_path)), backend_config)
        self.tokenizer = self.engine.tokenizer

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, chat_template: bool = True) -> list[int]:
        """A string is one user turn under the model's chat template (raw text with chat_template=False);
        a list is the messages."""
        return self.encode_with_images(prompt, chat_template)[0]

    def encode_with_images(self, prompt: Prompt, chat_template: bool = True) -> tuple[list[int], list]:
        """Token ids and the placed images (lmc.runtime.vision) of a prompt; a `(text, image or [images])` tuple
        is one user turn with the images before the text."""
        if isinstance(prompt, tuple):
            if len(prompt) != 2 or not isinstance(prompt[0], str):
                raise LmcError("an image prompt is a (text, image) or (text, [images]) tuple")
            images = prompt[1] if isinstance(prompt[1], list) else [prompt[1]]
            prompt = [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
                       + [{"type": "text", "text": prompt[0]}]}]
        if isinstance(prompt, list) and any(image_parts(m.get("content")) for m in prompt if isinstance(m, dict)):
            from lmc.vl import message_images

            images = message_images(prompt)
            return multimodal_prompt(self.tokenizer, self.engine.workspace.vision, prompt, images)
        return self._encode_text(prompt, chat_template), []

    def _encode_text(self, prompt: Prompt, chat_template: bool) -> list[int]:
        if isinstance(prompt, str) and not chat_template:
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (str, list)):
            raise LmcError(f"a prompt is a string or a list of messages, got {type(prompt).__name__}")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.encode_chat(messages)

    def _batch(self, prompts, gen_config, chat_template: bool):
        """(token ids, config, prompt index) per sequence; a config with n > 1 runs n sequences per prompt."""
        if not isinstance(prompts, (str, tuple, list)):
            raise LmcError(f"prompts are a string, a list of messages, a (text, image) tuple or a list of these, "
                           f"got {type(prompts).__name__}")
        batch = [prompts] if _is_single(prompts) else list(prompts)
        if isinstance(gen_config, list):
            if len(gen_config) != len(batch):
                raise LmcError(f"{len(batch)} prompts but {len(gen_config)} generation configs: "
                               "pass one config, or one per prompt")
            gens = gen_config
        else:
            gens = [gen_config or GenerationConfig()] * len(batch)
        for g in gens:
            if not isinstance(g, GenerationConfig):
                raise LmcError(f"gen_config is a GenerationConfig (or a list of them, one per prompt), got {type(g).__name__}")
        ids, configs, owner, images = [], [], [], []
        for i, (p, g) in enumerate(zip(batch, gens)):
            g.check()
            encoded, placed = self.encode_with_images(p, chat_template)
            for k in range(g.n):
                seed = None if g.random_seed is None else g.random_seed + k
                ids.append(encoded)
                configs.append(replace(g, random_seed=seed) if g.n > 1 else g)
                owner.append(i)
                images.append(placed)
        return ids, configs, owner, images

    # ------------------------------------------------------------------ LMDeploy's pipeline API
    def __call__(self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | list[GenerationConfig] | None = None,
                 chat_template: bool = True) -> Response | list[Response]:
        """Generate for one prompt (-> Response) or a batch (-> list[Response], n per prompt with n > 1)."""
        ids, configs, owner, images = self._batch(prompts, gen_config, chat_template)
        outputs = [[] for _ in ids]
        for i, out in self.engine.stream(ids, configs, images):
            outputs[i].append(out)
        responses = [merge_outputs(outs, owner[i]) for i, outs in enumerate(outputs)]
        return responses[0] if _is_single(prompts) and len(responses) == 1 else responses

    def stream_infer(self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | list[GenerationConfig] | None = None,
                     chat_template: bool = True) -> Iterator[Response]:
        """Yield a Response per step and sequence as tokens come: `.text` is the new text, `.index` the
        prompt's position, `.finish_reason` set on the last one. Leaving the loop early aborts the rest."""
        ids, configs, owner, images = self._batch(prompts, gen_config, chat_template)
        for i, out in self.engine.stream(ids, configs, images):
            yield Response(out.text, out.num_generated_tokens, out.num_prompt_tokens, out.finish_reason, out.token_ids,
                           out.logprobs, owner[i])

    def chat(self, prompt: str, session: Session | None = None, gen_config: GenerationConfig | None = None,
             stream_response: bool = False) -> Session:
        """One turn of a conversation: returns the session with the reply in `.response` and the turn in `.history`."""
        session = session or Session()
        response = self(session.messages(prompt), gen_config)
        session.history.append((prompt, response.text))
        session.response = response
        return session

    def close(self) -> None:
        """Stop the engine (abort what is running, free the KV cache, end the other tensor-parallel ranks)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipeline(model_path: str | os.PathLike, backend_config: EngineConfig | None = None, **kwargs) -> Pipeline:
    """LMDeploy's `pipeline(model_path, backend_config=...)`. Other keyword arguments LMDeploy takes
    (log_level, chat_template_config, ...) are accepted and ignored, except where lmc cannot honour them."""
    unsupported = {k for k, v in kwargs.items() if k not in ("log_level", "max_log_len") and v is not None}
    if unsupported:
        raise LmcError(f"pipeline() does not take {sorted(unsupported)} in lmc")
    return Pipeline(model_path, backend_config)
