"""Checks every non-quantized Triton kernel against its torch reference at real model sizes on a GPU.

Not a test: prints a table and writes JSON (device, versions, and per case the max relative error,
pass/fail at TOLERANCE, and the Triton and reference times).

    python bench/check_kernels_gpu.py [--out bench/results/kernels_gpu.json]

A smoke run of the script itself without a GPU (Triton's interpreter has no usable bfloat16):

    TRITON_INTERPRET=1 python bench/check_kernels_gpu.py --quick --dtypes float16 --out /tmp/k.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmc.kernels import argmax, attention, rmsnorm, rotary, silu_mul

TOLERANCE = 1e-2
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Case:
    kernel: str
    name: str
    run_triton: Callable[[], object]
    run_ref: Callable[[], object]
    bytes_read: int | None = None  # the kernel's unavoidable memory traffic, for a bandwidth figure


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| (over every tensor of a tuple): stays meaningful where ref is near 0; integer
    tensors (indices) must be equal."""
    if isinstance(out, tuple):
        return max(max_rel_err(o, r) for o, r in zip(out, ref))
    if not out.is_floating_point():  # indices: equal (0) or wrong (inf)
        return 0.0 if torch.equal(out, ref) else math.inf
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


class Sizes:
    """Real sizes, or (--quick) token counts cut about 64-fold and kept off tile multiples, for a smoke run."""

    def __init__(self, quick: bool):
        self.quick = quick

    def __call__(self, n: int) -> int:
        return max(1, n // 64 + n % 7) if self.quick else n


def norm_cases(dtype, dev, n: Sizes, g) -> list[Case]:
    cases = []
    for T, H, with_res in [(2048, 4096, True), (2048, 4096, False), (2048, 576, True), (16, 4096, True)]:
        T = n(T)
        x = torch.randn(T, H, generator=g, device=dev).to(dtype)  # [T, H]
        res = torch.randn(T, H, generator=g, device=dev).to(dtype) if with_res else None  # [T, H]
        w = (torch.rand(H, generator=g, device=dev) + 0.5).to(dtype)  # [H]
        cases.append(Case(
            "rms_norm", f"T={T} H={H}" + (" +residual" if with_res else ""),
            lambda x=x, w=w, res=res: rmsnorm.rms_norm_triton(x, w, 1e-5, res),
            lambda x=x, w=w, res=res: rmsnorm.rms_norm_ref(x, w, 1e-5, res),
            bytes_read=x.numel() * x.element_size() * (2 if with_res else 1),
        ))
    return cases


def rotary_cases(dtype, dev, n: Sizes, g) -> list[Case]:
    cases = []
    for T, Hq, Hkv, D in [(2048, 32, 8, 128), (2048, 9, 3, 64), (16, 32, 8, 128), (2048, 32, 32, 80)]:
        T = n(T)
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g, device=dev).to(dtype)  # [T, (Hq + 2 Hkv) D]
        q = qkv[:, : Hq * D].view(T, Hq, D)  # [T, Hq, D], a strided view as in the runtime
        k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)  # [T, Hkv, D]
        pos = torch.randint(0, 8192, (T,), generator=g, device=dev).float()  # [T]
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))  # [D/2]
        freqs = pos[:, None] * inv_freq[None, :]  # [T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        cases.append(Case(
            "apply_rotary", f"T={T} Hq={Hq} Hkv={Hkv} D={D}",
            lambda q=q, k=k, cos=cos, sin=sin: rotary.apply_rotary_triton(q, k, cos, sin),
            lambda q=q, k=k, cos=cos, sin=sin: rotary.apply_rotary_ref(q, k, cos, sin),
            bytes_read=(q.numel() + k.numel()) * q.element_size(),
        ))
    return cases


def silu_cases(dtype, dev, n: Sizes, g) -> list[Case]:
    cases = []
    for T, I in [(2048, 11008), (16, 14336), (2048, 1536)]:
        T = n(T)
        gu = (torch.randn(T, 2 * I, generator=g, device=dev) * 3).to(dtype)  # [T, 2I]
        cases.append(Case(
            "silu_mul", f"T={T} I={I}",
            lambda gu=gu: silu_mul.silu_mul_triton(gu),
            lambda gu=gu: silu_mul.silu_mul_ref(gu),
            bytes_read=gu.numel() * gu.element_size(),
        ))
    return cases


