"""``PROLoss``: Proximalized Preference Optimization (seed 000) for pairwise, binary and scalar feedback."""

from __future__ import annotations

from typing import Optional

import torch

from fastpref.losses.pro import DEFAULT_ETA, DEFAULT_LAM, pro_loss

from .base import FusedHeadLoss


class PROLoss(FusedHeadLoss):
    r"""PRO (Guo, Li & Chen, NeurIPS 2025; METHODS.md section 2) from hidden states, without logits.

    ``L_group = -sum_k muhat_k shat_k r_k + alpha/2 sum_{i,j in {1..K, h}} nu_i nu_j f(r_i - r_j)`` with the hyper
    response ``h`` (``logpi_h = log1mexp(logsumexp_k logp_k)``), see :func:`fastpref.losses.functional.pro_loss`
    for each feedback mode, the defaults and their existence conditions (``alpha (1-eta)^2 >= 1``; ``lam > 1``).

    Batch layouts: ``feedback="pairwise"``: TRL's (chosen rows, then rejected); ``"binary"``: one row per
    response with ``labels_desirable`` in {0, 1} (KTO-style rows); ``"scalar"``: rows with ``rewards`` and
    ``group_ids`` (K >= 2 responses per prompt).
    """

    def __init__(self, feedback: str = "pairwise", beta: float = 0.1, alpha: Optional[float] = None,
                 eta: float = DEFAULT_ETA, lam: float = DEFAULT_LAM, tau: float = 1.0, hyper_response: str = "exact",
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, **head_kwargs):
        super().__init__(**head_kwargs)
        self.feedback = feedback
        self.loss_kwargs = dict(beta=beta, alpha=alpha, eta=eta, lam=lam, tau=tau, hyper_response=hyper_response,
                                desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)

    def forward(self, hidden, weight, labels, segment_ids=None, *, labels_desirable: Optional[torch.Tensor] = None,
                rewards: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None, bias=None,
                cu_seqlens=None, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        ref = self.reference_logps(ref_hidden, ref_weight, labels, segment_ids, ref_bias=ref_bias,
                                   cu_seqlens=cu_seqlens, ref_logps=ref_logps)
        return pro_loss(pol.response, ref.response, feedback=self.feedback, labels=labels_desirable,
                        rewards=rewards, group_ids=group_ids, backend=self.backend, **self.loss_kwargs)
