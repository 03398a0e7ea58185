"""Which device runs, and in which float dtype: decided here once for every command."""
from __future__ import annotations

import gc
import os
import threading
from contextlib import contextmanager

import torch

from lmc.errors import LmcError


def pick_device(name: str | None) -> torch.device:
    """"cuda", "cuda:N", "cpu" or None (cuda when available)."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise LmcError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype a model computes in: the stored one on a GPU; float32 on the CPU, where fp16/bf16
    matmuls are slow and inexact."""
    return stored if device.type == "cuda" else torch.float32


def host_available() -> int:
    """Bytes of host memory available now (MemAvailable), or a huge number where /proc is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def default_threads() -> int:
    """CPU threads for torch: the usable cores less the cores other processes keep busy (1-minute load
    average), at least 1. On a loaded machine, OpenMP threads that wait for a descheduled sibling spin;
    on this project's 2-core CI a 2-thread matmul loop took 70 s where 1 thread took 8.8 s (bench/NOTES.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def set_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: default_threads()); returns the number set."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


@contextmanager
def one_torch_thread():
    """torch's intra-op threads set to 1 for the duration, for work whose parallelism is its own threads or whose
    ops are too small to split: OpenMP threads spin when a core is taken (2 busy cores: aminmax of a float16
    [5632, 2048] 1.9 ms on one thread, 16 ms on two; GPTQ's column loop over 576 x 1536 1.5 s against 11 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_HEAP_LOCK = threading.Lock()
_HEAP_HOLDERS = 0  # freeze_heap calls not yet matched by thaw_heap


def freeze_heap() -> None:
    """Move every live Python object into the collector's permanent generation (after a full collection), so that
    the oldest generation's collections, which Python runs on its own as objects pile up, no longer walk the
    start-up heap (modules, the model's tables, compiled kernels: ~220,000 objects for a tiny CPU engine, whose
    full collection takes 58-75 ms on a 2-core VM and 0 ms once frozen). A serving step that meets such a
    collection stalls: one decode step of an 8B int4 engine on an H200 took 154 ms instead of 11 (bench/NOTES.md,
    session 20). vLLM's engine freezes its start-up heap the same way. Objects still die by reference count;
    only reference cycles among frozen objects wait for the last `thaw_heap()` (Engine.close). Counted: each call
    is one holder, and the heap stays frozen until every holder has thawed (two engines in one process)."""
    global _HEAP_HOLDERS
    with _HEAP_LOCK:
        gc.collect()
        gc.freeze()
        _HEAP_HOLDERS += 1


def thaw_heap() -> None:
    """One holder of `freeze_heap` lets go; the last one gives the frozen heap back to the collector (gc.unfreeze
    is process-wide, so an engine closing must not thaw the heap another engine in the process still relies on)."""
    global _HEAP_HOLDERS
    with _HEAP_LOCK:
        _HEAP_HOLDERS = max(0, _HEAP_HOLDERS - 1)
        if _HEAP_HOLDERS == 0:
            gc.unfreeze()

