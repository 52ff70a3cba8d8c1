"""Numerical building blocks shared by the functional losses (docs/methods.md section 0).

* :func:`log1mexp` -- ``log(1 - e^a)`` for ``a < 0``, stable over the whole range a sequence log-prob takes
  (-1e5 .. -1e-8 in fp32).
* :func:`safe_log1mexp` -- the same, continued linearly (value and slope) above ``a = -2^-24``, so that a log-prob
  of exactly 0, or a subnormal one, gives a finite hyper response / focal term and a finite gradient.
* :func:`pro_f` -- ``f(x) = 1/2 softplus(x) + 1/2 softplus(-x)`` (PRO's regularizer link, docs/methods.md section 2).
* :class:`Groups` -- rows grouped by an integer id (a prompt), padded to ``[G, K_max]`` so that per-group sums,
  means, log-sum-exps and pairwise terms are plain tensor ops (differentiable by autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0`` (docs/methods.md section 0).

    ``log(-expm1(a))`` for ``a > -ln 2`` and ``log1p(-exp(a))`` otherwise (Maechler, "Accurately computing
    log(1 - exp(-|a|))", 2012).  Each branch sees a clamped copy of ``a`` so the branch ``torch.where`` discards
    never produces an inf/nan that would poison the gradient.  Returns ``-inf`` at ``a = 0`` and nan for ``a > 0``;
    the losses validate their inputs before calling it.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"log1mexp: `a` must be a torch.Tensor, got {type(a).__name__}")
    if not a.is_floating_point():
        raise TypeError(f"log1mexp: `a` must have a floating dtype, got {a.dtype}")
    near = a > -LOG2
    a_near = torch.where(near, a, torch.full_like(a, -LOG2))
    a_far = torch.where(near, torch.full_like(a, -LOG2), a)
    return torch.where(near, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


# fp32 cannot resolve a probability within 2^-24 of 1 (``1 - 2^-24`` is the largest float32 below 1, and a
# log-prob in (-2^-24, 0] rounds the probability to 1): below that distance the log-prob carries no information.
SAFE_LOG1MEXP_EPS = 2.0**-24
_SAFE_L0 = math.log(-math.expm1(-SAFE_LOG1MEXP_EPS))  # log1mexp(-eps)  = -16.6355...
_SAFE_D0 = -1.0 / math.expm1(SAFE_LOG1MEXP_EPS)  # log1mexp'(-eps) = -16777215.5


def safe_log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log1mexp(a)`` for ``a <= -2^-24``; above it (``a`` in ``(-2^-24, 0]``, or slightly positive from rounding)
    the tangent line at ``-2^-24``: ``log1mexp(-eps) + (a + eps) * log1mexp'(-eps)``, ``eps = 2^-24``.

    The hyper response of PRO ('exact') and DRDO's ``log(1 - pi(y_l))`` need ``log(1 - pi)`` of a sequence whose
    probability may round to exactly 1 (``logp = 0``, even in float64) or be subnormally close to it
    (``logp = -1e-40``), where ``log1mexp`` is ``-inf`` and its slope ``-1/|a|`` overflows.  fp32 cannot resolve a
    probability within ``2^-24`` of 1, so there the function is continued with its value and slope at ``-2^-24``
    (C1, finite: ``log(1 - pi) >= -17.6`` at ``a = 0``, slope ``-1.68e7``).  Below ``-2^-24`` it is ``log1mexp``
    exactly.  Same constant in every dtype, so fp32, float64 and the fused kernels compute one function.
    """
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise TypeError("safe_log1mexp: `a` must be a floating torch.Tensor")
    near = a > -SAFE_LOG1MEXP_EPS
    exact = log1mexp(torch.clamp(a, max=-SAFE_LOG1MEXP_EPS))
    return torch.where(near, _SAFE_L0 + (a + SAFE_LOG1MEXP_EPS) * _SAFE_D0, exact)


def pro_f(x: torch.Tensor) -> torch.Tensor:
    """``f(x) = 1/2 softplus(x) + 1/2 softplus(-x)``; ``f(0) = log 2``, ``f'(x) = sigma(x) - 1/2``."""
    return 0.5 * F.softplus(x) + 0.5 * F.softplus(-x)


