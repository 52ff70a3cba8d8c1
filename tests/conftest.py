"""Test setup: without CUDA, Triton kernels run on the CPU through the interpreter; outputs start poisoned."""

import os

# Both must be set before triton is first imported (kernels are decorated at import).
os.environ.setdefault("FASTPREF_POISON", "1")
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||a - e|| / ||e||`` in float64 (the brief's gradient metric)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm().clamp(min=1e-30))


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
