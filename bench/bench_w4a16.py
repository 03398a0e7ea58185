"""Benchmark lmc's W4A16 kernel against fp16 cuBLAS and torch._weight_int4pack_mm; sweep and write its tuning table.

    python bench/bench_w4a16.py [--ms 1,16,64,256,2048] [--out bench/results/w4a16_kernels.json]
    python bench/bench_w4a16.py --sweep [--sweep-ms 1,16,64,256,2048] [--budget-s 240] [--write-table]
    python bench/bench_w4a16.py --configs SWEEP.json    # time each (M, shape) with its best sweep config
    python bench/bench_w4a16.py --sweep --shapes tp2 --sweep-ms 1 --write-table   # one rank's shapes at --tp 2
    TRITON_INTERPRET=1 python bench/bench_w4a16.py --smoke [--sweep --write-table --table /tmp/t.json]  # CPU

Per Llama-3-8B linear shape (K x N) and M, it (a) checks lmc against the float32 reference
(relative error <= 1e-2, every output written), (b) times lmc (fp16), F.linear (fp16 cuBLAS) and
torch._weight_int4pack_mm (bf16: the only activation dtype its CUDA kernel takes; group 128) and
reports achieved bytes/s, (c) measures device-to-device copy bandwidth, (d) writes JSON and prints
a table last. Times are medians of CUDA-graph replays of back-to-back calls that rotate over enough
weight/input copies to exceed L2 several times (decode runs under CUDA graphs too); a second column
gives triton.testing.do_bench's median (L2 flushed before each call, launch included).

--sweep times candidate paths and block shapes per (M, shape), the table's current choice first, within
--budget-s (split evenly over the rows still to do); --write-table merges each row's fastest correct
candidate into the tuning table (kernels/w4a16_tuning.json, or --table) under this GPU's name. K-major
GEMM tiles (qweight re-laid-out [N, K/8]) are timed and reported, never written: the runtime keeps the
stored layout.
--smoke: tiny shapes and host timing, so that every code path runs on a CPU (Triton interpreter).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmc.format.int4 import pack_lmc, unpack_lmc
from lmc.kernels import w4a16 as W
from lmc.kernels import w4a16_tuning as T
from lmc.kernels.pdl import pdl_enabled

SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))  # (K, N): qkv, o, gate+up, down
TP2_SHAPES = ((4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096))  # one rank's share at tp 2 (--shapes tp2)
SMOKE_SHAPES = ((256, 96), (384, 64))  # --smoke: the interpreter runs these in seconds
MS = (1, 4, 16, 64, 256, 2048)
GROUP = 128
ROTATE_BYTES = 256 << 20  # every timed call reads data that is not in L2 (50 MB on H100)


def int4pack_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, high_first: bool):
    """torch._weight_int4pack_mm operands from the same codes [N, K] (0..15): the packed weight (CUDA: uint8
    [N, K/2] with nibble order high_first -> tinygemm layout; CPU: the int32 codes), and [K/G, N, 2] bf16
    (scale, offset) with W = (q - 8) * scale + offset, so offset = (8 - zero) * scale."""
    if codes.is_cuda:
        even, odd = codes[:, 0::2], codes[:, 1::2]  # [N, K/2]
        byte = (even << 4 | odd) if high_first else (odd << 4 | even)
        packed = torch._convert_weight_to_int4pack(byte.to(torch.uint8).contiguous(), 8)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8)
    sz = torch.stack([scales.float(), (8.0 - zeros.float()) * scales.float()], dim=-1)  # [K/G, N, 2]
    return packed, sz.to(torch.bfloat16).contiguous()


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16 on CUDA) times the int4pack weight: [M, N]."""
    if x.is_cuda:
        return torch._weight_int4pack_mm(x, packed, group, sz)
    return torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def int4pack_from_lmc(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, group: int,
                      high_first: bool | None = None):
    """An lmc-int4-k8 linear as torch._weight_int4pack_mm operands (packed, sz) and the nibble order used: None
    tries both on a random x against the float32 reference and keeps the closer (the order is not documented)."""
    codes = unpack_lmc(qweight, k).to(torch.int32)  # [N, K]
    if high_first is not None:
        return (*int4pack_weight(codes, scales, zeros, high_first), high_first)
    x = torch.randn(4, k, device=qweight.device)
    ref = W.w4a16_matmul_ref(x, qweight, scales, zeros, group)  # [4, N]
    tries = []
    for order in (True, False):
        packed, sz = int4pack_weight(codes, scales, zeros, order)
        tries.append((_rel(int4pack_mm(x.bfloat16(), packed, group, sz), ref), order, packed, sz))
    _, order, packed, sz = min(tries, key=lambda t: t[0])
    return packed, sz, order


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


