"""lmc's OpenAI-compatible server: FastAPI routes over the engine's public API.

    GET  /v1/models             the served model (with max_model_len, as vLLM reports it)
    POST /v1/chat/completions   messages through the chat template; server-sent events with `stream`
    POST /v1/completions        text or token-id prompts
    GET  /health                200 while serving, 503 once the engine loop stopped after an error
    GET  /metrics               Prometheus text: queue, KV cache, prefix cache, tokens, TTFT, TPOT
    GET  /                      the chat page (lmc/serve/static/)

Each choice is one engine request, added from the event loop so its handle is async. A request
ends early, and its KV blocks are freed at once, when its client disconnects: a task per API
call waits for ASGI's `http.disconnect` and aborts the call's requests, whether the call streams
or not, and whether or not a token has been sent yet.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmc.errors import LmcError
from lmc.runtime.sampling import GenerationConfig
from lmc.runtime.tokenizer import NO_TEMPLATE_NOTE, check_unicode
from lmc.runtime.vision import MAX_IMAGES, image_parts, multimodal_prompt
from lmc.serve.metrics import Metrics
from lmc.serve.protocol import (MAX_CHOICES, ApiError, ChatCompletionRequest, Choice, CompletionRequest, SamplingFields,
                                chat_logprobs, completion_logprobs, usage)

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("lmc.serve")


@dataclass
class ServeOptions:
    model_name: str
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_queue: int | None = None  # waiting requests beyond which a request gets 429; None: no limit
    media_dir: str | None = None  # image_url parts may name local files under this folder; None: no local files
    media_domains: tuple[str, ...] | None = None  # image URLs only from these hosts; None: public hosts only
    max_body_bytes: int = 64 << 20  # a request body over this is refused (413) before it is read


class _Call:
    """The engine requests behind one API call (n choices per prompt), with their usage and timings."""

    def __init__(self, engine, metrics: Metrics, request: Request, call_id: str, prompts: list[list[int]],
                 gens: list[GenerationConfig], images: list | None = None, what: str = "prompt"):
        self.metrics, self.start = metrics, time.perf_counter()
        self.prompt_tokens = sum(map(len, prompts))
        self.choices: list[Choice] = []
        self.handles = []
        try:
            for p, (ids, gen) in enumerate(zip(prompts, gens)):
                for k in range(gen.n):
                    choice_gen = replace(gen, n=1, random_seed=None if gen.random_seed is None else gen.random_seed + k)
                    index = len(self.handles)
                    self.handles.append(engine.add_request(ids, choice_gen, request_id=f"{call_id}-{index}",
                                                           images=images[p] if images else None))
                    self.choices.append(Choice(index))
        except LmcError as e:  # checked already; what the engine refuses still gets a 400
            self.abort()
            raise ApiError(400, str(e), what) from None
        self.first: list[float | None] = [None] * len(self.handles)
        self._watcher = asyncio.create_task(self._abort_on_disconnect(request))

    async def collect(self) -> tuple[list[str], list[list]]:
        """Every choice's whole text and logprobs (a call that is not streamed)."""
        texts, lps = [[] for _ in self.choices], [[] for _ in self.choices]
        async for i, out in self.outputs():
            texts[i].append(out.text)
            lps[i] += out.logprobs or []
        return ["".join(t) for t in texts], lps

    async def _abort_on_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.abort()

    def abort(self) -> None:
        for h in self.handles:
            if not h.finished:
                h.abort()

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_generated_tokens for c in self.choices)

    async def _merged(self):
        """(choice index, RequestOutput) of every handle, in the order they come."""
        if len(self.handles) == 1:  # the common case: no task and queue between the engine and the response
            async for out in self.handles[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle) -> None:
            async for out in handle:
                queue.put_nowait((i, out))

        pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            while True:  # the caller stops once every choice has finished
                yield await queue.get()
        finally:
            for task in pumps:
                task.cancel()

    async def outputs(self):
        """(choice index, RequestOutput) as they come, until every choice has finished."""
        left = len(self.handles)
        merged = self._merged()
        try:
            while left:
                i, out = await anext(merged)
                c = self.choices[i]
                c.num_prompt_tokens, c.num_generated_tokens = out.num_prompt_tokens, out.num_generated_tokens
                now = time.perf_counter()
                if self.first[i] is None and out.token_ids:
                    self.first[i] = now
                if out.finish_reason is not None:
                    c.finish_reason = out.finish_reason
                    self.metrics.observe(self.start, self.first[i], now, out.num_generated_tokens, out.finish_reason)
                    left -= 1
                yield i, out
        finally:  # done, or the consumer left (client gone, server stopping): what still runs is aborted
            self._watcher.cancel()
            await merged.aclose()
            self.abort()
            for i, c in enumerate(self.choices):
                if c.finish_reason is None:
                    c.finish_reason = "abort"
                    self.metrics.observe(self.start, self.first[i], time.perf_counter(), c.num_generated_tokens, "abort")


