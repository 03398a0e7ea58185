"""LLaVA checkpoints read as a language model plus a vision half (lmc.format.vision).

Three layouts: Hugging Face's LLaVA 1.5 (`LlavaForConditionalGeneration`, model_type llava) and LLaVA-NeXT / 1.6
(`LlavaNextForConditionalGeneration`, llava_next), whose tensors sit under `language_model.`, `vision_tower.`,
`multi_modal_projector.` (or the same under `model.`, as transformers >= 4.52 saves them); and the original LLaVA
layout (`LlavaLlamaForCausalLM`: a Llama checkpoint plus `model.mm_projector.*`), whose CLIP vision tower is named
by hub id and so is read from a local folder (`--vision-tower DIR`; its weights come from the checkpoint when the
checkpoint carries them, as LLaVA 1.6's does).

`split_vision` turns such a source into a text-only Source (a reader that shows the language model under its
plain Llama names, and the text config) with the vision half in `source.vision`, so convert and quantize treat the
language model as any other. Configs are completed with transformers' config classes (hub configs omit defaults);
no code from the model folder ever runs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmc.compiler.readers import Source, open_source
from lmc.errors import LmcError
from lmc.format.vision import (PROCESSOR_FILES, VISION_GLOBAL_SOURCES, VISION_LAYER_SOURCES,  # noqa: F401 - re-exported
                               VisionConfig, is_llava, vision_tensors)

IMAGE_TOKEN = "<image>"
_TEXT = re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(.*)$")  # HF layout -> the Llama name after `model.`
_HF_HEAD = re.compile(r"^(?:language_model\.)?lm_head\.weight$")
_PROJECTOR = {"hf": ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),
              "original": ("mm_projector.0", "mm_projector.2")}
_UNUSED_CLIP = re.compile(r"^(post_layernorm\.\w+|embeddings\.position_ids|encoder\.layers\.(\d+)\..*)$")


@dataclass
class VisionSource:
    """The vision half of a LLaVA checkpoint: its config and where each vision tensor of the workspace comes from."""

    config: VisionConfig
    readers: dict  # "model" | "tower" -> reader
    sources: dict[str, tuple[str, str, tuple[str, ...]]]  # workspace name -> (reader key, fuse "cat", source names)
    hf_config: dict  # the checkpoint's whole config.json
    text_names: dict[str, str]  # Llama name -> the checkpoint's name, for the language model's tensors
    tower: Path | None = None  # --vision-tower folder
    tower_files: list[Path] = field(default_factory=list)

    def build(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        key, _, names = self.sources[name]
        parts = [self.readers[key].get(n) for n in names]
        t = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtype)
        if not t.is_meta and not torch.isfinite(t).all():
            raise LmcError(f"tensor {name} (from {', '.join(names)}) has NaN or Inf values; the checkpoint is damaged")
        return t

    def check(self) -> None:
        """Every vision tensor present with the shape the config implies; nothing of the vision half unused."""
        present = {key: set(reader.names()) for key, reader in self.readers.items()}
        for name, shape in vision_tensors(self.config).items():
            key, _, names = self.sources[name]
            reader = self.readers[key]
            missing = [n for n in names if n not in present[key]]
            if missing:
                raise LmcError(f"the {'vision tower' if key == 'tower' else 'checkpoint'} lacks tensor {missing[0]}; "
                               "it is incomplete or not a LLaVA / CLIP model")
            got = (sum(reader.shape(n)[0] for n in names), *reader.shape(names[0])[1:])
            if tuple(got) != tuple(shape):
                raise LmcError(f"source tensor {names[0]} has shape {list(reader.shape(names[0]))}, the vision config "
                               f"implies {list(shape)} for {name}; the weights do not match config.json")
            for n in names:
                if not reader.dtype(n).is_floating_point:
                    raise LmcError(f"source tensor {n} is {reader.dtype(n)}, expected a float dtype")

    def provenance(self) -> dict:
        from lmc.format.workspace import DIGEST, file_digest

        return {p.relative_to(self.tower).as_posix(): {"size": p.stat().st_size, DIGEST: file_digest(p, DIGEST)}
                for p in sorted(self.tower_files) if p.is_file()}


class _TextReader:
    """A reader showing only the language model's tensors, under their plain Llama names."""

    def __init__(self, reader, names: dict[str, str]):
        self.reader, self.map = reader, names

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, name: str):
        return self.reader.shape(self.map[name])

    def dtype(self, name: str):
        return self.reader.dtype(self.map[name])

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self.map[name])

    def source_files(self):
        return self.reader.source_files()


