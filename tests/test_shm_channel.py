"""The shared-memory announcement channel (runtime/shm_channel.py) and the Shard messages over it."""
import os
import stat
import threading

import numpy as np
import pytest
import torch

from lmc.runtime import distributed, shm_channel
from lmc.runtime.shm_channel import SLOT_WORDS, SLOTS, ChannelClosed, ChannelReader, ChannelWriter


def _message(i: int) -> np.ndarray:
    n = [0, 1, 7, SLOT_WORDS, 3][i % 5]
    return np.arange(i, i + n, dtype=np.int64)


def test_messages_arrive_in_order_to_every_reader_while_the_writer_waits_for_free_slots(tmp_path):
    writer = ChannelWriter(2, lambda: True, folder=str(tmp_path))
    assert stat.S_IMODE(os.stat(writer.path).st_mode) == 0o600
    readers = [ChannelReader(writer.path, r, lambda: True) for r in range(2)]
    writer.unlink()  # the mappings outlive the name
    assert not os.listdir(tmp_path)
    count = 3 * SLOTS + 2  # more than the ring holds: the writer must wait for the slower reader
    got: list[list[np.ndarray]] = [[], []]
    gate = threading.Event()

    def read(r: int) -> None:
        if r == 1:
            gate.wait()  # reader 1 starts late
        for _ in range(count):
            got[r].append(readers[r].receive(timeout_s=30))

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for i in range(SLOTS):
        writer.send(_message(i), timeout_s=30)
    blocked = threading.Thread(target=writer.send, args=(_message(SLOTS), 30))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # slot 0 still holds message 0 for reader 1
    gate.set()
    blocked.join(30)
    for i in range(SLOTS + 1, count):
        writer.send(_message(i), timeout_s=30)
    for t in threads:
        t.join(30)
    for r in range(2):
        assert len(got[r]) == count and all(np.array_equal(m, _message(i)) for i, m in enumerate(got[r]))
    writer.close()
    for reader in readers:
        reader.close()


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """A writer and its one reader whose peers are alive or not as `alive[0]` says, liveness checked every 50 ms."""
    monkeypatch.setattr(shm_channel, "LIVENESS_S", 0.05)
    monkeypatch.setattr(shm_channel, "SPIN_S", 0.01)
    alive = [True]
    writer = ChannelWriter(1, lambda: alive[0], folder=str(tmp_path))
    reader = ChannelReader(writer.path, 0, lambda: alive[0])
    yield writer, reader, alive
    writer.close()
    reader.close()


def test_a_dead_peer_ends_the_wait(pair):
    writer, reader, alive = pair
    alive[0] = False
    with pytest.raises(ChannelClosed, match="rank 0 exited"):
        reader.receive()  # nothing sent, and the writer is gone
    for i in range(SLOTS):
        writer.send(_message(i))  # free slots need no reader
    with pytest.raises(ChannelClosed, match="follower rank exited"):
        writer.send(_message(SLOTS))  # the ring is full and the reader is gone


def test_a_silent_live_peer_times_out(pair):
    writer, reader, _ = pair
    with pytest.raises(shm_channel.LmcError, match="did not answer within"):
        reader.receive(timeout_s=0.2)


class FakeControl:
    """Stands in for torch.distributed.broadcast on the control group: rank 0's tensor reaches the follower."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []
        self.count = 0

    def broadcast(self, tensor, src, group):
        if group == "leader":
            self.sent.append(tensor.clone())
            self.count += 1
        else:
            tensor.copy_(self.sent.pop(0))


@pytest.mark.parametrize("slot_words", [SLOT_WORDS, 12])
def test_shard_messages_inline_or_with_the_payload_over_the_control_group(tmp_path, monkeypatch, slot_words):
    fake = FakeControl()
    monkeypatch.setattr(distributed.dist, "broadcast", fake.broadcast)
    monkeypatch.setattr(distributed, "SLOT_WORDS", slot_words)  # 12: a payload past 4 words goes over the group
    writer = ChannelWriter(1, lambda: True, folder=str(tmp_path))
    leader = distributed.Shard(0, 2, None, "leader", writer, store="")
    follower = distributed.Shard(1, 2, None, "follower", ChannelReader(writer.path, 0, lambda: True), store="")
    positions, slots = torch.arange(5), torch.arange(10, 15)
    tables, kv_lens = torch.arange(6).reshape(2, 3), torch.tensor([3, 4])
    leader.announce_forward(positions, slots, tables, kv_lens, None, 99, torch.tensor([1, 4]))
    rows = np.arange(2 * 6, dtype=np.int64).reshape(2, 6)
    leader.announce_decode(2, 1, rows)
    leader.stop()
    h, payload = follower.receive()
    assert h == [distributed.FORWARD, 5, 2, 3, 99, 0, 20, 2]
    assert payload.tolist() == positions.tolist() + slots.tolist() + list(range(6)) + [3, 4] + [1, 4]
    h, payload = follower.receive()
    assert h[:5] == [distributed.DECODE, 2, 1, 2, 12] and payload.tolist() == rows.reshape(-1).tolist()
    assert follower.receive() == ([distributed.STOP] + [0] * 7, None)
    assert fake.count == (0 if slot_words == SLOT_WORDS else 2) and not fake.sent  # each one sent was received
    writer.close()


def test_no_room_for_the_channel_is_one_error_and_no_file(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_channel.os, "posix_fallocate", full)
    with pytest.raises(shm_channel.LmcError, match="cannot make the tensor-parallel channel.*shm-size"):
        ChannelWriter(1, lambda: True, folder=str(tmp_path))
    assert not list(tmp_path.iterdir())
