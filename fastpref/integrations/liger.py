"""One-line swap from Liger: ``liger_kernel.chunked_loss``'s preference losses with Liger's calling convention.

::

    # from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from fastpref.integrations.liger import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1)                    # Liger's constructor arguments
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = loss_fn(lm_head.weight, hidden, target, lm_head.bias,
                                                       ref_input=ref_hidden, ref_weight=ref_lm_head.weight)

Same class names, constructor arguments and defaults, ``forward`` signatures (including KTO's, which takes
``_input`` before ``lin_weight``), returned ``(loss, metrics)`` tuples in Liger's order, and Liger's semantics
(liger-kernel 0.8.5): the batch is ``[chosen rows; rejected rows]`` of ``_input [B, T, H]`` with ``target [B, T]``
(``ignore_index`` marks unscored positions), the loss a mean over pairs plus ``alpha`` times the chosen NLL when
``compute_nll_loss`` (a token mean over the chosen targets), log-probs summed or averaged per ``average_log_prob``.
Tested against Liger's own classes on its test shapes (``tests/test_liger_compat.py``).

What differs: the log-probs come from :func:`fastpref.sequence_logprobs` (one fused pass for the policy, one no-grad
pass for the reference; exact fp32 statistics, float64 segment sums, no ``[chunk, T, V]`` logits; Liger materializes
one pair's logits per chunk and rounds bf16 logits before its fp32 log-softmax); a sequence with no scored target
raises ``ValueError`` (Liger returns NaN with ``average_log_prob`` and 0 otherwise). ``compiled`` and ``chunk_size``
are accepted and checked but change nothing: fastpref's head chunks the vocabulary itself and is a custom op that
``torch.compile`` traces. One keyword-only addition each: ``backend`` (``"auto"``, ``"triton"``, ``"torch"``).

The ``*_logits_mean`` / ``*_logits_sum`` metrics are Liger's: over **every** position of the rows (padding and
prompt included) and the whole vocabulary. They are linear in the hidden states, so they are computed exactly as
``(sum_t h_t) . (sum_v W_v) + n b.sum()`` in float64, without a vocabulary pass.

The loss is computed in float64 from float64 per-sequence totals and returned in float32, as Liger returns it; the
metrics are detached float32 tensors (Liger's are outputs of its autograd function that carry no gradient).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from .._logit_totals import logits_total
from ..logprobs import BACKENDS, SequenceLogProbs, sequence_logprobs
from ..losses.cpo import cpo_loss
from ..losses.dpo import dpo_loss, simpo_loss
from ..losses.orpo import orpo_loss

__all__ = ["LigerFusedLinearCPOLoss", "LigerFusedLinearDPOLoss", "LigerFusedLinearKTOLoss",
           "LigerFusedLinearORPOLoss", "LigerFusedLinearSimPOLoss"]

# Liger's DPO loss types (liger-kernel 0.8.5), plus IPO, which Liger refuses for lack of the completion-token counts
# that the fused head returns (TRL's formula: the sequence scores divided by the lengths).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop", "ipo")


class _LigerLoss(nn.Module):
    """Constructor checks and the fused passes shared by the Liger-convention losses."""

    def __init__(self, *, ignore_index: int, beta: float, compiled: bool, chunk_size: int, backend: str):
        super().__init__()
        name = type(self).__name__
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{name}: `ignore_index` must be an int, got {type(ignore_index).__name__}")
        self.beta = _real(name, "beta", beta, positive=True)
        if not isinstance(compiled, bool):
            raise TypeError(f"{name}: `compiled` must be a bool, got {type(compiled).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{name}: `chunk_size` must be a positive int, got {chunk_size!r}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{name}: `backend` must be one of {BACKENDS}, got {backend!r}")
        self.ignore_index, self.compiled, self.chunk_size, self.backend = ignore_index, compiled, chunk_size, backend

    def _check_batch(self, _input, lin_weight, target, *, paired: bool) -> None:
        name = type(self).__name__
        for arg, value in (("_input", _input), ("lin_weight", lin_weight), ("target", target)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: `{arg}` must be a torch.Tensor, got {type(value).__name__}")
        if _input.dim() != 3:
            raise ValueError(f"{name}: `_input` must be [B, T, H] (Liger's layout), got shape {tuple(_input.shape)}")
        if target.shape != _input.shape[:2]:
            raise ValueError(f"{name}: `target` is {tuple(target.shape)} but `_input` is {tuple(_input.shape)}; "
                             f"expected {tuple(_input.shape[:2])}")
        if paired and (_input.shape[0] == 0 or _input.shape[0] % 2):
            raise ValueError(f"{name}: `_input` must hold an even, non-zero number of rows (chosen rows, then "
                             f"rejected), got {_input.shape[0]}")

    def _logps(self, _input, weight, target, bias, *, reference: bool = False) -> SequenceLogProbs:
        """Summed token log-probs per row, float64 totals (a no-grad pass for the reference)."""
        if reference:
            with torch.no_grad():
                return sequence_logprobs(_input.detach(), weight.detach(), target,
                                         bias=None if bias is None else bias.detach(),
                                         ignore_index=self.ignore_index, backend=self.backend,
                                         totals_dtype=torch.float64)
        return sequence_logprobs(_input, weight, target, bias=bias, ignore_index=self.ignore_index,
                                 backend=self.backend, totals_dtype=torch.float64)

    def _chosen_nll(self, _input, weight, target, bias, nll_target=None, pol: Optional[SequenceLogProbs] = None):
        """Liger's NLL: the chosen rows' summed token NLL over the number of chosen targets not ``ignore_index``.
        With ``nll_target`` (ORPO) the chosen rows are scored once more against it, as one sequence (a row with no
        NLL target contributes nothing, as in Liger)."""
        half = _input.shape[0] // 2
        if nll_target is None:
            total, count = pol.response[:half].sum(), pol.n_response[:half].sum()
        else:
            if not isinstance(nll_target, torch.Tensor) or nll_target.shape != target.shape:
                raise ValueError(f"{type(self).__name__}: `nll_target` must be a tensor shaped like `target` "
                                 f"{tuple(target.shape)}")
            rows = _input[:half].reshape(1, -1, _input.shape[-1])
            nll = sequence_logprobs(rows, weight, nll_target[:half].reshape(1, -1), bias=bias,
                                    ignore_index=self.ignore_index, backend=self.backend, totals_dtype=torch.float64)
            total, count = nll.response.sum(), nll.n_response.sum()
        return -total / count


def _real(owner: str, name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: `{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{owner}: `{name}` must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{owner}: `{name}` must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{owner}: `{name}` must be >= 0, got {value}")
    return value


def _bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: `{name}` must be a bool, got {type(value).__name__}")
    return value


def logits_sum(_input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum`` of ``_input[rows] @ weight.T + bias`` over the selected rows, every position and the whole vocabulary
    (float64, returned as float32), without logits (:func:`fastpref._logit_totals.logits_total`)."""
    h = _input if rows is None else _input[rows]
    return logits_total(h, weight, bias).float()