class Groups:
    """Rows grouped by integer id.  ``index[g, k]`` is the row of the k-th member of group g (``mask`` marks the
    real members; groups are numbered in sorted-id order, members keep their row order)."""

    def __init__(self, group_ids: torch.Tensor):
        uniq, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        device = group_ids.device
        n = group_ids.numel()
        self.inv = inv
        self.num = int(uniq.numel())
        self.counts = counts
        self.kmax = int(counts.max())
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        g_sorted = inv[order]
        pos = torch.arange(n, device=device) - starts[g_sorted]
        self.index = torch.zeros(self.num, self.kmax, dtype=torch.long, device=device)
        self.mask = torch.zeros(self.num, self.kmax, dtype=torch.bool, device=device)
        self.index[g_sorted, pos] = order
        self.mask[g_sorted, pos] = True

    @classmethod
    def pairs(cls, num_pairs: int, device) -> "Groups":
        """TRL layout: rows ``b`` and ``b + B`` form pair ``b`` (chosen first)."""
        ids = torch.arange(num_pairs, device=device)
        return cls(torch.cat([ids, ids]))

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[N] -> [G, K_max]`` with ``fill`` in the padding slots."""
        return torch.where(self.mask, x[self.index], torch.full((), fill, dtype=x.dtype, device=x.device))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(x).sum(dim=1)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x) / self.counts.to(x.dtype)

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """``logsumexp`` per group as ``m + log1p(sum_{k != argmax} e^{x_k - m})``: unlike ``m + log(sum_k ...)`` it
        keeps the small terms when one response holds almost all the mass (``x_max`` near 0, where PRO's
        ``log1mexp`` of the result needs them).  Gradient: the per-group softmax."""
        xp = self.pad(x, float("-inf"))
        m, arg = xp.max(dim=1)
        is_arg = torch.arange(self.kmax, device=x.device)[None, :] == arg[:, None]
        rest = torch.where(is_arg | ~self.mask, torch.zeros((), dtype=x.dtype, device=x.device),
                           torch.exp(xp - m[:, None]))
        return m + torch.log1p(rest.sum(dim=1))

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group softmax, padded ``[G, K_max]`` (zeros in the padding)."""
        return torch.softmax(self.pad(x, float("-inf")), dim=1)

    def pairwise(self, x: torch.Tensor, fn) -> torch.Tensor:
        """``sum_{i, j in g} fn(x_i - x_j)`` over ordered pairs, diagonal included: ``[G]``."""
        xp = self.pad(x)
        pm = self.mask[:, :, None] & self.mask[:, None, :]
        d = torch.where(pm, xp[:, :, None] - xp[:, None, :], torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.where(pm, fn(d), torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=(1, 2))


@torch.no_grad()
def group_top_metrics(groups: Groups, scores: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor) -> dict:
    """TRL-named metrics for grouped (scalar-feedback) rows: the response with the highest ``scores`` in each
    group plays "chosen", the group's other responses "rejected" (as in the NCA reference trainer)."""
    sp = groups.pad(scores, float("-inf"))
    top = sp.argmax(dim=1)
    top_row = groups.index.gather(1, top[:, None]).squeeze(1)
    others = groups.mask.clone()
    others[torch.arange(groups.num, device=others.device), top] = False
    n_others = others.sum(1).to(rewards.dtype)
    rp, lp = groups.pad(rewards), groups.pad(logps)
    r_top, l_top = rewards[top_row], logps[top_row]
    r_rest = (rp * others).sum(1) / n_others
    l_rest = (lp * others).sum(1) / n_others
    acc = ((rp < r_top[:, None]) & others).sum(1).to(rewards.dtype) / n_others
    return {
        "rewards/chosen": r_top.mean(),
        "rewards/rejected": r_rest.mean(),
        "rewards/accuracies": acc.mean(),
        "rewards/margins": (r_top - r_rest).mean(),
        "logps/chosen": l_top.mean(),
        "logps/rejected": l_rest.mean(),
    }


@torch.no_grad()
def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """The six metrics TRL's DPOTrainer logs, as detached batch means."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }
