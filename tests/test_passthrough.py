"""The torch-free converter (lmc.compiler.passthrough): for a float safetensors checkpoint kept in its dtype at
tp 1 it writes the torch converter's bytes (the pinned digests of test_convert_bytes.py included), refuses what
the torch converter refuses with the same line, declines everything else without writing, and never imports
torch; `lmc convert` takes it first."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmc.compiler.convert import convert
from lmc.compiler.passthrough import convert_passthrough
from lmc.errors import LmcError
from test_convert_bytes import DIGESTS, tree_digest


@pytest.mark.parametrize("case,family", [("llama3-fp32", "llama3"), ("qwen2-bias-tied", "qwen2")])
def test_pinned_bytes(case, family, checkpoint, tmp_path):
    assert convert_passthrough(checkpoint(family), tmp_path / "ws") is not None
    assert tree_digest(tmp_path / "ws") == DIGESTS[case]


@pytest.mark.parametrize("family,dtype", [("llama-linear-tied-mha", torch.float32), ("mistral", torch.bfloat16),
                                          ("qwen3", torch.float16), ("llama-dynamic", torch.float16)])
def test_same_bytes_as_the_torch_converter(family, dtype, checkpoint, tmp_path):
    ckpt = checkpoint(family, dtype=dtype)
    fast = convert_passthrough(ckpt, tmp_path / "fast")
    slow = convert(ckpt, tmp_path / "slow")
    assert fast == slow
    assert tree_digest(tmp_path / "fast") == tree_digest(tmp_path / "slow")


def _shards(ckpt):
    return sorted(ckpt.glob("*.safetensors"))


def test_declines_without_writing(checkpoint, tmp_path):
    fp32 = checkpoint("llama3")
    assert convert_passthrough(fp32, tmp_path / "a", tp=2) is None  # split weights
    assert convert_passthrough(fp32, tmp_path / "b", dtype="float16") is None  # a cast
    assert convert_passthrough(fp32, tmp_path / "c", model_format="gguf") is None
    assert convert_passthrough(checkpoint("internlm2"), tmp_path / "d") is None  # a fused wqkv to regroup
    pickled = checkpoint("llama3")
    torch.save(load_file(_shards(pickled)[0]), pickled / "pytorch_model.bin")
    _shards(pickled)[0].unlink()
    assert convert_passthrough(pickled, tmp_path / "e") is None  # a pickle: torch reads it (weights_only)
    extra = checkpoint("llama3")
    state = load_file(_shards(extra)[0])
    save_file({**state, "model.extra.weight": torch.zeros(2)}, _shards(extra)[0], metadata={"format": "pt"})
    assert convert_passthrough(extra, tmp_path / "f") is None  # the torch converter names the unused tensor
    with pytest.raises(LmcError, match="model.extra.weight is not used"):
        convert(extra, tmp_path / "f")
    mixed = checkpoint("llama3")
    state = load_file(_shards(mixed)[0])
    state["model.norm.weight"] = state["model.norm.weight"].half()
    save_file(state, _shards(mixed)[0], metadata={"format": "pt"})
    assert convert_passthrough(mixed, tmp_path / "g") is None  # one tensor in another dtype: cast by torch
    assert not any((tmp_path / n).exists() for n in "abcdefg")


def test_nonfinite_refused_or_kept_like_the_torch_converter(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    state = load_file(_shards(ckpt)[0])
    state["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("nan")
    save_file(state, _shards(ckpt)[0], metadata={"format": "pt"})
    messages = []
    for run in (convert_passthrough, convert):
        with pytest.raises(LmcError) as e:
            run(ckpt, tmp_path / "ws")
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert "layers.0.attention.w_qkv.weight (from model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj" in messages[0]
    assert not (tmp_path / "ws").exists()
    said = {}
    for name, run in (("fast", convert_passthrough), ("slow", convert)):
        warnings = []
        run(ckpt, tmp_path / name, allow_nonfinite=True, say=warnings.append)
        said[name] = warnings
    assert said["fast"] == said["slow"] and len(said["fast"]) == 1
    assert tree_digest(tmp_path / "fast") == tree_digest(tmp_path / "slow")


def test_foreign_tokenizer_refused_like_the_torch_converter(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = 100  # fewer embedding rows than the tokenizer's ids
    (ckpt / "config.json").write_text(json.dumps(config))
    state = load_file(_shards(ckpt)[0])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:100].contiguous()
    save_file(state, _shards(ckpt)[0], metadata={"format": "pt"})
    with pytest.raises(LmcError, match="does not belong to this model") as fast:
        convert_passthrough(ckpt, tmp_path / "ws")
    with pytest.raises(LmcError) as slow:
        convert(ckpt, tmp_path / "ws")
    assert str(fast.value) == str(slow.value)


def test_lmc_convert_takes_it_without_torch(checkpoint, tmp_path):
    """The CLI converts a plain float checkpoint with torch never imported, and writes the pinned bytes."""
    script = ("import sys\nfrom lmc.cli import main\n"
              "try:\n    main(['convert', sys.argv[1], '-o', sys.argv[2], '--json'])\nexcept SystemExit as e:\n    assert e.code == 0, e\n"
              "print('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", script, str(checkpoint("llama3")), str(tmp_path / "ws")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
    assert tree_digest(tmp_path / "ws") == DIGESTS["llama3-fp32"]


@pytest.mark.parametrize("entry", [{"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 40]},
                                   {"dtype": "F32", "shape": [True, 2], "data_offsets": [0.0, 8]},
                                   [1, 2]])
def test_hostile_header_entries_fall_back(entry, checkpoint, tmp_path):
    """A safetensors header entry of the wrong types or past its file: the torch-free path declines (no traceback,
    nothing written) and the torch converter says what is wrong in one line."""
    ckpt = checkpoint("llama3")
    shard = _shards(ckpt)[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.layers.0.input_layernorm.weight"] = entry
    new = json.dumps(header).encode()
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    assert convert_passthrough(ckpt, tmp_path / "ws") is None
    assert not (tmp_path / "ws").exists()
    with pytest.raises(LmcError):
        convert(ckpt, tmp_path / "ws")


def test_prefetch_asks_for_the_next_ranges_in_order(tmp_path, monkeypatch):
    """_Prefetch keeps PREFETCH_BYTES of the upcoming source ranges asked for (madvise WILLNEED from each range's
    page start), in the order they are used, and clamps a range to its file's map (a file that shrank)."""
    import mmap

    from lmc.compiler import passthrough as pt

    class Map:
        def __init__(self, size):
            self.size, self.calls = size, []

        def __len__(self):
            return self.size

        def madvise(self, option, start, length):
            assert option == mmap.MADV_WILLNEED and start % mmap.PAGESIZE == 0 and start + length <= self.size
            self.calls.append((start, length))

    page = mmap.PAGESIZE
    monkeypatch.setattr(pt, "PREFETCH_BYTES", 3 * page)
    a, b = Path("a"), Path("b")
    maps = {a: Map(10 * page), b: Map(2 * page + 5)}
    ranges = [pt._Range(a, 8, 8 + 2 * page, "F16", ()), pt._Range(b, page + 3, 2 * page + 3, "F16", ()),
              pt._Range(a, 5 * page, 6 * page, "F16", ()), pt._Range(b, 2 * page, 3 * page, "F16", ())]
    prefetch = pt._Prefetch(maps, ranges)
    prefetch.used(0)  # the first 3 pages' worth: ranges 0 and 1
    assert maps[a].calls == [(0, 2 * page + 8)] and maps[b].calls == [(page, page + 3)]
    prefetch.used(2 * page)  # range 0 consumed: 1 page ahead, so ranges 2 and 3 are asked for
    assert maps[a].calls[1:] == [(5 * page, page)]
    assert maps[b].calls[1:] == [(2 * page, 5)]  # clamped to the map's 2 pages + 5 bytes
    prefetch.used(page)
    assert len(maps[a].calls) == 2 and len(maps[b].calls) == 2  # nothing left to ask for
