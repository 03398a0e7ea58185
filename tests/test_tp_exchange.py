"""The tensor-parallel ids broadcast and logits gather through peer memory (kernels/tp_exchange.py) under the
interpreter: the ranks' kernels run one after another in this process over plain CPU buffers laid out as the peer
buffers are, writers first (rank 0 for the ids, the followers for the logits), so a reader that finds its region
incomplete hangs rather than passes; on 2 GPUs the real thing runs inside tensor parallel (tests/test_tp.py)."""
import pytest
import torch

from lmc.kernels import tp_exchange as X
from lmc.kernels.allreduce import fill_empty

needs_triton = pytest.mark.skipif(X.triton is None, reason="needs triton (TRITON_INTERPRET=1 on the CPU)")


def _empty_f16(x: torch.Tensor) -> torch.Tensor:
    return (x == 0) & torch.signbit(x)


@needs_triton
@pytest.mark.parametrize("world,t", [(2, 1), (3, 2 * X.BLOCK + 7)])
def test_ids_reach_every_rank_and_regions_are_emptied(world, t):
    regions = [torch.full((t + 5,), X.ID_EMPTY, dtype=torch.int64) for _ in range(world)]
    ptrs = torch.tensor([r.data_ptr() for r in regions], dtype=torch.int64)
    sent = torch.randint(0, 150_000, (t,), dtype=torch.int64)
    sent[0] = 0
    ids = [sent.clone()] + [torch.full((t,), -7, dtype=torch.int64) for _ in range(world - 1)]
    for rank in range(world):  # rank 0 pushes first; each follower then finds its region full
        X.broadcast_ids(ids[rank], ptrs, rank, world)
    for rank in range(world):
        assert torch.equal(ids[rank], sent)
        assert regions[rank].eq(X.ID_EMPTY).all()  # read and emptied (rank 0's own is never written)
    for _ in range(2):  # the regions are reusable: the next forward's ids
        sent = torch.randint(0, 150_000, (t,), dtype=torch.int64)
        ids = [sent.clone()] + [torch.zeros(t, dtype=torch.int64) for _ in range(world - 1)]
        for rank in range(world):
            X.broadcast_ids(ids[rank], ptrs, rank, world)
        assert all(torch.equal(i, sent) for i in ids)


@needs_triton
def test_an_id_equal_to_the_empty_marker_does_not_hang_the_follower():
    regions = [torch.full((4,), X.ID_EMPTY, dtype=torch.int64) for _ in range(2)]
    ptrs = torch.tensor([r.data_ptr() for r in regions], dtype=torch.int64)
    ids = [torch.tensor([X.ID_EMPTY, 5]), torch.zeros(2, dtype=torch.int64)]
    for rank in range(2):
        X.broadcast_ids(ids[rank], ptrs, rank, 2)
    assert ids[1].tolist() == [X.ID_EMPTY + 1, 5]  # not a token id anyway: the embedding refuses both


@needs_triton
@pytest.mark.parametrize("world,b,per,short", [(2, 1, 1000, 0), (3, 3, 677, 5)])
def test_logits_gathered_on_rank_0_in_vocabulary_order(world, b, per, short):
    vocab = world * per - short  # the last rank's part is padded by the caller (Shard.gather_vocab)
    capacity = b * per + 3
    regions = [torch.empty(world, capacity, dtype=torch.float16) for _ in range(world)]
    for region in regions:
        fill_empty(region)
    ptrs = torch.tensor([r.data_ptr() for r in regions], dtype=torch.int64)
    parts = [torch.randn(b, per).half() for _ in range(world)]
    parts[1][0, :3] = -0.0  # sent as +0.0: equal in value
    outs = {}
    for rank in [*range(1, world), 0]:  # the followers push first; rank 0 then finds every region full
        outs[rank] = X.gather_to_leader(parts[rank], vocab, ptrs, rank, world, capacity)
    assert all(outs[rank] is None for rank in range(1, world))
    want = torch.cat(parts, dim=1).float()[:, :vocab]  # [B, V]
    assert outs[0].dtype == torch.float32 and outs[0].shape == (b, vocab)
    assert torch.equal(outs[0], want)
    assert all(_empty_f16(region).all() for region in regions)  # read and emptied, ready for the next forward
