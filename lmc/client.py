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
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Iterator

from lmc.errors import LmcError


class ApiError(LmcError):
    """The server answered with an error (status, OpenAI's error `code` when it sent one)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"the server refused the request ({status}): {message}")
        self.status, self.code, self.reason = status, code, message


def base_url(url: str) -> str:
    """http://host:port (with or without a trailing /v1) -> http://host:port"""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        self.url = base_url(url)
        self.api_key = api_key
        self.timeout = timeout

    def _open(self, path: str, payload: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if data is None else "POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                error = json.loads(body)["error"]
                raise ApiError(e.code, error.get("message", body), error.get("code")) from None
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ApiError(e.code, body.strip() or e.reason) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LmcError(f"cannot reach {self.url}: {reason}; is the server running there?") from None

    def get(self, path: str) -> dict:
        with self._open(path) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict) -> dict:
        with self._open(path, payload) as response:
            return json.loads(response.read())

    def models(self) -> list[dict]:
        return self.get("/v1/models")["data"]

    def stream(self, path: str, payload: dict) -> Iterator[dict]:
        """POST with "stream": true; yield each event's JSON until `data: [DONE]`. Leaving the loop early
        closes the connection, which makes the server abort the request."""
        with self._open(path, {**payload, "stream": True}) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    raise ApiError(error.get("status", 500), error.get("message", data), error.get("code"))
                yield event

    def chat_stream(self, messages: list[dict], **params) -> Iterator[str]:
        """The text of the first choice of a streamed chat completion, piece by piece."""
        for event in self.stream("/v1/chat/completions", {"messages": messages, **params}):
            for choice in event.get("choices", ()):
                if choice.get("index", 0) == 0 and choice.get("delta", {}).get("content"):
                    yield choice["delta"]["content"]
