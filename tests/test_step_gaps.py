"""bench/step_gaps.py: the parts of a step come out of its marks in the right order and sizes, and the script
says in one line that it needs CUDA."""
import sys

import pytest
import torch
from conftest import load_bench


@pytest.fixture(scope="module")
def sg():
    return load_bench("step_gaps.py")


class At:
    """A stand-in for a timed CUDA event: a time in ms."""

    def __init__(self, ms):
        self.ms = ms

    def elapsed_time(self, other):
        return other.ms - self.ms


def marks(start, copies, graph, argmax, d2h):
    t = [start, start + copies, start + copies + graph, start + copies + graph + argmax,
         start + copies + graph + argmax + d2h]
    return dict(zip(("start", "graph_start", "graph_end", "argmax_end", "d2h_end"), map(At, t)))


def test_split_steps_parts(sg):
    # three steps: the second starts 0.25 ms after the first's token copy, the third right after the second's
    s0 = marks(0.0, 0.01, 2.0, 0.006, 0.005)
    s1 = marks(2.021 + 0.25, 0.02, 2.5, 0.01, 0.004)
    s2 = marks(s1["d2h_end"].ms, 0.008, 2.1, 0.007, 0.006)
    parts = sg.split_steps([s0, s1, s2])
    assert set(parts) == set(sg.PARTS)
    assert parts["copies_to_graph"] == pytest.approx([0.02, 0.008])
    assert parts["graph"] == pytest.approx([2.5, 2.1])
    assert parts["argmax"] == pytest.approx([0.01, 0.007])
    assert parts["d2h"] == pytest.approx([0.004, 0.006])
    assert parts["idle_before"] == pytest.approx([0.25, 0.0])
    assert parts["period"] == pytest.approx([2.271, 2.534])
    assert sg.split_steps([s0]) == {p: [] for p in sg.PARTS}  # one step: nothing between steps to split


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_needs_cuda(sg, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["step_gaps.py"])
    assert sg.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench/step_gaps.py needs CUDA (it times a CUDA graph's step)"]


def test_marks_uninstall_restores_the_runtime(sg):
    from lmc.runtime import cuda_graph as cg

    before = (cg.GraphDecoder.replay_rows, cg.GraphDecoder._graph, cg.GreedyStep.__init__, cg.GreedyStep.tokens)
    m = sg.StepMarks()
    m.install()
    during = (cg.GraphDecoder.replay_rows, cg.GraphDecoder._graph, cg.GreedyStep.__init__, cg.GreedyStep.tokens)
    m.uninstall()
    assert all(a is not b for a, b in zip(before, during))
    assert (cg.GraphDecoder.replay_rows, cg.GraphDecoder._graph, cg.GreedyStep.__init__, cg.GreedyStep.tokens) == before
    # a greedy step on the CPU still works after: its tokens are the ids given
    assert cg.GreedyStep(torch.tensor([3, 5])).tokens() == [3, 5]
