"""One-shot all-reduce for tensor-parallel decode: each rank pushes its partial output into every peer's memory
over NVLink and sums what the peers pushed into its own, in one kernel. A decode-sized sum (batch x hidden
float16, 8 KB at batch 1 on the 8B shape) is latency-bound: NCCL's ring took ~12-17 µs per call inside a CUDA
graph on 2 x H200 (bench/NOTES.md, "Tensor parallel"), 64 calls per 8B step.

The data is its own flag (the "Lamport" scheme of TensorRT-LLM's low-latency all-reduce): every receive
element holds -0.0 until a peer's value lands in it, and writers send -0.0 as +0.0 (equal in value), so a
reader polls its own memory until no element is -0.0, with no handshake on the path and no read across NVLink.
Each rank owns one buffer that every rank has mapped (CUDA IPC, kernels/peer_memory.py; `OneShotAllReduce`):

    x.dtype recv [2 slots, world, capacity]   recv[s, r]: what rank r pushed in a call on slot s; -0.0 = empty
                                              (slot 0: the attention output projection's sums, slot 1: the MLP's)

A call (every rank, same n, same slot, same grid; program p owns the same chunks on every rank): program p waits
for the previous kernel (PDL), loads its chunks of x, stores them (-0.0 as +0.0) into recv[slot, rank] of every
peer, polls recv[slot, r] of its own buffer for each peer r until every element arrived, sums the ranks in rank
order (its own chunk from registers, so every rank computes bit-identical sums), writes the sum and stores -0.0
back into the peer regions it read. Reuse is safe without an end barrier: rank r writes recv[slot, r] of rank q
again two calls later, and its call in between completed only after q's call in between pushed, which q issued
after its previous call, the reset included, had completed. That needs the calls to alternate between the slots,
which the model's attention / MLP order gives (runtime/model.py), also across CUDA-graph replays: each step starts
with slot 0 and ends with slot 1.

The decode step uses the fused form (`one_shot_add_rms_norm`): the same call, with program p owning whole rows
p, p + P, ... of x [T, H], which adds the residual stream to the sum and applies the next RMSNorm (the norm
after attention, or the next layer's / the final one after the MLP), so no norm kernel runs on its own.
"""
from __future__ import annotations

import torch

from lmc.kernels.pdl import pdl_launch, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: tensor parallel on the CPU uses gloo
    triton = None

if triton is not None:
    from lmc.kernels.rmsnorm import add_rms_norm_values

MAX_PROGRAMS = 128  # programs per call (at most one per SM)
BLOCK = 1024  # elements per program per chunk


def one_shot_all_reduce_ref(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum every rank computes: float32 accumulation in rank order, rounded once to the parts' dtype."""
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)


def fill_empty(recv: torch.Tensor) -> None:
    """Mark a receive region empty: every element -0.0 (the layout above)."""
    recv.fill_(-0.0)


