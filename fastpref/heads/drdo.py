"""``DRDOLoss``: reference-free distillation with a student reward head (seed 004)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastpref.losses.drdo import DEFAULT_ALPHA, DEFAULT_GAMMA, drdo_loss

from .base import FusedHeadLoss, last_response_rows, split_pairs


class DRDOLoss(FusedHeadLoss):
    r"""DRDO (docs/methods.md section 6)::

        p_w  = sigma(logp_w - logp_l)
        L    = (R*_w - R*_l - (rhat_w - rhat_l))^2 - alpha (1 - p_w)^gamma (logp_w - log1mexp(logp_l))

    ``rhat = v . h_last + c`` is the student reward head (an ``nn.Linear(hidden_size, 1)`` owned here unless
    ``reward_head`` is given) on the policy's hidden state ``h_last`` **of** each sequence's last response token:
    the row whose input is that token, as a reward model reads it (:func:`fastpref.heads.base.last_response_rows`:
    the row after the last scored response row, which only *predicts* that token and would give two responses
    differing in their last token the same reward), or ``reward_hidden [S, D]`` when passed (a patched model's
    ``.last_hidden`` is that row). The oracle rewards ``R*`` are data (detached). The focal factor is not detached
    (the seed's gradient). Defaults ``alpha = 0.1``, ``gamma = 2`` (the seed's best).
    """

    def __init__(self, hidden_size: Optional[int] = None, alpha: float = DEFAULT_ALPHA, gamma: float = DEFAULT_GAMMA,
                 reward_head: Optional[nn.Module] = None, **head_kwargs):
        super().__init__(**head_kwargs)
        if reward_head is None:
            if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
                raise ValueError("DRDOLoss needs `hidden_size` (a positive int) or a `reward_head` module")
            reward_head = nn.Linear(hidden_size, 1)
        elif not isinstance(reward_head, nn.Module) or not list(reward_head.parameters()):
            raise TypeError("DRDOLoss: `reward_head` must be an nn.Module with parameters (hidden_size -> 1)")
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)
        self._check_settings(lambda: drdo_loss(one, one - 1, one, one, one, one, alpha=alpha, gamma=gamma,
                                               backend="torch"))
        self.reward_head, self.alpha, self.gamma = reward_head, alpha, gamma

    def forward(self, hidden, weight, labels, segment_ids=None, *, oracle_rewards: torch.Tensor,
                reward_hidden: Optional[torch.Tensor] = None, bias=None, cu_seqlens=None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        S = pol.response.shape[0]
        if reward_hidden is None:
            rows = last_response_rows(labels, self._segments(segment_ids), ignore_index=self.ignore_index,
                                      cu_seqlens=cu_seqlens)
            reward_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        elif not isinstance(reward_hidden, torch.Tensor) or reward_hidden.shape != (S, hidden.shape[-1]):
            raise ValueError(f"`reward_hidden` must be a tensor of shape ({S}, {hidden.shape[-1]})")
        if not isinstance(oracle_rewards, torch.Tensor) or oracle_rewards.shape != (S,):
            raise ValueError(f"`oracle_rewards` must be a tensor of shape ({S},): chosen rows first, then rejected")
        rhat = self.reward_head(reward_hidden.to(next(self.reward_head.parameters()).dtype)).reshape(S)
        cw, cl = split_pairs(pol.response, "hidden")
        hw, hl = split_pairs(rhat)
        ow, ol = split_pairs(oracle_rewards)
        return drdo_loss(cw, cl, hw, hl, ow, ol, alpha=self.alpha, gamma=self.gamma, backend=self.backend)