def _param(loc: tuple, body, missing: bool) -> str | None:
    """The request field a validation error is about: its location, walked through the body (pydantic's
    locations also name the union member that was tried, which is no field)."""
    parts, value = [], body
    for key in loc:
        if isinstance(value, dict) and key in value or isinstance(value, list) and isinstance(key, int) and key < len(value):
            parts.append(str(key))
            value = value[key]
        else:
            if missing:
                parts.append(str(key))
            break
    return ".".join(parts) or None


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 before it is read (by its Content-Length), or
    as soon as its chunks add up to more (a body sent without one)."""

    def __init__(self, app, limit: int, refuse):
        self.app, self.limit, self.refuse = app, limit, refuse

    def message(self) -> str:
        return f"the request body is over {self.limit} bytes; send a shorter prompt or smaller images"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(ApiError(413, self.message(), code="request_too_large"))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.limit:  # the route's body read fails with this; the HTTPException handler answers it
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, limited, send)


class _EndOnShutdown:
    """The outermost ASGI layer. A shutdown cancels the requests still running (the drain timeout ran out, or a
    second Ctrl-C): each response ends where it is, an SSE stream with an error event, one not yet started as a
    503, instead of uvicorn logging a CancelledError traceback for every one (uvicorn's own line says how many)."""

    GONE = ApiError(503, "the server shut down before this request finished; send it again", kind="server_error")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = sse = ended = False

        async def tracked(message):
            nonlocal started, sse, ended
            if message["type"] == "http.response.start":
                started = True
                sse = dict(message.get("headers") or []).get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if ended:
                return
            try:
                if not started:
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": json.dumps(self.GONE.body()).encode()})
                    return
                if sse:
                    await send({"type": "http.response.body", "body": _sse(self.GONE.body()).encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except Exception:  # the connection is already gone: nothing left to tell it
                pass


def _text_chars(messages: list[dict]) -> int:
    """Characters of the messages' roles and text (what the chat template renders around them is not counted)."""
    def text(content) -> int:
        if isinstance(content, list):
            return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
        return len(content or "")

    return sum(len(m["role"]) + text(m["content"]) for m in messages)


def _check_strings(value, what: str) -> None:
    """400 naming `what` for a lone surrogate in any string of a request field (JSON lets "\\ud800" through; no
    tokenizer takes it). The body is bounded, so is the walk."""
    if isinstance(value, str):
        try:
            check_unicode(value, what)
        except LmcError as e:
            raise ApiError(400, str(e), what.split("[")[0].split(".")[0]) from None
    elif isinstance(value, dict):
        for key, v in value.items():
            _check_strings(v, f"{what}.{key}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{what}[{i}]")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(engine, options: ServeOptions) -> FastAPI:
    """The app over a built engine; the engine's background loop runs while the app does."""
    metrics = Metrics(engine)
    keys = tuple(options.api_keys)

    @asynccontextmanager
    async def lifespan(app):
        if not engine.tokenizer.chat_template:
            log.warning(NO_TEMPLATE_NOTE)
        engine.start()
        try:
            yield
        except asyncio.CancelledError:  # a second Ctrl-C: uvicorn skips the lifespan's shutdown and cancels it at
            log.warning("forced quit: requests still running were cut off")  # exit; that is a shutdown, not a failure
        finally:
            engine.stop()

    app = FastAPI(title="lmc", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------ errors as OpenAI's error object
    def error_response(err: ApiError) -> JSONResponse:
        metrics.rejected.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    app.add_middleware(_BodyLimit, limit=options.max_body_bytes, refuse=error_response)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(ApiError(400, "the request body is not valid JSON"))
        param = _param(first.get("loc", ())[1:], err.body, first.get("type") == "missing")
        return error_response(ApiError(400, f"{param}: {first.get('msg')}" if param else first.get("msg", "bad request"),
                                       param))

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(ApiError(err.status_code, str(err.detail), kind="invalid_request_error",
                                       code="request_too_large" if err.status_code == 413 else None))

    @app.exception_handler(Exception)
    async def server_error(request, err: Exception):
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"))

    # ------------------------------------------------------------------ checks shared by the generation routes
    def authorized(request: Request) -> None:
        if not keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in keys):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with a key given to "
                           "`lmc serve --api-keys`", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != options.model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {options.model_name!r}",
                           "model", "model_not_found")

    # the most characters one token stands for: a text over session_len times this cannot fit, whatever its tokens
    token_chars = max(map(len, engine.tokenizer.tok.get_vocab(with_added_tokens=True)), default=1)

    def check_text(chars: int, what: str) -> None:
        """Refuse a text too long to fit the session before tokenizing it (which takes memory in proportion)."""
        if chars > engine.session_len * token_chars:
            raise ApiError(400, f"{what}: {chars} characters, more than session_len ({engine.session_len}) "
                           "tokens can hold: shorten it or restart the server with a larger --session-len", what,
                           "context_length_exceeded")

    def configs(body: SamplingFields, prompts: list[list[int]], what: str) -> list[GenerationConfig]:
        """One GenerationConfig per prompt, after the length and queue checks."""
        gens = []
        for ids in prompts:
            if len(ids) >= engine.session_len:
                raise ApiError(400, f"{what}: {len(ids)} tokens; session_len is {engine.session_len}: shorten it "
                               "or restart the server with a larger --session-len", what, "context_length_exceeded")
            max_tokens = body.requested_max_tokens()
            if max_tokens is None:
                max_tokens = engine.session_len - len(ids)
            elif max_tokens < 1:
                raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
            gens.append(body.generation(max_tokens, body.logprob_count()))
        if len(prompts) * body.choices > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts with n = {body.choices} are {len(prompts) * body.choices} "
                           f"choices; a call asks for at most {MAX_CHOICES}: send fewer prompts per call", "n")
        waiting = engine.stats().waiting  # sequences: each choice of each prompt is one
        if options.max_queue is not None and waiting and waiting + len(prompts) * body.choices > options.max_queue:
            # an idle queue takes any call (its choices are bounded above): one asking for more than --max-queue
            # choices would otherwise be refused for ever
            raise ApiError(429, f"the server's queue is full ({waiting} sequences waiting, --max-queue "
                           f"{options.max_queue}); retry later", code="queue_full", kind="rate_limit_error")
        return gens

    def stream(events) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not engine.healthy:  # the engine loop stopped after an error: a load balancer should look elsewhere
            return JSONResponse({"status": "error", "error": engine.failed}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    def model_card() -> dict:
        return {"id": options.model_name, "object": "model", "created": 0, "owned_by": "lmc",
                "max_model_len": engine.session_len, "vocab_size": engine.cfg.vocab_size,
                "has_chat_template": bool(engine.tokenizer.chat_template)}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        body.check()
        tokenizer = engine.tokenizer
        if body.chat_template is not None:
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = body.chat_template
        messages = [m.as_template_input() for m in body.messages]
        check_text(_text_chars(messages), "messages")
        _check_strings(messages, "messages")
        _check_strings(body.chat_template, "chat_template")
        placed = []
        if any(image_parts(m["content"]) for m in messages):
            try:  # fetching, decoding and preprocessing off the event loop
                ids, placed = await asyncio.to_thread(_image_prompt, engine, tokenizer, messages, options)
            except LmcError as e:
                raise ApiError(400, f"messages: {e}", "messages") from None
        else:
            try:
                ids = tokenizer.encode_chat(messages)
            except LmcError as e:  # the template refused these messages (raise_exception), or ran past its bounds
                raise ApiError(400, f"the chat template failed on these messages: {e}", "messages") from None
        call_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        call = _Call(engine, metrics, request, call_id, [ids], configs(body, [ids], "messages"), [placed], "messages")
        head = {"id": call_id, "created": created, "model": options.model_name}
        logprobs = (lambda out: chat_logprobs(engine.tokenizer, out.logprobs) if out.logprobs else None)

        if body.stream:
            async def events():
                extra = {"usage": None} if body.include_usage else {}
                chunk = {**head, "object": "chat.completion.chunk"}
                yield _sse({**chunk, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None} for c in call.choices], **extra})
                async for i, out in call.outputs():
                    if out.text or out.logprobs or out.finish_reason:
                        yield _sse({**chunk, "choices": [{"index": i, "delta": {"content": out.text} if out.text else {},
                                                          "logprobs": logprobs(out), "finish_reason": out.finish_reason}],
                                    **extra})
                if body.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": usage(call.prompt_tokens, call.completion_tokens)})
                yield "data: [DONE]\n\n"

            return stream(events())

        texts, lps = await call.collect()
        return {**head, "object": "chat.completion",
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": texts[c.index]},
                             "logprobs": chat_logprobs(engine.tokenizer, lps[c.index]) if body.logprobs else None,
                             "finish_reason": c.finish_reason} for c in call.choices],
                "usage": usage(call.prompt_tokens, call.completion_tokens)}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        body.check()
        for p in body.prompts():
            if isinstance(p, str):
                check_text(len(p), "prompt")
                _check_strings(p, "prompt")
        prompts = [engine.tokenizer.encode(p) if isinstance(p, str) else p for p in body.prompts()]
        call_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        call = _Call(engine, metrics, request, call_id, prompts, configs(body, prompts, "prompt"))
        head = {"id": call_id, "object": "text_completion", "created": created, "model": options.model_name}
        offsets = [0] * len(call.choices)

        def logprobs(i: int, out) -> dict | None:
            if out.logprobs is None:
                return None
            lp = completion_logprobs(engine.tokenizer, out.logprobs, offsets[i])
            offsets[i] += len(out.text)
            return lp

        if body.stream:
            async def events():
                extra = {"usage": None} if body.include_usage else {}
                async for i, out in call.outputs():
                    if out.text or out.logprobs or out.finish_reason:
                        yield _sse({**head, "choices": [{"index": i, "text": out.text, "logprobs": logprobs(i, out),
                                                         "finish_reason": out.finish_reason}], **extra})
                if body.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(call.prompt_tokens, call.completion_tokens)})
                yield "data: [DONE]\n\n"

            return stream(events())

        texts, lps = await call.collect()
        return {**head, "choices": [{"index": c.index, "text": texts[c.index],
                                     "logprobs": completion_logprobs(engine.tokenizer, lps[c.index], 0)
                                     if body.logprobs is not None else None,
                                     "finish_reason": c.finish_reason} for c in call.choices],
                "usage": usage(call.prompt_tokens, call.completion_tokens)}

    return app


