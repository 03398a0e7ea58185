"""Source checkpoint -> workspace, streaming one target tensor at a time."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmc.format.archs import (LAYER_NAMES, LINEAR_KEYS, Target, arch_spec, kv_heads_of_rank, linear_parts, model_config_from_hf,
                              tp_problem)
from lmc.compiler.pack import (GROUP_INDEX_LEAF, INDEX_LEAVES, INT32_LEAVES, checkpoint_int4_shapes, fold_group_size,
                               group_labels, input_order, unpack_awq, unpack_compressed, unpack_gptq)
from lmc.compiler.llava import split_vision, vision_specs
from lmc.compiler import records
from lmc.compiler.readers import Source, open_source
from lmc.compiler.records import convert_command, lmc_json  # noqa: F401 - lmc_json re-exported
from lmc.compiler.source_checks import (check_vocabulary, dtype_name, float_source_shapes, ignorable_names,
                                        nonfinite)
from lmc.errors import LmcError, WorkspaceError
from lmc.format.config import ModelConfig
from lmc.format.int4 import LAYOUT, to_lmc_tensors
from lmc.format.hashing import BackgroundHashes
from lmc.format.manifest import DIGEST
from lmc.runtime.device import one_torch_thread
from lmc.format.workspace import (DTYPE_NAMES, TensorSpec, Workspace, atomic_output, copy_workspace,
                                  rank_name, verify_workspace, workspace_tensors, write_workspace)

DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")


def resolve_dtype(choice: str, hf_config: dict, scales_dtype: torch.dtype | None = None) -> torch.dtype:
    """The workspace's float dtype: `choice`, or for "auto" the int4 scales' dtype (so they convert
    exactly) or else the config's."""
    if choice == "auto" and scales_dtype is not None:
        return scales_dtype
    return getattr(torch, dtype_name(choice, hf_config))


