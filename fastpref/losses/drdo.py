"""DRDO (seed ``004``, "Direct Reward Distillation and policy-Optimization"): reward distillation from an oracle plus a
focal preference term, docs/methods.md section 6.

Defaults: ``alpha = 0.1``, ``gamma = 2`` (the seed's best setting); the oracle's language-model weight ``a = 0.01``
(the seed, App. C.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused
from ._checks import Checker
from ._ops import pair_metrics, safe_log1mexp

DEFAULT_ALPHA = 0.1
DEFAULT_GAMMA = 2.0
DEFAULT_ORACLE_A = 0.01


def drdo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_reward: torch.Tensor,
    rejected_reward: torch.Tensor,
    oracle_chosen: torch.Tensor,
    oracle_rejected: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    gamma: float = DEFAULT_GAMMA,
    backend: str = "auto",
):
    r"""DRDO loss (seed 004; docs/methods.md section 6), reference-free::

        p_w  = sigma(logp_w - logp_l)
        L_i  = ( R*_w - R*_l - (rhat_w - rhat_l) )^2  -  alpha (1 - p_w)^gamma ( logp_w - log1mexp(logp_l) )
        loss = mean_i L_i

    ``chosen_reward`` / ``rejected_reward`` are the student reward head's outputs ``rhat`` (differentiable; the
    head reads the hidden state *of* each sequence's last response token), ``oracle_*`` the oracle rewards ``R*``:
    data from a frozen oracle, **detached** here (no gradient reaches them, whatever their ``requires_grad``).
    The focal factor ``(1 - p_w)^gamma = exp(gamma log sigma(logp_l - logp_w))`` is **not** detached: the seed's
    gradient, eq. 48-50, differentiates it (its eq. 51-52 then drop that derivative as negligible, which at
    sequence-level log-probs it is not: fastpref keeps the full gradient).  ``log(1 - pi(y_l))`` is
    ``safe_log1mexp(logp_l)``: exact for ``logp_l <= -2^-24``, continued linearly above, so a rejected log-prob of
    exactly 0 (or subnormal) gives a finite loss and gradient (``rejected_logps`` must be <= 0).  Defaults
    ``alpha = 0.1``, ``gamma = 2`` (the seed's best); ``gamma`` must be >= 0.  ``backend``: ``'auto' | 'triton' |
    'torch'``: the fused loss-head kernel (focal term and ``log1mexp`` in fp32; ``fastpref.losses.fused``) or this
    expression.

    Metrics: the DPO six with the student rewards ``rhat`` as ``rewards/*``, plus ``drdo/distill`` (mean squared
    term), ``drdo/focal`` (mean focal term before ``alpha``) and ``drdo/p_chosen`` (mean ``p_w``).
    """
    ck = Checker("drdo_loss")
    cw = ck.floats("chosen_logps", chosen_logps)
    n = cw.numel()
    cl = ck.floats("rejected_logps", rejected_logps, n)
    hw = ck.floats("chosen_reward", chosen_reward, n)
    hl = ck.floats("rejected_reward", rejected_reward, n)
    ow = ck.floats("oracle_chosen", oracle_chosen, n)
    ol = ck.floats("oracle_rejected", oracle_rejected, n)
    alpha = ck.number("alpha", alpha, ge=0.0)
    gamma = ck.number("gamma", gamma, ge=0.0)
    cl = ck.nonpositive("rejected_logps", cl, "a log-prob; the focal term reads log(1 - pi(y_l))")
    cw, cl, hw, hl = (ck.cast(x) for x in (cw, cl, hw, hl))
    ow, ol = ck.cast(ow).detach(), ck.cast(ol).detach()  # oracle rewards are data

    distill = ((ow - ol) - (hw - hl)).pow(2)
    focal_factor = torch.exp(gamma * F.logsigmoid(cl - cw))  # (1 - p_w)^gamma
    focal = focal_factor * (cw - safe_log1mexp(cl))
    loss = None
    if fused.use_fused(backend, cw, cl, hw, hl, ow, ol, fn="drdo_loss"):
        loss = fused.drdo(cw, cl, hw, hl, ow, ol, alpha=alpha, gamma=gamma)
    if loss is None:
        loss = (distill - alpha * focal).mean()
    metrics = pair_metrics(hw, hl, cw, cl)
    metrics["drdo/distill"] = distill.detach().mean()
    metrics["drdo/focal"] = focal.detach().mean()
    metrics["drdo/p_chosen"] = torch.sigmoid(cw - cl).detach().mean()
    return loss, metrics


def drdo_oracle_loss(
    chosen_reward: torch.Tensor,
    rejected_reward: torch.Tensor,
    chosen_logps: torch.Tensor,
    *,
    a: float = DEFAULT_ORACLE_A,
):
    r"""DRDO's oracle objective (seed 004; docs/methods.md section 6): reward head plus language-model regularizer::

        loss = mean_i -[ (1 - a) log sigma(r(x, y_w) - r(x, y_l)) + a * logp_w ]

    ``chosen_reward`` / ``rejected_reward``: the oracle's reward-head outputs (on the hidden state of each
    sequence's last response token); ``chosen_logps``: the oracle LM's (summed) log-prob of the chosen response.
    ``a`` in [0, 1], default 0.01 (the seed, App. C.1).  Training the oracle with this loss and annotating ``R*``
    for the student run is :class:`fastpref.trainers.DRDOOracleTrainer` and
    :func:`fastpref.oracle.annotate_oracle_rewards`.

    Metrics: the DPO six with the oracle rewards as ``rewards/*`` (``logps/rejected`` absent: not an input).
    """
    ck = Checker("drdo_oracle_loss")
    rw = ck.floats("chosen_reward", chosen_reward)
    n = rw.numel()
    rl = ck.floats("rejected_reward", rejected_reward, n)
    cw = ck.floats("chosen_logps", chosen_logps, n)
    a = ck.number("a", a, ge=0.0, le=1.0)
    rw, rl, cw = (ck.cast(x) for x in (rw, rl, cw))
    loss = -((1 - a) * F.logsigmoid(rw - rl) + a * cw).mean()
    metrics = pair_metrics(rw, rl, cw, cw)
    del metrics["logps/rejected"]
    return loss, metrics
