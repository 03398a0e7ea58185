"""Source checkpoint -> workspace, streaming one target tensor at a time."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import lmc
from lmc.format.archs import Target, arch_spec, linear_parts, model_config_from_hf
from lmc.compiler.readers import Source, open_source
from lmc.errors import LmcError, WorkspaceError
from lmc.format.config import ModelConfig
from lmc.format.int4 import LAYOUT
from lmc.format.workspace import (DTYPES, FORMAT_VERSION, TensorSpec, Workspace, atomic_output, copy_workspace,
                                  expected_index, index_key, index_problems, plain_shape, rank_name, sha256_file,
                                  verify_workspace, write_workspace)

DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")


def resolve_dtype(choice: str, hf_config: dict) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float16"
    if (hf_config.get("quantization_config") or {}).get("quant_method") == "awq":
        return torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(str(name), torch.float16)


def warn(message: str) -> None:
    print(message, file=sys.stderr)


class Builder:
    """Makes each workspace tensor from the source, for one rank at a time.

    Every float tensor it makes is checked for NaN/Inf as it streams: refused, or with
    allow_nonfinite kept after a warning through `say`."""

    def __init__(self, source: Source, cfg: ModelConfig, dtype: torch.dtype, tp: int,
                 allow_nonfinite: bool = False, say=warn):
        self.source, self.cfg, self.dtype, self.tp = source, cfg, dtype, tp
        self.allow_nonfinite, self.say = allow_nonfinite, say
        self.reader = source.reader
        self.quant = source.model_format == "awq"
        self.group_size = (source.hf_config.get("quantization_config") or {}).get("group_size")
        self.targets = arch_spec(cfg).targets(cfg)
        self._check_tp()

    def _check_tp(self) -> None:
        c, tp = self.cfg, self.tp
        for what, n in (("attention heads", c.num_heads), ("KV heads", c.num_kv_heads), ("intermediate_size", c.intermediate_size)):
            if n % tp:
                raise LmcError(f"--tp {tp} does not divide {what} ({n}); choose a tp that divides {what}")
        row_parallel_k = (c.q_size // tp, c.intermediate_size // tp)  # K of wo and w2 per rank
        if self.quant and any(k % self.group_size for k in row_parallel_k):
            raise LmcError(f"--tp {tp} would split an int4 group of {self.group_size}; use a smaller --tp")

    # --- source access -------------------------------------------------------------
    def used_source_names(self) -> set[str]:
        names = set()
        for t in self.targets:
            for s in t.sources:
                if not t.linear:
                    names.add(s)
                elif self.quant:
                    names.update(s + leaf for leaf in (".qweight", ".qzeros", ".scales"))
                else:
                    names.add(s + ".weight")
                if t.linear and self.cfg.qkv_bias and t.name.endswith("w_qkv"):
                    names.add(s + ".bias")
        return names

    def check_names(self) -> None:
        """The source's tensor table against the name table: nothing missing, nothing unused, then every
        used tensor's shape and dtype against the config."""
        have = set(self.reader.names())
        used = self.used_source_names()
        missing = sorted(used - have)
        if missing:
            raise LmcError(f"the checkpoint lacks tensor {missing[0]} ({len(missing)} missing); it is incomplete or not a {self.cfg.architecture} model")
        ignorable = {n for n in have - used if n.endswith("rotary_emb.inv_freq")}
        if self.cfg.tie_word_embeddings:
            ignorable |= {"lm_head.weight", "output.weight"} & have
        unused = sorted(have - used - ignorable)
        if unused:
            raise LmcError(f"source tensor {unused[0]} is not used by the {self.cfg.architecture} name table ({len(unused)} unused); the architecture or config does not match the weights")
        for t in self.targets:
            for name, shape in self._source_shapes(t).items():
                got = tuple(self.reader.shape(name))
                if got != shape:
                    raise LmcError(f"source tensor {name} has shape {list(got)}, the config implies {list(shape)}; "
                                   "the weights do not match config.json")
                self._check_source_dtype(name)

    def _source_shapes(self, t: Target) -> dict[str, tuple[int, ...]]:
        """{source tensor: the shape config.json implies}; AWQ GEMM: qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]."""
        if not t.linear:
            return {t.sources[0]: plain_shape(self.cfg, t)}
        rows, k = linear_parts(self.cfg, t.key)
        if t.fuse == "internlm2_qkv":
            rows = (sum(rows),)
        g, out = self.group_size, {}
        for source, n in zip(t.sources, rows):
            if self.quant:
                out.update({source + ".qweight": (k, n // 8), source + ".qzeros": (k // g, n // 8), source + ".scales": (k // g, n)})
            else:
                out[source + ".weight"] = (n, k)
            if self.cfg.qkv_bias and t.key == "w_qkv":
                out[source + ".bias"] = (n,)
        return out

    def _check_source_dtype(self, name: str) -> None:
        dtype = self.reader.dtype(name)
        packed = self.quant and name.endswith((".qweight", ".qzeros"))
        if (packed and dtype != torch.int32) or (not packed and not dtype.is_floating_point):
            raise LmcError(f"source tensor {name} is {str(dtype).removeprefix('torch.')}, expected "
                           f"{'int32 (AWQ-packed)' if packed else 'a float dtype'}; the checkpoint is not a float or AWQ checkpoint")

    def check_vocabulary(self) -> None:
        """Every token id of the tokenizer must have an embedding row (more rows than tokens is normal)."""
        from tokenizers import Tokenizer

        data = self.source.tokenizer_files().get("tokenizer.json")
        if data is None:
            raise LmcError(f"{self.source.path} has no tokenizer.json; add the model's tokenizer files")
        try:
            vocab = Tokenizer.from_str(data.decode()).get_vocab(with_added_tokens=True)
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise LmcError(f"{self.source.path}'s tokenizer.json is not readable by the tokenizers library ({e})") from None
        top = max(vocab.values(), default=-1)
        rows = self.cfg.vocab_size
        if top >= rows:
            raise LmcError(f"the tokenizer has token id {top} but tok_embeddings.weight has {rows} rows "
                           f"[{rows}, {self.cfg.hidden_size}]; the tokenizer does not belong to this model")

    def check_finite_globals(self) -> None:
        """Build (and so check) the embeddings, final norm and lm_head before anything uses them."""
        for t in self.targets:
            if t.key is None:
                self.build(t, 0)

    # --- fusions and splits ---------------------------------------------------------
    def _parts(self, t: Target, leaf: str) -> list[torch.Tensor]:
        """The source tensors of a linear (leaf: weight/bias/qweight...), row-major in N."""
        if t.fuse == "internlm2_qkv":
            return self._split_internlm2(self.reader.get(t.sources[0] + leaf))
        return [self.reader.get(s + leaf) for s in t.sources]

    def _split_internlm2(self, w: torch.Tensor) -> list[torch.Tensor]:
        c = self.cfg
        per_kv = c.num_heads // c.num_kv_heads
        grouped = w.reshape(c.num_kv_heads, per_kv + 2, c.head_dim, *w.shape[1:])  # [Hkv, g+2, D, ...]
        q = grouped[:, :per_kv].reshape(c.q_size, *w.shape[1:])  # [Hq*D, ...]
        k = grouped[:, per_kv].reshape(c.kv_size, *w.shape[1:])  # [Hkv*D, ...]
        v = grouped[:, per_kv + 1].reshape(c.kv_size, *w.shape[1:])
        return [q, k, v]

    def _fuse(self, parts: list[torch.Tensor], split: str | None, rank: int, dim_n: int) -> torch.Tensor:
        """Cut each part for `rank` (col: along N, row: along K) and concatenate along N."""
        if split == "col" and self.tp > 1:
            parts = [p.chunk(self.tp, dim=dim_n)[rank] for p in parts]
        elif split == "row" and self.tp > 1:
            parts = [p.chunk(self.tp, dim=1 - dim_n)[rank] for p in parts]
        return torch.cat(parts, dim=dim_n) if len(parts) > 1 else parts[0]

    def build(self, t: Target, rank: int) -> dict[str, torch.Tensor]:
        built = self._build(t, rank)
        for name, tensor in built.items():
            if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
                message = (f"tensor {name} (from {', '.join(t.sources)}) has NaN or Inf values as "
                           f"{str(tensor.dtype).removeprefix('torch.')}")
                if not self.allow_nonfinite:
                    raise LmcError(f"{message}; the checkpoint is damaged (--allow-nonfinite keeps it anyway)")
                self.say(f"WARNING: {message}; kept because of --allow-nonfinite: the model's output may be garbage")
        return built

    def _build(self, t: Target, rank: int) -> dict[str, torch.Tensor]:
        if not t.linear:
            return {t.name: self.reader.get(t.sources[0]).to(self.dtype)}
        out = {}
        if self.quant:
            from lmc.compiler.pack import unpack_awq
            from lmc.format.int4 import to_lmc_tensors

            unpacked = [unpack_awq(*(self._parts_awq(t, i)), self.group_size) for i in range(len(self._awq_sources(t)))]
            codes = self._fuse([u[0] for u in unpacked], t.split, rank, 0)  # [N, K]
            scales = self._fuse([u[1] for u in unpacked], t.split, rank, 0)  # [N, K/G]
            zeros = self._fuse([u[2] for u in unpacked], t.split, rank, 0)
            q, s, z = to_lmc_tensors(codes, scales, zeros, self.dtype)
            out.update({f"{t.name}.qweight": q, f"{t.name}.scales": s, f"{t.name}.zeros": z})
        else:
            out[f"{t.name}.weight"] = self._fuse(self._parts(t, ".weight"), t.split, rank, 0).to(self.dtype)
        if self.cfg.qkv_bias and t.name.endswith("w_qkv"):
            out[f"{t.name}.bias"] = self._fuse(self._parts(t, ".bias"), t.split, rank, 0).to(self.dtype)
        return {rank_name(k, rank, self.tp, t.split is not None): v for k, v in out.items()}

    def _awq_sources(self, t: Target) -> list[int]:
        return list(range(3 if t.fuse == "internlm2_qkv" else len(t.sources)))

    def _parts_awq(self, t: Target, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """AWQ tensors of part i. AWQ packs along N (qweight [K, N/8]), so InternLM2's fused
        wqkv is split after unpacking instead; other architectures read the part directly."""
        if t.fuse == "internlm2_qkv":
            raise LmcError("AWQ InternLM2 checkpoints are not supported yet; convert the float model and quantize with lmc")
        s = t.sources[i]
        return self.reader.get(s + ".qweight"), self.reader.get(s + ".qzeros"), self.reader.get(s + ".scales")


class _MetaReader:
    """Stands in for a reader during planning: shapes and dtypes, no data."""

    def __init__(self, reader):
        self.reader = reader

    def get(self, name: str) -> torch.Tensor:
        return torch.empty(self.reader.shape(name), dtype=self.reader.dtype(name), device="meta")

    def names(self):
        return self.reader.names()


def plan(builder: Builder) -> tuple[list[list[TensorSpec]], dict[tuple[int, str], Target]]:
    """Every rank's tensor specs, built on meta tensors, and which target yields each name."""
    real, builder.reader = builder.reader, _MetaReader(builder.reader)
    rank_specs, owner = [], {}
    try:
        for rank in range(builder.tp):
            specs = []
            for target in builder.targets:
                for name, t in builder.build(target, rank).items():
                    specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
                    owner[(rank, name)] = target
            rank_specs.append(specs)
    finally:
        builder.reader = real
    return rank_specs, owner


QUANTIZED_BY = ("lmc_version", "command", "quantization", "calibration", "source_files")  # kept from lmc_provenance.json


def provenance(source: Source, command: str, extra: dict | None = None) -> dict:
    files = {}
    for f in source.reader.source_files():
        rel = f.relative_to(source.path).as_posix() if source.path.is_dir() else f.name
        files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    prov = {"lmc_version": lmc.__version__, "command": command, "source_format": source.model_format}
    for name in ("config.json", "lmc_provenance.json") if source.path.is_dir() else ():
        if (source.path / name).is_file():
            files[name] = {"size": (source.path / name).stat().st_size, "sha256": sha256_file(source.path / name)}
    record = _quantized_by(source.path / "lmc_provenance.json") if source.path.is_dir() else None
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LmcError(f"{path} is not valid JSON ({e}); remove it or re-run `lmc quantize`") from None
    if not isinstance(record, dict):
        raise LmcError(f"{path} is not a JSON object; remove it or re-run `lmc quantize`")
    return {key: record[key] for key in QUANTIZED_BY if key in record}


def lmc_json(cfg: ModelConfig, dtype: torch.dtype, tp: int, quantization: dict | None) -> dict:
    return {"format_version": FORMAT_VERSION, "model": cfg.to_dict(), "dtype": str(dtype).removeprefix("torch."),
            "quantization": quantization, "tp": tp,
            "engine": {"session_len": cfg.max_position_embeddings, "cache_block_seq_len": 64}}


def convert(src: str | Path, out: str | Path, model_format: str | None = None, dtype: str = "auto",
            tp: int | None = None, force: bool = False, progress: bool | None = None,
            allow_nonfinite: bool = False, say=warn) -> dict:
    """Convert a checkpoint into a workspace at `out` (tp None: 1, or a workspace source's own).
    Returns the manifest."""
    if (Path(src) / "lmc.json").is_file():
        return copy_verified_workspace(Path(src), Path(out), model_format, dtype, tp, force, say)
    tp = 1 if tp is None else tp
    source = open_source(src, model_format)
    cfg = model_config_from_hf(source.hf_config)
    torch_dtype = resolve_dtype(dtype, source.hf_config)
    builder = Builder(source, cfg, torch_dtype, tp, allow_nonfinite, say)
    builder.check_names()
    builder.check_vocabulary()
    rank_specs, owner = plan(builder)
    quantization = None
    if source.model_format == "awq":
        quantization = {"method": "awq", "bits": 4, "group_size": builder.group_size, "layout": LAYOUT, "zero_point": True}
    ws_dtype = str(torch_dtype).removeprefix("torch.")
    built = {index_key(spec.name, rank, tp): (DTYPES[spec.dtype], spec.shape)
             for rank, specs in enumerate(rank_specs) for spec in specs}
    problems = index_problems(expected_index(cfg, ws_dtype, quantization, tp), built, cfg.architecture)
    if problems:
        raise LmcError(f"the converted model does not fit its config: {problems[0]}")
    command = (f"lmc convert <src> -o <workspace> --model-format {source.model_format} --dtype {dtype} --tp {tp}"
               + (" --allow-nonfinite" if allow_nonfinite else ""))
    show = sys.stderr.isatty() if progress is None else progress
    bar = _progress(sum(len(s) for s in rank_specs), show)
    cache: dict = {}

    def produce(rank: int, name: str) -> torch.Tensor:
        key = (rank, owner[(rank, name)].name)
        if cache.get("key") != key:
            cache.clear()
            cache.update(key=key, tensors=builder.build(owner[(rank, name)], rank))
        bar.update(1)
        return cache["tensors"][name]

    inputs = [source.path] + list(source.reader.source_files())
    with atomic_output(Path(out), force, inputs) as tmp:
        manifest = write_workspace(tmp, lmc_json(cfg, torch_dtype, tp, quantization), rank_specs, produce,
                                   source.tokenizer_files(), provenance(source, command))
    bar.close()
    return manifest


def copy_verified_workspace(src: Path, out: Path, model_format: str | None, dtype: str, tp: int | None,
                            force: bool, say) -> dict:
    """`lmc convert` of a workspace: verify it and copy its files unchanged (same dtype and tp only)."""
    if model_format is not None:
        raise LmcError(f"{src} is an lmc workspace, not a {model_format} checkpoint; drop --model-format")
    ws = Workspace(src)
    if dtype not in ("auto", ws.meta["dtype"]) or tp not in (None, ws.tp):
        raise LmcError(f"{src} is already a workspace ({ws.meta['dtype']}, tp {ws.tp}); re-splitting or re-casting "
                       "a workspace is not supported: convert from the original checkpoint")
    problems = verify_workspace(src)
    if problems:
        raise WorkspaceError(f"{src} is a workspace that fails `lmc verify`: {problems[0]}")
    say(f"{src} is already an lmc workspace: copying it unchanged")
    with atomic_output(out, force, [src]) as tmp:
        return copy_workspace(src, tmp)


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not show, desc="convert", unit="tensor")
