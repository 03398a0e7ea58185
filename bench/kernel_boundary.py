"""What one kernel of a decode chain costs before its work: a CUDA graph of dependent launches of trivial kernels.

Each launch reads the previous launch's output row (x, [4096] float16, as a linear reads the normed hidden
state), adds 1 and writes its own row; optionally it first streams `mb` MiB of a weight buffer (each launch its own
slice of a buffer larger than L2, so every byte comes from memory), as a batch-1 linear does. Launched with and
without PDL (kernels/pdl.py: the wait after the weight stream, as the runtime's kernels do), over 1, 132 or 264
programs. Prints µs a launch; the session-20 ablation measured ~4.5 µs of fixed cost per linear in the 8B step.
--handoff also times the alternative a persistent kernel would use: the same links inside one launch, every
program arriving at a counter and waiting for the others (not yet run on a GPU: written after session 20's last
device call).
The stream is a plain loop with one 4 KB load in flight a program (0.9-1.7 TB/s on an H200), not a tuned
linear's: the rows without weights (the cost of a dependent launch itself) are the point.

    python bench/kernel_boundary.py --out bench/results/kernel_boundary_h200.json
    python bench/kernel_boundary.py --handoff --mb 0 --programs 1,66,132 --out /tmp/handoff.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import versions  # noqa: E402

from lmc.kernels.pdl import pdl_launch, pdl_wait  # noqa: E402

HIDDEN = 4096


@triton.jit
def _link_kernel(x_ptr, y_ptr, w_ptr, w_words, zero, HIDDEN: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr):
    """y = x + 1 (+ zero * the sum of this program's share of w: zero is 0 at run time, so the stream cannot be
    dropped by the compiler)."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    acc = tl.zeros((BLOCK_W,), dtype=tl.int32)
    if w_words > 0:  # the program's share of the weight words, BLOCK_W at a time (constant data: before the wait)
        share = tl.cdiv(w_words, progs)
        for start in range(pid * share, tl.minimum(w_words, (pid + 1) * share), BLOCK_W):
            offs = start + tl.arange(0, BLOCK_W)
            acc += tl.load(w_ptr + offs, mask=offs < w_words, other=0, eviction_policy="evict_first")
    pdl_wait(PDL)
    cols = tl.arange(0, HIDDEN)
    mine = cols % progs == pid  # each program writes its columns of the row
    x = tl.load(x_ptr + cols, mask=mine)
    y = (x.to(tl.float32) + 1.0 + (tl.sum(acc) * zero).to(tl.float32)).to(tl.float16)
    tl.store(y_ptr + cols, y, mask=mine)


def graph_us(run, replays: int) -> float:
    """µs per replay of a CUDA graph of what `run` launches (already compiled and run once)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


@triton.jit
def _handoff_kernel(rows_ptr, counters_ptr, LINKS: tl.constexpr, HIDDEN: tl.constexpr):
    """LINKS links in one launch: at link j every program reads all of row j (every program wrote a part of it at
    link j - 1, as a linear needs all of x), writes its columns of row j + 1 (= row j + 1), arrives at
    counters[j + 1] and spins until every program has: a grid-wide hand-off where the chain has a kernel
    boundary. Every program must be resident at once (the caller launches at most one per SM)."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols = tl.arange(0, HIDDEN)
    mine = cols % progs == pid
    for j in range(LINKS):
        x = tl.load(rows_ptr + j * HIDDEN + cols, cache_modifier=".cg")  # [HIDDEN] past L1: the others' writes
        tl.store(rows_ptr + (j + 1) * HIDDEN + cols, (x.to(tl.float32) + 1.0).to(tl.float16), mask=mine)
        tl.debug_barrier()  # every thread's stores are issued before the program arrives
        tl.atomic_add(counters_ptr + j + 1, 1, sem="release")
        while tl.atomic_add(counters_ptr + j + 1, 0, sem="acquire") < progs:
            pass


def handoff_us(programs: int, links: int = 128, replays: int = 20) -> float:
    """µs per link of `_handoff_kernel` (the graph's memset and single launch spread over its links)."""
    dev = torch.device("cuda")
    rows = torch.zeros((links + 1, HIDDEN), dtype=torch.float16, device=dev)  # [links + 1, H]
    counters = torch.zeros(links + 1, dtype=torch.int32, device=dev)

    def run():
        counters.zero_()
        _handoff_kernel[(programs,)](rows, counters, LINKS=links, HIDDEN=HIDDEN, num_warps=4)

    run()
    torch.cuda.synchronize()
    assert float(rows[-1, 0]) == links, "the hand-off lost an update"  # row j holds j (fp16 is exact to 2048)
    return graph_us(run, replays) / links


def chain_us(programs: int, mb: float, pdl: bool, launches: int = 128, replays: int = 20) -> float:
    """µs per launch of a graph of `launches` dependent links."""
    dev = torch.device("cuda")
    rows = [torch.zeros(HIDDEN, dtype=torch.float16, device=dev) for _ in range(2)]
    words = int(mb * 2**20 / 4)
    weights = torch.ones(max(words, 1) * launches, dtype=torch.int32, device=dev)  # each link its own slice
    launch = pdl_launch(dev) if pdl else {"PDL": False}

    def run():
        for i in range(launches):
            _link_kernel[(programs,)](rows[i % 2], rows[(i + 1) % 2], weights[i * words:], words, 0, HIDDEN=HIDDEN,
                                      BLOCK_W=1024, num_warps=4, **launch)

    run()  # compile
    torch.cuda.synchronize()
    return graph_us(run, replays) / launches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--programs", default="1,132,264")
    ap.add_argument("--mb", default="0,4,8,16", help="MiB of weights each link streams (0: none)")
    ap.add_argument("--handoff", action="store_true", help="also time a grid-wide hand-off inside one launch "
                    "(counters, every program resident) at each --programs up to the SM count")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for programs in (int(p) for p in args.programs.split(",")) if args.handoff else ():
        if programs > sms:  # a spinning program that is not resident would wait for ever
            print(f"  hand-off: {programs} programs skipped (every program must be resident: at most {sms})")
        else:
            us = handoff_us(programs)
            rows.append({"handoff": True, "programs": programs, "us_per_link": round(us, 3)})
            print(f"  hand-off in one launch  {programs:4d} programs  {us:8.3f} us a link", flush=True)
    for mb in (float(m) for m in args.mb.split(",")):
        for programs in (int(p) for p in args.programs.split(",")):
            for pdl in (False, True):
                us = chain_us(programs, mb, pdl)
                gbs = mb * 2**20 / (us * 1e-6) / 1e9 if mb else None
                rows.append({"mb": mb, "programs": programs, "pdl": pdl, "us_per_launch": round(us, 3),
                             "gb_s": round(gbs, 1) if gbs else None})
                print(f"  {mb:5.1f} MiB  {programs:4d} programs  pdl {int(pdl)}  {us:8.3f} us a launch"
                      + (f"  {gbs:7.1f} GB/s" if gbs else ""), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "versions": versions(),
                                          "command": " ".join(sys.argv), "hidden": HIDDEN, "rows": rows},
                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
