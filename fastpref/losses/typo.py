"""TYPO (seed ``002``: "New Desiderata for Direct Preference Optimization"), docs/methods.md section 4."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused
from ._checks import Checker
from ._ops import pair_metrics


def typo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    unsup_logps: torch.Tensor | None,
    *,
    lam: float = 0.05,
    backend: str = "auto",
):
    r"""TYPO loss (seed 002, "New Desiderata for DPO"; docs/methods.md section 4), reference-free::

        loss = mean_pairs softplus(logp_l - logp_w)  +  lam * mean_unsup( -logp_u )

    The first term is the Bradley-Terry likelihood with ``log pi`` itself as the score (its population minimizer
    on the simplex is the preference distribution ``pi*``); the second is the NLL of responses **sampled from the
    reference model** (extra rows, role ``unsup``), ``lam`` = 0.05 by default (>= 0). ``unsup_logps=None`` omits
    the second term (pair data only, e.g. a TRL preference dataset): then only the supervised term is trained,
    which the seed's analysis needs the unsupervised term to regularize; prefer passing reference samples.

    Metrics: the DPO six with the reference-free implicit reward ``r = logp`` (``beta = 1``), plus
    ``logps/unsup``, ``typo/supervised`` and ``typo/unsupervised`` (the two terms, before ``lam``).
    ``backend``: ``'auto' | 'triton' | 'torch'``; the fused kernel computes the pair term (the unsupervised term's
    gradient is the constant ``-lam / N_u``: plain PyTorch either way).
    """
    ck = Checker("typo_loss")
    cw = ck.floats("chosen_logps", chosen_logps)
    cl = ck.floats("rejected_logps", rejected_logps, cw.numel())
    cu = None if unsup_logps is None else ck.floats("unsup_logps", unsup_logps)
    lam = ck.number("lam", lam, ge=0.0)
    cw, cl = ck.cast(cw), ck.cast(cl)
    cu = None if cu is None else ck.cast(cu)
    sup = None
    if fused.use_fused(backend, *(t for t in (cw, cl, cu) if t is not None), fn="typo_loss"):
        sup = fused.typo_pairs(cw, cl)
    if sup is None:
        sup = F.softplus(cl - cw).mean()
    metrics = pair_metrics(cw, cl, cw, cl)
    metrics["typo/supervised"] = sup.detach()
    if cu is None:
        return sup, metrics
    unsup = (-cu).mean()
    loss = sup + lam * unsup
    metrics["logps/unsup"] = cu.detach().mean()
    metrics["typo/unsupervised"] = unsup.detach()
    return loss, metrics
