"""llama.cpp GGUF files read as a Hugging Face checkpoint: tensors, config.json and tokenizer.

`GGUFReader` maps llama.cpp's tensor names (`blk.3.attn_q.weight`) to the names transformers
uses (`model.layers.3.self_attn.q_proj.weight`), dequantizes one tensor per `get` call from the
memory-mapped file, and undoes the q/k row permutation llama.cpp's converter applies to Llama
attention (exactly as transformers' GGUF loader does). The `gguf` package is imported lazily.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from lmc.errors import LmcError, one_line

# GGUF architecture -> transformers model_type; a "llama" file named like Mistral becomes "mistral"
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
# llama.cpp permutes q/k rows only for these (its interleaved rope); transformers undoes it for "llama" only
_PERMUTED_ARCHS = ("llama",)

_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3 rope scaling baked into per-frequency divisors
_LLAMA3_PRESET = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores each head's rows as rotary pairs, [h, d/2, 2]; transformers wants [h, 2, d/2]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # [rows, ...]


def llama3_rope_freqs(rope_theta: float, head_dim: int, factor: float, low_freq_factor: float,
                      high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as rope_freqs.weight for Llama 3 scaling."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))  # [D/2]


class GGUFReader:
    """One GGUF file as a streaming Hugging Face checkpoint (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _open(self.path)
        self.arch = self._text("general.architecture")
        if self.arch not in _MODEL_TYPES:
            raise LmcError(f"{self.path}: GGUF architecture {self.arch!r} is not supported (lmc reads "
                           f"{', '.join(sorted(_MODEL_TYPES))}); convert from the Hugging Face checkpoint instead")
        self._tensors = {}  # hf name -> gguf ReaderTensor
        self._extra = {}  # gguf name -> ReaderTensor of non-weight tensors (rope_freqs)
        for t in self._reader.tensors:
            hf = _hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
            elif t.name == _ROPE_FREQS:
                self._extra[t.name] = t
            else:
                raise LmcError(f"{self.path}: GGUF tensor {t.name!r} has no Hugging Face counterpart for "
                               f"architecture {self.arch!r}; this model variant is not supported")
        for name, gguf_name in (("model.embed_tokens.weight", "token_embd.weight"),
                                ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight")):
            if name not in self._tensors:
                raise LmcError(f"{self.path}: GGUF file has no {gguf_name}; it is not a complete model")
        self.n_head = self._meta(f"{self.arch}.attention.head_count")
        if self.n_head is None:
            raise LmcError(f"{self.path}: GGUF metadata lacks {self.arch}.attention.head_count; the file is incomplete")
        if type(self.n_head) is not int or self.n_head < 1:  # config_dict divides by it
            raise LmcError(f"{self.path}: GGUF metadata {self.arch}.attention.head_count is {self.n_head!r}, not a "
                           "positive integer; the file is corrupt")
        self.n_kv_head = self._meta(f"{self.arch}.attention.head_count_kv", self.n_head)

    def _meta(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _corrupt(self, key: str, value, what: str) -> LmcError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return LmcError(f"{self.path}: GGUF metadata {key} is {shown}, not {what}; the file is corrupt")

    def _text(self, key: str, default: str | None = None) -> str | None:
        """A string metadata value, or `default` where the key is absent."""
        value = self._meta(key, default)
        if value is not None and not isinstance(value, str):
            raise self._corrupt(key, value, "a string")
        return value

    def _token_id(self, key: str) -> int | None:
        """A token id metadata value (an integer; the config check bounds it by the vocabulary), or None."""
        value = self._meta(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self._corrupt(key, value, "a token id")
        return value

    def _number(self, key: str, default: float | None = None, positive: bool = False) -> float | int | None:
        """A finite numeric metadata value (int or float, not a bool), or `default` where the key is absent."""
        value = self._meta(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise self._corrupt(key, value, "a positive number" if positive else "a finite number")
        return value

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # ggml lists the innermost dim first

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._tensors[name])

    def get(self, name: str) -> torch.Tensor:
        import gguf

        t = self._tensors[name]
        kind = gguf.GGMLQuantizationType
        _torch_dtype(t)  # refuses integer tensors
        if t.tensor_type in (kind.F32, kind.F16):
            w = torch.from_numpy(np.array(t.data))
        elif t.tensor_type == kind.F64:
            w = torch.from_numpy(np.array(t.data, dtype=np.float32))
        elif t.tensor_type == kind.BF16:
            w = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)  # [.., 2K] bytes -> [.., K]
        else:
            try:
                w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))  # float32
            except NotImplementedError:
                raise LmcError(f"{self.path}: tensor {t.name} is {t.tensor_type.name}, which the installed gguf "
                               "package cannot dequantize; upgrade gguf (pip install -U gguf)") from None
        w = w.reshape(self.shape(name))
        if self.arch in _PERMUTED_ARCHS and ".self_attn.q_proj." in name:
            w = _unpermute_rows(w, self.n_head)
        elif self.arch in _PERMUTED_ARCHS and ".self_attn.k_proj." in name:
            w = _unpermute_rows(w, self.n_kv_head)
        return w.contiguous()

    def source_files(self) -> list[Path]:
        return [self.path]

    def _model_type(self) -> str:
        name = f"{self._text('general.name', '')} {self._text('general.basename', '')}".lower()
        return "mistral" if self.arch == "llama" and "mistral" in name else _MODEL_TYPES[self.arch]

    def _torch_dtype_name(self) -> str:
        """float32 if every weight is stored F32, bfloat16 if any is BF16, else float16 (F16 or quantized)."""
        import gguf

        kinds = {t.tensor_type for t in self._tensors.values() if len(t.shape) > 1}
        if kinds <= {gguf.GGMLQuantizationType.F32}:
            return "float32"
        return "bfloat16" if gguf.GGMLQuantizationType.BF16 in kinds else "float16"

    def _rope_scaling(self, rope_theta: float, head_dim: int) -> dict | None:
        a = self.arch
        kind = self._text(f"{a}.rope.scaling.type")
        factor = _given(self._number(f"{a}.rope.scaling.factor", positive=True),
                        self._number(f"{a}.rope.scale_linear", positive=True))
        if _ROPE_FREQS in self._extra:
            return self._llama3_scaling(rope_theta, head_dim)
        if kind == "none" or (kind is None and factor is None):
            return None
        if factor is None:
            raise LmcError(f"{self.path}: GGUF rope scaling type {kind!r} has no factor; the file is incomplete")
        if kind in (None, "linear"):
            return {"rope_type": "linear", "factor": _f32(factor)}
        if kind == "yarn":
            out = {"rope_type": "yarn", "factor": _f32(factor),
                   "original_max_position_embeddings": self._meta(f"{a}.rope.scaling.original_context_length")}
            for key in ("beta_fast", "beta_slow"):
                value = self._number(f"{a}.rope.scaling.yarn_{key}")
                if value is not None:
                    out[key] = _f32(value)
            return out
        raise LmcError(f"{self.path}: GGUF rope scaling type {kind!r} is not supported; "
                       "convert from the Hugging Face checkpoint instead")

    def _llama3_scaling(self, rope_theta: float, head_dim: int) -> dict:
        """Recognise Llama 3's scaling from the divisors llama.cpp baked into rope_freqs.weight."""
        import gguf

        t = self._extra[_ROPE_FREQS]
        freqs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)  # [D/2]
        factor = float(freqs.max())
        expected = llama3_rope_freqs(rope_theta, head_dim, factor, **_LLAMA3_PRESET)
        if freqs.shape != expected.shape or not np.allclose(freqs, expected, rtol=1e-4):
            raise LmcError(f"{self.path}: rope_freqs.weight does not match Llama 3 rope scaling (low 1, high 4, "
                           "original context 8192); convert from the Hugging Face checkpoint instead")
        return {"rope_type": "llama3", "factor": _f32(factor), **_LLAMA3_PRESET}

    def config_dict(self) -> dict:
        """A transformers-style config.json for this file (older `rope_theta`/`rope_scaling` keys)."""
        a, model_type = self.arch, self._model_type()
        hidden = self._meta(f"{a}.embedding_length")
        head_dim = self.shape("model.layers.0.self_attn.q_proj.weight")[0] // self.n_head
        rope_theta = _f32(self._number(f"{a}.rope.freq_base", 10000.0, positive=True))
        eps = self._number(f"{a}.attention.layer_norm_rms_epsilon", positive=True)
        if eps is None:
            raise LmcError(f"{self.path}: GGUF metadata lacks {a}.attention.layer_norm_rms_epsilon; the file is incomplete")
        cfg = {
            "architectures": [_HF_CLASSES[model_type]],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._meta(f"{a}.feed_forward_length"),
            "num_hidden_layers": self._meta(f"{a}.block_count"),
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self._meta(f"{a}.context_length"),
            "rms_norm_eps": _f32(eps),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(rope_theta, head_dim),
            "vocab_size": self.shape("model.embed_tokens.weight")[0],
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._token_id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._token_id("tokenizer.ggml.eos_token_id"),
            "torch_dtype": self._torch_dtype_name(),
        }
        pad = self._token_id("tokenizer.ggml.padding_token_id")
        if pad is not None:
            cfg["pad_token_id"] = pad
        if model_type in ("llama", "mistral"):
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        if model_type == "mistral":
            cfg["sliding_window"] = self._meta(f"{a}.attention.sliding_window")
        return cfg

    def generation_config(self) -> dict | None:
        """generation_config.json from the token ids and llama.cpp's recommended sampling, if any."""
        eos = [self._token_id(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(i for i in eos if i is not None))
        out = {"bos_token_id": self._token_id("tokenizer.ggml.bos_token_id"),
               "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
        pad = self._token_id("tokenizer.ggml.padding_token_id")
        if pad is not None:
            out["pad_token_id"] = pad
        sampling = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                    "repetition_penalty": "penalty_repeat"}
        for hf_key, gguf_key in sampling.items():
            value = self._number(f"general.sampling.{gguf_key}")  # a NaN is refused, never written as NaN
            if value is not None:
                out[hf_key] = value if isinstance(value, int) else _f32(value)
        if "temperature" in out:
            out["do_sample"] = out["temperature"] > 0
        out = {k: v for k, v in out.items() if v is not None}
        return out or None

    def save_tokenizer(self, out_dir: Path) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template), chat_template.jinja and
        generation_config.json, built by transformers' GGUF tokenizer converter (offline) from the file
        alone: it is linked into an empty folder, so no tokenizer file or code beside it is read."""
        import tempfile

        from transformers import AutoTokenizer

        out_dir = Path(out_dir)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "model.gguf").symlink_to(self.path.resolve())
            try:
                tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf", local_files_only=True,
                                                    trust_remote_code=False)
            except Exception as e:  # transformers raises many types for a tokenizer it cannot build
                raise LmcError(f"{self.path}: transformers could not build a tokenizer from this GGUF file "
                               f"({one_line(e)})") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
        cfg_path = out_dir / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text())
        for key in ("is_local", "local_files_only"):  # facts about this load, not about the tokenizer
            tok_cfg.pop(key, None)
        template = self._text("tokenizer.chat_template")
        if template is not None:
            tok_cfg["chat_template"] = template
        context = self._meta(f"{self.arch}.context_length")
        if context is not None:
            tok_cfg["model_max_length"] = context
        cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
        gen = self.generation_config()
        if gen is not None:
            (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def _given(*values):
    """The first value that is not None (absent); a 0 is kept, to be refused."""
    return next((v for v in values if v is not None), None)


def _torch_dtype(t) -> torch.dtype:
    import gguf

    kind = gguf.GGMLQuantizationType
    if t.tensor_type in (kind.I8, kind.I16, kind.I32, kind.I64):
        raise LmcError(f"GGUF tensor {t.name} is an integer tensor ({t.tensor_type.name}); lmc reads float "
                       "and quantized weights only")
    return {kind.F16: torch.float16, kind.BF16: torch.bfloat16}.get(t.tensor_type, torch.float32)


def _open(path: Path):
    """gguf.GGUFReader over `path`, with one-line errors for a missing, foreign or truncated file."""
    if not path.is_file():
        raise LmcError(f"{path} does not exist or is not a file; pass the path of a .gguf file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise LmcError(f"{path} is not a GGUF file (it does not start with b'GGUF'); pass a llama.cpp .gguf file")
    try:
        import gguf
    except ImportError:
        raise LmcError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise LmcError(f"{path} is a truncated or corrupt GGUF file ({one_line(e)}); re-download it") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise LmcError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} "
                           f"of {size}; re-download it")
    if reader.byte_order == "S":
        raise LmcError(f"{path} is a big-endian GGUF file; lmc reads little-endian GGUF files only")
    return reader
