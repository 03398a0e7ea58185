"""One device buffer per rank, each mapped into every rank's process: the peer memory the one-shot all-reduce
(kernels/allreduce.py) reads over NVLink.

CUDA IPC through the driver API (libcuda, present wherever a CUDA GPU is): each rank allocates its buffer,
exports the handle of the allocation that holds it (`cuIpcGetMemHandle` on the allocation's base, plus the
buffer's offset in it), the ranks swap handles over a CPU process group, and each opens its peers' handles
(`cuIpcOpenMemHandle` with lazy peer access: the pointer is valid on this rank's own device). Nothing is kept
per process beyond the open mappings, which `close()` releases: a later engine in the same process with new
peers sets up afresh. (torch's symmetric memory keeps its rendezvous store per process-group name, and
names restart after `destroy_process_group`, so a second engine in one process hung there on 2 x H200.)

    exchanged per rank: uint8 [73] = 1 if the rank could export its buffer (else 0 and the rest unused),
                        the 64-byte CUipcMemHandle, the buffer's offset in its allocation (int64, little-endian)
"""
from __future__ import annotations

import ctypes

import torch

HANDLE_BYTES = 64
LAZY_ENABLE_PEER_ACCESS = 1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
ALLOC_ALIGN = 2 << 20  # buffers of >= 2 MiB get an allocation of their own from torch's caching allocator


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


class PeerMemoryError(RuntimeError):
    pass


_cuda = None


def _driver():
    global _cuda
    if _cuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_uint64]
        lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint]
        lib.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
        lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.c_uint64]
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _cuda = lib
    return _cuda


def _check(result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(msg))
        raise PeerMemoryError(f"{what}: CUDA error {result} ({(msg.value or b'?').decode()})")


class PeerBuffers:
    """`nbytes` of device memory on this rank, and the addresses of every rank's buffer as this process sees
    them (`ptrs[r]`; `ptrs[rank]` is the local one). Every rank constructs it at the same point (a collective
    over `group`, a gloo process group)."""

    def __init__(self, group, device: torch.device, nbytes: int):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        size = -(-nbytes // ALLOC_ALIGN) * ALLOC_ALIGN
        self.buffer = torch.zeros(size, dtype=torch.uint8, device=device)  # [size]
        torch.cuda.synchronize(device)  # zeroed (and this thread's context current) before anyone maps it
        self.ptrs, self._opened = [], []
        mine, error = torch.zeros(1 + HANDLE_BYTES + 8, dtype=torch.uint8), None  # [73], layout in the docstring
        try:
            mine[1:] = self._export()
            mine[0] = 1
        except (OSError, AttributeError, PeerMemoryError) as e:  # no libcuda, or memory that IPC cannot share
            error = e
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=group)  # every rank takes part, so a failure cannot hang a peer
        if error is None and all(int(blob[0]) for blob in everyone):
            try:
                self._open(everyone)
            except PeerMemoryError as e:
                error = e
        ok = torch.tensor([error is None and all(int(blob[0]) for blob in everyone)], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # every rank has mapped every buffer, or none uses them
        if not int(ok):
            self.close()
            raise error if error is not None else PeerMemoryError("another rank could not share its buffer")

    def _export(self) -> torch.Tensor:
        """This rank's handle and offset: uint8 [72]."""
        cuda = _driver()
        local = self.buffer.data_ptr()
        base, length = ctypes.c_uint64(), ctypes.c_size_t()
        _check(cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(length), local), "cuMemGetAddressRange")
        handle = _IpcHandle()
        _check(cuda.cuIpcGetMemHandle(ctypes.byref(handle), base.value), "cuIpcGetMemHandle")
        raw = ctypes.string_at(ctypes.addressof(handle), HANDLE_BYTES)
        offset = torch.tensor([local - base.value], dtype=torch.int64).view(torch.uint8)  # [8]
        return torch.cat([torch.frombuffer(bytearray(raw), dtype=torch.uint8), offset])

    def _open(self, everyone: list[torch.Tensor]) -> None:
        cuda = _driver()
        for r, blob in enumerate(everyone):
            if r == self.rank:
                self.ptrs.append(self.buffer.data_ptr())
                continue
            peer = _IpcHandle()
            ctypes.memmove(ctypes.byref(peer), bytes(blob[1:1 + HANDLE_BYTES].tolist()), HANDLE_BYTES)
            mapped = ctypes.c_uint64()
            _check(cuda.cuIpcOpenMemHandle_v2(ctypes.byref(mapped), peer, LAZY_ENABLE_PEER_ACCESS),
                   f"cuIpcOpenMemHandle (rank {r}'s buffer)")
            self._opened.append(mapped.value)
            self.ptrs.append(mapped.value + int(blob[1 + HANDLE_BYTES:].clone().view(torch.int64)))

    def close(self) -> None:
        """Unmap the peers' buffers (the local one goes back to torch with this object)."""
        for ptr in self._opened:
            _driver().cuIpcCloseMemHandle(ptr)
        self._opened = []
