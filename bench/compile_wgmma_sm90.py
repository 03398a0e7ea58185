"""Compiles the W4A16 wgmma kernel (kernels/w4a16_wgmma.py, Gluon) for sm_90a without a GPU (Triton front end +
ptxas) and counts what one thread executes per 64-wide K chunk: registers, spills, and the SASS instructions of the
main loop (AHEAD chunks a pass) by kind (nvdisasm). The compile itself checks the register-A layout (the kernel's
convert_layout(..., assert_trivial=True) fails to trace otherwise).

    python bench/compile_wgmma_sm90.py --rows 16,64,128 --pipeline 0,1 --silu 0,1 --splits 1,2 --warpgroups 1,2 \
        --ahead 2,4,8 --x-chunks 1,2 [--x-tma 0,1]

With --x-tma 1 (x by TMA, two passes a loop and the mbarrier waits' own spin loops) the "main loop" found is not
the pass: read its counts as a whole, not per chunk (the compile tests count opcodes over the kernel instead).
"""
from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from lmc.kernels import w4a16_wgmma as WG

KINDS = {  # SASS opcodes counted per chunk (the opcode before its first '.')
    "HGMMA": "HGMMA", "HADD2/HFMA2/HMUL2": "HADD2 HFMA2 HMUL2", "LOP3/SHF/PRMT": "LOP3 SHF PRMT",
    "LDG": "LDG", "UTMALDG": "UTMALDG", "STS/STSM": "STS STSM", "BAR": "BAR", "WARPGROUP": "WARPGROUP", "FENCE/MEMBAR": "FENCE MEMBAR",
    "IMAD/IADD/LEA/MOV": "IMAD IADD3 LEA MOV SEL ISETP UIADD3 UMOV ULEA USHF ULOP3 ISETP VIMNMX",
}


def compile_wgmma(rows: int, pipeline: bool, silu: bool, split_k: int, group: int = 128, warpgroups: int = 1,
                  ahead: int = 2, x_chunks: int = 1, x_tma: bool = False):
    """The kernel as w4a16_wgmma_triton launches it, compiled for sm_90a (pointers, K and the strides
    16-divisible, as Triton's launcher would specialize them for a [*, 4096] float16 x)."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = WG._wgmma_kernel
    ints = ("M", "NB", "K", "stride_xm", "stride_om", "ROW_BLOCKS")
    desc = f"tensordesc<fp16[{rows},64],{WG.X_SMEM.value!r}>" if x_tma else "*fp16"  # x itself where unused
    ptrs = {"x_ptr": "*fp16", "x_desc": desc, "qf_ptr": "*i32", "sz_ptr": "*i32", "out_ptr": "*fp16", "ws_ptr": "*fp32",
            "count_ptr": "*i32"}
    constexprs = {"GROUP": group, "BM": rows, "SPLIT_K": split_k, "SILU": silu, "PIPELINE": pipeline,
                  "WARPGROUPS": warpgroups, "AHEAD": ahead, "X_CHUNKS": x_chunks,
                  "X_TMA": x_tma}
    signature = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in constexprs}}
    assert list(signature) == fn.arg_names, fn.arg_names
    divisible = [i for i, name in enumerate(fn.arg_names)
                 if (name in ptrs and name != "x_desc") or name in ("K", "stride_xm", "stride_om")]
    attrs = {(i,): BaseBackend.parse_attr("D") for i in divisible}
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4 * warpgroups})


def _bin(name: str) -> Path:
    import triton
    if name == "ptxas":  # the one this Triton compiles sm_90 with (3.9: ptxas-blackwell)
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(90).path)
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def ptxas_info(kernel) -> dict:
    """ptxas -v on the kernel's PTX: registers, spills, and any wgmma serialization warning."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        res = subprocess.run([str(_bin("ptxas")), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    warnings = [line.strip() for line in text.splitlines() if "warning" in line.lower() or "Performance" in line]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else 0,
            "warnings": warnings}


def sass(kernel) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, instruction) of the kernel's SASS, and the address of each label."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(_bin("nvdisasm")), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    code, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = re.match(r"(\.L\w+):", line.strip())
        if lab:
            pending.append(lab.group(1))
        mm = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if mm:
            addr = int(mm.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            code.append((addr, mm.group(2)))
    return code, labels


def loop_counts(kernel) -> tuple[Counter, int]:
    """Opcode counts of the main loop (the innermost backward branch around HGMMAs) and its instruction count."""
    code, labels = sass(kernel)
    best = None
    for addr, ins in code:
        mm = re.search(r"BRA\s+`?\(?(\.L\w+)\)?", ins)
        if not mm or labels.get(mm.group(1), addr + 1) > addr:
            continue
        body = [i for a, i in code if labels[mm.group(1)] <= a <= addr]
        if any("HGMMA" in i for i in body) and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        raise RuntimeError("no loop with HGMMA found in the SASS")
    ops = Counter()
    for ins in best:
        op = ins.split()[1] if ins.startswith("@") else ins.split()[0]
        ops[op.split(".")[0]] += 1
    return ops, len(best)


def report(rows: int, pipeline: bool, silu: bool, split_k: int, group: int = 128, warpgroups: int = 1,
           ahead: int = 2, x_chunks: int = 1, x_tma: bool = False) -> dict:
    kernel = compile_wgmma(rows, pipeline, silu, split_k, group, warpgroups, ahead, x_chunks, x_tma)
    ops, n = loop_counts(kernel)
    chunks = ahead  # the loop does AHEAD chunks a pass
    kinds = {kind: sum(ops[o] for o in names.split()) / chunks for kind, names in KINDS.items()}
    return {"rows": rows, "pipeline": pipeline, "silu": silu, "split_k": split_k, "warpgroups": warpgroups,
            "ahead": ahead, "x_chunks": x_chunks, "x_tma": x_tma, **ptxas_info(kernel),
            "loop_instructions_per_chunk": n / chunks, "per_chunk": kinds, "shared_bytes": kernel.metadata.shared}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap.add_argument("--rows", type=ints, default=[16, 64, 128])
    ap.add_argument("--pipeline", type=ints, default=[0, 1])
    ap.add_argument("--silu", type=ints, default=[0])
    ap.add_argument("--splits", type=ints, default=[1])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--warpgroups", type=ints, default=[1])
    ap.add_argument("--ahead", type=ints, default=[2])
    ap.add_argument("--x-chunks", type=ints, default=[1])
    ap.add_argument("--x-tma", type=ints, default=[0], help="0, 1: x stored by the threads / brought by TMA")
    args = ap.parse_args()
    for rows, wg, pipe, silu, split, ahead, xc, tma in itertools.product(
            args.rows, args.warpgroups, args.pipeline, args.silu, args.splits, args.ahead, args.x_chunks,
            args.x_tma):
        r = report(rows, bool(pipe), bool(silu), split, args.group, wg, ahead, xc, bool(tma))
        per = ", ".join(f"{k} {v:g}" for k, v in r["per_chunk"].items())
        print(f"BM={rows} warpgroups={wg} pipeline={pipe} silu={silu} split={split} ahead={ahead} x_chunks={xc} "
              f"x_tma={tma}: "
              f"{r['registers']} registers, "
              f"{r['spill_bytes']} B spills, smem {r['shared_bytes']} B, "
              f"{r['loop_instructions_per_chunk']:g} loop instructions a chunk ({per})"
              + (f"; ptxas: {r['warnings']}" if r["warnings"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
