"""`lmc serve` over real HTTP: a uvicorn process on a free 127.0.0.1 port with a tiny model, and
`lmc chat URL` against it."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from lmc.api import pipeline  # noqa: E402
from lmc.compiler.convert import convert  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.sampling import GenerationConfig  # noqa: E402

KEY = "k2"
AUTH = {"Authorization": f"Bearer {KEY}"}
SESSION_LEN = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmc serve WS` in a subprocess; its log in a file (a pipe nobody reads would block it)."""

    def __init__(self, ws: Path, log_dir: Path, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lmc", "serve", str(ws), "--server-name", "127.0.0.1",
                                          "--server-port", str(self.port), "--device", "cpu", *flags],
                                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited {self.proc.returncode}:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        lines = httpx.get(self.url + "/metrics", timeout=30).text.splitlines()
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if line and line[0] != "#")}

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Metrics once nothing runs, waits or holds a KV block."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["lmc_requests_running"] == m["lmc_requests_waiting"] == m["lmc_kv_cache_blocks_used"] == 0
            if idle or time.monotonic() > deadline:
                assert idle, {k: v for k, v in m.items() if k.startswith(("lmc_requests", "lmc_kv"))}
                return m
            time.sleep(0.05)

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def ws(tokenizer_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    convert(make_checkpoint("qwen2", root / "ckpt", tokenizer_dir), root / "ws")
    return root / "ws"


@pytest.fixture(scope="module")
def server(ws, tmp_path_factory):
    """Two API keys (LMDeploy's `--api-keys K1 K2` form), 2 sequences at a time, 6 waiting at most."""
    s = Server(ws, tmp_path_factory.mktemp("log"), "--model-name", "tiny", "--api-keys", "k1", KEY,
               "--session-len", str(SESSION_LEN), "--max-batch-size", "2", "--max-queue", "6",
               "--cache-block-seq-len", "16")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def local(ws):
    """The same model in this process, for reference answers."""
    return pipeline(ws, backend_config=EngineConfig(device="cpu", session_len=SESSION_LEN))


def sse(client: httpx.Client, path: str, body: dict) -> list:
    """POST with stream: the JSON of each event, then "[DONE]"."""
    out = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat(client, content, **params) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **params})
    assert r.status_code == 200, r.text
    return r.json()


def streamed_chat_text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])


def test_endpoints_streaming_equals_plain_and_the_local_engine(server, local):
    c = server.client(headers=AUTH)
    assert c.get("/health").json() == {"status": "ok"}
    card = c.get("/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"], m["has_chat_template"]) for m in card] == [("tiny", SESSION_LEN, True)]
    assert c.get("/v1/models/tiny").json()["id"] == "tiny"
    page = c.get("/")
    assert page.status_code == 200 and "/static/chat.js" in page.text
    assert "getReader" in c.get("/static/chat.js").text

    messages = [{"role": "user", "content": "Hello there"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0}
    plain = c.post("/v1/chat/completions", json=body).json()
    ref = local(messages, GenerationConfig(max_new_tokens=12))
    assert plain["object"] == "chat.completion" and plain["id"].startswith("chatcmpl-")
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert plain["choices"][0]["finish_reason"] == ref.finish_reason
    assert plain["usage"] == {"prompt_tokens": ref.input_token_len, "completion_tokens": ref.generate_token_len,
                              "total_tokens": ref.input_token_len + ref.generate_token_len}
    events = sse(c, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_chat_text(events) == ref.text
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == ref.finish_reason
    assert events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    assert all(e["usage"] is None for e in events[:-2])
    assert "usage" not in sse(c, "/v1/chat/completions", body)[1]  # only with stream_options.include_usage

    # completions: a text prompt and the same prompt as token ids, streamed and not
    ref = local("The quick brown", GenerationConfig(max_new_tokens=10, ignore_eos=True), chat_template=False)
    ids = local.tokenizer.encode("The quick brown")
    for prompt in ("The quick brown", ids):
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}).json()
        assert r["object"] == "text_completion" and r["choices"][0]["text"] == ref.text
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 10
        events = sse(c, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                                            "stream_options": {"include_usage": True}})
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == ref.text
        assert events[-2]["usage"] == r["usage"]
    assert c.post("/v1/completions", json={"prompt": "hi"}).json()["usage"]["completion_tokens"] <= 16  # OpenAI's default
    assert chat(c, "hi", max_tokens=2, user="me", logit_bias=None, some_other_servers_field={"x": 1})["choices"]  # ignored

    m = server.metrics()
    assert m["lmc_time_to_first_token_seconds_count"] >= 6 and m["lmc_time_per_output_token_seconds_count"] >= 6
    assert m["lmc_generation_tokens_total"] >= 12 + 4 * 10 and m["lmc_kv_cache_blocks_total"] > 0
    for name in ("lmc_prompt_tokens_total", "lmc_kv_cache_usage_ratio", "lmc_prefix_cache_hit_rate",
                 'lmc_request_finished_total{finish_reason="length"}', "lmc_e2e_request_latency_seconds_count"):
        assert name in m, name


