"""Tokenizer and chat template from a workspace's tokenizer/ folder (tokenizers + jinja2 only)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Callable

from lmc.errors import WorkspaceError

NO_TEMPLATE_NOTE = ("the model has no chat template: messages are sent as plain `role: content` lines, "
                    "which a chat model may not follow (pass --chat-template FILE)")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _generation_tag():
    """transformers' `{% generation %}...{% endgeneration %}` (it marks the assistant's tokens for
    training masks): the body renders as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return GenerationTag


class Tokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise WorkspaceError(f"{folder}/tokenizer.json is missing; rebuild the workspace")
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template_path = folder / "chat_template.jinja"
        self.chat_template = template_path.read_text() if template_path.is_file() else self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        gen_path = folder / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        # called once, with NO_TEMPLATE_NOTE, the first time a chat is rendered without a template (front ends warn)
        self.on_missing_template: Callable[[str], None] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    def eos_ids(self, model_eos: tuple[int, ...]) -> set[int]:
        """EOS ids from the model config, generation_config.json and tokenizer_config.json."""
        ids = set(model_eos)
        gen = self.generation_config.get("eos_token_id")
        ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        eos = self.token_id(self.eos_token)
        if eos is not None:
            ids.add(eos)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered as transformers' apply_chat_template(tokenize=False) does."""
        if not self.chat_template:
            if self.on_missing_template is not None:
                self.on_missing_template(NO_TEMPLATE_NOTE)
                self.on_missing_template = None
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_tag()])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        specials = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          **{k: v for k, v in specials.items() if v is not None})

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-4:])  # a little context so leading spaces decode as in the full text
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
