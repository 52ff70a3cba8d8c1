"""``AuxDPOLoss``: DPO with per-example auxiliary offsets and the null-space penalty (seed 003)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fastpref.losses.auxdpo import (
    DEFAULT_CAP,
    DEFAULT_DELTA_LR,
    DEFAULT_INIT_STD,
    DEFAULT_LAMBDA_AMP,
    DEFAULT_LAMBDA_NULL,
    auxdpo_loss,
    bounded_delta,
)
from fastpref.losses.auxdpo_penalty import head_null_penalty, param_null_penalty

from .base import FusedHeadLoss, _positive, reference_argument_names, split_pairs

NULL_PENALTIES = ("head", "params", None)


class AuxDPOLoss(FusedHeadLoss):
    r"""AuxDPO (Gopalan, Ray Chowdhury & Banerjee 2025, "Why DPO is a Misspecified Estimator and How to Fix It";
    docs/methods.md section 5). Owns ``delta_raw``, an ``nn.Parameter`` of ``2 * num_examples`` entries; the offsets are
    ``delta = cap * tanh(delta_raw)`` (:attr:`delta`; example ``i``'s chosen offset is ``delta[2i]``, its rejected one
    ``delta[2i+1]``)::

        m_i  = beta (rho_w - rho_l + delta_w - delta_l)
        loss = -mean_i log sigma(m_i) + lambda_null ||A_B delta_B||^2 - lambda_amp/2 (mean delta_w^2 + mean delta_l^2)

    Defaults, from the authors' public code: ``lambda_null = 1``, ``lambda_amp = 0.01`` (anti-collapse), ``cap = 1``,
    ``delta_raw ~ N(0, 1e-3)`` (``init_std``; read as a standard deviation). ``beta = 0.1`` is TRL's default (ours).
    **Train** ``delta_raw`` **in its own optimizer group at learning rate 5e-3 without weight decay**
    (:meth:`optimizer_group`): at a policy's learning rate (~5e-7) delta never moves and AuxDPO is DPO.

    ``null_penalty`` chooses ``||A_B delta_B||^2``:
    ``"head"`` (default): exact for the LM-head parameters, by one more fused pass over the vocabulary on the
    reference hidden states (:func:`fastpref.losses.head_null_penalty`; needs ``ref_hidden``). It is the scalable
    option and a **weaker** constraint than the authors' (the null space of the head's gradients contains that of
    all parameters' gradients);
    ``"params"``: the authors' form over a parameter list ``params`` given here (all trainable reference
    parameters, or LoRA weights, the last block), through autograd, with ``ref_logps_fn`` passed to ``forward``
    (:func:`fastpref.losses.param_null_penalty`; its log-probs must be double-differentiable: materialized logits);
    ``None``: no null-space term. For the seed's exact parameterization ``delta = Gamma c`` see
    :func:`fastpref.losses.null_space_basis`.
    """

    def __init__(self, num_examples: int, beta: float = 0.1, lambda_null: float = DEFAULT_LAMBDA_NULL,
                 lambda_amp: float = DEFAULT_LAMBDA_AMP, null_penalty: Optional[str] = "head",
                 params: Optional[Sequence[torch.Tensor]] = None, *, cap: float = DEFAULT_CAP,
                 init_std: float = DEFAULT_INIT_STD, **head_kwargs):
        super().__init__(**head_kwargs)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"AuxDPOLoss: `num_examples` must be a positive int, got {num_examples!r}")
        if null_penalty not in NULL_PENALTIES:
            raise ValueError(f"AuxDPOLoss: `null_penalty` must be one of {NULL_PENALTIES}, got {null_penalty!r}")
        if null_penalty == "params" and not params:
            raise ValueError("AuxDPOLoss: null_penalty='params' needs `params`, the reference parameters of the penalty")
        self.cap = _positive("AuxDPOLoss", "cap", cap)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not 0 <= init_std < float("inf"):
            raise ValueError(f"AuxDPOLoss: `init_std` must be a finite number >= 0, got {init_std!r}")
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)
        self._check_settings(lambda: auxdpo_loss(one, one - 1, one, one, one * 0, one * 0, beta=beta,
                                                 null_penalty=one[0] * 0, lambda_null=lambda_null,
                                                 lambda_amp=lambda_amp, backend="torch"))
        self.num_examples, self.beta = num_examples, beta
        self.lambda_null, self.lambda_amp, self.null_penalty = lambda_null, lambda_amp, null_penalty
        self.penalty_params = list(params) if params else None
        self.delta_raw = nn.Parameter(torch.randn(2 * num_examples) * init_std)

    @property
    def delta(self) -> torch.Tensor:
        """The offsets ``cap * tanh(delta_raw)`` ``[2 * num_examples]`` (differentiable in ``delta_raw``)."""
        return bounded_delta(self.delta_raw, self.cap)

    def optimizer_group(self, lr: float = DEFAULT_DELTA_LR) -> dict:
        """The parameter group for ``delta_raw``: ``{"params": [delta_raw], "lr": 5e-3, "weight_decay": 0.0}`` (the
        authors' setting); add it next to the policy's group, e.g. ``AdamW([policy_group, loss.optimizer_group()])``."""
        return {"params": [self.delta_raw], "lr": _positive("AuxDPOLoss", "lr", lr), "weight_decay": 0.0}

    def forward(self, hidden, weight, labels, segment_ids=None, *, example_index: torch.Tensor, bias=None,
                cu_seqlens=None, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None,
                ref_logps_fn: Optional[Callable[[], torch.Tensor]] = None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        ref = self.reference_logps(ref_hidden, ref_weight, labels, segment_ids, ref_bias=ref_bias,
                                   cu_seqlens=cu_seqlens, ref_logps=ref_logps)
        cw, cl = split_pairs(pol.response, "hidden")
        rw, rl = split_pairs(ref.response, "ref_logps")
        idx = self._example_index(example_index, cw.shape[0])
        delta = self.delta
        dw, dl = delta[2 * idx], delta[2 * idx + 1]
        penalty = None
        if self.null_penalty == "head":
            if ref_hidden is None:
                raise ValueError("null_penalty='head' needs `ref_hidden` and `ref_weight` (not only `ref_logps`)")
            with reference_argument_names():
                penalty = head_null_penalty(ref_hidden, ref_weight, labels, torch.cat([dw, dl]),
                                            self._segments(segment_ids), bias=ref_bias, ignore_index=self.ignore_index,
                                            logit_scale=self.logit_scale, softcap=self.softcap, cu_seqlens=cu_seqlens,
                                            backend=self.backend)
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
        if example_index.device != self.delta_raw.device:
            raise ValueError(f"`example_index` is on {example_index.device} but `delta` is on {self.delta_raw.device}")
        if bool(((example_index < 0) | (example_index >= self.num_examples)).any()):
            raise ValueError(f"`example_index` holds values outside [0, {self.num_examples})")
        return example_index.long()
