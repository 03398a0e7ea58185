"""`lmc convert WS -o OUT --tp N` of a tp = 1 workspace: the same tensors cut for N ranks, nothing recomputed.

An int4 workspace (made by `lmc quantize --workspace`, possibly with a partial last group that no HF
layout can hold) can so be split without the original checkpoint. The cuts are convert's
(format/archs.py: `rank_config`, `kv_heads_of_rank`), taken on the workspace layouts:

    float linear  weight [N, K]                col: rows of N     row: columns of K
    int4 linear   qweight [ceil(K/8), N]       col: columns of N  row: rows of K/8
                  scales, zeros [ceil(K/G), N] col: columns of N  row: rows of K/G
    w_qkv bias    [N]                          col: rows of N
    w_qkv's N is [q | k | v]: q cut in tp equal parts, k and v by the rank's KV heads (whole heads of
    head_dim rows, replicated when fewer than ranks); w13's N is [gate | up], each cut in tp parts.

A row cut of an int4 linear must fall on group boundaries (K / tp a multiple of G), as convert checks.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lmc.errors import LmcError
from lmc.format.archs import LAYER_KEYS, kv_heads_of_rank, linear_parts, tp_problem
from lmc.format.workspace import (DTYPE_NAMES, FORMAT_VERSION, TensorSpec, Workspace, atomic_output, confined,
                                  rank_name, workspace_tensors, write_workspace)

ROW_PARALLEL = ("wo", "w2")


def _layer_key(name: str) -> tuple[str | None, str]:
    """The runtime key of a layer tensor's linear (None for norms and global tensors) and its leaf."""
    if not name.startswith("layers."):
        return None, ""
    rest = name.split(".", 2)[2]
    base, leaf = rest.rsplit(".", 1)
    return LAYER_KEYS.get(base), leaf


def cut(ws: Workspace, name: str, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of workspace tensor `name` (a tp = 1 name)."""
    t = ws.get(name)
    key, leaf = _layer_key(name)
    if key is None:
        return t
    cfg, int4 = ws.config, leaf in ("qweight", "scales", "zeros")
    n_dim = 1 if int4 else 0  # the axis of output features
    if key in ROW_PARALLEL:
        k_dim = 0 if int4 else 1
        return t.chunk(tp, dim=k_dim)[rank].contiguous()
    parts = t.split(list(linear_parts(cfg, key)[0]), dim=n_dim)  # [q, k, v] or [gate, up]
    out = [p.chunk(tp, dim=n_dim)[rank] for p in parts]
    if key == "w_qkv":
        heads, d = kv_heads_of_rank(cfg, tp, rank), cfg.head_dim
        out[1:] = [p.narrow(n_dim, heads.start * d, len(heads) * d) for p in parts[1:]]
    return torch.cat(out, dim=n_dim).contiguous()


def tokenizer_files(ws: Workspace) -> dict[str, bytes]:
    """The workspace's tokenizer/ files as its manifest lists them (paths confined to the workspace)."""
    return {rel.split("/", 1)[1]: confined(ws.path, rel).read_bytes()
            for rel in ws.manifest["files"] if rel.startswith("tokenizer/")}


def resplit_workspace(src: Path, out: Path, tp: int, force: bool, command: str, say) -> dict:
    """Write the tp = 1 workspace at `src` as a workspace split for `tp` ranks at `out`."""
    ws = Workspace(src)
    if ws.tp != 1:
        raise LmcError(f"{src} is split for tp={ws.tp}; re-splitting starts from a tp=1 workspace or the checkpoint")
    if ws.vision:
        raise LmcError(f"--tp {tp}: {src} is a vision-language workspace; lmc runs those at tp=1")
    if (ws.quantization or {}).get("act_order"):
        raise LmcError(f"--tp {tp}: {src} holds act-order (desc_act) linears, whose input columns lmc reorders per "
                       "linear; such workspaces run at tp=1")
    problem = tp_problem(ws.config, tp, (ws.quantization or {}).get("group_size"))
    if problem:
        raise LmcError(problem)
    rank_specs = [[] for _ in range(tp)]  # the per-rank shapes the format implies; the writer checks each cut against them
    for rank, _, name, dt, shape in workspace_tensors(ws.config, ws.meta["dtype"], ws.quantization, tp):
        rank_specs[rank].append(TensorSpec(name, DTYPE_NAMES[dt], shape))
    names = {rank_name(n, r, tp, _layer_key(n)[0] is not None): n for r in range(tp) for n in ws.tensor_names()}
    meta = dict(ws.meta, tp=tp, format_version=FORMAT_VERSION)  # written by this lmc, whatever version src is
    prov = {**ws.manifest["provenance"], "command": command, "resplit_from": {"tp": 1, "path": str(src)}}
    say(f"{src} is a tp=1 workspace: cutting its tensors for tp={tp}")
    with atomic_output(out, force, [src]) as tmp:
        return write_workspace(tmp, meta, rank_specs, lambda rank, name: cut(ws, names[name], tp, rank),
                               tokenizer_files(ws), prov)