def time_host(fn, n_sets: int, replays: int = 3) -> float:
    """--smoke on a CPU: median µs of single calls timed on the host."""
    fn(0)
    times = []
    for i in range(replays):
        t0 = time.perf_counter()
        fn(i % n_sets)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def time_calls(fn, n_sets: int, dev: str, replays: int = 15) -> float:
    return time_graph(fn, n_sets, replays=replays) if dev == "cuda" else time_host(fn, n_sets)


def time_do_bench(fn, n_sets: int) -> float:
    import triton.testing

    state = {"i": 0}

    def step():
        fn(state["i"] % n_sets)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median") * 1e3


def copy_bandwidth(dev: str) -> dict:
    """Bytes read + written per second by a large device-to-device copy (64 MiB on a CPU)."""
    src = torch.empty((1 << 30) if dev == "cuda" else (64 << 20), dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    if dev == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    else:
        ms = time_host(lambda i: dst.copy_(src), 1) / 1e3
    return {"bytes": 2 * src.numel(), "us": ms * 1e3, "bytes_per_s": 2 * src.numel() / (ms * 1e-3)}


def gpu_bench_start(doc: str, ms: tuple[int, ...], out: str, **head):
    """A one-GPU bench's `--ms` / `--out` arguments and its report's head (env, command, then `head`), seeded; None
    (after saying so) without CUDA."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--ms", type=_ints, default=ms)
    ap.add_argument("--out", default=out)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return None
    torch.manual_seed(0)
    command = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    return args, {"env": environment("cuda"), "command": command, **head, "rows": []}


def environment(dev: str) -> dict:
    import triton

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if dev != "cuda":
        return {"device": f"cpu ({platform.machine()}, smoke)", **env}
    p = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sm_count": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", None), **env, "pdl": pdl_enabled(torch.device("cuda"))}


def _sets(one_bytes: int, dev: str, most: int = 64) -> int:
    """Operand copies to rotate over so that every timed call misses L2 (2 on a CPU)."""
    return max(2, min(most, math.ceil(ROTATE_BYTES / one_bytes))) if dev == "cuda" else 2


class Shape:
    """Rotating operand sets for one (K, N): lmc int4, fp16 dense, torch int4pack."""

    def __init__(self, k: int, n: int, dev: str):
        self.k, self.n, self.dev = k, n, dev
        codes, q, s, z = _quant_set(k, n, dev)
        self.q_bytes = _nbytes(q, s, z)
        self.n_q = _sets(self.q_bytes, dev)
        self.lmc = [(q, s, z)] + [_quant_set(k, n, dev)[1:] for _ in range(self.n_q - 1)]
        self.dense0 = W.dequantize_int4_ref(q, s, z, GROUP, k).t().contiguous().half()  # [N, K]
        self.n_d = _sets(_nbytes(self.dense0), dev, most=1 << 20)
        self.dense = [self.dense0] + [torch.randn_like(self.dense0) * 0.02 for _ in range(self.n_d - 1)]
        # the nibble order _convert_weight_to_int4pack expects is checked, not assumed: keep the one that matches
        x = torch.randn(16, k, device=dev)
        ref = W.w4a16_matmul_ref(x, q, s, z, GROUP)
        tries = []
        for high_first in (True, False):
            packed, sz = int4pack_weight(codes, s, z, high_first)
            out = int4pack_mm(x.bfloat16(), packed, GROUP, sz)
            tries.append((_rel(out, ref), high_first, packed, sz))
        self.tp_err, high_first, *tp0 = min(tries, key=lambda t: t[0])
        self.tp_order = "even k in high nibble" if high_first else "even k in low nibble"
        self.tp_bytes = _nbytes(*tp0)
        self.n_t = _sets(self.tp_bytes, dev)
        self.tp = [tuple(tp0)] + [int4pack_weight(c, s_, z_, high_first)
                                  for c, _, s_, z_ in (_quant_set(k, n, dev) for _ in range(self.n_t - 1))]


LAUNCHERS = {"gemv": W.w4a16_gemv_triton, "gemm": W.w4a16_gemm_triton, "dequant": W.w4a16_dequant_matmul_triton}


def launcher(path: str, kw: dict, kmajor: dict | None = None):
    """The launcher of `path` with keywords kw bound: fn(x, q, s, z, group, out=None). kw["kmajor"] (a sweep-only
    GEMM candidate: the runtime keeps qweight as stored) reads the K-major copy of q from kmajor[q.data_ptr()]."""
    kw = dict(kw)
    if kw.pop("kmajor", False):
        return lambda x, q, s, z, g, out=None: W.w4a16_gemm_triton(x, q, s, z, g, out=out,
                                                                    qweight_kmajor=kmajor[q.data_ptr()], **kw)
    return lambda x, q, s, z, g, out=None: LAUNCHERS[path](x, q, s, z, g, out=out, **kw)


def lmc_launch(m: int, k: int, n: int, dev: str, overrides: dict):
    """The lmc call timed for an [M, K] x [K, N] product: w4a16_matmul (its table for this GPU), or a launcher
    with the configuration that --configs names for this (M, K, N)."""
    if (m, k, n) not in overrides:
        if dev == "cuda":
            return W.w4a16_matmul, W.w4a16_config(m, n, k, torch.device("cuda"))
        path, kw = W.w4a16_config(m, n, k)  # on a CPU w4a16_matmul is the reference: run the table's kernel
        return launcher(path, kw), (path, kw)
    path, kw = overrides[(m, k, n)]
    return launcher(path, kw), (path, kw)


def check(shape: Shape, m: int, overrides: dict) -> dict:
    q, s, z = shape.lmc[0]
    x = torch.randn(m, shape.k, device=shape.dev).half()
    ref = W.w4a16_matmul_ref(x, q, s, z, GROUP).float()  # [M, N]
    out = torch.full((m, shape.n), float("nan"), dtype=torch.float16, device=shape.dev)
    lmc_launch(m, shape.k, shape.n, shape.dev, overrides)[0](x, q, s, z, GROUP, out=out)
    if shape.dev == "cuda":
        torch.cuda.synchronize()
    err = _rel(out, ref)
    written = bool(torch.isfinite(out).all())
    return {"rel_err": err, "all_written": written, "ok": written and err <= 1e-2}


def bench_m(shape: Shape, m: int, overrides: dict, do_bench: bool = True) -> dict:
    k, n, dev = shape.k, shape.n, shape.dev
    xs = [torch.randn(m, k, device=dev).half() for _ in range(max(shape.n_q, shape.n_d))]
    xb = [x.bfloat16() for x in xs[:shape.n_t]]
    lmc, (path, kw) = lmc_launch(m, k, n, dev, overrides)
    fns = {
        "lmc": (lambda i: lmc(xs[i], *shape.lmc[i], GROUP), shape.n_q, shape.q_bytes),
        "fp16_linear": (lambda i: F.linear(xs[i], shape.dense[i]), shape.n_d, _nbytes(shape.dense0)),
        "int4pack_mm": (lambda i: int4pack_mm(xb[i], shape.tp[i][0], GROUP, shape.tp[i][1]), shape.n_t,
                        shape.tp_bytes),
    }
    io_bytes = _nbytes(xs[0]) + m * n * 2
    row = {"M": m, "K": k, "N": n, "lmc_path": path, "lmc_config": kw}
    for name, (fn, n_sets, w_bytes) in fns.items():
        us = time_calls(fn, n_sets, dev)
        row[name] = {"us": us, "bytes": w_bytes + io_bytes, "bytes_per_s": (w_bytes + io_bytes) / (us * 1e-6)}
        if do_bench and dev == "cuda":
            row[name]["us_do_bench"] = time_do_bench(fn, n_sets)
    return row


# ----------------------------------------------------------------------------- sweep


def _gemv(options, rows: int) -> list:
    """("gemv", keywords) per (block_n, num_warps, split_k, depth, preload)."""
    return [("gemv", dict(block_n=bn, rows=rows, split_k=sk, depth=d, num_warps=nw,
                          **(dict(preload=True) if p else {}))) for bn, nw, sk, d, p in options]


def _gemm(tiles, group_m: int = 8, **extra) -> list:
    """("gemm", keywords) per (block_m, block_n, block_k, num_warps, num_stages, split_k) tile."""
    return [("gemm", dict(block_m=bm, block_n=bn, block_k=bk, group_m=group_m, split_k=sk, num_warps=nw,
                          num_stages=ns, **extra)) for bm, bn, bk, nw, ns, sk in tiles]


def _kmajor(tiles, group_m: int = 8, **extra) -> list:
    """GEMM tiles reading the K-major copy of qweight (timed, never written to the table: the loader keeps the
    stored layout; a win here says what a load-time re-layout would buy)."""
    return _gemm(tiles, group_m, kmajor=True, **extra)


def candidates(m: int) -> list:
    """(path, launcher keywords) to time at M = m, most promising first (the sweep may stop part way):
    the H100's winners and their neighbours, more split-K where M x N alone leaves SMs idle, and a few
    K-major tiles (`_kmajor`) after the third candidate."""
    ranked = _candidates(m)
    extra = _kmajor(((16, 64, 128, 4, 3, 4), (16, 64, 128, 4, 4, 8)), group_m=1, swap_ab=True) if 1 < m <= 16 else \
        _kmajor(((64, 64, 128, 4, 3, 4), (64, 128, 128, 8, 3, 2)), swap_ab=True) if 16 < m <= 64 else \
        _kmajor(((128, 128, 64, 8, 3, 1),)) + _kmajor(((128, 128, 64, 8, 3, 2),), swap_ab=True) if 64 < m <= 256 else \
        _kmajor(((128, 256, 64, 8, 3, 1),)) if m > 256 else []
    return ranked[:3] + extra + ranked[3:]


def _candidates(m: int) -> list:
    if m == 1:  # (block_n, warps, split_k, depth, preload): words per thread and step (G/8) * BN / (32 * warps)
        return _gemv(((64, 2, 8, 1, 1), (32, 1, 8, 1, 0), (64, 2, 1, 1, 1), (64, 2, 4, 1, 1), (64, 2, 16, 1, 1),
                      (32, 1, 16, 1, 0), (128, 4, 8, 1, 1), (128, 4, 2, 1, 1), (64, 4, 8, 1, 1), (32, 1, 8, 2, 0),
                      (64, 2, 2, 1, 1), (128, 8, 1, 1, 1), (32, 1, 4, 1, 0), (128, 4, 16, 1, 1)), rows=1)
    if m <= 4:
        rows = 2 if m == 2 else 4
        return _gemv(((16, 1, 4, 1, 0), (16, 1, 8, 1, 0), (16, 1, 4, 1, 1), (16, 1, 2, 1, 0), (32, 1, 4, 1, 0),
                      (32, 2, 8, 1, 0), (16, 1, 16, 1, 0)), rows=rows)
    if m <= 16:  # swap-AB: BLOCK_N is wgmma's M side (64 at least), the rows of x its N side; split-K fills the SMs
        return (_gemm(((16, 64, 128, 4, 3, 4), (16, 64, 128, 4, 4, 8), (16, 64, 128, 4, 3, 2), (16, 64, 128, 4, 3, 8),
                       (16, 128, 128, 4, 3, 4), (16, 64, 128, 4, 3, 16), (16, 64, 64, 4, 4, 8), (16, 128, 128, 8, 3, 4),
                       (16, 64, 256, 4, 3, 4), (16, 128, 64, 4, 4, 8), (16, 128, 128, 4, 3, 2)),
                      group_m=1, swap_ab=True)
                + _gemv(((16, 1, 4, 1, 0), (32, 1, 4, 1, 0), (16, 1, 8, 1, 0)), rows=4)  # CUDA cores, 4 rows a program
                + _gemm(((16, 32, 256, 4, 3, 2), (16, 64, 128, 4, 4, 4)), group_m=1))
    if m <= 64:
        return (_gemm(((64, 64, 128, 4, 3, 4), (64, 128, 128, 8, 3, 2), (64, 64, 128, 4, 3, 8), (64, 128, 128, 4, 3, 4),
                       (32, 64, 128, 4, 3, 4), (64, 128, 64, 4, 4, 4), (64, 128, 128, 8, 3, 4), (32, 64, 128, 4, 3, 8),
                       (64, 64, 128, 4, 3, 2)), swap_ab=True)
                + _gemm(((64, 128, 128, 4, 4, 2), (128, 128, 64, 8, 3, 2))))
    if m <= 256:
        return (_gemm(((128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (128, 128, 64, 8, 3, 4),
                       (128, 256, 64, 8, 3, 1), (128, 128, 128, 8, 3, 2)))
                + _gemm(((128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (64, 128, 128, 4, 4, 2)), swap_ab=True)
                + [("dequant", {})])
    return [("dequant", {})] + _gemm(((128, 128, 64, 8, 3, 1), (128, 256, 64, 8, 3, 1), (256, 128, 64, 8, 3, 1)))


def sweep(shapes, ms, budget_s: float, dev: str) -> list:
    """Per (M, shape): the table's current choice, then candidates(m) until this row's share of what is left of
    budget_s is spent (at least two); each checked against the reference and timed."""
    rows, t0 = [], time.time()
    todo = [(m, k, n) for m in ms for k, n in shapes]
    data = {}
    for i, (m, k, n) in enumerate(todo):
        share = (budget_s - (time.time() - t0)) / (len(todo) - i)
        if share <= 0:
            print(f"sweep: budget spent, skipping M={m} K={k} N={n}", flush=True)
            continue
        row_t0 = time.time()
        if (k, n) not in data:
            data[(k, n)] = [_quant_set(k, n, dev)[1:] for _ in range(_sets(k * n // 2, dev))]
        sets = data[(k, n)]
        w_bytes = _nbytes(*sets[0])
        xs = [torch.randn(m, k, device=dev).half() for _ in sets]
        q, s, z = sets[0]
        ref = W.w4a16_matmul_ref(xs[0], q, s, z, GROUP).float()
        table = W.w4a16_config(m, n, k, torch.device(dev) if dev == "cuda" else None)
        todo_c = [table] + [c for c in candidates(m) if c != table]
        kmajor = {q_.data_ptr(): W.w4a16_kmajor(q_) for q_, _, _ in sets} \
            if any(kw.get("kmajor") for _, kw in todo_c) else {}  # made before any timing, never inside a graph
        results = []
        for j, (path, kw) in enumerate(todo_c):
            if j >= 2 and time.time() - row_t0 > share:
                break
            fn = launcher(path, kw, kmajor)
            try:
                err = _rel(fn(xs[0], q, s, z, GROUP), ref)
                us = time_calls(lambda i: fn(xs[i], *sets[i], GROUP), len(sets), dev, replays=7)
            except Exception as e:  # a config the compiler rejects (shared memory, registers) is skipped
                results.append({"path": path, "config": kw, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            results.append({"path": path, "config": kw, "us": us, "rel_err": err, "table": j == 0,
                            "bytes_per_s": (w_bytes + _nbytes(xs[0]) + m * n * 2) / (us * 1e-6)})
        del kmajor
        ok = sorted((r for r in results if "us" in r and r["rel_err"] < 1e-2), key=lambda r: r["us"])
        usable = [r for r in ok if not r["config"].get("kmajor")]  # what the table can name
        km = next((r for r in ok if r["config"].get("kmajor")), None)
        rows.append({"M": m, "K": k, "N": n, "results": results, "best": usable[:3], "best_kmajor": km,
                     "tried": len(results), "of": len(todo_c), "seconds": time.time() - row_t0})
        b = usable[0] if usable else None
        old = next((r for r in results if r.get("table") and "us" in r), None)
        print(f"sweep K={k} N={n} M={m}: {len(results)}/{len(todo_c)} tried in {time.time() - row_t0:.0f} s; "
              + (f"{b['path']} {b['config']} {b['us']:.1f} us {b['bytes_per_s'] / 1e12:.2f} TB/s" if b else "no result")
              + (f" (table's {old['us']:.1f} us)" if old else "") + (f"; K-major {km['us']:.1f} us" if km else ""),
              flush=True)
    return rows


def write_table(rows: list, env: dict, table: str, command: str) -> list:
    """Merge each swept (M, K, N)'s fastest correct configuration into the tuning table under env's device."""
    measured = [{"m": r["M"], "k": r["K"], "n": r["N"], "path": r["best"][0]["path"], "config": r["best"][0]["config"],
                 "us": round(r["best"][0]["us"], 2)} for r in rows if r["best"]]
    source = f"{command} ({env['time'][:10]}, torch {env['torch']}, triton {env['triton']}): M in " \
             f"{sorted({e['m'] for e in measured})}"
    T.write_tables(T.merge(T.read_tables(table), env["device"], measured, source), table)
    print(f"wrote {len(measured)} entries for {env['device']!r} to {table}", flush=True)
    return measured


# ----------------------------------------------------------------------------- main


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(i) for i in value.split(","))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/w4a16_kernels.json, "
                                                "or w4a16_sweep.json with --sweep)")
    ap.add_argument("--sweep", action="store_true", help="time candidate paths and block shapes instead of the table")
    ap.add_argument("--sweep-ms", type=_ints, default=(1, 16, 64, 256, 2048, 4),
                    help="--sweep: the M values, comma-separated, most important first")
    ap.add_argument("--budget-s", type=float, default=240.0, help="--sweep: seconds for all rows (an even share "
                                                                   "of what is left per row; each row times >= 2)")
    ap.add_argument("--write-table", action="store_true", help="--sweep: merge the winners into the tuning table")
    ap.add_argument("--table", default=str(T.TABLE_PATH), help="the tuning table --write-table merges into")
    ap.add_argument("--configs", default=None, help="a --sweep JSON: time each (M, K, N) with its best "
                                                     "configuration instead of the table")
    ap.add_argument("--ms", type=_ints, default=MS, help="the M values of the default run, comma-separated")
    ap.add_argument("--no-do-bench", action="store_true", help="skip the do_bench column (faster)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU with TRITON_INTERPRET=1")
    ap.add_argument("--shapes", choices=("8b", "tp2"), default="8b",
                    help="the Llama-3-8B linears, or one rank's share of them at tensor parallel 2")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        print("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if args.smoke else TP2_SHAPES if args.shapes == "tp2" else SHAPES
    torch.manual_seed(0)
    command = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    report = {"env": environment(dev), "group_size": GROUP, "command": command}
    report["copy"] = copy_bandwidth(dev)
    copy_bw = report["copy"]["bytes_per_s"]
    print(f"{report['env']['device']}: copy {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    if args.sweep:
        report["sweep"] = sweep(shapes, args.sweep_ms, args.budget_s, dev)
        if args.write_table:
            report["table_entries"] = write_table(report["sweep"], report["env"], args.table, command)
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
    for k, n in shapes:
        shape = Shape(k, n, dev)
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
        if dev == "cuda":
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
