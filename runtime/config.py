"""The engine's settings (the model description lives in lmc.format.config)."""
from __future__ import annotations

from dataclasses import dataclass

from lmc.errors import LmcError


@dataclass
class EngineConfig:
    """Runtime settings, named as LMDeploy's TurbomindEngineConfig names them."""

    session_len: int | None = None  # max tokens per sequence; None: the model's max_position_embeddings
    max_batch_size: int = 64
    cache_max_entry_count: float = 0.8  # fraction of free device memory (CPU: of cpu_cache_budget_gb)
    cache_block_seq_len: int = 64
    quant_policy: int = 0  # 0: fp KV cache (int8/int4 KV not available yet)
    tp: int = 1
    device: str | None = None  # "cuda", "cpu"; None: cuda when available
    dtype: str | None = None  # compute dtype override; None: the workspace's dtype (float32 on CPU for fp16)
    cpu_cache_budget_gb: float = 2.0
    cuda_graph: bool = True

    def check(self) -> None:
        if self.quant_policy != 0:
            raise LmcError(f"quant_policy={self.quant_policy}: KV-cache quantization (8/4) is not implemented yet; use 0")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise LmcError("cache_max_entry_count must be in (0, 1]")
        if self.cache_block_seq_len < 1:
            raise LmcError("cache_block_seq_len must be positive")
        if self.tp != 1:
            raise LmcError(f"tp={self.tp}: the runtime runs one device; convert with --tp 1 to run here")
