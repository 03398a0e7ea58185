"""Checks of a source checkpoint that need no torch, shared by the torch converter (compiler/convert.py's
Builder) and the torch-free one (compiler/passthrough.py), so both refuse the same inputs with the same line."""
from __future__ import annotations

from pathlib import Path

from lmc.errors import LmcError
from lmc.format.archs import Target, linear_parts
from lmc.format.config import ModelConfig
from lmc.format.manifest import plain_shape

WORKSPACE_DTYPES = ("float16", "bfloat16", "float32")


def dtype_name(choice: str, hf_config: dict) -> str:
    """The workspace's float dtype for `--dtype choice` ("auto": config.json's torch_dtype / dtype, float16 when
    it names none or another; an int4 source's scales decide instead: convert.resolve_dtype)."""
    if choice != "auto":
        return choice
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float16")
    return name if name in WORKSPACE_DTYPES else "float16"


def float_source_shapes(cfg: ModelConfig, t: Target) -> dict[str, tuple[int, ...]]:
    """{source tensor: the shape config.json implies} of target t in a float checkpoint, in fusion order."""
    if not t.linear:
        return {t.sources[0]: plain_shape(cfg, t)}
    rows, k = linear_parts(cfg, t.key)
    if t.fuse == "internlm2_qkv":
        rows = (sum(rows),)
    out = {}
    for source, n in zip(t.sources, rows):
        out[source + ".weight"] = (n, k)
        if cfg.qkv_bias and t.key == "w_qkv":
            out[source + ".bias"] = (n,)
    return out


def ignorable_names(cfg: ModelConfig, have: set[str]) -> set[str]:
    """Source tensors a conversion may leave unused: rotary frequency buffers, a tied model's lm_head."""
    ignorable = {n for n in have if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        ignorable |= {"lm_head.weight", "output.weight"} & have
    return ignorable


def check_vocabulary(tokenizer_json: bytes | None, source: Path, cfg: ModelConfig) -> None:
    """Every token id of the tokenizer must have an embedding row (more rows than tokens is normal)."""
    from tokenizers import Tokenizer

    if tokenizer_json is None:
        raise LmcError(f"{source} has no tokenizer.json; add the model's tokenizer files")
    try:
        vocab = Tokenizer.from_str(tokenizer_json.decode()).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own exception type for a malformed file
        raise LmcError(f"{source}'s tokenizer.json is not readable by the tokenizers library ({e})") from None
    top = max(vocab.values(), default=-1)
    rows = cfg.vocab_size
    if top >= rows:
        raise LmcError(f"the tokenizer has token id {top} but tok_embeddings.weight has {rows} rows "
                       f"[{rows}, {cfg.hidden_size}]; the tokenizer does not belong to this model")


def nonfinite(name: str, sources, dtype: str, allow: bool, say) -> None:
    """A tensor with NaN or Inf values: refused, or with `allow` (--allow-nonfinite) kept after a warning."""
    message = f"tensor {name} (from {', '.join(sources)}) has NaN or Inf values as {dtype}"
    if not allow:
        raise LmcError(f"{message}; the checkpoint is damaged (--allow-nonfinite keeps it anyway)")
    say(f"WARNING: {message}; kept because of --allow-nonfinite: the model's output may be garbage")
