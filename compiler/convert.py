"""Source checkpoint -> workspace, streaming one target tensor at a time."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import lmc
from lmc.format.archs import Target, arch_spec, model_config_from_hf
from lmc.compiler.readers import Source, open_source
from lmc.errors import LmcError
from lmc.format.config import ModelConfig
from lmc.format.workspace import FORMAT_VERSION, TensorSpec, atomic_output, sha256_file, write_workspace

DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")


def resolve_dtype(choice: str, hf_config: dict) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float16"
    if (hf_config.get("quantization_config") or {}).get("quant_method") == "awq":
        return torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(str(name), torch.float16)


def _rank_name(name: str, rank: int, tp: int, split: bool) -> str:
    """TurboMind's naming: split tensors carry the rank before the last component."""
    if tp == 1 or not split:
        return name
    base, leaf = name.rsplit(".", 1)
    return f"{base}.{rank}.{leaf}"


class Builder:
    """Makes each workspace tensor from the source, for one rank at a time."""

    def __init__(self, source: Source, cfg: ModelConfig, dtype: torch.dtype, tp: int):
        self.source, self.cfg, self.dtype, self.tp = source, cfg, dtype, tp
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
        return {_rank_name(k, rank, self.tp, t.split is not None): v for k, v in out.items()}

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


def provenance(source: Source, command: str, extra: dict | None = None) -> dict:
    files = {}
    for f in source.reader.source_files():
        rel = f.relative_to(source.path).as_posix() if source.path.is_dir() else f.name
        files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    if source.path.is_dir() and (source.path / "config.json").is_file():
        files["config.json"] = {"size": (source.path / "config.json").stat().st_size, "sha256": sha256_file(source.path / "config.json")}
    prov = {"lmc_version": lmc.__version__, "command": command, "source_format": source.model_format,
            "source_files": dict(sorted(files.items()))}
    prov.update(extra or {})
    return prov


def lmc_json(cfg: ModelConfig, dtype: torch.dtype, tp: int, quantization: dict | None) -> dict:
    return {"format_version": FORMAT_VERSION, "model": cfg.to_dict(), "dtype": str(dtype).removeprefix("torch."),
            "quantization": quantization, "tp": tp,
            "engine": {"session_len": cfg.max_position_embeddings, "cache_block_seq_len": 64}}


def convert(src: str | Path, out: str | Path, model_format: str | None = None, dtype: str = "auto", tp: int = 1,
            force: bool = False, progress: bool | None = None) -> dict:
    """Convert a checkpoint into a workspace at `out`. Returns the manifest."""
    source = open_source(src, model_format)
    cfg = model_config_from_hf(source.hf_config)
    torch_dtype = resolve_dtype(dtype, source.hf_config)
    builder = Builder(source, cfg, torch_dtype, tp)
    builder.check_names()
    rank_specs, owner = plan(builder)
    quantization = None
    if source.model_format == "awq":
        qc = source.hf_config["quantization_config"]
        quantization = {"method": "awq", "bits": qc.get("bits", 4), "group_size": qc["group_size"],
                        "layout": "lmc-int4-k8", "zero_point": qc.get("zero_point", True)}
    command = f"lmc convert <src> -o <workspace> --model-format {source.model_format} --dtype {dtype} --tp {tp}"
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

    with atomic_output(Path(out), force) as tmp:
        manifest = write_workspace(tmp, lmc_json(cfg, torch_dtype, tp, quantization), rank_specs, produce,
                                   source.tokenizer_files(), provenance(source, command))
    bar.close()
    return manifest


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not show, desc="convert", unit="tensor")
