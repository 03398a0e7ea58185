"""Architectures: reading a Hugging Face config.json into ModelConfig, and one name table each.

A name table maps the source checkpoint's tensors to the workspace's TurboMind-style names.
Linears are listed by their base name (without `.weight`/`.qweight`...), so the same table
serves float and AWQ checkpoints. `fuse` says how several sources become one target:

  "cat"            concatenate the sources along the output rows (q,k,v -> w_qkv; gate,up -> w13)
  "internlm2_qkv"  one source, InternLM2's grouped wqkv, split into q, k, v first, then "cat"

`split` says how the target is cut for tensor parallelism: "col" (each source's rows are
chunked, then fused per rank), "row" (columns chunked) or None (replicated).
"""
from __future__ import annotations

from dataclasses import dataclass

from lmc.errors import LmcError
from lmc.runtime.config import ModelConfig, RopeScaling


@dataclass(frozen=True)
class Target:
    name: str  # workspace name, without the .weight/.bias suffix for linears
    sources: tuple[str, ...]  # source names, same convention
    linear: bool = False  # True: `.weight` (+ `.bias` when present) or AWQ triplets
    fuse: str = "cat"
    split: str | None = None


def _llama_like_layer(cfg: ModelConfig) -> list[Target]:
    attn = "self_attn."
    targets = [
        Target("attention_norm.weight", ("input_layernorm.weight",)),
        Target("attention.w_qkv", (attn + "q_proj", attn + "k_proj", attn + "v_proj"), linear=True, split="col"),
        Target("attention.wo", (attn + "o_proj",), linear=True, split="row"),
        Target("ffn_norm.weight", ("post_attention_layernorm.weight",)),
        Target("feed_forward.w13", ("mlp.gate_proj", "mlp.up_proj"), linear=True, split="col"),
        Target("feed_forward.w2", ("mlp.down_proj",), linear=True, split="row"),
    ]
    if cfg.qk_norm:
        targets += [
            Target("attention.q_norm.weight", (attn + "q_norm.weight",)),
            Target("attention.k_norm.weight", (attn + "k_norm.weight",)),
        ]
    return targets


def _internlm2_layer(cfg: ModelConfig) -> list[Target]:
    return [
        Target("attention_norm.weight", ("attention_norm.weight",)),
        Target("attention.w_qkv", ("attention.wqkv",), linear=True, fuse="internlm2_qkv", split="col"),
        Target("attention.wo", ("attention.wo",), linear=True, split="row"),
        Target("ffn_norm.weight", ("ffn_norm.weight",)),
        Target("feed_forward.w13", ("feed_forward.w1", "feed_forward.w3"), linear=True, split="col"),
        Target("feed_forward.w2", ("feed_forward.w2",), linear=True, split="row"),
    ]


@dataclass(frozen=True)
class ArchTable:
    layer_prefix: str  # source prefix of layer i, with {i}
    embed: str
    final_norm: str
    lm_head: str
    layer_targets: object  # (ModelConfig) -> list[Target]

    def targets(self, cfg: ModelConfig) -> list[Target]:
        out = [Target("tok_embeddings.weight", (self.embed,))]
        for i in range(cfg.num_layers):
            prefix = self.layer_prefix.format(i=i)
            for t in self.layer_targets(cfg):
                out.append(Target(f"layers.{i}.{t.name}", tuple(prefix + s for s in t.sources), t.linear, t.fuse, t.split))
        out.append(Target("norm.weight", (self.final_norm,)))
        if not cfg.tie_word_embeddings:
            out.append(Target("output.weight", (self.lm_head,)))
        return out


_LLAMA_TABLE = ArchTable("model.layers.{i}.", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", _llama_like_layer)
_INTERNLM2_TABLE = ArchTable("model.layers.{i}.", "model.tok_embeddings.weight", "model.norm.weight", "output.weight", _internlm2_layer)

TABLES = {
    "llama": _LLAMA_TABLE,
    "mistral": _LLAMA_TABLE,
    "qwen2": _LLAMA_TABLE,
    "qwen3": _LLAMA_TABLE,
    "internlm2": _INTERNLM2_TABLE,
}

# HF model_type -> (lmc architecture, qkv bias by default, q/k norm)
_MODEL_TYPES = {
    "llama": ("llama", False, False),
    "mistral": ("mistral", False, False),
    "qwen2": ("qwen2", True, False),
    "qwen3": ("qwen3", False, True),
    "internlm2": ("internlm2", False, False),
}


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either transformers-5 `rope_parameters` or the older keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear", "dynamic"):
        raise LmcError(f"rope scaling type {rope_type!r} is not supported; lmc supports llama3, linear and dynamic")
    scaling = RopeScaling(
        type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )
    return theta, scaling


def _id_list(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The one place a Hugging Face config.json is read."""
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        known = ", ".join(sorted(_MODEL_TYPES))
        raise LmcError(f"unknown architecture model_type={model_type!r} ({hf.get('architectures')}); lmc supports {known}")
    arch, default_bias, qk_norm = _MODEL_TYPES[model_type]
    num_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    qkv_bias = hf.get("attention_bias", hf.get("bias", default_bias)) if model_type != "qwen2" else True
    theta, scaling = _rope(hf)
    return ModelConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(qkv_bias),
        qk_norm=qk_norm,
        rope_scaling=scaling,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_id_list(hf.get("eos_token_id")),
    )
