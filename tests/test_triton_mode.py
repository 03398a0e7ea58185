"""Which Triton the test run uses: tests/conftest.py sets TRITON_INTERPRET before any test imports triton,
"0" (compiled) for a gpu-only selection on a CUDA machine (`python -m pytest -m gpu`), else "1" (interpreter)."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import conftest
from conftest import triton_interpret_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("markexpr,cuda,expected", [
    ("gpu", True, "0"),                     # the documented GPU command
    ("gpu and not slow", True, "0"),
    ("gpu", False, "1"),                    # no CUDA: the gpu tests skip
    ("not slow and not gpu", True, "1"),    # pyproject's default addopts
    ("not slow and not gpu", False, "1"),
    ("slow", True, "1"),
    ("", True, "1"),                        # -m "": every test, the CPU ones need the interpreter
    ("gpu or not slow", True, "1"),         # gpu and CPU tests in one run
    ("not gpu", True, "1"),
])
def test_triton_interpret_for(markexpr, cuda, expected):
    assert triton_interpret_for(markexpr, cuda) == expected


def test_configure_picks_compiled_triton_for_gpu_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conftest.pytest_configure(SimpleNamespace(option=SimpleNamespace(markexpr="gpu")))
    assert os.environ["TRITON_INTERPRET"] == "0"


def test_configure_keeps_the_callers_value(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conftest.pytest_configure(SimpleNamespace(option=SimpleNamespace(markexpr="gpu")))
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_gpu_run_imports_compiled_triton():
    """`pytest -m gpu` with CUDA (faked: collection only) sets TRITON_INTERPRET=0 before the test modules import
    triton, so triton's ops are compiled functions, not the interpreter's (the CPU tests check the opposite:
    tests/test_kernels.py, `triton_interpreter`)."""
    code = """
import os, pytest, torch
torch.cuda.is_available = lambda: True
rc = pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", "-m", "gpu", "tests/test_w4a16.py"])
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
assert rc == 0, rc
print(os.environ["TRITON_INTERPRET"], isinstance(tl.sum, InterpretedFunction))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "0 False"
