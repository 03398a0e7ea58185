"""AWQ (Lin et al. 2023, arXiv 2306.00978): per-channel scale search and clipping search.

Search results are returned as data (scales, ratios, losses, clip ranges) and applied by the
caller, as llm-awq's auto_scale / auto_clip do. Everything here works on plain tensors and
callables, so the caller decides which block of the model is inspected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmc.compiler.pack import fake_quantize_int4

GRID = 20  # ratios r = 0, 1/20, ..., 19/20
CLIP_MAX_SHRINK = 0.5
CLIP_GRID = 20
CLIP_TOKENS = 512  # tokens sampled for the clip search (llm-awq's n_sample_token)


@dataclass
class ScaleResult:
    ratio: float
    scales: torch.Tensor  # [K] float32, multiply the consumers' input columns, divide the producer
    loss: float  # MSE of the inspected block output at the chosen ratio
    loss_identity: float  # MSE at r = 0 (plain round-to-nearest of the same block)


def channel_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> mean |x| per input channel [K] float32."""
    flat = x.reshape(-1, x.shape[-1])  # [T, K]
    return flat.abs().sum(0, dtype=torch.float32) / max(flat.shape[0], 1)  # no float32 copy of a bf16 x


def channel_abs_max(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> max |x| per input channel [K] float32."""
    return x.reshape(-1, x.shape[-1]).abs().amax(0).float()  # exact in any dtype


def grid_scales(x_mean: torch.Tensor, grid: int = GRID) -> list[torch.Tensor]:
    """The candidate scales s = x_mean^r, r = 0, 1/grid, ..., each normalised to a geometric mean of extremes 1:
    grid x [K]."""
    scales = []
    for i in range(grid):
        s = x_mean.pow(i / grid).clamp(min=1e-4)  # [K]
        scales.append(s / (s.max() * s.min()).sqrt())
    return scales


def search_scale(x_mean: torch.Tensor, weights: list[torch.Tensor], block: Callable[[list[torch.Tensor]], torch.Tensor],
                 group_size: int, chunk: int = 4, step: Callable[[], None] | None = None,
                 grid: int = GRID) -> ScaleResult:
    """Pick s = x_mean^r (r = 0, 1/grid, ...) minimising MSE(block(Q(W*s)/s), block(W)).

    weights: the consumer linears [N_i, K] sharing the input; block(ws) runs the inspected block
    with those weights substituted and returns its output. `chunk` candidates are fake-quantized
    in one call; `step()` is called after each candidate's block."""
    reference = block(weights).float()
    scales = grid_scales(x_mean, grid)
    losses = []
    for c0 in range(0, grid, chunk):
        s_w = torch.stack(scales[c0:c0 + chunk]).to(weights[0].dtype)[:, None, :]  # [c, 1, K]
        trials = []
        for w in weights:
            ws = w * s_w  # [c, N, K]
            trials.append(fake_quantize_int4(ws.reshape(-1, w.shape[1]), group_size).reshape(ws.shape) / s_w)
        for j in range(s_w.shape[0]):
            losses.append(float((block([t[j] for t in trials]).float() - reference).pow_(2).mean()))
            if step is not None:
                step()
    best = min(range(grid), key=losses.__getitem__)  # the first of equal minima
    return ScaleResult(best / grid, scales[best].float().cpu(), losses[best], losses[0])


def smooth_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """LMDeploy's fixed smoothing (`--no-search-scale`): s = act_max^a / w_max^(1-a) per channel."""
    w_max = torch.cat([w.abs().float() for w in weights]).amax(0)  # [K]
    return (act_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-4)


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, oc_batch: int = 1024) -> torch.Tensor:
    """Per (output row, group) clip value minimising the MSE of the group's partial dot products.

    w [N, K], x [T, K] (the linear's input) -> max_val [N, ceil(K/G)] float32: clamp w to
    [-max_val, max_val] before quantizing. The error of a group over the sampled tokens,
    mean_t (x_g . (q - w))^2, is computed as d C d^T with d = q - w and C = X_g^T X_g / t the
    group's Gram matrix (once per linear): G x G per group instead of t x G. Every shrink step
    of a row batch is quantized in one call; the first step with the least error wins."""
    n, k = w.shape
    ng = -(-k // group_size)
    pad = ng * group_size - k
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xs = x[::step][:CLIP_TOKENS].float()  # [t, K]
    if pad:  # repeat the last column in w (keeps each group's min/max), zeros in x (no contribution)
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
        xs = torch.cat([xs, xs.new_zeros(xs.shape[0], pad)], dim=1)
    xg = xs.reshape(xs.shape[0], ng, group_size).transpose(0, 1)  # [ng, t, G]
    gram = xg.transpose(1, 2) @ xg / xs.shape[0]  # [ng, G, G]
    shrink = torch.tensor([1 - i / CLIP_GRID for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID))])  # [c]
    best_all = []
    for start in range(0, n, oc_batch):
        wb = w[start:start + oc_batch].float().reshape(-1, ng, group_size)  # [ob, ng, G]
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # [ob, ng, 1]
        max_val = torch.stack([org_max * float(r) for r in shrink])  # [c, ob, ng, 1]
        clipped = torch.maximum(torch.minimum(wb, max_val), -max_val)  # [c, ob, ng, G]
        q = fake_quantize_int4(clipped.reshape(-1, group_size), group_size).reshape(clipped.shape)
        d = (q - wb).permute(2, 0, 1, 3).reshape(ng, -1, group_size)  # [ng, c*ob, G]
        err = ((d @ gram) * d).sum(-1).reshape(ng, len(shrink), -1)  # [ng, c, ob]
        best = err.argmin(dim=1).t()  # [ob, ng], the first of equal minima
        best_all.append(max_val.squeeze(-1).gather(0, best[None]).squeeze(0))  # [ob, ng]
    return torch.cat(best_all)  # [N, ng]


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp each (row, group) of w [N, K] to [-max_val, max_val]."""
    k = w.shape[1]
    m = max_val.to(w.dtype).repeat_interleave(group_size, dim=1)[:, :k]  # [N, K]
    return torch.maximum(torch.minimum(w, m), -m)
