"""Streaming checkpoint readers: one tensor at a time, shapes and dtypes without loading data.

Every reader offers names(), shape(name), dtype(name), get(name) and source_files(); an HF
folder also carries its config.json and tokenizer files (see `open_source`).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmc.errors import LmcError, one_line
from lmc.format.int4 import GROUP_SIZES
from lmc.format.paths import MAX_CONFIG_BYTES, json_problem, read_json
from lmc.compiler.source_files import TOKENIZER_FILES, read_tokenizer_files, weight_files  # noqa: F401 - TOKENIZER_FILES re-exported

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
              "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8, "F64": torch.float64}


def check_weight_file(f: Path) -> None:
    """A weight file that is missing, or is a folder, device or pipe (which a read would wait on for ever), is one
    line."""
    if not f.exists():
        raise LmcError(f"{f} is missing; the checkpoint is incomplete (re-download it)")
    if not f.is_file():
        raise LmcError(f"{f} is not a regular file (a folder, a device or a pipe); the checkpoint's weights must be "
                       "files (re-download it)")


class SafetensorsReader:
    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self._where: dict[str, object] = {}
        self._file_of: dict[str, Path] = {}
        self._handles = []
        for f in files:
            check_weight_file(f)
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise LmcError(f"{f} is not a readable safetensors file ({one_line(e)}); the checkpoint is corrupt or "
                               "truncated") from None
            self._handles.append(h)
            for name in h.keys():
                if name in self._where:
                    raise LmcError(f"tensor {name} is in both {self._file_of[name]} and {f}; the checkpoint is "
                                   "inconsistent: keep one copy (re-download it)")
                self._where[name], self._file_of[name] = h, f
        for f in files:
            self._check_size(f)

    @staticmethod
    def _check_size(f: Path) -> None:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > f.stat().st_size:
            raise LmcError(f"{f} is truncated ({f.stat().st_size} bytes, header needs {8 + n + end}); re-download it")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        st_dtype = self._where[name].get_slice(name).get_dtype()
        if st_dtype not in _ST_DTYPES:
            raise LmcError(f"tensor {name} in {self._file_of[name]} has dtype {st_dtype}, which lmc does not convert "
                           f"(it reads {', '.join(_ST_DTYPES)}); convert a checkpoint of float weights")
        return _ST_DTYPES[st_dtype]

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def source_files(self) -> list[Path]:
        return list(self.files)


class TorchBinReader:
    """PyTorch .bin checkpoints, memory-mapped (torch.load(mmap=True, weights_only=True))."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._tensors: dict[str, torch.Tensor] = {}
        self._file_of: dict[str, Path] = {}
        for f in files:
            check_weight_file(f)
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:  # weights_only refused a global: the file holds more than tensors
                raise LmcError(f"{f} holds Python objects other than tensors, which lmc never unpickles; use the "
                               "model's .safetensors files") from None
            except Exception as e:
                raise LmcError(f"{f} is not a readable PyTorch checkpoint ({one_line(e)}); it is corrupt or truncated") from None
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()):
                raise LmcError(f"{f} is not a state dict (tensor name -> tensor); the checkpoint is corrupt or not "
                               "a model's weights")
            for name in state:
                if name in self._file_of:
                    raise LmcError(f"tensor {name} is in both {self._file_of[name]} and {f}; the checkpoint is "
                                   "inconsistent: keep one copy (re-download it)")
                self._file_of[name] = f
            self._tensors.update(state)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def source_files(self) -> list[Path]:
        return list(self.files)


INT4_FORMATS = ("awq", "gptq", "compressed-tensors")  # quantized checkpoints lmc reads (docs/interchange.md)
MODEL_FORMATS = ("hf", *INT4_FORMATS, "gguf")


@dataclass(frozen=True)
class Int4Scheme:
    """How a quantized checkpoint stores its int4 linears, as its config says (the tensors are
    checked against it by convert; their layouts are in lmc.compiler.pack)."""

    method: str  # one of INT4_FORMATS
    group_size: int | None  # input columns per scale in the checkpoint; None: one scale per output row
    zero_offset: int = 0  # GPTQ v1 (checkpoint_format gptq) stores zero - 1
    symmetric: bool = False  # compressed-tensors: no zero-point tensors (zero 8)


@dataclass
class Source:
    """A checkpoint opened for conversion."""

    reader: object
    hf_config: dict
    path: Path
    model_format: str  # one of MODEL_FORMATS
    int4: Int4Scheme | None = None  # None: float weights
    vision: object | None = None  # a LLaVA checkpoint's vision half (lmc.compiler.llava.VisionSource)
    _tokenizer_files: dict[str, bytes] | None = field(default=None, repr=False)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The files the workspace's tokenizer/ folder gets (tokenizer.json is required); built once."""
        if self._tokenizer_files is None:
            self._tokenizer_files = self._read_tokenizer_files()
        return self._tokenizer_files

    def _read_tokenizer_files(self) -> dict[str, bytes]:
        if self.model_format == "gguf":
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                self.reader.save_tokenizer(Path(d))
                return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.name in TOKENIZER_FILES}
        files = read_tokenizer_files(self.path)
        if "tokenizer.json" not in files:
            files.update(_tokenizer_json_via_transformers(self.path, files, self.hf_config))
        return files