def split_vision(source: Source, vision_tower: str | Path | None = None) -> Source:
    """A LLaVA source as its language model with `.vision` set; any other source unchanged (refusing --vision-tower)."""
    layout = is_llava(source.hf_config) if source.model_format != "gguf" else None
    if layout is None:
        if vision_tower is not None:
            raise LmcError(f"--vision-tower is for LLaVA checkpoints; {source.path} is not one (drop --vision-tower)")
        return source
    hf = source.hf_config
    names = source.reader.names()
    if layout == "hf":
        text_hf = _complete(hf)
        text_names = {}
        for n in names:
            m = _TEXT.match(n)
            if m and not m.group(1).startswith("lm_head"):
                text_names["model." + m.group(1)] = n
            elif _HF_HEAD.match(n):
                text_names["lm_head.weight"] = n
        tower = None
        vision_hf = text_hf.pop("__vision__")
    else:
        if vision_tower is None:
            raise LmcError(f"{source.path} is an original-layout LLaVA checkpoint whose vision tower is named by hub id "
                           f"({hf.get('mm_vision_tower')!r}); pass its local folder with --vision-tower DIR")
        text_hf = dict(hf)
        text_hf["model_type"] = "mistral" if "Mistral" in str(hf.get("architectures")) else "llama"
        text_names = {n: n for n in names if not _is_original_vision(n)}
        tower = Path(vision_tower)
        vision_hf = _tower_config(tower)
    text_sources = set(text_names.values())
    vision_names = [n for n in names if n not in text_sources]
    text_hf.setdefault("torch_dtype", hf.get("torch_dtype") or hf.get("dtype"))
    vision = _vision_source(source, layout, hf, vision_hf, vision_names, tower, text_hf)
    vision.text_names = text_names
    files = dict(source.tokenizer_files())
    if "chat_template.jinja" not in files and (source.path / "chat_template.json").is_file():
        files["chat_template.jinja"] = _processor_template(source.path / "chat_template.json").encode()
    return replace(source, reader=_TextReader(source.reader, text_names), hf_config=text_hf, vision=vision,
                   _tokenizer_files=files)


def _is_original_vision(name: str) -> bool:
    return name.startswith(("model.mm_projector.", "model.vision_tower.")) or name == "model.image_newline"


def _complete(hf: dict) -> dict:
    """The text config with transformers' defaults filled in, and the vision config under "__vision__"."""
    from transformers import LlavaConfig, LlavaNextConfig

    cls = LlavaNextConfig if hf["model_type"] == "llava_next" else LlavaConfig
    try:
        full = cls.from_dict({k: v for k, v in hf.items() if k not in ("quantization_config", "auto_map")})
    except Exception as e:  # transformers raises many types for a malformed config
        raise LmcError(f"config.json is not a readable {hf['model_type']} config ({e})") from None
    text = full.text_config.to_dict()
    text["__vision__"] = full.vision_config.to_dict()
    for key in ("bos_token_id", "eos_token_id"):
        if text.get(key) is None and hf.get(key) is not None:
            text[key] = hf[key]
    return text


def _tower_config(tower: Path) -> dict:
    """The CLIP vision config of a --vision-tower folder (a CLIPVisionModel or a whole CLIPModel)."""
    from transformers import CLIPVisionConfig

    path = tower / "config.json"
    if not path.is_file():
        raise LmcError(f"--vision-tower {tower} has no config.json; pass a CLIP vision tower folder "
                       "(e.g. openai/clip-vit-large-patch14-336 downloaded)")
    try:
        raw = json.loads(path.read_bytes())
        raw = raw.get("vision_config", raw) if raw.get("model_type") == "clip" else raw
        return CLIPVisionConfig.from_dict({k: v for k, v in raw.items() if k != "auto_map"}).to_dict()
    except LmcError:
        raise
    except Exception as e:
        raise LmcError(f"{path} is not a readable CLIP config ({e})") from None


def _prefix(names: list[str], what: str) -> str:
    """The prefix before CLIP's `embeddings.patch_embedding.weight` (one, or an error)."""
    found = {n.removesuffix("embeddings.patch_embedding.weight") for n in names if n.endswith("embeddings.patch_embedding.weight")}
    if len(found) != 1:
        raise LmcError(f"{what} has {len(found)} CLIP vision towers (tensors *embeddings.patch_embedding.weight); expected one")
    return found.pop()


