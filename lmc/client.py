"""A small client of OpenAI-compatible servers (`lmc serve`, vLLM, LMDeploy, ...), on the standard
library only, so `lmc chat URL` and `lmc bench URL` need nothing installed beyond lmc.

    client = Client("http://127.0.0.1:23333", api_key=None)
    client.models()                                   # [{"id": ..., "max_model_len": ...}, ...]
    for chunk in client.stream("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 64, "ignore_eos": True,
                                                   "stream_options": {"include_usage": True}}):
        ...                                           # each server-sent event, parsed; the last holds "usage"
    for text in client.chat_stream(messages, temperature=0, max_tokens=64):
        print(text, end="")

Each call opens its own connection, so calls from many threads run side by side.

What a server sends is bounded: a JSON answer (/v1/models) up to MAX_ANSWER bytes, an error body up to
MAX_ERROR bytes (read, the rest left), a line of a stream up to MAX_LINE bytes, and a stream with max_tokens
up to stream_line_limit(payload) lines. Past a bound, or on an answer that is not what the OpenAI API
sends, or after TIMEOUT seconds without a byte, a call raises an LmcError of one line.
"""
from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

from lmc.errors import LmcError, one_line

TIMEOUT = 600.0           # seconds a call waits for the next byte (a queued request may wait long for its first)
MAX_ANSWER = 16 << 20     # bytes of a JSON answer
MAX_ERROR = 64 << 10      # bytes of an error answer that are read
MAX_LINE = 1 << 20        # bytes of one line of an event stream
QUOTE = 200               # characters of a server's text quoted in an error


class ApiError(LmcError):
    """The server answered with an error (status, OpenAI's error `code` when it sent one)."""

    def __init__(self, status: int, message: str, code: str | None = None, hint: str = ""):
        message = _quote(message)
        super().__init__(f"the server refused the request ({status}): {message}{hint}")
        self.status, self.code, self.reason = status, code, message


def _quote(text) -> str:
    """A server's text on one line, cut to QUOTE characters."""
    text = one_line(text if isinstance(text, str) else json.dumps(text))
    return text if len(text) <= QUOTE else text[:QUOTE] + "..."


