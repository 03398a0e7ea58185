"""lmc convert: every architecture's tensors, fusions, tp splits, dtypes, determinism, atomicity."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCH_CASES, CHATML, MIXED_TEXT

from lmc.compiler.convert import convert
from lmc.errors import LmcError
from lmc.format.workspace import Workspace


def _hf_state(ckpt: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    folder = ckpt / "llama_twin" if (ckpt / "llama_twin").is_dir() else ckpt
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _expected(state: dict, cfg) -> dict[str, torch.Tensor]:
    """The workspace a Llama-named state dict should give, built independently of the converter."""
    out = {"tok_embeddings.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[f"layers.{i}.attention_norm.weight"] = state[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        out[f"layers.{i}.attention.w_qkv.weight"] = torch.cat([state[a + x + "_proj.weight"] for x in "qkv"])
        if cfg.qkv_bias:
            out[f"layers.{i}.attention.w_qkv.bias"] = torch.cat([state[a + x + "_proj.bias"] for x in "qkv"])
        if cfg.qk_norm:
            out[f"layers.{i}.attention.q_norm.weight"] = state[a + "q_norm.weight"]
            out[f"layers.{i}.attention.k_norm.weight"] = state[a + "k_norm.weight"]
        out[f"layers.{i}.attention.wo.weight"] = state[a + "o_proj.weight"]
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
        out[f"layers.{i}.feed_forward.w2.weight"] = state[p + "mlp.down_proj.weight"]
    return out


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_every_tensor_matches_source(case, checkpoint, tmp_path):
    ckpt = checkpoint(case)
    convert(ckpt, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    expected = _expected(_hf_state(ckpt), ws.config)
    assert sorted(ws.tensor_names()) == sorted(expected)
    for name, ref in expected.items():
        got = ws.get(name)
        assert got.dtype == torch.float32
        assert torch.equal(got, ref), name


def test_config_fields(checkpoint, tmp_path):
    convert(checkpoint("llama3"), tmp_path / "a")
    cfg = Workspace(tmp_path / "a").config
    assert (cfg.architecture, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size) == ("llama", 6, 2, 12, 72)
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.factor == 8.0 and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling.original_max_position_embeddings == 64
    convert(checkpoint("qwen3"), tmp_path / "b")
    cfg = Workspace(tmp_path / "b").config
    assert cfg.qk_norm and cfg.head_dim == 24 and not cfg.qkv_bias
    convert(checkpoint("qwen2"), tmp_path / "c")
    cfg = Workspace(tmp_path / "c").config
    assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.num_kv_heads == 1


@pytest.mark.parametrize("case", ["llama3", "qwen2", "internlm2"])
def test_tp2_splits_reassemble(case, checkpoint, tmp_path):
    overrides = {"num_key_value_heads": 2} if case == "qwen2" else {}
    ckpt = checkpoint(case, **overrides)
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    one, two = Workspace(tmp_path / "tp1"), Workspace(tmp_path / "tp2")
    cfg = one.config
    assert two.tp == 2 and len(list((tmp_path / "tp2" / "weights").glob("rank1-*"))) == 1
    for name in one.tensor_names():
        ref = one.get(name)
        base, leaf = name.rsplit(".", 1)
        ranks = [f"{r}:{base}.{r}.{leaf}" for r in range(2)]
        if not two.has(ranks[0]):
            assert torch.equal(two.get(f"0:{name}"), ref) and torch.equal(two.get(f"1:{name}"), ref)
            continue
        parts = [two.get(n) for n in ranks]
        if "w_qkv" in name:  # each rank: its q heads, its k heads, its v heads
            sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
            per_rank = [p.split([s // 2 for s in sizes]) for p in parts]
            rebuilt = torch.cat([torch.cat([pr[j] for pr in per_rank]) for j in range(3)])
        elif "w13" in name:
            per_rank = [p.chunk(2) for p in parts]
            rebuilt = torch.cat([torch.cat([pr[j] for pr in per_rank]) for j in range(2)])
        else:  # row-parallel
            rebuilt = torch.cat(parts, dim=1)
        assert torch.equal(rebuilt, ref), name


def test_tp_refuses_indivisible_heads(checkpoint, tmp_path):
    with pytest.raises(LmcError, match="does not divide"):
        convert(checkpoint("llama3"), tmp_path / "ws", tp=4)
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("src_dtype,flag,want", [(torch.float16, "auto", torch.float16),
                                                 (torch.bfloat16, "auto", torch.bfloat16),
                                                 (torch.float32, "float16", torch.float16),
                                                 (torch.bfloat16, "float32", torch.float32)])
def test_dtypes(src_dtype, flag, want, checkpoint, tmp_path):
    ckpt = checkpoint("llama3", dtype=src_dtype)
    convert(ckpt, tmp_path / "ws", dtype=flag)
    ws = Workspace(tmp_path / "ws")
    assert ws.dtype == want
    from safetensors.torch import load_file

    src = load_file(ckpt / "model.safetensors")
    assert torch.equal(ws.get("layers.1.attention.wo.weight"), src["model.layers.1.self_attn.o_proj.weight"].to(want))


def test_bin_and_sharded_sources_give_the_same_workspace(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint("qwen2")
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        for f in ckpt.iterdir():
            if f.suffix != ".safetensors" and f.is_file() and not (folder / f.name).exists():
                (folder / f.name).write_bytes(f.read_bytes())
    for name, folder in (("a", ckpt), ("b", sharded), ("c", binary)):
        convert(folder, tmp_path / name)
    a, b, c = (Workspace(tmp_path / n) for n in "abc")
    for name in a.tensor_names():
        assert torch.equal(a.get(name), b.get(name)) and torch.equal(a.get(name), c.get(name)), name


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_byte_identical_rebuilds(checkpoint, tmp_path):
    ckpt = checkpoint("qwen3")
    convert(ckpt, tmp_path / "one")
    convert(ckpt, tmp_path / "two")
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")


def test_tensor_data_is_aligned(checkpoint, tmp_path):
    convert(checkpoint("qwen2"), tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    for name, entry in ws.manifest["tensors"].items():
        itemsize = torch.tensor([], dtype=ws.get(name).dtype).element_size()
        assert entry["offset"] % itemsize == 0, name
        if entry["nbytes"] >= 4096:
            assert entry["offset"] % 64 == 0, name


def test_existing_output_refused_and_interrupt_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    ckpt = checkpoint("llama3")
    convert(ckpt, tmp_path / "ws")
    before = _tree_bytes(tmp_path / "ws")
    with pytest.raises(LmcError, match="--force"):
        convert(ckpt, tmp_path / "ws")
    import lmc.format.workspace as wsmod

    real = wsmod.write_safetensors
    calls = []

    def dying(path, specs, produce):
        calls.append(path)
        if len(calls) == 1:
            real(path, specs, produce)
        raise KeyboardInterrupt

    monkeypatch.setattr(wsmod, "write_safetensors", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, tmp_path / "new", tp=2)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, tmp_path / "ws", force=True)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-0", "ws"]
    assert _tree_bytes(tmp_path / "ws") == before


def test_tokenizer_and_chat_template(checkpoint, tmp_path):
    import jinja2
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt = checkpoint("llama3")
    convert(ckpt, tmp_path / "ws")
    tok_dir = tmp_path / "ws" / "tokenizer"
    ours = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(ckpt)
    assert ours.encode(MIXED_TEXT, add_special_tokens=False).ids == ref.encode(MIXED_TEXT, add_special_tokens=False)
    assert ours.decode(ref.encode(MIXED_TEXT, add_special_tokens=False), skip_special_tokens=False) == MIXED_TEXT
    template = (tok_dir / "chat_template.jinja").read_text() if (tok_dir / "chat_template.jinja").exists() \
        else json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert template == CHATML
    messages = [{"role": "user", "content": "上海是 🙂?"}, {"role": "assistant", "content": "A city."}, {"role": "user", "content": "Hi"}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_bad_sources_name_the_problem(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_bigcode"}))
    with pytest.raises(LmcError, match="unknown architecture model_type='gpt_bigcode'"):
        convert(ckpt, tmp_path / "a")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(LmcError, match="source tensor model.layers.1.*not used"):
        convert(ckpt, tmp_path / "b")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(LmcError, match="lacks tensor model.layers.2"):
        convert(ckpt, tmp_path / "c")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmcError, match="truncated"):
        convert(ckpt, tmp_path / "d")
    with pytest.raises(LmcError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-0"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], capture_output=True, text=True)


def test_cli_convert_inspect_verify(checkpoint, tmp_path):
    ckpt = checkpoint("qwen2")
    ws = tmp_path / "ws"
    r = _cli("convert", ckpt, "-o", ws, "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    r = _cli("inspect", ws, "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "qwen2" and info["dtype"] == "float16" and info["quantization"] is None
    assert set(info["provenance"]["source_files"]) == {"config.json", "model.safetensors"}
    assert _cli("verify", ws).returncode == 0
    r = _cli("convert", ckpt, "-o", ws)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--force" in r.stderr


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_catches_damage(checkpoint, tmp_path):
    import shutil

    ckpt = checkpoint("llama3")
    good = tmp_path / "good"
    convert(ckpt, good)
    shard = "weights/model-00001-of-00001.safetensors"

    def damaged(name, harm) -> subprocess.CompletedProcess:
        ws = tmp_path / name
        shutil.copytree(good, ws)
        harm(ws)
        return _cli("verify", ws)

    cases = {
        "flip": (lambda ws: _flip_byte(ws / shard, (ws / shard).stat().st_size - 7), f"{shard}: blake3 mismatch"),
        "truncate": (lambda ws: (ws / shard).write_bytes((ws / shard).read_bytes()[:-100]), f"{shard}: size"),
        "missing": (lambda ws: (ws / "tokenizer" / "tokenizer.json").unlink(), "tokenizer/tokenizer.json: missing"),
        "version": (lambda ws: (ws / "lmc.json").write_text((ws / "lmc.json").read_text().replace('"format_version": 2', '"format_version": 7')),
                    "format_version 7"),
        "config": (lambda ws: _flip_byte(ws / "lmc.json", 40), "lmc.json"),
    }
    for name, (harm, message) in cases.items():
        r = damaged(name, harm)
        assert r.returncode == 1, name
        assert message in r.stderr and r.stderr.count("\n") == 1, (name, r.stderr)
    with pytest.raises(LmcError, match="format_version 7"):
        Workspace(tmp_path / "version")
