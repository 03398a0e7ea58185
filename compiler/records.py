"""What a workspace records about itself and where it came from: lmc.json's contents, and the manifest's
provenance (the source files' sizes and sha256, the command, the quantization record an `lmc quantize`
output carries). Imports no torch, so the torch-free converter (compiler/passthrough.py) writes the same
records as the others."""
from __future__ import annotations

import json
from pathlib import Path

import lmc
from lmc.errors import LmcError
from lmc.format.archs import sliding_window
from lmc.format.config import ModelConfig
from lmc.format.hashing import BackgroundHashes
from lmc.format.manifest import format_version

QUANTIZED_BY = ("lmc_version", "command", "quantization", "calibration", "source_files")  # kept from lmc_provenance.json


def lmc_json(cfg: ModelConfig, dtype, tp: int, quantization: dict | None, vision=None, window: int | None = None) -> dict:
    """lmc.json of a workspace; dtype: a torch dtype or its name ("float16"). `window`: a sliding-window model's
    window (session_window): it caps the default session length, and engine.attention_window records it so that the
    runtime refuses a longer --session-len."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    session_len = min(cfg.max_position_embeddings, window or cfg.max_position_embeddings)
    engine = {"session_len": session_len, "cache_block_seq_len": 64} | ({"attention_window": window} if window else {})
    meta = {"format_version": format_version(quantization), "model": cfg.to_dict(), "dtype": name,
            "quantization": quantization, "tp": tp, "engine": engine}
    return meta | ({"vision": vision.config.to_dict()} if vision is not None else {})


def session_window(hf_config: dict, cfg: ModelConfig) -> int | None:
    """A sliding-window model's window where it is shorter than the model's context (lmc has no sliding-window
    attention: the workspace's default session length is capped at it, where full attention is the same), else
    None. window_note says so once the workspace is written."""
    window = sliding_window(hf_config)
    return window if window is not None and window < cfg.max_position_embeddings else None


def window_note(cfg: ModelConfig, window: int) -> str:
    return (f"WARNING: this {cfg.architecture} model attends over a sliding window of {window} tokens, which lmc does "
            f"not run: the workspace's session length is capped at {window} tokens (where full attention is the same); "
            "lmc refuses a longer --session-len, which would differ from the model")


def convert_command(model_format: str, dtype: str, tp: int, allow_nonfinite: bool, vision_tower: bool) -> str:
    """`lmc convert`'s command line as the provenance records it (paths elided)."""
    return (f"lmc convert <src> -o <workspace> --model-format {model_format} --dtype {dtype} --tp {tp}"
            + (" --allow-nonfinite" if allow_nonfinite else "") + (" --vision-tower <dir>" if vision_tower else ""))


def provenance(path: Path, weight_files: list[Path], model_format: str, command: str, hashes: BackgroundHashes,
               extra: dict | None = None) -> dict:
    """The manifest's provenance of a workspace made from the checkpoint at `path` (a folder, or a GGUF file)."""
    files = {}
    for f in weight_files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        files[rel] = {"size": f.stat().st_size, hashes.algorithm: hashes.digest(f)}
    prov = {"lmc_version": lmc.__version__, "command": command, "source_format": model_format}
    for name in ("config.json", "lmc_provenance.json") if path.is_dir() else ():
        if (path / name).is_file():
            files[name] = {"size": (path / name).stat().st_size, hashes.algorithm: hashes.digest(path / name)}
    record = _quantized_by(path / "lmc_provenance.json") if path.is_dir() else None
    if record is not None:
        prov["quantized_by"] = record
    prov["source_files"] = dict(sorted(files.items()))
    prov.update(extra or {})
    return prov


def _quantized_by(path: Path) -> dict | None:
    """The quantization and calibration records `lmc quantize` left in its AWQ output, if any."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # ValueError: also an integer over Python's digit limit
        raise LmcError(f"{path} is not valid JSON ({e}); remove it or re-run `lmc quantize`") from None
    if not isinstance(record, dict):
        raise LmcError(f"{path} is not a JSON object; remove it or re-run `lmc quantize`")
    return {key: record[key] for key in QUANTIZED_BY if key in record}