def _logits_means(_input, weight, bias):
    """Liger's ``chosen_logits_mean`` / ``rejected_logits_mean``: each half's logits summed over every position and
    the vocabulary, divided by ``B/2 * T * V``."""
    half = _input.shape[0] // 2
    count = half * _input.shape[1] * weight.shape[0]
    return (logits_sum(_input[:half], weight, bias) / count, logits_sum(_input[half:], weight, bias) / count)


class LigerFusedLinearDPOLoss(_LigerLoss):
    """Liger's ``LigerFusedLinearDPOLoss``: DPO and its variants (:func:`fastpref.losses.functional.dpo_loss`; TRL's
    formulas, which Liger's match) from the last hidden states and the head.

    Constructor: Liger's (``ignore_index=-100, beta=0.1, alpha=1.0, compute_nll_loss=False, compiled=True,
    use_ref_model=True, average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0,
    discopop_tau=0.05``) plus ``backend``. ``loss_type``: Liger's ten, and ``"ipo"`` (TRL's, on summed log-probs:
    fastpref has the lengths Liger lacks).

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)`` returns
    ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards))``; ``loss = alpha * nll_loss + mean DPO loss``, ``*_rewards = beta * (logps - ref_logps)``
    per pair. Without a reference model (``use_ref_model=False``) the reference log-probs are 0, as in Liger.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05, *, backend: str = "auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         backend=backend)
        name = type(self).__name__
        self.alpha = _real(name, "alpha", alpha)
        self.compute_nll_loss = _bool(name, "compute_nll_loss", compute_nll_loss)
        self.use_ref_model = _bool(name, "use_ref_model", use_ref_model)
        self.average_log_prob = _bool(name, "average_log_prob", average_log_prob)
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: {set(DPO_LOSS_TYPES)}")
        if loss_type == "ipo" and average_log_prob:
            raise ValueError(f"{name}: loss_type='ipo' divides the summed log-ratios by the lengths itself; "
                             "use average_log_prob=False")
        self.loss_type, self.label_smoothing, self.discopop_tau = loss_type, label_smoothing, discopop_tau
        one = torch.tensor([-3.0], dtype=torch.float64)
        try:
            dpo_loss(one, one - 1, one, one, beta=self.beta, loss_type=loss_type, label_smoothing=label_smoothing,
                     discopop_tau=discopop_tau, chosen_lengths=one.abs(), rejected_lengths=one.abs(), backend="torch")
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        self._check_batch(_input, lin_weight, target, paired=True)
        pol = self._logps(_input, lin_weight, target, bias)
        half = _input.shape[0] // 2
        n = pol.n_response
        logps = pol.response / n if self.average_log_prob else pol.response
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError(f"{type(self).__name__}: use_ref_model=True needs `ref_input` and `ref_weight`")
            if not isinstance(ref_input, torch.Tensor) or ref_input.shape != _input.shape:
                raise ValueError(f"{type(self).__name__}: `ref_input` must be shaped like `_input` "
                                 f"{tuple(_input.shape)}")
            ref = self._logps(ref_input, ref_weight, target, ref_bias, reference=True)
            ref_logps = ref.response / ref.n_response if self.average_log_prob else ref.response
        else:
            ref_logps = torch.zeros_like(logps.detach())
        cw, cl, rw, rl = logps[:half], logps[half:], ref_logps[:half], ref_logps[half:]
        loss, _ = dpo_loss(cw, cl, rw, rl, beta=self.beta, loss_type=self.loss_type,
                           label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
                           chosen_lengths=n[:half], rejected_lengths=n[half:], backend=self.backend)
        nll = self._chosen_nll(_input, lin_weight, target, bias, pol=pol) if self.compute_nll_loss else None
        if nll is not None:
            loss = loss + self.alpha * nll
        chosen_mean, rejected_mean = _logits_means(_input, lin_weight, bias)
        metrics = (cw, cl, chosen_mean, rejected_mean, _zero_or(nll, loss), self.beta * (cw - rw),
                   self.beta * (cl - rl))
        return _liger_dtypes(loss, metrics)


def _zero_or(nll: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device) if nll is None else nll.detach()


def _liger_dtypes(loss: torch.Tensor, metrics: tuple) -> tuple:
    """Liger's dtypes: a float32 loss (computed here in float64 from float64 totals) and detached float32 metrics."""
    return loss.float(), tuple(m.detach().float() for m in metrics)


