"""Hostile input and data loss: remote code, paths that leave a folder, unlisted files, malformed
JSON, configs that do not fit the weights, NaN/Inf, concurrent and killed writers, re-targeting."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lmc.compiler.convert import convert
from lmc.errors import LmcError, WorkspaceError
from lmc.format.workspace import Workspace, _start_time, verify_workspace

SHARD = "weights/model-00001-of-00001.safetensors"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], capture_output=True, text=True)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _edit_json(path: Path, change) -> None:
    """Apply `change` to the parsed file in place; change None: wrap the whole document in a list."""
    data = json.loads(path.read_text())
    if change is None:
        data = [data]
    else:
        change(data)
    path.write_text(json.dumps(data))


def _refresh_lmc_json_record(ws: Path) -> None:
    """After editing lmc.json, make its manifest record match again (so only the edit is wrong)."""
    from lmc.format.writing import bytes_record

    _edit_json(ws / "manifest.json", lambda m: m["files"].__setitem__("lmc.json", bytes_record((ws / "lmc.json").read_bytes())))


@pytest.fixture
def workspace(checkpoint, tmp_path) -> Path:
    ws = tmp_path / "ws"
    convert(checkpoint("llama3"), ws)
    return ws


# ----------------------------------------------------------------------------- 1. no remote code


_EVIL = "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('remote code ran')\n"


def test_auto_map_tokenizer_is_refused_without_running_its_code(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenization_evil.py").write_text(_EVIL)
    _edit_json(ckpt / "tokenizer_config.json",
               lambda c: c.update(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}))
    with pytest.raises(LmcError, match="auto_map.*never runs a model folder's code"):
        convert(ckpt, tmp_path / "ws")
    _edit_json(ckpt / "tokenizer_config.json", lambda c: c.pop("auto_map"))  # the model config may name it too
    _edit_json(ckpt / "config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}))
    with pytest.raises(LmcError, match="auto_map.*never runs a model folder's code"):
        convert(ckpt, tmp_path / "ws")
    assert not (ckpt / "RAN").exists() and not (tmp_path / "ws").exists()


def _sentencepiece_folder(ckpt: Path) -> None:
    """Replace the checkpoint's tokenizer.json by a sentencepiece tokenizer.model (the old Llama way)."""
    import io

    import sentencepiece as spm

    text = ["The quick brown fox jumps over the lazy dog. Hello world, hello again."] * 40
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.model").write_bytes(model.getvalue())
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def test_sentencepiece_folder_builds_tokenizer_json_from_its_tokenizer_files_only(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    _sentencepiece_folder(ckpt)
    (ckpt / "tokenization_llama.py").write_text(_EVIL)  # a module transformers might look for beside the files
    convert(ckpt, tmp_path / "ws")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "ws" / "tokenizer" / "tokenizer.json"))
    assert tok.decode(tok.encode("Hello world").ids, skip_special_tokens=True).strip() == "Hello world"
    assert not (ckpt / "RAN").exists()
    assert str(tmp_path) not in (tmp_path / "ws" / "tokenizer" / "tokenizer_config.json").read_text()


def test_gguf_tokenizer_comes_from_the_file_alone(tmp_path, tokenizer_dir):
    pytest.importorskip("gguf")
    from test_gguf import _gguf_tokenizer_metadata, write_tiny_gguf

    from lmc.compiler.gguf import GGUFReader

    meta = _gguf_tokenizer_metadata(tokenizer_dir)
    write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer=meta)
    (tmp_path / "tokenization_evil.py").write_text(_EVIL)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, "bos_token": "EVIL"}))
    GGUFReader(tmp_path / "tiny.gguf").save_tokenizer(tmp_path / "out")
    tok_cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|im_start|>" and "auto_map" not in tok_cfg
    assert not (tmp_path / "RAN").exists()


