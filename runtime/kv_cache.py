"""Paged KV cache: fixed-size blocks of `cache_block_seq_len` tokens and a block table per sequence.

quant_policy 0 stores K and V in the compute dtype; 8 and 4 store uint8 codes plus float16 scales and zeros
per token and head: one pair per head vector, except policy 4's K, one pair per 16 channels (a QuantizedKV per
layer, layout in kernels/kv_quant.py and docs/kv-cache.md).
"""
from __future__ import annotations

import torch

from lmc.errors import LmcError
from lmc.format.config import ModelConfig
from lmc.kernels.kv_quant import QuantizedKV, store_groups, vector_bytes
from lmc.runtime.config import EngineConfig

GRAPH_SCRATCH_BLOCKS = 1  # taken by the CUDA-graph decoder for its padded rows (runtime/cuda_graph.py)


def decode_table_width(session_len: int, block_size: int) -> int:
    """Block-table columns of every decode step, graph or eager: the blocks of a session_len-token sequence. Fixed,
    so that the decode attention's split count (a compile-time constant) follows the batch size alone, never the
    longest sequence of the step (kernels/attention.py _default_num_splits)."""
    return -(-session_len // block_size)


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, quant_policy: int = 0) -> int:
    """K and V of every layer for block_size tokens: codes + scales + zeros when quantized."""
    if quant_policy:
        k_group, v_group = store_groups(cfg.head_dim, quant_policy)
        per_pair = vector_bytes(cfg.head_dim, quant_policy, k_group) + vector_bytes(cfg.head_dim, quant_policy, v_group)
    else:
        per_pair = 2 * cfg.head_dim * dtype.itemsize
    return cfg.num_layers * block_size * cfg.num_kv_heads * per_pair


def plan_num_blocks(cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, device: torch.device,
                    reserved_blocks: int = 0) -> int:
    """Blocks that fit in cache_max_entry_count of free device memory (CPU: of the stated budget),
    capped at what max_batch_size sequences of session_len tokens could ever use plus `reserved_blocks`
    that are never handed to a sequence (the CUDA-graph decoder's scratch block)."""
    per_block = bytes_per_block(cfg, ecfg.cache_block_seq_len, dtype, ecfg.quant_policy)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = int(ecfg.cpu_cache_budget_gb * 1024**3)
    budget = int(free * ecfg.cache_max_entry_count)
    blocks = budget // per_block
    session_len = ecfg.session_len or cfg.max_position_embeddings
    cap = ecfg.max_batch_size * -(-session_len // ecfg.cache_block_seq_len) + reserved_blocks
    blocks = min(blocks, cap)
    if blocks < 1:
        raise LmcError(f"the KV cache gets {budget / 2**20:.0f} MiB, less than one block ({per_block / 2**20:.1f} MiB); "
                       "raise --cache-max-entry-count or lower --cache-block-seq-len")
    return blocks


class PagedKVCache:
    """Per-layer K and V storage of num_blocks blocks; which sequence owns a block is block_manager's business."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 quant_policy: int = 0):
        """k and v: per layer, a [num_blocks, block_size, Hkv, D] tensor of `dtype` (quant_policy 0) or a
        QuantizedKV of quant_policy bits (8, 4) with store_groups' channels per (scale, zero)."""
        def layer(group: int):
            if quant_policy:
                return QuantizedKV.empty(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, quant_policy, group,
                                         device)
            return torch.empty((num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim), dtype=dtype, device=device)

        k_group, v_group = store_groups(cfg.head_dim, quant_policy)
        self.k = [layer(k_group) for _ in range(cfg.num_layers)]
        self.v = [layer(v_group) for _ in range(cfg.num_layers)]
        self.quant_policy = quant_policy
        self.block_size = block_size
        self.num_blocks = num_blocks
