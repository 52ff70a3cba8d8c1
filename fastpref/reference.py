"""Plain PyTorch references of the fused kernels' functions (materialized logits; for tests and checks).

These build the full ``rows x V`` logits: use them on small inputs or in float64 to check the kernels,
never in training.
"""

from __future__ import annotations

from typing import Optional

import torch


def head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """``z = s * (hidden W^T + b)``, then ``c * tanh(z / c)`` when ``softcap=c``; in ``hidden``'s dtype."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """``lp_t = z_{t, y_t} - logsumexp_v z_tv`` for every row of ``hidden [M, D]`` (labels in ``[0, V)``)."""
    z = head_logits(hidden, weight, bias, logit_scale=logit_scale, softcap=softcap)
    return torch.log_softmax(z, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def sequence_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Materialized-logits version of :func:`fastpref.sequence_logprobs` (same arguments, same meaning).

    Differentiable through autograd in the inputs' dtype (run it in float64 for a reference). Returns a dict
    with ``response``, ``prompt``, ``n_response``, ``n_prompt`` and ``token_logps``.
    """
    D = hidden.shape[-1]
    flat_h = hidden.reshape(-1, D)
    flat_y = labels.reshape(-1).long()
    if segment_ids is None:
        flat_s = torch.where(flat_y != ignore_index, 2, 0)
    else:
        flat_s = segment_ids.reshape(-1).long()
    scored = (flat_y != ignore_index) & (flat_s > 0)
    if cu_seqlens is None:
        S, T = hidden.shape[0], hidden.shape[1]
        seq = torch.arange(flat_y.numel(), device=hidden.device) // T
    else:
        S = cu_seqlens.numel() - 1
        seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(flat_y.numel(), device=hidden.device), right=True)
    lp = token_logprobs_reference(flat_h, weight, flat_y.clamp(min=0), bias, logit_scale=logit_scale, softcap=softcap)
    lp = torch.where(scored, lp, torch.zeros_like(lp))
    out = {}
    for name, seg in (("response", 2), ("prompt", 1)):
        mask = (scored & (flat_s == seg)).to(lp.dtype)
        total = torch.zeros(S, dtype=lp.dtype, device=lp.device).index_add(0, seq, lp * mask)
        count = torch.zeros(S, dtype=lp.dtype, device=lp.device).index_add(0, seq, mask)
        out[name] = total / count.clamp(min=1) if reduction == "mean" else total
        out["n_" + name] = count
    out["token_logps"] = lp.reshape(labels.shape)
    return out