def test_no_transformers_call_can_trust_remote_code():
    root = Path(__file__).parents[1]
    for folder in ("compiler", "format", "runtime", "lmc", "calib"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "trust_remote_code=True" not in text, path
            for line in text.splitlines():
                if "AutoTokenizer.from_pretrained(" in line or "AutoConfig.from_pretrained(" in line:
                    call = text[text.index(line):text.index(line) + 400]
                    assert "trust_remote_code=False" in call, (path, line)


# ----------------------------------------------------------------------------- 2. output is or contains the input


def test_output_that_is_or_contains_the_source_is_refused(checkpoint, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    ckpt = checkpoint("llama3")
    before = _tree(ckpt)
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    for out in (ckpt, ckpt.parent, link, ckpt / ".."):
        with pytest.raises(WorkspaceError, match="the input"):
            convert(ckpt, out, force=True)
        with pytest.raises(WorkspaceError, match="the input"):
            quantize(ckpt, out, QuantizeOptions(calib_samples=0, w_group_size=32, device="cpu"), force=True,
                     say=lambda m: None)
    assert _tree(ckpt) == before
    r = _cli("convert", ckpt, "-o", ckpt, "--force")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "the input" in r.stderr
    assert _tree(ckpt) == before


# ----------------------------------------------------------------------------- 3. confined paths


def test_manifest_paths_leaving_the_workspace_are_refused(workspace, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(workspace / SHARD, outside)
    cases = {"dotdot": "../outside.safetensors", "absolute": str(outside), "dot": f"./{SHARD}"}
    for name, rel in cases.items():
        ws = tmp_path / name
        shutil.copytree(workspace, ws)
        (ws / SHARD).unlink()

        def point(m, rel=rel):
            m["files"][rel] = m["files"].pop(SHARD)
            for entry in m["tensors"].values():
                entry["file"] = rel

        _edit_json(ws / "manifest.json", point)
        with pytest.raises(WorkspaceError, match="not a path inside the workspace"):
            Workspace(ws)
        problems = verify_workspace(ws)
        assert len(problems) == 1 and "not a path inside the workspace" in problems[0], problems


def test_symlink_pointing_outside_is_refused(workspace, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(workspace / SHARD, outside)  # same bytes: size and sha256 match
    (workspace / SHARD).unlink()
    (workspace / SHARD).symlink_to(outside)
    with pytest.raises(WorkspaceError, match="link pointing out"):
        Workspace(workspace)
    assert "link pointing out" in verify_workspace(workspace)[0]
    r = _cli("verify", workspace)
    assert r.returncode == 1 and r.stderr.count("\n") == 1


def test_symlink_inside_the_workspace_is_fine(workspace):
    shard = workspace / SHARD
    shard.rename(workspace / "weights" / "real.bin")
    shard.symlink_to("real.bin")
    problems = verify_workspace(workspace)
    assert problems == ["weights/real.bin: not in the manifest (remove it, or rebuild the workspace)"]
    assert Workspace(workspace).get("norm.weight").shape == (72,)


def test_inspect_shows_a_workspace_whose_provenance_records_are_odd(workspace):
    """The provenance is informational (a reader checks only that it is an object): `lmc inspect` prints what it can
    of odd records instead of a traceback."""
    _edit_json(workspace / "manifest.json", lambda m: m["provenance"].update(
        source_files={"a": 5, "b": {"size": 1, "sha256": "ab" * 32}}, calibration="x"))
    r = _cli("inspect", workspace)
    assert r.returncode == 0, r.stderr
    assert "source        b sha256 abababab" in r.stdout and "Traceback" not in r.stderr
    _edit_json(workspace / "manifest.json", lambda m: m["provenance"].update(source_files=[1]))
    assert _cli("inspect", workspace).returncode == 0


def test_verify_refuses_a_huge_safetensors_header_without_reading_it(workspace):
    """A shard whose checksums fit the manifest but whose header claims over 100 MB (safetensors' own limit) is
    refused from its 8-byte length, not read into memory and parsed."""
    import struct

    from lmc.format.manifest import MAX_HEADER_BYTES
    from lmc.format.writing import bytes_record

    shard = workspace / SHARD
    with open(shard, "wb") as f:  # sparse: the length word, then MAX_HEADER_BYTES + 1 bytes of nothing
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(8 + MAX_HEADER_BYTES + 1)
    manifest = json.loads((workspace / "manifest.json").read_text())
    manifest["files"][SHARD] = bytes_record(shard.read_bytes())
    (workspace / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_workspace(workspace)
    assert problems == [f"{SHARD}: not a safetensors file (header of {MAX_HEADER_BYTES + 1} bytes, over the "
                        f"{MAX_HEADER_BYTES} the safetensors library reads)"]


# ----------------------------------------------------------------------------- 4. unlisted files


def test_verify_flags_unlisted_files_anywhere(workspace, tmp_path):
    for rel in ("tokenizer/added_tokens.json", "weights/extra.safetensors", "notes.txt", "sub/dir/x"):
        ws = tmp_path / rel.replace("/", "_")
        shutil.copytree(workspace, ws)
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("{}")
        assert verify_workspace(ws) == [f"{rel}: not in the manifest (remove it, or rebuild the workspace)"]
    (workspace / "tokenizer" / "linked").symlink_to(tmp_path)
    assert verify_workspace(workspace) == ["tokenizer/linked: not in the manifest (remove it, or rebuild the workspace)"]


# ----------------------------------------------------------------------------- 5. source shard index


def test_shard_index_outside_folder_or_malformed_is_refused(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    other = tmp_path / "other"
    other.mkdir()
    shutil.move(ckpt / "model.safetensors", other / "model.safetensors")
    index = ckpt / "model.safetensors.index.json"
    names = json.loads(json.dumps(list(__import__("safetensors").safe_open(str(other / "model.safetensors"), "pt").keys())))
    for shard in ("../other/model.safetensors", str(other / "model.safetensors")):
        index.write_text(json.dumps({"metadata": {}, "weight_map": {n: shard for n in names}}))
        with pytest.raises(LmcError, match="outside the model folder"):
            convert(ckpt, tmp_path / "ws")
    for bad in ("not json {", "[]", json.dumps({"metadata": {}}), json.dumps({"weight_map": {"a": 3}}),
                json.dumps({"weight_map": []})):
        index.write_text(bad)
        with pytest.raises(LmcError, match="is malformed"):
            convert(ckpt, tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


# ----------------------------------------------------------------------------- 6. shapes and vocabulary


def test_source_shapes_are_checked_against_the_config(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    _edit_json(ckpt / "config.json", lambda c: c.update(intermediate_size=96))
    with pytest.raises(LmcError, match=r"source tensor model.layers.0.mlp.gate_proj.weight has shape \[100, 72\], "
                                       r"the config implies \[96, 72\]"):
        convert(ckpt, tmp_path / "a")
    ckpt = checkpoint("qwen3")
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state["model.layers.1.self_attn.k_norm.weight"] = torch.ones(12)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmcError, match=r"k_norm.weight has shape \[12\], the config implies \[24\]"):
        convert(ckpt, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tokenizer_ids_must_have_embedding_rows(checkpoint, tmp_path):
    ckpt = checkpoint("llama3", vocab_size=300)  # the test tokenizer has ids up to 399
    with pytest.raises(LmcError, match=r"token id 399 but tok_embeddings.weight has 300 rows \[300, 72\]"):
        convert(ckpt, tmp_path / "ws")
    convert(checkpoint("llama3", vocab_size=512), tmp_path / "big")  # more rows than tokens is normal
    assert Workspace(tmp_path / "big").config.vocab_size == 512


# ----------------------------------------------------------------------------- 7. verify: index covers the architecture


def test_verify_checks_the_index_against_the_architecture(workspace, tmp_path, checkpoint):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    missing, renamed, reshaped = (tmp_path / n for n in ("missing", "renamed", "reshaped"))
    for ws in (missing, renamed, reshaped):
        shutil.copytree(workspace, ws)
    _edit_json(missing / "manifest.json", lambda m: m["tensors"].pop("layers.0.attention.wo.weight"))
    _edit_json(renamed / "manifest.json",
               lambda m: m["tensors"].__setitem__("layers.0.attention.wx.weight", m["tensors"].pop("layers.0.attention.wo.weight")))

    def reshape(m):
        m["tensors"]["norm.weight"]["shape"] = [8, 9]

    _edit_json(reshaped / "manifest.json", reshape)
    assert verify_workspace(missing) == ["tensor layers.0.attention.wo.weight: missing (the llama config implies F32[72, 72])"]
    assert set(verify_workspace(renamed)) == {"tensor layers.0.attention.wo.weight: missing (the llama config implies F32[72, 72])",
                                              "tensor layers.0.attention.wx.weight: not a tensor of this llama config"}
    assert verify_workspace(reshaped) == ["tensor norm.weight: F32[8, 9], the llama config implies F32[72]"]
    for ws in (missing, renamed, reshaped):
        with pytest.raises(WorkspaceError, match="config implies|not a tensor"):
            Workspace(ws)
    # sound workspaces of every kind pass: tp 2 (rank names), int4 (triplets), qkv bias, q/k norms
    convert(checkpoint("qwen2", num_key_value_heads=2), tmp_path / "tp2", tp=2)
    quantize(checkpoint("qwen3"), tmp_path / "int4", QuantizeOptions(calib_samples=0, w_group_size=32, device="cpu",
                                                                      workspace=True), say=lambda m: None)
    for ws in ("tp2", "int4"):
        assert verify_workspace(tmp_path / ws) == [], ws


# ----------------------------------------------------------------------------- 8. NaN / Inf


def _poison(ckpt: Path, name: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state[name][3] = value
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_nonfinite_weights_are_refused_unless_allowed(checkpoint, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    ckpt = checkpoint("llama3")
    _poison(ckpt, "model.layers.1.mlp.down_proj.weight", float("nan"))
    with pytest.raises(LmcError, match=r"tensor layers.1.feed_forward.w2.weight \(from model.layers.1.mlp.down_proj\) "
                                       r"has NaN or Inf values as float32"):
        convert(ckpt, tmp_path / "a")
    warnings = []
    convert(ckpt, tmp_path / "b", allow_nonfinite=True, say=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: tensor layers.1.feed_forward.w2.weight")
    assert torch.isnan(Workspace(tmp_path / "b").get("layers.1.feed_forward.w2.weight")).any()
    r = _cli("convert", ckpt, "-o", tmp_path / "c", "--allow-nonfinite")
    assert r.returncode == 0 and "WARNING:" in r.stderr and "--allow-nonfinite" in r.stderr
    # a finite float32 value that overflows float16
    big = checkpoint("llama3")
    _poison(big, "model.layers.0.self_attn.q_proj.weight", 1e6)
    with pytest.raises(LmcError, match="w_qkv.weight .* has NaN or Inf values as float16"):
        convert(big, tmp_path / "d", dtype="float16")
    # quantize: the embeddings are checked before calibration uses them
    emb = checkpoint("llama3")
    _poison(emb, "model.embed_tokens.weight", float("inf"))
    opts = dict(calib_samples=0, w_group_size=32, device="cpu", workspace=True)
    with pytest.raises(LmcError, match="tensor tok_embeddings.weight .* NaN or Inf"):
        quantize(emb, tmp_path / "e", QuantizeOptions(**opts), say=lambda m: None)
    said = []
    quantize(emb, tmp_path / "f", QuantizeOptions(**opts, allow_nonfinite=True), say=said.append)
    assert any(m.startswith("WARNING: tensor tok_embeddings.weight") for m in said)
    assert not any((tmp_path / n).exists() for n in "ade")


# ----------------------------------------------------------------------------- 9. malformed lmc.json / manifest.json / AWQ config


def _meta_cases():
    def model(key, value):
        return lambda m: m["model"].__setitem__(key, value)

    def quant(**kw):
        base = {"method": "awq", "bits": 4, "group_size": 32, "layout": "lmc-int4-k8", "zero_point": True}
        return lambda m: m.__setitem__("quantization", {**base, **kw})

    return {
        "list": (None, "not a JSON object"),
        "no model": (lambda m: m.pop("model"), "lacks 'model'"),
        "unknown key": (lambda m: m.__setitem__("extra", 1), "unknown key 'extra'"),
        "model not object": (lambda m: m.__setitem__("model", [1]), "not an object"),
        "model type": (model("hidden_size", "72"), "hidden_size='72'"),
        "dtype": (lambda m: m.__setitem__("dtype", "float8"), "dtype 'float8'"),
        "dtype list": (lambda m: m.__setitem__("dtype", ["float16"]), "dtype ['float16']"),
        "tp zero": (lambda m: m.__setitem__("tp", 0), "tp 0"),
        "tp str": (lambda m: m.__setitem__("tp", "1"), "tp '1'"),
        "tp bool": (lambda m: m.__setitem__("tp", True), "tp True"),
        "version bool": (lambda m: m.__setitem__("format_version", True), "format_version True"),
        "quant list": (lambda m: m.__setitem__("quantization", [4]), "quantization is not a JSON object"),
        "bits": (quant(bits=8), "bits 8"),
        "group": (quant(group_size=48), "group_size 48"),
        "layout": (quant(layout="lmc-int4-n8"), "layout 'lmc-int4-n8' is not one this lmc reads"),
        "method": (quant(method="squeezellm"), "method 'squeezellm'"),
        "zero point": (quant(zero_point=False), "zero_point False"),
        "quant keys": (lambda m: m.__setitem__("quantization", {"method": "awq"}), "lacks 'bits'"),
        "engine": (lambda m: m.__setitem__("engine", "fast"), "engine is not a JSON object"),
        "engine value": (lambda m: m["engine"].__setitem__("session_len", -1), "session_len -1"),
    }


def _manifest_cases():
    def tensor(key, value):
        return lambda m: m["tensors"]["norm.weight"].__setitem__(key, value)

    return {
        "list": (None, "not a JSON object"),
        "no tensors": (lambda m: m.pop("tensors"), "lacks 'tensors'"),
        "files list": (lambda m: m.__setitem__("files", []), "must be JSON objects"),
        "provenance": (lambda m: m.__setitem__("provenance", 3), "provenance is not a JSON object"),
        "dtype": (tensor("dtype", "Q4"), "dtype 'Q4'"),
        "dtype list": (tensor("dtype", ["F32"]), "dtype ['F32']"),
        "shape": (tensor("shape", "72"), "shape '72'"),
        "offset": (tensor("offset", -5), "offset -5"),
        "nbytes": (tensor("nbytes", 4), "nbytes 4"),
        "file list": (tensor("file", ["x"]), "which the manifest does not list"),
        "file unlisted": (tensor("file", "weights/other.safetensors"), "which the manifest does not list"),
        "entry": (lambda m: m["tensors"].__setitem__("norm.weight", 3), "tensor 'norm.weight' is not a JSON object"),
        "no size": (lambda m: m["files"]["lmc.json"].pop("size"), "lacks 'size'"),
        "digest": (lambda m: m["files"]["lmc.json"].__setitem__("blake3", "xyz"), "64 hex digits"),
        "lists itself": (lambda m: m["files"].__setitem__("manifest.json", m["files"]["lmc.json"]), "'manifest.json'"),
        "null byte": (lambda m: m["files"].__setitem__("a\x00b", m["files"]["lmc.json"]), "not a path inside"),
    }


@pytest.mark.parametrize("which,case", [("lmc.json", c) for c in _meta_cases()] + [("manifest.json", c) for c in _manifest_cases()])
def test_malformed_json_is_one_workspace_error(which, case, workspace):
    change, message = (_meta_cases() if which == "lmc.json" else _manifest_cases())[case]
    _edit_json(workspace / which, change)
    if which == "lmc.json":
        _refresh_lmc_json_record(workspace)
    with pytest.raises(WorkspaceError) as e:
        Workspace(workspace)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    problems = verify_workspace(workspace)
    assert len(problems) == 1 and message in problems[0], problems


def test_malformed_json_cli_is_one_line(workspace):
    (workspace / "manifest.json").write_text("[" * 100000)
    for command in ("verify", "inspect"):
        r = _cli(command, workspace)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("change,field", [({"bits": 8}, "bits=8"), ({"version": "gemv"}, "version='gemv'"),
                                          ({"version": "exllama"}, "version='exllama'"),
                                          ({"zero_point": False}, "zero_point=False"),
                                          ({"group_size": 96}, "group_size=96"), ({"group_size": None}, "group_size=None")])
def test_malformed_awq_config_names_the_field(change, field, checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    qc = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True, **change}
    _edit_json(ckpt / "config.json", lambda c: c.update(quantization_config=qc))
    with pytest.raises(LmcError, match=f"{field}.*lmc reads AWQ int4 GEMM with zero point"):
        convert(ckpt, tmp_path / "ws")


# ----------------------------------------------------------------------------- 10. other quantized formats


@pytest.mark.parametrize("change,name", [  # GPTQ and compressed-tensors: tests/test_interchange.py
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "bitsandbytes"),
    ({"quantization_config": {"load_in_8bit": True}}, "quantized"),
])
def test_other_quantized_checkpoints_are_named(change, name, checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    _edit_json(ckpt / "config.json", lambda c: c.update(change))
    with pytest.raises(LmcError, match=f"^{name}.* checkpoints are not read; lmc reads float, AWQ, GPTQ and compressed-tensors"):
        convert(ckpt, tmp_path / "ws")


# ----------------------------------------------------------------------------- 11, 12. concurrent and killed writers


_HOOKED_CONVERT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import lmc.format.workspace as wsmod
    from lmc.compiler.convert import convert

    real, ready, go = wsmod.write_safetensors, Path(sys.argv[3]), Path(sys.argv[4])

    def hooked(path, specs, produce):
        ready.write_text("writing")
        while not go.exists():
            time.sleep(0.05)
        return real(path, specs, produce)

    wsmod.write_safetensors = hooked
    convert(sys.argv[1], sys.argv[2])
    print("converted")
""")


def _start_hooked(ckpt: Path, out: Path, tmp_path: Path, tag: str) -> tuple[subprocess.Popen, Path, Path]:
    ready, go = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.go"
    proc = subprocess.Popen([sys.executable, "-c", _HOOKED_CONVERT, str(ckpt), str(out), str(ready), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc, ready, go


def test_concurrent_converts_to_one_output_one_wins(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    out = tmp_path / "ws"
    first, _, go = _start_hooked(ckpt, out, tmp_path, "first")
    assert (tmp_path / ".ws.lock").read_text().split("-")[0] == str(first.pid)
    second = _cli("convert", ckpt, "-o", out)
    assert second.returncode == 1 and second.stderr.count("\n") == 1
    assert f"being written by another lmc (process {first.pid})" in second.stderr
    go.write_text("go")
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0 and "converted" in stdout, stderr
    assert verify_workspace(out) == [] and not (tmp_path / ".ws.lock").exists()


def test_output_appearing_during_the_write_is_not_replaced(checkpoint, tmp_path, monkeypatch):
    import lmc.format.workspace as wsmod

    ckpt, out = checkpoint("llama3"), tmp_path / "ws"
    real = wsmod.write_safetensors

    def intruder(path, specs, produce):
        out.mkdir(exist_ok=True)
        (out / "theirs").write_text("keep me")
        return real(path, specs, produce)

    monkeypatch.setattr(wsmod, "write_safetensors", intruder)
    with pytest.raises(WorkspaceError, match="appeared while it was being written"):
        convert(ckpt, out)
    assert (out / "theirs").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-0", "ws"]


def test_stale_lock_is_taken_over_and_a_live_one_is_not(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".ws.lock").write_text(f"{sleeper.pid}-{_start_time(sleeper.pid)}\n")
        with pytest.raises(WorkspaceError, match=f"another lmc \\(process {sleeper.pid}\\)"):
            convert(ckpt, tmp_path / "ws")
        (tmp_path / ".ws.lock").write_text(f"{sleeper.pid}-1\n")  # same pid, another start time: a reused pid
        convert(ckpt, tmp_path / "ws")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-0", "ws"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_convert_leaves_nothing_behind_after_the_next_run(sig, checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    out = tmp_path / "ws"
    proc, _, _ = _start_hooked(ckpt, out, tmp_path, "killed")
    partial = list(tmp_path.glob(".ws.tmp-*"))
    assert len(partial) == 1 and partial[0].name.startswith(f".ws.tmp-{proc.pid}-")
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    left = sorted(p.name for p in tmp_path.glob(".ws.*"))
    if sig == signal.SIGTERM:  # exits through its cleanup
        assert proc.returncode == 143 and left == []
    else:
        assert proc.returncode == -signal.SIGKILL and len(left) == 2  # the lock and the partial folder
    convert(ckpt, out)
    assert list(tmp_path.glob(".ws.*")) == [] and verify_workspace(out) == []


def test_replace_killed_between_its_renames_puts_the_previous_folder_back(checkpoint, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    token = f"{dead.stdout.strip()}-1"
    (tmp_path / f".ws.old-{token}-abc" / "old").mkdir(parents=True)
    (tmp_path / f".ws.old-{token}-abc" / "old" / "lmc.json").write_text("previous")
    (tmp_path / f".ws.tmp-{token}-def").mkdir()
    with pytest.raises(WorkspaceError, match="already exists"):
        convert(checkpoint("llama3"), tmp_path / "ws")
    assert (tmp_path / "ws" / "lmc.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-0", "ws"]


def test_sigterm_handler_is_restored(checkpoint, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    convert(checkpoint("llama3"), tmp_path / "ws")
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- 13. convert of a workspace


def test_convert_of_a_workspace_copies_it(workspace, tmp_path):
    said = []
    convert(workspace, tmp_path / "copy", say=said.append)
    assert _tree(tmp_path / "copy") == _tree(workspace)
    assert said == [f"{workspace} is already an lmc workspace: copying it unchanged"]
    convert(workspace, tmp_path / "same", dtype="float32", tp=1, say=said.append)  # its own values are fine
    with pytest.raises(LmcError, match="re-casting or re-splitting a split workspace is not supported"):
        convert(workspace, tmp_path / "other", dtype="float16")
    with pytest.raises(LmcError, match="does not divide attention heads"):  # a resplit checks tp as convert does
        convert(workspace, tmp_path / "other", tp=4)
    with pytest.raises(LmcError, match="drop --model-format"):
        convert(workspace, tmp_path / "other", model_format="hf")
    with pytest.raises(WorkspaceError, match="the input"):
        convert(workspace, workspace, force=True)
    (workspace / "tokenizer" / "extra.json").write_text("{}")
    with pytest.raises(WorkspaceError, match="fails `lmc verify`: tokenizer/extra.json: not in the manifest"):
        convert(workspace, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_quantize_workspace_fallback_then_convert_cli(checkpoint, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    summary = quantize(checkpoint("qwen3"), tmp_path / "q", QuantizeOptions(calib_samples=0, w_group_size=32, device="cpu"),
                       say=lambda m: None)
    assert summary["format"] == "workspace"  # K=72 does not fit AWQ's layout
    r = _cli("convert", tmp_path / "q", "-o", tmp_path / "ws")
    assert r.returncode == 0 and "already an lmc workspace" in r.stderr, r.stderr
    assert _tree(tmp_path / "ws") == _tree(tmp_path / "q")
    r = _cli("convert", tmp_path / "q", "-o", tmp_path / "tp2", "--tp", "2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "would split an int4 group of 32" in r.stderr


# ----------------------------------------------------------------------------- 14. provenance through quantize -> convert


def test_quantize_then_convert_keeps_the_calibration_record(checkpoint, tmp_path):
    from lmc.compiler.quantize import QuantizeOptions, quantize

    ckpt = checkpoint("llama3", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    opts = QuantizeOptions(calib_samples=4, calib_seqlen=32, w_group_size=32, batch_size=4, search_samples=2, device="cpu")
    summary = quantize(ckpt, tmp_path / "awq", opts, say=lambda m: None)
    assert summary["format"] == "awq"
    convert(tmp_path / "awq", tmp_path / "ws")
    prov = Workspace(tmp_path / "ws").manifest["provenance"]
    assert prov["quantized_by"]["calibration"]["windows_sha256"] == summary["calibration"]["windows_sha256"]
    assert prov["quantized_by"]["quantization"]["method"] == summary["method"]
    assert "lmc_provenance.json" in prov["source_files"]
    (tmp_path / "awq" / "lmc_provenance.json").write_text("[1, 2]")
    with pytest.raises(LmcError, match="lmc_provenance.json is not a JSON object"):
        convert(tmp_path / "awq", tmp_path / "ws2")