def _api_error(status, body, fallback: str, url: str) -> ApiError:
    """An ApiError from an OpenAI error object ({"error": {"message", "code"}} or {"error": "text"}) or any body."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message, code = error.get("message") or fallback, error.get("code")
    else:
        message, code = error or fallback, None
    status = status if isinstance(status, int) else 500
    hint = {401: "; check the API key (--api-key)", 403: "; check the API key (--api-key)",
            404: f"; is {url} an OpenAI-compatible server (its API under /v1)?"}.get(status, "")
    return ApiError(status, message, code if isinstance(code, str) else None, hint)


def base_url(url: str) -> str:
    """http://host:port (with or without a trailing /v1) -> http://host:port; an LmcError when `url` is not
    such a URL."""
    problem = None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number in 0-65535)
    except ValueError as e:
        problem = one_line(e)
    else:
        if any(c.isspace() or not c.isprintable() for c in url):
            problem = "it holds spaces or control characters"
        elif parts.scheme not in ("http", "https"):
            problem = "the scheme must be http or https"
        elif not parts.hostname:
            problem = "no host"
        elif parts.username is not None:
            problem = "user info is not sent; pass a key with --api-key"
        elif parts.query or parts.fragment:
            problem = "a query or fragment has no place in it"
    if problem:
        raise LmcError(f"not a server URL: {url!r} ({problem}); pass http://host:port")
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def stream_line_limit(payload: dict) -> int | None:
    """The most lines a stream answering `payload` may have: four per event (data, blank, and an `event:` and
    `id:` field some servers add), an event per token of each choice plus a few; None without max_tokens."""
    max_tokens, n = payload.get("max_tokens"), payload.get("n") or 1
    if not isinstance(max_tokens, int) or not isinstance(n, int):
        return None
    return 4 * (n * (max_tokens + 4) + 16)


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float | None = None):
        self.url = base_url(url)
        self.api_key = api_key
        self.timeout = TIMEOUT if timeout is None else timeout

    def _open(self, path: str, payload: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if data is None else "POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                body = self._read(e, MAX_ERROR, path, cut=True).decode(errors="replace")
            finally:
                e.close()
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            raise _api_error(e.code, parsed, body.strip() or e.reason, self.url) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise self._silent(path) from None
            raise LmcError(f"cannot reach {self.url}: {one_line(reason) or type(reason).__name__}; "
                           "is the server running there?") from None

    def _silent(self, path: str) -> LmcError:
        return LmcError(f"no answer from {self.url}{path} for {self.timeout:g} s; is the server stuck or overloaded?")

    def _read(self, response, limit: int, path: str, cut: bool = False) -> bytes:
        """At most `limit` bytes of the body; more is an LmcError unless `cut` (then they are left unread)."""
        try:
            body = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as e:
            raise self._lost(path, e) from None
        if len(body) > limit and not cut:
            raise LmcError(f"{self.url}{path} answered more than {limit >> 20} MiB; is it an OpenAI-compatible server?")
        return body[:limit]

    def _lost(self, path: str, error: BaseException) -> LmcError:
        if isinstance(error, TimeoutError) or "timed out" in str(error):
            return self._silent(path)
        return LmcError(f"lost {self.url}{path} in the middle of its answer ({one_line(error) or type(error).__name__}); "
                        "did the server stop?")

    def _json(self, response, path: str):
        body = self._read(response, MAX_ANSWER, path)
        try:
            return json.loads(body)
        except ValueError:
            kind = response.headers.get_content_type()
            raise LmcError(f"{self.url}{path} answered {kind} that is not JSON ({_quote(body.decode(errors='replace'))}); "
                           "is it an OpenAI-compatible server?") from None

    def get(self, path: str) -> dict:
        with self._open(path) as response:
            return self._json(response, path)

    def post(self, path: str, payload: dict) -> dict:
        with self._open(path, payload) as response:
            return self._json(response, path)

    def models(self) -> list[dict]:
        """The served models (at least one), each a dict with a string "id"."""
        answer = self.get("/v1/models")
        cards = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(cards, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards):
            raise LmcError(f"{self.url}/v1/models answered {_quote(answer)}, not a model list "
                           '({"data": [{"id": ...}, ...]}); is it an OpenAI-compatible server?')
        if not cards:
            raise LmcError(f"{self.url}/v1/models lists no model; start the server with one")
        return cards

    def _lines(self, response, path: str) -> Iterator[str]:
        """The lines of a streamed answer, each at most MAX_LINE bytes."""
        while True:
            try:
                raw = response.readline(MAX_LINE + 1)
            except (OSError, http.client.HTTPException) as e:
                raise self._lost(path, e) from None
            if not raw:
                return
            if len(raw) > MAX_LINE:
                raise LmcError(f"{self.url}{path} sent a stream line longer than {MAX_LINE >> 20} MiB; "
                               "is it an OpenAI-compatible server?")
            yield raw.decode(errors="replace").strip()

    def _event(self, data: str, path: str) -> dict:
        """A `data:` line's JSON object; an error event raises its ApiError."""
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise LmcError(f"{self.url}{path} sent an event that is not a JSON object ({_quote(data)}); "
                           "is it an OpenAI-compatible server?")
        if "error" in event:
            error = event["error"]
            raise _api_error(error.get("status") if isinstance(error, dict) else 500, event, data, self.url)
        return event

    def stream(self, path: str, payload: dict) -> Iterator[dict]:
        """POST with "stream": true; yield each event's JSON object until `data: [DONE]`. Leaving the loop early
        closes the connection, which makes the server abort the request. A stream that ends without
        `data: [DONE]`, or runs past stream_line_limit(payload) lines, raises an LmcError."""
        limit = stream_line_limit(payload)
        with self._open(path, {**payload, "stream": True}) as response:
            kind = response.headers.get_content_type()
            if kind != "text/event-stream":
                raise LmcError(f"{self.url}{path} answered {kind}, not an event stream (text/event-stream); "
                               "is it an OpenAI-compatible server?")
            for count, line in enumerate(self._lines(response, path), 1):
                if limit is not None and count > limit:
                    raise LmcError(f"{self.url}{path} streamed over {limit} lines for max_tokens "
                                   f"{payload['max_tokens']} without ending; the server does not stop at max_tokens")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield self._event(data, path)
            raise LmcError(f"{self.url}{path} ended its event stream before `data: [DONE]`; the server failed or "
                           "the connection was cut, so the reply may be incomplete")

    def choices(self, event: dict, path: str) -> list[dict]:
        """An event's "choices" (a list of objects; [] when absent); an LmcError when it is something else."""
        choices = event.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise LmcError(f"{self.url}{path} sent choices that are not a list of objects ({_quote(event)})")
        return choices

    def chat_stream(self, messages: list[dict], **params) -> Iterator[str]:
        """The text of the first choice of a streamed chat completion, piece by piece."""
        path = "/v1/chat/completions"
        for event in self.stream(path, {"messages": messages, **params}):
            for choice in self.choices(event, path):
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                if not isinstance(delta, dict) or not isinstance(content, (str, type(None))):
                    raise LmcError(f"{self.url}{path} sent a delta that is not {{\"content\": text}} ({_quote(choice)})")
                if choice.get("index", 0) == 0 and content:
                    yield content
