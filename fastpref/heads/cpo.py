"""``CPOLoss``: CPO (Xu et al., 2024) and TRL's CPOTrainer variants from hidden states and the head, one fused pass."""

from __future__ import annotations

from typing import Optional

import torch

from fastpref.losses.cpo import cpo_loss

from .base import FusedHeadLoss, split_pairs


class CPOLoss(FusedHeadLoss):
    r"""CPO, reference-free: ``mean(-log sigma(beta (logp_w - logp_l))) + cpo_alpha * NLL`` and TRL's variants
    (:func:`fastpref.losses.functional.cpo_loss`: ``loss_type`` ``sigmoid`` / ``hinge`` / ``ipo`` / ``simpo``
    (CPO-SimPO), AlphaPO's ``alpha``). Xu et al., 2024, "Contrastive Preference Optimization". The NLL term is the
    token mean over the chosen responses. Batch layout is TRL's (chosen sequences first).

    Defaults are TRL's ``CPOConfig``: ``beta = 0.1``, ``loss_type = "sigmoid"``, ``label_smoothing = 0``,
    ``simpo_gamma = 0.5``, ``alpha = 0``, ``cpo_alpha = 1``. AlphaPO (TRL's ``loss_type="alphapo"``):
    ``loss_type="simpo", cpo_alpha=0.0, alpha=...``.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
                 simpo_gamma: float = 0.5, alpha: float = 0.0, cpo_alpha: float = 1.0, **head_kwargs):
        super().__init__(**head_kwargs)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.simpo_gamma, self.alpha, self.cpo_alpha = simpo_gamma, alpha, cpo_alpha
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)
        self._check_settings(lambda: cpo_loss(one, one - 1, one.new_ones(2), one.new_ones(2), **self._settings(),
                                              backend="torch"))

    def _settings(self) -> dict:
        return dict(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                    simpo_gamma=self.simpo_gamma, alpha=self.alpha, cpo_alpha=self.cpo_alpha)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None, *, bias: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        cw, cl = split_pairs(pol.response, "hidden")
        nw, nl = split_pairs(pol.n_response)
        return cpo_loss(cw, cl, nw, nl, **self._settings(), backend=self.backend)
