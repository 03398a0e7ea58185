"""The converter's streaming pieces: plan without torch._dynamo, fusions written from views of the
source, the NaN/Inf check, the pipelined writer (errors, threads, small chunks), background hashing."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from blake3 import blake3
import torch
from test_convert_bytes import DIGESTS, tree_digest

import lmc.format.workspace as wsmod
import lmc.format.writing as writing
from lmc.compiler.convert import Builder, _finite, convert, plan
from lmc.compiler.readers import open_source
from lmc.compiler.source_files import early_source_files
from lmc.errors import LmcError
from lmc.format.archs import model_config_from_hf
from lmc.format.hashing import BackgroundHashes, file_digest
from lmc.format.workspace import TensorSpec, write_safetensors


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("write", "digest") and t.is_alive()]


def test_plan_and_convert_do_not_import_dynamo(checkpoint, tmp_path):
    """The old plan built every tensor on meta tensors; its first torch.cat imported torch._dynamo (2.4 s)."""
    ckpt = checkpoint("llama3")
    code = ("import sys; from lmc.compiler.convert import convert; convert(sys.argv[1], sys.argv[2]); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt), str(tmp_path / "ws")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


VERIFY_WITHOUT_TORCH = """
import json, sys
from lmc.cli import main
codes = {}
for ws in sys.argv[1:]:
    try:
        main(["verify", ws], standalone_mode=False)
        codes[ws] = 0
    except SystemExit as e:
        codes[ws] = e.code
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def test_verify_does_not_import_torch(checkpoint, tmp_path):
    """`lmc verify` takes the time of hashing the files: no torch import competing with the hash threads
    (on 2 cores a 2 GB shard hashed in 1.12 s alone, 1.52 s while torch imported). Sound workspaces
    (float and int4) pass, and each kind of damage is one line, all without torch."""
    import shutil

    from lmc.compiler.quantize import QuantizeOptions, quantize

    ckpt = checkpoint("qwen2", dtype=torch.float16)
    convert(ckpt, tmp_path / "fp")
    quantize(ckpt, tmp_path / "int4", QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True, device="cpu"),
             say=lambda *a, **k: None)
    shard = "weights/model-00001-of-00001.safetensors"

    def damaged(name, harm):
        ws = tmp_path / name
        shutil.copytree(tmp_path / "int4", ws)
        harm(ws)
        return ws

    def flip(ws):
        data = bytearray((ws / shard).read_bytes())
        data[-7] ^= 1
        (ws / shard).write_bytes(bytes(data))

    cases = {
        damaged("flip", flip): f"{shard}: blake3 mismatch",
        damaged("missing", lambda ws: (ws / "tokenizer" / "tokenizer.json").unlink()): "tokenizer/tokenizer.json: missing",
        damaged("unlisted", lambda ws: (ws / "weights" / "extra.bin").write_bytes(b"x")):
            "weights/extra.bin: not in the manifest",
        damaged("version", lambda ws: (ws / "manifest.json").write_text(
            (ws / "manifest.json").read_text().replace('"format_version": 2', '"format_version": 4'))): "format_version 4",
    }
    sound = [tmp_path / "fp", tmp_path / "int4"]
    out = subprocess.run([sys.executable, "-c", VERIFY_WITHOUT_TORCH, *map(str, sound + list(cases))],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["torch"] is False
    assert result["codes"] == {**{str(ws): 0 for ws in sound}, **{str(ws): 1 for ws in cases}}
    failed = out.stderr.splitlines()
    assert len(failed) == len(cases), out.stderr
    for line, (ws, message) in zip(failed, cases.items()):
        assert line.startswith(f"FAILED {ws}: ") and message in line and "(+" not in line, line


def test_torch_free_dtype_table_matches_torch():
    """lmc.format.manifest's safetensors dtype sizes (verify's nbytes check, no torch) are torch's item sizes."""
    from lmc.format.manifest import ITEM_BYTES

    assert {name: dtype.itemsize for dtype, name in wsmod.DTYPES.items()} == ITEM_BYTES


def test_plan_matches_the_built_tensors(checkpoint):
    source = open_source(checkpoint("qwen2", num_key_value_heads=2))  # q/k/v bias, tied embeddings
    builder = Builder(source, model_config_from_hf(source.hf_config), torch.float16, 2)
    rank_specs, owner = plan(builder)
    for rank, specs in enumerate(rank_specs):
        for spec in specs:
            t = builder.build(owner[(rank, spec.name)], rank)[spec.name]
            assert (t.dtype, tuple(t.shape)) == (spec.dtype, spec.shape), spec.name


def test_fused_linear_is_written_from_views_of_the_source(checkpoint):
    """q/k/v and gate/up are row blocks that share the mapped source's memory: nothing is copied."""
    source = open_source(checkpoint("llama3"))
    builder = Builder(source, model_config_from_hf(source.hf_config), torch.float32, 1)
    target = next(t for t in builder.targets if t.key == "w_qkv")
    blocks = builder.build_blocks(target, 0)[target.name + ".weight"]
    assert [b.data_ptr() for b in blocks] == [source.reader.get(s + ".weight").data_ptr() for s in target.sources]
    fused = builder.build(target, 0)[target.name + ".weight"]
    assert torch.equal(fused, torch.cat([source.reader.get(s + ".weight") for s in target.sources]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_check_finds_nan_and_inf_anywhere(dtype):
    clean = torch.randn(37, 129).to(dtype)  # odd sizes: the last elements are outside full vectors
    assert _finite(clean) and _finite(clean[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for flat in (0, 37 * 129 // 2, 37 * 129 - 1):
            t = clean.clone()
            t.view(-1)[flat] = bad
            assert not _finite(t), (bad, flat)


def test_nonfinite_source_still_refused(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = checkpoint("llama3")
    state = load_file(ckpt / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, -1] = float("inf")
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmcError, match="layers.1.feed_forward.w13.weight .* NaN or Inf"):
        convert(ckpt, tmp_path / "ws")
    assert not (tmp_path / "ws").exists() and not _writer_threads()


def test_writer_stops_its_threads_when_the_producer_fails(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float32, (1024, 64)) for i in range(4)]

    def produce(name):
        if name == "t2":
            raise LmcError("stop")
        return torch.zeros(1024, 64)

    with pytest.raises(LmcError, match="stop"):
        write_safetensors(tmp_path / "x.safetensors", specs, produce)
    assert not _writer_threads()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_writer_error_reaches_the_caller():
    """A write that fails on the writer thread (here ENOSPC) is raised in the caller's thread."""
    specs = [TensorSpec(f"t{i}", torch.float32, (1024, 1024)) for i in range(3)]
    with pytest.raises(OSError) as e:
        write_safetensors(Path("/dev/full"), specs, lambda name: torch.ones(1024, 1024))
    assert e.value.errno == 28
    assert not _writer_threads()


def test_row_blocks_are_checked_against_the_plan(tmp_path):
    spec = [TensorSpec("w", torch.float16, (6, 4))]
    ok = write_safetensors(tmp_path / "a.safetensors", spec, lambda n: [torch.ones(2, 4, dtype=torch.float16),
                                                                         torch.zeros(4, 4, dtype=torch.float16)])
    whole = write_safetensors(tmp_path / "b.safetensors", spec, lambda n: torch.cat([torch.ones(2, 4), torch.zeros(4, 4)]).half())
    assert ok[0] == whole[0]
    for wrong in ([torch.ones(2, 4, dtype=torch.float16)], [torch.ones(6, 3, dtype=torch.float16)],
                  [torch.ones(6, 4, dtype=torch.float32)], []):
        with pytest.raises(AssertionError, match="planned"):
            write_safetensors(tmp_path / "c.safetensors", spec, lambda n, w=wrong: w)


def test_small_chunks_and_little_in_flight_give_the_same_bytes(checkpoint, tmp_path, monkeypatch):
    """Many slices per tensor and a writer that keeps blocking the producer: still the pinned bytes."""
    monkeypatch.setattr(writing, "CHUNK", 1000)
    monkeypatch.setattr(writing, "MAX_IN_FLIGHT", 3000)
    convert(checkpoint("llama3"), tmp_path / "ws")
    assert tree_digest(tmp_path / "ws") == DIGESTS["llama3-fp32"]


def test_background_hashes_equal_hashlib(tmp_path, monkeypatch):
    import lmc.format.hashing as hashing

    monkeypatch.setattr(hashing, "CHUNK", 4096)
    files = []
    for size in (0, 1, 4095, 4096, 4097, 3 * 4096 + 5):
        f = tmp_path / f"f{size}"
        f.write_bytes(os.urandom(size))
        files.append(f)
    os.mkfifo(tmp_path / "fifo")  # never opened: a FIFO would block the reader
    (tmp_path / "link").symlink_to(files[-1])
    for algorithm, reference in (("blake3", blake3), ("sha256", hashlib.sha256)):
        hashes = BackgroundHashes(files + [tmp_path / "fifo"], algorithm, workers=3)
        for f in files:
            assert hashes.digest(f) == reference(f.read_bytes()).hexdigest() == file_digest(f, algorithm)
        assert hashes.digest(tmp_path / "link") == hashes.digest(files[-1])


def test_early_source_files_are_the_readers_files(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    assert early_source_files(ckpt) == open_source(ckpt).reader.source_files() == [ckpt / "model.safetensors"]
    sharded = checkpoint("llama3")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "consolidated.safetensors").write_bytes(b"not read")  # Mistral ships one beside the shards
    assert early_source_files(sharded) == open_source(sharded).reader.source_files() == [sharded / "model.safetensors"]
    assert early_source_files(tmp_path / "missing") == []


def test_cli_convert_json_is_quiet(checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmc", "convert", str(checkpoint("llama3")), "-o", str(tmp_path / "ws"),
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == ""
    summary = json.loads(out.stdout)
    assert summary["output"] == str(tmp_path / "ws") and summary["tensors"] > 0 and summary["seconds"] > 0
    assert summary["bytes"] == sum(f["size"] for f in json.loads((tmp_path / "ws" / "manifest.json").read_text())["files"].values())
    assert tree_digest(tmp_path / "ws") == DIGESTS["llama3-fp32"]
