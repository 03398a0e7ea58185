"""The model description: one frozen dataclass, read from a workspace's lmc.json or built once
from a Hugging Face config (lmc.format.archs.model_config_from_hf). Every value is checked here,
so a bad config fails where it is read, with one line, not later inside a forward."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmc.errors import LmcError

ROPE_TYPES = ("default", "llama3", "linear", "dynamic")


@dataclass(frozen=True)
class RopeScaling:
    type: str  # one of ROPE_TYPES other than "default"
    factor: float
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    original_max_position_embeddings: int | None = None  # llama3

    def __post_init__(self):
        if self.type not in ROPE_TYPES[1:]:
            raise LmcError(f"rope scaling type {self.type!r} is not supported; lmc supports {', '.join(ROPE_TYPES[1:])}")
        if not _is_number(self.factor) or self.factor <= 0:
            raise LmcError(f"rope scaling factor {self.factor!r} must be a positive number")
        if self.type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                value = getattr(self, key)
                if not _is_number(value) or value <= 0:
                    raise LmcError(f"llama3 rope scaling needs a positive {key}, got {value!r}")


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings")
SIZE_LIMIT = 1 << 24  # no dimension of any real model comes near this; larger is a corrupt config
LAYER_LIMIT = 1 << 12  # the deepest real models have ~200 layers; each layer is a few records in every tensor table


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


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
        from lmc.format.archs import ARCHS

        if self.architecture not in ARCHS:
            raise LmcError(f"unknown architecture {self.architecture!r}; lmc supports {', '.join(ARCHS)}")
        for key in _POSITIVE_INTS:
            value = getattr(self, key)
            limit = LAYER_LIMIT if key == "num_layers" else SIZE_LIMIT
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < limit:
                raise LmcError(f"config value {key}={value!r} must be a positive integer (below {limit})")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0:
                raise LmcError(f"config value {key}={value!r} must be a positive number")
        for key in ("tie_word_embeddings", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, key), bool):
                raise LmcError(f"config value {key}={getattr(self, key)!r} must be true or false")
        if self.num_heads % self.num_kv_heads:
            raise LmcError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        for value in (self.bos_token_id, *self.eos_token_ids):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size):
                raise LmcError(f"special token id {value!r} is not a token of a vocabulary of {self.vocab_size}")

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
        if not isinstance(d, dict):
            raise LmcError("lmc.json's model entry is not an object; rebuild the workspace with `lmc convert`")
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise LmcError(f"lmc.json has unknown model keys {sorted(unknown)}; rebuild the workspace with this lmc")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise LmcError(f"lmc.json's model lacks {missing}; rebuild the workspace with `lmc convert`")
        if d.get("rope_scaling") is not None:
            keys = {f.name for f in dataclasses.fields(RopeScaling)}
            if not isinstance(d["rope_scaling"], dict) or set(d["rope_scaling"]) - keys \
                    or not {"type", "factor"} <= set(d["rope_scaling"]):
                raise LmcError("lmc.json's rope_scaling is malformed (it needs type and factor, and no other keys than "
                               f"{', '.join(sorted(keys - {'type', 'factor'}))}); rebuild the workspace with `lmc convert`")
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        eos = d.get("eos_token_ids") or ()
        if not isinstance(eos, (list, tuple)):
            raise LmcError("lmc.json's eos_token_ids must be a list; rebuild the workspace with `lmc convert`")
        d["eos_token_ids"] = tuple(eos)
        try:
            return cls(**d)
        except TypeError as e:
            raise LmcError(f"lmc.json's model entry is malformed ({e}); rebuild the workspace") from None
