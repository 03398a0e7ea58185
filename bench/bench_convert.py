"""Benchmark `lmc convert` and `lmc verify` on a ~2 GB random fp16 Llama checkpoint.

The checkpoint has TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32/4 heads, ffn 5632,
vocab 32000, untied head): 1.1 B parameters, 2.2 GB of fp16 in a few safetensors shards. It is
written one tensor at a time straight into the safetensors byte layout (8-byte header length,
JSON header, data), so the generator holds one tensor at most. Each lmc command runs in a
subprocess; its wall time and peak RSS (wait4's ru_maxrss, plus the anonymous / file-backed
split sampled from /proc) are recorded. Source and workspace files are fsynced and dropped from
the page cache (posix_fadvise DONTNEED) before the command that reads them, so reads are cold.
Linux only (/proc, wait4, posix_fadvise).

    python bench/bench_convert.py --out bench/results/convert_2gb.json
    python bench/bench_convert.py --repeat 3 --reference-python /tmp/lmc-base/.venv/bin/python \
        --out bench/results/convert_2gb_v2.json     # before and after, alternately, outputs compared
"""
from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lmc.format.hashing import file_digest
from lmc.format.manifest import DIGEST

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)
ALIGN = 8  # the safetensors reference writer pads the header to 8 bytes


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in the order they are written."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def split_shards(shapes: list, n_shards: int) -> list[list]:
    """Consecutive groups of tensors of roughly equal bytes."""
    total = sum(_numel(s) for _, s in shapes) * 2
    shards, current, size = [], [], 0
    for name, shape in shapes:
        current.append((name, shape))
        size += _numel(shape) * 2
        if size >= total * (len(shards) + 1) / n_shards and len(shards) < n_shards - 1:
            shards.append(current)
            current = []
    return shards + [current] if current else shards


