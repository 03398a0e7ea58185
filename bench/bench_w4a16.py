"""Benchmark lmc's W4A16 kernel against fp16 cuBLAS and torch._weight_int4pack_mm on one GPU.

    python bench/bench_w4a16.py [--out bench/results/w4a16_kernels.json]
    python bench/bench_w4a16.py --sweep [--sweep-ms 1,4,16] [--out ...]   # time candidate block shapes
    python bench/bench_w4a16.py --configs SWEEP.json    # time each (M, shape) with its best sweep config

Per Llama-3-8B linear shape (K x N) and M, it (a) checks lmc against the float32 reference
(relative error <= 1e-2, every output written), (b) times lmc (fp16), F.linear (fp16 cuBLAS) and
torch._weight_int4pack_mm (bf16: the only activation dtype its CUDA kernel takes; group 128) and
reports achieved bytes/s, (c) measures device-to-device copy bandwidth, (d) writes JSON and prints
a table last. Times are medians of CUDA-graph replays of back-to-back calls that rotate over enough
weight/input copies to exceed L2 several times (decode runs under CUDA graphs too); a second column
gives triton.testing.do_bench's median (L2 flushed before each call, launch included).
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lmc.format.int4 import pack_lmc
from lmc.kernels import w4a16 as W
from lmc.kernels.pdl import pdl_enabled

SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))  # (K, N): qkv, o, gate+up, down
MS = (1, 4, 16, 64, 256, 2048)
GROUP = 128
ROTATE_BYTES = 256 << 20  # every timed call reads data that is not in L2 (50 MB on H100)


def _int4pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, high_first: bool):
    """torch._weight_int4pack_mm operands from the same codes: uint8 [N, K/2] -> tinygemm layout, and
    [K/G, N, 2] bf16 (scale, offset) with W = (q - 8) * scale + offset, so offset = (8 - zero) * scale."""
    even, odd = codes[:, 0::2], codes[:, 1::2]  # [N, K/2]
    byte = (even << 4 | odd) if high_first else (odd << 4 | even)
    packed = torch._convert_weight_to_int4pack(byte.to(torch.uint8).contiguous(), 8)
    sz = torch.stack([scales.float(), (8.0 - zeros.float()) * scales.float()], dim=-1)  # [K/G, N, 2]
    return packed, sz.to(torch.bfloat16).contiguous()


def _quant_set(k: int, n: int, dev):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)  # [N, K]
    scales = (torch.rand(k // GROUP, n, device=dev) * 0.01 + 0.002).half()  # [K/G, N]
    zeros = torch.randint(0, 16, (k // GROUP, n), device=dev).half()  # [K/G, N]
    return codes, pack_lmc(codes), scales, zeros


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def time_graph(fn, n_sets: int, min_calls: int = 24, replays: int = 15) -> float:
    """Median µs per call over CUDA-graph replays of back-to-back calls fn(0), fn(1), ... (mod n_sets)."""
    calls = n_sets * max(1, math.ceil(min_calls / n_sets))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(n_sets, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_sets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def time_do_bench(fn, n_sets: int) -> float:
    import triton.testing

    state = {"i": 0}

    def step():
        fn(state["i"] % n_sets)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median") * 1e3


def copy_bandwidth() -> dict:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    import triton.testing

    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return {"bytes": 2 * src.numel(), "us": ms * 1e3, "bytes_per_s": 2 * src.numel() / (ms * 1e-3)}


def environment() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sm_count": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", None), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(),
            "pdl": pdl_enabled(torch.device("cuda")), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


class Shape:
    """Rotating operand sets for one (K, N): lmc int4, fp16 dense, torch int4pack."""

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        codes, q, s, z = _quant_set(k, n, "cuda")
        self.q_bytes = _nbytes(q, s, z)
        self.n_q = max(2, min(64, math.ceil(ROTATE_BYTES / self.q_bytes)))
        self.lmc = [(q, s, z)] + [_quant_set(k, n, "cuda")[1:] for _ in range(self.n_q - 1)]
        self.dense0 = W.dequantize_int4_ref(q, s, z, GROUP, k).t().contiguous().half()  # [N, K]
        self.n_d = max(2, math.ceil(ROTATE_BYTES / _nbytes(self.dense0)))
        self.dense = [self.dense0] + [torch.randn_like(self.dense0) * 0.02 for _ in range(self.n_d - 1)]
        # the nibble order _convert_weight_to_int4pack expects is checked, not assumed: keep the one that matches
        x = torch.randn(16, k, device="cuda")
        ref = W.w4a16_matmul_ref(x, q, s, z, GROUP)
        tries = []
        for high_first in (True, False):
            packed, sz = _int4pack(codes, s, z, high_first)
            out = torch._weight_int4pack_mm(x.bfloat16(), packed, GROUP, sz)
            tries.append((_rel(out, ref), high_first, packed, sz))
        self.tp_err, high_first, *tp0 = min(tries, key=lambda t: t[0])
        self.tp_order = "even k in high nibble" if high_first else "even k in low nibble"
        self.tp_bytes = _nbytes(*tp0)
        self.n_t = max(2, min(64, math.ceil(ROTATE_BYTES / self.tp_bytes)))
        self.tp = [tuple(tp0)] + [_int4pack(c, s_, z_, high_first)
                                  for c, _, s_, z_ in (_quant_set(k, n, "cuda") for _ in range(self.n_t - 1))]


def lmc_launch(m: int, k: int, n: int, overrides: dict):
    """The lmc call timed for an [M, K] x [K, N] product: w4a16_matmul (its table), or a launcher with the
    configuration that --configs names for this (M, K, N)."""
    if (m, k, n) not in overrides:
        return W.w4a16_matmul, W.w4a16_config(m, n, k)
    path, kw = overrides[(m, k, n)]
    launch = W.w4a16_gemv_triton if path == "gemv" else W.w4a16_gemm_triton
    return (lambda x, q, s, z, g, out=None: launch(x, q, s, z, g, out=out, **kw)), (path, kw)


def check(shape: Shape, m: int, overrides: dict) -> dict:
    q, s, z = shape.lmc[0]
    x = torch.randn(m, shape.k, device="cuda").half()
    ref = W.w4a16_matmul_ref(x, q, s, z, GROUP).float()  # [M, N]
    out = torch.full((m, shape.n), float("nan"), dtype=torch.float16, device="cuda")
    lmc_launch(m, shape.k, shape.n, overrides)[0](x, q, s, z, GROUP, out=out)
    torch.cuda.synchronize()
    err = _rel(out, ref)
    written = bool(torch.isfinite(out).all())
    return {"rel_err": err, "all_written": written, "ok": written and err <= 1e-2}


def bench_m(shape: Shape, m: int, overrides: dict, do_bench: bool = True) -> dict:
    k, n = shape.k, shape.n
    xs = [torch.randn(m, k, device="cuda").half() for _ in range(max(shape.n_q, shape.n_d))]
    xb = [x.bfloat16() for x in xs[:shape.n_t]]
    lmc, (path, kw) = lmc_launch(m, k, n, overrides)
    fns = {
        "lmc": (lambda i: lmc(xs[i], *shape.lmc[i], GROUP), shape.n_q, shape.q_bytes),
        "fp16_linear": (lambda i: F.linear(xs[i], shape.dense[i]), shape.n_d, _nbytes(shape.dense0)),
        "int4pack_mm": (lambda i: torch._weight_int4pack_mm(xb[i], shape.tp[i][0], GROUP, shape.tp[i][1]),
                        shape.n_t, shape.tp_bytes),
    }
    io_bytes = _nbytes(xs[0]) + m * n * 2
    row = {"M": m, "K": k, "N": n, "lmc_path": path, "lmc_config": kw}
    for name, (fn, n_sets, w_bytes) in fns.items():
        us = time_graph(fn, n_sets)
        row[name] = {"us": us, "bytes": w_bytes + io_bytes, "bytes_per_s": (w_bytes + io_bytes) / (us * 1e-6)}
        if do_bench:
            row[name]["us_do_bench"] = time_do_bench(fn, n_sets)
    return row


# ----------------------------------------------------------------------------- sweep


def _gemm(tiles, group_m: int = 8, **extra) -> list:
    """("gemm", launcher keywords) per (block_m, block_n, block_k, num_warps, num_stages, split_k) tile."""
    return [("gemm", dict(block_m=bm, block_n=bn, block_k=bk, group_m=group_m, split_k=sk, num_warps=nw,
                          num_stages=ns, **extra)) for bm, bn, bk, nw, ns, sk in tiles]


def _candidates(m: int, depths=("1", "2")):
    """(path, launcher keywords) to time at M = m; depths: the GEMV's groups in flight, "1p" for depth 1 with
    preload (two groups requested before the PDL wait)."""
    out = []
    if m <= 8:  # the CUDA-core GEMV: block of N, warps, split of K, groups in flight, rows of x per program
        row_options = (1,) if m == 1 else (2,) if m == 2 else (1, 2, 4)  # M=4: shared dequant vs more programs
        # words per thread and step: (G/8) * BN / (32 * num_warps); fewer words, more warps per SM
        for bn, nw in ((16, 1), (32, 1), (16, 2), (32, 2), (64, 2), (32, 4), (64, 4), (64, 8), (128, 8)):
            for sk in ((1, 2, 4, 8, 16) if m == 1 else (1, 2, 4, 8)):
                for depth in depths:
                    for rows in row_options:
                        extra = dict(preload=True) if depth.endswith("p") else {}
                        out.append(("gemv", dict(block_n=bn, rows=rows, split_k=sk, depth=int(depth.rstrip("p")),
                                                 num_warps=nw, **extra)))
        if m == 1:  # the float32 path at one shape, for the record
            out.append(("gemv", dict(block_n=32, rows=1, split_k=4, num_warps=1, dot_asm=False)))
    # GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split_k); swap_ab: W x^T, BLOCK_N is wgmma's M side
    if 1 < m <= 16:
        out += _gemm(((16, 32, 256, 4, 3, 1), (16, 32, 256, 4, 3, 2), (16, 32, 256, 4, 3, 4), (16, 64, 256, 4, 3, 2),
                      (16, 64, 256, 4, 3, 4), (16, 64, 256, 4, 3, 8), (16, 128, 128, 4, 4, 4), (16, 128, 128, 4, 4, 8),
                      (16, 32, 128, 4, 4, 4), (16, 64, 128, 4, 4, 4)), group_m=1)
        out += _gemm(((16, 64, 128, 4, 3, 1), (16, 64, 128, 4, 3, 2), (16, 64, 128, 4, 3, 4), (16, 64, 128, 4, 4, 8),
                      (16, 64, 256, 4, 3, 2), (16, 64, 256, 4, 3, 4), (16, 128, 128, 4, 3, 1), (16, 128, 128, 4, 3, 2),
                      (16, 128, 128, 4, 3, 4), (16, 128, 64, 4, 4, 4)), group_m=1, swap_ab=True)
    if 16 < m <= 64:
        out += _gemm(((64, 64, 256, 4, 3, 1), (64, 64, 256, 4, 3, 2), (64, 64, 256, 4, 3, 4), (64, 128, 128, 4, 4, 2),
                      (64, 128, 128, 4, 4, 4), (128, 128, 64, 8, 3, 2), (64, 128, 64, 4, 4, 4)))
        out += _gemm(((32, 64, 128, 4, 3, 1), (32, 64, 128, 4, 3, 2), (32, 64, 128, 4, 3, 4), (64, 64, 128, 4, 3, 1),
                      (64, 64, 128, 4, 3, 2), (64, 64, 128, 4, 3, 4), (64, 128, 64, 4, 4, 2), (64, 128, 64, 4, 4, 4),
                      (64, 128, 128, 8, 3, 2)), swap_ab=True)
    if m > 64:
        out += _gemm(((128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (128, 128, 64, 8, 3, 4),
                      (128, 128, 128, 8, 3, 2), (64, 128, 128, 4, 4, 1), (64, 128, 128, 4, 4, 2), (256, 128, 64, 8, 3, 1)))
        out += _gemm(((64, 128, 64, 4, 4, 1), (64, 128, 64, 4, 4, 2), (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2),
                      (64, 64, 128, 4, 3, 2), (128, 64, 128, 4, 3, 1)), swap_ab=True)
    return out


def sweep(shapes, ms, budget_s: float, depths=("1", "2")) -> list:
    """Time every candidate of _candidates(m) per (M, shape); stops starting new rows after budget_s."""
    rows, t0 = [], time.time()
    data = {}
    for m in ms:
        for k, n in shapes:
            if time.time() - t0 > budget_s:
                print(f"sweep: budget spent, skipping M={m} K={k} N={n}", flush=True)
                continue
            if (k, n) not in data:
                copies = max(2, math.ceil(ROTATE_BYTES / (k * n // 2)))
                data[(k, n)] = [_quant_set(k, n, "cuda")[1:] for _ in range(copies)]
            sets = data[(k, n)]
            w_bytes = _nbytes(*sets[0])
            xs = [torch.randn(m, k, device="cuda").half() for _ in sets]
            q, s, z = sets[0]
            ref = W.w4a16_matmul_ref(xs[0], q, s, z, GROUP).float()
            results = []
            for path, kw in _candidates(m, depths):
                launch = W.w4a16_gemv_triton if path == "gemv" else W.w4a16_gemm_triton
                try:
                    out = launch(xs[0], q, s, z, GROUP, **kw)
                    err = _rel(out, ref)
                    us = time_graph(lambda i: launch(xs[i], *sets[i], GROUP, **kw), len(sets), replays=7)
                except Exception as e:  # a config the compiler rejects (shared memory, registers) is skipped
                    results.append({"path": path, "config": kw, "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                results.append({"path": path, "config": kw, "us": us, "rel_err": err,
                                "bytes_per_s": (w_bytes + _nbytes(xs[0]) + m * n * 2) / (us * 1e-6)})
            ok = sorted((r for r in results if "us" in r and r["rel_err"] < 1e-2), key=lambda r: r["us"])
            rows.append({"M": m, "K": k, "N": n, "results": results, "best": ok[:3]})
            b = ok[0] if ok else None
            print(f"sweep K={k} N={n} M={m}: " + (f"{b['path']} {b['config']} {b['us']:.1f} us "
                                                    f"{b['bytes_per_s'] / 1e12:.2f} TB/s" if b else "no result"),
                  flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def _depths(value: str) -> tuple[str, ...]:
    depths = tuple(value.split(","))
    if not set(depths) <= {"1", "1p", "2"}:
        raise argparse.ArgumentTypeError(f"depths are 1, 1p or 2, got {value!r}")
    return depths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/w4a16_kernels.json, "
                                                "or w4a16_sweep.json with --sweep)")
    ap.add_argument("--sweep", action="store_true", help="time candidate block shapes instead of the table")
    ap.add_argument("--sweep-ms", type=lambda v: tuple(int(i) for i in v.split(",")), default=(1, 16, 2048, 4, 64, 256),
                    help="--sweep: the M values, comma-separated, most important first")
    ap.add_argument("--budget-s", type=float, default=240.0, help="--sweep: stop starting new rows after this")
    ap.add_argument("--configs", default=None, help="a --sweep JSON: time each (M, K, N) with its best "
                                                     "configuration instead of the table")
    ap.add_argument("--ms", type=lambda v: tuple(int(i) for i in v.split(",")), default=MS,
                    help="the M values of the default run, comma-separated")
    ap.add_argument("--depths", type=_depths, default=("1", "2"),
                    help="--sweep: the GEMV prefetch depths to try, comma-separated; 1p: depth 1 with preload")
    ap.add_argument("--no-do-bench", action="store_true", help="skip the do_bench column (faster)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = {"env": environment(), "group_size": GROUP}
    report["copy"] = copy_bandwidth()
    copy_bw = report["copy"]["bytes_per_s"]
    print(f"{report['env']['device']}: copy {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    if args.sweep:
        report["sweep"] = sweep(SHAPES, args.sweep_ms, args.budget_s, args.depths)
        path = args.out or "bench/results/w4a16_sweep.json"
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        return 0

    overrides = {}
    if args.configs:
        with open(args.configs) as f:
            for r in json.load(f)["sweep"]:
                if r["best"]:
                    overrides[(r["M"], r["K"], r["N"])] = (r["best"][0]["path"], r["best"][0]["config"])
    report["configs"] = args.configs or "table"
    report["checks"], report["rows"] = [], []
    for k, n in SHAPES:
        shape = Shape(k, n)
        report.setdefault("int4pack", []).append({"K": k, "N": n, "nibble_order": shape.tp_order,
                                                  "rel_err_bf16": shape.tp_err})
        for m in args.ms:
            c = check(shape, m, overrides)
            report["checks"].append({"M": m, "K": k, "N": n, **c})
            row = bench_m(shape, m, overrides, do_bench=not args.no_do_bench)
            row["lmc"]["frac_of_copy"] = row["lmc"]["bytes_per_s"] / copy_bw
            report["rows"].append(row)
            print(f"K={k} N={n} M={m}: lmc {row['lmc']['us']:.1f} us ({c['rel_err']:.1e}) "
                  f"fp16 {row['fp16_linear']['us']:.1f} int4pack {row['int4pack_mm']['us']:.1f}", flush=True)
        del shape
        torch.cuda.empty_cache()
    path = args.out or "bench/results/w4a16_kernels.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=1)

    print(f"\n{report['env']['device']}  torch {report['env']['torch']}  triton {report['env']['triton']}  "
          f"copy {copy_bw / 1e12:.2f} TB/s; µs = median of CUDA-graph replays (do_bench median in brackets)")
    print(f"{'K x N':>12} {'M':>5} {'lmc us':>14} {'TB/s':>5} {'%copy':>5} {'fp16 us':>14} {'i4pack us':>14} "
          f"{'vs i4p':>6} {'vs fp16':>7} {'err':>7} path")
    for row, c in zip(report["rows"], report["checks"]):
        lmc, fp, tp = row["lmc"], row["fp16_linear"], row["int4pack_mm"]

        def cell(d):
            return f"{d['us']:7.1f}" + (f" [{d['us_do_bench']:5.1f}]" if "us_do_bench" in d else "")

        print(f"{row['K']:>5}x{row['N']:<6} {row['M']:>5} {cell(lmc):>14} {lmc['bytes_per_s'] / 1e12:5.2f} "
              f"{100 * lmc['frac_of_copy']:5.0f} {cell(fp):>14} {cell(tp):>14} {tp['us'] / lmc['us']:6.2f} "
              f"{fp['us'] / lmc['us']:7.2f} {c['rel_err']:7.1e} {row['lmc_path']}")
    bad = [c for c in report["checks"] if not c["ok"]]
    if bad:
        print(f"FAILED checks: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
