"""Hardware counters for the W4A16 linears the runtime calls, under Nsight Compute (ncu).

Each (M, K, N) runs the tuning table's choice as the runtime calls it (the mma layout where the table has an entry;
gate/up with its SiLU epilogue) a few times to compile and warm up, then once between cudaProfilerStart/Stop, so
that `ncu --profile-from-start off` sees exactly one call of each shape (every kernel of it: the linear and a
split-K merge where there is one). ncu replays each kernel with L2 flushed, as the benches' rotation does.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
        python bench/ncu_w4a16.py --ms 1,16 --shapes 8b > ncu.txt
    TRITON_INTERPRET=1 python bench/ncu_w4a16.py --ms 1 --smoke      # CPU: the calls run (no ncu)
    python bench/ncu_w4a16.py --summarize ncu.txt                      # one JSON row per kernel
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_mma as MM

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import GROUP, SHAPES, SMOKE_SHAPES, TP2_SHAPES, _ints, _quant_set  # noqa: E402

GATE_UP_N = {28672, 14336}  # the gate/up shapes (tp 1, tp 2): called with the SiLU epilogue


def table_call(x: torch.Tensor, q, s, z, frag, silu: bool) -> torch.Tensor:
    matmul = W.w4a16_silu_matmul if silu else W.w4a16_matmul
    return matmul(x, q, s, z, GROUP, mma=frag)


METRICS = {"us": "Duration", "dram_pct": "DRAM Throughput", "occupancy_pct": "Achieved Occupancy",
           "registers": "Registers Per Thread", "issue_per_cycle": "Issued Warp Per Scheduler",
           "waves": "Waves Per SM"}


def summarize(text: str) -> list[dict]:
    """One row per profiled kernel of ncu's text report (this script's run: the `M=...` line printed after each
    call names the call): kernel, grid x block, the METRICS it found, and the warp-state rule's main stall
    ("cycles stalled waiting for X" of "cycles between two instructions")."""
    calls = re.findall(r"^(M=\d+ K=\d+ N=\d+(?: silu)?):", text, re.M)
    rows = []
    for i, block in enumerate(re.split(r"\n  (?=_\w+ \()", text)[1:]):
        head = re.match(r"(_\w+) \(([\d, ]+)\)x\(([\d, ]+)\)", block)
        row = {"call": calls[i] if i < len(calls) else None, "kernel": head.group(1),
               "grid": head.group(2).replace(" ", ""), "block": head.group(3).replace(" ", "")}
        for key, name in METRICS.items():
            m = re.search(r"\n\s+" + re.escape(name) + r"\s+(?:\S+\s+)?([\d.,]+)\s*\n", block)
            row[key] = float(m.group(1).replace(",", "")) if m else None
        stall = re.search(r"spends ([\d.]+) cycles being stalled\s+waiting for (?:the |a )?(.+?)\.", block, re.S)
        total = re.search(r"total average of ([\d.]+) cycles", block)
        row["stall"] = {"cycles": float(stall.group(1)), "on": " ".join(stall.group(2).split())} if stall else None
        row["cycles_per_issue"] = float(total.group(1)) if total else None
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", metavar="NCU_TEXT", help="print one JSON row per kernel of an ncu text report")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--shapes", choices=("8b", "tp2"), default="8b")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.summarize:
        try:
            text = Path(args.summarize).read_text()
        except OSError as e:
            print(f"error: cannot read the ncu report {args.summarize}: {e.strerror}", file=sys.stderr)
            return 2
        for row in summarize(text):
            print(json.dumps(row))
        return 0
    dev = "cpu" if args.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench/ncu_w4a16.py needs CUDA (or --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if args.smoke else SHAPES if args.shapes == "8b" else TP2_SHAPES
    device = torch.device(dev) if dev == "cuda" else None
    for k, n in shapes:
        silu = n in GATE_UP_N
        _, q, s, z = _quant_set(k, n, dev)
        frag = MM.mma_layout(q, s, z, GROUP, silu)
        for m in _ints(args.ms):
            x = torch.randn(m, k, device=dev).half()  # [M, K]
            for _ in range(args.warmup):
                table_call(x, q, s, z, frag, silu)
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
            y = table_call(x, q, s, z, frag, silu)  # the profiled call
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
            print(f"M={m} K={k} N={n}{' silu' if silu else ''}: {W.w4a16_config(m, n, k, device, mma=True)} "
                  f"-> {tuple(y.shape)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
