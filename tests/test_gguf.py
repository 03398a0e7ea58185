"""GGUF reader: tiny GGUF files written here with gguf.GGUFWriter, and SmolLM2's real Q4_1 file (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc.errors import LmcError

gguf = pytest.importorskip("gguf")
from lmc.compiler.gguf import GGUFReader, llama3_rope_freqs  # noqa: E402

from conftest import CHATML, MIXED_TEXT  # noqa: E402

Q = gguf.GGMLQuantizationType
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEXTS = [MIXED_TEXT, "Hello world", "上海是中国最大的城市之一。", "🙂🚀🎉 emoji",
         "<|im_start|>user\nHi<|im_end|>\n",
         "  leading spaces and\ttabs\n\nnumbers 3.14159 and 1234567"]

# tiny llama: 3 heads of 32 (hidden 96 = three Q8_0 blocks), 1 KV head, ffn 40, vocab 37
H, HEADS, KV, D, FFN, VOCAB, LAYERS = 96, 3, 1, 32, 40, 37, 2


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Llama q/k rows: [h, 2, d/2] -> [h, d/2, 2] per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _as_stored(w: np.ndarray, qtype) -> tuple[np.ndarray, torch.Tensor]:
    """(bytes/array for GGUFWriter, the tensor GGUFReader.get must return for the unpermuted original)."""
    if qtype == Q.F32:
        return w, torch.from_numpy(w.copy())
    if qtype == Q.F16:
        return w.astype(np.float16), torch.from_numpy(w.astype(np.float16))
    blocks = gguf.quants.quantize(w, qtype)  # [rows, bytes]; blocks run along a row, so row permutes commute
    if qtype == Q.BF16:
        return blocks, torch.from_numpy(w).to(torch.bfloat16)
    return blocks, torch.from_numpy(gguf.quants.dequantize(blocks, qtype))


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True, name: str = "tiny", rope_freqs=None,
                    extra: dict | None = None, tokenizer: dict | None = None, seed: int = 0) -> dict:
    """Write a tiny random model in llama.cpp's layout; returns {hf name: tensor get() must return}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(500000.0 if rope_freqs is not None else 10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in (tokenizer or {}).items():
        getattr(w, f"add_{key}")(value)
    if tokenizer is None:
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    expected = {}

    def add(gguf_name: str, hf_name: str, shape: tuple, qtype, permute_heads: int = 0):
        value = rng.standard_normal(shape).astype(np.float32)
        if hf_name.endswith("norm.weight"):
            value = 1 + 0.2 * value
        stored = _llamacpp_permute(value, permute_heads) if permute_heads else value
        expected[hf_name] = _as_stored(value, qtype)[1]
        raw = _as_stored(stored, qtype)[0]
        w.add_tensor(gguf_name, raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    permuted = arch == "llama"
    add("token_embd.weight", "model.embed_tokens.weight", (VOCAB, H), Q.F16)
    for i in range(LAYERS):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (H,), Q.F32)
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (HEADS * D, H), Q.Q8_0, HEADS * permuted)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (KV * D, H), Q.F32, KV * permuted)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (KV * D, H), Q.F16)
        if arch == "qwen2":
            add(b + "attn_q.bias", p + "self_attn.q_proj.bias", (HEADS * D,), Q.F32)
            add(b + "attn_k.bias", p + "self_attn.k_proj.bias", (KV * D,), Q.F32)
            add(b + "attn_v.bias", p + "self_attn.v_proj.bias", (KV * D,), Q.F32)
        if arch == "qwen3":
            add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", (D,), Q.F32)
            add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", (D,), Q.F32)
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, HEADS * D), Q.BF16)
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,), Q.F32)
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (FFN, H), Q.F16)
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (FFN, H), Q.Q8_0)
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, FFN), Q.F32)
    add("output_norm.weight", "model.norm.weight", (H,), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", (VOCAB, H), Q.F16)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for gguf_name, value in (extra or {}).items():
        w.add_tensor(gguf_name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)])
def test_tiny_tensors_round_trip(tmp_path, arch, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, arch=arch, tied=tied)
    reader = GGUFReader(path)
    assert sorted(reader.names()) == sorted(expected)
    assert ("lm_head.weight" in reader.names()) == (not tied)
    assert reader.source_files() == [path]
    for name, want in expected.items():
        assert reader.shape(name) == tuple(want.shape), name
        assert reader.dtype(name) == want.dtype, name
        got = reader.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name  # q/k unpermuted bit-exactly


def test_tiny_config(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", tied=True)
    cfg = GGUFReader(tmp_path / "t.gguf").config_dict()
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D,
        "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "vocab_size": VOCAB, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": False,
    }
    write_tiny_gguf(tmp_path / "m.gguf", tied=False, name="Mistral-7B-Instruct-v0.3")
    cfg = GGUFReader(tmp_path / "m.gguf").config_dict()
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["tie_word_embeddings"] is False
    write_tiny_gguf(tmp_path / "q.gguf", arch="qwen3")
    cfg = GGUFReader(tmp_path / "q.gguf").config_dict()
    assert (cfg["model_type"], cfg["head_dim"], cfg["architectures"]) == ("qwen3", D, ["Qwen3ForCausalLM"])


