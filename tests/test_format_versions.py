"""Workspace format versions: this lmc writes version 2 (BLAKE3 file digests) and still reads, verifies and
copies version 1 (sha256) byte for byte; a version it does not know, or lmc.json and manifest.json of two
versions, is refused with one line."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from blake3 import blake3

from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.format.manifest import FORMAT_VERSION
from lmc.format.workspace import Workspace, verify_workspace
from lmc.format.writing import dump_json

SHARD = "weights/model-00001-of-00001.safetensors"


@pytest.fixture
def workspace(checkpoint, tmp_path) -> Path:
    convert(checkpoint("llama3"), tmp_path / "ws", dtype="float16")
    return tmp_path / "ws"


def as_version_1(ws: Path) -> None:
    """Rewrite a version-2 workspace as version 1 wrote it: format_version 1, sha256 of every file."""
    meta = json.loads((ws / "lmc.json").read_bytes())
    meta["format_version"] = 1
    (ws / "lmc.json").write_bytes(dump_json(meta))
    manifest = json.loads((ws / "manifest.json").read_bytes())
    manifest["format_version"] = 1
    manifest["files"] = {rel: {"size": (ws / rel).stat().st_size, "sha256": hashlib.sha256((ws / rel).read_bytes()).hexdigest()}
                         for rel in manifest["files"]}
    (ws / "manifest.json").write_bytes(dump_json(manifest))


def test_written_as_version_2_with_blake3_digests(workspace):
    manifest = json.loads((workspace / "manifest.json").read_bytes())
    assert FORMAT_VERSION == 2 == manifest["format_version"] == json.loads((workspace / "lmc.json").read_bytes())["format_version"]
    for rel, record in manifest["files"].items():
        assert record == {"size": (workspace / rel).stat().st_size, "blake3": blake3((workspace / rel).read_bytes()).hexdigest()}
    for record in manifest["provenance"]["source_files"].values():
        assert set(record) == {"size", "blake3"}


def test_version_1_is_read_verified_and_copied_byte_for_byte(workspace, tmp_path):
    as_version_1(workspace)
    assert verify_workspace(workspace) == []
    assert Workspace(workspace).get("norm.weight").shape == (72,)
    convert(workspace, tmp_path / "copy")  # re-targeting copies the listed files and the manifest as they are
    for rel in ["lmc.json", "manifest.json", *json.loads((workspace / "manifest.json").read_bytes())["files"]]:
        assert (tmp_path / "copy" / rel).read_bytes() == (workspace / rel).read_bytes(), rel
    data = bytearray((workspace / SHARD).read_bytes())
    data[-3] ^= 1
    (workspace / SHARD).write_bytes(bytes(data))
    assert verify_workspace(workspace) == [f"{SHARD}: sha256 mismatch (file altered or corrupt)"]


def test_a_version_1_workspace_resplit_is_written_as_version_2(workspace, tmp_path):
    as_version_1(workspace)
    convert(workspace, tmp_path / "tp2", tp=2)
    assert verify_workspace(tmp_path / "tp2") == []
    for name in ("lmc.json", "manifest.json"):
        assert json.loads((tmp_path / "tp2" / name).read_bytes())["format_version"] == 2


def test_a_version_2_manifest_with_sha256_records_is_refused(workspace):
    manifest = json.loads((workspace / "manifest.json").read_bytes())
    record = manifest["files"][SHARD]
    manifest["files"][SHARD] = {"size": record["size"], "sha256": record.pop("blake3")}
    (workspace / "manifest.json").write_bytes(dump_json(manifest))
    [problem] = verify_workspace(workspace)
    assert f"file {SHARD!r} lacks 'blake3'" in problem and problem.count("\n") == 0


def test_mixed_and_unknown_versions_are_refused(workspace):
    meta = json.loads((workspace / "lmc.json").read_bytes())
    meta["format_version"] = 1
    (workspace / "lmc.json").write_bytes(dump_json(meta))
    [problem] = verify_workspace(workspace)
    assert "lmc.json is format version 1 but manifest.json is 2" in problem
    with pytest.raises(LmcError, match="lmc.json is format version 1 but manifest.json is 2"):
        Workspace(workspace)
    meta["format_version"] = 4
    (workspace / "lmc.json").write_bytes(dump_json(meta))
    [problem] = verify_workspace(workspace)
    assert "format_version 4 but this lmc reads versions 1, 2 and 3" in problem


@pytest.mark.parametrize("act_order,version,tp,problem", [
    (["w_qkv", "w2"], 3, 1, None), (["w2", "w_qkv"], 3, 1, "is not a non-empty list"), ([], 3, 1, "is not a non-empty"),
    (["w_qkv", "w_qkv"], 3, 1, "is not a non-empty"), (["lm_head"], 3, 1, "is not a non-empty"), ("w2", 3, 1, "is not"),
    (["wo"], 2, 1, "act_order needs format_version 3, the file says 2"), (["wo"], 3, 2, "act-order workspaces are tp 1")])
def test_act_order_entry_is_checked(act_order, version, tp, problem, tmp_path):
    """quantization.act_order (format version 3): the linear keys in name-table order, only in version 3, tp 1."""
    from lmc.format.manifest import check_quantization

    q = {"method": "gptq", "bits": 4, "group_size": 32, "layout": "lmc-int4-k8", "zero_point": True, "act_order": act_order}
    if problem is None:
        check_quantization(q, tmp_path, version, tp)
    else:
        with pytest.raises(LmcError, match=problem):
            check_quantization(q, tmp_path, version, tp)


def test_missing_blake3_package_is_one_line(monkeypatch, tmp_path):
    from lmc.format.hashing import file_digest

    (tmp_path / "f").write_bytes(b"x")
    assert file_digest(tmp_path / "f", "sha256") == hashlib.sha256(b"x").hexdigest()  # version 1 needs no blake3
    monkeypatch.setitem(sys.modules, "blake3", None)
    with pytest.raises(LmcError, match="pip install blake3"):
        file_digest(tmp_path / "f", "blake3")
