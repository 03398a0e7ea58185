"""The workspace cache behind `lmc generate/chat/eval ppl SOURCE`: keyed by content, re-hashed only when a
file's size or mtime changed, tokenizer files part of the key, `lmc cache list/clean`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lmc.api import resolve_workspace
from lmc.runtime.tokenizer import Tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LMC_CACHE", str(root))
    return root


def _cli(*args, cache):
    return subprocess.run([sys.executable, "-m", "lmc", "cache", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "LMC_CACHE": str(cache)}, timeout=120)


def test_unchanged_stats_are_not_hashed_again(checkpoint, cache, monkeypatch):
    import lmc.cache

    hashed = []
    content_key = lmc.cache.content_key
    monkeypatch.setattr(lmc.cache, "content_key", lambda p: hashed.append(p) or content_key(p))
    src = checkpoint("llama3")
    first = resolve_workspace(src)
    assert first.parent == cache / "workspaces" and (first / "lmc.json").is_file() and hashed == [src]
    # the same size and mtime: the index answers and nothing is hashed (so a flipped byte goes unseen)
    weights = src / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert resolve_workspace(src) == first and hashed == [src]
    # a newer mtime: hashed again, and the new bytes give a new workspace
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = resolve_workspace(src)
    assert hashed == [src, src] and second != first and second.parent == first.parent


def test_touch_rehashes_to_the_same_workspace_without_converting(checkpoint, cache, monkeypatch):
    src = checkpoint("qwen2")
    first = resolve_workspace(src)
    manifest_mtime = (first / "manifest.json").stat().st_mtime_ns
    os.utime(src / "config.json")  # same bytes, new mtime
    import lmc.compiler.convert

    monkeypatch.setattr(lmc.compiler.convert, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_workspace(src) == first
    assert (first / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_tokenizer_edit_gives_a_new_workspace(checkpoint, cache):
    src = checkpoint("llama3")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = (src / "chat_template.jinja").read_text()  # where older HF folders keep it
    (src / "chat_template.jinja").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    first = resolve_workspace(src)
    assert "im_start" in Tokenizer(first / "tokenizer").render_chat([{"role": "user", "content": "hi"}])
    config["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    second = resolve_workspace(src)
    assert second != first
    assert Tokenizer(second / "tokenizer").render_chat([{"role": "user", "content": "hi"}]) == "<<hi>>"


def test_failed_conversion_leaves_no_workspace(checkpoint, cache, monkeypatch):
    import lmc.compiler.convert

    src = checkpoint("llama3")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lmc.compiler.convert, "write_workspace", boom)
    with pytest.raises(RuntimeError):
        resolve_workspace(src)
    assert list((cache / "workspaces").iterdir()) == []  # no half-written folder, not even a temporary one
    monkeypatch.undo()
    monkeypatch.setenv("LMC_CACHE", str(cache))
    assert (resolve_workspace(src) / "lmc.json").is_file()


def test_cache_list_and_clean(checkpoint, cache):
    a, b = checkpoint("llama3"), checkpoint("qwen3")
    ws_a, ws_b = resolve_workspace(a), resolve_workspace(b)
    old = time.time() - 3 * 86400
    os.utime(ws_a, (old, old))  # a was last used three days ago
    (a / "generation_config.json").write_text('{"temperature": 0.5}')  # a's source changed: ws_a is stale
    ws_a2 = resolve_workspace(a)

    out = _cli("list", "--json", cache=cache)
    assert out.returncode == 0, out.stderr
    rows = {r["path"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {str(ws_a), str(ws_a2), str(ws_b)}
    assert rows[str(ws_b)]["source"] == str(b.resolve()) and not rows[str(ws_b)]["stale"]
    assert rows[str(ws_a)]["stale"] and not rows[str(ws_a2)]["stale"]
    assert rows[str(ws_b)]["size"] == sum(f.stat().st_size for f in ws_b.rglob("*") if f.is_file())
    assert list(rows) == [str(ws_a), str(ws_b), str(ws_a2)]  # least recently used first
    table = _cli("list", cache=cache).stdout
    assert str(ws_b) in table and "stale" in table and "3 workspaces" in table

    out = _cli("clean", cache=cache)  # default: the stale one only
    assert out.returncode == 0 and f"removed {ws_a} " in out.stdout
    assert not ws_a.exists() and ws_a2.exists() and ws_b.exists()
    os.utime(ws_b, (old, old))
    out = _cli("clean", "--older-than", 2, cache=cache)
    assert out.returncode == 0 and not ws_b.exists() and ws_a2.exists()
    assert _cli("clean", "--all", "--older-than", 1, cache=cache).returncode == 2
    out = _cli("clean", "--all", cache=cache)
    assert out.returncode == 0 and "removed 1 workspaces" in out.stdout and not ws_a2.exists()
    assert json.loads(_cli("list", "--json", cache=cache).stdout) == []
    assert resolve_workspace(a) == ws_a2  # cleaned away, converted again on the next use
