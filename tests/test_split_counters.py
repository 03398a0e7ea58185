"""The arrival counters of the last-split-finishes kernels (kernels/split_counters.py)."""
import gc
import weakref

import torch

from lmc.kernels.split_counters import split_counters


def test_split_counters_grow_and_keep_the_outgrown_buffer():
    """A larger request replaces the device's buffer with a larger zeroed one, served from then on; the old one stays
    alive (a CUDA graph captured before the growth still addresses it)."""
    device = torch.device("cpu")
    first = split_counters(device, 1)
    assert split_counters(device, first.numel()) is first
    old = weakref.ref(first)
    grown = split_counters(device, first.numel() + 1)
    assert grown.numel() > first.numel() and not grown.any() and split_counters(device, 1) is grown
    del first
    gc.collect()
    assert old() is not None
