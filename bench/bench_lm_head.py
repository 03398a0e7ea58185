"""What an int4 lm_head would save: the Llama-3-8B lm_head product (K 4096, N 128,256) in fp16 and in int4 g128.

    python bench/bench_lm_head.py [--ms 1,16,64] [--out bench/results/lm_head_h200.json]

lmc keeps the lm_head in float in every workspace (docs/workspace-format.md). This times the product the
decode step runs last, x [M, 4096] @ lm_head^T, as the model would run it: fp16 through `runtime.model.linear`
(lmc's GEMV where this GPU's table has the shape, cuBLAS otherwise) and int4 through `w4a16_matmul` with the
mma layout where the table has mma entries (the table's nearest shape: no entry was tuned for this N). One
weight copy each: 1.05 GB (fp16) and 0.28 GB (int4) are far past L2, so every call reads from DRAM. Medians of
CUDA-graph replays (bench_w4a16.time_graph). Needs a CUDA GPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import GROUP, _nbytes, _quant_set, _rel, copy_bandwidth, gpu_bench_start, time_graph  # noqa: E402

from lmc.kernels import w4a16 as W  # noqa: E402
from lmc.kernels.w4a16_mma import mma_eligible, mma_layout  # noqa: E402
from lmc.runtime.model import Int4Weight, linear, mma_wanted  # noqa: E402

K, V = 4096, 128256  # Llama-3-8B hidden size, vocabulary


def main() -> int:
    started = gpu_bench_start(__doc__, (1, 16, 64), "bench/results/lm_head.json", K=K, N=V, group_size=GROUP)
    if started is None:
        return 2
    args, report = started
    report["copy"] = copy_bandwidth("cuda")
    dev = torch.device("cuda")
    _, q, s, z = _quant_set(K, V, "cuda")
    mma = mma_layout(q, s, z, GROUP) if mma_wanted(dev, torch.float16, K, V, GROUP, False) else None
    int4 = Int4Weight(q, s, z, GROUP, mma)
    dense = W.dequantize_int4_ref(q, s, z, GROUP, K).t().contiguous().half()  # [V, K]
    int4_bytes, dense_bytes = _nbytes(q, s, z), _nbytes(dense)
    report["mma_layout"] = mma is not None and mma_eligible(K, V, GROUP)
    for m in args.ms:
        x = torch.randn(m, K, device=dev).half()
        ref = x.float() @ dense.float().t()  # [M, V]
        row = {"M": m, "int4_path": W.w4a16_config(m, V, K, dev, mma is not None)}
        for name, weight, nbytes in (("fp16", dense, dense_bytes), ("int4", int4, int4_bytes)):
            err = _rel(linear(x, weight), ref)
            us = time_graph(lambda i: linear(x, weight), 1)
            row[name] = {"us": us, "rel_err": err, "weight_bytes": nbytes, "bytes_per_s": nbytes / (us * 1e-6)}
        row["int4_saves_us"] = row["fp16"]["us"] - row["int4"]["us"]
        report["rows"].append(row)
        print(f"M={m}: fp16 {row['fp16']['us']:.1f} us ({row['fp16']['bytes_per_s'] / 1e12:.2f} TB/s), int4 "
              f"{row['int4']['us']:.1f} us ({row['int4']['bytes_per_s'] / 1e12:.2f} TB/s, {row['int4_path'][0]}), "
              f"rel err {row['fp16']['rel_err']:.1e} / {row['int4']['rel_err']:.1e}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
