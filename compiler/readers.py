"""Streaming checkpoint readers: one tensor at a time, shapes and dtypes without loading data.

Every reader offers names(), shape(name), dtype(name), get(name) and source_files(); an HF
folder also carries its config.json and tokenizer files (see `open_source`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmc.errors import LmcError
from lmc.format.int4 import GROUP_SIZES
from lmc.format.workspace import confined

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
              "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8, "F64": torch.float64}


class SafetensorsReader:
    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self._where: dict[str, object] = {}
        self._handles = []
        for f in files:
            if not f.is_file():
                raise LmcError(f"{f} is missing; the checkpoint is incomplete (re-download it)")
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise LmcError(f"{f} is not a readable safetensors file ({e}); the checkpoint is corrupt or truncated") from None
            self._handles.append(h)
            for name in h.keys():
                self._where[name] = h
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
        return _ST_DTYPES[self._where[name].get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def source_files(self) -> list[Path]:
        return list(self.files)


class TorchBinReader:
    """PyTorch .bin checkpoints, memory-mapped (torch.load(mmap=True, weights_only=True))."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise LmcError(f"{f} is missing; the checkpoint is incomplete (re-download it)")
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise LmcError(f"{f} is not a readable PyTorch checkpoint ({e}); it is corrupt or truncated") from None
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


@dataclass
class Source:
    """A checkpoint opened for conversion."""

    reader: object
    hf_config: dict
    path: Path
    model_format: str  # "hf" | "awq" | "gguf"
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
        files = {name: (self.path / name).read_bytes() for name in TOKENIZER_FILES if (self.path / name).is_file()}
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise LmcError(f"{path / 'tokenizer_config.json'} is not valid JSON ({e})") from None
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
            raise LmcError(f"{path} has no tokenizer.json and transformers could not build one ({e})") from None
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json")}


def _shards(index: Path) -> list[Path]:
    """The shard files a *.index.json names; each must be a plain file name path inside its folder."""
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise LmcError(f"{index} is malformed (it needs a weight_map of tensor name -> shard file); re-download it")
    shards = []
    for rel in sorted(set(weight_map.values())):
        shard = confined(index.parent, rel, resolve=False)
        if shard is None:
            raise LmcError(f"{index} names shard {rel!r}, outside the model folder; lmc reads shards inside the folder only")
        shards.append(shard)
    return shards


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        index = folder / index_name
        if index.is_file():
            return kind, _shards(index)
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return "st", st
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return "bin", bins
    raise LmcError(f"{folder} has no *.safetensors or pytorch_model*.bin weights; pass a Hugging Face model folder")


def open_source(src: str | Path, model_format: str | None = None) -> Source:
    """Open an HF folder (float or AWQ) or a GGUF file. model_format None: detect."""
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
    if not cfg_path.is_file():
        raise LmcError(f"{path} has no config.json; pass a Hugging Face model folder")
    try:
        hf_config = json.loads(cfg_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LmcError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise LmcError(f"{cfg_path} is not a JSON object")
    detected = "awq" if quantization_method(hf_config, cfg_path) == "awq" else "hf"
    if model_format == "awq" and detected != "awq":
        raise LmcError(f"{path} has no AWQ quantization_config; drop --model-format awq")
    kind, files = _weight_files(path)
    reader = SafetensorsReader(files) if kind == "st" else TorchBinReader(files)
    return Source(reader, hf_config, path, detected)


def quantization_method(hf_config: dict, cfg_path: Path) -> str | None:
    """None for a float checkpoint, "awq" for an AWQ GEMM one lmc reads; any other quantized format is refused."""
    quant = hf_config.get("quantization_config")
    if hf_config.get("compression_config") is not None:
        quant = {"quant_method": "compressed-tensors"}
    if quant is None or quant == {}:
        return None
    if not isinstance(quant, dict):
        raise LmcError(f"{cfg_path}'s quantization_config is {quant!r}, not an object")
    method = quant.get("quant_method")
    if not isinstance(method, str) or method.lower() != "awq":
        what = f"{method}" if method is not None else "quantized (quantization_config without quant_method)"
        raise LmcError(f"{what} checkpoints are not read yet; convert the float model or an AWQ checkpoint")
    check_awq_config(quant, cfg_path)
    return "awq"


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
