"""Why int4 KV costs what it costs: per-layer relative error of K (after rotary) and V in the layouts the cache
has and some it does not, and (--ppl) the perplexity each layout gives.

    python bench/kv_quant_error.py WORKSPACE [--windows 2] [--dataset ptb] [--ppl] > out.json

Runs the model densely over the first windows of 512 tokens of the dataset's test split (default WikiText-2),
records every layer's K and V, and reports ||dequant(quant(x)) - x|| / ||x|| per layer for:
  k8, v8, v4           per token and head, one (scale, zero) per vector (policy 8's K and V, policy 4's V)
  k4                   the same at 4 bits (policy 4's K before 16-channel groups)
  k4_g32, k4_g16       per token and head in groups of 32 / 16 channels inside each half (k4_g16: policy 4's K)
  k4_per_channel_64    KIVI's layout for K: asymmetric per channel over groups of 64 tokens
  k4_smoothed          per-token codes after dividing each channel by its absmax over the text (a calibrated
                       per-channel scale that could be folded into q)
and k_outlier_ratio: the largest channel's absmax over the median channel's (worst head of the layer).
With --ppl it also scores those windows (dense, every K and V replaced by its round trip through one layout,
which is what the cache path reads) for each variant in VARIANTS, to tell K's share of the loss from V's.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from lmc.calib.text import load_text
from lmc.calib.windows import eval_windows
from lmc.format.workspace import Workspace
from lmc.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
from lmc.kernels.rotary import apply_rotary
from lmc.runtime.model import DenseCausal, Model
from lmc.runtime.tokenizer import Tokenizer

SEQLEN = 512


class RecordingCausal(DenseCausal):
    """Dense causal attention that keeps each layer's rotated K and V [T, Hkv, D]."""

    def __init__(self, batch: int, seqlen: int):
        super().__init__(batch, seqlen)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rotate_attend(self, layer: int, q, k, v, cos, sin, scale: float) -> torch.Tensor:
        q, k = apply_rotary(q, k, cos, sin)
        self.kv[layer] = (k.clone(), v.clone())
        return self.attend(layer, q, k, v.contiguous(), scale)


class RoundTripCausal(DenseCausal):
    """Dense causal attention over K and V passed through round-trip functions (None: exact)."""

    def __init__(self, batch: int, seqlen: int, k_fn, v_fn):
        super().__init__(batch, seqlen)
        self.k_fn, self.v_fn = k_fn, v_fn

    def rotate_attend(self, layer: int, q, k, v, cos, sin, scale: float) -> torch.Tensor:
        q, k = apply_rotary(q, k, cos, sin)
        k = self.k_fn(k) if self.k_fn else k
        v = self.v_fn(v.contiguous()) if self.v_fn else v.contiguous()
        return self.attend(layer, q, k, v, scale)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((y - x).norm() / x.norm())


