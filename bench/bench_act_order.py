"""What act-order costs on the GPU: each piece of a Llama-3-8B layer that changes, with and without it.

    python bench/bench_act_order.py [--ms 1,16,64,256] [--out bench/results/act_order_h200.json]

An act-order workspace (GPTQ desc_act, docs/workspace-format.md format version 3) changes three things in a
layer (runtime/model.py): the two RMSNorms give their output in the column order w_qkv and w13 read (loading
the row at those columns: `columns`, kernels/rmsnorm.py), wo gathers its input (kernels/gather.py, then the int4
kernel), and w2 costs nothing (convert stores w13's rows in its order). This times each through the runtime's own functions,
without against with, as medians of CUDA-graph replays (bench_w4a16.time_graph; wo over weight copies that
miss L2), and adds them up per layer. Needs a CUDA GPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import GROUP, _nbytes, _quant_set, _sets, gpu_bench_start, time_graph  # noqa: E402

from lmc.kernels.w4a16_mma import mma_layout  # noqa: E402
from lmc.kernels.rmsnorm import rms_norm  # noqa: E402
from lmc.runtime.model import Int4Weight, linear, mma_wanted  # noqa: E402


def weights(k: int, n: int, perm: torch.Tensor | None, dev) -> list[Int4Weight]:
    """Copies of one int4 linear [N, K] (enough that each timed call reads from DRAM), as the runtime loads them."""
    one = _quant_set(k, n, dev)[1:]
    out = []
    for q, s, z in [one] + [_quant_set(k, n, dev)[1:] for _ in range(_sets(_nbytes(*one), "cuda") - 1)]:
        mma = mma_layout(q, s, z, GROUP) if mma_wanted(dev, torch.float16, k, n, GROUP, False) else None
        out.append(Int4Weight(q, s, z, GROUP, mma, perm=perm))
    return out


def main() -> int:
    started = gpu_bench_start(__doc__, (1, 16, 64, 256), "bench/results/act_order.json", group_size=GROUP)
    if started is None:
        return 2
    args, report = started
    dev = torch.device("cuda")
    h = 4096  # Llama-3-8B: hidden 4096 (the norms, wo's N), wo K = 32 heads x 128
    perm = torch.randperm(h, device=dev).to(torch.int32)  # [K]
    norm_w = torch.rand(h, device=dev).half() + 0.5  # [H]
    plain, permuted = weights(h, h, None, dev), weights(h, h, perm, dev)
    for m in args.ms:
        x, res = torch.randn(m, h, device=dev).half(), torch.randn(m, h, device=dev).half()  # [M, H]
        y, _ = rms_norm(x, norm_w, 1e-5, res)
        y_perm, _ = rms_norm(x, norm_w, 1e-5, res, perm)
        torch.testing.assert_close(y_perm, y[:, perm.long()], rtol=1e-3, atol=1e-3)  # the gather it replaces
        w0 = permuted[0]  # wo: the same words without the perm, fed the gathered x by hand: the same output
        want = linear(x.index_select(-1, perm), Int4Weight(w0.qweight, w0.scales, w0.zeros, GROUP, w0.mma))
        torch.testing.assert_close(linear(x, w0), want, rtol=1e-3, atol=1e-3)
        row = {"M": m,
               "norm_us": time_graph(lambda i: rms_norm(x, norm_w, 1e-5, res), 1),
               "norm_columns_us": time_graph(lambda i: rms_norm(x, norm_w, 1e-5, res, perm), 1),
               "wo_us": time_graph(lambda i: linear(x, plain[i]), len(plain)),
               "wo_gather_us": time_graph(lambda i: linear(x, permuted[i]), len(permuted))}
        row["layer_extra_us"] = 2 * (row["norm_columns_us"] - row["norm_us"]) + row["wo_gather_us"] - row["wo_us"]
        report["rows"].append(row)
        print(f"M={m}: norm {row['norm_us']:.2f} -> {row['norm_columns_us']:.2f} us, wo {row['wo_us']:.2f} -> "
              f"{row['wo_gather_us']:.2f} us; a layer +{row['layer_extra_us']:.2f} us", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
