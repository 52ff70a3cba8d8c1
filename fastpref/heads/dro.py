"""``DROLoss``: Direct Reward Optimization (seed 001), prompt and response log-probs from one pass."""

from __future__ import annotations

import torch

from fastpref.losses.dro import DEFAULT_BETA, DEFAULT_LOG_Z0, dro_loss

from .base import FusedHeadLoss


class DROLoss(FusedHeadLoss):
    r"""DRO (docs/methods.md section 3): point-wise regression on explicit rewards ``R``::

        beta log Z_i = sg(beta (plogp_i - ref_plogp_i)) + beta log_z0
        loss         = mean_prompts mean_responses (R_i - beta (logp_i - ref_logp_i) - beta log Z_i)^2

    ``segment_ids`` must mark the prompt (1) and the response (2): each pass returns both segment sums from
    one walk over the tokens; the prompt sum is detached (its rows get no gradient and are skipped in backward).
    Seed: "Direct Reward Optimization: A Point-wise Alignment Approach" (not Richemond et al. 2024). Defaults
    ``beta = 0.1``, ``log_z0 = 50``: the seed's reported setting.
    """

    uses_prompt = True

    def __init__(self, beta: float = DEFAULT_BETA, log_z0: float = DEFAULT_LOG_Z0, **head_kwargs):
        super().__init__(**head_kwargs)
        self.beta, self.log_z0 = beta, log_z0
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)
        self._check_settings(lambda: dro_loss(one, one, one, one, one, torch.tensor([0, 0]), beta=beta, log_z0=log_z0,
                                              backend="torch"))

    def forward(self, hidden, weight, labels, segment_ids: torch.Tensor, *, rewards: torch.Tensor,
                group_ids: torch.Tensor, bias=None, cu_seqlens=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, ref_logps=None):
        if segment_ids is None:
            raise ValueError("DROLoss needs `segment_ids` marking the prompt (1) and the response (2)")
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        ref = self.reference_logps(ref_hidden, ref_weight, labels, segment_ids, ref_bias=ref_bias,
                                   cu_seqlens=cu_seqlens, ref_logps=ref_logps)
        return dro_loss(pol.response, ref.response, pol.prompt.detach(), ref.prompt, rewards, group_ids,
                        beta=self.beta, log_z0=self.log_z0, backend=self.backend)