def per_token(x: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """The cache's codec: per token and head, `group` channels per (scale, zero) inside each half (None: one
    pair per vector)."""
    codes, scales_zeros = quantize_kv_ref(x, bits, group)
    return dequantize_kv_ref(codes, scales_zeros, bits, group)


def rotary_pairs(x: torch.Tensor, bits: int, pairs: int) -> torch.Tensor:
    """Per token and head in groups of `pairs` rotary pairs: channels [i p, (i + 1) p) and the same + D/2 (the
    two channels rotary turns together share a pair's frequency)."""
    *lead, D = x.shape
    y = x.reshape(*lead, 2, D // 2 // pairs, pairs).transpose(-3, -2)  # [..., D / 2p, 2, p]
    y = per_token(y.reshape(*lead, D // 2 // pairs, 2 * pairs), bits).reshape(*lead, D // 2 // pairs, 2, pairs)
    return y.transpose(-3, -2).reshape(x.shape)


def per_channel(x: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """Asymmetric per channel and head over `group` consecutive tokens (T a multiple of group)."""
    g = x.reshape(-1, group, *x.shape[1:])  # [G, group, Hkv, D]
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    return (((g - lo) / s).round().clamp(0, 2**bits - 1) * s + lo).reshape(x.shape)


def hadamard(d: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [d, d] (d a power of two): symmetric, H @ H = I."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def rotated(x: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """The codec on x @ H (a Hadamard rotation of each head vector, spreading outlier channels over all), rotated
    back: q . k = (q H) . (k H), so a cache could keep the rotated codes and rotate q instead."""
    h = hadamard(x.shape[-1]).to(x.dtype)
    return per_token(x @ h, bits, group) @ h


def smoothed(x: torch.Tensor, bits: int) -> torch.Tensor:
    c = x.abs().amax(0).clamp(min=1e-6)  # [Hkv, D]
    return per_token(x / c, bits) * c


VARIANTS = {  # name: (K round trip, V round trip); v4 / v8: per vector
    "float": (None, None),
    "k8v8 (policy 8)": (lambda x: per_token(x, 8), lambda x: per_token(x, 8)),
    "k4v4, K per vector (policy 4 before)": (lambda x: per_token(x, 4), lambda x: per_token(x, 4)),
    "k4v8": (lambda x: per_token(x, 4), lambda x: per_token(x, 8)),
    "k8v4": (lambda x: per_token(x, 8), lambda x: per_token(x, 4)),
    "k4 groups of 32 channels, v4": (lambda x: per_token(x, 4, 32), lambda x: per_token(x, 4)),
    "k4 groups of 16 channels, v4 (policy 4)": (lambda x: per_token(x, 4, 16), lambda x: per_token(x, 4)),
    "k4 groups of 8 channels, v4": (lambda x: per_token(x, 4, 8), lambda x: per_token(x, 4)),
    "k4 groups of 16, v4 groups of 32": (lambda x: per_token(x, 4, 16), lambda x: per_token(x, 4, 32)),
    "k4 groups of 16 rotary pairs (32 channels), v4": (lambda x: rotary_pairs(x, 4, 16), lambda x: per_token(x, 4)),
    "k4 groups of 8 rotary pairs (16 channels), v4": (lambda x: rotary_pairs(x, 4, 8), lambda x: per_token(x, 4)),
    "k4 per channel (64 tokens), v4": (lambda x: per_channel(x, 4), lambda x: per_token(x, 4)),
    "k4 smoothed, v4": (lambda x: smoothed(x, 4), lambda x: per_token(x, 4)),
    "k4 Hadamard-rotated per vector, v4": (lambda x: rotated(x, 4), lambda x: per_token(x, 4)),
    "k4 Hadamard-rotated per vector, v4 rotated": (lambda x: rotated(x, 4), lambda x: rotated(x, 4)),
    "k4 Hadamard-rotated groups of 32, v4": (lambda x: rotated(x, 4, 32), lambda x: per_token(x, 4)),
}


def ppl(model: Model, windows: torch.Tensor, k_fn, v_fn) -> float:
    n, s = windows.shape
    with torch.inference_mode():
        h = model.hidden(windows.reshape(-1), torch.arange(s).repeat(n), RoundTripCausal(n, s, k_fn, v_fn), s - 1)
        logits = model.logits(h.view(n, s, -1)[:, :-1].reshape(n * (s - 1), -1))  # [n*(S-1), V]
        return math.exp(float(F.cross_entropy(logits, windows[:, 1:].reshape(-1))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--dataset", default="wikitext2", help="wikitext2 or ptb (the bundled test splits)")
    ap.add_argument("--ppl", action="store_true", help="also score the windows under each of VARIANTS")
    args = ap.parse_args()
    ws = Workspace(args.workspace)
    ids = Tokenizer(ws.tokenizer_dir).encode(load_text(args.dataset, "test", purpose="eval", flag="--dataset").text)
    windows = torch.from_numpy(eval_windows(ids, SEQLEN, args.windows))  # [n, 512]
    model = Model(ws, torch.device("cpu"), torch.float32)
    ctx = RecordingCausal(windows.shape[0], SEQLEN)
    with torch.inference_mode():
        model.hidden(windows.reshape(-1), torch.arange(SEQLEN).repeat(windows.shape[0]), ctx, SEQLEN - 1)
    layers = []
    for layer, (k, v) in sorted(ctx.kv.items()):
        amax = k.abs().amax(0)  # [Hkv, D]
        layers.append({"layer": layer, "k8": rel(k, per_token(k, 8)), "k4": rel(k, per_token(k, 4)),
                       "k4_g32": rel(k, per_token(k, 4, 32)), "k4_g16": rel(k, per_token(k, 4, 16)),
                       "v8": rel(v, per_token(v, 8)), "v4": rel(v, per_token(v, 4)),
                       "k4_per_channel_64": rel(k, per_channel(k, 4)), "k4_smoothed": rel(k, smoothed(k, 4)),
                       "k4_hadamard": rel(k, rotated(k, 4)), "v4_hadamard": rel(v, rotated(v, 4)),
                       "k_outlier_ratio": float((amax.amax(-1) / amax.median(-1).values).max())})
    mean = {key: sum(r[key] for r in layers) / len(layers) for key in layers[0] if key != "layer"}
    out = {"workspace": args.workspace, "dataset": args.dataset, "windows": windows.shape[0], "seqlen": SEQLEN,
           "mean_over_layers": mean}
    if args.ppl:  # per_channel needs T a multiple of 64: 512-token windows are
        out["ppl"] = {name: ppl(model, windows, *fns) for name, fns in VARIANTS.items()}
    print(json.dumps({**out, "layers": layers}, indent=1))


if __name__ == "__main__":
    main()
