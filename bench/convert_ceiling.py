"""The most a torch-free `lmc convert` could do here: the ceiling of a pass-through conversion.

For a plain float checkpoint at tp 1 whose dtype is kept, a workspace's weights are the source's
tensor bytes under a new header. This script does only the work any such converter must do,
with nothing else around it: the source files hashed (sha256, two threads, as the provenance
needs), every tensor's bytes read from a memory map, checked for NaN/Inf on their integer bits
(numpy) and written to one output file that is hashed as it is written (two threads, as
lmc's writer does; `--output-hash blake3` asks what a faster checksum than the format's sha256 would give). No torch, no header, no plan, no tokenizer: so its time is a lower bound for
`lmc convert` of the same checkpoint. The source is dropped from the page cache before each run
(cold, as bench_convert.py measures); `--warm` keeps it.

    python bench/bench_convert.py --keep --workdir /tmp/cb --repeat 1   # leaves /tmp/cb/lmc-bench-convert-*/llama-random-fp16
    python bench/convert_ceiling.py /tmp/cb/lmc-bench-convert-*/llama-random-fp16 --repeat 3 --out bench/results/convert_ceiling_sha256.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import queue
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import cold_read, drop_page_cache, machine_info  # noqa: E402

CHUNK = 16 * 1024**2
DIRECT_BLOCK = 4096
EXPONENT_MASKS = {"F16": (np.uint16, 0x7FFF, 0x7C00), "BF16": (np.uint16, 0x7FFF, 0x7F80),
                  "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000)}  # |bits| >= mask's exponent: Inf or NaN


class ReadProgress:
    """How far each source file's hasher has read: the copy follows it, so that the disk is read once,
    sequentially, by the hashers, and the copy's memory-map reads find the pages in the page cache."""

    def __init__(self):
        self.cond = threading.Condition()
        self.done: dict[Path, int] = {}

    def advance(self, path: Path, offset: int) -> None:
        with self.cond:
            self.done[path] = offset
            self.cond.notify_all()

    def wait(self, path: Path, offset: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done.get(path, 0) >= offset)


def sha256_file(path: Path, progress: ReadProgress) -> str:
    sha, buf = hashlib.sha256(), bytearray(CHUNK)
    view, offset = memoryview(buf), 0
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            sha.update(view[:n])
            offset += n
            progress.advance(path, offset)
    progress.advance(path, 1 << 62)
    return sha.hexdigest()


class DirectFile:
    """Writes through O_DIRECT from one page-aligned staging buffer (zero-padded tail, then truncate)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self.staging = mmap.mmap(-1, 8 * 1024**2)
        self.bytes = np.frombuffer(self.staging, np.uint8)
        self.fill = self.size = 0

    def write(self, data) -> None:
        src = np.frombuffer(data, np.uint8)
        while len(src):
            n = min(len(src), len(self.bytes) - self.fill)
            self.bytes[self.fill:self.fill + n] = src[:n]
            self.fill, self.size, src = self.fill + n, self.size + n, src[n:]
            if self.fill == len(self.bytes):
                os.pwrite(self.fd, memoryview(self.staging), self.size - self.fill)
                self.fill = 0

    def close(self) -> None:
        if self.fill:
            padded = -(-self.fill // DIRECT_BLOCK) * DIRECT_BLOCK
            self.bytes[self.fill:padded] = 0
            os.pwrite(self.fd, memoryview(self.staging)[:padded], self.size - self.fill)
        os.ftruncate(self.fd, self.size)
        os.close(self.fd)


def pass_through(src: Path, out: Path, direct: bool, follow: bool, output_hash: str) -> dict:
    """Hash the source, copy every tensor's bytes into `out` (checked, hashed): returns what it found."""
    start = time.perf_counter()
    files = sorted(src.glob("*.safetensors"))
    source_sha: dict[str, str] = {}
    progress = ReadProgress()

    def hash_some(some: list[Path]) -> None:
        for f in some:
            source_sha[f.name] = sha256_file(f, progress)

    hashers = [threading.Thread(target=hash_some, args=(files[i::2],)) for i in range(2)]
    for t in hashers:
        t.start()
    pieces, maps = [], []
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
            maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        view = memoryview(maps[-1])
        for name, entry in header.items():
            if name != "__metadata__":
                a, b = entry["data_offsets"]
                pieces.append((f, 8 + n + a, entry["dtype"], view[8 + n + a:8 + n + b]))
    sink = DirectFile(out) if direct else open(out, "wb")
    if output_hash == "blake3":
        from blake3 import blake3  # pip install blake3: the question is what a faster output checksum would give
        out_sha = blake3()
    else:
        out_sha = hashlib.sha256()
    queues = (queue.SimpleQueue(), queue.SimpleQueue())

    def drain(q: queue.SimpleQueue, work) -> None:
        while (item := q.get()) is not None:
            work(item)

    workers = [threading.Thread(target=drain, args=(q, w)) for q, w in zip(queues, (sink.write, out_sha.update))]
    for t in workers:
        t.start()
    nonfinite = 0
    for path, first, dtype, data in pieces:
        kind, magnitude, exponent = EXPONENT_MASKS[dtype]
        for s in range(0, len(data), CHUNK):
            piece = data[s:s + CHUNK]
            if follow:
                progress.wait(path, first + s + len(piece))
            for q in queues:
                q.put(piece)
            nonfinite += int((np.frombuffer(piece, kind) & magnitude).max(initial=0) >= exponent)
    for q in queues:
        q.put(None)
    for t in workers + hashers:
        t.join()
    sink.close()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "tensors_with_nonfinite": nonfinite, "output_sha256": out_sha.hexdigest(),
            "source_files_hashed": len(source_sha)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="an HF float safetensors folder (bench_convert.py --keep makes one)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--direct", action="store_true", help="write with O_DIRECT (else buffered)")
    ap.add_argument("--follow", action="store_true", help="the copy reads behind the source hashers (ReadProgress)")
    ap.add_argument("--output-hash", choices=("sha256", "blake3"), default="sha256",
                    help="the output file's checksum (lmc's format: sha256; blake3 needs pip install blake3)")
    ap.add_argument("--warm", action="store_true", help="leave the source in the page cache")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    nbytes = sum(f.stat().st_size for f in args.src.glob("*.safetensors"))
    runs = []
    for _ in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="ceiling-", dir=args.src.parent))
        try:
            if not args.warm:
                drop_page_cache(args.src)
            before = os.times()
            run = pass_through(args.src, work / "out.safetensors", args.direct, args.follow, args.output_hash)
            after = os.times()
            run.update(user_seconds=round(after.user - before.user, 2), system_seconds=round(after.system - before.system, 2),
                       gb_per_s=round(nbytes / 1e9 / run["seconds"], 3))
            runs.append(run)
            print(json.dumps(run))
        finally:
            shutil.rmtree(work)
        runs[-1]["cold_read_after"] = cold_read(args.src)
    result = {"machine": machine_info(), "command": " ".join(sys.argv), "source_bytes": nbytes, "direct": args.direct, "follow": args.follow, "output_hash": args.output_hash,
              "warm": args.warm, "runs": runs}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
