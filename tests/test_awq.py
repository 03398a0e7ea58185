"""AWQ search pieces against brute-force references."""
from __future__ import annotations

import torch

from lmc.compiler import awq
from lmc.compiler.pack import fake_quantize_int4


def test_clip_search_equals_brute_force_per_group():
    torch.manual_seed(0)
    w, x = torch.randn(300, 200), torch.randn(700, 200)  # K=200, G=64: last group partial (192..199)
    found = awq.search_clip(w, x, 64, oc_batch=128)
    xs = x[:512]
    for row, group in [(7, 3), (0, 0), (299, 1), (130, 2)]:
        cols = slice(group * 64, min(200, group * 64 + 64))
        best = None
        for i in range(10):
            m = w[row, cols].abs().max() * (1 - i / 20)
            q = fake_quantize_int4(w[row, cols].clamp(-m, m)[None], 64)[0]
            err = ((xs[:, cols] @ q - xs[:, cols] @ w[row, cols]) ** 2).mean()
            if best is None or err < best[0]:
                best = (err, m)
        assert torch.isclose(found[row, group], best[1]), (row, group)
    clipped = awq.apply_clip(w, found, 64)
    assert torch.all(clipped.abs() <= found.repeat_interleave(64, dim=1)[:, :200] + 1e-7)


def test_scale_search_matches_grid_and_never_loses_to_rtn():
    torch.manual_seed(1)
    x = torch.randn(256, 96) * torch.linspace(0.1, 8, 96)  # a few loud channels, as in LLM activations
    w = torch.randn(40, 96)
    block = lambda ws: x @ ws[0].t()  # noqa: E731
    result = awq.search_scale(awq.channel_mean_abs(x), [w], block, 32)
    ref = x @ w.t()
    losses = []
    for i in range(awq.GRID):
        s = awq.channel_mean_abs(x).pow(i / awq.GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        losses.append(float(((x @ (fake_quantize_int4(w * s, 32) / s).t()) - ref).pow(2).mean()))
    assert result.ratio == min(range(awq.GRID), key=losses.__getitem__) / awq.GRID
    assert result.loss == min(losses) and result.loss_identity == losses[0]
    assert result.loss < result.loss_identity  # loud channels: scaling helps


def test_smoothing_formula():
    act = torch.tensor([4.0, 1.0, 0.25])
    w = torch.tensor([[1.0, -4.0, 0.5], [2.0, 1.0, -1.0]])
    s = awq.smooth_scale(act, [w], alpha=0.5)
    assert torch.allclose(s, act.sqrt() / torch.tensor([2.0, 4.0, 1.0]).sqrt())