def test_concurrent_requests_equal_their_results_alone(server):
    c = server.client(headers=AUTH)
    prompts = ["Hello there", "上海是", "The quick brown fox", "def main():", "naïve café", "12345 67890"]
    params = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    alone = [chat(c, p, **params)["choices"][0]["message"]["content"] for p in prompts]

    def one(i: int) -> str:  # every other one streams
        if i % 2:
            return chat(c, prompts[i], **params)["choices"][0]["message"]["content"]
        return streamed_chat_text(sse(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompts[i]}],
                                                                  **params}))

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(one, range(len(prompts))))
    assert together == alone

    # n choices: choice i is sampled with seed + i, as n requests of their own
    sampled = {"max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    many = chat(c, "hello", n=3, seed=5, **sampled)
    texts = [ch["message"]["content"] for ch in many["choices"]]
    assert [ch["index"] for ch in many["choices"]] == [0, 1, 2] and many["usage"]["completion_tokens"] == 24
    assert texts == [chat(c, "hello", seed=5 + i, **sampled)["choices"][0]["message"]["content"] for i in range(3)]
    assert len(set(texts)) > 1
    events = sse(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "n": 3, "seed": 5, **sampled})
    streamed = ["".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"][0]["index"] == i)
                for i in range(3)]
    assert streamed == texts


def test_logprobs_and_stop(server, local):
    c = server.client(headers=AUTH)
    r = chat(c, "Hello there", max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 and all(len(t["top_logprobs"]) == 3 for t in content)
    for t in content:  # greedy: the chosen token is the most likely one
        assert t["token"] == t["top_logprobs"][0]["token"] and t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"])
        assert t["logprob"] <= 0 and bytes(t["bytes"]).decode(errors="replace") == t["token"]
    r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                        "logprobs": 2}).json()["choices"][0]
    assert len(r["logprobs"]["tokens"]) == 5 and all(len(t) <= 2 for t in r["logprobs"]["top_logprobs"])
    assert r["logprobs"]["text_offset"][0] == 0
    penalized = chat(c, "Hello there", max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5)
    ref = local([{"role": "user", "content": "Hello there"}],  # (logprobs: the engine's penalty needs them today)
                GenerationConfig(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.5, logprobs=0))
    assert penalized["choices"][0]["message"]["content"] == ref.text and penalized["choices"][0]["logprobs"] is None
    full = local("hello", GenerationConfig(max_new_tokens=12, ignore_eos=True), chat_template=False).text
    word = full[3:6]
    r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                        "stop": word}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["text"] == full[:full.find(word)]


