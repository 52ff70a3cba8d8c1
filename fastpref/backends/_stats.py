"""Per-row log-sum-exp statistics, kept as ``(max, log sum)`` and merged exactly.

``lp_t = (z_{t,y_t} - max_t) - log sum_t`` subtracts two numbers of the size of the logits only once, in
``z_{t,y_t} - max_t`` (exact when the label is the maximum); ``log sum_t`` is small. A single rounded
``lse = max + log sum`` would lose ``|z| 2^-24`` (3e-4 at logits of 1e4) in every token log-prob.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowStats(NamedTuple):
    """``max [M]`` and ``logsum [M]`` of each scored row's logits: ``log sum_v exp(z_v) = max + logsum``."""

    max: torch.Tensor
    logsum: torch.Tensor

    def select(self, index: torch.Tensor) -> "RowStats":
        """The statistics of a subset of rows (a bool mask or an index tensor)."""
        return RowStats(self.max[index], self.logsum[index])


def merge_partials(run_max: torch.Tensor, run_sum: torch.Tensor, max_part: torch.Tensor,
                   sum_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold partial statistics ``[P, M]`` (``sum_part`` relative to ``max_part``; ``-inf``/0 for an empty part)
    into running ``(max, sum) [M]``."""
    new_max = torch.maximum(run_max, max_part.amax(dim=0))
    safe = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)  # nothing yet: sums stay 0
    run_sum = run_sum * torch.exp(run_max - safe) + (sum_part * torch.exp(max_part - safe)).sum(dim=0)
    return new_max, run_sum


def finish(target: torch.Tensor, run_max: torch.Tensor, run_sum: torch.Tensor) -> tuple[torch.Tensor, RowStats]:
    """``(lp, stats)`` from the target logit and the running statistics that started at ``(target, 1)``."""
    logsum = torch.log(run_sum)
    return (target - run_max) - logsum, RowStats(run_max, logsum)


def from_partials(target: torch.Tensor, max_part: torch.Tensor, sum_part: torch.Tensor) -> tuple[torch.Tensor, RowStats]:
    """``(lp, stats)`` from the target logits ``[M]`` and label-free partial statistics ``[P, M]``."""
    run_max, run_sum = merge_partials(target, torch.ones_like(target), max_part, sum_part)
    return finish(target, run_max, run_sum)