class LigerFusedLinearCPOLoss(_LigerLoss):
    """Liger's ``LigerFusedLinearCPOLoss``: CPO (:func:`fastpref.losses.functional.cpo_loss`, ``sigmoid``).

    Constructor: Liger's (``ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
    compiled=True, average_log_prob=False, chunk_size=1``) plus ``backend``.
    ``forward(lin_weight, _input, target, bias=None)`` returns ``(loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``;
    ``loss = alpha * nll_loss + mean(-(1-ls) log sigma(beta (logp_w - logp_l)) - ls log sigma(-beta (...)))``,
    ``*_rewards = beta * logps``.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, *, backend: str = "auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         backend=backend)
        name = type(self).__name__
        self.alpha = _real(name, "alpha", alpha)
        self.label_smoothing = _real(name, "label_smoothing", label_smoothing, nonnegative=True)
        self.compute_nll_loss = _bool(name, "compute_nll_loss", compute_nll_loss)
        self.average_log_prob = _bool(name, "average_log_prob", average_log_prob)

    def forward(self, lin_weight, _input, target, bias=None):
        self._check_batch(_input, lin_weight, target, paired=True)
        pol = self._logps(_input, lin_weight, target, bias)
        half = _input.shape[0] // 2
        logps = pol.response / pol.n_response if self.average_log_prob else pol.response
        cw, cl = logps[:half], logps[half:]
        ones = torch.ones_like(cw.detach())
        # loss_type "sigmoid" scores the log-probs it is given (summed or averaged here), never the lengths
        loss, _ = cpo_loss(cw, cl, ones, ones, beta=self.beta, loss_type="sigmoid",
                           label_smoothing=self.label_smoothing, cpo_alpha=0.0, backend=self.backend)
        nll = self._chosen_nll(_input, lin_weight, target, bias, pol=pol) if self.compute_nll_loss else None
        if nll is not None:
            loss = loss + self.alpha * nll
        chosen_mean, rejected_mean = _logits_means(_input, lin_weight, bias)
        metrics = (cw, cl, chosen_mean, rejected_mean, _zero_or(nll, loss), self.beta * cw, self.beta * cl)
        return _liger_dtypes(loss, metrics)


class LigerFusedLinearSimPOLoss(_LigerLoss):
    """Liger's ``LigerFusedLinearSimPOLoss``: SimPO (:func:`fastpref.losses.functional.simpo_loss`), on
    length-averaged log-probs (Liger always averages for SimPO).

    Constructor: Liger's (``ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
    compiled=True, gamma=0.5, chunk_size=1``) plus ``backend``. ``forward(lin_weight, _input, target, bias=None)``
    returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards))``; ``loss = alpha * nll_loss + mean(-(1-ls) log sigma(beta (a_w - a_l) -
    gamma) - ls log sigma(-(...)))`` with ``a`` the averaged log-probs, ``*_rewards = beta * a``. ``gamma >= 0``.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1, *,
                 backend: str = "auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         backend=backend)
        name = type(self).__name__
        self.alpha = _real(name, "alpha", alpha)
        self.label_smoothing = _real(name, "label_smoothing", label_smoothing, nonnegative=True)
        self.compute_nll_loss = _bool(name, "compute_nll_loss", compute_nll_loss)
        self.gamma = _real(name, "gamma", gamma, nonnegative=True)

    def forward(self, lin_weight, _input, target, bias=None):
        self._check_batch(_input, lin_weight, target, paired=True)
        pol = self._logps(_input, lin_weight, target, bias)
        half = _input.shape[0] // 2
        s, n = pol.response, pol.n_response
        loss, _ = simpo_loss(s[:half], s[half:], n[:half], n[half:], beta=self.beta, gamma=self.gamma,
                             label_smoothing=self.label_smoothing, backend=self.backend)
        nll = self._chosen_nll(_input, lin_weight, target, bias, pol=pol) if self.compute_nll_loss else None
        if nll is not None:
            loss = loss + self.alpha * nll
        avg = (s / n).detach()
        chosen_mean, rejected_mean = _logits_means(_input, lin_weight, bias)
        metrics = (avg[:half], avg[half:], chosen_mean, rejected_mean, _zero_or(nll, loss),
                   self.beta * avg[:half], self.beta * avg[half:])
        return _liger_dtypes(loss, metrics)


