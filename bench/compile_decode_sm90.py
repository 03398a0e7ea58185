"""Compiles the decode attention kernels for sm_90 without a GPU (Triton front end + ptxas) and counts what one
thread executes: registers, spills, and the SASS instructions of the tile loop by kind (nvdisasm), for the "mma" and the
"fma" and "fold" kernels at the Llama-3-8B shape (GQA group 4, head_dim 128, 64-token pages). --bits 16: a float16 cache (the
mma kernel only), --rope: the mma kernel that also rotates q and stores the step's k and v (rotary_decode_attention).

    TRITON_DEFAULT_FP_FUSION=1 python bench/compile_decode_sm90.py --bits 8 --block-n 64 --warps 4 [--ptx-dir /tmp]
    python bench/compile_decode_sm90.py --bits 16 --kernels mma [--rope]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from lmc.kernels import attention
from lmc.kernels.kv_quant import QuantizedKV, store_groups

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KINDS = {  # SASS opcodes counted per tile (the opcode before its first '.')
    "FFMA": "FFMA", "FMUL/FADD": "FMUL FADD", "HFMA2/HADD2/HMUL2": "HFMA2 HADD2 HMUL2", "HMMA/HGMMA": "HMMA HGMMA",
    "LDSM": "LDSM", "STS": "STS", "LDS": "LDS", "LDGSTS": "LDGSTS", "BAR": "BAR", "SHFL": "SHFL", "MUFU": "MUFU",
    "I2F/F2F": "I2F F2F I2FP F2FP", "LOP3/PRMT/SHF/IADD": "LOP3 PRMT SHF IADD3 IMAD LEA SEL ISETP", "LDG": "LDG",
    "FMNMX": "FMNMX", "FSETP/FSEL": "FSETP FSEL", "WARPGROUP": "WARPGROUP",
}


class _Capture:
    """Stands in for a Triton kernel: records the launch (arguments, keywords) instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _caches(B: int, Hkv: int, D: int, page: int, bits: int) -> list:
    """K and V caches of 4 blocks per sequence: float16 (bits 16) or quantized."""
    if bits == 16:
        return [torch.zeros(B * 4, page, Hkv, D, dtype=torch.float16) for _ in "kv"]
    return [QuantizedKV.empty(B * 4, page, Hkv, D, bits, group, "cpu") for group in store_groups(D, bits)]


