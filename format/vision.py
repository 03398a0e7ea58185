"""The vision half of a LLaVA workspace: its settings (`VisionConfig`, lmc.json's `vision` entry) and its
tensor table (CLIP ViT, projector, LLaVA-NeXT's image newline), the one place their names and shapes are said.

A workspace with a `vision` entry runs images: each image becomes `num_image_tokens` embeddings (CLIP features
projected into the language model's hidden size) placed at as many image tokens of the prompt. Tensor names
(workspace name -> CLIP name after the vision model's prefix, or the projector's after its own):

  vision.patch_embedding.weight      embeddings.patch_embedding.weight      [D, 3, p, p]
  vision.class_embedding             embeddings.class_embedding             [D]
  vision.position_embedding          embeddings.position_embedding.weight   [(S/p)^2 + 1, D]
  vision.pre_norm.{weight,bias}      pre_layrnorm.*                         [D]
  vision.layers.{i}.norm1.*          encoder.layers.{i}.layer_norm1.*       [D]
  vision.layers.{i}.w_qkv.*          self_attn.{q,k,v}_proj.* (rows: q, k, v) [3D, D], [3D]
  vision.layers.{i}.wo.*             self_attn.out_proj.*                   [D, D], [D]
  vision.layers.{i}.norm2.*          encoder.layers.{i}.layer_norm2.*       [D]
  vision.layers.{i}.fc1.*            mlp.fc1.*                              [I, D], [I]
  vision.layers.{i}.fc2.*            mlp.fc2.*                              [D, I], [D]
  projector.linear_1.{weight,bias}   linear_1 (HF) / mm_projector.0 (LLaVA)  [H, D], [H]
  projector.linear_2.{weight,bias}   linear_2 (HF) / mm_projector.2 (LLaVA)  [H, H], [H]  (two-layer projector only)
  image_newline                      image_newline                          [H]  (LLaVA-NeXT only)

Only the `num_layers` encoder layers the features are taken after are stored (LLaVA reads the second to last
layer's output, so the last layer and CLIP's post_layernorm are never run and not kept).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmc.errors import LmcError

KINDS = ("llava", "llava_next")  # LLaVA 1.5 (one tile), LLaVA-NeXT / 1.6 (any-resolution tiles)
VISION_ACTS = ("quick_gelu", "gelu")
PROJECTOR_ACTS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "silu", "relu")
SELECTS = ("default", "full")  # default: drop the CLS feature; full: keep it
RESAMPLES = (0, 1, 2, 3, 4, 5)  # PIL's resampling filters (3: bicubic)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")  # a LLaVA folder's image settings
MAX_GRID_PINPOINTS = 64
_LIMIT = 1 << 16

# workspace name after `vision.layers.{i}.` -> CLIP source names after `encoder.layers.{i}.` (each .weight and .bias)
VISION_LAYER_SOURCES = {
    "norm1": ("layer_norm1",),
    "w_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "wo": ("self_attn.out_proj",),
    "norm2": ("layer_norm2",),
    "fc1": ("mlp.fc1",),
    "fc2": ("mlp.fc2",),
}
VISION_GLOBAL_SOURCES = {  # workspace name -> CLIP source name
    "vision.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "vision.class_embedding": "embeddings.class_embedding",
    "vision.position_embedding": "embeddings.position_embedding.weight",
    "vision.pre_norm.weight": "pre_layrnorm.weight",
    "vision.pre_norm.bias": "pre_layrnorm.bias",
}


@dataclass(frozen=True)
class VisionConfig:
    kind: str  # one of KINDS
    # CLIP ViT
    hidden_size: int
    intermediate_size: int
    num_layers: int  # encoder layers run: the features are this layer's output
    num_heads: int
    image_size: int  # tile side in pixels
    patch_size: int
    layer_norm_eps: float
    hidden_act: str  # one of VISION_ACTS
    select: str  # one of SELECTS
    # projector: linear_1 [H, D], act, linear_2 [H, H] (projector_layers 2) or linear_1 alone (1)
    text_hidden_size: int
    projector_layers: int
    projector_act: str
    projector_bias: bool
    # image tokens: the prompt's placeholder text, and the token id each image feature sits at
    image_token: str
    image_token_id: int
    # preprocessing (as transformers' CLIP / LLaVA / LLaVA-NeXT image processors)
    resize_shortest_edge: int
    crop_size: tuple[int, int]  # (height, width)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    resample: int  # PIL filter
    pad_to_square: bool  # LLaVA 1.5's "pad": the image is first padded to a square with the mean color
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT: candidate (height, width) resolutions

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LmcError(f"vision kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
                    "text_hidden_size", "resize_shortest_edge"):
            value = getattr(self, key)
            if type(value) is not int or not 0 < value < _LIMIT:
                raise LmcError(f"vision config {key}={value!r} must be a positive integer (below {_LIMIT})")
        if self.hidden_size % self.num_heads:
            raise LmcError(f"vision hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise LmcError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in VISION_ACTS:
            raise LmcError(f"vision hidden_act {self.hidden_act!r} is not one of {', '.join(VISION_ACTS)}")
        if self.projector_act not in PROJECTOR_ACTS:
            raise LmcError(f"projector activation {self.projector_act!r} is not one of {', '.join(PROJECTOR_ACTS)}")
        if self.select not in SELECTS:
            raise LmcError(f"vision feature select {self.select!r} is not one of {', '.join(SELECTS)}")
        if self.projector_layers not in (1, 2):
            raise LmcError(f"projector_layers {self.projector_layers!r} must be 1 or 2")
        for key in ("projector_bias", "pad_to_square"):
            if not isinstance(getattr(self, key), bool):
                raise LmcError(f"vision config {key}={getattr(self, key)!r} must be true or false")
        if not isinstance(self.image_token, str) or not self.image_token:
            raise LmcError(f"vision image_token {self.image_token!r} must be a non-empty string")
        if type(self.image_token_id) is not int or self.image_token_id < 0:
            raise LmcError(f"vision image_token_id {self.image_token_id!r} must be a token id")
        if not _numbers(self.image_mean, 3) or not _numbers(self.image_std, 3) or min(self.image_std) <= 0:
            raise LmcError(f"image_mean {self.image_mean!r} / image_std {self.image_std!r} must be 3 numbers (std > 0)")
        if not _numbers((self.layer_norm_eps, self.rescale_factor), 2) or self.layer_norm_eps <= 0 or self.rescale_factor <= 0:
            raise LmcError("vision layer_norm_eps and rescale_factor must be positive numbers")
        if not _sizes(self.crop_size):
            raise LmcError(f"crop_size {self.crop_size!r} must be a (height, width) of positive integers")
        if tuple(self.crop_size) != (self.image_size, self.image_size):
            raise LmcError(f"crop_size {list(self.crop_size)} differs from the vision tower's image_size {self.image_size}")
        if self.resample not in RESAMPLES:
            raise LmcError(f"resample {self.resample!r} is not a PIL filter ({RESAMPLES})")
        if self.kind == "llava_next":
            if self.select != "default":
                raise LmcError("LLaVA-NeXT workspaces take the default feature select (the CLS feature dropped)")
            if not 0 < len(self.grid_pinpoints) <= MAX_GRID_PINPOINTS or not all(_sizes(p) for p in self.grid_pinpoints):
                raise LmcError(f"LLaVA-NeXT needs 1..{MAX_GRID_PINPOINTS} grid pinpoints of (height, width), "
                               f"got {self.grid_pinpoints!r}")
            if any(h % self.image_size or w % self.image_size for h, w in self.grid_pinpoints):
                raise LmcError(f"grid pinpoints {[list(p) for p in self.grid_pinpoints]} are not multiples of the "
                               f"tile size {self.image_size}")
        elif self.grid_pinpoints:
            raise LmcError("grid_pinpoints belong to LLaVA-NeXT workspaces only")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tile_tokens(self) -> int:
        """Features of one tile: a patch each, plus the CLS feature when `select` is full."""
        return self.patches_per_side ** 2 + (self.select == "full")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_size"] = list(self.crop_size)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        d["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        return d

    @classmethod
    def from_dict(cls, d) -> "VisionConfig":
        if not isinstance(d, dict):
            raise LmcError("lmc.json's vision entry is not an object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - fields), sorted({f.name for f in dataclasses.fields(cls)
                                                            if f.default is dataclasses.MISSING} - set(d))
        if unknown or missing:
            raise LmcError(f"lmc.json's vision entry has unknown keys {unknown} or lacks {missing}")
        d = dict(d)
        for key in ("crop_size", "image_mean", "image_std"):
            if not isinstance(d[key], list):
                raise LmcError(f"lmc.json's vision {key} must be a list")
            d[key] = tuple(d[key])
        pins = d.get("grid_pinpoints", [])
        if not isinstance(pins, list) or not all(isinstance(p, list) for p in pins):
            raise LmcError("lmc.json's vision grid_pinpoints must be a list of [height, width]")
        d["grid_pinpoints"] = tuple(tuple(p) for p in pins)
        return cls(**d)


def _numbers(values, n: int) -> bool:
    return isinstance(values, (tuple, list)) and len(values) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf") for v in values)


def _sizes(pair) -> bool:
    return isinstance(pair, (tuple, list)) and len(pair) == 2 and all(type(v) is int and 0 < v < _LIMIT for v in pair)


def vision_config_of(meta: dict) -> VisionConfig | None:
    """The VisionConfig of a workspace's lmc.json (None for a text-only workspace)."""
    return VisionConfig.from_dict(meta["vision"]) if "vision" in meta else None