BAD_REQUESTS = [
    # (path, body, headers, status, param or code)
    ("/v1/chat/completions", {"max_tokens": -1}, AUTH, 400, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, AUTH, 400, "max_tokens"),
    ("/v1/chat/completions", {"temperature": -0.5}, AUTH, 400, "temperature"),
    ("/v1/chat/completions", {"top_p": 0}, AUTH, 400, "top_p"),
    ("/v1/chat/completions", {"top_p": 1.5}, AUTH, 400, "top_p"),
    ("/v1/chat/completions", {"messages": []}, AUTH, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 400}]}, AUTH, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"max_tokens": "5"}, AUTH, 400, "max_tokens"),
    ("/v1/chat/completions", {"temperature": True}, AUTH, 400, "temperature"),
    ("/v1/chat/completions", {"messages": "hello"}, AUTH, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, AUTH, 400, "messages.0.role"),
    ("/v1/chat/completions", {"stop": 3}, AUTH, 400, "stop"),
    ("/v1/chat/completions", {"n": 0}, AUTH, 400, "n"),
    ("/v1/chat/completions", {"top_logprobs": 2}, AUTH, 400, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, AUTH, 400, "top_logprobs"),
    ("/v1/chat/completions", {"frequency_penalty": 0.5}, AUTH, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, AUTH, 400, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, AUTH, 400, "response_format"),
    ("/v1/chat/completions", {"tool_choice": "required"}, AUTH, 400, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, AUTH, 400, "functions"),
    ("/v1/chat/completions", {"function_call": {"name": "f"}}, AUTH, 400, "function_call"),
    ("/v1/chat/completions", {"echo": True}, AUTH, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "best_of": 5}, AUTH, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, AUTH, 400, "suffix"),
    ("/v1/chat/completions", {"chat_template": "{{ raise_exception('roles must alternate') }}"}, AUTH, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4o"}, AUTH, 404, "model_not_found"),
    ("/v1/chat/completions", {}, {}, 401, "invalid_api_key"),
    ("/v1/chat/completions", {}, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("/v1/models", None, {"Authorization": "k2"}, 401, "invalid_api_key"),
    ("/v1/models", None, {"Authorization": "Bearer clé".encode("latin-1")}, 401, "invalid_api_key"),
    ("/v1/completions", {"prompt": ""}, AUTH, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 100000]}, AUTH, 400, "prompt"),
    ("/v1/completions", {"prompt": [1.5]}, AUTH, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, AUTH, 400, "echo"),
    ("/v1/completions", "{not json", AUTH, 400, None),
    # lone surrogates (JSON escapes no tokenizer takes): 400 naming the field, not a 500
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', AUTH, 400, "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', AUTH, 400, "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 1}', AUTH, 400,
     "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     AUTH, 400, "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "us\\ud800er", "content": "hi"}]}', AUTH, 400, "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ \'\\ud800\' }}"}',
     AUTH, 400, "chat_template"),
    ("/v1/nothing", {}, AUTH, 404, None),
]


@pytest.mark.parametrize("path,body,headers,status,what", BAD_REQUESTS,
                         ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, path, body, headers, status, what):
    c = server.client()
    if body is None:
        r = c.get(path, headers=headers)
    elif isinstance(body, str):
        r = c.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        if path.endswith("chat/completions"):
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
        r = c.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert what in (None, error["param"], error["code"]), error
    assert chat(c.__class__(base_url=server.url, headers=AUTH, timeout=60), "hi", max_tokens=2)["choices"]


