"""Hostile input to the workspace cache (`lmc cache`, $LMC_CACHE/index.json) and to `lmc inspect` / `lmc verify`
that once got past the checks: a traceback, unbounded memory or time, a path outside the cache read, written or
deleted. Each now gets one line and a non-zero exit, or is ignored where the cache can rebuild what it lost."""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import without_write_override

from lmc.compiler.convert import convert
from lmc.errors import LmcError, WorkspaceError

KEY = "0123456789abcdef"
SHARD = "weights/model-00001-of-00001.safetensors"


def _cli(*args, cache: Path | None = None, prefix: tuple[str, ...] = (), memory: int | None = None):
    """`lmc ARGS` in a subprocess (with LMC_CACHE, under a command prefix, with an address-space limit)."""
    env = {**os.environ, **({"LMC_CACHE": str(cache)} if cache is not None else {})}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))) if memory else None
    return subprocess.run([*prefix, sys.executable, "-m", "lmc", *map(str, args)], capture_output=True, text=True,
                          env=env, preexec_fn=limit, timeout=120)


def _one_line(r: subprocess.CompletedProcess, phrase: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and phrase in r.stderr, r.stderr


def _fake_workspace(folder: Path) -> Path:
    """A cached workspace as `lmc cache list/clean` sees it: a folder with lmc.json (its content is not read)."""
    folder.mkdir(parents=True)
    (folder / "lmc.json").write_text("{}")
    (folder / "weights").mkdir()
    (folder / "weights" / "w.safetensors").write_bytes(b"\0" * 1000)
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMC_CACHE", str(root))
    return root


@pytest.fixture
def workspace(checkpoint, tmp_path) -> Path:
    ws = tmp_path / "ws"
    convert(checkpoint("llama3"), ws)
    return ws


# ----------------------------------------------------------------------------- index.json


@pytest.mark.parametrize("entry", [
    {"workspaces": {f"m-{KEY}": "x"}},
    {"workspaces": {f"m-{KEY}": {"source": 5}}},
    {"workspaces": {f"m-{KEY}": {"source": ["a"]}}},
    {"sources": {"SRC": 5}},
    {"sources": {"SRC": {}}},
    {"sources": {"SRC": {"files": {}, "key": 5}}},
    {"sources": {"SRC": {"files": [], "key": KEY}}},
], ids=["workspace-str", "source-int", "source-list", "record-int", "record-empty", "key-int", "files-list"])
def test_malformed_index_entries_are_ignored(entry, cache, tmp_path):
    """Entries of index.json of the wrong type were a traceback in `lmc cache list` and `clean`; they are now
    dropped, as a missing or damaged index is (the cache re-hashes a source it does not know)."""
    src = tmp_path / "src"
    src.mkdir()
    ws = _fake_workspace(cache / "workspaces" / f"m-{KEY}")
    index = {"sources": {str(src): {"files": {}, "key": KEY}}, "workspaces": {ws.name: {"source": str(src)}}}
    for part, records in entry.items():
        index[part] = {name.replace("SRC", str(src)): rec for name, rec in records.items()}
    (cache / "index.json").write_text(json.dumps(index))
    r = _cli("cache", "list", "--json", cache=cache)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [row["path"] for row in json.loads(r.stdout)] == [str(ws)]
    r = _cli("cache", "clean", cache=cache)
    assert r.returncode == 0 and "removed 0 workspaces" in r.stdout, r.stderr
    assert (ws / "lmc.json").is_file()


def test_deeply_nested_or_huge_index_is_not_read(cache):
    """An index.json nested 100,000 deep was a RecursionError; one of 1 GiB (sparse) was read whole, 2 GB of
    memory. Both are now a damaged index: ignored, not parsed."""
    ws = _fake_workspace(cache / "workspaces" / f"m-{KEY}")
    (cache / "index.json").write_text("[" * 100_000)
    r = _cli("cache", "list", cache=cache)
    assert r.returncode == 0 and str(ws) in r.stdout and "Traceback" not in r.stderr, r.stderr
    (cache / "index.json").write_text('{"sources": {}, "workspaces": {}}')
    os.truncate(cache / "index.json", 1 << 30)
    r = _cli("cache", "list", cache=cache, memory=1 << 30)  # reading it whole needs twice that
    assert r.returncode == 0 and str(ws) in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_index_key_cannot_lead_outside_the_cache(checkpoint, cache, tmp_path):
    """A source's key in index.json is part of its workspace's path: "K/../../../victim" made the cache use a
    workspace outside it, or convert over (with --force) a folder outside it, such as a user's `lmc quantize`
    output. A key that is not 16 hex digits is now dropped, and the source hashed again."""
    from lmc.cache import cached_workspace

    src = checkpoint("llama3")
    ws = cached_workspace(src)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "lmc_provenance.json").write_text("{}")
    (victim / "model.safetensors").write_bytes(b"user data")
    before = _tree(victim)
    index = json.loads((cache / "index.json").read_text())
    for key in (f"{ws.name.rsplit('-', 1)[1]}/../../../victim", "/tmp", ""):
        index["sources"][str(src.resolve())]["key"] = key
        (cache / "index.json").write_text(json.dumps(index))
        assert cached_workspace(src) == ws
        assert _tree(victim) == before
    assert [p.name for p in (cache / "workspaces").iterdir()] == [ws.name]