def _tokenizer_json_via_transformers(path: Path, files: dict[str, bytes], hf_config: dict) -> dict[str, bytes]:
    """Sources with only a sentencepiece model: let transformers build the fast tokenizer, from a
    folder holding copies of the tokenizer files alone (never the source's Python), remote code off."""
    import tempfile

    from transformers import AutoTokenizer

    tok_cfg = {}
    if "tokenizer_config.json" in files:
        try:
            tok_cfg = json.loads(files["tokenizer_config.json"])
        except (ValueError, RecursionError) as e:
            raise LmcError(f"{path / 'tokenizer_config.json'} is not valid JSON ({json_problem(e)})") from None
    model_auto_map = hf_config.get("auto_map")
    if (isinstance(tok_cfg, dict) and "auto_map" in tok_cfg) or (isinstance(model_auto_map, dict) and "AutoTokenizer" in model_auto_map):
        raise LmcError(f"{path} has no tokenizer.json and its tokenizer needs custom code (auto_map); lmc never "
                       "runs a model folder's code: add a tokenizer.json (the tokenizers library's format) to the folder")
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        if isinstance(hf_config.get("model_type"), str):  # lets transformers pick the architecture's tokenizer class
            (Path(d) / "config.json").write_text(json.dumps({"model_type": hf_config["model_type"]}))
        try:
            tok = AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False, local_files_only=True)
        except Exception as e:  # transformers raises many types for a tokenizer it cannot build
            raise LmcError(f"{path} has no tokenizer.json and transformers could not build one ({one_line(e)})") from None
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json")}


def open_source(src: str | Path, model_format: str | None = None) -> Source:
    """Open an HF folder (float, AWQ, GPTQ or compressed-tensors) or a GGUF file. model_format None: detect."""
    path = Path(src)
    if not path.exists():
        raise LmcError(f"{path} does not exist; pass a Hugging Face model folder or a .gguf file")
    if model_format is None:
        model_format = "gguf" if path.is_file() and path.suffix == ".gguf" else "hf"
    if model_format == "gguf":
        from lmc.compiler.gguf import GGUFReader

        reader = GGUFReader(path)
        return Source(reader, reader.config_dict(), path, "gguf")
    if not path.is_dir():
        raise LmcError(f"{path} is not a folder; for a GGUF file pass --model-format gguf")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise LmcError(f"{path} has no config.json; pass a Hugging Face model folder")
    hf_config = read_json(cfg_path, MAX_CONFIG_BYTES, "the checkpoint's config is damaged (re-download it)")
    if not isinstance(hf_config, dict):
        raise LmcError(f"{cfg_path} is not a JSON object")
    int4 = int4_scheme(hf_config, cfg_path)
    detected = int4.method if int4 else "hf"
    if model_format != "hf" and model_format != detected:
        raise LmcError(f"{path} has no {model_format} quantization_config (it reads as {detected}); drop --model-format {model_format}")
    kind, files = weight_files(path)
    reader = SafetensorsReader(files) if kind == "st" else TorchBinReader(files)
    return Source(reader, hf_config, path, detected, int4)


def int4_scheme(hf_config: dict, cfg_path: Path) -> Int4Scheme | None:
    """None for a float checkpoint; the int4 scheme of an AWQ, GPTQ or compressed-tensors one lmc
    reads; any other quantized checkpoint is refused with one line naming what."""
    quant = hf_config.get("quantization_config")
    if hf_config.get("compression_config") is not None:  # compressed-tensors' name for it before 2024-10
        quant = hf_config["compression_config"]
        if isinstance(quant, dict):
            quant = {"quant_method": "compressed-tensors", **quant}
    if quant is None or quant == {}:
        return None
    if not isinstance(quant, dict):
        raise LmcError(f"{cfg_path}'s quantization_config is {quant!r}, not an object")
    method = quant.get("quant_method")
    method = method.lower() if isinstance(method, str) else method
    if method == "awq":
        check_awq_config(quant, cfg_path)
        return Int4Scheme("awq", quant["group_size"])
    if method == "gptq":
        return gptq_scheme(quant, cfg_path)
    if method == "compressed-tensors":
        return compressed_scheme(quant, cfg_path)
    what = f"{method}" if method is not None else "quantized (quantization_config without quant_method)"
    raise LmcError(f"{what} checkpoints are not read; lmc reads float, AWQ, GPTQ and compressed-tensors checkpoints "
                   "(docs/interchange.md): convert the float model")


