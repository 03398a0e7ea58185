"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) error feedback after the AWQ scaling: `--method awq-gptq`.

Columns are quantized in order (no act-order), each one's rounding error spread over the columns
not yet quantized through the inverse Hessian H = X^T X / T of the linear's calibration inputs.
Group scales and zero points are fixed when the quantizer reaches a group's first column, from
the group's weights as updated so far (min-max, the range widened to include 0, as
`pack.quantize_int4`), and optionally clamped first to a fraction of the group's |w| max (the
AWQ clip search's shrink, applied to the updated weights). The result is the int4 codes, scales
and zeros themselves: re-quantizing the dequantized weights by min-max would not give them back.
"""
from __future__ import annotations


import torch

from lmc.compiler.pack import quantize_int4
from lmc.format.int4 import to_lmc_tensors
from lmc.runtime.device import one_torch_thread

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's percdamp)
BLOCK = 32  # columns per lazy batch update: divides every group size lmc accepts (32, 64, 128), so a group
# starts a block and its columns hold every earlier update; small enough to keep the per-column ops single-threaded


class HessianSum:
    """Running X^T X [K, K] (float64) and token count over calibration batches of one linear's input."""

    def __init__(self):
        self.xtx: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
        xtx = (x.t() @ x).double()  # [K, K], summed over batches in float64
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.tokens += x.shape[0]

    def mean(self, s: torch.Tensor | None = None) -> torch.Tensor:
        """X^T X / T as float64 [K, K]; with s [K], that of the scaled input X / s."""
        h = self.xtx / self.tokens
        if s is not None:
            inv = 1 / s.to(device=h.device, dtype=torch.float64)  # [K]
            h = h * inv[:, None] * inv[None, :]
        return h


def inverse_cholesky(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped H [K, K] -> (upper Cholesky factor of H^-1 [K, K] float64, mask of dead input channels [K])."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0  # [K] channels never active: weight irrelevant
    h[dead, dead] = 1
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (DAMP * torch.diagonal(h).mean())
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))  # [K, K]
    return torch.linalg.cholesky(hinv, upper=True), dead


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, scale_dtype: torch.dtype,
                  shrink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K], h = X^T X / T [K, K] -> (codes uint8 [N, K], scales f32 [N, ng], zeros f32 [N, ng]).

    Scales are rounded to `scale_dtype` (the dtype they are stored in) before any column is rounded,
    so the error fed back is the stored weights' error. `shrink` [N, ng] (<= 1): each group's
    range is clamped to shrink * max|w| of its updated weights before its min-max parameters."""
    n, k = w.shape
    ng = -(-k // group_size)
    u, dead = inverse_cholesky(h)
    u = u.float()  # [K, K]
    wq = w.float().clone()  # [N, K], updated in place as columns are quantized
    wq[:, dead] = 0
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, ng, dtype=torch.float32, device=w.device)
    zeros = torch.empty(n, ng, dtype=torch.float32, device=w.device)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = wq[:, b0:b1].clone()  # [N, B]
        err = torch.empty_like(wb)  # [N, B]
        ub = u[b0:b1, b0:b1]  # [B, B]
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:
                gi = col // group_size
                group = wq[:, col:col + group_size].clone()  # [N, G] (or the last partial group), fully updated
                if shrink is not None:
                    m = group.abs().amax(dim=1, keepdim=True) * shrink[:, gi:gi + 1]  # [N, 1]
                    group = torch.maximum(torch.minimum(group, m), -m)
                _, s, z = quantize_int4(group, group.shape[1])  # [N, 1] x2
                s = s.to(scale_dtype).float()
                scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
                s, z = s[:, 0], z[:, 0]  # [N]
            q = (torch.round(wb[:, j] / s) + z).clamp(0, 15)  # [N]
            codes[:, col] = q.to(torch.uint8)
            e = (wb[:, j] - (q - z) * s) / ub[j, j]  # [N]
            wb[:, j:] -= e[:, None] * ub[j, j:][None, :]  # [N, B - j]
            err[:, j] = e
        wq[:, b1:] -= err @ u[b0:b1, b1:]  # [N, K - b1]
    return codes, scales, zeros


def quantize_linears(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], group_size: int,
                     dtype: torch.dtype, step=None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A layer's linears {key: W [N, K]} with their inputs' X^T X / T -> {key: (qweight, scales, zeros)}
    in lmc's layout (scales and zeros in `dtype`), on the CPU; `step()` after each linear."""
    packed = {}
    with one_torch_thread():
        for key, w in weights.items():
            codes, scales, zeros = gptq_quantize(w, hessians[key], group_size, dtype)
            packed[key] = tuple(t.cpu() for t in to_lmc_tensors(codes, scales, zeros, dtype))
            if step is not None:
                step()
    return packed
