"""Sum of a head's logits over rows and the whole vocabulary, without the ``rows x vocab`` tensor.

Liger's ``*_logits_mean`` / ``*_logits_sum`` metrics and TRL's CPO/ORPO ``logits/chosen`` / ``logits/rejected`` are
means of every logit of every position (padding and prompt included). For ``z = s (W h + b)`` that total is linear in
the hidden states: ``sum_t sum_v z_tv = s ((sum_t h_t) . (sum_v W_v) + n sum_v b_v)``, exact in float64 from one
``D``-vector and one ``[V, D]`` column sum. A softcap (``c tanh(z / c)``) is not linear: then the total comes from one
no-grad fused pass over the rows (the mean-logit statistic of :func:`fastpref.sequence_logprobs`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .logprobs import sequence_logprobs


@torch.no_grad()
def logits_total(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 logit_scale: float = 1.0, softcap: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """``sum`` over every row of ``hidden [..., D]`` and every vocabulary entry of the (transformed) logits: a
    float64 scalar, no gradient."""
    rows = hidden.detach().reshape(-1, hidden.shape[-1])
    if rows.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64, device=hidden.device)
    if softcap is None:
        total = rows.double().sum(0) @ weight.detach().double().sum(0)
        if bias is not None:
            total = total + rows.shape[0] * bias.detach().double().sum()
        return total * logit_scale
    labels = torch.zeros(1, rows.shape[0], dtype=torch.long, device=rows.device)  # any label: only the mean is read
    stats = sequence_logprobs(rows[None], weight.detach(), labels, bias=None if bias is None else bias.detach(),
                              logit_scale=logit_scale, softcap=softcap, backend=backend, return_stats=True).stats
    return stats.response.mean_logit.double().sum() * weight.shape[0]
