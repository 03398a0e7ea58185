"""The model description (one frozen dataclass) and the engine's settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmc.errors import LmcError

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "internlm2")
ROPE_TYPES = ("default", "llama3", "linear", "dynamic")


@dataclass(frozen=True)
class RopeScaling:
    type: str  # one of ROPE_TYPES other than "default"
    factor: float
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    original_max_position_embeddings: int | None = None  # llama3


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise LmcError(f"unknown architecture {self.architecture!r}; lmc supports {', '.join(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise LmcError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LmcError(f"lmc.json has unknown model keys {sorted(unknown)}; rebuild the workspace with this lmc")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


@dataclass
class EngineConfig:
    """Runtime settings, named as LMDeploy's TurbomindEngineConfig names them."""

    session_len: int | None = None  # max tokens per sequence; None: the model's max_position_embeddings
    max_batch_size: int = 64
    cache_max_entry_count: float = 0.8  # fraction of free device memory (CPU: of cpu_cache_budget_gb)
    cache_block_seq_len: int = 64
    quant_policy: int = 0  # 0: fp KV cache (int8/int4 KV not available yet)
    tp: int = 1
    device: str | None = None  # "cuda", "cpu"; None: cuda when available
    dtype: str | None = None  # compute dtype override; None: the workspace's dtype (float32 on CPU for fp16)
    cpu_cache_budget_gb: float = 2.0
    cuda_graph: bool = True

    def check(self) -> None:
        if self.quant_policy != 0:
            raise LmcError(f"quant_policy={self.quant_policy}: KV-cache quantization (8/4) is not implemented yet; use 0")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise LmcError("cache_max_entry_count must be in (0, 1]")
        if self.cache_block_seq_len < 1:
            raise LmcError("cache_block_seq_len must be positive")
        if self.tp != 1:
            raise LmcError(f"tp={self.tp}: the runtime runs one device; convert with --tp 1 to run here")