# ----------------------------------------------------------------------------- what clean may remove


def test_clean_never_follows_links_or_removes_what_lmc_did_not_write(cache, tmp_path):
    """A link in the cache to a user's folder was listed (its size summed over the user's files) and reported
    "removed" though it was not; with $LMC_CACHE/workspaces a link to a user's folder (or LMC_CACHE set to a
    user's folder), `clean --all` deleted every folder in it. Only real folders named <name>-<key> holding
    lmc.json are cache entries now."""
    user = tmp_path / "user"
    (user / "photos").mkdir(parents=True)
    (user / "photos" / "a.jpg").write_bytes(b"jpeg")
    (user / "empty").mkdir()
    _fake_workspace(user / "mine")  # the user's own workspace
    ws = _fake_workspace(cache / "workspaces" / f"m-{KEY}")
    (cache / "workspaces" / "link").symlink_to(user / "photos")
    (cache / "workspaces" / ".link.tmp-1-2").symlink_to(user / "photos")
    r = _cli("cache", "list", "--json", cache=cache)
    assert r.returncode == 0 and [row["path"] for row in json.loads(r.stdout)] == [str(ws)], r.stdout
    r = _cli("cache", "clean", "--all", cache=cache)
    assert r.returncode == 0 and "removed 1 workspaces" in r.stdout and "/link" not in r.stdout, r.stdout
    assert not ws.exists() and (user / "photos" / "a.jpg").read_bytes() == b"jpeg"
    assert (cache / "workspaces" / "link").is_symlink()

    other = tmp_path / "other-cache"
    other.mkdir()
    (other / "workspaces").symlink_to(user)  # or LMC_CACHE=~ with a ~/workspaces of the user's own
    r = _cli("cache", "clean", "--all", cache=other)
    assert r.returncode == 0 and "removed 0 workspaces" in r.stdout, r.stdout
    assert (user / "photos" / "a.jpg").read_bytes() == b"jpeg" and (user / "empty").is_dir()
    assert (user / "mine" / "lmc.json").is_file()


def test_clean_of_an_unwritable_cache_is_one_line(cache):
    """An unwritable cache: `clean --all` printed "removed ..." for workspaces still there (rmtree's errors were
    ignored), then a traceback writing index.json. Now one line, exit 1, each workspace whole."""
    prefix = without_write_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    ws = _fake_workspace(cache / "workspaces" / f"m-{KEY}")
    (cache / "index.json").write_text('{"sources": {}, "workspaces": {}}')
    before = _tree(cache)
    for folder in (cache / "workspaces", cache):
        folder.chmod(0o555)
    try:
        _one_line(_cli("cache", "clean", "--all", cache=cache, prefix=prefix), "cannot remove")
        assert _tree(cache) == before and (ws / "lmc.json").is_file()
        (cache / "workspaces").chmod(0o755)  # the workspace can go, index.json cannot be replaced
        _one_line(_cli("cache", "clean", "--all", cache=cache, prefix=prefix), "LMC_CACHE")
        assert not ws.exists()
    finally:
        for folder in (cache, cache / "workspaces"):
            folder.chmod(0o755)


