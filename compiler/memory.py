"""Peak-memory prediction for `lmc quantize`, made before the long part starts.

The host prediction starts from what the process holds when it is made (measured: torch and the
other libraries, the opened source, the tokenized calibration text; and the peak so far, which
tokenizing sets) and adds what the run still allocates: the token windows, the embedding read and
the windows' rows gathered from it, one linear read at a time, the calibration of one layer (its
weights, activations of every window, the searched subset's inputs, a forward batch, a search
trial, the clipping search, int4 packing), the packed results of every layer, and the writer's
float copy of a global tensor. The source files count as resident once read (the readers map
them). Device runs hold the calibration on the device and the rest on the host.

Measured on the CPU (peak RSS / predicted, both as `lmc quantize --json` reports them):
  tiny test model (tests/test_quantize.py): round-to-nearest 0.30 / 0.35 GiB, AWQ on a short text
    0.32 / 0.37 GiB
  3-layer model of SmolLM2-135M's shape, bf16 safetensors, 128 x 512 windows, 8 searched,
    --batch-size 8, group 64: 1.33 / 1.39 GiB (the tightest case seen)
  SmolLM2-135M-Instruct from its Q4_1 GGUF, `make demo`'s flags (32 x 512 windows, 4 searched,
    group 64): 1.57 / 1.69 GiB (the report that led to this prediction: 1.66 GiB peak, 0.43 predicted)
"""
from __future__ import annotations

import ctypes
import resource
from dataclasses import dataclass

import torch

from lmc.runtime.device import host_available
from lmc.format.archs import LINEAR_KEYS, layer_params, linear_shape
from lmc.format.config import ModelConfig
from lmc.format.int4 import int4_shapes

GIB = 1024**3
CLIP_TOKENS = 512  # lmc.compiler.awq.search_clip's token sample
INT4_WORK = 40  # bytes per weight while one linear is quantized and packed (float32 groups, int64 words)
# Host memory torch's first calibration ops fault in (code pages, thread pools, allocator arenas), measured
# on the CPU: +11 MiB for round-to-nearest, +22 MiB for a tiny calibration (tests/test_quantize.py).
TORCH_WARMUP = 64 * 1024**2
# Freed blocks malloc keeps but cannot hand to the next allocation, as a fraction of a layer's temporaries:
# with 128 x 512 windows a SmolLM2-shaped layer loop's RSS exceeded its live tensors by 0.27 GiB (live
# measured with MALLOC_MMAP_THRESHOLD_=1048576) and the summed phases without this slack by 0.02 GiB.
HEAP_SLACK = 0.25
# Host memory a CUDA run adds after the prediction: cuBLAS and Triton loaded and compiling on first use.
# An allowance, not a measurement (CPU runs measure everything they hold).
CUDA_HOST_ALLOWANCE = 768 * 1024**2


@dataclass(frozen=True)
class SourceRead:
    """What reading the checkpoint costs on the host."""

    file_bytes: int  # the source files, mapped by the readers
    itemsize: int  # bytes per element of a float tensor as the reader returns it
    temporaries: int  # further tensors of that size alive while one is read (GGUF dequantization)


@dataclass(frozen=True)
class MemoryPlan:
    host_bytes: int  # predicted peak RSS: max(host_peak_so_far, host_held + host_mapped + host_more)
    device_bytes: int  # equals 0 when the device is the CPU (all counted in host_bytes)
    host_available: int
    device_available: int
    host_held: int = 0  # RSS when the prediction was made
    host_peak_so_far: int = 0  # peak RSS before it (tokenizing the calibration text sets it)
    host_mapped: int = 0  # source file pages: resident once read, but the kernel can drop them
    host_more: int = 0  # what the run still allocates at its peak

    def fits(self) -> bool:
        return self.host_more <= self.host_available and self.device_bytes <= self.device_available

    def describe(self) -> str:
        text = (f"predicted peak host memory {self.host_bytes / GIB:.2f} GiB ({self.host_held / GIB:.2f} GiB held now, "
                f"{self.host_mapped / GIB:.2f} GiB of source files mapped, {self.host_more / GIB:.2f} GiB more; "
                f"available {self.host_available / GIB:.2f} GiB)")
        if self.device_available:
            text += f", device memory {self.device_bytes / GIB:.2f} GiB (free {self.device_available / GIB:.2f} GiB)"
        return text


