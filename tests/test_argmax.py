"""The one-launch row argmax (kernels/argmax.py) against torch.argmax: the Triton kernel under TRITON_INTERPRET=1 on
CPU tensors (small chunks, so that rows span several programs and each program several loop steps), the dispatch
of argmax_rows, and the compiled kernel on CUDA (gpu-marked: TRITON_INTERPRET=0 pytest -m gpu tests/test_argmax.py)."""
import os

# read as triton and each kernel are decorated, before their first import (see tests/test_kernels.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
import torch

from lmc.kernels import argmax
from lmc.kernels.split_counters import split_counters

SMALL = dict(chunk=128, block=64)  # V 1000: 8 programs per row, 2 loop steps each


@pytest.fixture
def interpreter(request):
    if request.node.get_closest_marker("gpu"):  # the compiled kernel: TRITON_INTERPRET=0 pytest -m gpu
        return
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.sum, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; set it at the top of tests/conftest.py")


pytestmark = pytest.mark.usefixtures("interpreter")


def _check(x: torch.Tensor, **kw) -> torch.Tensor:
    got = argmax.argmax_rows_triton(x, **kw)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1)), (got, x.argmax(dim=-1))
    assert not split_counters(x.device, 1)[:x.shape[0]].any()  # the last program of each row reset its counter
    return got


@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("chunking", [{}, SMALL], ids=["default", "small"])
def test_random_rows(B, V, chunking):
    g = torch.Generator().manual_seed(V * 10 + B)
    _check(torch.randn(B, V, generator=g) * 8, **chunking)
    # values 0..4 only: many ties everywhere, in every program and loop step
    _check(torch.randint(0, 5, (B, V), generator=g).float() - 2, **chunking)


@pytest.mark.parametrize("ties", [(127, 128), (128, 256), (300, 999), (10, 69), (69, 10, 130), (6, 70), (0, 999)])
def test_ties_give_the_first_index(ties):
    """The same maximum at several places: across chunk boundaries (chunk 128), in two lanes of one program
    (10 and 69: lanes 10 and 5 of block 64, 69 in the later step), in one lane over two steps (6, 70)."""
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    x[:, list(ties)] = 50.0
    x[2, min(ties)] = 49.0  # row 2: the maximum's first place is the next one
    got = _check(x, **SMALL)
    assert got.tolist()[:2] == [min(ties)] * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    _check((torch.randn(3, 4099, generator=g) * 4).to(dtype), **SMALL)  # float16 rounding makes ties too
    x = torch.randn(3, 1000, generator=g).to(dtype)
    x[:, [200, 700]] = 7.0
    assert _check(x, **SMALL).tolist() == [200] * 3


def test_minus_inf_rows_and_signed_zeros():
    x = torch.full((3, 1000), float("-inf"))
    x[1, 640] = -1e30  # one finite value
    x[2, [300, 301]] = torch.tensor([-0.0, 0.0])  # equal, as torch compares them: the first one
    x[2, :300] = -1.0
    assert _check(x, **SMALL).tolist() == [0, 640, 300]
    assert _check(torch.full((1, 7), float("-inf"))).tolist() == [0]
    assert _check(torch.tensor([[0.0, -0.0, -1.0], [-0.0, 0.0, -2.0]])).tolist() == [0, 0]


def test_nan_is_the_maximum_and_the_first_nan_wins():
    """As torch.argmax: NaN ranks above +inf, and of several NaNs (either sign) the first is taken."""
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3))
    x[0, [100, 900]] = float("inf")
    x[0, 600] = float("nan")  # a later program than the first +inf
    x[1, [850, 400]] = float("nan")
    x[1, 400] = -x[1, 400]  # a negative NaN first
    x[2, 130] = float("inf")
    assert _check(x, **SMALL).tolist() == [600, 400, 130]
    _check(torch.tensor([[float("nan")] * 7]), **SMALL)
    _check(x.half(), **SMALL)


def test_consecutive_calls_and_row_strides():
    """Each call resets the counters it used, so the next call (fewer rows, more rows) counts from zero; a row
    stride larger than V (a column slice) is followed."""
    g = torch.Generator().manual_seed(4)
    for B in (3, 1, 3):
        _check(torch.randn(B, 1000, generator=g), **SMALL)
    wide = torch.randn(3, 1500, generator=g)
    _check(wide[:, 100:1100], **SMALL)


def test_empty_batch():
    assert argmax.argmax_rows_triton(torch.zeros(0, 7)).shape == (0,)


def test_dispatch_runs_the_kernel_only_on_cuda(monkeypatch):
    """CPU tensors take torch.argmax (the runtime's CPU path never interprets Triton); CUDA tensors the kernel."""
    launched = []
    monkeypatch.setattr(argmax, "argmax_rows_triton", lambda logits: launched.append(logits) or "kernel")
    x = torch.randn(3, 1000)
    x[1, [5, 6]] = 9.0
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1)) and not launched

    class CudaLike:  # argmax_rows only asks the tensor where it lives
        is_cuda = True

    cuda_like = CudaLike()
    assert argmax.argmax_rows(cuda_like) == "kernel" and launched == [cuda_like]


def test_pipelined_greedy_takes_argmax_rows(monkeypatch):
    """launch_greedy (the pipelined greedy step, whose host work overlaps the GPU) chooses tokens through
    argmax_rows, with torch's answer; sample_batch, where the host waits for the tokens at once, keeps torch's
    argmax (its launch costs the host less: bench/NOTES.md, session 13)."""
    from lmc.runtime import cuda_graph, sampling
    from lmc.runtime.sampling import GenerationConfig, SampleRow

    calls = []
    real = argmax.argmax_rows
    monkeypatch.setattr(cuda_graph, "argmax_rows", lambda logits: calls.append(logits.shape) or real(logits))
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(5))
    logits[0, [7, 900]] = 20.0
    rows = [SampleRow(GenerationConfig(), None, [], []) for _ in range(2)]
    tokens, _ = sampling.sample_batch(logits.clone(), rows)
    assert tokens == logits.argmax(-1).tolist() and tokens[0] == 7

    decoder = cuda_graph.GraphDecoder.__new__(cuda_graph.GraphDecoder)
    decoder._run = lambda seqs, ids: logits
    assert decoder.launch_greedy([None, None]).tokens() == tokens
    assert calls == [(2, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 64, 256])
def test_compiled_kernel_on_cuda_at_decode_shapes(B):
    """The compiled kernel at the 8B vocabulary and the engine's batch sizes, with its default chunking (about
    PROGRAMS_PER_SM programs an SM), and a tie across two programs' chunks."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(B)
    x = torch.randn(B, 128256, device="cuda", generator=g)  # [B, V]
    x[:, 5] = x[:, 128000] = x.max() + 1  # the first of the two wins
    _check(x)
    _check(x.half())
