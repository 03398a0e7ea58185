"""One ArchSpec per architecture: the single place that says how a model family is named and shaped.

Convert (source -> workspace names, fusions, tensor-parallel splits), the AWQ writer (workspace ->
HF names), quantize's memory prediction, the runtime's layer keys and the benches all read these
records. Adding an architecture is one ArchSpec here plus a case in tests/conftest.py ARCH_CASES.

Linears are named by base (no `.weight`/`.qweight`), so one table serves float and int4 sources.
`fuse` says how a linear's sources become one workspace tensor:

  "cat"            the sources' output rows concatenated in order (q,k,v -> w_qkv; gate,up -> w13)
  "internlm2_qkv"  one source, InternLM2's grouped wqkv, split into q, k, v first, then "cat"

`split` says how a tensor is cut for tensor parallelism: "col" (each part's output rows are
chunked, then fused per rank; K and V by KV head, replicated when fewer than ranks: `kv_heads_of_rank`),
"row" (input columns chunked) or None (replicated). `rank_config` is the model one rank computes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmc.errors import LmcError
from lmc.format.config import ModelConfig, RopeScaling

# runtime key -> workspace name after `layers.{i}.` (linears without their .weight/.qweight suffix)
LAYER_NAMES = {
    "attention_norm": "attention_norm.weight",
    "w_qkv": "attention.w_qkv",
    "w_qkv_bias": "attention.w_qkv.bias",
    "q_norm": "attention.q_norm.weight",
    "k_norm": "attention.k_norm.weight",
    "wo": "attention.wo",
    "ffn_norm": "ffn_norm.weight",
    "w13": "feed_forward.w13",
    "w2": "feed_forward.w2",
}
LAYER_KEYS = {name: key for key, name in LAYER_NAMES.items()}  # workspace name -> runtime key
LINEAR_KEYS = ("w_qkv", "wo", "w13", "w2")
INT4_LEAVES = (".qweight", ".scales", ".zeros")  # the three tensors of an int4 linear in a workspace


def linear_parts(cfg: ModelConfig, key: str) -> tuple[tuple[int, ...], int]:
    """(output rows of each fused part, input features) of a layer linear: its [N, K] shape."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"w_qkv": ((cfg.q_size, cfg.kv_size, cfg.kv_size), h),
            "wo": ((h,), cfg.q_size),
            "w13": ((i, i), h),
            "w2": ((h,), i)}[key]


