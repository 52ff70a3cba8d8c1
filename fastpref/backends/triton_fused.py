"""The ``triton`` backend: the fused kernels of ``fastpref.kernels`` behind the backend interface."""

from __future__ import annotations

from fastpref.kernels.linear_logprob_backward import linear_logprob_backward as backward
from fastpref.kernels.linear_logprob_forward import linear_logprob_forward as forward

__all__ = ["forward", "backward"]
