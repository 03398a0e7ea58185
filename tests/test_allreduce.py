"""The one-shot all-reduce kernel (kernels/allreduce.py) under the interpreter: the ranks' kernels run one after
another in this process over plain CPU buffers laid out as the symmetric buffers are, with the handshakes of the
ranks that have not run yet set beforehand (as if they had published already); on 2 GPUs the real thing runs
inside tensor parallel (tests/test_tp.py's GPU test)."""
import pytest
import torch

from lmc.kernels import allreduce as AR

needs_triton = pytest.mark.skipif(AR.triton is None, reason="needs triton (TRITON_INTERPRET=1 on the CPU)")


class FakeGroup:
    """world ranks' buffers in one process: flags [MAX_PROGRAMS, world] int32 at byte 0, then two slots."""

    def __init__(self, world: int, capacity: int, dtype: torch.dtype):
        nbytes = AR.DATA_OFFSET + 2 * capacity * dtype.itemsize
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]
        bases = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.flag_ptrs, self.data_ptrs = bases, bases + AR.DATA_OFFSET
        self.world, self.capacity, self.dtype = world, capacity, dtype

    def flags(self, rank: int) -> torch.Tensor:
        return self.buffers[rank][: AR.MAX_PROGRAMS * self.world * 4].view(torch.int32).view(AR.MAX_PROGRAMS,
                                                                                            self.world)

    def slot(self, rank: int, slot: int) -> torch.Tensor:
        data = self.buffers[rank][AR.DATA_OFFSET:].view(self.dtype)
        return data[slot * self.capacity: (slot + 1) * self.capacity]

    def call(self, parts: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
        """One plain all-reduce: every rank's sum, in place on a copy of its part."""
        outs = [p.clone() for p in parts]
        self._run(parts, slot, self._programs(parts[0].numel()), lambda r: AR.one_shot_all_reduce(
            outs[r], self.data_ptrs, self.flag_ptrs, r, self.world, slot, self.capacity))
        return outs

    def call_add_norm(self, parts, residuals, weight, eps: float, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One fused all-reduce + residual add + RMSNorm over parts [T, H]: every rank's (normed, residual)."""
        return self._run(parts, slot, min(parts[0].shape[0], AR.MAX_PROGRAMS), lambda r: AR.one_shot_add_rms_norm(
            parts[r], residuals[r], weight, eps, self.data_ptrs, self.flag_ptrs, r, self.world, slot, self.capacity))

    def _run(self, parts: list[torch.Tensor], slot: int, programs: int, launch) -> list:
        """Every rank's kernel in rank order; later ranks' signals to earlier ones are set first (each kernel sets
        them again for the next call), later ranks' chunks published first."""
        n = parts[0].numel()
        for r in range(self.world):
            self.slot(r, slot)[:n] = parts[r].reshape(-1)
            for q in range(r + 1, self.world):
                self.flags(r)[:, q] = 1
        results = [launch(r) for r in range(self.world)]
        for r in range(self.world):  # undo the early signals the later ranks' kernels repeated
            for q in range(r + 1, self.world):
                assert self.flags(r)[:programs, q].eq(1).all()
                self.flags(r)[:, q] = 0
        return results

    @staticmethod
    def _programs(n: int) -> int:
        return max(1, min(-(-n // AR.BLOCK), AR.MAX_PROGRAMS))


@needs_triton
@pytest.mark.parametrize("world,n,dtype", [(2, 4097, torch.float16), (3, 1000, torch.float32),
                                           (2, AR.BLOCK * AR.MAX_PROGRAMS + 77, torch.float16)])
def test_one_shot_sum_equals_reference_on_every_rank(world, n, dtype):
    g = torch.Generator().manual_seed(world * n)
    group = FakeGroup(world, capacity=n + 5, dtype=dtype)
    for slot in (0, 1, 0):  # the attention / MLP alternation, twice over slot 0
        parts = [torch.randn(n, generator=g).to(dtype) for _ in range(world)]
        outs = group.call(parts, slot)
        want = AR.one_shot_all_reduce_ref(parts)
        for out in outs:
            assert torch.equal(out, want)  # bit-identical on every rank: same order, same rounding
        assert not any(group.flags(r).any() for r in range(world))  # every handshake consumed


@needs_triton
def test_one_shot_reads_each_peer_from_its_own_slot():
    # rank 1 publishes into slot 1 only: rank 0 must read slot 1, not stale data left in slot 0
    group = FakeGroup(2, capacity=64, dtype=torch.float32)
    group.slot(1, 0)[:] = 1000.0
    parts = [torch.arange(64, dtype=torch.float32), torch.ones(64)]
    outs = group.call(parts, slot=1)
    assert torch.equal(outs[0], parts[0] + 1) and torch.equal(outs[1], parts[0] + 1)


@needs_triton
@pytest.mark.parametrize("world,t,h,dtype", [(2, 3, 100, torch.float16), (3, 1, 48, torch.float32),
                                             (2, AR.MAX_PROGRAMS + 5, 24, torch.float16)])
def test_fused_add_norm_equals_sum_then_rms_norm(world, t, h, dtype):
    """The fused call gives every rank rms_norm(sum of the parts, residual) exactly as the two kernels give it
    (rows past MAX_PROGRAMS: a program owns several); x itself is left unchanged."""
    from lmc.kernels.rmsnorm import rms_norm_triton

    g = torch.Generator().manual_seed(world * t + h)
    group = FakeGroup(world, capacity=t * h + 3, dtype=dtype)
    weight = (torch.rand(h, generator=g) + 0.5).to(dtype)
    for slot in (0, 1, 0):
        parts = [torch.randn(t, h, generator=g).to(dtype) for _ in range(world)]
        kept = [p.clone() for p in parts]
        residual = torch.randn(t, h, generator=g).to(dtype)
        outs = group.call_add_norm(parts, [residual] * world, weight, 1e-5, slot)
        want_y, want_h = rms_norm_triton(AR.one_shot_all_reduce_ref(parts), weight, 1e-5, residual)
        for y, new_residual in outs:
            assert torch.equal(new_residual, want_h) and torch.equal(y, want_y)
        assert all(torch.equal(p, k) for p, k in zip(parts, kept))
        assert not any(group.flags(r).any() for r in range(world))