def peak_rss() -> int:
    """The process's peak resident set so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held_rss() -> int:
    """The process's resident set now, in bytes (the peak where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def clip_rows(device: torch.device) -> int:
    """Output rows per step of the clipping search: 256 on the CPU, where it is a layer's largest transient
    (a SmolLM2-shaped layer's w2 at 1024 rows: +0.16 GiB RSS; at 256: +0.04 GiB, in 5% less CPU time)."""
    return 1024 if device.type == "cuda" else 256


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS, where the C library can (glibc's malloc_trim)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def source_read(source) -> SourceRead:
    """The read costs of an opened checkpoint (lmc.compiler.readers.Source)."""
    reader = source.reader
    itemsize = max(reader.dtype(name).itemsize for name in reader.names())
    return SourceRead(sum(f.stat().st_size for f in reader.source_files()), itemsize,
                      1 if source.model_format == "gguf" else 0)


def predict(cfg: ModelConfig, samples: int, seqlen: int, search_samples: int, batch_size: int, group_size: int,
            device: torch.device, compute_dtype: torch.dtype, store_dtype: torch.dtype, read: SourceRead,
            held: tuple[int, int] | None = None, gptq: bool = False, tune_batch: int = 0) -> MemoryPlan:
    """Peak bytes on host and device. held: (RSS now, peak RSS so far); default: measured now.
    gptq: `--method awq-gptq` (float64 X^T X of the four linear inputs, the inverse Hessian of one linear).
    tune_batch: `--method awq-autoround`'s windows per tuning step (0: no tuning).

    Every phase's temporaries are summed: a phase reuses the blocks it freed itself, but malloc keeps
    freed blocks of up to 32 MiB in its heap, where another phase's allocations may not fit (measured:
    the largest phase alone fell 0.2 GiB short on a SmolLM2-shaped model). The layer loop's large
    buffers are returned before the writing starts, so writing counts against them, not on top."""
    c, st, r = compute_dtype.itemsize, store_dtype.itemsize, read.itemsize
    h, v = cfg.hidden_size, cfg.vocab_size
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes = [linear_shape(cfg, key) for key in LINEAR_KEYS]  # [(N, K)] of the fused linears
    widest = max(n * k for n, k in shapes)
    tokens = samples * seqlen
    kept_tokens = min(-(-min(search_samples, samples) // batch_size) * batch_size, samples) * seqlen  # whole batches

    # --- calibration (on the device): what one layer holds, and the temporaries of its steps ---
    weights = 3 * layer_params(cfg) * c + 4 * h * c  # the layer as read, scaled and clipped; norms
    int4 = widest * INT4_WORK  # quantizing and packing the widest linear
    held_by_layer = weights
    steps = int4
    if samples:
        held_by_layer += 2 * tokens * h * c  # the layer's input and output for every window
        held_by_layer += 2 * kept_tokens * (2 * h + q + i) * c  # inputs of the four linear groups, kept and scaled
        steps += batch_size * seqlen * (6 * h + 2 * q + 4 * kv + 3 * i) * c  # one batch through the layer
        steps += kept_tokens * max(2 * q + 4 * kv + 3 * h, 3 * i + 2 * h) * c  # one trial of a scale search block
        rows = clip_rows(device)
        steps += max(3 * min(n, rows) * CLIP_TOKENS * -(-k // group_size) * 4 + 8 * min(n, rows) * k * 4
                     for n, k in shapes)  # the clipping search of one linear
        if gptq:
            held_by_layer += 8 * sum(k * k for _, k in shapes)  # X^T X of each linear's input, float64
            steps += max(4 * k * k * 8 + 3 * n * k * 4 for n, k in shapes)  # GPTQ on one linear: H, its factors; W copies
        if tune_batch:
            held_by_layer += 2 * tokens * h * c  # the quantized layers' output: this layer's input and output
            params = layer_params(cfg)  # the int4 linears' weights
            steps += (5 * tune_batch * seqlen * (6 * h + 2 * q + 4 * kv + 3 * i) * c  # a step's saved activations
                      + 8 * params * 4)  # offsets (tuned, best, gradient), fake-quantized weights and their temporaries

    # --- host: reading, results, writing ---
    windows = tokens * 8  # int64 token windows
    embed_read = v * h * r * (1 + read.temporaries)
    gather = (embed_read + tokens * h * r) if samples else 0  # the embedding read and the windows' rows from it
    layer_read = widest * (r * (2 + read.temporaries) + st)  # one linear's parts, fused, in the store dtype
    packed = cfg.num_layers * (sum(_int4_bytes(n, k, group_size, st) for n, k in shapes) + (4 * h + q + 2 * kv) * st)
    write = embed_read + v * h * st + int4  # a global tensor as read and as written; an int4 linear repacked
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0  # starts CUDA: measure after
    now, high = (held_rss(), peak_rss()) if held is None else held
    if device.type == "cuda":
        more = CUDA_HOST_ALLOWANCE + windows + packed + gather + layer_read + write
        device_bytes = held_by_layer + tokens * h * (r + c) + steps
    else:
        more = (TORCH_WARMUP + windows + packed + gather + layer_read + int(steps * (1 + HEAP_SLACK))
                + max(held_by_layer, write))
        device_bytes = 0
    return MemoryPlan(max(high, now + read.file_bytes + more), device_bytes, host_available(), free, now, high,
                      read.file_bytes, more)


def _int4_bytes(n: int, k: int, group_size: int, store_itemsize: int) -> int:
    """Bytes of one int4 linear [N, K] in lmc's layout: int32 words, scales and zeros."""
    s = int4_shapes(n, k, group_size)
    return 4 * s[".qweight"][0] * s[".qweight"][1] + store_itemsize * 2 * s[".scales"][0] * s[".scales"][1]