def tp_problem(cfg: ModelConfig, tp: int, group_size: int | None = None) -> str | None:
    """Why `tp` ranks cannot split this model (int4 in groups of `group_size`), or None. KV heads fewer than
    ranks are replicated, so tp must then be a multiple of them; an int4 row-parallel cut (wo, w2) must fall
    on a group boundary."""
    for what, n in (("attention heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            return f"--tp {tp} does not divide {what} ({n}); choose a tp that divides {what}"
    kv = cfg.num_kv_heads
    if (kv % tp if kv >= tp else tp % kv):
        return f"--tp {tp} neither divides nor is a multiple of the KV heads ({kv}); choose another tp"
    local = rank_config(cfg, tp)
    if group_size and tp > 1 and any(k % group_size for k in (local.q_size, local.intermediate_size)):
        return f"--tp {tp} would split an int4 group of {group_size}; use a smaller --tp"
    return None


def kv_heads_of_rank(cfg: ModelConfig, tp: int, rank: int) -> range:
    """The KV heads rank `rank` of `tp` holds: an equal share, or one head replicated on tp / Hkv ranks
    (a rank's query heads then all read that head)."""
    kv = cfg.num_kv_heads
    if kv >= tp:
        share = kv // tp
        return range(rank * share, (rank + 1) * share)
    head = rank // (tp // kv)
    return range(head, head + 1)


def rank_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The slice of the model one of `tp` ranks computes: query heads, KV heads and the MLP width divided
    (KV heads replicated when there are fewer than ranks); hidden size, vocabulary and norms whole."""
    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=len(kv_heads_of_rank(cfg, tp, 0)),
                               intermediate_size=cfg.intermediate_size // tp)


def linear_shape(cfg: ModelConfig, key: str) -> tuple[int, int]:
    """[N, K] of a layer linear as the workspace fuses it."""
    parts, k = linear_parts(cfg, key)
    return sum(parts), k


def layer_params(cfg: ModelConfig) -> int:
    """Weights of one layer's linears."""
    return sum(n * k for n, k in (linear_shape(cfg, key) for key in LINEAR_KEYS))


@dataclass(frozen=True)
class Target:
    """One workspace tensor (or linear) and the source tensors it is made from."""

    name: str  # workspace name, without the .weight/.bias suffix for linears
    sources: tuple[str, ...]  # source names, same convention
    linear: bool = False  # True: `.weight` (+ `.bias` when present) or int4 triplets
    fuse: str = "cat"
    split: str | None = None
    key: str | None = None  # runtime key of a layer tensor (LAYER_NAMES), None for global tensors


@dataclass(frozen=True)
class ArchSpec:
    name: str  # lmc architecture, written to lmc.json
    hf_model_types: tuple[str, ...]  # config.json model_type values read as this architecture
    layer_prefix: str  # source prefix of layer i, with {i}
    embed: str
    final_norm: str
    lm_head: str
    norms: dict  # runtime key -> source name (after the layer prefix)
    linears: dict  # runtime key -> (source bases after the layer prefix, fuse)
    qkv_bias: bool = False  # default when config.json does not say (attention_bias / bias)
    qkv_bias_forced: bool = False  # the family always has q/k/v biases whatever config.json says
    qk_norm: bool = False
    awq_writable: bool = True  # quantize can write its linears back as HF AWQ-GEMM modules

    def layer_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        prefix = self.layer_prefix.format(i=i)
        out = []
        for key in LAYER_NAMES:
            if key in self.norms and (key not in ("q_norm", "k_norm") or cfg.qk_norm):
                out.append(Target(f"layers.{i}.{LAYER_NAMES[key]}", (prefix + self.norms[key],), key=key))
            elif key in self.linears:
                sources, fuse = self.linears[key]
                split = "col" if key in ("w_qkv", "w13") else "row"
                out.append(Target(f"layers.{i}.{LAYER_NAMES[key]}", tuple(prefix + s for s in sources), True, fuse,
                                  split, key))
        return out

    def targets(self, cfg: ModelConfig) -> list[Target]:
        """Every workspace tensor of a model, in workspace order."""
        out = [Target("tok_embeddings.weight", (self.embed,))]
        for i in range(cfg.num_layers):
            out += self.layer_targets(cfg, i)
        out.append(Target("norm.weight", (self.final_norm,)))
        if not cfg.tie_word_embeddings:
            out.append(Target("output.weight", (self.lm_head,)))
        return out

    def hf_linear_modules(self, cfg: ModelConfig, i: int, key: str) -> list[tuple[str, int]]:
        """[(HF module name, output rows)] of a workspace linear split back into its sources."""
        sources, fuse = self.linears[key]
        if fuse != "cat":
            raise LmcError(f"{self.name}'s {key} is fused in its source; it cannot be written back as separate modules")
        rows, _ = linear_parts(cfg, key)
        return [(self.layer_prefix.format(i=i) + s, n) for s, n in zip(sources, rows)]


_LLAMA_NORMS = {"attention_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
                "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
_LLAMA_LINEARS = {"w_qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "cat"),
                  "wo": (("self_attn.o_proj",), "cat"),
                  "w13": (("mlp.gate_proj", "mlp.up_proj"), "cat"),
                  "w2": (("mlp.down_proj",), "cat")}
_LLAMA = dict(layer_prefix="model.layers.{i}.", embed="model.embed_tokens.weight", final_norm="model.norm.weight",
              lm_head="lm_head.weight", norms=_LLAMA_NORMS, linears=_LLAMA_LINEARS)

ARCHS = {spec.name: spec for spec in (
    ArchSpec("llama", ("llama",), **_LLAMA),
    ArchSpec("mistral", ("mistral",), **_LLAMA),
    ArchSpec("qwen2", ("qwen2",), **_LLAMA, qkv_bias=True, qkv_bias_forced=True),
    ArchSpec("qwen3", ("qwen3",), **_LLAMA, qk_norm=True),
    ArchSpec("internlm2", ("internlm2",), layer_prefix="model.layers.{i}.", embed="model.tok_embeddings.weight",
             final_norm="model.norm.weight", lm_head="output.weight",
             norms={"attention_norm": "attention_norm.weight", "ffn_norm": "ffn_norm.weight"},
             linears={"w_qkv": (("attention.wqkv",), "internlm2_qkv"), "wo": (("attention.wo",), "cat"),
                      "w13": (("feed_forward.w1", "feed_forward.w3"), "cat"), "w2": (("feed_forward.w2",), "cat")},
             awq_writable=False),
)}
_BY_MODEL_TYPE = {t: spec for spec in ARCHS.values() for t in spec.hf_model_types}


def arch_spec(cfg: ModelConfig) -> ArchSpec:
    return ARCHS[cfg.architecture]


# ----------------------------------------------------------------------------- Hugging Face config.json


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either transformers-5 `rope_parameters` or the older keys."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise LmcError(f"config.json's rope_scaling/rope_parameters is {params!r}, not an object")
    params = dict(params)
    theta = _given(params.pop("rope_theta", None), hf.get("rope_theta"), 10000.0)  # 0 is refused, not replaced
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return _number(theta, "rope_theta"), None
    if "factor" not in params:
        raise LmcError(f"config.json's rope scaling {rope_type!r} has no factor")
    scaling = RopeScaling(
        type=rope_type,
        factor=_number(params["factor"], "rope scaling factor"),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )
    return _number(theta, "rope_theta"), scaling


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LmcError(f"config.json's {key} is {value!r}, not a number")
    return float(value)


def _given(*values):
    """The first value that is not None (null or absent in config.json); a 0 or false is kept, to be checked."""
    return next(v for v in values if v is not None)


def _id_list(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _required(hf: dict, key: str):
    if key not in hf:
        raise LmcError(f"config.json lacks {key!r}; the checkpoint's config is incomplete")
    return hf[key]


def sliding_window(hf: dict) -> int | None:
    """The attention window of a model some of whose layers attend to their last `window` tokens only, as
    transformers reads config.json (MistralConfig's sliding_window defaults to 4096; Qwen2/3 slide only with
    use_sliding_window, in layers from max_window_layers on; a layer_types list says it per layer); None for full
    attention everywhere. lmc runs full attention, which equals a window's over at most `window` tokens."""
    model_type = hf.get("model_type")
    use = hf.get("use_sliding_window")
    if use is not None and not isinstance(use, bool):
        raise LmcError(f"config value use_sliding_window={use!r} must be true or false")
    if model_type in ("qwen2", "qwen3") and not use:
        return None
    layer_types = hf.get("layer_types")
    if isinstance(layer_types, list):
        window = hf.get("sliding_window") if "sliding_attention" in layer_types else None
    elif model_type == "mistral":
        window = hf.get("sliding_window", 4096)
    elif model_type in ("qwen2", "qwen3"):
        from_layer, layers = hf.get("max_window_layers", 28), hf.get("num_hidden_layers")
        slides = not (type(from_layer) is int and type(layers) is int and from_layer >= layers)
        window = hf.get("sliding_window", 4096) if slides else None
    else:
        return None
    if window is not None and (type(window) is not int or window < 1):
        raise LmcError(f"config value sliding_window={window!r} must be a positive integer or null")
    return window


def check_within_window(tokens: int, window: int | None, flag: str, where, does: str = "attends") -> None:
    """lmc has no sliding-window attention: full attention is a sliding-window model only up to its window, so a
    sequence (`flag` tokens) longer than the window of the model at `where` is refused (None: no window)."""
    if window is not None and tokens > window:
        raise LmcError(f"{flag} {tokens} is longer than the sliding attention window of {where} ({window} tokens): "
                       f"lmc {does} with full attention over the whole sequence, which is this model only up to its "
                       f"window; pass {flag} {window} or less")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The one place a Hugging Face config.json is read."""
    if not isinstance(hf, dict):
        raise LmcError("config.json is not a JSON object")
    model_type = hf.get("model_type")
    spec = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise LmcError(f"unknown architecture model_type={model_type!r} ({hf.get('architectures')}); lmc supports {known}")
    num_heads = _required(hf, "num_attention_heads")
    hidden = _required(hf, "hidden_size")
    qkv_bias = True if spec.qkv_bias_forced else _given(hf.get("attention_bias"), hf.get("bias"), spec.qkv_bias)
    head_dim = hf.get("head_dim")
    if head_dim is None and isinstance(hidden, int) and isinstance(num_heads, int) and num_heads > 0:
        head_dim = hidden // num_heads
    theta, scaling = _rope(hf)
    return ModelConfig(
        architecture=spec.name,
        vocab_size=_required(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_required(hf, "intermediate_size"),
        num_layers=_required(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") if hf.get("num_key_value_heads") is not None else num_heads,
        head_dim=head_dim,
        rms_norm_eps=_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        rope_theta=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=_given(hf.get("tie_word_embeddings"), False),  # ModelConfig refuses a non-bool ("false")
        qkv_bias=qkv_bias,
        qk_norm=spec.qk_norm,
        rope_scaling=scaling,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_id_list(hf.get("eos_token_id")),
    )
