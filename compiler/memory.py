"""Peak-memory prediction for `lmc quantize`, made from the config and flags before any work."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmc.format.archs import layer_params
from lmc.format.config import ModelConfig


@dataclass(frozen=True)
class MemoryPlan:
    host_bytes: int
    device_bytes: int  # equals 0 when the device is the CPU (all counted in host_bytes)
    host_available: int
    device_available: int

    def fits(self) -> bool:
        return self.host_bytes <= self.host_available and self.device_bytes <= self.device_available

    def describe(self) -> str:
        gib = 1024**3
        text = f"predicted peak host memory {self.host_bytes / gib:.2f} GiB (available {self.host_available / gib:.2f} GiB)"
        if self.device_available:
            text += f", device memory {self.device_bytes / gib:.2f} GiB (free {self.device_available / gib:.2f} GiB)"
        return text


def host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def predict(cfg: ModelConfig, samples: int, seqlen: int, search_samples: int, batch_size: int,
            device: torch.device, compute_dtype: torch.dtype, store_dtype: torch.dtype) -> MemoryPlan:
    """Peak bytes on host and device: two activation buffers of all windows, the search subset's
    inputs of every linear, one layer's weights three times over (original, scaled, trial), a
    batch's intermediates; the host also holds the packed int4 results and one embedding-sized
    tensor while writing."""
    c = compute_dtype.itemsize
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    tokens = samples * seqlen
    search_tokens = min(search_samples, samples) * seqlen
    activations = 2 * tokens * h * c
    search = search_tokens * (2 * h + cfg.q_size + i) * c + search_tokens * (cfg.q_size + 2 * cfg.kv_size + 2 * i + h) * c
    layer = 3 * layer_params(cfg) * c
    batch = max(batch_size, min(search_samples, samples)) * seqlen * (cfg.q_size + 2 * cfg.kv_size + 3 * i) * c
    work = activations + search + layer + batch
    packed = cfg.num_layers * layer_params(cfg) * 5 // 8 + 2 * cfg.num_layers * h * store_dtype.itemsize
    big_tensor = 2 * v * h * max(c, store_dtype.itemsize)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return MemoryPlan(packed + big_tensor + layer, work + v * h * c, host_available(), free)
    return MemoryPlan(packed + big_tensor + work, 0, host_available(), 0)
