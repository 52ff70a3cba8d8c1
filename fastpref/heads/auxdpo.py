"""``AuxDPOLoss``: DPO with per-example auxiliary offsets and the null-space penalty (seed 003)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fastpref.losses.auxdpo import DEFAULT_LAMBDA_AMP, DEFAULT_LAMBDA_NULL, auxdpo_loss
from fastpref.losses.auxdpo_penalty import head_null_penalty, param_null_penalty

from .base import FusedHeadLoss, split_pairs

NULL_PENALTIES = ("head", "params", None)


class AuxDPOLoss(FusedHeadLoss):
    r"""AuxDPO (METHODS.md section 5). Owns ``delta``, an ``nn.Parameter`` of ``2 * num_examples`` offsets
    (example ``i``'s chosen offset is ``delta[2i]``, its rejected one ``delta[2i+1]``; zero at start)::

        m_i  = beta (rho_w - rho_l + delta_w - delta_l)
        loss = -mean_i log sigma(m_i) + lambda_null ||A_B delta_B||^2 + lambda_amp ||delta_B||^2

    ``null_penalty`` chooses ``||A_B delta_B||^2``:
    ``"head"``: exact for the LM-head parameters, by one more fused pass over the vocabulary on the reference
    hidden states (:func:`fastpref.losses.head_null_penalty`; needs ``ref_hidden``);
    ``"params"``: through autograd over the parameter list ``params`` given here, with ``ref_logps_fn`` passed
    to ``forward`` (:func:`fastpref.losses.param_null_penalty`; small parameter sets: LoRA, the last block);
    ``None``: no null-space term. For the seed's exact parameterization ``delta = Gamma c`` see
    :func:`fastpref.losses.null_space_basis`.
    """

    def __init__(self, num_examples: int, beta: float = 0.1, lambda_null: float = DEFAULT_LAMBDA_NULL,
                 lambda_amp: float = DEFAULT_LAMBDA_AMP, null_penalty: Optional[str] = "head",
                 params: Optional[Sequence[torch.Tensor]] = None, **head_kwargs):
        super().__init__(**head_kwargs)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"`num_examples` must be a positive int, got {num_examples!r}")
        if null_penalty not in NULL_PENALTIES:
            raise ValueError(f"`null_penalty` must be one of {NULL_PENALTIES}, got {null_penalty!r}")
        if null_penalty == "params" and not params:
            raise ValueError("null_penalty='params' needs `params`, the reference parameters of the penalty")
        self.num_examples, self.beta = num_examples, beta
        self.lambda_null, self.lambda_amp, self.null_penalty = lambda_null, lambda_amp, null_penalty
        self.penalty_params = list(params) if params else None
        self.delta = nn.Parameter(torch.zeros(2 * num_examples))

    def forward(self, hidden, weight, labels, segment_ids=None, *, example_index: torch.Tensor, bias=None,
                cu_seqlens=None, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None,
                ref_logps_fn: Optional[Callable[[], torch.Tensor]] = None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        ref = self.reference_logps(ref_hidden, ref_weight, labels, segment_ids, ref_bias=ref_bias,
                                   cu_seqlens=cu_seqlens, ref_logps=ref_logps)
        cw, cl = split_pairs(pol.response, "hidden")
        rw, rl = split_pairs(ref.response, "ref_logps")
        idx = self._example_index(example_index, cw.shape[0])
        dw, dl = self.delta[2 * idx], self.delta[2 * idx + 1]
        penalty = None
        if self.null_penalty == "head":
            if ref_hidden is None:
                raise ValueError("null_penalty='head' needs `ref_hidden` and `ref_weight` (not only `ref_logps`)")
            penalty = head_null_penalty(ref_hidden, ref_weight, labels, torch.cat([dw, dl]), self._segments(segment_ids),
                                        bias=ref_bias, ignore_index=self.ignore_index, logit_scale=self.logit_scale,
                                        softcap=self.softcap, cu_seqlens=cu_seqlens, backend=self.backend)
        elif self.null_penalty == "params":
            if ref_logps_fn is None:
                raise ValueError("null_penalty='params' needs `ref_logps_fn`, the batch's reference log-probs "
                                 "as a function of `params`")
            penalty = param_null_penalty(ref_logps_fn, self.penalty_params, torch.cat([dw, dl]))
        return auxdpo_loss(cw, cl, rw, rl, dw, dl, beta=self.beta, null_penalty=penalty,
                           lambda_null=self.lambda_null, lambda_amp=self.lambda_amp, backend=self.backend)

    def _example_index(self, example_index, num_pairs: int) -> torch.Tensor:
        if not isinstance(example_index, torch.Tensor) or example_index.dtype not in (torch.int64, torch.int32):
            raise TypeError("`example_index` must be an int64/int32 tensor of dataset indices, one per pair")
        if example_index.shape != (num_pairs,):
            raise ValueError(f"`example_index` must have shape ({num_pairs},), one index per pair; "
                             f"got {tuple(example_index.shape)}")
        if example_index.device != self.delta.device:
            raise ValueError(f"`example_index` is on {example_index.device} but `delta` is on {self.delta.device}")
        if bool(((example_index < 0) | (example_index >= self.num_examples)).any()):
            raise ValueError(f"`example_index` holds values outside [0, {self.num_examples})")
        return example_index.long()
