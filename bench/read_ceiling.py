"""What one kernel can do with a linear's bytes: a pure read of exactly the bytes the M = 1 W4A16 kernel streams
(the mma layout's words and sz), timed the way the W4A16 benches time the kernels (CUDA-graph replays of
back-to-back calls over enough copies to miss L2); compare with bench_w4a16_mma.py's times of the same shapes.

Why: issue 15 asks for M = 1 at >= 85 % of copy bandwidth, where "copy" is a 1 GiB device-to-device copy
(bench_w4a16.copy_bandwidth). A 4-60 MB read in one launch also pays the launch, the ramp-up and the tail; this
measures that floor, so that a kernel's time splits into what any reader of its bytes pays and what the kernel
adds (its x loads, dequant and products, split-K sums).

    python bench/read_ceiling.py [--shapes 8b|tp2|both] [--out bench/results/read_ceiling.json] [--hot-l2]
    TRITON_INTERPRET=1 python bench/read_ceiling.py --smoke     # CPU: the kernel's result is checked

The reader: `programs` programs (a multiple of the SM count, or one per 64 KiB), each summing its share of
the buffer in 16-byte lanes (num_stages 3, Triton's pipeliner), one int32 out a program. With PDL on (as the
W4A16 kernels launch) it waits for the kernel before it only at its store (the buffer is constant data: the PDL
contract in lmc.kernels.pdl lets such reads run before the wait), the most overlap any kernel could get; the no-PDL
column is a plain launch.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from lmc.kernels.pdl import pdl_launch, pdl_wait

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import SHAPES, SMOKE_SHAPES, TP2_SHAPES, _sets, copy_bandwidth, environment, time_calls  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _read_kernel(src_ptr, out_ptr, n, share, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program p sums int32 src[p * share, (p + 1) * share) (share a multiple of BLOCK; wrapping) into out[p]."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    start = pid * share
    for i in tl.range(start, tl.minimum(start + share, n), BLOCK, num_stages=3):
        acc += tl.load(src_ptr + i + offs, mask=i + offs < n, other=0)
    pdl_wait(PDL)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_launch(src: torch.Tensor, out: torch.Tensor, programs: int, warps: int, pdl: bool) -> torch.Tensor:
    """The wrapping int32 sum of each program's share of src [n] into out [programs]."""
    n = src.numel()
    block = 4 * 32 * warps  # 16 bytes a lane
    share = triton.cdiv(triton.cdiv(n, programs), block) * block
    kw = pdl_launch(src.device) if pdl else {"PDL": False}
    _read_kernel[(triton.cdiv(n, share),)](src, out, n, share, BLOCK=block, num_warps=warps, num_stages=1, **kw)
    return out


def share_sums(buf: torch.Tensor, programs: int, warps: int) -> torch.Tensor:
    """What read_launch(buf, ...) stores for each program that has a share: the int32 (wrapping) sum of its share,
    as int64 [launched]; summed in place (int64 accumulation of int32 views), no copy of the buffer."""
    block = 128 * warps
    share = -(-(-(-buf.numel() // programs)) // block) * block
    full = buf.numel() // share
    sums = [buf[:full * share].view(full, share).sum(1, dtype=torch.int64)]  # [full]
    if buf.numel() % share:
        sums.append(buf[full * share:].sum(dtype=torch.int64).view(1))  # the last, short share
    return (torch.cat(sums) + 2**31) % 2**32 - 2**31  # int32 wrap-around


def layout_bytes(k: int, n: int) -> int:
    """The mma layout's bytes of a [K, N] int4 g128 weight: words K N / 2 and sz (4 bytes a column a group)."""
    return k * n // 2 + (k // 128) * n * 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=("8b", "tp2", "both"), default="both")
    ap.add_argument("--out", default="bench/results/read_ceiling.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--hot-l2", action="store_true", help="one buffer for all calls: an L2-resident read where it fits")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench/read_ceiling.py needs CUDA (or --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if args.smoke else {"8b": SHAPES, "tp2": TP2_SHAPES, "both": SHAPES + TP2_SHAPES}[args.shapes]
    report = {"env": environment(dev), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "copy": copy_bandwidth(dev), "hot_l2": args.hot_l2, "rows": []}
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 2
    print(f"{report['env']['device']}: copy {report['copy']['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    for k, n in shapes:
        nbytes = layout_bytes(k, n)
        bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=dev)
                for _ in range(1 if args.hot_l2 and dev == "cuda" else _sets(nbytes, dev))]
        row = {"K": k, "N": n, "bytes": nbytes, "configs": []}
        for pdl in (True, False):
            for programs in sorted({sms, 2 * sms, 4 * sms, 8 * sms, max(1, nbytes >> 16)}):
                for warps in (4, 8):
                    outs = [torch.empty(programs, dtype=torch.int32, device=dev) for _ in bufs]
                    fn = (lambda i, p=programs, w=warps, d=pdl: read_launch(bufs[i], outs[i], p, w, d))
                    got = fn(0)
                    want = share_sums(bufs[0], programs, warps)
                    assert torch.equal(got[:len(want)].long(), want), "the read kernel's sum is wrong"
                    us = time_calls(fn, len(bufs), dev)
                    row["configs"].append({"pdl": pdl, "programs": programs, "warps": warps, "us": us,
                                           "bytes_per_s": nbytes / (us * 1e-6)})
        for pdl in (True, False):
            best = min((c for c in row["configs"] if c["pdl"] == pdl), key=lambda c: c["us"])
            row["best_pdl" if pdl else "best_plain"] = best
        print(f"K={k} N={n} {nbytes / 1e6:.1f} MB: read {row['best_pdl']['us']:.2f} us with PDL "
              f"({row['best_pdl']['bytes_per_s'] / 1e12:.2f} TB/s), {row['best_plain']['us']:.2f} us plain", flush=True)
        report["rows"].append(row)
        del bufs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