class LigerFusedLinearORPOLoss(_LigerLoss):
    """Liger's ``LigerFusedLinearORPOLoss``: ORPO (:func:`fastpref.losses.functional.orpo_loss`), on
    length-averaged log-probs.

    Constructor: Liger's (``ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, chunk_size=1``) plus
    ``backend``. ``forward(lin_weight, _input, target, bias=None, nll_target=None)`` returns ``(loss, (chosen_logps,
    rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards,
    log_odds_ratio, log_odds_chosen))``; ``loss = nll_loss - beta * mean log sigma(log_odds)``. ``nll_target``
    (shaped like ``target``): the chosen rows' NLL is scored against it instead of ``target`` (one more fused pass
    over the chosen rows).
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1, *, backend: str = "auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         backend=backend)
        self.compute_nll_loss = _bool(type(self).__name__, "compute_nll_loss", compute_nll_loss)

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        self._check_batch(_input, lin_weight, target, paired=True)
        pol = self._logps(_input, lin_weight, target, bias)
        half = _input.shape[0] // 2
        s, n = pol.response, pol.n_response
        loss, m = orpo_loss(s[:half], s[half:], n[:half], n[half:], beta=self.beta, nll_weight=0.0)
        nll = (self._chosen_nll(_input, lin_weight, target, bias, nll_target, pol=pol)
               if self.compute_nll_loss else None)
        if nll is not None:
            loss = loss + nll
        avg = (s / n).detach()
        chosen_mean, rejected_mean = _logits_means(_input, lin_weight, bias)
        metrics = (avg[:half], avg[half:], chosen_mean, rejected_mean, _zero_or(nll, loss),
                   self.beta * avg[:half], self.beta * avg[half:], m["log_odds_ratio"], m["log_odds_chosen"])
        return _liger_dtypes(loss, metrics)


class LigerFusedLinearKTOLoss(_LigerLoss):
    """Liger's ``LigerFusedLinearKTOLoss``: KTO with Liger's semantics (Ethayarajh et al., 2024)::

        z      = logp - ref_logp          (logp alone without a reference model)
        loss   = sum_i (1 - sigma(beta (z_i - kl) m_i)) / B,   m_i = +1 desirable, -1 undesirable

    ``kl`` (a tensor broadcast over the rows, or None for none) is used as given: Liger neither detaches its
    gradient's path (it has none: detached here) nor clamps it at 0 as TRL's ``KTOTrainer`` does
    (:func:`fastpref.losses.functional.kto_loss` is TRL's). No desirable/undesirable weights (Liger has none).

    Constructor: Liger's (``ignore_index=-100, beta=0.1, compiled=True, use_ref_model=False,
    average_log_prob=False, chunk_size=1``) plus ``backend``. ``forward(_input, lin_weight, target, bias=None,
    preference_labels=None, ref_input=None, ref_weight=None, ref_bias=None, kl=None)`` (``_input`` first, as
    Liger's KTO) returns ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
    chosen_rewards_sum, rejected_rewards_sum))``: sums over the desirable / undesirable rows.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
                 use_ref_model: bool = False, average_log_prob: bool = False, chunk_size: int = 1, *,
                 backend: str = "auto"):
        super().__init__(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                         backend=backend)
        name = type(self).__name__
        self.use_ref_model = _bool(name, "use_ref_model", use_ref_model)
        self.average_log_prob = _bool(name, "average_log_prob", average_log_prob)

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
                ref_bias=None, kl=None):
        name = type(self).__name__
        self._check_batch(_input, lin_weight, target, paired=False)
        B = _input.shape[0]
        if preference_labels is None:
            raise ValueError(f"{name}: `preference_labels` (bool [B], True = desirable) is required")
        if not isinstance(preference_labels, torch.Tensor) or preference_labels.shape != (B,):
            raise ValueError(f"{name}: `preference_labels` must be a tensor of shape ({B},)")
        if preference_labels.dtype != torch.bool:
            binary = (preference_labels == 0) | (preference_labels == 1)
            if preference_labels.is_floating_point() or not bool(binary.all()):
                raise ValueError(f"{name}: `preference_labels` must be bool (or 0/1 integers)")
            preference_labels = preference_labels.bool()
        labels = preference_labels.to(_input.device)
        pol = self._logps(_input, lin_weight, target, bias)
        logps = pol.response / pol.n_response if self.average_log_prob else pol.response
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError(f"{name}: use_ref_model=True needs `ref_input` and `ref_weight`")
            if not isinstance(ref_input, torch.Tensor) or ref_input.shape != _input.shape:
                raise ValueError(f"{name}: `ref_input` must be shaped like `_input` {tuple(_input.shape)}")
            ref = self._logps(ref_input, ref_weight, target, ref_bias, reference=True)
            logratios = logps - (ref.response / ref.n_response if self.average_log_prob else ref.response)
        else:
            logratios = logps
        sign = torch.where(labels, 1.0, -1.0).to(logratios.dtype)
        if kl is not None:
            if not isinstance(kl, torch.Tensor) or not kl.is_floating_point():
                raise TypeError(f"{name}: `kl` must be a floating tensor (or None)")
            if not bool(torch.isfinite(kl).all()):
                raise ValueError(f"{name}: `kl` holds non-finite values")
            logratios_kl = logratios - kl.detach().to(device=logratios.device, dtype=logratios.dtype)
        else:
            logratios_kl = logratios
        loss = (1 - torch.sigmoid(self.beta * logratios_kl * sign)).sum() / B
        with torch.no_grad():
            rewards = self.beta * logratios
            lp = logps.detach()
            metrics = ((lp * labels).sum(), (lp * ~labels).sum(),
                       logits_sum(_input, lin_weight, bias, labels), logits_sum(_input, lin_weight, bias, ~labels),
                       (rewards * labels).sum(), (rewards * ~labels).sum())
        return _liger_dtypes(loss, metrics)
