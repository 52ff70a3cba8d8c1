"""CPO (Xu et al., 2024, "Contrastive Preference Optimization"), reference-free, with TRL's variants: SimPO's margin
(``loss_type="simpo"``, CPO-SimPO), hinge and IPO, and AlphaPO's reward shape (Gupta et al., 2025, ``alpha``).

Source: TRL's ``CPOTrainer.cpo_loss`` and ``get_batch_loss_metrics`` (``trl/experimental/cpo``, TRL 1.16), transcribed
term for term and tested against TRL's own code in ``tests/test_losses_orpo_cpo.py``. TRL's ``loss_type="alphapo"``
is configuration sugar for ``loss_type="simpo", cpo_alpha=0`` with ``alpha != 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused
from ._checks import Checker
from ._ops import pair_metrics
from .nll import nll_loss

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
_AVERAGED = ("ipo", "simpo")  # TRL: average_log_prob=self.loss_type in ["ipo", "simpo"]


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
    nll_logps: torch.Tensor | None = None,
    nll_lengths: torch.Tensor | None = None,
    backend: str = "auto",
):
    r"""CPO loss over summed response log-probs and lengths (TRL ``CPOTrainer``, TRL 1.16)::

        s_w, s_l = logp_w, logp_l            (sigmoid, hinge)      or  logp / n  (ipo, simpo: length-averaged)
        r        = s                         (alpha = 0)           or  (1 - e^{-alpha s}) / alpha  (AlphaPO; TRL's
                                                                       (1 - p^{-alpha}) / alpha with p = e^s)
        x        = r_w - r_l   (simpo: minus simpo_gamma / beta)
        sigmoid, simpo:  -(1 - ls) log sigma(beta x) - ls log sigma(-beta x)
        hinge:           relu(1 - beta x)                         (label_smoothing ignored, as TRL)
        ipo:             (x - 1 / (2 beta))^2
        loss = mean(...) + cpo_alpha * NLL,  NLL = -sum_i nll_logps_i / sum_i nll_lengths_i  (:func:`nll_loss`)

    ``(1 - e^{-alpha s}) / alpha`` is computed as ``-expm1(-alpha s) / alpha``: finite wherever the reward is
    representable (TRL's ``exp(s) ** -alpha`` is ``inf`` once ``e^s`` underflows, from ``s < -103``); a reward beyond
    float range raises ``ValueError``.

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed response log-probs (differentiable).
        chosen_lengths, rejected_lengths: ``[B]`` response token counts.
        beta: temperature (TRL's ``CPOConfig.beta`` default 0.1; for ``ipo`` it is tau).
        loss_type: one of ``CPO_LOSS_TYPES``.
        label_smoothing: conservative-loss smoothing for ``sigmoid`` / ``simpo`` (in [0, 1]).
        simpo_gamma: SimPO's absolute target margin (TRL's default 0.5), ``loss_type="simpo"`` only; >= 0.
        alpha: AlphaPO's reward-shape parameter (0: log-prob rewards, TRL's default).
        cpo_alpha: weight of the NLL term (TRL's default 1.0; 0 drops it, as AlphaPO does).
        nll_logps, nll_lengths: the NLL's per-sequence token sums and counts; default the chosen responses (TRL's
            CPO: cross-entropy over the chosen completion tokens).
        backend: ``'auto' | 'triton' | 'torch'``. With ``alpha = 0`` the preference term runs in the fused loss-head
            kernels (``sigmoid``/``simpo``: SimPO's kernel; ``hinge``/``ipo``: DPO's with a zero reference); the NLL
            term (constant gradient) and AlphaPO stay in PyTorch.

    Returns:
        ``(loss, metrics)``: TRL's names: ``rewards/chosen`` (``beta * r_w``), ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen`` (``s_w``), ``logps/rejected``, ``nll_loss``
        (0 when ``cpo_alpha = 0``, as TRL logs it).
    """
    ck = Checker("cpo_loss")
    cw, cl, n_w, n_l = ck.pairs_with_lengths(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
    beta = ck.number("beta", beta, gt=0.0)
    ck.choice("loss_type", loss_type, CPO_LOSS_TYPES)
    ls = ck.number("label_smoothing", label_smoothing, ge=0.0, le=1.0)
    gamma = ck.number("simpo_gamma", simpo_gamma, ge=0.0)
    alpha = ck.number("alpha", alpha)
    cpo_alpha = ck.number("cpo_alpha", cpo_alpha, ge=0.0)
    if (nll_logps is None) != (nll_lengths is None):
        raise ck.value_error("`nll_logps` and `nll_lengths` must be given together")
    if nll_logps is not None:
        nll_logps = ck.floats("nll_logps", nll_logps, cw.numel())
        nll_lengths = ck.lengths("nll_lengths", nll_lengths, cw.numel())
    cw, cl = ck.cast(cw), ck.cast(cl)
    fw, fl = n_w.to(ck.dtype), n_l.to(ck.dtype)
    averaged = loss_type in _AVERAGED
    s_w, s_l = (cw / fw, cl / fl) if averaged else (cw, cl)
    if alpha != 0.0:
        r_w, r_l = -torch.expm1(-alpha * s_w) / alpha, -torch.expm1(-alpha * s_l) / alpha
        r_w = ck.fail_if(r_w, ~(torch.isfinite(r_w).all() & torch.isfinite(r_l).all()),
                         f"the AlphaPO reward (1 - p^-alpha) / alpha with alpha={alpha} exceeds the float range for "
                         "these log-probs (the true loss is not representable); use a smaller |alpha|")
    else:
        r_w, r_l = s_w, s_l

    pref = None
    if alpha == 0.0 and fused.use_fused(backend, cw, cl, fn="cpo_loss"):
        pref = _fused_preference(loss_type, cw, cl, fw, fl, beta=beta, gamma=gamma, ls=ls)
    if pref is None:
        x = r_w - r_l
        if loss_type == "simpo":
            x = x - gamma / beta
        if loss_type in ("sigmoid", "simpo"):
            losses = -F.logsigmoid(beta * x) * (1 - ls) - F.logsigmoid(-beta * x) * ls
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * x)
        else:  # ipo
            losses = (x - 1 / (2 * beta)) ** 2
        pref = losses.mean()

    if cpo_alpha == 0.0:
        nll = torch.zeros((), dtype=ck.dtype, device=cw.device)
        loss = pref
    else:
        nll, _ = nll_loss(cw, n_w) if nll_logps is None else nll_loss(nll_logps, nll_lengths)
        nll = nll.to(ck.dtype)
        loss = pref + cpo_alpha * nll
    metrics = pair_metrics(beta * r_w, beta * r_l, s_w, s_l)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _fused_preference(loss_type, cw, cl, fw, fl, *, beta, gamma, ls):
    """The preference term in the fused kernels (None: fall back), from the summed log-probs ``cw``, ``cl``."""
    if loss_type in ("sigmoid", "simpo"):
        ones = torch.ones_like(fw)
        w, l = (fw, fl) if loss_type == "simpo" else (ones, ones)
        return fused.simpo(cw, cl, w, l, beta=beta, gamma=gamma if loss_type == "simpo" else 0.0, label_smoothing=ls)
    zero = torch.zeros_like(cw)
    return fused.dpo([loss_type], [1.0], cw, cl, zero, zero, beta=beta, label_smoothing=0.0, discopop_tau=0.05,
                     f_divergence_type="reverse_kl", n_w=fw, n_l=fl, wpo=None)