def _rope(B: int, Hq: int, Hkv: int, D: int) -> tuple:
    """rope's tensors as the runtime passes them: k and v views of a fused qkv row, float32 cos/sin, int64 slots."""
    qkv = torch.zeros(B, (Hq + 2 * Hkv) * D, dtype=torch.float16)  # [B, (Hq + 2 Hkv) D]
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(B, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(B, Hkv, D)
    cos = torch.zeros(B, D // 2)  # [B, D/2]
    return k, v, cos, cos.clone(), torch.zeros(B, dtype=torch.int64)


def compile_kernel(kernel: str, bits: int, block_n: int, warps: int, stages: int, splits: int,
                   maxnreg: int | None = None, rope: bool = False):
    """The decode kernel as paged_decode_attention_triton launches it at the 8B shape (16 sequences, 4 blocks
    each: the same strides and alignments as any cache of that shape), compiled for sm_90 with the
    specialization Triton's launcher would pick (16-divisible integers and pointers, integers equal to 1).
    rope: the launch of rotary_decode_attention (q a view of the fused qkv row, as the runtime's)."""
    B, Hq, Hkv, D, page = 16, 32, 8, 128, 64
    caches = _caches(B, Hkv, D, page, bits)
    q = torch.zeros(B, (Hq + 2 * Hkv) * D, dtype=torch.float16)[:, :Hq * D].view(B, Hq, D) if rope else \
        torch.zeros(B, Hq, D, dtype=torch.float16)
    tables = torch.arange(B * 4, dtype=torch.int32).reshape(B, 4)
    kv_lens = torch.full((B,), 4 * page, dtype=torch.int32)
    name = {"mma": "_decode_kernel", "fma": "_decode_fma_kernel", "fold": "_decode_fold_kernel"}[kernel]
    fn, capture = getattr(attention, name), _Capture()
    setattr(attention, name, capture)
    try:
        attention.paged_decode_attention_triton(q, *caches, tables, kv_lens, 0.088, num_splits=splits,
                                                block_n=block_n, num_warps=warps, num_stages=stages, kernel=kernel,
                                                rope=_rope(B, Hq, Hkv, D) if rope else None)
    finally:
        setattr(attention, name, fn)
    (args, kwargs), = capture.launches
    if "ASM" in kwargs:  # the inline-PTX code conversion a CUDA launch with float16 q takes (q is on the CPU here)
        kwargs["ASM"] = True
    return compile_launch(fn, args, kwargs, maxnreg)


def compile_launch(fn, args, kwargs: dict, maxnreg: int | None = None):
    """A captured launch of `fn` compiled for sm_90 with the specialization Triton's launcher would pick
    (16-divisible integers and pointers, integers equal to 1)."""
    kwargs = dict(kwargs)
    kwargs.pop("launch_pdl", None)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages")}
    if maxnreg:
        options["maxnreg"] = maxnreg
    signature, constexprs, attrs = {}, dict(kwargs), {}
    for i, (arg_name, arg) in enumerate(zip(fn.arg_names, args)):
        ty, key = native_specialize_impl(BaseBackend, arg, False, True, True)
        signature[arg_name] = ty
        if ty == "constexpr":
            constexprs[arg_name] = key
        elif key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    signature.update({k: "constexpr" for k in kwargs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def registers(ptx: str) -> str:
    """ptxas -v's line for the kernel: registers, spill stores and loads."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(ptx)
        cmd = [str(BIN / "ptxas-blackwell"), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", "k.ptx",
               "-o", "k.cubin"]  # Triton's own ptxas command for sm_90
        log = subprocess.run(cmd, cwd=tmp,
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log).group(1)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return f"{regs} registers, spills {spills[0]} B stored / {spills[1]} B loaded"


def loop_body(cubin: bytes) -> tuple[list[str], list[str]]:
    """SASS opcodes of the whole kernel and of its tile loop: the longest span from a label to a backward branch to
    it."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.cubin").write_bytes(cubin)
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", "k.cubin"], cwd=tmp, capture_output=True, text=True,
                              check=True).stdout
    ops, labels, best = [], {}, []
    for ln in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", ln)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", ln)
        if not m:
            continue
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(1))
        ops.append(text.split()[0].split(".")[0])
        target = re.search(r"\bBRA\b.*\((\.L_x_\d+)\)", text)
        if target and target.group(1) in labels and len(ops) - labels[target.group(1)] > len(best):
            best = ops[labels[target.group(1)]:]
    return ops, best


def count(ops: list[str]) -> Counter:
    c = Counter()
    for op in ops:
        for kind, names in KINDS.items():
            if op in names.split():
                c[kind] += 1
    c["all"] = len(ops)
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--splits", type=int, default=4)
    ap.add_argument("--kernels", default="mma,fma", help="comma-separated: mma, fma, fold")
    ap.add_argument("--maxnreg", type=int, help="a register cap per thread (Triton's maxnreg launch option)")
    ap.add_argument("--rope", action="store_true", help="the mma kernel that also rotates q and writes k, v (--bits 16)")
    ap.add_argument("--ptx-dir")
    args = ap.parse_args()
    for kernel in args.kernels.split(","):
        k = compile_kernel(kernel, args.bits, args.block_n, args.warps, args.stages, args.splits, args.maxnreg,
                           args.rope)
        ptx = k.asm["ptx"]
        if args.ptx_dir:
            stem = Path(args.ptx_dir, f"decode_{kernel}_{args.bits}_{args.block_n}_{args.warps}")
            stem.with_suffix(".ptx").write_text(ptx)
            stem.with_suffix(".ttgir").write_text(k.asm["ttgir"])
        kernel_ops, loop_ops = loop_body(k.asm["cubin"])
        c = count(loop_ops)
        per_thread = 2 * args.block_n * 128 / (32 * args.warps)  # K and V elements of one tile, per thread
        print(f"{kernel} bits={args.bits} BLOCK_N={args.block_n} warps={args.warps}: {registers(ptx)}, shared "
              f"{k.metadata.shared} B; {len(kernel_ops)} SASS instructions in all; tile loop: {c['all']} SASS instructions/thread for {per_thread:g} K+V "
              f"elements/thread = {c['all'] / per_thread:.2f} per element")
        print("   ", ", ".join(f"{kind} {c[kind]}" for kind in KINDS if c[kind]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
