"""``PROLoss``: Proximalized Preference Optimization (seed 000) for pairwise, binary and scalar feedback."""

from __future__ import annotations

from typing import Optional

import torch

from fastpref.losses.pro import DEFAULT_BETA, DEFAULT_LAM, DEFAULT_TAU, pro_loss

from .base import FusedHeadLoss


class PROLoss(FusedHeadLoss):
    r"""PRO (Guo, Li & Chen, NeurIPS 2025; docs/methods.md section 2) from hidden states, without logits.

    ``L_group = -sum_k muhat_k shat_k r_k + alpha/2 sum_{i,j in {1..K, h}} nu_i nu_j f(r_i - r_j)`` with the hyper
    response ``h`` (``logpi_h = log1mexp(logsumexp_k logp_k)``), see :func:`fastpref.losses.functional.pro_loss`
    for each feedback mode, the defaults and where they come from (PRO-P ``eta = 1/3``, ``alpha = 1/(1-eta)^2``;
    PRO-S ``eta = 1/(K+1)``, ``alpha = lam / (eta (1-eta))``; ``lam = 2``) and their existence conditions
    (PRO-P ``alpha (1 - eta^2) > 1``; PRO-S ``alpha (1-eta)(K-1+eta) > K-1``; PRO-B ``lam > 1``), checked at
    construction where they do not depend on the data.

    Batch layouts: ``feedback="pairwise"``: TRL's (chosen rows, then rejected); ``"binary"``: one row per
    response with ``labels_desirable`` in {0, 1} (KTO-style rows); ``"scalar"``: rows with ``rewards`` and
    ``group_ids`` (K >= 2 responses per prompt).
    """

    def __init__(self, feedback: str = "pairwise", beta: float = DEFAULT_BETA, alpha: Optional[float] = None,
                 eta: Optional[float] = None, lam: float = DEFAULT_LAM, tau: float = DEFAULT_TAU,
                 hyper_response: str = "exact", desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 require_optimum: bool = True, **head_kwargs):
        super().__init__(**head_kwargs)
        self.feedback = feedback
        self.loss_kwargs = dict(beta=beta, alpha=alpha, eta=eta, lam=lam, tau=tau, hyper_response=hyper_response,
                                desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                require_optimum=require_optimum)
        self._check_settings(self._dummy_loss)

    def _dummy_loss(self):
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)
        kw = dict(self.loss_kwargs, backend="torch")
        if self.feedback == "binary":
            return pro_loss(one, one, feedback="binary", labels=torch.tensor([1, 0]), **kw)
        if self.feedback == "scalar":  # K = 2 (the group size where the existence condition binds for the defaults)
            return pro_loss(one, one, feedback="scalar", rewards=one, group_ids=torch.tensor([0, 0]), **kw)
        return pro_loss(one, one, feedback=self.feedback, **kw)

    def forward(self, hidden, weight, labels, segment_ids=None, *, labels_desirable: Optional[torch.Tensor] = None,
                rewards: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None, bias=None,
                cu_seqlens=None, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        ref = self.reference_logps(ref_hidden, ref_weight, labels, segment_ids, ref_bias=ref_bias,
                                   cu_seqlens=cu_seqlens, ref_logps=ref_logps)
        return pro_loss(pol.response, ref.response, feedback=self.feedback, labels=labels_desirable,
                        rewards=rewards, group_ids=group_ids, backend=self.backend, **self.loss_kwargs)