def int4_scales_dtype(source: Source) -> torch.dtype | None:
    """The float dtype of an int4 checkpoint's scales (None: a float checkpoint)."""
    if source.int4 is None:
        return None
    leaf = ".weight_scale" if source.int4.method == "compressed-tensors" else ".scales"
    name = min((n for n in source.reader.names() if n.endswith(leaf)), default=None)
    dtype = None if name is None else source.reader.dtype(name)
    return dtype if dtype is not None and dtype.is_floating_point else None


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
        self.int4 = source.int4
        self.quant = self.int4 is not None
        self.group_size = (fold_group_size(self.int4.group_size, f"{source.path / 'config.json'}'s {self.int4.method} config")
                           if self.quant else None)  # lmc's group; the checkpoint's is self.int4.group_size
        self.targets = arch_spec(cfg).targets(cfg)
        self._names = set(self.reader.names())
        self.act_order: tuple[str, ...] = ()  # the linear keys stored in act-order (a `.perm` each): check_names sets it
        self._w2_order: dict[str, torch.Tensor] = {}  # layer prefix -> its act-order w2's input order (folded into w13)
        self._check_tp()

    def _check_tp(self) -> None:
        problem = tp_problem(self.cfg, self.tp, self.group_size)
        if problem:
            raise LmcError(problem)

    # --- source access -------------------------------------------------------------
    def used_source_names(self) -> set[str]:
        names = set()
        for t in self.targets:
            names.update(self._source_shapes(t))
        return names

    def check_names(self) -> None:
        """The source's tensor table against the name table: nothing missing, nothing unused, then every
        used tensor's shape and dtype against the config."""
        have = self._names
        used = self.used_source_names()
        missing = sorted(used - have)
        if missing:
            self._check_quantized_parts(missing[0], have)
            raise LmcError(f"the checkpoint lacks tensor {missing[0]} ({len(missing)} missing); it is incomplete or not a {self.cfg.architecture} model")
        unused = sorted(have - used - ignorable_names(self.cfg, have))
        if unused:
            self._check_quantized_parts(unused[0], have)
            raise LmcError(f"source tensor {unused[0]} is not used by the {self.cfg.architecture} name table ({len(unused)} unused); the architecture or config does not match the weights")
        for t in self.targets:
            for name, shape in self._source_shapes(t).items():
                got = tuple(self.reader.shape(name))
                if got != shape:
                    raise LmcError(f"source tensor {name} has shape {list(got)}, the config implies {list(shape)}; "
                                   "the weights do not match config.json")
                self._check_source_dtype(name)
        if self.quant:  # act-order that cannot be stored: refused before anything is written
            self._check_act_order()

    def _check_act_order(self) -> None:
        """Every int4 source's g_idx against its groups (group_labels), the parts of a fused linear in one input
        order, and which linear keys need their act-order `.perm` (self.act_order); a workspace with one is tp 1.
        w2 never needs one: its input is w13's output, whose rows are stored in w2's order instead (_build)."""
        keys = set()
        for t in self.targets:
            if not t.linear:
                continue
            orders = [self._order_and_labels(base, linear_parts(self.cfg, t.key)[1], self._checkpoint_groups(base),
                                             "cpu")[0] for base in t.sources]
            for base, order in zip(t.sources[1:], orders[1:]):
                if not _same_order(order, orders[0]):
                    raise LmcError(f"{t.sources[0]} and {base} have different act-order (desc_act) g_idx, but lmc runs "
                                   f"them as one fused linear that reads its input in one order (as vLLM does); use a "
                                   "checkpoint quantized without act-order, or quantize the float model with `lmc quantize`")
            if orders[0] is not None and t.key == "w2":
                self._w2_order[t.name.removesuffix(LAYER_NAMES["w2"])] = orders[0]
            elif orders[0] is not None:
                keys.add(t.key)
        self.act_order = tuple(k for k in LINEAR_KEYS if k in keys)
        if (self.act_order or self._w2_order) and self.tp > 1:
            raise LmcError(f"--tp {self.tp}: this {self.int4.method} checkpoint is act-order (desc_act), whose input "
                           "columns lmc reorders per linear; such workspaces run with --tp 1: convert with --tp 1")

    def _check_quantized_parts(self, name: str, have: set[str]) -> None:
        """Why a quantized checkpoint's tensor `name` is missing or unused, when the reason is what it
        quantizes: a layer linear left in float (an ignore list, a skipped module), or an embedding or
        lm_head quantized. Raises; returns when that is not the reason."""
        if not self.quant:
            return
        base = name.rsplit(".", 1)[0]
        if any(base + leaf in have for leaf in INT32_LEAVES):
            raise LmcError(f"{base} is quantized in this {self.int4.method} checkpoint, but lmc keeps embeddings and "
                           "lm_head in float: convert the float model, or one quantized without them")
        for t in self.targets:
            for s in t.sources if t.linear else ():
                if s + ".weight" in have:
                    raise LmcError(f"{s} is not quantized in this {self.int4.method} checkpoint (its ignore list or "
                                   "per-module config leaves it in float); an int4 workspace holds every layer linear in "
                                   "int4: quantize the float model with `lmc quantize`")

    def _source_shapes(self, t: Target) -> dict[str, tuple[int, ...]]:
        """{source tensor: the shape config.json implies} (int4 layouts: pack.checkpoint_int4_shapes)."""
        if not self.quant or not t.linear:
            return float_source_shapes(self.cfg, t)
        rows, k = linear_parts(self.cfg, t.key)
        if t.fuse == "internlm2_qkv":
            rows = (sum(rows),)
        out = {}
        for source, n in zip(t.sources, rows):
            shapes = checkpoint_int4_shapes(self.int4.method, n, k, self.int4.group_size, self.int4.symmetric)
            out.update({source + leaf: shape for leaf, shape in shapes.items()})
            if self.cfg.qkv_bias and t.key == "w_qkv":
                out[source + ".bias"] = (n,)
        index = GROUP_INDEX_LEAF.get(self.int4.method)  # optional: act-order's g_idx
        out.update({s + index: (k,) for s in t.sources if index and s + index in self._names})
        return out

    def _check_source_dtype(self, name: str) -> None:
        dtype = self.reader.dtype(name)
        if self.quant and name.endswith(INT32_LEAVES):
            ok, expected = dtype == torch.int32, "int32 (packed int4)"
        elif self.quant and name.endswith(INDEX_LEAVES):
            ok, expected = not dtype.is_floating_point and dtype != torch.bool, "an integer dtype"
        else:
            ok, expected = dtype.is_floating_point, "a float dtype"
        if not ok:
            kind = self.int4.method if self.quant else "float"
            raise LmcError(f"source tensor {name} is {str(dtype).removeprefix('torch.')}, expected {expected}; "
                           f"the checkpoint is not the {kind} checkpoint its config.json says")

    def check_vocabulary(self) -> None:
        check_vocabulary(self.source.tokenizer_files().get("tokenizer.json"), self.source.path, self.cfg)

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

    def _cut(self, parts: list[torch.Tensor], t: Target, rank: int) -> list[torch.Tensor]:
        """Rank's cut of each part of a linear [n, K] (col: along N, K and V by KV head; row: along K)."""
        if t.split == "col" and self.tp > 1:
            cut = [p.chunk(self.tp, dim=0)[rank] for p in parts]
            if t.key == "w_qkv":  # q, k, v: k and v by the rank's KV heads (replicated when fewer than ranks)
                heads, d = kv_heads_of_rank(self.cfg, self.tp, rank), self.cfg.head_dim
                cut[1:] = [p.narrow(0, heads.start * d, len(heads) * d) for p in parts[1:]]
            return cut
        if t.split == "row" and self.tp > 1:
            return [p.chunk(self.tp, dim=1)[rank] for p in parts]
        return parts

    def _fuse(self, parts: list[torch.Tensor], t: Target, rank: int) -> torch.Tensor:
        """Rank's cut of each part, concatenated along N."""
        parts = self._cut(parts, t, rank)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _row_blocks(self, parts: list[torch.Tensor], t: Target, rank: int) -> list[torch.Tensor]:
        """`_fuse` without the concatenation: rank's cut of each part, in the store dtype (a view of the
        source where the dtype is already right)."""
        return [p.to(self.dtype) for p in self._cut(parts, t, rank)]

    def build(self, t: Target, rank: int) -> dict[str, torch.Tensor]:
        """Target t's workspace tensors for `rank`, each one tensor (fused parts concatenated)."""
        return {name: blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                for name, blocks in self.build_blocks(t, rank).items()}

    def build_blocks(self, t: Target, rank: int) -> dict[str, list[torch.Tensor]]:
        """Target t's workspace tensors for `rank` as row blocks (their concatenation along dim 0 is the
        tensor: the writer writes them one after the other, so fusing copies nothing)."""
        built = self._build(t, rank)
        for name, blocks in built.items():
            if blocks[0].is_floating_point() and not all(_finite(b) for b in blocks):
                nonfinite(name, t.sources, str(blocks[0].dtype).removeprefix("torch."), self.allow_nonfinite, self.say)
        return built

    def _build(self, t: Target, rank: int) -> dict[str, list[torch.Tensor]]:
        if not t.linear:
            return {t.name: [self.reader.get(t.sources[0]).to(self.dtype)]}
        out = {}
        if self.quant:
            parts = self._int4_parts(t)  # per part: codes [n, K], scales and zeros [n, ceil(K/G)]
            codes = self._fuse([p[0] for p in parts], t, rank)  # [N, K]
            scales = self._fuse([p[1] for p in parts], t, rank)  # [N, K/G]
            zeros = self._fuse([p[2] for p in parts], t, rank)
            w2_order = self._w2_order.get(t.name.removesuffix(LAYER_NAMES["w13"])) if t.key == "w13" else None
            if w2_order is not None:  # gate and up rows in w2's stored input order: w13's output is what w2 reads
                rows = torch.cat([w2_order, w2_order + codes.shape[0] // 2])  # [2I]: gate rows, then up rows
                codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
            q, s, z = to_lmc_tensors(codes, scales, zeros, self.dtype)
            out.update({f"{t.name}.qweight": [q], f"{t.name}.scales": [s], f"{t.name}.zeros": [z]})
            if t.key in self.act_order:  # every part's order is the same (_check_act_order); identity where none
                order = parts[0][3] if parts[0][3] is not None else torch.arange(linear_parts(self.cfg, t.key)[1])
                out[f"{t.name}.perm"] = [order.to(torch.int32)]  # [K]: stored input column j is input column perm[j]
        else:
            out[f"{t.name}.weight"] = self._row_blocks(self._parts(t, ".weight"), t, rank)  # [n, K] each
        if self.cfg.qkv_bias and t.name.endswith("w_qkv"):
            out[f"{t.name}.bias"] = self._row_blocks(self._parts(t, ".bias"), t, rank)
        return {rank_name(k, rank, self.tp, t.split is not None): v for k, v in out.items()}

    def _int4_parts(self, t: Target) -> list[tuple]:
        """The int4 parts of a linear, unpacked to codes [n, K] and lmc-grouped scales and zeros
        [n, ceil(K/G)], with the act-order input order (None: none); InternLM2's fused wqkv is split after
        unpacking (its rows are N)."""
        rows, k = linear_parts(self.cfg, t.key)
        if t.fuse == "internlm2_qkv":
            *fused, order = self._read_int4(t.sources[0], sum(rows), k)
            return [(*part, order) for part in zip(*(self._split_internlm2(x) for x in fused))]
        return [self._read_int4(s, n, k) for s, n in zip(t.sources, rows)]

    def _read_int4(self, base: str, n: int, k: int) -> tuple:
        """One int4 source linear W [n, K] in any checkpoint layout -> codes, scales, zeros in lmc's groups, and
        act-order's input order [K] (None: none; the codes' columns are then in that order)."""
        get, method, g = self.reader.get, self.int4.method, self.int4.group_size
        if method == "awq":
            codes, scales, zeros = unpack_awq(get(base + ".qweight"), get(base + ".qzeros"), get(base + ".scales"), g)
        elif method == "gptq":
            codes, scales, zeros = unpack_gptq(get(base + ".qweight"), get(base + ".qzeros"), get(base + ".scales"), k,
                                               self.int4.zero_offset)
        else:
            shape = get(base + ".weight_shape")
            if not shape.is_meta and shape.tolist() != [n, k]:
                raise LmcError(f"source tensor {base}.weight_shape is {shape.tolist()}, the config implies {[n, k]}; "
                               "the weights do not match config.json")
            zero_point = None if self.int4.symmetric else get(base + ".weight_zero_point")
            codes, scales, zeros = unpack_compressed(get(base + ".weight_packed"), get(base + ".weight_scale"), zero_point, k)
        order, labels = self._order_and_labels(base, k, scales.shape[1], scales.device)  # [K] or None, [ceil(K/G)]
        if order is not None:
            codes = codes[:, order.to(codes.device)]  # [n, K]: column j is input column order[j]
        return codes, scales[:, labels].contiguous(), zeros[:, labels].contiguous(), order

    def _checkpoint_groups(self, base: str) -> int:
        """How many scale groups a source linear has in the checkpoint."""
        if self.int4.method == "compressed-tensors":
            return self.reader.shape(base + ".weight_scale")[1]
        return self.reader.shape(base + ".scales")[0]

    def _order_and_labels(self, base: str, k: int, n_groups: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One source linear's act-order input order (pack.input_order; None: none) and the checkpoint group of
        each of lmc's groups in the stored order (pack.group_labels)."""
        index = base + GROUP_INDEX_LEAF.get(self.int4.method, "")
        if index in self._names:
            group_of_column = self.reader.get(index)  # [K]
        else:
            columns = torch.arange(k, device=device)
            group_of_column = columns // self.int4.group_size if self.int4.group_size is not None else torch.zeros_like(columns)
        order = input_order(group_of_column, self.group_size)
        stored = group_of_column if order is None else group_of_column[order]  # [K]
        return order, group_labels(stored, self.group_size, n_groups, base)


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t: its min and max are finite (both propagate NaN). One pass and no bool copy:
    a float16 [5632, 2048] in 16 ms, where isfinite().all() took 94 ms (two torch threads, busy CPU)."""
    if not t.numel():
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def plan(builder: Builder) -> tuple[list[list[TensorSpec]], dict[tuple[int, str], Target]]:
    """Every rank's tensor specs, from the config's shapes (lmc.format.workspace.workspace_tensors;
    the writer checks each built tensor against its spec), and which target yields each name."""
    rank_specs, owner = [[] for _ in range(builder.tp)], {}
    quantization = {"group_size": builder.group_size, "act_order": list(builder.act_order)} if builder.quant else None
    dtype = str(builder.dtype).removeprefix("torch.")
    for rank, target, name, dt, shape in workspace_tensors(builder.cfg, dtype, quantization, builder.tp):
        rank_specs[rank].append(TensorSpec(name, DTYPE_NAMES[dt], shape))
        owner[(rank, name)] = target
    return rank_specs, owner


def source_hashes(source: Source) -> BackgroundHashes:
    """The source's files (weights, config.json, lmc_provenance.json) hashed on threads from now on:
    this is the first read of the source, so the conversion's own reads come from the page cache."""
    files = list(source.reader.source_files())
    if source.path.is_dir():
        files += [source.path / name for name in ("config.json", "lmc_provenance.json") if (source.path / name).is_file()]
    return BackgroundHashes(files, DIGEST)


def provenance(source: Source, command: str, extra: dict | None = None, hashes: BackgroundHashes | None = None) -> dict:
    return records.provenance(source.path, source.reader.source_files(), source.model_format, command,
                              hashes or source_hashes(source), extra)


def convert(src: str | Path, out: str | Path, model_format: str | None = None, dtype: str = "auto",
            tp: int | None = None, force: bool = False, progress: bool | None = None,
            allow_nonfinite: bool = False, say=warn, hashes: BackgroundHashes | None = None,
            vision_tower: str | Path | None = None) -> dict:
    """Convert a checkpoint into a workspace at `out` (tp None: 1, or a workspace source's own); a LLaVA
    checkpoint's vision half goes along (`vision_tower`: the original layout's CLIP folder). Returns the
    manifest.

    Three things overlap: the source is read and hashed for the provenance on threads from the
    start (source_hashes, or `hashes` where the caller started them before loading torch:
    source_files.early_source_files), the main thread builds each tensor as row blocks of the
    mapped source (no fusion copy), and each shard is written and hashed on two more threads
    (workspace.write_safetensors). torch runs on one thread meanwhile."""
    if (Path(src) / "lmc.json").is_file():
        return copy_verified_workspace(Path(src), Path(out), model_format, dtype, tp, force, say)
    tp = 1 if tp is None else tp
    source = split_vision(open_source(src, model_format), vision_tower)
    vision = source.vision
    if vision is not None and tp > 1:
        raise LmcError(f"--tp {tp}: vision-language checkpoints convert with --tp 1 (lmc runs them on one device)")
    hashes = hashes or source_hashes(source)
    cfg = model_config_from_hf(source.hf_config)
    window = records.session_window(source.hf_config, cfg)
    torch_dtype = resolve_dtype(dtype, source.hf_config, int4_scales_dtype(source))
    builder = Builder(source, cfg, torch_dtype, tp, allow_nonfinite, say)
    builder.check_names()
    builder.check_vocabulary()
    rank_specs, owner = plan(builder)
    if vision is not None:
        vision.check()
        rank_specs = [specs + vision_specs(vision, torch_dtype) for specs in rank_specs]
    quantization = None
    if builder.quant:
        quantization = {"method": source.model_format, "bits": 4, "group_size": builder.group_size, "layout": LAYOUT,
                        "zero_point": True} | ({"act_order": list(builder.act_order)} if builder.act_order else {})
    command = convert_command(source.model_format, dtype, tp, allow_nonfinite, vision_tower is not None)
    show = sys.stderr.isatty() if progress is None else progress
    bar = _progress(sum(spec.nbytes for specs in rank_specs for spec in specs), show)
    sizes = {(rank, spec.name): spec.nbytes for rank, specs in enumerate(rank_specs) for spec in specs}
    cache: dict = {}

    def produce(rank: int, name: str) -> list[torch.Tensor]:
        if vision is not None and name in vision.sources:
            bar.update(sizes[(rank, name)])
            return vision.build(name, torch_dtype)
        key = (rank, owner[(rank, name)].name)
        if cache.get("key") != key:
            cache.clear()
            cache.update(key=key, blocks=builder.build_blocks(owner[(rank, name)], rank))
        bar.update(sizes[(rank, name)])
        return cache["blocks"][name]

    inputs = [source.path] + list(source.reader.source_files()) + ([vision.tower] if vision and vision.tower else [])
    extra = {"vision_tower_files": vision.provenance()} if vision and vision.tower else None
    with one_torch_thread(), atomic_output(Path(out), force, inputs) as tmp:
        manifest = write_workspace(tmp, lmc_json(cfg, torch_dtype, tp, quantization, vision, window), rank_specs, produce,
                                   source.tokenizer_files(), lambda: provenance(source, command, extra, hashes=hashes))
    bar.close()
    if window is not None:
        say(records.window_note(cfg, window))
    return manifest


def copy_verified_workspace(src: Path, out: Path, model_format: str | None, dtype: str, tp: int | None,
                            force: bool, say) -> dict:
    """`lmc convert` of a workspace: verify it and copy its files unchanged (same dtype and tp only)."""
    if model_format is not None:
        raise LmcError(f"{src} is an lmc workspace, not a {model_format} checkpoint; drop --model-format")
    ws = Workspace(src)
    resplit = tp not in (None, ws.tp) and ws.tp == 1
    if dtype not in ("auto", ws.meta["dtype"]) or (tp not in (None, ws.tp) and not resplit):
        raise LmcError(f"{src} is already a workspace ({ws.meta['dtype']}, tp {ws.tp}); re-casting or re-splitting a "
                       "split workspace is not supported: convert from the original checkpoint or a tp=1 workspace")
    problems = verify_workspace(src)
    if problems:
        raise WorkspaceError(f"{src} is a workspace that fails `lmc verify`: {problems[0]}")
    if resplit:
        from lmc.compiler.resplit import resplit_workspace

        return resplit_workspace(src, out, tp, force, f"lmc convert <workspace> -o <workspace> --tp {tp}", say)
    say(f"{src} is already an lmc workspace: copying it unchanged")
    with atomic_output(out, force, [src]) as tmp:
        return copy_workspace(src, tmp)


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not show, desc="convert", unit="B", unit_scale=True, unit_divisor=1024)
