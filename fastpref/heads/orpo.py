"""``ORPOLoss``: ORPO (Hong et al., 2024) from hidden states and the head, reference-free, one fused pass."""

from __future__ import annotations

from typing import Optional

import torch

from fastpref._rows import row_sequences
from fastpref.logprobs import PROMPT
from fastpref.losses.orpo import DEFAULT_BETA, orpo_loss

from .base import FusedHeadLoss, split_pairs


class ORPOLoss(FusedHeadLoss):
    r"""ORPO: ``nll_weight * NLL - beta * mean log sigma(log_odds)`` over length-averaged response log-probs
    (:func:`fastpref.losses.functional.orpo_loss`; Hong et al., 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model"). Batch layout is TRL's: the first half of the sequences chosen, the second rejected.

    Args:
        beta: weight of the odds-ratio term (the paper's lambda; TRL's ``ORPOConfig.beta`` default 0.1).
        nll_weight: weight of the NLL term (1: ORPO).
        nll_on_prompt: score the chosen sequences' prompt tokens (``segment_ids == 1``) in the NLL as well, as TRL's
            ``ORPOTrainer`` does ("computed over the full prompt and response"). Default False: the paper's
            ``L_SFT``, the NLL of the chosen response (Liger's with a prompt-masked target). With True the pass also
            computes the chosen prompts' rows (never the rejected prompts').
        **head_kwargs: :class:`~fastpref.heads.FusedHeadLoss`'s (``backend``, ``ignore_index``, ...).
    """

    def __init__(self, beta: float = DEFAULT_BETA, nll_weight: float = 1.0, *, nll_on_prompt: bool = False,
                 **head_kwargs):
        super().__init__(**head_kwargs)
        if not isinstance(nll_on_prompt, bool):
            raise TypeError(f"ORPOLoss: `nll_on_prompt` must be a bool, got {type(nll_on_prompt).__name__}")
        self.beta, self.nll_weight, self.nll_on_prompt = beta, nll_weight, nll_on_prompt
        self.uses_prompt = nll_on_prompt
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)
        self._check_settings(lambda: orpo_loss(one, one - 1, one.new_ones(2), one.new_ones(2) * 2, beta=beta,
                                               nll_weight=nll_weight))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None, *, bias: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        if self.nll_on_prompt and segment_ids is not None:
            segment_ids = _drop_rejected_prompts(segment_ids, labels, cu_seqlens)
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        cw, cl = split_pairs(pol.response, "hidden")
        nw, nl = split_pairs(pol.n_response)
        nll = {}
        if self.nll_on_prompt:
            nll = dict(nll_logps=(pol.response + pol.prompt).chunk(2)[0],
                       nll_lengths=(pol.n_response + pol.n_prompt).chunk(2)[0])
        return orpo_loss(cw, cl, nw, nl, beta=self.beta, nll_weight=self.nll_weight, **nll)


def _drop_rejected_prompts(segment_ids: torch.Tensor, labels: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """``segment_ids`` with the prompt rows of the second half of the sequences (the rejected ones) set to 0."""
    flat = segment_ids.reshape(-1)
    row_len = labels.shape[-1] if labels.dim() == 2 else None
    sequences, S = row_sequences(flat.numel(), flat.device, row_len=row_len,
                                 cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(flat.device))
    rejected_prompt = (sequences >= S // 2) & (flat == PROMPT)
    return torch.where(rejected_prompt, torch.zeros_like(flat), flat).view(segment_ids.shape)