def _open_stream(port: int, body: dict, stream: bool = True) -> socket.socket:
    """Send a chat completion request on a raw socket and leave the answer unread."""
    payload = json.dumps({"messages": [{"role": "user", "content": "Hello there"}], "stream": stream, **body}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _wait_for(server, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate(m := server.metrics()):
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if "running" in k or "waiting" in k or "finished" in k}
        time.sleep(0.02)
    return m


def test_disconnect_frees_blocks(server):
    long = {"max_tokens": SESSION_LEN, "temperature": 0, "ignore_eos": True}
    server.wait_idle()
    aborted = server.metrics().get('lmc_request_finished_total{finish_reason="abort"}', 0)
    # mid-stream: two events read, then the client goes
    sock = _open_stream(server.port, long)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    sock.close()
    m = server.wait_idle()
    assert m['lmc_request_finished_total{finish_reason="abort"}'] == aborted + 1
    # not streaming: the client goes while its request runs
    sock = _open_stream(server.port, long, stream=False)
    _wait_for(server, lambda m: m["lmc_requests_running"] == 1)
    sock.close()
    m = server.wait_idle()
    assert m['lmc_request_finished_total{finish_reason="abort"}'] == aborted + 2
    assert chat(server.client(headers=AUTH), "hi", max_tokens=2)["choices"]


def test_more_choices_than_the_queue_holds_run_on_an_idle_server(server):
    """--max-queue 6: a call for 8 choices (or 4 prompts x 2) is admitted when nothing waits, not a 429 for ever."""
    server.wait_idle()
    c = server.client(headers=AUTH)
    r = c.post("/v1/completions", json={"prompt": "hi", "n": 8, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert sorted(ch["index"] for ch in r.json()["choices"]) == list(range(8))
    r = c.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8, r.text


def test_a_full_queue_answers_429_and_waiting_clients_can_leave(tokenizer_dir, tmp_path):
    """2 sequences run and 6 wait (--max-batch-size 2 --max-queue 6): the next request gets 429. The requests are
    long (20,000 tokens), so none finishes while the queue fills, however slow the machine."""
    root = tmp_path / "long"
    convert(make_checkpoint("qwen2", root / "ckpt", tokenizer_dir, max_position_embeddings=32768), root / "ws")
    server = Server(root / "ws", tmp_path, "--api-keys", KEY, "--session-len", "32768", "--max-batch-size", "2",
                    "--max-queue", "6", "--log-level", "warning")
    socks = []
    try:
        server.wait_idle()
        for k in range(1, 9):  # one by one, so that each is queued before the next comes
            socks.append(_open_stream(server.port, {"max_tokens": 20000, "temperature": 0, "ignore_eos": True}))
            m = _wait_for(server, lambda m: m["lmc_requests_waiting"] + m["lmc_requests_running"] == k)
        assert m["lmc_requests_waiting"] == 6 and m["lmc_requests_running"] == 2
        r = server.client(headers=AUTH).post("/v1/chat/completions",
                                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert "(6 sequences waiting, --max-queue 6)" in r.json()["error"]["message"]
        for s in socks:
            s.close()
        m = server.wait_idle()  # the waiting ones were aborted as well as the running ones
        assert m['lmc_request_finished_total{finish_reason="abort"}'] == 8
        assert chat(server.client(headers=AUTH), "hi", max_tokens=2)["choices"]
    finally:
        for s in socks:
            s.close()
        assert server.stop() == 0, server.log()


def _lmc(*args, stdin=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_chat_url_is_the_local_repl_over_the_api(server, local, ws, tmp_path):
    gen = GenerationConfig(max_new_tokens=5)
    first = local([{"role": "user", "content": "Hello there"}], gen).text
    second = local([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And again"}], gen).text
    env = {"LMC_CACHE": str(tmp_path)}
    r = _lmc("chat", server.url, "--api-key", "k1", "--temperature", "0", "--max-new-tokens", "5",
             stdin="Hello there\nAnd again\nexit\nnever read\n", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second}\n"
    local_run = _lmc("chat", ws, "--temperature", "0",
                     "--max-new-tokens", "5", "--device", "cpu", "--session-len", str(SESSION_LEN),
                     stdin="Hello there\nAnd again\n", env=env)
    assert local_run.stdout == r.stdout, local_run.stderr

    # a system prompt, /reset, and a multi-line message
    sys_msg = {"role": "system", "content": "Be brief."}
    a = local([sys_msg, {"role": "user", "content": "Hello there"}], gen).text
    b = local([sys_msg, {"role": "user", "content": "line one\nline two"}], gen).text
    r = _lmc("chat", server.url + "/v1", "--api-key", "k1", "--temperature", "0", "--max-new-tokens", "5",
             "--system", "Be brief.", stdin='Hello there\n/reset\n"""\nline one\nline two\n"""\n', env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{a}\n{b}\n" and "reset" in r.stderr

    # past the server's session_len the oldest turns are dropped
    long_message = "The quick brown fox jumps over the lazy dog."
    while len(local.encode(long_message)) <= SESSION_LEN // 2:
        long_message += " The quick brown fox jumps over the lazy dog."
    alone = local(long_message + "again", gen).text
    r = _lmc("chat", server.url, "--api-key", "k1", "--temperature", "0", "--max-new-tokens", "5",
             stdin=f"{long_message}\n{long_message}again\n", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(f"{alone}\n") and "dropped the 2 oldest messages" in r.stderr


def test_chat_url_errors(server):
    r = _lmc("chat", server.url, stdin="hi\n")
    assert r.returncode == 1 and "401" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _lmc("chat", server.url, "--device", "cpu", stdin="hi\n")
    assert r.returncode == 2 and "--device" in r.stderr
    r = _lmc("chat", f"http://127.0.0.1:{free_port()}", stdin="hi\n")
    assert r.returncode == 1 and "cannot reach" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_serve_refuses_bad_setups_with_one_line(ws, tmp_path):
    r = _lmc("serve", ws, "--tp", "2", "--device", "cpu")
    assert r.returncode == 1 and "split for tp=1: pass --tp 1" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _lmc("serve", tmp_path / "missing")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = _lmc("serve", ws, "--device", "cpu", "--server-name", "127.0.0.1", "--server-port", taken.getsockname()[1])
    assert r.returncode == 1 and "address already in use" in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: the server could not start on 127.0.0.1:")
    code = ("import sys; sys.modules['fastapi'] = None\nimport lmc.cli\n"
            "assert 'uvicorn' not in sys.modules and 'prometheus_client' not in sys.modules\n"
            f"lmc.cli.main(['serve', {str(ws)!r}, '--device', 'cpu'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "pip install 'lmc[serve]'" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_sigterm_drains_in_flight_requests_and_exits_0(ws, tmp_path):
    s = Server(ws, tmp_path, "--session-len", "128")
    try:
        sock = _open_stream(s.port, {"max_tokens": 100, "temperature": 0, "ignore_eos": True,
                                     "stream_options": {"include_usage": True}})
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # new connections are refused while the stream goes on
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        while b"data: [DONE]" not in received:  # (the chunked-encoding terminator may come in the same read)
            chunk = sock.recv(65536)
            assert chunk, received[-500:]
            received += chunk
        sock.close()
        usage = [json.loads(m) for m in re.findall(rb'^data: (\{.*"usage":\{.*\})\r?$', received, re.M)]
        assert usage[-1]["usage"]["completion_tokens"] == 100
        assert s.proc.wait(60) == 0, s.log()
    finally:
        s.stop()


def _read_to_close(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    return received


SHUT_DOWN_EVENT = b'data: {"error":{"message":"the server shut down before this request finished; send it again"'


def test_sigint_with_a_drain_timeout_exits_0_in_time(ws, tmp_path):
    """Streams still running when the drain timeout ends get an error event and their end, and the log has
    uvicorn's one line for them, not a CancelledError traceback each."""
    s = Server(ws, tmp_path, "--session-len", "128", "--drain-timeout", "0")
    try:
        socks = [_open_stream(s.port, {"max_tokens": 120, "temperature": 0, "ignore_eos": True}) for _ in range(8)]
        _wait_for(s, lambda m: m["lmc_requests_running"] == 8)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(60) == 0, s.log()
        assert time.monotonic() - start < 30
        answers = [_read_to_close(sock) for sock in socks]
        cut = [a for a in answers if b"data: [DONE]" not in a]
        assert cut, "no stream was still running at the drain timeout"
        for a in cut:  # the error event, then the chunked body's end
            assert a.endswith(b"}}\n\n\r\n0\r\n\r\n") and SHUT_DOWN_EVENT in a, a[-300:]
        assert "Traceback" not in s.log() and "timeout graceful shutdown exceeded" in s.log(), s.log()
    finally:
        s.stop()


def test_a_second_sigint_forces_quit_without_a_traceback(ws, tmp_path):
    """Ctrl-C twice while a stream runs: the second makes uvicorn skip the drain and cancel the app's lifespan
    and the request at exit; the engine stops as in a shutdown (one warning line), the stream gets the error
    event, the exit is 0 and nothing prints a traceback."""
    s = Server(ws, tmp_path, "--session-len", "2048", "--drain-timeout", "120")
    try:
        sock = _open_stream(s.port, {"max_tokens": 2000, "temperature": 0, "ignore_eos": True})
        _wait_for(s, lambda m: m["lmc_requests_running"] == 1)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        while "Waiting for connections to close" not in s.log():  # the first Ctrl-C drains (up to 120 s here)
            assert s.proc.poll() is None and time.monotonic() - start < 30, s.log()
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(60) == 0, s.log()
        assert time.monotonic() - start < 60
        answer = _read_to_close(sock)
        assert b"data: [DONE]" not in answer and SHUT_DOWN_EVENT in answer, answer[-300:]
        assert "Traceback" not in s.log() and "CancelledError" not in s.log(), s.log()
        assert "forced quit: requests still running were cut off" in s.log(), s.log()
    finally:
        s.stop()


def test_load_200_requests_64_at_a_time_a_tenth_leaving(ws, tmp_path):
    """Every request that stays completes, no 5xx, every KV block is free at the end, and the server's
    memory after 200 requests is within 10% of its memory after a warm-up of 64."""
    import asyncio

    s = Server(ws, tmp_path, "--session-len", "128", "--max-batch-size", "64", "--log-level", "warning")

    async def wave(count: int, leave_every: int | None) -> list:
        gate = asyncio.Semaphore(64)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=s.url, timeout=300, limits=limits) as client:
            async def one(i: int):
                leaves = leave_every is not None and i % leave_every == 0
                body = {"messages": [{"role": "user", "content": f"request number {i}"}], "max_tokens": 96 if leaves else 32,
                        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                async with gate, client.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        return r.status_code, None
                    events = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            events.append(json.loads(line[6:]))
                            if leaves and len(events) == 3:
                                return 200, "left"  # leaving the block closes the connection mid-stream
                    return 200, events

            return await asyncio.gather(*(one(i) for i in range(count)))

    try:
        results = asyncio.run(wave(64, None))
        assert all(status == 200 for status, _ in results)
        s.wait_idle()
        warm = s.rss_kb()
        results = asyncio.run(wave(200, 10))
        assert [status for status, _ in results] == [200] * 200
        assert sum(events == "left" for _, events in results) == 20
        for _, events in results:
            if events != "left":
                assert events[-1]["usage"]["completion_tokens"] == 32
                assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
        m = s.wait_idle()
        # a client that leaves aborts its request unless that request had already finished on a slow machine
        aborted = m['lmc_request_finished_total{finish_reason="abort"}']
        assert 1 <= aborted <= 20 and m['lmc_request_finished_total{finish_reason="length"}'] == 64 + 200 - aborted
        assert s.rss_kb() <= 1.1 * warm, (warm, s.rss_kb())
    finally:
        assert s.stop() == 0, s.log()


def test_bench_url_measures_the_server_like_the_workspace(ws, tmp_path):
    """`lmc bench URL` sends the same requests as `lmc bench WS` (same seed: same lengths) through the API and
    reports the same keys; every request completes with exactly its output length."""
    args = ("--num-prompts", "20", "--concurrency", "4", "--input-len", "12", "--output-len", "6", "--json")
    s = Server(ws, tmp_path, "--max-batch-size", "8", "--log-level", "warning")
    try:
        r = _lmc("bench", s.url, *args)
        assert r.returncode == 0, r.stderr
        over_http = json.loads(r.stdout)
        assert s.wait_idle()["lmc_requests_running"] == 0
    finally:
        assert s.stop() == 0, s.log()
    r = _lmc("bench", ws, *args, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    local = json.loads(r.stdout)
    assert over_http["completed"] == local["completed"] == 20 and over_http["failed"] == 0
    assert over_http["completion_tokens"] == local["completion_tokens"]
    assert over_http["prompt_tokens"] == local["prompt_tokens"]
    assert {k for k in local if k.endswith("_ms")} <= set(over_http)
    r = _lmc("bench", "http://127.0.0.1:9", "--max-batch-size", "4")
    assert r.returncode == 2 and "--max-batch-size sets up a local engine" in r.stderr
