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


def reference_search_clip(w, x, group_size):
    """The clip search as first written: each shrink step's error over the sampled tokens, one step at a time."""
    n, k = w.shape
    ng = -(-k // group_size)
    pad = ng * group_size - k
    xs = x[::max(1, x.shape[0] // awq.CLIP_TOKENS)][:awq.CLIP_TOKENS].float()
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
        xs = torch.cat([xs, xs.new_zeros(xs.shape[0], pad)], dim=1)
    xg = xs.reshape(xs.shape[0], ng, group_size)  # [t, ng, G]
    wb = w.float().reshape(-1, ng, group_size)  # [N, ng, G]
    org_max = wb.abs().amax(dim=-1, keepdim=True)
    org_out = torch.einsum("tgj,ogj->otg", xg, wb)
    best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(awq.CLIP_MAX_SHRINK * awq.CLIP_GRID)):
        max_val = org_max * (1 - i / awq.CLIP_GRID)
        q = fake_quantize_int4(torch.maximum(torch.minimum(wb, max_val), -max_val).reshape(-1, group_size), group_size)
        err = (torch.einsum("tgj,ogj->otg", xg, q.reshape(wb.shape)) - org_out).pow(2).mean(dim=1)[..., None]
        better = err < min_err
        min_err, best_max = torch.where(better, err, min_err), torch.where(better, max_val, best_max)
    return best_max.reshape(n, ng)


def reference_search_scale(x_mean, weights, block, group_size):
    """The scale search as first written: one candidate at a time."""
    reference = block(weights).float()
    losses = []
    for i in range(awq.GRID):
        s = x_mean.pow(i / awq.GRID).clamp(min=1e-4)
        s = (s / (s.max() * s.min()).sqrt()).to(weights[0].dtype)
        losses.append(float((block([fake_quantize_int4(w * s, group_size) / s for w in weights]).float() - reference).pow(2).mean()))
    best = min(range(awq.GRID), key=losses.__getitem__)
    return awq.ScaleResult(best / awq.GRID, awq.grid_scales(x_mean)[best].float().cpu(), losses[best], losses[0])


def test_gram_clip_search_picks_the_steps_of_the_token_by_token_error():
    torch.manual_seed(2)
    for n, k, g in [(96, 200, 64), (64, 128, 32), (40, 72, 32)]:
        w = torch.randn(n, k) * 0.02
        w[:, ::13] *= 6  # outlier columns: clipping matters for some groups, not for others
        x = torch.randn(900, k) * torch.linspace(0.2, 3, k)
        found = awq.search_clip(w, x, g, oc_batch=32)
        ref = reference_search_clip(w, x, g)
        assert torch.equal(found, ref), (n, k, g, int((found != ref).sum()))
        group_max = torch.stack([w[:, c:c + g].abs().amax(1) for c in range(0, k, g)], 1)  # [N, ng]
        assert (found < group_max).any() and (found == group_max).any()  # some groups clipped, some not


def test_quantize_chooses_as_the_one_candidate_at_a_time_search(checkpoint, tmp_path, monkeypatch):
    """The chosen scale ratios and clip values on a tiny model are those of the step-by-step search: same bytes
    (in float32: under bfloat16 autocast the batched and the one-at-a-time losses round differently)."""
    from lmc.compiler.quantize import QuantizeOptions, quantize

    ckpt = checkpoint("llama3", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    opts = QuantizeOptions(calib_samples=6, calib_seqlen=48, w_group_size=32, batch_size=4, search_samples=4,
                           device="cpu", workspace=True, calib_dtype="float32", method="awq")
    new = quantize(ckpt, tmp_path / "new", opts, say=lambda *_: None)
    monkeypatch.setattr(awq, "search_clip", lambda w, x, g, oc_batch=0: reference_search_clip(w, x, g))
    monkeypatch.setattr(awq, "search_scale", lambda m, ws, block, g, step=None, grid=None: reference_search_scale(m, ws, block, g))
    old = quantize(ckpt, tmp_path / "old", opts, say=lambda *_: None)
    assert [g["group"] for g in new["layers"][0]["groups"]][1] == "v->wo"  # MHA: all four groups searched
    assert [l["groups"] for l in new["layers"]] == [l["groups"] for l in old["layers"]]
    files = sorted(p.relative_to(tmp_path / "new") for p in (tmp_path / "new").rglob("*") if p.is_file())
    for f in files:
        if f.name != "provenance.json":
            assert (tmp_path / "new" / f).read_bytes() == (tmp_path / "old" / f).read_bytes(), f
