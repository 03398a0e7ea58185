"""One-shot all-reduce for tensor-parallel decode: each rank sums every rank's partial output in one kernel,
reading the peers' copies straight from their memory over NVLink. A decode-sized sum (batch x hidden float16,
8 KB at batch 1 on the 8B shape) is latency-bound: NCCL's ring took ~17 µs per call inside a CUDA graph on 2 x
H200 (bench/NOTES.md, "Tensor parallel"), 64 calls per 8B step; one kernel with one cross-GPU handshake needs a
few µs.

Each rank owns one buffer that every rank has mapped (CUDA IPC, kernels/peer_memory.py; `OneShotAllReduce`):

    int32  flags [MAX_PROGRAMS, world]   at byte 0; flags[p, r] = 1: rank r's program p has published its chunk
                                          (rank r sets it in the reader's buffer; the reader sets it back to 0)
    x.dtype slot 0 [capacity]             at byte DATA_OFFSET: the attention output projection's partial sums
    x.dtype slot 1 [capacity]             right after slot 0: the MLP down projection's

A call (every rank, same n, same slot, same grid): program p copies its chunks of x into the rank's own slot,
sets flags[p, rank] in every peer's buffer (waiting until the peer has consumed the previous call's 1), waits
until each peer has set its flags[p, peer] in this rank's buffer (and clears them), then sums its chunks over
the ranks in rank order (so every rank computes bit-identical sums) and writes them over x. Programs pair with
the same program of every peer only: no grid-wide barrier. No end barrier either: a rank overwrites a slot only
two calls later, and the call in between cannot complete before every peer finished reading that slot (its
handshake waits for each peer's next kernel, which starts after the peer's previous one ended). That needs the
calls to alternate between the slots, which the model's attention / MLP order gives (runtime/model.py), also
across CUDA-graph replays: each step starts with slot 0 and ends with slot 1.

The decode step uses the fused form (`one_shot_add_rms_norm`): the same call, with program p owning whole rows
p, p + P, ... of x [T, H], whose second half adds the residual stream and applies the next RMSNorm to the sum (the
norm after attention, or the next layer's / the final one after the MLP), so no norm kernel runs on its own. The
argument above does not need equal grids across calls: a call completes only after some program of each peer
reached the same call, so the grid of the plain and the fused calls may differ.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: tensor parallel on the CPU uses gloo
    triton = None

MAX_PROGRAMS = 128  # programs per call (at most one per SM); FLAG_BYTES holds their flags for up to 8 ranks
FLAG_BYTES = 4096  # = MAX_PROGRAMS * 8 ranks * 4 bytes, and keeps the data 4 KiB-aligned
DATA_OFFSET = FLAG_BYTES
BLOCK = 1024  # elements per program per chunk


def one_shot_all_reduce_ref(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum every rank computes: float32 accumulation in rank order, rounded once to the parts' dtype."""
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)


