"""The converter's output bytes, pinned: every file of a workspace but lmc.json and manifest.json hashed
against the digests the converter of commit e623c80 wrote for the same tiny checkpoints (before the
streaming writer, the shape-only plan and the overlapped hashing, and format version 2's BLAKE3), and
the whole tree against this format version's. A change here means a change of the output format.

The checkpoints are conftest's seeded random models; if transformers changes how it initialises
them, regenerate the digests with the converter of e623c80 (run this test there
and print tree_digest of each workspace)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lmc.compiler.convert import convert


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over every file's relative path and sha256, in path order (but the files named in `skip`)."""
    sha = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() not in skip:
            sha.update(f"{p.relative_to(root).as_posix()}:{hashlib.sha256(p.read_bytes()).hexdigest()};".encode())
    return sha.hexdigest()


def _gptq(checkpoint, tmp_path: Path) -> Path:
    from test_interchange import write_gptq

    write_gptq(checkpoint("llama3"), tmp_path / "gptq", group_size=32)
    return tmp_path / "gptq"


CASES = {  # name -> (checkpoint maker, convert kwargs)
    "llama3-fp32": (lambda ck, tmp: ck("llama3"), {}),
    "llama3-fp16-from-fp32": (lambda ck, tmp: ck("llama3"), {"dtype": "float16"}),
    "llama3-bf16-tp2": (lambda ck, tmp: ck("llama3", dtype=torch.bfloat16), {"tp": 2}),
    "qwen2-bias-tied": (lambda ck, tmp: ck("qwen2"), {}),
    "internlm2-split": (lambda ck, tmp: ck("internlm2"), {"dtype": "float16"}),
    "gptq-int4": (_gptq, {}),
}

BODY_DIGESTS = {  # every file but lmc.json and manifest.json, as the converter of commit e623c80 wrote them
    "llama3-fp32": "99dbf327bc2cfa3262d4f9de70806705a778ea8bab7bbf365e9adfadda52ba68",
    "llama3-fp16-from-fp32": "f52e490aa55051233628bc6fcdab2f886da8c2b188278a655dc88e9e86e4c042",
    "llama3-bf16-tp2": "bc974d22cd07257f681511336b9db407590c8535f2102617ae31b5c7929d1b1d",
    "qwen2-bias-tied": "ff640226d4722215f3625db9ba54ec74eb4eff43488e5e31ea85c2a61046bbf9",
    "internlm2-split": "6bc071af37aa6830869ba1f93418ebe574b04df881f5f9189b1e8a79105f0b83",
    "gptq-int4": "15e499d5fea42880b89c1038af90678ee293d3076060851c8852fb9e14ee7fc8",
}
DIGESTS = {  # the whole tree in format version 2 (BLAKE3 file digests in manifest.json)
    "llama3-fp32": "1cdc6cf37b40866b49711c349c1b0dadb8e3aa4b874a20985307ad76337b81f6",
    "llama3-fp16-from-fp32": "10a471273684e11475ba3799ad1364c624cb03f0ad17ac4564d16c0eab195a86",
    "llama3-bf16-tp2": "331eaf43a1874e1f3ee7b2d4689b5cd9e66da91a917a4710513a4ca896019a17",
    "qwen2-bias-tied": "8430c0e38bff1ac3b9fa98f6eebf4059f70d8e1b82e0d0ed8db99ffbb5e9fe8d",
    "internlm2-split": "64a6070aec005f92a35970680de7127bbd30231a43bdff8d907b6e712c81f992",
    "gptq-int4": "349c8c47c4d19ae5fa601d26fbf146e86b5eeb4b5dbddc7d335a9a9ba2388033",
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_bytes_unchanged(case, checkpoint, tmp_path):
    make, kwargs = CASES[case]
    convert(make(checkpoint, tmp_path), tmp_path / "ws", **kwargs)
    assert tree_digest(tmp_path / "ws", ("lmc.json", "manifest.json")) == BODY_DIGESTS[case]
    assert tree_digest(tmp_path / "ws") == DIGESTS[case]