def test_unwritable_cache_names_lmc_cache(checkpoint, cache):
    """A source converted into an unwritable cache said "choose another --output", an option the user never
    gave; it now names LMC_CACHE. A cache that cannot record a use (read-only) still serves its workspaces."""
    prefix = without_write_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    src = checkpoint("llama3")
    cache.mkdir()
    cache.chmod(0o555)
    code = ("import sys; from pathlib import Path; from lmc.cache import cached_workspace; from lmc.errors import LmcError\n"
            "try: cached_workspace(Path(sys.argv[1]))\nexcept LmcError as e: sys.exit(f'error: {e}')")
    try:
        r = subprocess.run([*prefix, sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=120)
    finally:
        cache.chmod(0o755)
    _one_line(r, "LMC_CACHE")
    assert list(cache.iterdir()) == []


def test_a_cache_that_cannot_record_a_use_still_serves(checkpoint, cache, monkeypatch):
    """os.utime on a read-only cache raised OSError (a traceback in `lmc generate`); the last use is now best
    effort."""
    from lmc.cache import cached_workspace

    src = checkpoint("llama3")
    ws = cached_workspace(src)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    assert cached_workspace(src) == ws


def test_empty_lmc_cache_means_the_default(monkeypatch, tmp_path):
    """LMC_CACHE="" was the current folder: `lmc cache clean --all` there removed ./workspaces/*."""
    from lmc.cache import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LMC_CACHE", "")
    assert cache_root() == tmp_path / ".cache" / "lmc"


# ----------------------------------------------------------------------------- inspect and verify


@pytest.mark.parametrize("name", ["lmc.json", "manifest.json"])
def test_oversized_workspace_json_is_refused_unread(name, workspace):
    """A 1 GiB (sparse) lmc.json or manifest.json was read whole: 2.3 GB of memory and 10 s for `lmc inspect`.
    Over MAX_JSON_BYTES it is now refused from its size."""
    from lmc.format.manifest import MAX_JSON_BYTES

    os.truncate(workspace / name, 1 << 30)
    for command in ("verify", "inspect"):
        _one_line(_cli(command, workspace, memory=1 << 30 if command == "verify" else None),
                  f"over the {MAX_JSON_BYTES >> 20} MiB")


def test_manifest_of_many_tensors_is_bounded(workspace, monkeypatch):
    """A manifest of a million tensors took 9.5 s and 900 MB to verify (ten million: ten times that): a manifest
    is bounded by MAX_JSON_BYTES."""
    import lmc.format.manifest as manifest
    from lmc.format.workspace import Workspace, verify_workspace

    data = json.loads((workspace / "manifest.json").read_text())
    entry = data["tensors"]["norm.weight"]
    data["tensors"].update({f"t{i}": entry for i in range(2000)})
    (workspace / "manifest.json").write_text(json.dumps(data))
    monkeypatch.setattr(manifest, "MAX_JSON_BYTES", 100_000)
    problems = verify_workspace(workspace)
    assert len(problems) == 1 and "over the" in problems[0], problems
    with pytest.raises(WorkspaceError, match="over the"):
        Workspace(workspace)


def _edit_lmc_json(ws: Path, change) -> None:
    from lmc.format.writing import bytes_record

    meta = json.loads((ws / "lmc.json").read_text())
    change(meta)
    (ws / "lmc.json").write_text(json.dumps(meta))
    data = json.loads((ws / "manifest.json").read_text())
    data["files"]["lmc.json"] = bytes_record((ws / "lmc.json").read_bytes())
    (ws / "manifest.json").write_text(json.dumps(data))


def test_absurd_tp_is_refused_at_once(workspace, tmp_path):
    """lmc.json's tp was only checked to be positive: tp 2**20 (with sizes it divides) built a tensor index of
    millions of entries (`lmc verify` ran past 60 s and 1 GB); tp 10**6 said "intermediate_size=0 must be a
    positive integer". A tp that cannot split the model is refused, and an index far larger than the manifest's
    is not built."""
    from lmc.format.workspace import Workspace, verify_workspace

    big = tmp_path / "big"
    shutil.copytree(workspace, big)
    _edit_lmc_json(big, lambda m: (m.update(tp=1 << 20), m["model"].update(
        num_heads=1 << 20, num_kv_heads=1 << 20, intermediate_size=1 << 20, head_dim=1, hidden_size=1 << 20)))
    start = time.perf_counter()
    r = _cli("verify", big)
    assert r.returncode == 1 and "tensors" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.perf_counter() - start < 30
    with pytest.raises(WorkspaceError, match="tensors"):
        Workspace(big)
    _edit_lmc_json(workspace, lambda m: m.update(tp=10**6))
    problems = verify_workspace(workspace)
    assert len(problems) == 1 and "tp 1000000 cannot split this model" in problems[0], problems
    _one_line(_cli("verify", workspace), "cannot split")


def test_deeply_nested_safetensors_header_is_one_line(workspace):
    """A shard whose checksums fit the manifest but whose header is "[" * 100000 was a RecursionError traceback
    in `lmc verify`."""
    from lmc.format.writing import bytes_record

    shard = workspace / SHARD
    header = b"[" * 100_000
    shard.write_bytes(struct.pack("<Q", len(header)) + header + shard.read_bytes()[8:])
    data = json.loads((workspace / "manifest.json").read_text())
    data["files"][SHARD] = bytes_record(shard.read_bytes())
    (workspace / "manifest.json").write_text(json.dumps(data))
    r = _cli("verify", workspace)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a safetensors file" in r.stderr, r.stderr


def test_verify_of_a_file_says_what_to_do(tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line(_cli("verify", tmp_path / "f"), "pass a workspace made by `lmc convert`")


def test_verify_of_a_fifo_does_not_hang(workspace):
    """A FIFO in place of a weight file or of lmc.json is reported, never opened (opening one blocks)."""
    (workspace / SHARD).unlink()
    os.mkfifo(workspace / SHARD)
    r = _cli("verify", workspace)
    assert r.returncode == 1 and f"{SHARD}: missing" in r.stderr, r.stderr
    (workspace / "lmc.json").unlink()
    os.mkfifo(workspace / "lmc.json")
    for command in ("verify", "inspect"):
        _one_line(_cli(command, workspace), "lmc.json")