def test_tiny_matches_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF loader gives the same state dict (names, values, q/k order) and config."""
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "tiny.gguf", tied=False)
    reader = GGUFReader(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    state = model.state_dict()
    assert sorted(state) == sorted(reader.names())
    for name in reader.names():
        assert torch.equal(reader.get(name).float(), state[name]), name
    cfg = reader.config_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "model_type"):
        assert cfg[key] == getattr(model.config, key), key


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp bakes Llama 3 scaling into rope_freqs.weight = default inv_freq / llama3 inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=H, num_attention_heads=HEADS, head_dim=D, max_position_embeddings=131072,
                     rope_parameters={**params, "rope_theta": 500000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")  # [D/2]
    plain = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)  # [D/2]
    freqs = (plain / scaled.double()).numpy()
    assert len(set(np.round(freqs, 3))) >= 3  # head_dim 32 at theta 5e5 hits all three bands
    np.testing.assert_allclose(llama3_rope_freqs(500000.0, D, **{k: v for k, v in params.items() if k != "rope_type"}),
                               freqs, rtol=1e-6)
    write_tiny_gguf(tmp_path / "l3.gguf", rope_freqs=freqs)
    reader = GGUFReader(tmp_path / "l3.gguf")
    assert reader.config_dict()["rope_scaling"] == params
    assert "rope_freqs.weight" not in reader.names()
    write_tiny_gguf(tmp_path / "odd.gguf", rope_freqs=freqs * np.linspace(1, 2, D // 2))
    with pytest.raises(LmcError, match="rope_freqs"):
        GGUFReader(tmp_path / "odd.gguf").config_dict()


def _gguf_tokenizer_metadata(tokenizer_dir: Path) -> dict:
    """The conftest's trained byte-level BPE, in llama.cpp's tokenizer metadata (GGUFWriter add_* names)."""
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"tokenizer_model": "gpt2", "tokenizer_pre": "default", "token_list": tokens,
            "token_types": [3 if t in specials else 1 for t in tokens], "token_merges": merges,
            "bos_token_id": vocab["<|im_start|>"], "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<|endoftext|>"], "add_bos_token": False, "chat_template": CHATML}


def test_tiny_save_tokenizer_matches_original(tmp_path, tokenizer_dir):
    """A tokenizer put into GGUF metadata comes back out encoding like the original tokenizer.json."""
    from tokenizers import Tokenizer

    meta = _gguf_tokenizer_metadata(tokenizer_dir)
    write_tiny_gguf(tmp_path / "tok.gguf", tokenizer=meta)
    out = tmp_path / "out"
    GGUFReader(tmp_path / "tok.gguf").save_tokenizer(out)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    original = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = original.encode(text).ids
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHATML
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_cfg["model_max_length"] == 128
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": meta["bos_token_id"], "eos_token_id": meta["eos_token_id"],
                   "pad_token_id": meta["pad_token_id"]}


def test_errors_are_one_line(tmp_path):
    with pytest.raises(LmcError, match="does not exist"):
        GGUFReader(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("hello, not a model\n")
    (tmp_path / "empty.gguf").write_bytes(b"")
    for name in ("text.gguf", "empty.gguf"):
        with pytest.raises(LmcError, match="is not a GGUF file"):
            GGUFReader(tmp_path / name)
    write_tiny_gguf(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 300, 40):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(LmcError, match="truncated") as err:
            GGUFReader(tmp_path / "cut.gguf")
        assert "\n" not in str(err.value)
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LmcError, match="architecture 'gpt2' is not supported"):
        GGUFReader(tmp_path / "gpt2.gguf")
    write_tiny_gguf(tmp_path / "moe.gguf", extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 4, 8), np.float32)})
    with pytest.raises(LmcError, match="blk.0.ffn_gate_exps.weight"):
        GGUFReader(tmp_path / "moe.gguf")


def test_importing_reader_does_not_import_gguf():
    code = "import sys, lmc.compiler.gguf; assert 'gguf' not in sys.modules, 'gguf imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_gguf, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    reader = GGUFReader(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    state = model.state_dict()
    cfg = reader.config_dict()

    # weights: every tensor, bit-exact; the tied head is the embedding
    assert cfg["tie_word_embeddings"] and "lm_head.weight" not in reader.names()
    assert sorted(reader.names()) == sorted(set(state) - {"lm_head.weight"})
    for name in reader.names():
        got = reader.get(name)
        assert got.dtype == reader.dtype(name) == torch.float32 and tuple(got.shape) == reader.shape(name), name
        assert torch.equal(got, state[name]), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])

    # config: the README's facts, and transformers' reading of the same metadata
    hf = model.config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"]) == (576, 30, 9, 3, 64, 49152)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"] and cfg["rope_scaling"] is None

    # a model built from config_dict() + get() computes the same logits as transformers' GGUF model
    ours_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "torch_dtype"})
    ours = AutoModelForCausalLM.from_config(ours_cfg, dtype=torch.float32).eval()
    ours.load_state_dict({n: reader.get(n) for n in reader.names()}, strict=False)
    ours.tie_weights()
    ids = torch.tensor([[1, 9690, 198, 19556, 28, 905, 359, 346, 47, 2, 198]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model.eval()(ids).logits)

    # tokenizer: saved files encode like transformers' GGUF tokenizer; template from the metadata
    reader.save_tokenizer(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ours_tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        ids = hf_tok(text).input_ids
        assert ours_tok.encode(text).ids == ids, text
        assert ours_tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
    assert ours_tok.encode("<|im_start|>").ids == [1]
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    assert tok_cfg["chat_template"] == hf_tok.chat_template == template
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