def _image_prompt(engine, tokenizer, messages: list[dict], options: ServeOptions):
    """Token ids and placed images of messages with image_url parts (data URLs; http(s) URLs from public hosts or
    from options.media_domains; local files only under options.media_dir). A text-only workspace, or more images
    than a prompt takes, is refused before any image is loaded."""
    from lmc.vl import message_images

    if engine.workspace.vision is None:  # refused before any image is fetched or decoded
        raise LmcError("this workspace has no vision tower: convert a LLaVA checkpoint to run images")
    count = sum(image_parts(m["content"]) for m in messages)
    if count > MAX_IMAGES:
        raise LmcError(f"{count} images in one prompt; at most {MAX_IMAGES} are read")
    images = message_images(messages, allowed_dir=options.media_dir, local_files=options.media_dir is not None,
                            media_domains=options.media_domains, public_only=True)
    return multimodal_prompt(tokenizer, engine.workspace.vision, messages, images)


def run_server(engine, options: ServeOptions, host: str, port: int, drain_timeout: float, log_level: str) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, let in-flight requests finish (at most
    drain_timeout seconds, then they are cancelled and aborted), stop the engine and return."""
    import uvicorn

    app = _EndOnShutdown(create_app(engine, options))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=drain_timeout))
    # uvicorn re-raises the signal it stopped on once it returns; let that land here, so a drained server exits 0.
    # Then the engine closes: a Ctrl-C there is ignored too (it would leave a KeyboardInterrupt traceback from
    # wherever the close was), until Python's own exit puts the default handlers back.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying it could not start (a port in use, ...)
        raise LmcError(f"the server could not start on {host}:{port}; the log above says why") from None