def _vision_source(source: Source, layout: str, hf: dict, vhf: dict, vision_names: list[str], tower: Path | None,
                   text_hf: dict) -> VisionSource:
    readers = {"model": source.reader}
    tower_files = [tower / n for n in ("config.json", "preprocessor_config.json", "processor_config.json")] if tower else []
    if layout == "original" and not any(n.startswith("model.vision_tower.") for n in vision_names):
        tower_source = open_source(tower)
        readers["tower"] = tower_source.reader
        tower_files += list(tower_source.reader.source_files())
        clip_key, clip_names = "tower", tower_source.reader.names()
    else:
        clip_key, clip_names = "model", vision_names
    prefix = _prefix(clip_names, str(tower) if clip_key == "tower" else str(source.path))
    total_layers = vhf.get("num_hidden_layers")
    feature_layer = hf.get("vision_feature_layer", -2) if layout == "hf" else hf.get("mm_vision_select_layer", -2)
    if isinstance(feature_layer, list) and len(feature_layer) == 1:
        feature_layer = feature_layer[0]
    if type(feature_layer) is not int or type(total_layers) is not int:
        raise LmcError(f"vision feature layer {feature_layer!r}: lmc reads LLaVA models that take one CLIP layer's output")
    num_layers = total_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 0 < num_layers <= total_layers:
        raise LmcError(f"vision feature layer {feature_layer} is outside the {total_layers} layers of the vision tower")
    if layout == "hf":
        kind = hf["model_type"]
        select = hf.get("vision_feature_select_strategy", "default")
        projector = (2, hf.get("projector_hidden_act", "gelu"), bool(hf.get("multimodal_projector_bias", True)))
        token_id = hf.get("image_token_id", hf.get("image_token_index", 32000))  # LlavaConfig's default
        pins = hf.get("image_grid_pinpoints") if kind == "llava_next" else None
        processor_dir = source.path
    else:
        aspect = hf.get("image_aspect_ratio", "square")
        kind = "llava_next" if "anyres" in str(aspect) else "llava"
        select = {"patch": "default", "cls_patch": "full"}.get(hf.get("mm_vision_select_feature", "patch"), "?")
        ptype = hf.get("mm_projector_type", "linear")
        if ptype not in ("linear", "mlp2x_gelu"):
            raise LmcError(f"mm_projector_type {ptype!r} is not read; lmc reads linear and mlp2x_gelu projectors")
        projector = (1 if ptype == "linear" else 2, "gelu", True)
        token_id = 0  # the original layout has no image token: images are spliced in between text pieces
        pins = [[h, w] for w, h in hf.get("image_grid_pinpoints") or []] if kind == "llava_next" else None
        processor_dir = tower
    if kind == "llava_next" and hf.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        raise LmcError(f"mm_patch_merge_type {hf.get('mm_patch_merge_type')!r}: lmc reads LLaVA-NeXT's spatial_unpad")
    pre = _preprocessing(processor_dir, kind, pins)
    if layout == "original":
        pre["pad_to_square"] = kind == "llava" and hf.get("image_aspect_ratio") == "pad"
    cfg = VisionConfig(
        kind=kind, hidden_size=vhf.get("hidden_size"), intermediate_size=vhf.get("intermediate_size"),
        num_layers=num_layers, num_heads=vhf.get("num_attention_heads"), image_size=vhf.get("image_size"),
        patch_size=vhf.get("patch_size"), layer_norm_eps=float(vhf.get("layer_norm_eps", 1e-5)),
        hidden_act=vhf.get("hidden_act", "quick_gelu"), select=select, text_hidden_size=text_hf.get("hidden_size"),
        projector_layers=projector[0], projector_act=projector[1], projector_bias=projector[2],
        image_token=IMAGE_TOKEN, image_token_id=token_id, **pre)
    sources = {name: (clip_key, "cat", (prefix + src,)) for name, src in VISION_GLOBAL_SOURCES.items()}
    for i in range(num_layers):
        for key, srcs in VISION_LAYER_SOURCES.items():
            for leaf in ("weight", "bias"):
                sources[f"vision.layers.{i}.{key}.{leaf}"] = (
                    clip_key, "cat", tuple(f"{prefix}encoder.layers.{i}.{s}.{leaf}" for s in srcs))
    if layout == "original" and projector[0] == 1:
        projector_names = ("model.mm_projector",)
    else:
        projector_names = tuple(("model." if layout == "original" else "") + p for p in _PROJECTOR[layout])
    projector_names = tuple(_present(p, vision_names) for p in projector_names)
    for n, base in enumerate(projector_names[:projector[0]], start=1):
        sources[f"projector.linear_{n}.weight"] = ("model", "cat", (base + ".weight",))
        if projector[2]:
            sources[f"projector.linear_{n}.bias"] = ("model", "cat", (base + ".bias",))
    if kind == "llava_next":
        sources["image_newline"] = ("model", "cat", (_present("image_newline", vision_names, whole=True),))
    vision = VisionSource(cfg, readers, sources, hf, {}, tower, tower_files)
    used = {n for key, _, names in sources.values() if key == "model" for n in names}
    for n in vision_names:
        rest = n[len(prefix):] if clip_key == "model" and n.startswith(prefix) else None
        unused_clip = rest is not None and (m := _UNUSED_CLIP.match(rest)) and (m.group(2) is None or int(m.group(2)) >= num_layers)
        if n not in used and not unused_clip:
            raise LmcError(f"source tensor {n} is not used by lmc's LLaVA name table; the architecture or config does "
                           "not match the weights")
    return vision


