"""The decode argmax (kernels/argmax.py) alone: µs per call at the 8B vocabulary for the engine's batch sizes, at
each programs-an-SM setting, CUDA-graph timed; each result checked against torch.argmax first.

    python bench/bench_argmax.py [--batches 1,16,64,256] [--per-sm 2,8] [--out bench/results/argmax.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmc.kernels import argmax as A  # noqa: E402

VOCAB = 128256  # Llama-3's


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--per-sm", default="2,8", help="comma-separated PROGRAMS_PER_SM values")
    ap.add_argument("--out", default="bench/results/argmax.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/bench_argmax.py needs CUDA", file=sys.stderr)
        return 2
    import triton

    shipped, rows = A.PROGRAMS_PER_SM, []
    try:
        for b in (int(v) for v in args.batches.split(",")):
            x = torch.randn(b, VOCAB, device="cuda")  # [B, V] float32
            row = {"batch": b, "us": {}}
            for per in (int(v) for v in args.per_sm.split(",")):
                A.PROGRAMS_PER_SM = per
                assert torch.equal(A.argmax_rows_triton(x), x.argmax(-1)), (b, per)
                row["us"][per] = triton.testing.do_bench_cudagraph(lambda: A.argmax_rows_triton(x), rep=50) * 1e3
            rows.append(row)
            print(f"argmax B={b}: " + ", ".join(f"{p}/SM {us:.2f} us" for p, us in row["us"].items()), flush=True)
    finally:
        A.PROGRAMS_PER_SM = shipped
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "vocab": VOCAB,
                                          "command": " ".join(["bench/bench_argmax.py", *sys.argv[1:]]),
                                          "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
