"""Which files hold a checkpoint's weights, found without opening them. Imports no torch, so a
command can start reading and hashing them while torch loads."""
from __future__ import annotations

import json
from pathlib import Path

from lmc.errors import LmcError
from lmc.format.paths import (MAX_INDEX_BYTES, MAX_TOKENIZER_FILE_BYTES, TOKENIZER_FILES,  # noqa: F401 - re-exported
                              NotRegularFile, confined, read_capped, read_file)



def read_tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The TOKENIZER_FILES an HF folder holds, read; each .json one must be a JSON object, since the workspace's
    tokenizer/ gets it and the runtime reads it (one line naming the file otherwise)."""
    files = {}
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            try:
                files[name] = read_capped(folder / name, MAX_TOKENIZER_FILE_BYTES)
            except NotRegularFile as e:
                raise LmcError(f"{folder / name} is {e}; the checkpoint's tokenizer files must be files") from None
    for name, data in files.items():
        if len(data) > MAX_TOKENIZER_FILE_BYTES:
            raise LmcError(f"{folder / name} is over {MAX_TOKENIZER_FILE_BYTES} bytes, more than any tokenizer file; "
                           "the checkpoint's tokenizer files are damaged (re-download them)")
        if not name.endswith(".json"):
            continue
        try:
            ok = isinstance(json.loads(data), dict)
        except (ValueError, RecursionError):  # ValueError: also an integer over Python's digit limit
            ok = False
        if not ok:
            raise LmcError(f"{folder / name} is not a JSON object; the checkpoint's tokenizer files are damaged "
                           "(re-download them)")
    return files


def _shards(index: Path) -> list[Path]:
    """The shard files a *.index.json names; each must be a plain file name path inside its folder."""
    raw = read_file(index, MAX_INDEX_BYTES, "re-download it")
    try:
        weight_map = json.loads(raw).get("weight_map")
    except (ValueError, RecursionError, AttributeError):  # ValueError: also an integer over Python's digit limit
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


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """("st" or "bin", the weight files) of an HF model folder: the shards its index names, else its
    *.safetensors, else its pytorch_model*.bin."""
    for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        index = folder / index_name
        if index.exists():  # a folder or pipe there is refused by _shards, not passed over
            return kind, _shards(index)
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return "st", st
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return "bin", bins
    raise LmcError(f"{folder} has no *.safetensors or pytorch_model*.bin weights; pass a Hugging Face model folder")


def early_source_files(src: str | Path) -> list[Path]:
    """The weight files `readers.open_source(src)` will read, where they can be told without torch:
    a .gguf file, or an HF folder's weight_files; [] for anything else or anything malformed (the
    reader then says what is wrong)."""
    path = Path(src)
    if path.is_file():
        return [path] if path.suffix == ".gguf" else []
    if not (path / "config.json").is_file() or (path / "lmc.json").is_file():
        return []
    try:
        return weight_files(path)[1]
    except LmcError:
        return []