def check_awq_config(quant: dict, cfg_path: Path) -> None:
    """AWQ int4 GEMM with zero points in groups lmc's kernels take; absent keys take AutoAWQ's defaults."""
    fields = (("bits", quant.get("bits", 4), lambda v: type(v) is int and v == 4),
              ("version", quant.get("version", "gemm"), lambda v: isinstance(v, str) and v.lower() == "gemm"),
              ("zero_point", quant.get("zero_point", True), lambda v: v is True),
              ("group_size", quant.get("group_size"), lambda v: type(v) is int and v in GROUP_SIZES))
    for key, value, ok in fields:
        if not ok(value):
            raise LmcError(f"{cfg_path}'s AWQ quantization_config has {key}={value!r}; lmc reads AWQ int4 GEMM with "
                           f"zero point (bits 4, version gemm, zero_point true, group_size {'/'.join(map(str, GROUP_SIZES))})")


_GPTQ_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is subtracted from a zero point before storing


def gptq_scheme(quant: dict, cfg_path: Path) -> Int4Scheme:
    """A GPTQ quantization_config (transformers' GPTQConfig / GPTQModel's QuantizeConfig): 4-bit,
    int32 words, v1 or v2 zero points, no per-module overrides; absent keys take their defaults."""
    fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))  # GPTQModel renamed checkpoint_format to format
    fields = (("bits", quant.get("bits", 4), lambda v: type(v) is int and v == 4),
              ("group_size", quant.get("group_size", 128), lambda v: type(v) is int and (v == -1 or v > 0)),
              ("checkpoint_format", fmt, lambda v: isinstance(v, str) and v.lower() in _GPTQ_ZERO_OFFSET),
              ("desc_act", quant.get("desc_act", False), lambda v: isinstance(v, bool)),
              ("sym", quant.get("sym", True), lambda v: isinstance(v, bool)),
              ("pack_dtype", quant.get("pack_dtype", "int32"), lambda v: v in ("int32", "torch.int32")),
              ("dynamic", quant.get("dynamic"), lambda v: not v),
              ("lm_head", quant.get("lm_head", False), lambda v: v is False),
              ("is_marlin_format", quant.get("is_marlin_format", False), lambda v: v is False))
    for key, value, ok in fields:
        if not ok(value):
            raise LmcError(f"{cfg_path}'s GPTQ quantization_config has {key}={value!r}; lmc reads GPTQ with bits 4, "
                           "checkpoint_format gptq or gptq_v2, int32 packing, no per-module overrides (dynamic) "
                           "and a float lm_head")
    group = quant.get("group_size", 128)
    return Int4Scheme("gptq", None if group == -1 else group, _GPTQ_ZERO_OFFSET[fmt.lower()])


def compressed_scheme(quant: dict, cfg_path: Path) -> Int4Scheme:
    """A compressed-tensors quantization_config lmc reads: W4A16, every config group the same
    4-bit int weight scheme (group or channel strategy, symmetric or not) in pack-quantized format,
    nothing else quantized, sparsified or transformed."""
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise LmcError(f"{cfg_path}'s compressed-tensors quantization_config has config_groups={groups!r}; "
                       "it needs at least one config group")
    schemes = [g.get("weights") for g in groups.values()]

    def refuse(key, value):
        raise LmcError(f"{cfg_path}'s compressed-tensors quantization_config has {key}={value!r}; lmc reads W4A16 "
                       "pack-quantized checkpoints (4-bit int weights in groups or per channel, no activation or KV "
                       "cache quantization, no sparsity or transforms)")

    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        value = quant.get(key)
        if value and not (key == "sparsity_config" and isinstance(value, dict) and value.get("format") == "dense"):
            refuse(key, value)
    if quant.get("quantization_status", "compressed") != "compressed":
        refuse("quantization_status", quant["quantization_status"])
    for name, group in groups.items():
        fmt = group.get("format") or quant.get("format")
        if fmt != "pack-quantized":
            refuse(f"config_groups.{name}.format", fmt)
        for key in ("input_activations", "output_activations"):
            if group.get(key) is not None:
                refuse(f"config_groups.{name}.{key}", group[key])
        if not isinstance(group.get("weights"), dict) or group["weights"] != schemes[0]:
            refuse(f"config_groups.{name}.weights", group.get("weights"))
    w = schemes[0]
    strategy = w.get("strategy")
    fields = (("num_bits", w.get("num_bits"), lambda v: type(v) is int and v == 4),
              ("type", w.get("type", "int"), lambda v: v == "int"),
              ("strategy", strategy, lambda v: v in ("group", "channel")),
              ("group_size", w.get("group_size"), lambda v: (type(v) is int and v > 0) if strategy == "group" else v in (None, -1)),
              ("symmetric", w.get("symmetric", True), lambda v: isinstance(v, bool)),
              ("dynamic", w.get("dynamic", False), lambda v: v is False))
    for key, value, ok in fields:
        if not ok(value):
            refuse(f"weights.{key}", value)
    return Int4Scheme("compressed-tensors", w.get("group_size") if strategy == "group" else None,
                      symmetric=w.get("symmetric", True))