if triton is not None:

    @triton.jit
    def _is_empty(v, BITS: tl.constexpr):
        """-0.0, the value no writer sends (bitwise: -0.0 == +0.0 as floats)."""
        if BITS == 16:
            return v.to(tl.int16, bitcast=True) == -32768
        else:
            return v.to(tl.int32, bitcast=True) == -2147483648

    @triton.jit
    def _empty_like(v, BITS: tl.constexpr):
        if BITS == 16:
            return tl.full(v.shape, -32768, tl.int16).to(v.dtype, bitcast=True)
        else:
            return tl.full(v.shape, -2147483648, tl.int32).to(v.dtype, bitcast=True)

    @triton.jit
    def _sendable(v, BITS: tl.constexpr):
        """v with -0.0 replaced by +0.0 (the same value), in integer bits so no float rule can keep the sign."""
        if BITS == 16:
            bits = v.to(tl.int16, bitcast=True)
            return tl.where(bits == -32768, 0, bits).to(tl.int16).to(v.dtype, bitcast=True)
        else:
            bits = v.to(tl.int32, bitcast=True)
            return tl.where(bits == -2147483648, 0, bits).to(v.dtype, bitcast=True)

    @triton.jit
    def _push(x_ptr, recv_ptrs, slot_off, capacity, offs, mask, RANK: tl.constexpr, WORLD: tl.constexpr,
              BITS: tl.constexpr):
        """Load x at offs and store it (-0.0 as +0.0) into recv[slot, RANK] of every peer."""
        x = _sendable(tl.load(x_ptr + offs, mask=mask, other=0.0), BITS)
        for r in tl.static_range(WORLD):
            if r != RANK:
                peer = tl.load(recv_ptrs + r).to(tl.pointer_type(x_ptr.dtype.element_ty))
                tl.store(peer + slot_off + RANK * capacity + offs, x, mask=mask)

    @triton.jit
    def _sum_over_ranks(mine, recv_ptrs, slot_off, capacity, offs, mask, RANK: tl.constexpr, WORLD: tl.constexpr,
                        BITS: tl.constexpr):
        """float32 sum of every rank's elements at offs in rank order (bit-identical on every rank): this rank's
        (mine, as sent) from registers, each peer's polled in this rank's recv[slot, r] until all arrived, and
        that region emptied again."""
        own = tl.load(recv_ptrs + RANK).to(tl.pointer_type(mine.dtype)) + slot_off  # this rank's recv[slot]
        acc = tl.zeros(offs.shape, tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                acc += mine.to(tl.float32)
            else:
                ptrs = own + r * capacity + offs
                part = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
                while tl.sum((_is_empty(part, BITS) & mask).to(tl.int32), axis=0) > 0:
                    part = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
                tl.store(ptrs, _empty_like(part, BITS), mask=mask)  # empty again for the call two later
                acc += part.to(tl.float32)
        return acc

    @triton.jit
    def _one_shot_kernel(x_ptr, recv_ptrs, n, slot_off, capacity, RANK: tl.constexpr, WORLD: tl.constexpr,
                         BITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK
        for start in range(pid * BLOCK, n, step):  # push every chunk first, so no rank polls while holding back
            offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
            _push(x_ptr, recv_ptrs, slot_off, capacity, offs, offs < n, RANK, WORLD, BITS)
        for start in range(pid * BLOCK, n, step):
            offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
            mask = offs < n
            mine = _sendable(tl.load(x_ptr + offs, mask=mask, other=0.0), BITS)
            acc = _sum_over_ranks(mine, recv_ptrs, slot_off, capacity, offs, mask, RANK, WORLD, BITS)
            tl.store(x_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _one_shot_add_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, recv_ptrs, T, H, eps, slot_off, capacity,
                                  RANK: tl.constexpr, WORLD: tl.constexpr, BITS: tl.constexpr, BLOCK_H: tl.constexpr,
                                  PDL: tl.constexpr):
        """The one-shot sum of x [T, H] fused with the next residual add and RMSNorm (kernels/rmsnorm.py's math:
        s = sum rounded to x.dtype, h = (s + residual) rounded, y = weight * (h * rsqrt(mean(h^2) + eps)) rounded
        twice as there). Program p owns rows p, p + P, ... (P programs)."""
        pid = tl.program_id(0)
        progs = tl.num_programs(0)
        dtype = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: before the wait
        pdl_wait(PDL)
        for row in range(pid, T, progs):  # T * H <= the slot capacity: int32 offsets suffice
            _push(x_ptr, recv_ptrs, slot_off, capacity, row * H + cols, mask, RANK, WORLD, BITS)
        for row in range(pid, T, progs):
            offs = row * H + cols
            mine = _sendable(tl.load(x_ptr + offs, mask=mask, other=0.0), BITS)
            r = tl.load(res_ptr + offs, mask=mask, other=0.0)  # issued before the polling: its latency overlaps it
            s = _sum_over_ranks(mine, recv_ptrs, slot_off, capacity, offs, mask, RANK, WORLD, BITS).to(dtype)
            y, h = add_rms_norm_values(s, r, w, H, eps)
            tl.store(h_ptr + offs, h, mask=mask)
            tl.store(y_ptr + offs, y, mask=mask)


def _bits(dtype: torch.dtype) -> int:
    assert dtype in (torch.float16, torch.bfloat16, torch.float32), f"one-shot all-reduce of {dtype}"
    return 8 * dtype.itemsize


def one_shot_all_reduce(x: torch.Tensor, recv_ptrs: torch.Tensor, rank: int, world: int, slot: int,
                        capacity: int) -> torch.Tensor:
    """Sum x (contiguous) over the ranks in place. recv_ptrs: int64 [world] on x's device, the address of every
    rank's receive buffer (layout above) as this process sees it; capacity: elements per rank per slot."""
    n = x.numel()
    assert x.is_contiguous() and n <= capacity and slot in (0, 1)
    grid = (max(1, min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)),)
    _one_shot_kernel[grid](x, recv_ptrs, n, slot * world * capacity, capacity, RANK=rank, WORLD=world,
                           BITS=_bits(x.dtype), BLOCK=BLOCK, num_warps=4, **pdl_launch(x.device))
    return x


def one_shot_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                          recv_ptrs: torch.Tensor, rank: int, world: int, slot: int,
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
        x, residual, weight, y, new_residual, recv_ptrs, t, h, eps, slot * world * capacity, capacity,
        RANK=rank, WORLD=world, BITS=_bits(x.dtype), BLOCK_H=block_h, num_warps=min(max(block_h // 512, 4), 16),
        **pdl_launch(x.device))
    return y, new_residual


class OneShotAllReduce:
    """The peer buffers of one group of CUDA ranks (NVLink or PCIe peer access) and the one-shot sum over them.
    Every rank constructs it at the same point (a collective over `group`, a gloo group: the buffers' handles
    travel over it; kernels/peer_memory.py). Raises PeerMemoryError on every rank if any rank cannot share."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, capacity: int):
        import torch.distributed as dist

        from lmc.kernels.peer_memory import PeerBuffers

        _bits(dtype)
        self.dtype, self.capacity = dtype, capacity
        self.peers = PeerBuffers(group, device, 2 * dist.get_world_size(group) * capacity * dtype.itemsize)
        self.rank, self.world = self.peers.rank, self.peers.world
        fill_empty(self.peers.buffer[: 2 * self.world * capacity * dtype.itemsize].view(dtype))  # layout above
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every buffer is empty before any rank pushes into it
        self.recv_ptrs = torch.tensor(self.peers.ptrs, dtype=torch.int64).to(device)  # [world]

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.is_contiguous() and x.numel() <= self.capacity

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return one_shot_all_reduce(x, self.recv_ptrs, self.rank, self.world, slot, self.capacity)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return one_shot_add_rms_norm(x, residual, weight, eps, self.recv_ptrs, self.rank, self.world, slot,
                                     self.capacity)

    def close(self) -> None:
        self.peers.close()
