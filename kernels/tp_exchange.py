"""The two one-to-many exchanges of a tensor-parallel decode step through peer memory, one kernel each, in place of
NCCL's broadcast and all-gather (kernels that cannot take part in the PDL chain, bench/NOTES.md session 14):

- `broadcast_ids`: rank 0's token ids [T] into every rank's ids tensor (the first op of every forward);
- `gather_to_leader`: every rank's logits [B, per] (its vocabulary rows of the lm_head) into rank 0's [B, V]
  float32 in vocabulary order (the last op of a forward that samples).

One writer per region and the data are their own flags, as in kernels/allreduce.py: each rank owns one buffer that
every rank has mapped (kernels/peer_memory.py), laid out

    int64 ids [IDS]                            what rank 0 pushed; INT64_MIN = empty (rank 0's own unused)
    x.dtype logits [world, LOGITS]             on rank 0: logits[r] is what rank r pushed; -0.0 = empty

A writer stores its values (INT64_MIN sent as INT64_MIN + 1, -0.0 as +0.0: `_sendable`), the reader polls its own
memory until nothing in its region is empty, copies out and empties the region it read. Reuse needs no barrier:
rank 0 pushes ids into rank q's region again only in the next forward, after this forward's all-reduces, which
completed only once q had pushed into them, which q did after its ids kernel, the emptying included, had completed;
the same for a follower's next logits push, which follows the next forward's ids, which rank 0 pushes after its
gather kernel completed. So every forward must hold a collective between the two calls on each region, which every
model has (the sums after the row-parallel linears).
"""
from __future__ import annotations

import torch

from lmc.kernels.pdl import pdl_launch, pdl_wait

try:
    import triton
    import triton.language as tl

    from lmc.kernels.allreduce import _empty_like, _is_empty, _sendable
except ImportError:  # CPU-only install: tensor parallel on the CPU uses gloo
    triton = None

MAX_PROGRAMS = 128
BLOCK = 1024
IDS = 1 << 16  # token ids per forward through peer memory (prefill beyond: NCCL)
LOGITS = 1 << 22  # logits per rank (8 MiB in float16: batch 65 at 64,128 vocabulary rows a rank; beyond: NCCL)
ID_EMPTY = -(1 << 63)

