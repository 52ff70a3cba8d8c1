"""``DPOLoss`` (every TRL loss type) and ``SimPOLoss``: hidden states + head in, ``(loss, metrics)`` out."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastpref.logprobs import SequenceLogProbs
from fastpref.losses.dpo import dpo_loss, simpo_loss

from .base import FusedHeadLoss, split_pairs


class DPOLoss(FusedHeadLoss):
    r"""DPO and its family (TRL's ``DPOTrainer`` loss types) from hidden states, without logits.

    ``loss_type`` is any TRL type (``sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
    aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm``); the formulas are
    :func:`fastpref.losses.functional.dpo_loss`'s (sigmoid: ``-log sigma(beta ((logp_w - ref_w) - (logp_l - ref_l)))``,
    Rafailov et al., 2023). One policy pass (response rows only) and one no-grad reference pass.

    Batch layout is TRL's: the first half of the sequences are chosen, the second half rejected.
    ``loss_kwargs`` (``discopop_tau``, ``f_divergence_type``, ``loss_weights`` ...) go to ``dpo_loss``. Every
    setting is checked at construction (the functional loss runs once on a tiny batch).
    Defaults: ``beta = 0.1``, ``loss_type = "sigmoid"`` (TRL's ``DPOConfig``).
    """

    def __init__(self, beta: float = 0.1, loss_type: Union[str, Sequence[str]] = "sigmoid",
                 label_smoothing: float = 0.0, *, loss_kwargs: Optional[dict] = None, **head_kwargs):
        super().__init__(**head_kwargs)
        if loss_kwargs is not None and not isinstance(loss_kwargs, dict):
            raise TypeError(f"DPOLoss: `loss_kwargs` must be a dict, got {type(loss_kwargs).__name__}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.loss_kwargs = dict(loss_kwargs or {})
        settings = {k: v for k, v in self.loss_kwargs.items() if not isinstance(v, torch.Tensor)}  # per-batch tensors
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)                                 # are checked per call
        self._check_settings(lambda: dpo_loss(one, one - 1, one - 0.5, one - 0.2, beta=beta, loss_type=loss_type,
                                              label_smoothing=label_smoothing, chosen_lengths=one.new_ones(2),
                                              rejected_lengths=one.new_ones(2), backend="torch", **settings))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None, *, bias: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, ref_hidden: Optional[torch.Tensor] = None,
                ref_weight: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None,
                ref_logps: Optional[SequenceLogProbs] = None):
        """Policy ``hidden`` ``[B, T, D]`` (or packed ``[N, D]`` with ``cu_seqlens``) and head ``weight [V, D]``;
        the reference as ``ref_hidden``/``ref_weight`` (same labels and layout) or precomputed ``ref_logps``."""
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        ref = self.reference_logps(ref_hidden, ref_weight, labels, segment_ids, ref_bias=ref_bias,
                                   cu_seqlens=cu_seqlens, ref_logps=ref_logps)
        cw, cl = split_pairs(pol.response, "hidden")
        rw, rl = split_pairs(ref.response, "ref_logps")
        nw, nl = split_pairs(pol.n_response)
        return dpo_loss(cw, cl, rw, rl, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, chosen_lengths=nw, rejected_lengths=nl,
                        backend=self.backend, **self.loss_kwargs)


class SimPOLoss(FusedHeadLoss):
    r"""SimPO (Meng et al., 2024), reference-free: one policy pass, no reference model.

    ``loss = mean( -(1-ls) log sigma(z) - ls log sigma(-z) )``, ``z = beta (logp_w / n_w - logp_l / n_l) - gamma``
    (:func:`fastpref.losses.functional.simpo_loss`; ``gamma`` is the absolute margin, TRL's ``simpo_gamma``).
    """

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0, **head_kwargs):
        super().__init__(**head_kwargs)
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing
        one = torch.tensor([-3.0, -4.0], dtype=torch.float64)
        self._check_settings(lambda: simpo_loss(one, one - 1, one.new_ones(2), one.new_ones(2), beta=beta, gamma=gamma,
                                                label_smoothing=label_smoothing, backend="torch"))

    def forward(self, hidden, weight, labels, segment_ids=None, *, bias=None, cu_seqlens=None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        cw, cl = split_pairs(pol.response, "hidden")
        nw, nl = split_pairs(pol.n_response)
        return simpo_loss(cw, cl, nw, nl, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing,
                          backend=self.backend)
