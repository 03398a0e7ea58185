"""Tokenizer and chat template from a workspace's tokenizer/ folder (tokenizers + jinja2 only)."""
from __future__ import annotations

import functools
import json
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable

from lmc.errors import LmcError, WorkspaceError, one_line
from lmc.format.paths import MAX_TOKENIZER_FILE_BYTES, confined, read_capped

NO_TEMPLATE_NOTE = ("the model has no chat template: messages are sent as plain `role: content` lines, "
                    "which a chat model may not follow (pass --chat-template FILE)")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_text(folder: Path, name: str) -> str | None:
    """A tokenizer file's text, None when absent. The folder's files are read only through paths that stay
    inside it: a link pointing out is refused, as a workspace's manifest refuses one."""
    path = folder / name
    if not path.exists() and not path.is_symlink():
        return None
    if confined(folder, name) is None:
        raise WorkspaceError(f"{path} is a link pointing outside {folder}; rebuild the workspace")
    try:
        data = read_capped(path, MAX_TOKENIZER_FILE_BYTES)  # a pipe here would block forever, /dev/zero fill memory
        if len(data) > MAX_TOKENIZER_FILE_BYTES:
            raise WorkspaceError(f"{path} is over {MAX_TOKENIZER_FILE_BYTES} bytes, more than any tokenizer file; "
                                 "rebuild the workspace")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WorkspaceError(f"{path} is not readable text ({e}); rebuild the workspace") from None


def _read_object(folder: Path, name: str) -> dict:
    """A tokenizer JSON file as an object, {} when absent; anything else is one line naming the file."""
    text = _read_text(folder, name)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise WorkspaceError(f"{folder / name} is not valid JSON ({e}); rebuild the workspace") from None
    if not isinstance(value, dict):
        raise WorkspaceError(f"{folder / name} is not a JSON object; rebuild the workspace")
    return value


def _template_of(config: dict, path: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or [{"name", "template"}, ...] (the "default" one, else
    the first); anything else is one line naming the file."""
    template = config.get("chat_template")
    if isinstance(template, list) and template and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default") or next(iter(named.values()))
    if template is None or isinstance(template, str):
        return template
    raise WorkspaceError(f"{path}'s chat_template is neither a string nor a list of named templates; rebuild the workspace")


# A template comes from a file anyone may have written: its rendering is bounded in output size, loop
# iterations and time (an unbounded one once rendered 3.7 GB in 40 s), and runs in jinja2's sandbox.
RENDER_SECONDS = 5.0
RANGE_BUDGET = 1_000_000  # loop iterations over range() per rendering
MAX_TEMPLATE_FILE_BYTES = 1 << 20  # a --chat-template FILE (real ones are a few KiB; compiling 100 MB ran for minutes)


def read_template_file(path: str | Path) -> str:
    """A --chat-template FILE's text: a regular file of at most MAX_TEMPLATE_FILE_BYTES in UTF-8 (a pipe or device
    could be read forever); anything else is one LmcError line."""
    path = Path(path)
    try:
        data = read_capped(path, MAX_TEMPLATE_FILE_BYTES)
    except OSError:
        raise LmcError(f"chat template {path} is not a regular file (a folder, a device or a pipe): "
                       "pass a Jinja template file to --chat-template") from None
    if len(data) > MAX_TEMPLATE_FILE_BYTES:
        raise LmcError(f"chat template {path} is over {MAX_TEMPLATE_FILE_BYTES} bytes; a chat template is a few KiB "
                       "of Jinja: pass the template itself")
    try:  # utf-8-sig: a leading byte-order mark would be rendered into every prompt
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LmcError(f"chat template {path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                       "pass a Jinja template file") from None


def render_limit(input_chars: int) -> int:
    """Characters a rendering may produce: the messages' size many times over, plus room for a system prompt."""
    return 16 * input_chars + (1 << 20)


_bounds = threading.local()  # this thread's rendering: .limit (characters), .range_left (range() iterations)


def render_bounded(template: str, context: dict, input_chars: int) -> str:
    """Render a chat template in the sandbox within render_limit(input_chars) characters, RANGE_BUDGET range()
    iterations and RENDER_SECONDS; anything beyond is one LmcError naming the limit."""
    import time

    import jinja2

    limit = render_limit(input_chars)
    _bounds.limit, _bounds.range_left = limit, RANGE_BUDGET
    deadline = time.monotonic() + RENDER_SECONDS
    out, size = [], 0
    try:
        for piece in _compiled(template).generate(**context):
            out.append(piece)
            size += len(piece)
            if size > limit:
                raise LmcError(f"the chat template rendered more than {limit} characters; it is broken or hostile: "
                               "fix the workspace's tokenizer/chat_template.jinja or pass --chat-template")
            if time.monotonic() > deadline:
                raise LmcError(f"the chat template took more than {RENDER_SECONDS:g} s to render; it is broken or hostile")
    except (jinja2.TemplateError, RecursionError, ArithmeticError, MemoryError, TypeError, ValueError, LookupError,
            AttributeError) as e:  # what a template's own expressions can raise ("a" + 1, x[9], ...)
        raise LmcError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None
    return "".join(out)


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """A template compiled once (a server renders the same one for every request)."""
    return _sandbox().from_string(template)


@functools.lru_cache(maxsize=1)
def _sandbox():
    """jinja2's immutable sandbox, with range() and the * and ** operators bounded by this thread's _bounds."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _bounds.limit:
                        raise jinja2.exceptions.SecurityError(f"a repetition of {len(seq) * n} items is over the limit")
            if operator == "**" and isinstance(right, int) and abs(right) > 1024:
                raise jinja2.exceptions.SecurityError("an exponent over 1024 is over the limit")
            return super().call_binop(context, operator, left, right)

    def bounded_range(*args):
        r = range(*args)
        _bounds.range_left -= len(r)
        if _bounds.range_left < 0:
            raise jinja2.exceptions.SecurityError(f"the template loops more than {RANGE_BUDGET} times")
        return r

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_tag()])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals.update(range=bounded_range, raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


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
        text = _read_text(folder, "tokenizer.json")
        if text is None:
            raise WorkspaceError(f"{folder}/tokenizer.json is missing; rebuild the workspace")
        try:
            self.tok = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise WorkspaceError(f"{folder}/tokenizer.json is not readable by the tokenizers library ({one_line(e)}); "
                                 "rebuild the workspace") from None
        self.config = _read_object(folder, "tokenizer_config.json")
        template = _read_text(folder, "chat_template.jinja")
        self.chat_template = template if template is not None else _template_of(self.config, folder / "tokenizer_config.json")
        self.generation_config = _read_object(folder, "generation_config.json")
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
        check_unicode(text)
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
        specials = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        context = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                       **{k: v for k, v in specials.items() if v is not None})
        return render_bounded(self.chat_template, context, len(json.dumps(messages, ensure_ascii=False)))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def check_unicode(text: str, what: str = "the text") -> None:
    """Refuse a str that is not Unicode text, which no tokenizer takes: a lone UTF-16 surrogate (an unpaired
    \\ud800-\\udfff JSON escape, or bytes that were not UTF-8 read with Python's surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LmcError(f"{what} holds U+{ord(text[e.start]):04X} at character {e.start}, a lone surrogate (input that "
                       "was not UTF-8, or an unpaired \\ud800-\\udfff escape in JSON), which is not text: pass valid "
                       "UTF-8") from None


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
