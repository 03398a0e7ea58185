"""AutoRound-style tuning of rounding and clipping per decoder layer (Cheng et al. 2023, arXiv 2309.05516):
`--method awq-autoround`.

After AWQ's scales are folded, every int4 linear of the layer gets learned parameters: a rounding offset
V [N, K] in [-0.5, 0.5] added before rounding, and per (row, group) factors in [0, 1] on the group's min
and max (the clipping). They are tuned by signed gradient descent (SignSGD, step lr * (1 - t/iters),
lr = 1/iters) on the MSE between the layer's output with the fake-quantized weights and the float
layer's output, rounding passed straight through; each step draws a batch of calibration windows from a
seeded generator. The parameters of the step with the least loss are kept. With V = 0 and both factors 1
the quantizer is `pack.quantize_int4` (min-max, the range widened to include 0).

The layer's quantized input can be the previous quantized layers' output (AutoRound's default), so a
layer's tuning corrects the error that reaches it; the target stays the float layer's output of the
float input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

ITERS = 36  # SignSGD steps per layer
BATCH = 4  # calibration windows per step
SCALE_GRID = 10  # AWQ scale ratios searched before the tuning (awq.GRID = 20 for awq): the tuning refines the rest
FACTOR_MIN = 0.0  # the min/max factors' lower bound (AutoRound's)


@dataclass
class Rounding:
    """The tuned parameters of one linear [N, K] in groups of G: offset [N, K], min and max factors [N, ng]."""

    offset: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def identity(cls, w: torch.Tensor, group_size: int) -> "Rounding":
        n, k = w.shape
        ng = -(-k // group_size)
        return cls(torch.zeros(n, k), torch.ones(n, ng), torch.ones(n, ng))

    def tensors(self) -> list[torch.Tensor]:
        return [self.offset, self.low, self.high]

    def clone(self) -> "Rounding":
        return Rounding(*(t.detach().clone() for t in self.tensors()))


def _groups(t: torch.Tensor, group_size: int, fill_last: bool) -> torch.Tensor:
    """t [N, K] -> [N, ng, G], the last partial group padded by its last column (fill_last) or zeros."""
    n, k = t.shape
    pad = -(-k // group_size) * group_size - k
    if pad:
        tail = t[:, -1:].expand(n, pad) if fill_last else t.new_zeros(n, pad)
        t = torch.cat([t, tail], dim=1)
    return t.reshape(n, -1, group_size)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


@dataclass
class Grouped:
    """A weight [N, K] in groups, with what the tuning never changes: wg [N, ng, G] (the last group padded by its
    last column), the groups' max (>= 0) and min (<= 0) [N, ng]."""

    wg: torch.Tensor
    top: torch.Tensor
    bottom: torch.Tensor

    @classmethod
    def of(cls, w: torch.Tensor, group_size: int) -> "Grouped":
        wg = _groups(w, group_size, fill_last=True)  # [N, ng, G]
        return cls(wg, wg.amax(dim=2).clamp(min=0), wg.amin(dim=2).clamp(max=0))


def quantize(w: torch.Tensor, r: Rounding, group_size: int, scale_dtype: torch.dtype | None = None,
             grouped: Grouped | None = None):
    """w [N, K] float32 with its Rounding -> (codes float [N, ng, G], scales [N, ng], zeros [N, ng]),
    differentiable in r (straight-through rounding). scale_dtype: scales rounded to the stored dtype
    (no gradient through that rounding) before the codes are computed. grouped: Grouped.of(w), when the
    caller keeps it across steps."""
    g = grouped if grouped is not None else Grouped.of(w, group_size)
    wg = g.wg  # [N, ng, G]
    w_max = g.top * r.high  # [N, ng]
    w_min = g.bottom * r.low  # [N, ng]
    scales = (w_max - w_min).clamp(min=1e-5) / 15  # [N, ng]
    if scale_dtype is not None:
        scales = scales + (scales.to(scale_dtype).float() - scales).detach()
    zeros = _round_ste(-w_min / scales).clamp(0, 15)  # [N, ng]
    v = _groups(r.offset, group_size, fill_last=False)  # [N, ng, G]
    codes = (_round_ste(wg / scales[:, :, None] + v) + zeros[:, :, None]).clamp(0, 15)  # [N, ng, G]
    return codes, scales, zeros


def fake_quantize(w: torch.Tensor, r: Rounding, group_size: int, scale_dtype: torch.dtype | None = None,
                  grouped: Grouped | None = None) -> torch.Tensor:
    """The dequantized weights [N, K] float32, differentiable in r."""
    codes, scales, zeros = quantize(w, r, group_size, scale_dtype, grouped)
    n, k = w.shape
    return ((codes - zeros[:, :, None]) * scales[:, :, None]).reshape(n, -1)[:, :k]


def final_codes(w: torch.Tensor, r: Rounding, group_size: int, scale_dtype: torch.dtype):
    """(codes uint8 [N, K], scales f32 [N, ng], zeros f32 [N, ng]) as packed: the scales rounded to scale_dtype."""
    with torch.no_grad():
        codes, scales, zeros = quantize(w.float(), r, group_size, scale_dtype)
    n, k = w.shape
    return codes.reshape(n, -1)[:, :k].to(torch.uint8).contiguous(), scales, zeros


def tune(forward: Callable[[dict, torch.Tensor], torch.Tensor], weights: dict[str, torch.Tensor], x: torch.Tensor,
         target: torch.Tensor, group_size: int, scale_dtype: torch.dtype, iters: int = ITERS, batch: int = BATCH,
         seed: int = 0, step: Callable[[], None] | None = None) -> tuple[dict[str, Rounding], dict]:
    """Tune the Rounding of each weight {key: W [N, K]} so that forward(fake-quantized weights, x[idx])
    matches target[idx] (x, target [n, S, H]). Returns the best step's Roundings and a log (loss of the
    identity rounding on the first batch, the best loss, its step). `step()` after each step."""
    ws = {key: w.detach().float() for key, w in weights.items()}
    grouped = {key: Grouped.of(w, group_size) for key, w in ws.items()}
    params = {key: Rounding.identity(w, group_size) for key, w in ws.items()}
    for r in params.values():
        for t in r.tensors():
            t.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    best, best_loss, best_step, first = None, math.inf, -1, None
    lr = 1.0 / max(iters, 1)
    with torch.enable_grad():
        for t in range(iters + 1):  # the last pass only measures the final parameters
            idx = torch.randperm(x.shape[0], generator=gen)[:batch]  # [b]
            out = forward({key: fake_quantize(ws[key], params[key], group_size, scale_dtype, grouped[key]) for key in ws},
                          x[idx])
            loss = (out.float() - target[idx].float()).pow(2).mean()
            value = float(loss.detach())
            first = value if first is None else first
            if value < best_loss:
                best, best_loss, best_step = {key: r.clone() for key, r in params.items()}, value, t
            if t == iters:
                break
            loss.backward()
            with torch.no_grad():
                rate = lr * (1 - t / iters)
                for r in params.values():
                    for p in r.tensors():
                        p -= rate * torch.sign(p.grad)
                        p.grad = None
                    r.offset.clamp_(-0.5, 0.5)
                    r.low.clamp_(FACTOR_MIN, 1)
                    r.high.clamp_(FACTOR_MIN, 1)
            if step is not None:
                step()
    return best, {"loss_identity": first, "loss": best_loss, "best_step": best_step}
