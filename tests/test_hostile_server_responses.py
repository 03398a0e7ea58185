"""lmc as an HTTP client of a misbehaving OpenAI-compatible server: `lmc chat URL` and `lmc bench URL` (and
lmc.client.Client) against small servers on 127.0.0.1 that answer wrongly, too much, or not at all. Every
bad answer is one `error: ...` line and exit 1 (Ctrl-C: exit 130), never a traceback, a hang or memory that
grows with what the server sends."""
from __future__ import annotations

import http.server
import json
import os
import resource
import signal
import socketserver
import subprocess
import sys
import threading
import time

import pytest

from lmc.client import Client
from lmc.errors import LmcError

CARD = {"object": "list", "data": [{"id": "m", "max_model_len": 64, "vocab_size": 100}]}
MIB = 1 << 20
STOP = threading.Event()  # set at teardown: handlers that wait forever return


# ----------------------------------------------------------------------------- answers


def send(h, body, status=200, ctype="application/json"):
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def endless(h, status=200, head=b"", piece=b"x" * MIB, ctype="application/json"):
    """A body that never ends (until the client leaves)."""
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.end_headers()
    h.wfile.write(head)
    while not STOP.is_set():
        h.wfile.write(piece)


def silent(h):
    """Accept the request and never answer."""
    STOP.wait(60)


def event(text, usage=None):
    return ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "text": text}],
                                   "usage": usage}) + "\n\n").encode()


def sse(*chunks, done=True):
    """A text/event-stream answer of these raw chunks (then `data: [DONE]`)."""
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        for chunk in chunks:
            h.wfile.write(chunk)
        if done:
            h.wfile.write(b"data: [DONE]\n\n")
    return answer


def good_stream(h):
    """What a correct server sends: max_tokens pieces, the usage, [DONE]."""
    n = h.body.get("max_tokens", 2)
    sse(*(event("x") for _ in range(n)), b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": n}}).encode()
        + b"\n\n")(h)


MODELS_ANSWERS = {
    "html": lambda h: send(h, b"<html>\n<body>hello</body>\n</html>", ctype="text/html"),
    "not json": lambda h: send(h, b"garbage{"),
    "no data": lambda h: send(h, {"object": "list"}),
    "no models": lambda h: send(h, {"data": []}),
    "data a string": lambda h: send(h, {"data": "x"}),
    "card a string": lambda h: send(h, {"data": ["x"]}),
    "card without id": lambda h: send(h, {"data": [{"name": "m"}]}),
    "a list": lambda h: send(h, [1, 2]),
}

STREAM_ANSWERS = {  # each is a bad response: one line, exit 1
    "malformed data line": sse(event("a"), b"data: {not json\n\n"),
    "content a number": sse(b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n\n'),
    "choices not a list": sse(b'data: {"choices": 5}\n\n'),
    "choices a string": sse(b'data: {"choices": "abc"}\n\n'),
    "delta a string": sse(b'data: {"choices": [{"index": 0, "delta": "abc"}]}\n\n'),
    "event a number": sse(b"data: 5\n\n"),
    "event a string": sse(b'data: "error here"\n\n'),
    "event null": sse(b"data: null\n\n"),
    "no [DONE]": sse(event("a"), event("b"), done=False),
    "html with 200": lambda h: send(h, b"<html>\n<body>hi</body>\n</html>", ctype="text/html"),
    "bad status line": lambda h: (h.wfile.write(b"HELLO\r\n\r\n"), h.wfile.flush()),
}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.models(self)

    def do_POST(self):
        self.body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        try:
            self.server.stream(self)
        except OSError:  # the client left
            pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def serve():
    """serve(models=..., stream=...) -> the URL of a server answering GET with models(handler) and POST with
    stream(handler)."""
    servers = []
    STOP.clear()

    def start(models=lambda h: send(h, CARD), stream=good_stream):
        server = Server(("127.0.0.1", 0), Handler)
        server.models, server.stream = models, stream
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    STOP.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def limit_memory():
    """In the child: at most 1 GiB of address space, so a client that keeps what it reads fails fast."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def lmc(*args, stdin="hi\n", timeout=20):
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit_memory, env={**os.environ, "LMC_CACHE": "/nonexistent-lmc"})


def chat(url, *flags, **kw):
    return lmc("chat", url, "--max-new-tokens", "8", *flags, **kw)


def bench(url, *flags, **kw):
    return lmc("bench", url, "--num-prompts", "3", "--concurrency", "2", "--input-len", "4", "--output-len", "4",
               "--json", *flags, **kw)


def one_error_line(r, *phrases, code=1):
    """Exit `code`, and stderr is one `error: ...` line holding every phrase."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    for phrase in phrases:
        assert phrase in r.stderr, r.stderr


# ----------------------------------------------------------------------------- tests


def test_a_good_server_works(serve):
    url = serve()
    r = chat(url)
    assert r.returncode == 0 and r.stdout == "x" * 8 + "\n", r.stderr
    r = bench(url)
    assert r.returncode == 0 and json.loads(r.stdout)["completed"] == 3, r.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:notaport", "http://[::1", "http://a b", "http://",
                                 "http://127.0.0.1:99999", "http://user@127.0.0.1:9", "http://127.0.0.1:9?x=1"])
@pytest.mark.parametrize("command", [chat, bench])
def test_a_url_that_is_not_a_server_url(command, url):
    one_error_line(command(url), "not a server URL", "http://host:port")