if triton is not None:
    _EMPTY: tl.constexpr = tl.constexpr(ID_EMPTY)

    @triton.jit
    def _broadcast_ids_kernel(ids_ptr, ptrs, T, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr):
        pdl_wait(PDL)
        pid = tl.program_id(0)
        for start in range(pid * BLOCK, T, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < T
            if RANK == 0:
                ids = tl.load(ids_ptr + offs, mask=mask, other=0)
                ids = tl.where(ids == _EMPTY, _EMPTY + 1, ids)
                for r in tl.static_range(1, WORLD):
                    peer = tl.load(ptrs + r).to(tl.pointer_type(tl.int64))
                    tl.store(peer + offs, ids, mask=mask)
            else:
                own = tl.load(ptrs + RANK).to(tl.pointer_type(tl.int64)) + offs
                ids = tl.load(own, mask=mask, other=0, volatile=True)
                while tl.sum(((ids == _EMPTY) & mask).to(tl.int32), axis=0) > 0:
                    ids = tl.load(own, mask=mask, other=0, volatile=True)
                tl.store(own, tl.full(ids.shape, _EMPTY, tl.int64), mask=mask)
                tl.store(ids_ptr + offs, ids, mask=mask)

    @triton.jit
    def _gather_to_leader_kernel(part_ptr, out_ptr, ptrs, n, per, V, capacity, RANK: tl.constexpr,
                                 WORLD: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """part [B, per] flat (n = B * per); on rank 0 out [B, V] float32, rank r's columns at r * per."""
        pdl_wait(PDL)
        pid = tl.program_id(0)
        dtype = part_ptr.dtype.element_ty
        leader = tl.load(ptrs).to(tl.pointer_type(dtype))  # rank 0's logits region
        for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(part_ptr + offs, mask=mask, other=0.0)
            if RANK != 0:
                tl.store(leader + RANK * capacity + offs, _sendable(x, BITS), mask=mask)
            else:
                row, col = offs // per, offs % per
                tl.store(out_ptr + row.to(tl.int64) * V + col, x.to(tl.float32), mask=mask & (col < V))
                for r in tl.static_range(1, WORLD):
                    region = leader + r * capacity + offs
                    got = tl.load(region, mask=mask, other=0.0, volatile=True)
                    while tl.sum((_is_empty(got, BITS) & mask).to(tl.int32), axis=0) > 0:
                        got = tl.load(region, mask=mask, other=0.0, volatile=True)
                    tl.store(region, _empty_like(got, BITS), mask=mask)
                    vcol = r * per + col
                    tl.store(out_ptr + row.to(tl.int64) * V + vcol, got.to(tl.float32), mask=mask & (vcol < V))


def _grid(n: int) -> tuple[int]:
    return (max(1, min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)),)


def broadcast_ids(ids: torch.Tensor, ptrs: torch.Tensor, rank: int, world: int) -> None:
    """Rank 0's ids (int64 [T], contiguous, T <= IDS) into every rank's ids, in place. ptrs: int64 [world], every
    rank's ids region as this process sees it."""
    assert ids.dtype == torch.int64 and ids.is_contiguous() and ids.numel() <= IDS
    _broadcast_ids_kernel[_grid(ids.numel())](ids, ptrs, ids.numel(), RANK=rank, WORLD=world, BLOCK=BLOCK,
                                              num_warps=4, **pdl_launch(ids.device))


def gather_to_leader(part: torch.Tensor, vocab: int, ptrs: torch.Tensor, rank: int, world: int,
                     capacity: int) -> torch.Tensor | None:
    """part [B, per] (this rank's logits, per = ceil(V / world) columns, contiguous) -> [B, V] float32 on rank 0,
    rank r's columns at r * per (columns past V dropped); None on the others. ptrs: every rank's logits region."""
    b, per = part.shape
    assert part.is_contiguous() and b * per <= capacity and per * world >= vocab
    out = torch.empty((b, vocab), dtype=torch.float32, device=part.device) if rank == 0 else part  # [B, V]
    _gather_to_leader_kernel[_grid(b * per)](part, out, ptrs, b * per, per, vocab, capacity, RANK=rank,
                                             WORLD=world, BITS=8 * part.element_size(), BLOCK=BLOCK, num_warps=4,
                                             **pdl_launch(part.device))
    return out if rank == 0 else None


class LeaderExchange:
    """The peer buffers of the two exchanges for one group of CUDA ranks. Every rank constructs it at the same point
    (a collective over `group`, a gloo group). Raises PeerMemoryError on every rank if any rank cannot share."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype):
        import torch.distributed as dist

        from lmc.kernels.allreduce import fill_empty
        from lmc.kernels.peer_memory import PeerBuffers

        world = dist.get_world_size(group)
        ids_bytes = IDS * 8
        self.dtype = dtype
        self.peers = PeerBuffers(group, device, ids_bytes + world * LOGITS * dtype.itemsize)
        self.rank, self.world = self.peers.rank, self.peers.world
        self.peers.buffer[:ids_bytes].view(torch.int64).fill_(ID_EMPTY)  # layout above
        fill_empty(self.peers.buffer[ids_bytes:ids_bytes + world * LOGITS * dtype.itemsize].view(dtype))
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every buffer is empty before any rank pushes into it
        self.ids_ptrs = torch.tensor(self.peers.ptrs, dtype=torch.int64).to(device)  # [world]
        self.logits_ptrs = self.ids_ptrs + ids_bytes  # [world]

    def broadcast_ids(self, ids: torch.Tensor) -> bool:
        """Rank 0's ids into every rank's; False (nothing done) where they do not fit, the same on every rank."""
        if ids.numel() > IDS or not ids.is_contiguous():
            return False
        broadcast_ids(ids, self.ids_ptrs, self.rank, self.world)
        return True

    def fits_logits(self, part: torch.Tensor) -> bool:
        return part.dtype == self.dtype and part.numel() <= LOGITS

    def gather(self, part: torch.Tensor, vocab: int) -> torch.Tensor | None:
        return gather_to_leader(part.contiguous(), vocab, self.logits_ptrs, self.rank, self.world, LOGITS)

    def close(self) -> None:
        self.peers.close()
