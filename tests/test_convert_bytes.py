"""The converter's output bytes, pinned: every file of a workspace hashed against the digests the
converter of commit e623c80 wrote for the same tiny checkpoints (before the streaming writer, the
shape-only plan and the overlapped hashing). A change here means a change of the output format.

The checkpoints are conftest's seeded random models; if transformers changes how it initialises
them, regenerate the digests with the converter of e623c80 (run this test there
and print tree_digest of each workspace)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lmc.compiler.convert import convert


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and sha256, in path order."""
    sha = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
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

DIGESTS = {  # written by the converter of commit e623c80
    "llama3-fp32": "7187c84792b7d9e47bf952903f53a7faf27964741203ef3dbc7f6bead16384db",
    "llama3-fp16-from-fp32": "a2df8c23d5aaf7a76dbd2108d70594a159ae4192655f92c063588ceec24cf23c",
    "llama3-bf16-tp2": "4d6a51f30003b6bed129264871d0cb9f604e38b6381ae150cc85699ac21f9b3d",
    "qwen2-bias-tied": "def2fac2d7ecebe5896693a307db30b08eec9727e364d9f53522efb4294d8e2b",
    "internlm2-split": "a33d14f4287ce48dac7be7d34f28360f10f48d760a4579a34e9e01333ab05a5e",
    "gptq-int4": "56fa7e6d747f2d24d89d6bd0d24df20bbc3641d37ef04cc6d6304dee59d3eb41",
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_bytes_unchanged(case, checkpoint, tmp_path):
    make, kwargs = CASES[case]
    convert(make(checkpoint, tmp_path), tmp_path / "ws", **kwargs)
    assert tree_digest(tmp_path / "ws") == DIGESTS[case]
