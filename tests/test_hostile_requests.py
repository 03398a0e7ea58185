"""Hostile requests to `lmc serve`, in process (FastAPI's TestClient over a tiny engine on the CPU): each gets
one OpenAI-style 4xx error saying what is wrong, and none makes the server read, decode or tokenize in
proportion to what the client sent beyond the server's bounds."""
from __future__ import annotations

import base64

import pytest
from conftest import make_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402

from lmc.compiler.convert import convert  # noqa: E402
from lmc.runtime.config import EngineConfig  # noqa: E402
from lmc.runtime.engine import Engine  # noqa: E402
from lmc.runtime.vision import MAX_IMAGES  # noqa: E402
from lmc.serve.app import ServeOptions, create_app  # noqa: E402
from lmc.serve.protocol import MAX_CHOICES, MAX_STOP, MAX_TEMPLATE_CHARS  # noqa: E402

SESSION_LEN = 256
BODY_LIMIT = 1 << 20
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    convert(make_checkpoint("qwen2", root / "ckpt", tokenizer_dir), root / "ws")
    engine = Engine(str(root / "ws"), EngineConfig(device="cpu", session_len=SESSION_LEN, cache_block_seq_len=16,
                                                   max_batch_size=64))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, ServeOptions("tiny", max_body_bytes=BODY_LIMIT))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def error_of(r, status: int) -> dict:
    """The OpenAI error object of a response that must have this status."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    return error


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, **body})


def test_a_body_over_the_limit_is_413_before_it_is_read(client):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * BODY_LIMIT + b'"}]}'
    error = error_of(client.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}), 413)
    assert str(BODY_LIMIT) in error["message"] and error["code"] == "request_too_large", error
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: counted as it arrives
    error = error_of(client.post("/v1/chat/completions", content=chunks, headers={"Content-Type": "application/json"}), 413)
    assert str(BODY_LIMIT) in error["message"] and error["code"] == "request_too_large", error
    assert chat(client).status_code == 200


def test_a_text_too_long_for_the_session_is_refused_without_tokenizing_it(client, engine, monkeypatch):
    encoded = []
    real = engine.tokenizer.tok.encode
    monkeypatch.setattr(engine.tokenizer, "tok", type("Spy", (), {  # every other method as the real tokenizer's
        "encode": lambda self, text, **kw: encoded.append(len(text)) or real(text, **kw),
        "__getattr__": lambda self, name: getattr(real.__self__, name)})())
    text = "x " * (BODY_LIMIT // 4)
    for r, what in ((client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]}),
                     "messages"),
                    (client.post("/v1/completions", json={"prompt": text}), "prompt"),
                    (client.post("/v1/completions", json={"prompt": ["hi", text]}), "prompt")):
        error = error_of(r, 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == what, error
        assert "characters" in error["message"] and "--session-len" in error["message"], error
    assert max(encoded, default=0) < len(text)


@pytest.mark.parametrize("body,param", [
    ({"seed": 2 ** 64, "temperature": 1.0}, "seed"),
    ({"seed": -2 ** 63 - 1, "temperature": 1.0}, "seed"),
    ({"seed": 2 ** 64 - 1, "n": 2, "temperature": 1.0}, "seed"),  # choice 1 would be seeded with 2**64
])
def test_a_seed_beyond_64_bits_is_400(client, body, param):
    error = error_of(chat(client, **body), 400)
    assert error["param"] == param and "seed" in error["message"], error


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_infinite_sampling_values_are_400(client, field):
    r = client.post("/v1/chat/completions", headers={"Content-Type": "application/json"},
                    content='{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "%s": Infinity}' % field)
    error = error_of(r, 400)
    assert error["param"] == field and "inf" in error["message"], error


def test_a_temperature_too_small_for_float32_samples_greedily(client):
    """temperature 1e-300 is 0 in float32: the logits divided by it were NaN, and the tokens noise."""
    body = {"prompt": "hello", "max_tokens": 6, "ignore_eos": True}
    tiny = client.post("/v1/completions", json={**body, "temperature": 1e-300})
    greedy = client.post("/v1/completions", json={**body, "temperature": 0})
    assert tiny.status_code == greedy.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_more_choices_than_a_call_may_hold_is_400(client):
    n = 128
    prompts = ["hi"] * (MAX_CHOICES // n + 1)
    error = error_of(client.post("/v1/completions", json={"prompt": prompts, "n": n, "max_tokens": 1}), 400)
    assert error["param"] == "n" and str(MAX_CHOICES) in error["message"], error


def test_a_chat_template_too_large_to_compile_is_400(client):
    """A request's template is compiled (in the event loop, and kept in a cache): 12 MB took 15 s and 1.5 GB."""
    error = error_of(chat(client, chat_template="x" * (MAX_TEMPLATE_CHARS + 1)), 400)
    assert error["param"] == "chat_template" and str(MAX_TEMPLATE_CHARS) in error["message"], error


def image_chat(client, urls: list[str]):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "what?"}]
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})


def test_images_are_refused_before_they_are_loaded(client, engine, monkeypatch):
    """A text-only workspace, or more images than a prompt takes: nothing is fetched or decoded (a junk data URL
    would say so if it were)."""
    junk = "data:image/png;base64,@@@@"
    error = error_of(image_chat(client, [junk]), 400)
    assert "no vision tower" in error["message"], error
    monkeypatch.setattr(engine.workspace, "vision", object())  # as if it had one: the count is checked first
    error = error_of(image_chat(client, [junk] * (MAX_IMAGES + 1)), 400)
    assert f"at most {MAX_IMAGES}" in error["message"], error


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "../../../etc/passwd",
                                 "data:image/png;base64," + base64.b64encode(b"not a png").decode()])
def test_image_urls_on_a_text_server_never_read_anything(client, url):
    error = error_of(image_chat(client, [url]), 400)
    assert "no vision tower" in error["message"], error


def test_more_stop_strings_than_taken_is_400(client):
    """Every stop string is checked on every token with the engine's lock held: a request cannot send thousands."""
    error = error_of(chat(client, stop=["x"] * (MAX_STOP + 1)), 400)
    assert error["param"] == "stop" and f"at most {MAX_STOP}" in error["message"], error
    assert chat(client, stop=["x"] * MAX_STOP).status_code == 200
