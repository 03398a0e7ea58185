"""`lmc quantize`: calibrate layer by layer with the runtime's own layer code, AWQ, int4 pack, write.

Per decoder layer (one on the device at a time): run the layer on all calibration windows,
keeping the inputs of its linears for a search subset; search scales (AWQ) or smooth
(`--no-search-scale`), fold them into producer and consumers, search clipping, quantize,
pack; the fp output of the layer is the next layer's input.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lmc.compiler import autoround, awq, gptq
from lmc.format.archs import (INT4_LEAVES, LAYER_KEYS, LINEAR_KEYS, arch_spec, check_within_window, linear_parts,
                              model_config_from_hf)
from lmc.compiler.convert import Builder, lmc_json, plan, provenance, resolve_dtype
from lmc.compiler.records import session_window, window_note
from lmc.compiler.memory import clip_rows, peak_rss, predict, release_free_heap, source_read
from lmc.compiler.pack import (INDEX_LEAVES, INT32_LEAVES, awq_compatible, checkpoint_int4_shapes, dequantize_int4,
                               pack_awq, pack_compressed, quantize_int4)
from lmc.format.int4 import LAYOUT, check_group_size, from_lmc_tensors, to_lmc_tensors
from lmc.compiler.llava import PROCESSOR_FILES, hf_entries, split_vision, vision_specs
from lmc.format.vision import is_llava
from lmc.calib.text import check_text_source
from lmc.compiler.readers import Source, open_source
from lmc.kernels.rmsnorm import rms_norm
from lmc.errors import LmcError
from lmc.format.config import ModelConfig
from lmc.runtime.device import pick_device
from lmc.runtime.model import (DenseCausal, attention_block, attention_core, linear,
                               mlp_block, mlp_hidden)
from lmc.runtime.rope import Rope
from lmc.format.workspace import TensorSpec, atomic_output, check_output, dump_json, write_safetensors, write_workspace


@dataclass
class QuantizeOptions:
    w_bits: int = 4
    w_group_size: int = 128
    calib_dataset: str = "ptb"
    calib_samples: int = 128
    calib_seqlen: int = 1024
    batch_size: int = 4
    search_scale: bool = True
    search_samples: int | None = None  # windows for the scale/clip losses (statistics use all); None: 32 on GPU, 8 on CPU
    device: str | None = None
    seed: int = 0
    workspace: bool = False
    format: str = "awq"  # the HF checkpoint written without --workspace: one of HF_FORMATS
    dtype: str = "auto"
    allow_nonfinite: bool = False  # keep NaN/Inf source weights (with a warning) instead of refusing
    method: str = "auto"  # one of METHODS
    calib_dtype: str = "auto"  # what calibration computes in: one of CALIB_DTYPES (auto: resolve_options)

    @property
    def mode(self) -> str:
        """What was done, as lmc.json and the provenance record it: rtn, smooth or the --method."""
        if self.calib_samples == 0:
            return "rtn"
        return self.method if self.search_scale else "smooth"


METHODS = {  # --method -> what it does
    "auto": "awq-autoround on the CPU, awq on a GPU or without calibration / the scale search",
    "awq": "AWQ scale and clip search, min-max rounding",
    "awq-gptq": "AWQ scale search, then GPTQ error feedback (compiler/gptq.py)",
    "awq-autoround": "AWQ scale search, then rounding and clipping tuned per layer (compiler/autoround.py)",
}


# --calib-dtype. stored: weights and activations in the output's float dtype (the GPU's default); float32: in
# float32; bfloat16: float32 weights and activations, the matmuls and attention under bfloat16 autocast (the
# default on CPUs with bf16 instructions). The weights are quantized from their float32 or stored values either way.
CALIB_DTYPES = ("auto", "stored", "float32", "bfloat16")


# ----------------------------------------------------------------------------- calibration data


IDS_CACHE_ENTRIES = 2  # calibration_ids kept per process, each at most IDS_CACHE_BYTES
IDS_CACHE_BYTES = 64 << 20
_ids_cache: dict[tuple[str, str], np.ndarray] = {}  # (tokenizer files' digest, text sha256) -> int64 [T], read-only


def calibration_ids(source, opts: QuantizeOptions) -> tuple[np.ndarray, dict]:
    """The calibration text tokenized once as a whole (int64 [T]) and its provenance. Kept per process for the same
    tokenizer files and text (a Python session quantizing one model at several group sizes tokenizes PTB once:
    seconds each time, 8 s for a small-vocabulary tokenizer's 4.3M tokens)."""
    import hashlib

    from lmc.calib.text import load_text
    from lmc.runtime.tokenizer import Tokenizer

    files = source.tokenizer_files()
    text = load_text(opts.calib_dataset, "train", purpose="calib")
    digest = hashlib.sha256(b"".join(hashlib.sha256(name.encode() + b"\0" + data).digest()
                                     for name, data in sorted(files.items()))).hexdigest()
    info = {"dataset": opts.calib_dataset, "source": text.source, "text_sha256": text.sha256}
    key = (digest, text.sha256)
    if key in _ids_cache:
        return _ids_cache[key], info
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        tokenizer = Tokenizer(Path(d))
    ids = np.asarray(tokenizer.encode(text.text), dtype=np.int64)  # [T]
    ids.flags.writeable = False  # shared with later calls through the cache
    if ids.nbytes <= IDS_CACHE_BYTES:
        while len(_ids_cache) >= IDS_CACHE_ENTRIES:
            _ids_cache.pop(next(iter(_ids_cache)))
        _ids_cache[key] = ids
    return ids, info


def calibration_windows(ids: np.ndarray, info: dict, opts: QuantizeOptions) -> tuple[torch.Tensor, dict]:
    """[n, S] token windows drawn LMDeploy's way, and their provenance."""
    from lmc.calib.windows import sample_windows, windows_sha256

    windows = sample_windows(ids, opts.calib_samples, opts.calib_seqlen, opts.seed)  # [n, S]
    info = {**info, "samples": opts.calib_samples, "seqlen": opts.calib_seqlen, "seed": opts.seed,
            "windows_sha256": windows_sha256(windows)}
    return torch.from_numpy(windows), info


# ----------------------------------------------------------------------------- one layer


def load_source_layer(builder: Builder, i: int, device, dtype) -> dict:
    """Layer i's float weights from the source, fused as in a workspace, keyed as runtime.model does."""
    lw = {}
    prefix = f"layers.{i}."
    for target in builder.targets:
        if not target.name.startswith(prefix):
            continue
        for name, t in builder.build(target, 0).items():
            key = target.key + "_bias" if name.endswith(".bias") and target.linear else target.key
            lw[key] = t.to(device=device, dtype=dtype)
    return lw


class LayerCalibrator:
    """Runs one layer over calibration windows and searches/apply AWQ for it."""

    def __init__(self, cfg: ModelConfig, opts: QuantizeOptions, rope: Rope, device, layer: int):
        self.cfg, self.opts, self.layer = cfg, opts, layer
        self.clip_rows = clip_rows(device)
        self.device_type = torch.device(device).type
        s = opts.calib_seqlen
        self.cos, self.sin = rope(torch.arange(s, device=device), s - 1)  # [S, D/2]

    def _rope(self, b: int):
        return self.cos.repeat(b, 1), self.sin.repeat(b, 1)  # [b*S, D/2]

    def autocast(self):
        """The context the layer's forwards and the search losses run in: bfloat16 autocast under --calib-dtype
        bfloat16 (the matmuls and attention only: weights are loaded, quantized and GPTQ's Hessians summed
        outside it)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.opts.calib_dtype == "bfloat16")

    def forward(self, lw: dict, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, dict]:
        """x [b, S, H] -> layer output [b, S, H]; with keep, the inputs of every linear."""
        with self.autocast():
            return self._forward(lw, x, keep)

    def _forward(self, lw: dict, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, dict]:
        cfg, (b, s, h) = self.cfg, x.shape
        cos, sin = self._rope(b)
        ctx = DenseCausal(b, s)
        flat = x.reshape(b * s, h)  # [T, H]
        h1 = rms_norm(flat, lw["attention_norm"], cfg.rms_norm_eps)[0]  # [T, H]
        o = attention_core(cfg, lw, h1, cos, sin, ctx, self.layer)  # [T, Hq*D]
        mid = flat + linear(o, lw["wo"])
        h2 = rms_norm(mid, lw["ffn_norm"], cfg.rms_norm_eps)[0]
        m = mlp_hidden(lw, h2)  # [T, I]
        out = (mid + linear(m, lw["w2"])).reshape(b, s, h)
        return out, ({"h1": h1, "o": o, "h2": h2, "m": m} if keep else {})

    def attention_loss_block(self, lw: dict, h1: torch.Tensor):
        b = h1.shape[0] // self.opts.calib_seqlen
        cos, sin = self._rope(b)
        ctx = DenseCausal(b, self.opts.calib_seqlen)
        return lambda ws: attention_block(self.cfg, {**lw, "w_qkv": ws[0]}, h1, cos, sin, ctx, self.layer)


def _fold(lw: dict, key: str, s: torch.Tensor, rows: slice | None = None) -> None:
    """Divide a producer by s: a norm weight [K], or rows of a linear (and its bias)."""
    s = s.to(device=lw[key].device, dtype=lw[key].dtype)
    if rows is None:
        lw[key] = lw[key] / s
        return
    w = lw[key].clone()
    w[rows] = w[rows] / s[:, None]
    lw[key] = w
    if key == "w_qkv" and "w_qkv_bias" in lw:
        bias = lw["w_qkv_bias"].clone()
        bias[rows] = bias[rows] / s
        lw["w_qkv_bias"] = bias


def _scale_columns(lw: dict, key: str, s: torch.Tensor) -> None:
    lw[key] = lw[key] * s.to(device=lw[key].device, dtype=lw[key].dtype)


def scales_v_wo(cfg: ModelConfig) -> bool:
    """Whether the v->wo scale group is searched (multi-head attention with q as wide as the hidden state, as llm-awq)."""
    return cfg.q_size == cfg.hidden_size and cfg.num_heads == cfg.num_kv_heads


def calibrate_layer(cal: LayerCalibrator, lw: dict, kept: dict, stats: dict, opts: QuantizeOptions, bar=None,
                    folded: dict | None = None) -> list[dict]:
    """Search and fold scales, then clip (not for awq-gptq: GPTQ rounds the unclipped weights), in place
    on lw; returns per-group results as data, and the scale folded into each kept input in `folded`.
    `bar` (a tqdm) advances by one per scale candidate (or smoothed group) and per clipped linear,
    its postfix naming the group being searched."""
    from tqdm import tqdm

    bar = tqdm(disable=True) if bar is None else bar
    cfg, g = cal.cfg, opts.w_group_size
    i = cfg.intermediate_size
    v_rows = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    up_rows = slice(i, 2 * i)
    # (name, producer key, producer rows, consumer key, kept input, block over substituted weights)
    groups = [
        ("attention_norm->w_qkv", "attention_norm", None, "w_qkv", "h1", lambda: cal.attention_loss_block(lw, kept["h1"])),
        ("v->wo", "w_qkv", v_rows, "wo", "o", lambda: (lambda ws: linear(kept["o"], ws[0]))),
        ("ffn_norm->w13", "ffn_norm", None, "w13", "h2", lambda: (lambda ws: mlp_block({**lw, "w13": ws[0]}, kept["h2"]))),
        ("up->w2", "w13", up_rows, "w2", "m", lambda: (lambda ws: linear(kept["m"], ws[0]))),
    ]
    results = []
    for name, producer, rows, consumer, inp, make_block in groups:
        if name == "v->wo" and not scales_v_wo(cfg):
            continue
        bar.set_postfix_str(f"scale {name}")
        if opts.search_scale:
            with cal.autocast():
                r = awq.search_scale(stats[inp + "_mean"], [lw[consumer]], make_block(), g, step=bar.update,
                                     grid=scale_grid(opts))
            s = r.scales
            results.append({"group": name, "ratio": r.ratio, "loss": r.loss, "loss_rtn": r.loss_identity})
        else:
            s = awq.smooth_scale(stats[inp + "_max"], [lw[consumer]])
            results.append({"group": name, "alpha": 0.5})
            bar.update()
        _fold(lw, producer, s, rows)
        _scale_columns(lw, consumer, s)
        kept[inp] = kept[inp] / s.to(device=kept[inp].device, dtype=kept[inp].dtype)
        if folded is not None:
            folded[inp] = s
    if opts.search_scale and opts.method == "awq":  # clipping, skipping q and k rows as llm-awq does
        for consumer, inp, rows in (("w_qkv", "h1", v_rows), ("wo", "o", None), ("w13", "h2", None), ("w2", "m", None)):
            bar.set_postfix_str(f"clip {consumer}")
            w = lw[consumer] if rows is None else lw[consumer][rows]
            with cal.autocast():
                ranges = awq.search_clip(w, kept[inp], g, cal.clip_rows)
            clipped = awq.apply_clip(w, ranges, g)
            if rows is None:
                lw[consumer] = clipped
            else:
                lw[consumer] = lw[consumer].clone()
                lw[consumer][rows] = clipped
            bar.update()
    return results


def layer_steps(cfg: ModelConfig, opts: QuantizeOptions) -> int:
    """Progress steps of one calibrated layer: forward batches, scale candidates (or smoothed groups), clipped linears."""
    groups = 4 if scales_v_wo(cfg) else 3
    forwards = -(-opts.calib_samples // opts.batch_size)
    tuning = autoround.ITERS if opts.mode == "awq-autoround" else 0
    return forwards + tuning + (groups * scale_grid(opts) + 4 if opts.search_scale else groups)


def scale_grid(opts: QuantizeOptions) -> int:
    """Scale ratios searched per group: awq-autoround's tuning refines what a coarser grid leaves."""
    return autoround.SCALE_GRID if opts.mode == "awq-autoround" else awq.GRID


LINEAR_INPUTS = {"w_qkv": "h1", "wo": "o", "w13": "h2", "w2": "m"}  # each linear's input, as LayerCalibrator.forward names it


def quantize_layer_linears(lw: dict, group_size: int, dtype: torch.dtype) -> dict:
    """{key: (qweight, scales, zeros)} in lmc's layout, on the CPU."""
    packed = {}
    for key in LINEAR_KEYS:
        codes, scales, zeros = quantize_int4(lw[key], group_size)
        packed[key] = tuple(t.cpu() for t in to_lmc_tensors(codes, scales, zeros, dtype))
    return packed


def tune_layer(cal: LayerCalibrator, lw: dict, x_quant: torch.Tensor, target: torch.Tensor, opts: QuantizeOptions,
               store_dtype: torch.dtype, step=None) -> tuple[dict, torch.Tensor, dict]:
    """`--method awq-autoround`: tune the rounding of the (scaled) layer lw so that its output from the quantized
    layers' output x_quant [n, S, H] matches the float layer's output `target` [n, S, H]. Returns the packed
    linears, this quantized layer's output of x_quant (the next layer's x_quant) and the tuning log."""
    def forward(ws: dict, xb: torch.Tensor) -> torch.Tensor:  # the tuned weights come in float32
        return cal.forward({**lw, **{k: w.to(lw[k].dtype) for k, w in ws.items()}}, xb, keep=False)[0]

    weights = {key: lw[key] for key in LINEAR_KEYS}
    g = opts.w_group_size
    rounding, log = autoround.tune(forward, weights, x_quant, target, g, store_dtype, seed=opts.seed + cal.layer, step=step)
    if rounding is None:  # no step's loss was a number (NaN/Inf weights kept by --allow-nonfinite): min-max rounding
        rounding = {key: autoround.Rounding.identity(w, g) for key, w in weights.items()}
    packed, dequantized = {}, {}
    for key, w in weights.items():
        codes, scales, zeros = autoround.final_codes(w, rounding[key], g, store_dtype)
        packed[key] = tuple(t.cpu() for t in to_lmc_tensors(codes, scales, zeros, store_dtype))
        dequantized[key] = dequantize_int4(codes, scales, zeros, g).to(w.dtype)
    out = torch.empty_like(x_quant)
    for b0 in range(0, x_quant.shape[0], opts.batch_size):
        out[b0:b0 + opts.batch_size] = forward(dequantized, x_quant[b0:b0 + opts.batch_size])
    return packed, out, log


# ----------------------------------------------------------------------------- driver


def run_layers(cfg: ModelConfig, builder: Builder, opts: QuantizeOptions, device, calib_dtype,
               store_dtype, windows: torch.Tensor | None, progress: bool) -> tuple[list[dict], list[dict]]:
    """Calibrate and quantize every layer. Returns per-layer (packed linears + float extras) and logs."""
    from tqdm import tqdm

    rope = Rope(cfg, device)
    layers, logs = [], []
    x = None
    if windows is not None:
        embed = builder.reader.get(builder.targets[0].sources[0])  # [V, H] on the CPU (mapped)
        x = embed[windows].to(device=device, dtype=calib_dtype)  # [n, S, H]
        del embed
    n_search = min(opts.search_samples, opts.calib_samples)
    x_quant = x if opts.mode == "awq-autoround" else None  # the quantized layers' output: the tuned layer's input
    for i in tqdm(range(cfg.num_layers), desc="quantize", unit="layer", disable=not progress):
        start = time.perf_counter()
        bar = tqdm(total=layer_steps(cfg, opts) if x is not None else 0, desc=f"layer {i}", unit="step", leave=False,
                   disable=not progress or x is None)
        lw = load_source_layer(builder, i, device, calib_dtype)
        log = {"layer": i, "groups": []}
        hessians = {k: gptq.HessianSum() for k in LINEAR_INPUTS.values()} if x is not None and opts.mode == "awq-gptq" else {}
        if x is not None:
            cal = LayerCalibrator(cfg, opts, rope, device, i)
            out = torch.empty_like(x)
            sums = {}
            kept_parts = []
            bar.set_postfix_str("forward")
            for b0 in range(0, x.shape[0], opts.batch_size):
                xb = x[b0:b0 + opts.batch_size]
                out[b0:b0 + xb.shape[0]], inputs = cal.forward(lw, xb, keep=True)
                for k, t in inputs.items():
                    mean, amax = awq.channel_mean_abs(t) * t.shape[0], awq.channel_abs_max(t)
                    prev = sums.get(k)
                    sums[k] = (mean, amax) if prev is None else (prev[0] + mean, torch.maximum(prev[1], amax))
                    if k in hessians:
                        hessians[k].add(t)
                if b0 < n_search:
                    kept_parts.append({k: t for k, t in inputs.items()})
                bar.update()
            tokens = x.shape[0] * x.shape[1]
            stats = {f"{k}_mean": v[0] / tokens for k, v in sums.items()} | {f"{k}_max": v[1] for k, v in sums.items()}
            kept = {k: torch.cat([p[k] for p in kept_parts])[: n_search * opts.calib_seqlen] for k in kept_parts[0]}
            folded = {}
            log["groups"] = calibrate_layer(cal, lw, kept, stats, opts, bar, folded)
            del kept, kept_parts
            if x_quant is not None:
                bar.set_postfix_str("tune")
                packed, x_quant, log["tuning"] = tune_layer(cal, lw, x_quant, out, opts, store_dtype, bar.update)
            x = out
        if hessians:
            bar.set_postfix_str("gptq")
            h = {key: hessians[inp].mean(folded.get(inp)) for key, inp in LINEAR_INPUTS.items()}
            packed = gptq.quantize_linears({key: lw[key] for key in LINEAR_KEYS}, h, opts.w_group_size, store_dtype, bar.update)
        elif x_quant is None:
            packed = quantize_layer_linears(lw, opts.w_group_size, store_dtype)
        bar.close()
        extras = {k: lw[k].to(device="cpu", dtype=store_dtype) for k in lw if k not in LINEAR_KEYS}
        layers.append({"packed": packed, "extras": extras})
        log["seconds"] = round(time.perf_counter() - start, 3)
        logs.append(log)
        del lw
    return layers, logs


def check_finite_layers(builder: Builder) -> None:
    """Build every layer tensor once, one at a time, so that a NaN/Inf weight (or a value the store dtype
    overflows) is refused before calibration, not when the loop reaches its layer: one read of the source, whose
    mapped pages the memory prediction already counts."""
    for target in builder.targets:
        if target.key is not None:  # the globals: check_finite_globals
            builder.build_blocks(target, 0)


def resolve_options(opts: QuantizeOptions) -> QuantizeOptions:
    """The options with the device and the search subset decided (what the provenance records)."""
    device = pick_device(opts.device)
    search = opts.search_samples if opts.search_samples is not None else (32 if device.type == "cuda" else 8)
    calib = opts.calib_dtype if opts.calib_dtype != "auto" else auto_calib_dtype(device)
    method = opts.method
    if method == "auto":  # the best method this device runs (awq-autoround's tuning is CPU-only for now)
        tunable = device.type == "cpu" and opts.calib_samples > 0 and opts.search_scale
        method = "awq-autoround" if tunable else "awq"
    return replace(opts, device=str(device), search_samples=search, calib_dtype=calib, method=method)


def auto_calib_dtype(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> str:
    """bfloat16 on a CPU with bf16 dot-product instructions (avx512_bf16 or AMX: 4.6x float32's matmul rate on
    this project's EPYC, bench/NOTES.md); float32 on other CPUs; on a GPU, "stored" (the stored dtype)."""
    if device.type != "cpu":
        return "stored"
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def command_line(opts: QuantizeOptions) -> str:
    """The `lmc quantize` command that repeats a run with these (resolved) options."""
    return (f"lmc quantize <src> -o <output> --w-bits {opts.w_bits} --w-group-size {opts.w_group_size} "
            f"--calib-dataset {opts.calib_dataset} --calib-samples {opts.calib_samples} --calib-seqlen {opts.calib_seqlen} "
            f"--batch-size {opts.batch_size} --{'' if opts.search_scale else 'no-'}search-scale "
            f"--search-samples {opts.search_samples} --device {opts.device} --seed {opts.seed} --dtype {opts.dtype} "
            f"--calib-dtype {opts.calib_dtype}"
            + (" --workspace" if opts.workspace else "") + (f" --format {opts.format}" if opts.format != "awq" else "")
            + f" --method {opts.method}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def quantize(src, out, opts: QuantizeOptions, force: bool = False, progress: bool | None = None,
             command: str = "", say=print, warn=_stderr) -> dict:
    """Run `lmc quantize` on the checkpoint at `src` (an HF folder or a GGUF file). A LLaVA checkpoint (HF layout)
    has its language model quantized; its vision tower and projector stay float."""
    if opts.calib_samples > 0:  # a bad --calib-dataset is one line before the checkpoint is opened
        check_text_source(opts.calib_dataset, "--calib-dataset")
    source = open_source(src)
    if source.model_format != "gguf" and is_llava(source.hf_config) == "original":
        raise LmcError(f"{src} is an original-layout LLaVA checkpoint; quantize its Hugging Face layout "
                       "(LlavaForConditionalGeneration), or convert it with --vision-tower and quantize that")
    return quantize_source(split_vision(source), out, opts, force, progress, command, say, warn)


def quantize_source(source: Source, out, opts: QuantizeOptions, force: bool = False, progress: bool | None = None,
                    command: str = "", say=print, warn=_stderr) -> dict:
    """Quantize an opened checkpoint into `out` (HF AWQ folder, or a workspace). `say` gets the memory
    prediction, `warn` why the output is a workspace where an AWQ folder was asked for.
    Returns a summary (timings, memory, per-layer losses)."""
    t0 = time.perf_counter()
    if opts.w_bits != 4:
        raise LmcError(f"--w-bits {opts.w_bits}: only 4-bit weights are supported")
    check_group_size(opts.w_group_size)
    if opts.calib_samples < 0 or opts.calib_seqlen < 2 or opts.batch_size < 1:
        raise LmcError("--calib-samples must be >= 0, --calib-seqlen >= 2 and --batch-size >= 1")
    if opts.search_samples is not None and opts.search_samples < 1:  # no window to search on: IndexError mid-run
        raise LmcError(f"--search-samples {opts.search_samples}: the scale and clip search needs at least 1 window")
    if opts.format not in HF_FORMATS or (opts.workspace and opts.format != "awq"):
        raise LmcError(f"--format {opts.format!r}: choose one of {', '.join(HF_FORMATS)}, or --workspace alone")
    if opts.calib_dtype not in CALIB_DTYPES:
        raise LmcError(f"--calib-dtype {opts.calib_dtype!r}: choose one of {', '.join(CALIB_DTYPES)}")
    if opts.method not in METHODS:
        raise LmcError(f"--method {opts.method!r}: choose one of {', '.join(METHODS)}")
    if source.int4 is not None:
        raise LmcError(f"{source.path} is already {source.model_format}-quantized; convert it with `lmc convert`")
    opts = resolve_options(opts)
    if opts.method != "awq" and (opts.calib_samples == 0 or not opts.search_scale):
        raise LmcError(f"--method {opts.method} needs calibration and the scale search: drop --calib-samples 0 / --no-search-scale")
    if opts.method == "awq-autoround" and opts.device != "cpu":
        raise LmcError("--method awq-autoround tunes with torch autograd through the CPU layer code: add --device cpu")
    cfg = model_config_from_hf(source.hf_config)
    window = session_window(source.hf_config, cfg)  # a malformed sliding window is refused before calibration
    if opts.calib_samples > 0:
        check_within_window(opts.calib_seqlen, window, "--calib-seqlen", source.path, does="calibrates")
    store_dtype = resolve_dtype(opts.dtype, source.hf_config)
    if store_dtype == torch.float32:
        store_dtype = torch.float16
    device = torch.device(opts.device)
    calib_dtype = store_dtype if opts.calib_dtype == "stored" else torch.float32  # weights and activations
    out = Path(out)
    inputs = [source.path, *source.reader.source_files()]
    check_output(out, inputs, force)
    fmt = "workspace" if opts.workspace else opts.format
    reason = None if fmt == "workspace" else hf_layout_problem(cfg, opts.w_group_size)
    builder = Builder(source, cfg, store_dtype, 1, opts.allow_nonfinite, say)
    builder.check_names()
    builder.check_finite_globals()

    def check_memory(final: bool):
        mem = predict(cfg, opts.calib_samples, opts.calib_seqlen, opts.search_samples, opts.batch_size,
                      opts.w_group_size, device, calib_dtype, store_dtype, source_read(source),
                      gptq=opts.mode == "awq-gptq", tune_batch=autoround.BATCH if opts.mode == "awq-autoround" else 0)
        if final:
            say(mem.describe())
        if not mem.fits():
            raise LmcError(f"not enough memory: {mem.describe()}; lower --calib-samples/--calib-seqlen/--batch-size")
        return mem

    check_memory(final=False)  # a run that cannot fit is refused before the text is tokenized (seconds on PTB)
    ids, text_info = (None, None) if opts.calib_samples == 0 else calibration_ids(source, opts)
    release_free_heap()  # tokenizing leaves freed blocks in the heap (0.3 GiB for PTB with SmolLM2's tokenizer)
    mem = check_memory(final=True)  # with what tokenizing left held
    tf = time.perf_counter()
    if ids is not None and not opts.allow_nonfinite:
        check_finite_layers(builder)  # a NaN in the last layer is one line now, not after calibrating all the others
    finite_check_s = time.perf_counter() - tf
    if reason:
        warn(f"note: writing an lmc workspace instead of an HF {HF_FORMATS[fmt]} checkpoint: {reason}")
        fmt = "workspace"
    windows, calib_info = (None, None) if ids is None else calibration_windows(ids, text_info, opts)
    del ids
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    show = sys.stderr.isatty() if progress is None else progress
    t1 = time.perf_counter()
    # awq-autoround's tuning takes gradients of the layer, which inference_mode's tensors cannot give
    with torch.no_grad() if opts.mode == "awq-autoround" else torch.inference_mode():
        layers, logs = run_layers(cfg, builder, opts, device, calib_dtype, store_dtype, windows, show)
    t2 = time.perf_counter()
    record = {k: v for k, v in asdict(opts).items() if k != "workspace"}
    prov = provenance(source, command, {"quantization": {**record, "method": opts.mode, "format": fmt}})
    if calib_info:
        prov["calibration"] = calib_info
    quant = {"method": opts.mode, "bits": 4, "group_size": opts.w_group_size, "layout": LAYOUT, "zero_point": True}
    with atomic_output(out, force, inputs) as tmp:
        if fmt == "workspace":
            _write_workspace(tmp, builder, cfg, layers, store_dtype, quant, source, prov)
        else:
            _write_hf(tmp, fmt, builder, cfg, layers, store_dtype, source, prov, opts.w_group_size, device)
    window = session_window(source.hf_config, cfg)
    if fmt == "workspace" and window is not None:
        warn(window_note(cfg, window))
    summary = {"output": str(out), "format": fmt, "method": opts.mode, "layers": logs, "options": asdict(opts),
               "seconds": {"total": round(time.perf_counter() - t0, 2), "calibrate_quantize": round(t2 - t1, 2),
                           "finite_check": round(finite_check_s, 2)},
               "memory_predicted": asdict(mem), "peak_host_rss_bytes": peak_rss()}
    if device.type == "cuda":
        summary["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    if calib_info:
        summary["calibration"] = calib_info
    return summary


HF_FORMATS = {"awq": "AWQ GEMM", "compressed-tensors": "compressed-tensors pack-quantized"}  # --format -> its name


def hf_layout_problem(cfg: ModelConfig, g: int) -> str | None:
    """Why the HF int4 layouts (AWQ GEMM, compressed-tensors pack-quantized as vLLM loads it) cannot hold every
    linear of the model (both need K % G == 0 and N % 8 == 0 per source module), naming the first linear that
    does not fit; None when they can."""
    spec = arch_spec(cfg)
    if not spec.awq_writable:
        return f"{spec.name}'s fused source linears are not written as separate HF modules"
    for key in LINEAR_KEYS:
        k = linear_parts(cfg, key)[1]
        for module, n in spec.hf_linear_modules(cfg, 0, key):
            if awq_compatible(n, k, g):
                continue
            name = module.replace(spec.layer_prefix.format(i=0), spec.layer_prefix.format(i="*"))
            if n % 8:
                return f"{name} has N={n} output features, not a multiple of 8 (the HF int4 layouts need it)"
            fits = [size for size in (128, 64, 32) if all(_awq_fits(cfg, key2, size) for key2 in LINEAR_KEYS)]
            hint = f"; --w-group-size {fits[0]} gives an HF checkpoint" if fits else ""
            return (f"{name} has K={k} input features, not a multiple of --w-group-size {g} "
                    f"(the HF int4 layouts need every linear's K to be one){hint}")
    return None


def _awq_fits(cfg: ModelConfig, key: str, g: int) -> bool:
    parts, k = linear_parts(cfg, key)
    return all(awq_compatible(n, k, g) for n in parts)


# ----------------------------------------------------------------------------- writers


def _layer_tensor(layers: list[dict], name: str) -> torch.Tensor:
    """A workspace tensor of a quantized layer, by workspace name."""
    _, i, rest = name.split(".", 2)
    layer = layers[int(i)]
    for suffix in INT4_LEAVES:
        if rest.endswith(suffix):
            key = LAYER_KEYS[rest.removesuffix(suffix)]
            return layer["packed"][key][INT4_LEAVES.index(suffix)]
    return layer["extras"][LAYER_KEYS[rest]]


def _write_workspace(tmp, builder, cfg, layers, dtype, quant, source, prov) -> None:
    base_specs, owner = plan(builder)
    specs = []
    for spec in base_specs[0]:
        if not spec.name.startswith("layers."):
            specs.append(spec)
        elif spec.name.endswith(".weight") and LAYER_KEYS.get(spec.name.split(".", 2)[2].removesuffix(".weight")) in LINEAR_KEYS:
            base = spec.name.removesuffix(".weight")
            for leaf in INT4_LEAVES:
                t = _layer_tensor(layers, base + leaf)
                specs.append(TensorSpec(base + leaf, t.dtype, tuple(t.shape)))
        else:
            t = _layer_tensor(layers, spec.name)
            specs.append(TensorSpec(spec.name, t.dtype, tuple(t.shape)))
    vision = source.vision
    if vision is not None:  # a LLaVA model's vision tower and projector, float
        vision.check()
        specs += vision_specs(vision, dtype)

    def produce(rank: int, name: str) -> torch.Tensor:
        if name.startswith("layers."):
            return _layer_tensor(layers, name)
        if vision is not None and name in vision.sources:
            return vision.build(name, dtype)
        return builder.build(owner[(0, name)], 0)[name]

    window = session_window(source.hf_config, cfg)
    write_workspace(tmp, lmc_json(cfg, dtype, 1, quant, vision, window), [specs], produce, source.tokenizer_files(), prov)


def _write_hf(tmp, fmt, builder, cfg, layers, dtype, source, prov, g, device=torch.device("cpu")) -> None:
    """An HF checkpoint with the linears in AutoAWQ's GEMM layout (fmt "awq", everything float16) or
    in compressed-tensors' pack-quantized W4A16 (fmt "compressed-tensors", floats in `dtype`), as
    AutoAWQ and llm-compressor write them; vLLM and transformers read both (docs/interchange.md).
    The repacking runs on `device` (integer ops, the same bits anywhere): on a GPU an 8B model's
    takes seconds, where the CPU's int64 temporaries took ~110 s on an H200 host."""
    float_dtype = torch.float16 if fmt == "awq" else dtype
    entries: dict[str, tuple[TensorSpec, object]] = {}  # name -> (spec, producer)
    cache: dict = {}

    def packed_parts(i: int, key: str) -> list[dict[str, torch.Tensor]]:
        if cache.get("key") != (i, key):
            qweight, scales, zeros = (t.to(device) for t in layers[i]["packed"][key])
            rows, k = linear_parts(cfg, key)
            codes, s, z = from_lmc_tensors(qweight, scales, zeros, k)  # [N, K], [N, ng] x2
            cache.update(key=(i, key), parts=[_pack_hf(fmt, c, sc, zz, g, float_dtype)
                                              for c, sc, zz in zip(codes.split(rows), s.split(rows), z.split(rows))])
        return cache["parts"]

    spec = arch_spec(cfg)
    globals_ = (spec.embed, spec.final_norm) + (() if cfg.tie_word_embeddings else (spec.lm_head,))
    for name in globals_:
        entries[name] = (TensorSpec(name, float_dtype, builder.reader.shape(name)),
                         lambda n=name: builder.reader.get(n).to(float_dtype))
    for i, layer in enumerate(layers):
        for key in LINEAR_KEYS:
            parts, k = spec.hf_linear_modules(cfg, i, key), linear_parts(cfg, key)[1]
            for j, (module, n) in enumerate(parts):
                for leaf, shape in checkpoint_int4_shapes(fmt, n, k, g).items():
                    dt = torch.int32 if leaf in INT32_LEAVES else torch.int64 if leaf in INDEX_LEAVES else float_dtype
                    entries[module + leaf] = (TensorSpec(module + leaf, dt, shape),
                                              lambda i=i, key=key, j=j, leaf=leaf: packed_parts(i, key)[j][leaf])
            if key == "w_qkv" and "w_qkv_bias" in layer["extras"]:
                for (module, _), part in zip(parts, layer["extras"]["w_qkv_bias"].split([r for _, r in parts])):
                    entries[module + ".bias"] = (TensorSpec(module + ".bias", float_dtype, tuple(part.shape)),
                                                 lambda part=part: part.to(float_dtype))
        for key, leaf in spec.norms.items():
            if key in layer["extras"]:
                t = layer["extras"][key]
                name = spec.layer_prefix.format(i=i) + leaf
                entries[name] = (TensorSpec(name, float_dtype, tuple(t.shape)), lambda t=t: t.to(float_dtype))
    if source.vision is not None:  # LLaVA: the checkpoint's own names, its vision half copied in float
        entries = hf_entries(source, entries, float_dtype, TensorSpec)
    write_safetensors(tmp / "model.safetensors", [spec for spec, _ in entries.values()], lambda n: entries[n][1]())
    hf = dict(source.hf_config if source.vision is None else source.vision.hf_config)
    dtype_name = str(float_dtype).removeprefix("torch.")
    hf.update({"torch_dtype": dtype_name} | ({"dtype": dtype_name} if "dtype" in hf else {}))
    if fmt == "awq":
        hf["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": g, "zero_point": True}
    else:
        hf["quantization_config"] = compressed_tensors_config(g, spec.lm_head.removesuffix(".weight"))
    if source.vision is not None:
        hf["quantization_config"]["modules_to_not_convert" if fmt == "awq" else "ignore"] = (
            ["vision_tower", "multi_modal_projector"] if fmt == "awq" else
            ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"])
    (tmp / "config.json").write_bytes(dump_json(hf))
    for name, data in source.tokenizer_files().items():
        (tmp / name).write_bytes(data)
    for name in PROCESSOR_FILES if source.vision is not None else ():  # LLaVA's image processor settings
        if (source.path / name).is_file():
            (tmp / name).write_bytes((source.path / name).read_bytes())
    (tmp / "lmc_provenance.json").write_bytes(dump_json({**prov, "format": {"awq": "hf-awq-gemm"}.get(fmt, f"hf-{fmt}")}))


def _pack_hf(fmt: str, codes, scales, zeros, g: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One source module's int4 tensors in an HF layout, by leaf (pack.checkpoint_int4_shapes)."""
    if fmt == "awq":
        return dict(zip((".qweight", ".qzeros", ".scales"), pack_awq(codes, scales, zeros, g)))
    return pack_compressed(codes, scales, zeros, dtype)


def compressed_tensors_config(g: int, lm_head: str) -> dict:
    """The quantization_config llm-compressor writes for asymmetric W4A16 in groups of g (the
    compressed-tensors library's QuantizationConfig), lm_head left in float."""
    weights = {"dynamic": False, "group_size": g, "num_bits": 4, "strategy": "group", "symmetric": False, "type": "int"}
    return {"config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized", "global_compression_ratio": None, "ignore": [lm_head], "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}}


def summary_json(summary: dict) -> str:
    """The summary as strict JSON: a loss that is not a number (NaN/Inf weights kept by --allow-nonfinite) is null,
    not the NaN / Infinity that json.dumps writes and JSON parsers (jq, JSON.parse) refuse."""
    def finite(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(summary), indent=2, sort_keys=True, default=str, allow_nan=False)
