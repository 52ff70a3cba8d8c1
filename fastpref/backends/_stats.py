"""Per-row log-sum-exp statistics, kept as ``(max, log sum)`` and merged exactly, and the per-token statistics.

``lp_t = (z_{t,y_t} - max_t) - log sum_t`` subtracts two numbers of the size of the logits only once, in
``z_{t,y_t} - max_t`` (exact when the label is the maximum); ``log sum_t`` is small. A single rounded
``lse = max + log sum`` would lose ``|z| 2^-24`` (3e-4 at logits of 1e4) in every token log-prob.

The vocabulary kernels exclude each row's label column; its logit (from the indexed dot) enters once, here.
Per-token statistics (:class:`Partials` with ``t1, t2, zsum, before``) are merged the same way::

    entropy     = -sum_v p_v log p_v = log sum - t1 / sum          (t1 = sum_v e_v (z_v - max): no cancellation)
    log sum p^2 = log t2 - 2 log sum                               (t2 = sum_v e_v^2)
    mean logit  = (zsum + z_y) / V
    argmax == y : z'_y > max_{v < y} z_v  and  z'_y >= max_{v != y} z_v   (the first maximal index, as argmax;
                  z'_y is the label's logit as the vocabulary tiles computed it, so a tie is judged on equal terms)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

NEG_INF = float("-inf")


class RowStats(NamedTuple):
    """``max [M]`` and ``logsum [M]`` of each scored row's logits: ``log sum_v exp(z_v) = max + logsum``;
    ``mean_shift [M]`` (only with per-token statistics): ``E_p[z] - max``, for the entropy's gradient."""

    max: torch.Tensor
    logsum: torch.Tensor
    mean_shift: Optional[torch.Tensor] = None

    def select(self, index) -> "RowStats":
        """The statistics of a subset of rows (a bool mask, an index tensor or a slice)."""
        return RowStats(*(None if x is None else x[index] for x in self))


class TokenStats(NamedTuple):
    """Per scored row: entropy ``-sum_v p log p``, ``log sum_v p^2`` (WPO), the mean logit, argmax == label."""

    entropy: torch.Tensor
    log_sum_p2: torch.Tensor
    mean_logit: torch.Tensor
    argmax_is_label: torch.Tensor


class Partials(NamedTuple):
    """Label-free partial statistics over part of the vocabulary, ``[P, M]`` (or running ``[M]``); ``sum``, ``t1``
    and ``t2`` are relative to ``max`` (``-inf``/0 for an empty part). ``t1 .. label`` only with statistics:
    ``before`` the max over columns before the label, ``label`` the label's own tile logit (``-inf`` if absent)."""

    max: torch.Tensor
    sum: torch.Tensor
    t1: Optional[torch.Tensor] = None
    t2: Optional[torch.Tensor] = None
    zsum: Optional[torch.Tensor] = None
    before: Optional[torch.Tensor] = None
    label: Optional[torch.Tensor] = None

    @staticmethod
    def empty(like: torch.Tensor, stats: bool) -> "Partials":
        zeros = lambda: torch.zeros_like(like)  # noqa: E731
        ninf = lambda: torch.full_like(like, NEG_INF)  # noqa: E731
        return Partials(ninf(), zeros(), *((zeros(), zeros(), zeros(), ninf(), ninf()) if stats else ()))


def _safe(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == NEG_INF, torch.zeros_like(m), m)


def rescaled(part: Partials, new_max: torch.Tensor, safe: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(sum, t1, t2)`` of ``part`` made relative to ``new_max >= part.max`` (``t1``/``t2`` None without
    statistics): ``sum e^(z - M) = e^(m - M) sum``, ``sum e^(z - M) (z - M) = e^(m - M) (t1 + sum (m - M))``,
    ``sum e^(2 (z - M)) = e^(2 (m - M)) t2``; an empty part (``m = -inf``) stays 0. ``safe``: ``new_max`` with
    ``-inf`` as 0, when the caller already has it (a merge rescales two parts to one maximum)."""
    safe = _safe(new_max) if safe is None else safe
    f = torch.exp(part.max - safe)
    total = f * part.sum
    if part.t1 is None:
        return total, None, None
    shift = torch.where(part.sum == 0, torch.zeros_like(part.max), part.max - safe)
    return total, f * (part.t1 + part.sum * shift), f * f * part.t2


def merge(run: Partials, part: Partials) -> Partials:
    """Fold ``part [P, M]`` into the running ``run [M]`` exactly (rescaled to the new maximum)."""
    new_max = torch.maximum(run.max, part.max.amax(dim=0))
    safe = _safe(new_max)
    (s_run, t1_run, t2_run), (s_part, t1_part, t2_part) = rescaled(run, new_max, safe), rescaled(part, new_max, safe)
    total = s_run + s_part.sum(dim=0)
    if run.t1 is None:
        return Partials(new_max, total)
    return Partials(new_max, total, t1_run + t1_part.sum(dim=0), t2_run + t2_part.sum(dim=0),
                    run.zsum + part.zsum.sum(dim=0), torch.maximum(run.before, part.before.amax(dim=0)),
                    torch.maximum(run.label, part.label.amax(dim=0)))


def merge_partials(run_max: torch.Tensor, run_sum: torch.Tensor, max_part: torch.Tensor,
                   sum_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold partial ``(max, sum) [P, M]`` into running ``(max, sum) [M]`` (the statistics-free :func:`merge`)."""
    out = merge(Partials(run_max, run_sum), Partials(max_part, sum_part))
    return out.max, out.sum


def finish(target: torch.Tensor, run_max: torch.Tensor, run_sum: torch.Tensor) -> tuple[torch.Tensor, RowStats]:
    """``(lp, stats)`` from the target logit and the running statistics that started at ``(target, 1)``."""
    logsum = torch.log(run_sum)
    return (target - run_max) - logsum, RowStats(run_max, logsum)


def from_partials(target: torch.Tensor, max_part: torch.Tensor, sum_part: torch.Tensor) -> tuple[torch.Tensor, RowStats]:
    """``(lp, stats)`` from the target logits ``[M]`` and label-free partial statistics ``[P, M]``."""
    run_max, run_sum = merge_partials(target, torch.ones_like(target), max_part, sum_part)
    return finish(target, run_max, run_sum)


def with_target(target: torch.Tensor, run: Partials, vocab_size: int) -> tuple[torch.Tensor, RowStats,
                                                                               Optional[TokenStats]]:
    """``(lp, row statistics, token statistics or None)`` once the label-free ``run`` covers the vocabulary."""
    if run.t1 is None:
        run_max, run_sum = merge_partials(target, torch.ones_like(target), run.max[None], run.sum[None])
        lp, stats = finish(target, run_max, run_sum)
        return lp, stats, None
    zero = torch.zeros_like(target)
    ninf = torch.full_like(target, NEG_INF)
    own = Partials(target, torch.ones_like(target), zero, torch.ones_like(target), target, ninf, ninf)
    total = merge(Partials(*(x for x in run)), Partials(*(x[None] for x in own)))
    logsum = torch.log(total.sum)
    mean_shift = total.t1 / total.sum
    lp = (target - total.max) - logsum
    tokens = TokenStats(entropy=logsum - mean_shift, log_sum_p2=torch.log(total.t2) - 2.0 * logsum,
                        mean_logit=total.zsum / vocab_size,
                        argmax_is_label=(run.label > run.before) & (run.label >= run.max))
    return lp, RowStats(total.max, logsum, mean_shift), tokens