@pytest.mark.parametrize("answer", MODELS_ANSWERS)
@pytest.mark.parametrize("command", [chat, bench])
def test_a_models_answer_that_is_not_a_model_list(serve, command, answer):
    one_error_line(command(serve(models=MODELS_ANSWERS[answer])), "/v1/models")


def test_a_huge_models_answer_is_refused_without_reading_it_all(serve):
    url = serve(models=lambda h: endless(h, head=b'{"data": [{"id": "'))
    one_error_line(chat(url), "/v1/models", "MiB")


@pytest.mark.parametrize("vocab", ["lots", 10 ** 12, -5, 3])
def test_bench_refuses_a_vocab_size_it_cannot_draw_ids_from(serve, vocab):
    url = serve(models=lambda h: send(h, {"data": [{"id": "m", "vocab_size": vocab}]}))
    one_error_line(bench(url), "vocab_size")


def test_http_errors_are_one_line_that_says_what_to_do(serve):
    html = b"<html>\n<body>\nNot Found\n</body></html>"
    one_error_line(chat(serve(models=lambda h: send(h, html, 404, "text/html"))), "(404)", "OpenAI-compatible")
    error = {"error": {"message": "bad key", "code": "invalid_api_key"}}
    one_error_line(chat(serve(models=lambda h: send(h, error, 401))), "(401)", "bad key", "--api-key")
    one_error_line(chat(serve(models=lambda h: endless(h, 500, ctype="text/plain"))), "(500)")


def test_a_refused_chat_request_is_one_line_and_the_repl_goes_on(serve):
    url = serve(stream=lambda h: send(h, {"error": {"message": "boom\nline two", "code": "internal"}}, 500))
    r = chat(url)
    assert r.returncode == 0 and r.stderr.count("\n") == 1 and "(500): boom line two" in r.stderr, r.stderr
    url = serve(stream=sse(event("a"), b'data: {"error": {"message": "engine died\\nat step 3", "status": 500}}\n\n'))
    r = chat(url)
    assert r.stderr.count("\n") == 1 and "engine died at step 3" in r.stderr, r.stderr
    r = chat(serve(stream=sse(b'data: {"error": "plain"}\n\n')))
    assert r.stderr.count("\n") == 1 and "plain" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("answer", STREAM_ANSWERS)
def test_a_chat_stream_that_is_not_openai_events(serve, answer):
    one_error_line(chat(serve(stream=STREAM_ANSWERS[answer])))


def test_a_connection_cut_mid_stream_is_an_error(serve):
    def cut(h):
        sse(event("a"), done=False)(h)
        h.wfile.flush()
        h.connection.shutdown(2)
    r = chat(serve(stream=cut))
    one_error_line(r, "[DONE]")
    assert r.stdout == "a\n"  # the partial reply's line ends before the error line (one terminal shows both)


def test_a_stream_that_never_ends_stops_at_max_tokens(serve):
    url = serve(stream=lambda h: endless(h, head=b"", piece=event("x") * 100, ctype="text/event-stream"))
    one_error_line(chat(url), "max_tokens")
    one_error_line(bench(url), "none of the 3 requests completed", "max_tokens")
    url = serve(stream=lambda h: endless(h, piece=b": keep-alive\n\n" * 1000, ctype="text/event-stream"))
    one_error_line(chat(url), "max_tokens")


def test_a_line_without_end_is_refused_with_bounded_memory(serve):
    url = serve(stream=lambda h: endless(h, head=b"data: ", ctype="text/event-stream"))
    one_error_line(chat(url), "MiB")
    one_error_line(bench(url), "none of the 3 requests completed", "MiB")

    def hundred_mb(h):
        sse(b"data: " + b"x" * (100 * MIB), done=False)(h)
    one_error_line(chat(serve(stream=hundred_mb)), "MiB")


@pytest.mark.parametrize("answer", ["500", "malformed data line", "usage missing", "usage a number"])
def test_bench_where_no_request_completes_says_why(serve, answer):
    stream = {"500": lambda h: send(h, {"error": {"message": "boom"}}, 500),
              "malformed data line": STREAM_ANSWERS["malformed data line"],
              "usage missing": sse(event("x")),
              "usage a number": sse(event("x"), b'data: {"choices": [], "usage": 5}\n\n')}[answer]
    one_error_line(bench(serve(stream=stream)), "none of the 3 requests completed")


def test_the_client_times_out_on_a_silent_server(serve):
    client = Client(serve(models=silent), timeout=0.5)
    with pytest.raises(LmcError, match="no answer"):
        client.models()

    def stall(h):
        sse(event("a"), done=False)(h)
        h.wfile.flush()
        STOP.wait(60)
    client = Client(serve(stream=stall), timeout=0.5)
    with pytest.raises(LmcError, match="no answer") as e:
        list(client.chat_stream([{"role": "user", "content": "hi"}], max_tokens=4))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["chat", "bench"])
def test_ctrl_c_against_a_silent_server_exits_at_once(serve, command):
    url = serve(models=lambda h: send(h, CARD), stream=silent)
    args = ["chat", url] if command == "chat" else ["bench", url, "--num-prompts", "3", "--concurrency", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "lmc", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write("hi\n")
    proc.stdin.flush()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == "interrupted", (proc.returncode, err)