def argmax_cases(dtype, dev, n: Sizes, g) -> list[Case]:
    """Greedy decode's argmax over Llama-3's and Qwen2's vocabularies (indices: equal or failed)."""
    cases = []
    for B, V in [(1, 128256), (16, 128256), (1, 151936)]:
        x = (torch.randn(B, V, generator=g, device=dev) * 4).to(dtype)  # [B, V]
        cases.append(Case(
            "argmax_rows", f"B={B} V={V}",
            lambda x=x: argmax.argmax_rows_triton(x),
            lambda x=x: x.argmax(dim=-1),
            bytes_read=x.numel() * x.element_size(),
        ))
    return cases


def paged_cache(kv_lens, Hkv, D, block_size, dtype, dev, g):
    """Random caches with each sequence's blocks scattered through a shuffled pool."""
    n_blocks = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(n_blocks) + 7
    order = torch.randperm(num_blocks, generator=g, device=dev).to(torch.int32)  # [num_blocks]
    block_tables = torch.zeros(len(kv_lens), max(n_blocks) + 1, dtype=torch.int32, device=dev)  # [B, max_blocks]
    start = 0
    for b, nb in enumerate(n_blocks):
        block_tables[b, :nb] = order[start: start + nb]
        start += nb
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g, device=dev).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g, device=dev).to(dtype)
    return k_cache, v_cache, block_tables, torch.tensor(kv_lens, dtype=torch.int32, device=dev)


def prefill_cases(dtype, dev, n: Sizes, g) -> list[Case]:
    cases = []
    specs = [  # Hq, Hkv, D, block_size, q_lens, kv_lens (kv_len > q_len: a cached prefix)
        (32, 8, 128, 64, (1024, 512, 333, 1), (1024, 2048, 4096, 777)),
        (9, 3, 64, 64, (2048,), (2048,)),
        (32, 32, 80, 16, (700, 300), (1500, 300)),
    ]
    for Hq, Hkv, D, block_size, q_lens, kv_lens in specs:
        q_lens = [n(L) for L in q_lens]
        kv_lens = [max(n(kv), L) for kv, L in zip(kv_lens, q_lens)]
        k_cache, v_cache, bt, kvl = paged_cache(kv_lens, Hkv, D, block_size, dtype, dev, g)
        q = torch.randn(sum(q_lens), Hq, D, generator=g, device=dev).to(dtype)  # [T, Hq, D]
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)  # [B+1]
        args = (q, k_cache, v_cache, bt, cu, kvl, 1.0 / math.sqrt(D))
        cases.append(Case(
            "paged_prefill_attention", f"Hq={Hq} Hkv={Hkv} D={D} bs={block_size} q={q_lens} kv={kv_lens}",
            lambda args=args: attention.paged_prefill_attention_triton(*args),
            lambda args=args: attention.paged_prefill_attention_ref(*args),
        ))
    return cases


def decode_cases(dtype, dev, n: Sizes, g) -> list[Case]:
    cases = []
    specs = [  # B, Hq, Hkv, D, block_size, longest kv_len
        (16, 32, 8, 128, 64, 4096),
        (16, 9, 3, 64, 64, 4096),
        (16, 32, 32, 128, 64, 4096),
        (8, 32, 4, 80, 16, 2000),
        (1, 32, 8, 128, 64, 4096),
    ]
    for B, Hq, Hkv, D, block_size, longest in specs:
        longest = n(longest)
        kv_lens = [longest] + torch.randint(1, longest + 1, (B - 1,), generator=g, device=dev).tolist()
        k_cache, v_cache, bt, kvl = paged_cache(kv_lens, Hkv, D, block_size, dtype, dev, g)
        q = torch.randn(B, Hq, D, generator=g, device=dev).to(dtype)  # [B, Hq, D]
        args = (q, k_cache, v_cache, bt, kvl, 1.0 / math.sqrt(D))
        cases.append(Case(
            "paged_decode_attention", f"B={B} Hq={Hq} Hkv={Hkv} D={D} bs={block_size} kv<={longest}",
            lambda args=args: attention.paged_decode_attention_triton(*args),
            lambda args=args: attention.paged_decode_attention_ref(*args),
            bytes_read=2 * sum(kv_lens) * Hkv * D * q.element_size(),
        ))
    return cases


