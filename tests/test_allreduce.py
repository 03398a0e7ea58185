"""The one-shot all-reduce kernel (kernels/allreduce.py) under the interpreter: the ranks' kernels run one after
another in this process over plain CPU buffers laid out as the peer buffers are, with the pushes of the ranks that
have not run yet put in place beforehand (as if they had pushed already); on 2 GPUs the real thing runs inside
tensor parallel (tests/test_tp.py's GPU test)."""
import pytest
import torch

from lmc.kernels import allreduce as AR

needs_triton = pytest.mark.skipif(AR.triton is None, reason="needs triton (TRITON_INTERPRET=1 on the CPU)")


class FakeGroup:
    """world ranks' receive buffers in one process, laid out as kernels/allreduce.py's: [2 slots, world, capacity]."""

    def __init__(self, world: int, capacity: int, dtype: torch.dtype):
        self.buffers = [torch.empty(2, world, capacity, dtype=dtype) for _ in range(world)]
        for b in self.buffers:
            AR.fill_empty(b)
        self.recv_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.world, self.capacity, self.dtype = world, capacity, dtype

    def all_empty(self) -> bool:
        int_type = torch.int16 if self.dtype.itemsize == 2 else torch.int32
        return all(b.view(int_type).eq(torch.iinfo(int_type).min).all() for b in self.buffers)

    def call(self, parts: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
        """One plain all-reduce: every rank's sum, in place on a copy of its part."""
        outs = [p.clone() for p in parts]
        self._run(parts, slot, lambda r: AR.one_shot_all_reduce(
            outs[r], self.recv_ptrs, r, self.world, slot, self.capacity))
        return outs

    def call_add_norm(self, parts, residuals, weight, eps: float, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One fused all-reduce + residual add + RMSNorm over parts [T, H]: every rank's (normed, residual)."""
        return self._run(parts, slot, lambda r: AR.one_shot_add_rms_norm(
            parts[r], residuals[r], weight, eps, self.recv_ptrs, r, self.world, slot, self.capacity))

    def _run(self, parts: list[torch.Tensor], slot: int, launch) -> list:
        """Every rank's kernel in rank order. The ranks that have not run yet have pushed already (their parts are
        put into this rank's buffer, -0.0 sent as +0.0 as the kernel sends it); after each kernel every later
        rank must hold all of this rank's push, so a push that left an element empty fails here, not by hanging."""
        n = parts[0].numel()
        results = []
        for r in range(self.world):
            for q in range(r + 1, self.world):
                self.buffers[r][slot, q, :n] = parts[q].reshape(-1) + 0.0  # -0.0 + 0.0 = +0.0
            results.append(launch(r))
            for q in range(r + 1, self.world):
                assert not _is_empty(self.buffers[q][slot, r, :n]).any(), f"rank {r} left an element empty"
        for r in range(self.world):  # the later ranks' kernels pushed again what was put in place: undo that
            for q in range(r + 1, self.world):
                assert torch.equal(self.buffers[r][slot, q, :n], parts[q].reshape(-1) + 0.0)
                AR.fill_empty(self.buffers[r][slot, q])
        return results


def _is_empty(x: torch.Tensor) -> torch.Tensor:
    return (x == 0) & torch.signbit(x)


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
        assert group.all_empty()  # every push consumed and the buffers emptied again


@needs_triton
def test_one_shot_reads_each_peer_from_its_own_slot():
    # rank 1 publishes into slot 1 only: rank 0 must read slot 1, not stale data left in slot 0
    group = FakeGroup(2, capacity=64, dtype=torch.float32)
    group.buffers[0][0, 1] = 1000.0  # as if rank 1 had pushed into slot 0
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
        assert group.all_empty()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_negative_zero_is_sent_as_positive_zero(dtype):
    """-0.0 marks an element not yet arrived: a part holding -0.0 must still arrive (the harness fails if a push
    leaves an element empty) and sum to the reference, and the buffers end empty."""
    group = FakeGroup(2, capacity=300, dtype=dtype)
    for slot in (0, 1):
        parts = [torch.randn(257).to(dtype), torch.randn(257).to(dtype)]
        parts[0][::7], parts[1][::5] = -0.0, -0.0
        parts[1][::3] = 0.0
        outs = group.call(parts, slot)
        want = AR.one_shot_all_reduce_ref(parts)
        assert torch.equal(outs[0], outs[1])
        if dtype == torch.bfloat16:  # the interpreter rounds float32 -> bfloat16 toward zero, torch to nearest
            assert torch.allclose(outs[0].float(), want.float(), rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(outs[0], want)
        assert group.all_empty()