def vision_tensors(vc: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every vision tensor of a workspace and its shape, in workspace order."""
    d, i, h, p = vc.hidden_size, vc.intermediate_size, vc.text_hidden_size, vc.patch_size
    out = {"vision.patch_embedding.weight": (d, 3, p, p), "vision.class_embedding": (d,),
           "vision.position_embedding": (vc.patches_per_side ** 2 + 1, d),
           "vision.pre_norm.weight": (d,), "vision.pre_norm.bias": (d,)}
    for n in range(vc.num_layers):
        shapes = {"norm1": ((d,), (d,)), "w_qkv": ((3 * d, d), (3 * d,)), "wo": ((d, d), (d,)),
                  "norm2": ((d,), (d,)), "fc1": ((i, d), (i,)), "fc2": ((d, i), (d,))}
        for key, (weight, bias) in shapes.items():
            out[f"vision.layers.{n}.{key}.weight"] = weight
            out[f"vision.layers.{n}.{key}.bias"] = bias
    for n, in_features in enumerate((d, h)[:vc.projector_layers], start=1):
        out[f"projector.linear_{n}.weight"] = (h, in_features)
        if vc.projector_bias:
            out[f"projector.linear_{n}.bias"] = (h,)
    if vc.kind == "llava_next":
        out["image_newline"] = (h,)
    return out


HF_TYPES = ("llava", "llava_next")  # the LLaVA config.json kinds is_llava recognises
ORIGINAL_ARCHS = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")


def is_llava(hf: dict) -> str | None:
    """"hf" or "original" for a LLaVA config.json, else None."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") in HF_TYPES and isinstance(hf.get("text_config"), dict):
        return "hf"
    if any(a in ORIGINAL_ARCHS for a in archs if isinstance(a, str)) or "mm_projector_type" in hf:
        return "original"
    return None