def _present(base: str, names: list[str], whole: bool = False) -> str:
    """The checkpoint's name of a projector module / image_newline, with or without transformers' `model.` prefix."""
    for candidate in (base, "model." + base):
        if (candidate if whole else candidate + ".weight") in names:
            return candidate
    return base


def _preprocessing(folder: Path, kind: str, pins) -> dict:
    """The image processor settings of preprocessor_config.json, as VisionConfig fields."""
    p, path = _processor_settings(folder)
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if p.get(key, True) is not True:
            raise LmcError(f"{path} has {key}={p[key]!r}; lmc runs LLaVA's CLIP preprocessing (resize, center crop, "
                           "rescale, normalize)")
    size, crop = p.get("size", 224), p.get("crop_size", 224)
    shortest = size if type(size) is int else size.get("shortest_edge") if isinstance(size, dict) else None
    if type(shortest) is not int:
        raise LmcError(f"{path} has size {size!r}; lmc reads a shortest_edge resize")
    crop = (crop, crop) if type(crop) is int else (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else crop
    pins = pins if pins is not None else p.get("image_grid_pinpoints") if kind == "llava_next" else None
    return dict(resize_shortest_edge=shortest, crop_size=tuple(crop),
                image_mean=tuple(p.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                image_std=tuple(p.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                rescale_factor=float(p.get("rescale_factor", 1 / 255)), resample=p.get("resample", 3),
                pad_to_square=kind == "llava" and p.get("do_pad", False) is True,
                grid_pinpoints=tuple(tuple(x) for x in pins or ()))


def _processor_settings(folder: Path) -> tuple[dict, Path]:
    """The image processor's settings: preprocessor_config.json, or processor_config.json's image_processor
    (transformers 5 saves them there)."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            settings = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as e:  # ValueError: also an integer over Python's digit limit
            raise LmcError(f"{path} is not valid JSON ({e})") from None
        settings = settings.get(key) if key and isinstance(settings, dict) else settings
        if isinstance(settings, dict):
            return settings, path
    raise LmcError(f"{folder} has no preprocessor_config.json (nor a processor_config.json with an image_processor); "
                   "add the model's image processor config: it says how images are resized and normalized")


def _processor_template(path: Path) -> str:
    try:
        template = json.loads(path.read_bytes()).get("chat_template")
    except (ValueError, RecursionError, AttributeError) as e:
        raise LmcError(f"{path} is not a processor chat template ({e})") from None
    if not isinstance(template, str):
        raise LmcError(f"{path} has no chat_template string")
    return template


# ----------------------------------------------------------------------------- writing an HF checkpoint back


def hf_entries(source: Source, entries: dict, float_dtype: torch.dtype, spec_cls) -> dict:
    """`lmc quantize`'s HF output of a LLaVA model: the language model's tensors under the checkpoint's own names,
    and every other tensor of the checkpoint (vision tower, projector, newline) copied in float."""
    vision, reader = source.vision, source.vision.readers["model"]
    out = {}
    for name, (spec, produce) in entries.items():
        module, _, leaf = name.rpartition(".")
        if name in vision.text_names:
            renamed = vision.text_names[name]
        elif module + ".weight" in vision.text_names:
            renamed = vision.text_names[module + ".weight"].removesuffix("weight") + leaf
        else:
            renamed = name
        out[renamed] = (spec_cls(renamed, spec.dtype, spec.shape), produce)
    text_sources = set(vision.text_names.values())
    for n in reader.names():
        if n not in text_sources:
            out[n] = (spec_cls(n, float_dtype, tuple(reader.shape(n))), lambda n=n: reader.get(n).to(float_dtype))
    return out


def vision_specs(vision: VisionSource, dtype: torch.dtype) -> list:
    """The workspace tensor specs of the vision half, in the workspace's float dtype."""
    from lmc.format.workspace import TensorSpec

    return [TensorSpec(name, dtype, shape) for name, shape in vision_tensors(vision.config).items()]
