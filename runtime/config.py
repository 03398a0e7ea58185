"""The engine's settings (the model description lives in lmc.format.config)."""
from __future__ import annotations

from dataclasses import dataclass

from lmc.errors import LmcError


MAX_THREADS = 1024  # CPU threads torch is asked for at most: OpenMP fails to start ~20,000 and crashes past that


@dataclass
class EngineConfig:
    """Runtime settings, named as LMDeploy's TurbomindEngineConfig / PytorchEngineConfig name them."""

    session_len: int | None = None  # max tokens per sequence; None: the model's max_position_embeddings
    max_batch_size: int = 64  # sequences running at once
    cache_max_entry_count: float = 0.8  # fraction of free device memory (CPU: of cpu_cache_budget_gb)
    cache_block_seq_len: int = 64  # tokens per KV block
    quant_policy: int = 0  # KV cache: 0 float, 8 int8, 4 int4 (online, per token and head; docs/kv-cache.md)
    lm_head: str = "float"  # "int4": the float lm_head quantized at load (RTN, lmc-int4-k8; docs/cli.md)
    tp: int | None = None  # tensor-parallel ranks; None: what the workspace is split for (runtime/distributed.py)
    max_prefill_token_num: int = 8192  # tokens computed per step: longer prompts are prefilled in chunks
    enable_prefix_caching: bool = True  # share full KV blocks between requests with a common prefix
    prefill_interval: int = 16  # while sequences decode, waiting ones are admitted every this many steps
    device: str | None = None  # "cuda", "cpu"; None: cuda when available
    dtype: str | None = None  # compute dtype override; None: the workspace's dtype (float32 on CPU for fp16)
    cpu_cache_budget_gb: float = 2.0
    cuda_graph: bool = True
    threads: int | None = None  # CPU threads for torch; None: lmc.runtime.device.default_threads()
    # accepted for LMDeploy scripts; lmc has one engine and reads the format from the workspace
    model_format: str | None = None
    device_type: str | None = None  # PytorchEngineConfig's name for device
    eager_mode: bool = False  # PytorchEngineConfig: True turns CUDA graphs off

    def check(self) -> None:
        def positive_int(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmcError(f"{name} must be a positive integer, got {value!r}")

        if self.quant_policy not in (0, 4, 8):
            raise LmcError(f"quant_policy={self.quant_policy} is not a KV cache policy; "
                           "use 0 (float), 8 (int8) or 4 (int4)")
        if self.lm_head not in ("float", "int4"):
            raise LmcError(f"lm_head={self.lm_head!r} is not an lm_head precision; use 'float' or 'int4'")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise LmcError(f"cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count}")
        positive_int("max_batch_size", self.max_batch_size)
        positive_int("cache_block_seq_len", self.cache_block_seq_len)
        positive_int("max_prefill_token_num", self.max_prefill_token_num)
        positive_int("prefill_interval", self.prefill_interval)
        if self.session_len is not None:
            positive_int("session_len", self.session_len)
            if self.session_len < 2:
                raise LmcError(f"session_len must be at least 2, got {self.session_len}")
        if self.threads is not None:
            positive_int("threads", self.threads)
            if self.threads > MAX_THREADS:
                raise LmcError(f"threads={self.threads} is more than lmc starts ({MAX_THREADS}); leave it unset to use "
                               "the free cores")
        if self.tp is not None:
            positive_int("tp", self.tp)
        if self.device is None and self.device_type is not None:
            self.device = self.device_type
        if self.eager_mode:
            self.cuda_graph = False


TurbomindEngineConfig = EngineConfig  # LMDeploy's names, so `from lmc import TurbomindEngineConfig` scripts run
PytorchEngineConfig = EngineConfig