def write_shard(path: Path, shapes: list, gen: torch.Generator) -> None:
    """One safetensors file, each fp16 tensor generated just before its bytes are written."""
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        nbytes = _numel(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % ALIGN)
    with open(path, "wb") as f:  # [u64 LE header length][JSON header, space-padded to 8][tensors in header order]
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                t = 1 + 0.1 * torch.randn(shape, generator=gen)  # [H]
            else:
                t = torch.randn(shape, generator=gen).mul_(0.02)  # [out, in]
            f.write(t.to(torch.float16).view(torch.uint8).reshape(-1).numpy().data)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly vocab_size entries (the conversion copies it as is)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_checkpoint(folder: Path, cfg: dict, n_shards: int, seed: int) -> dict:
    folder.mkdir(parents=True)
    shapes = tensor_shapes(cfg)
    shards = split_shards(shapes, n_shards)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / fname, shard, gen)
        weight_map.update({name: fname for name, _ in shard})
    total = sum(_numel(s) for _, s in shapes) * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", **cfg}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    write_tokenizer(folder, cfg["vocab_size"])
    return {"params": total // 2, "bytes": total, "tensors": len(shapes), "shards": len(shards)}


def drop_page_cache(folder: Path) -> None:
    """fsync every file under `folder` and ask the kernel to evict it from the page cache."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# Linux carries a process's peak RSS across fork/vfork + exec, so a child spawned straight from
# this (large) process would report our peak as its own ru_maxrss. A small launcher forks the
# measured command from its own ~10 MB image, waits for it and writes the command's rusage.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[3], sys.argv[3:])
    finally:
        os._exit(127)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[2], "w") as f:
    json.dump({"exit_code": os.waitstatus_to_exitcode(status), "maxrss_kib": ru.ru_maxrss,
               "user_seconds": ru.ru_utime, "system_seconds": ru.ru_stime}, f)
"""


def cold_read(folder: Path) -> dict:
    """Read every file under `folder` once from a dropped page cache: the disk's sequential rate."""
    drop_page_cache(folder)
    total, start = 0, time.perf_counter()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": round(seconds, 2), "gb_per_s": round(total / 1e9 / seconds, 3)}


def disk_copy(folder: Path, dst: Path) -> dict:
    """Copy every file under `folder` into `dst` from a dropped page cache with O_DIRECT reads and writes (16 MiB
    blocks, the write of one overlapping the read of the next): the least time any converter needs to read the
    source and write as many bytes, on this disk, at this moment."""
    drop_page_cache(folder)
    dst.mkdir(parents=True)
    total, start = 0, time.perf_counter()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = f.stat().st_size
        src_fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        dst_fd = os.open(dst / f.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        free, full = queue.SimpleQueue(), queue.SimpleQueue()
        for _ in range(3):
            free.put(mmap.mmap(-1, 1 << 24))  # page-aligned

        def write() -> None:
            offset = 0
            while (item := full.get()) is not None:
                buf, n = item
                os.pwrite(dst_fd, memoryview(buf)[:-(-n // 4096) * 4096], offset)  # the last block padded
                offset += n
                free.put(buf)

        writer = threading.Thread(target=write)
        writer.start()
        offset = 0
        while True:
            buf = free.get()
            n = os.preadv(src_fd, [buf], offset)
            if n:
                full.put((buf, n))
                offset += n
            if n < len(buf):
                break
        full.put(None)
        writer.join()
        os.ftruncate(dst_fd, size)
        os.close(src_fd)
        os.close(dst_fd)
        total += size
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return {"bytes": total, "seconds": round(seconds, 2), "gb_per_s": round(total / 1e9 / seconds, 3)}


def _proc_rss(pid: int) -> dict[str, int]:
    """VmHWM / RssAnon / RssFile of a live process in bytes ({} once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (OSError, ValueError):
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def run_measured(cmd: list[str], interval_s: float = 0.05) -> dict:
    """Run cmd; wall seconds, exit code and rusage (peak RSS) of cmd alone, plus peaks of its
    anonymous and file-backed RSS sampled from /proc every `interval_s`."""
    with tempfile.TemporaryDirectory() as tmp:
        pid_file, usage_file = Path(tmp) / "pid", Path(tmp) / "rusage.json"
        out, err = open(Path(tmp) / "out", "w+b"), open(Path(tmp) / "err", "w+b")
        start = time.perf_counter()
        launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(pid_file), str(usage_file), *cmd],
                                    stdout=out, stderr=err, cwd=tmp)  # no checkout folder on sys.path
        peaks: dict[str, int] = {}
        done = threading.Event()

        def sample():
            while not done.is_set() and not pid_file.is_file():
                done.wait(0.005)
            pid = int(pid_file.read_text()) if pid_file.is_file() else 0
            while pid and not done.is_set():
                for key, value in _proc_rss(pid).items():
                    peaks[key] = max(peaks.get(key, 0), value)
                done.wait(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        launcher.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        usage = json.loads(usage_file.read_text())
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace").strip()[-500:])
            f.close()
    return {"command": " ".join(cmd), "exit_code": usage["exit_code"], "seconds": round(seconds, 2),
            "peak_rss_bytes": usage["maxrss_kib"] * 1024, "peak_rss_sampled_bytes": peaks.get("VmHWM"),
            "peak_rss_anon_sampled_bytes": peaks.get("RssAnon"), "peak_rss_file_sampled_bytes": peaks.get("RssFile"),
            "user_seconds": round(usage["user_seconds"], 2), "system_seconds": round(usage["system_seconds"], 2),
            "stdout": texts[0], "stderr": texts[1]}


def machine_info() -> dict:
    import safetensors

    import lmc

    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    return {"cpu": models[0] if models else platform.processor(), "cpu_count": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "safetensors": safetensors.__version__,
            "lmc": lmc.__version__}


def convert_and_verify(python: str, src: Path, ws: Path, ckpt_bytes: int) -> dict:
    """`lmc convert` then `lmc verify` of its output with the interpreter `python`, each from a cold
    page cache; the load average before each command and the output's manifest.json bytes."""
    lmc = [python, "-m", "lmc"]
    shutil.rmtree(ws, ignore_errors=True)
    drop_page_cache(src)
    load = os.getloadavg()[0]
    convert = run_measured(lmc + ["convert", str(src), "-o", str(ws)])
    if convert["exit_code"] != 0:
        sys.exit(f"lmc convert failed: {convert['stderr']}")
    ws_bytes = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file())
    convert.update(load_average_1m=round(load, 2), workspace_bytes=ws_bytes,
                   source_gb_per_s=round(ckpt_bytes / 1e9 / convert["seconds"], 3))
    drop_page_cache(ws)
    load = os.getloadavg()[0]
    verify = run_measured(lmc + ["verify", str(ws)])
    if verify["exit_code"] != 0:
        sys.exit(f"lmc verify failed: {verify['stderr']}")
    verify.update(load_average_1m=round(load, 2), workspace_gb_per_s=round(ws_bytes / 1e9 / verify["seconds"], 3))
    data_files = sorted(rel for rel in json.loads((ws / "manifest.json").read_bytes())["files"] if rel != "lmc.json")
    return {"convert": convert, "verify": verify, "manifest": (ws / "manifest.json").read_bytes(),
            "data": {rel: file_digest(ws / rel, DIGEST) for rel in data_files}}  # every file but the two JSON ones


def _line(name: str, run: dict) -> str:
    c, v = run["convert"], run["verify"]
    return (f"{name}: convert {c['seconds']} s ({c['source_gb_per_s']} GB/s, CPU {c['user_seconds']} + "
            f"{c['system_seconds']} s, anon {(c['peak_rss_anon_sampled_bytes'] or 0) / 2**20:.0f} MiB, load "
            f"{c['load_average_1m']}), verify {v['seconds']} s ({v['workspace_gb_per_s']} GB/s, load {v['load_average_1m']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/convert_2gb.json", help="JSON results file")
    ap.add_argument("--workdir", default=None, help="where the checkpoint and workspace go (default: a temp folder in /tmp)")
    ap.add_argument("--layers", type=int, default=TINYLLAMA["num_hidden_layers"], help="decoder layers (22: 2.2 GB)")
    ap.add_argument("--shards", type=int, default=4, help="safetensors shards of the source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and workspace")
    ap.add_argument("--repeat", type=int, default=1, help="convert + verify runs (the fastest convert is reported)")
    ap.add_argument("--reference-python", default=None,
                    help="the interpreter of another lmc checkout (e.g. an older commit's venv): its convert + verify "
                         "run alternately with this one's on the same checkpoint, and the outputs are compared byte "
                         "for byte (the weights and tokenizer files by their BLAKE3 digests, taken by this script, so "
                         "that the two may write different format versions)")
    args = ap.parse_args()

    cfg = {**TINYLLAMA, "num_hidden_layers": args.layers}
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lmc-bench-convert-", dir=args.workdir))
    src = work / "llama-random-fp16"
    load_before = os.getloadavg()
    runs, reference_runs, copies = [], [], []
    try:
        t0 = time.perf_counter()
        ckpt = make_checkpoint(src, cfg, args.shards, args.seed)
        ckpt.update(config=cfg, generate_seconds=round(time.perf_counter() - t0, 2))
        print(f"checkpoint: {ckpt['bytes'] / 1e9:.2f} GB in {ckpt['shards']} shards ({ckpt['generate_seconds']} s)", flush=True)
        imports = run_measured([sys.executable, "-c", "import lmc.cli, lmc.compiler.convert, lmc.format.workspace"])
        disk = cold_read(src)
        print(f"cold read of the source: {disk['gb_per_s']} GB/s", flush=True)
        for i in range(args.repeat):
            try:
                copies.append(disk_copy(src, work / "copy"))
                print(f"disk copy {i + 1}: {copies[-1]['seconds']} s ({copies[-1]['gb_per_s']} GB/s of source)", flush=True)
            except OSError as e:  # a filesystem without O_DIRECT (tmpfs): no copy floor to compare with
                shutil.rmtree(work / "copy", ignore_errors=True)
                copies.append({"skipped": f"O_DIRECT copy failed: {e}"})
                print(f"disk copy {i + 1}: skipped ({e})", flush=True)
            runs.append(convert_and_verify(sys.executable, src, work / "workspace", ckpt["bytes"]))
            print(_line(f"run {i + 1}", runs[-1]), flush=True)
            if args.reference_python:
                reference_runs.append(convert_and_verify(args.reference_python, src, work / "reference", ckpt["bytes"]))
                print(_line(f"reference run {i + 1}", reference_runs[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    best = min(runs, key=lambda r: r["convert"]["seconds"])
    manifest = json.loads(best["manifest"])
    result = {"benchmark": "lmc convert + verify, random fp16 Llama (TinyLlama-1.1B shape)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python"] + sys.argv), "page_cache": "dropped before each command (cold reads)",
              "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
              "machine": machine_info(), "disk_cold_read": disk, "disk_copies": copies,
              "import_baseline": {k: imports[k] for k in ("command", "seconds", "peak_rss_bytes")},
              "checkpoint": ckpt, "convert": best["convert"], "verify": best["verify"],
              "output_files": manifest["files"],
              "runs": [{k: r[k] for k in ("convert", "verify")} for r in runs]}
    if reference_runs:
        result["reference"] = {"python": args.reference_python,
                               "output_identical": all(r["data"] == best["data"] for r in reference_runs + runs),
                               "manifest_identical": all(r["manifest"] == best["manifest"] for r in reference_runs + runs),
                               "runs": [{k: r[k] for k in ("convert", "verify")} for r in reference_runs]}
        print(f"weights and tokenizer files byte-identical to the reference: {result['reference']['output_identical']}; "
              f"manifest.json too: {result['reference']['manifest_identical']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