def write_cache_case(dtype, dev, n: Sizes, g) -> list[Case]:
    """write_kv_cache is plain torch on both paths: it must reproduce the K/V exactly through the block table."""
    T, Hkv, D, block_size = n(2048), 8, 128, 64
    k_cache, v_cache, bt, _ = paged_cache([T], Hkv, D, block_size, dtype, dev, g)
    k = torch.randn(T, Hkv, D, generator=g, device=dev).to(dtype)  # [T, Hkv, D]
    v = torch.randn(T, Hkv, D, generator=g, device=dev).to(dtype)
    pos = torch.arange(T, device=dev)
    slots = bt[0, pos // block_size].long() * block_size + pos % block_size  # [T]

    def written():
        attention.write_kv_cache(k, v, k_cache, v_cache, slots)
        return k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]

    return [Case("write_kv_cache", f"T={T} Hkv={Hkv} D={D} bs={block_size}", written, lambda: (k, v))]


def time_ms(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def _cell(value: float | None, width: int, digits: int) -> str:
    return "-".rjust(width) if value is None else f"{value:{width}.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/kernels_gpu.json", help="where to write the JSON results")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated: float16, bfloat16, float32")
    parser.add_argument("--quick", action="store_true", help="small token counts, for a smoke run")
    parser.add_argument("--no-timing", action="store_true", help="check errors only")
    args = parser.parse_args()

    if torch.cuda.is_available():
        dev, device_name = "cuda", torch.cuda.get_device_name()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        dev, device_name = "cpu", f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"
    else:
        print("error: no CUDA device; run on a GPU, or smoke-test with TRITON_INTERPRET=1 and --quick",
              file=sys.stderr)
        return 2
    try:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    except KeyError as e:
        print(f"error: unknown dtype {e}; use {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    import triton

    sizes = Sizes(args.quick)
    results = []
    print(f"{'kernel':<24} {'dtype':<9} {'case':<62} {'max rel err':>11} {'ok':>4} {'triton ms':>9} "
          f"{'ref ms':>9} {'GB/s':>7}")
    for dtype in dtypes:
        g = torch.Generator(device=dev).manual_seed(0)
        builders = (norm_cases, rotary_cases, silu_cases, argmax_cases, write_cache_case, prefill_cases,
                    decode_cases)
        for case in (c for build in builders for c in build(dtype, dev, sizes, g)):
            err = max_rel_err(case.run_triton(), case.run_ref())
            timed = not args.no_timing
            triton_ms = time_ms(case.run_triton) if timed else None
            ref_ms = time_ms(case.run_ref) if timed else None
            gbps = case.bytes_read / triton_ms / 1e6 if case.bytes_read and triton_ms else None
            row = {"kernel": case.kernel, "case": case.name, "dtype": str(dtype).removeprefix("torch."),
                   "max_rel_err": err, "passed": err <= TOLERANCE, "triton_ms": triton_ms, "ref_ms": ref_ms,
                   "gb_per_s": gbps}
            results.append(row)
            print(f"{row['kernel']:<24} {row['dtype']:<9} {row['case']:<62} {err:>11.2e} "
                  f"{'yes' if row['passed'] else 'NO':>4} {_cell(triton_ms, 9, 4)} {_cell(ref_ms, 9, 3)} "
                  f"{_cell(gbps, 7, 0)}", flush=True)

    report = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "tolerance": TOLERANCE,
        "error_metric": "max |triton - ref| / max |ref|, ref = the torch reference (fp32 inside)",
        "all_passed": all(r["passed"] for r in results),
        "cases": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(not r["passed"] for r in results)
    print(f"{len(results) - failed}/{len(results)} passed; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
