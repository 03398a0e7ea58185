"""The OpenAI request bodies lmc accepts, their translation into GenerationConfig, and the
response pieces (choices, chunks, usage, logprobs) as OpenAI spells them.

Types are strict (`"max_tokens": "5"` or `true` is refused, not coerced); fields lmc does not
know are ignored, as OpenAI-compatible servers do; `null` means "the default".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmc.errors import LmcError
from lmc.runtime.sampling import MAX_N, SEED_RANGE, GenerationConfig, Logprob

MAX_CHOICES = 1024  # choices per call, over all its prompts (each is an engine request holding its prompt)
MAX_STOP = 64  # stop strings a request may send: each is checked on every token, with the engine's lock held
MAX_TEMPLATE_CHARS = 64 * 1024  # a request's chat_template: compiling one takes time and memory in proportion
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

# GenerationConfig field -> the request field a user wrote (for error messages)
_API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "random_seed": "seed",
              "stop_words": "stop", "logprobs": "top_logprobs"}


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str  # a data URL, http(s) when the server can reach it, a local path under --allowed-local-media-path
    detail: str | None = None  # accepted and ignored


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(_Strict):
    role: str
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None

    def as_template_input(self) -> dict:
        """The message for the chat template: text joined; with images, the parts as lmc.runtime.vision takes them."""
        if isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content):
            return {"role": self.role, "content": [p.model_dump(exclude_none=True) for p in self.content]}
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": text}


class SamplingFields(_Strict):
    """Fields shared by both endpoints: OpenAI's, then lmc's extras (LMDeploy's names)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # default 1.0; 0: greedy
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None  # accepted when 0: lmc has repetition_penalty instead
    presence_penalty: float | None = None
    user: str | None = None
    # lmc extras
    top_k: int | None = None  # default 0: no limit
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: list[int] | None = None

    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def generation(self, max_new_tokens: int, logprobs: int | None) -> GenerationConfig:
        """The engine's config for one choice (seeded choices get seed + index later)."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by lmc; use repetition_penalty", name)
        if not 1 <= self.choices <= MAX_N:
            raise ApiError(400, f"n must be in [1, {MAX_N}], got {self.n}", "n")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ApiError(400, f"stop has {len(self.stop)} strings; at most {MAX_STOP} are taken", "stop")
        temperature = 1.0 if self.temperature is None else self.temperature
        gen = GenerationConfig(
            n=self.choices, max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            ignore_eos=bool(self.ignore_eos), random_seed=self.seed,
            stop_words=[self.stop] if isinstance(self.stop, str) else self.stop, stop_token_ids=self.stop_token_ids,
            min_new_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens is not False,
            logprobs=logprobs, include_stop_str_in_output=bool(self.include_stop_str_in_output))
        try:
            gen.check()
        except LmcError as e:
            message = str(e).removeprefix("GenerationConfig: ")
            field = message.split(" ", 1)[0]
            param = _API_NAMES.get(field, field)
            raise ApiError(400, param + message[len(field):], param) from None
        if self.seed is not None and self.seed + self.choices > SEED_RANGE[1]:
            raise ApiError(400, f"seed + n - 1 must be below 2**64 (choice i is sampled with seed + i), got seed "
                           f"{self.seed} and n {self.choices}", "seed")
        return gen


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template: str | None = None  # lmc extra: a Jinja chat template used instead of the model's
    tools: list | None = None  # refused: lmc does not call tools
    tool_choice: str | dict | None = None  # refused unless "none"
    functions: list | None = None  # the tools' older names, refused alike
    function_call: str | dict | None = None
    response_format: dict | None = None  # refused unless {"type": "text"}
    echo: bool | None = None  # vLLM's chat extension, refused: lmc does not echo the prompt

    def check(self) -> None:
        """Refuse what lmc cannot honour, rather than ignore it."""
        if not self.messages:
            raise ApiError(400, "messages is empty: send at least one message", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if self.tools:
            raise ApiError(400, "tools are not supported by lmc", "tools")
        if self.functions:
            raise ApiError(400, "functions are not supported by lmc", "functions")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ApiError(400, f"{name} is not supported by lmc (it calls no tools): leave it out or send \"none\"",
                               name)
        if self.echo:
            raise ApiError(400, "echo is not supported by lmc", "echo")
        if self.chat_template is not None and len(self.chat_template) > MAX_TEMPLATE_CHARS:
            raise ApiError(400, f"chat_template is {len(self.chat_template)} characters; at most {MAX_TEMPLATE_CHARS} "
                           "are taken (start the server with --chat-template FILE for a larger one)", "chat_template")
        if self.response_format not in (None, {"type": "text"}):
            raise ApiError(400, "response_format is not supported by lmc (only {\"type\": \"text\"})", "response_format")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None  # refused above 1: lmc returns every choice it samples (ask for n)
    suffix: str | None = None  # refused unless empty: lmc does not fill in the middle

    def check(self) -> None:
        if self.echo:
            raise ApiError(400, "echo is not supported by lmc", "echo")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported by lmc: ask for n choices and pick among them", "best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by lmc (no fill-in-the-middle)", "suffix")

    def requested_max_tokens(self) -> int | None:
        return COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise ApiError(400, "prompt is empty", "prompt")
        return p


# ----------------------------------------------------------------------------- responses


@dataclass
class Choice:
    """One choice's output so far."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, logprobs: list[Logprob]) -> dict:
    """OpenAI chat form: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def entry(token_id: int, lp: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(tokenizer, logprobs: list[Logprob], offset: int) -> dict:
    """OpenAI completions form: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    tokens = [token_text(tokenizer, lp.token_id) for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}
