"""Where a chunk of the W4A16 wgmma kernel's main loop goes (session 30, one H200): the table's configuration
timed as shipped and with parts of the loop taken out, by a patched copy of kernels/w4a16_wgmma.py
(wgmma_chunk_probe.patch beside this file, against the kernel of commit b766a88, read from git: the probe
measures that version; timing only: every variant but "shipped" computes wrong sums):

  x_once      x of the first chunk stored once before the loop: no x load, store, fence or barrier a chunk
  no_dequant  the words moved into the A tile as they are (register moves, no LOP3 / HSUB2 / HMUL2)
  no_wgmma    no wgmma: the dequant kept (its outputs folded by xor into a value that is stored never)

    python bench/probes/wgmma_chunk_probe.py --out bench/results/wgmma_chunk_probe_h200.json [--ms 64,256]

Needs a Hopper GPU, Gluon, `patch` and the repository's git history. Median µs of CUDA-graph replays rotating over enough weight copies to miss
L2 (bench_w4a16.time_graph), as bench/bench_w4a16_mma.py times the kernels.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench_w4a16 import GROUP, _quant_set, time_graph  # noqa: E402

from lmc.kernels import w4a16 as W  # noqa: E402
from lmc.kernels import w4a16_mma as MM  # noqa: E402

SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))  # (K, N): qkv, wo, gate/up (SiLU), w2
VARIANTS = {"shipped": (False, 0), "x_once": (True, 0), "x_once_no_dequant": (True, 1), "x_once_no_wgmma": (True, 2),
            "no_dequant": (False, 1), "no_wgmma": (False, 2)}  # name -> (x_once, probe)


BASE = "b766a88"  # the kernel version the patch applies to (the one the probe measured)


def probe_module(tmp: Path):
    """kernels/w4a16_wgmma.py of BASE patched with wgmma_chunk_probe.patch, imported as a module of its own."""
    src = tmp / "wgmma_probe.py"
    src.write_text(subprocess.run(["git", "-C", str(HERE.parents[1]), "show", f"{BASE}:kernels/w4a16_wgmma.py"],
                                  capture_output=True, text=True, check=True).stdout)
    subprocess.run(["patch", "-s", str(src), str(HERE / "wgmma_chunk_probe.patch")], check=True)
    spec = importlib.util.spec_from_file_location("wgmma_probe", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="64,256")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("bench/probes/wgmma_chunk_probe.py needs a Hopper GPU (sm_90)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            P = probe_module(Path(tmp))
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"bench/probes/wgmma_chunk_probe.py: cannot build the probe from {BASE} ({e}); run it in a git "
                  "checkout of lmc with `patch` installed", file=sys.stderr)
            return 2
        out = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "rows": []}
        for m in (int(v) for v in args.ms.split(",")):
            for k, n in SHAPES:
                silu = n == 28672
                _, cfg = W.w4a16_config(m, n, k, torch.device("cuda"), mma=True)
                if "rows" not in cfg:  # the table runs another kernel there: the wgmma kernel's plain default
                    cfg = {"rows": 16 if m <= 16 else 64, "split_k": 4, "pipeline": True, "ahead": 4}
                sets = max(2, math.ceil(300e6 / (k * n // 2)))  # weight copies: 300 MB, past L2
                weights = []
                for _ in range(sets):
                    _, q, s, z = _quant_set(k, n, "cuda")
                    weights.append(MM.mma_layout(q, s, z, GROUP, silu))
                x = torch.randn(m, k, device="cuda").half()  # [M, K]
                row = {"M": m, "K": k, "N": n, "config": cfg}
                for name, (once, probe) in VARIANTS.items():
                    row[name + "_us"] = round(time_graph(
                        lambda i: P.w4a16_wgmma_triton(x, *weights[i], GROUP, silu_mul=silu, x_once=once, probe=probe,
                                                       **cfg), sets), 2)
                print(json.dumps(row), flush=True)
                out["rows"].append(row)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