if triton is not None:

    @triton.jit
    def _exchange(flag_ptrs, pid, RANK: tl.constexpr, WORLD: tl.constexpr):
        """Program pid's handshake with the same program of every peer: publish (set flags[pid, RANK] in each
        peer's buffer, once the peer consumed the last call's), then wait for and consume each peer's flag."""
        own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32)) + pid * WORLD
        for r in tl.static_range(WORLD):
            if r != RANK:
                peer_flag = tl.load(flag_ptrs + r).to(tl.pointer_type(tl.int32)) + pid * WORLD + RANK
                while tl.atomic_cas(peer_flag, 0, 1, sem="release", scope="sys") != 0:
                    pass
        for r in tl.static_range(WORLD):
            if r != RANK:
                while tl.atomic_cas(own_flags + r, 1, 0, sem="acquire", scope="sys") != 1:
                    pass

    @triton.jit
    def _sum_over_ranks(x_ptr, data_ptrs, slot_elems, offs, mask, RANK: tl.constexpr, WORLD: tl.constexpr):
        """float32 sum of every rank's elements at offs, in rank order (bit-identical on every rank)."""
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros(offs.shape, tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                part = tl.load(x_ptr + offs, mask=mask, other=0.0)
            else:
                peer = tl.load(data_ptrs + r).to(tl.pointer_type(dtype)) + slot_elems
                part = tl.load(peer + offs, mask=mask, other=0.0, cache_modifier=".cg")  # past this SM's L1
            acc += part.to(tl.float32)
        return acc

    @triton.jit
    def _one_shot_kernel(x_ptr, data_ptrs, flag_ptrs, n, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr,
                         BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK
        dtype = x_ptr.dtype.element_ty
        own = tl.load(data_ptrs + RANK).to(tl.pointer_type(dtype)) + slot_elems  # this rank's slot
        for start in range(pid * BLOCK, n, step):
            offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(own + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
        tl.debug_barrier()  # every thread's chunk is written before the release below publishes it
        _exchange(flag_ptrs, pid, RANK, WORLD)
        tl.debug_barrier()  # no thread reads a peer's chunk before the handshake above saw it published
        for start in range(pid * BLOCK, n, step):
            offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
            mask = offs < n
            acc = _sum_over_ranks(x_ptr, data_ptrs, slot_elems, offs, mask, RANK, WORLD)
            tl.store(x_ptr + offs, acc.to(dtype), mask=mask)

    @triton.jit
    def _one_shot_add_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, data_ptrs, flag_ptrs, T, H, eps, slot_elems,
                                  RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK_H: tl.constexpr):
        """The one-shot sum of x [T, H] fused with the next residual add and RMSNorm (kernels/rmsnorm.py's math:
        s = sum rounded to x.dtype, h = (s + residual) rounded, y = weight * (h * rsqrt(mean(h^2) + eps)) rounded
        twice as there). Program p owns rows p, p + P, ... (P programs), in both halves of the call."""
        pid = tl.program_id(0)
        progs = tl.num_programs(0)
        dtype = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        own = tl.load(data_ptrs + RANK).to(tl.pointer_type(dtype)) + slot_elems  # this rank's slot
        for row in range(pid, T, progs):
            offs = row * H + cols  # T * H <= the slot capacity: int32 offsets suffice
            tl.store(own + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
        tl.debug_barrier()
        _exchange(flag_ptrs, pid, RANK, WORLD)
        tl.debug_barrier()
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        for row in range(pid, T, progs):
            offs = row * H + cols  # T * H <= the slot capacity: int32 offsets suffice
            s = _sum_over_ranks(x_ptr, data_ptrs, slot_elems, offs, mask, RANK, WORLD).to(dtype)
            r = tl.load(res_ptr + offs, mask=mask, other=0.0)
            h_low = (s.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(h_ptr + offs, h_low, mask=mask)
            h = h_low.to(tl.float32)
            var = tl.sum(h * h, axis=0) / H
            normed = (h * tl.math.rsqrt(var + eps)).to(dtype)
            tl.store(y_ptr + offs, (normed.to(tl.float32) * w).to(dtype), mask=mask)


def one_shot_all_reduce(x: torch.Tensor, data_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, rank: int, world: int,
                        slot: int, capacity: int) -> torch.Tensor:
    """Sum x (contiguous) over the ranks in place. data_ptrs / flag_ptrs: int64 [world] on x's device, the
    addresses of every rank's data region and flags (layout above); capacity: elements per slot."""
    n = x.numel()
    assert x.is_contiguous() and n <= capacity and slot in (0, 1)
    grid = (max(1, min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)),)
    _one_shot_kernel[grid](x, data_ptrs, flag_ptrs, n, slot * capacity, RANK=rank, WORLD=world, BLOCK=BLOCK,
                           num_warps=4)
    return x


def one_shot_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                          data_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, rank: int, world: int, slot: int,
                          capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] summed over the ranks, plus residual [T, H], then RMSNorm with weight [H]: returns (normed, the new
    residual stream), both [T, H] in x.dtype, as rms_norm(all_reduce(x), weight, eps, residual) gives them; x is
    left as it was. One kernel: the decode step's norm after each row-parallel linear costs no launch of its own."""
    t, h = x.shape
    assert x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape and weight.shape == (h,)
    assert x.numel() <= capacity and slot in (0, 1)
    y, new_residual = torch.empty_like(x), torch.empty_like(x)  # [T, H] each
    block_h = triton.next_power_of_2(h)
    _one_shot_add_norm_kernel[(max(1, min(t, MAX_PROGRAMS)),)](
        x, residual, weight, y, new_residual, data_ptrs, flag_ptrs, t, h, eps, slot * capacity,
        RANK=rank, WORLD=world, BLOCK_H=block_h, num_warps=min(max(block_h // 512, 4), 16))
    return y, new_residual


class OneShotAllReduce:
    """The peer buffers of one group of CUDA ranks (NVLink or PCIe peer access) and the one-shot sum over them.
    Every rank constructs it at the same point (a collective over `group`, a gloo group: the buffers' handles
    travel over it; kernels/peer_memory.py). Raises PeerMemoryError on every rank if any rank cannot share."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, capacity: int):
        from lmc.kernels.peer_memory import PeerBuffers

        self.dtype, self.capacity = dtype, capacity
        self.peers = PeerBuffers(group, device, DATA_OFFSET + 2 * capacity * dtype.itemsize)  # layout above
        self.rank, self.world = self.peers.rank, self.peers.world
        assert self.world * MAX_PROGRAMS * 4 <= FLAG_BYTES
        bases = torch.tensor(self.peers.ptrs, dtype=torch.int64)
        self.flag_ptrs = bases.to(device)  # [world]
        self.data_ptrs = (bases + DATA_OFFSET).to(device)  # [world]

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.is_contiguous() and x.numel() <= self.capacity

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return one_shot_all_reduce(x, self.data_ptrs, self.flag_ptrs, self.rank, self.world, slot, self.capacity)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return one_shot_add_rms_norm(x, residual, weight, eps, self.data_ptrs, self.flag_ptrs, self.rank, self.world,
                                     slot, self.capacity)

    def close(self) -> None:
        self.peers.close()
