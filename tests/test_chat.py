"""The `lmc chat` REPL on a local model (system prompt, /reset, multi-line input, --chat-template,
line editing and history on a terminal) and the chat template features it relies on."""
from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmc.api import pipeline
from lmc.compiler.convert import convert
from lmc.runtime.config import EngineConfig
from lmc.runtime.sampling import GenerationConfig
from lmc.runtime.tokenizer import NO_TEMPLATE_NOTE, Tokenizer

GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


@pytest.fixture
def workspace(checkpoint, tmp_path):
    convert(checkpoint("qwen2"), tmp_path / "ws")
    return tmp_path / "ws"


def _lmc(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_generation_tag_renders_as_transformers_does(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(GENERATION_TEMPLATE)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}]
    ours = Tokenizer(folder).render_chat(messages)
    assert ours == AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)
    assert "<|im_start|>assistant\nHello!<|im_end|>" in ours


def test_a_missing_template_calls_the_hook_once(tokenizer_dir, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", folder)
    tok = Tokenizer(folder)
    notes = []
    tok.on_missing_template = notes.append
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "user: hi\nassistant: "
    tok.render_chat([{"role": "user", "content": "again"}])
    assert notes == [NO_TEMPLATE_NOTE]


def test_chat_system_prompt_reset_multiline_and_chat_template(workspace, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(OTHER_TEMPLATE)
    pipe = pipeline(workspace, backend_config=EngineConfig(device="cpu"))
    pipe.tokenizer.chat_template = OTHER_TEMPLATE
    gen = GenerationConfig(max_new_tokens=5)
    system = {"role": "system", "content": "Be brief."}
    first = pipe([system, {"role": "user", "content": "Hello there"}], gen).text
    second = pipe([system, {"role": "user", "content": "line one\nline two"}], gen).text  # after /reset: alone
    third = pipe([system, {"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": second},
                  {"role": "user", "content": "one line"}], gen).text
    r = _lmc("chat", workspace, "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu", "--system", "Be brief.",
             "--chat-template", template,
             stdin='Hello there\n/reset\n"""\nline one\nline two\n"""\n"""one line"""\n/help\n',
             env={"LMC_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second}\n{third}\n"
    assert "(the conversation is reset)" in r.stderr and "/reset" in r.stderr  # /help lists the commands
    assert not (tmp_path / "cache" / "chat_history").exists()  # a pipe keeps no history
    r = _lmc("chat", workspace, "--chat-template", tmp_path / "missing.jinja", stdin="")
    assert r.returncode == 2 and "missing.jinja" in r.stderr


def test_chat_warns_when_the_model_has_no_template(checkpoint, tmp_path):
    ckpt = checkpoint("qwen2")
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    convert(ckpt, tmp_path / "ws")
    r = _lmc("chat", tmp_path / "ws", "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu",
             stdin="hi\nagain\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(f"warning: {NO_TEMPLATE_NOTE}") == 1
    assert len(r.stdout.split("\n")) >= 3  # both turns answered


def test_terminal_line_editing_and_history(workspace, tmp_path):
    """On a terminal: backspace edits the line, the up arrow recalls the last message, and the
    history is saved in $LMC_CACHE/chat_history."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: lmc chat on the pty
        os.environ["LMC_CACHE"] = str(tmp_path / "cache")
        os.execv(sys.executable, [sys.executable, "-m", "lmc", "chat", str(workspace), "--temperature", "0",
                                  "--max-new-tokens", "3", "--device", "cpu"])
    output = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal output
        deadline = time.monotonic() + 120
        while output.count(marker) < count:
            assert time.monotonic() < deadline, output[-400:]
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break

    try:
        read_until(b">>> ", 1)
        os.write(fd, b"Hellp\x7fo there\r")  # a typo, erased with backspace
        read_until(b">>> ", 2)
        os.write(fd, b"\x1b[A\r")  # up arrow: the last message again
        read_until(b">>> ", 3)
        os.write(fd, b"exit\r")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    recalled = output.split(b">>> ")[2]  # what the terminal shows after the second prompt
    assert recalled.startswith(b"Hello there"), recalled
    history = (tmp_path / "cache" / "chat_history").read_text().splitlines()
    assert history == ["Hello there", "exit"]  # (a repeated line is kept once, as Python's readline does)


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages }}{% endfor %}{% endfor %}",  # 3.7 GB kind
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # spins, prints nothing
    "{{ 'x' * 10000000000 }}",  # one huge allocation
    "{{ 7 ** 100000000 }}",  # a number of 84 million digits
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",  # endless recursion
    "{{ messages[0]['content'] + 1 }}",  # TypeError from the template's own expression
    "{{ messages[5] }}{{ 1 // 0 }}",  # ZeroDivisionError
    "{{ 'a'.zfill('b') }}",  # a method called with a wrong argument
])
def test_a_hostile_chat_template_is_refused_in_bounded_time(template):
    import time

    from lmc.errors import LmcError
    from lmc.runtime.tokenizer import render_bounded

    start = time.monotonic()
    with pytest.raises(LmcError, match="chat template"):
        render_bounded(template, {"messages": [{"role": "user", "content": "hi"}]}, 40)
    assert time.monotonic() - start < 10


def test_a_normal_chat_template_renders_as_before():
    from lmc.runtime.tokenizer import render_bounded

    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% for i in range(3) %}.{% endfor %}"
    msgs = [{"role": "user", "content": "hello " * 1000}]
    assert render_bounded(template, {"messages": msgs}, 6000) == "<|user|>" + "hello " * 1000 + "..."
