"""DPO family over per-sequence log-probs: every TRL ``DPOTrainer`` loss type, SimPO, e-DPO (reward distillation).

Source of the DPO formulas: TRL's ``DPOTrainer._compute_loss`` (``trl/trainer/dpo_trainer.py``, TRL 1.16), transcribed
term for term so that the same inputs give the same loss to fp32 rounding (tested against TRL's own code in
``tests/test_losses_trl_parity.py``).  SimPO follows TRL's ``CPOTrainer.cpo_loss`` (``loss_type="simpo"``); e-DPO is
Fisch et al., "Robust Preference Optimization through Reward Model Distillation" (docs/methods.md section 1).

Notation (docs/methods.md section 0): ``rho = logp - ref_logp`` per sequence, ``Delta = rho_w - rho_l``,
``r = beta * rho`` (implicit reward).  Rows are pairs: ``chosen_*[i]`` and ``rejected_*[i]`` belong to pair ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import fused
from ._checks import Checker
from ._ops import pair_metrics

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterization only cancels log Z(x) in the chosen-rejected difference.
_F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
_NEEDS_BOTH_LENGTHS = {"ipo", "sigmoid_norm"}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    loss_weights: Sequence[float] | None = None,
    wpo_weights: torch.Tensor | None = None,
    backend: str = "auto",
):
    r"""DPO loss of every ``loss_type`` TRL's ``DPOTrainer`` ships (TRL 1.16, ``trl/trainer/dpo_trainer.py``).

    With ``s_w, s_l`` the f-divergence scores (``s = rho`` for the default ``reverse_kl``), ``d = s_w - s_l``,
    ``r_w = beta * rho_w``, ``r_l = beta * rho_l``, ``ls = label_smoothing``, ``n`` the response lengths, per pair:

    ==================  ==========================================================================================
    ``sigmoid``         ``-log sigma(beta d)``  (DPO, Rafailov et al.; ``label_smoothing`` is ignored, as in TRL)
    ``hinge``           ``relu(1 - beta d)``  (SLiC)
    ``ipo``             ``(s_w / n_w - s_l / n_l - 1 / (2 beta))^2``  (IPO; TRL divides by the lengths)
    ``exo_pair``        ``q_w (log q_w - log(1-ls)) + q_l (log q_l - log ls)``, ``q_w = sigma(beta d)`` (EXO; ls > 0)
    ``nca_pair``        ``-log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)``  (NCA)
    ``robust``          ``(-(1-ls) log sigma(beta d) + ls log sigma(-beta d)) / (1 - 2 ls)``  (rDPO; ls < 1/2)
    ``bco_pair``        ``-log sigma(r_w) - log sigma(-r_l)``  (TRL's pairwise BCO has no running-mean state)
    ``sppo_hard``       ``(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2``
    ``aot``             ``-(1-ls) log sigma(beta x) - ls log sigma(-beta x)``,
                        ``x = sort(logp_w - logp_l) - sort(ref_logp_w - ref_logp_l)`` (sorted over the batch)
    ``aot_unpaired``    same with ``x = sort(rho_w) - sort(rho_l)``
    ``apo_zero``        ``1 - sigma(r_w) + sigma(r_l)``
    ``apo_down``        ``sigma(r_w) + 1 - sigma(r_w - r_l)``
    ``discopop``        ``(1 - m) (-log sigma(z)) + m exp(-z)``, ``z = beta d``, ``m = sigma(z / discopop_tau)``;
                        ``m exp(-z)`` is computed as ``exp(log sigma(z / tau) - z)``: finite where TRL's ``inf * 0``
                        is NaN (``z = -90``: the loss is ``softplus(90) = 90``)
    ``sft``             ``-sum_i logp_w,i / sum_i n_w,i``: the token-mean NLL of the chosen responses over the
                        whole batch (TRL averages the chosen tokens' log-probs), so it needs ``chosen_lengths``
    ``sigmoid_norm``    ``-log sigma(beta (s_w / n_w - s_l / n_l))``
    ==================  ==========================================================================================

    The loss is ``sum_t loss_weights[t] * mean_i(w_i * loss_t,i)`` over the listed types (``loss_type`` may be a
    list, TRL's multi-loss/MPO form), with ``w_i = wpo_weights[i]`` (default 1).  TRL clamps lengths to >= 1.

    Args:
        chosen_logps, rejected_logps: policy sequence log-probs ``[B]`` (summed over the response tokens; TRL's
            ``ld_alpha`` (LD-DPO) weighting, when wanted, is applied by whoever sums the tokens).
        ref_chosen_logps, ref_rejected_logps: reference sequence log-probs ``[B]`` (constants; no grad expected).
        beta: temperature (TRL default 0.1); for ``ipo`` it is IPO's tau.
        loss_type: one of ``DPO_LOSS_TYPES`` or a list of them.
        label_smoothing: used by ``exo_pair`` (needs > 0; EXO recommends 1e-3), ``robust`` (needs < 0.5), ``aot``,
            ``aot_unpaired``; ignored by the other types, like TRL.
        chosen_lengths, rejected_lengths: response token counts ``[B]``; ``ipo`` and ``sigmoid_norm`` need both,
            ``sft`` needs ``chosen_lengths``.
        discopop_tau: DiscoPOP's mixing temperature (TRL default 0.05).
        f_divergence_type, f_alpha_divergence_coef: TRL's f-DPO scores (defaults ``reverse_kl``, 0.5):
            ``forward_kl`` ``s = 1 - e^{-rho}``; ``js_divergence`` ``s = log 2 + log sigma(rho)``;
            ``alpha_divergence`` ``s = (e^{(a-1) rho} - 1) / (a - 1)`` (exponent clamped at 80 as TRL does, so the
            score is TRL's, not the true f-divergence's, beyond ``(a-1) rho = 80``).
            Only for the types TRL allows (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft).
            **Range**: these scores grow like ``e^{|rho|}``; computed in the inputs' precision (fp32 for fp32,
            bf16 and fp16 inputs) ``forward_kl``'s ``e^{-rho}`` exceeds fp32 for log-ratios ``rho < -88.7`` (float64:
            ``rho < -709.8``), where the true score and loss are not representable.  There, instead of returning
            inf or NaN (TRL does), ``dpo_loss`` raises ``ValueError`` naming the divergence and the log-ratio: pass
            float64 log-probs, or use ``reverse_kl`` / ``js_divergence``, which are finite for every log-ratio.
        loss_weights: one weight per entry of ``loss_type`` (default all 1).
        wpo_weights: per-pair weights ``[B]`` multiplying every per-pair loss: TRL's ``use_weighting=True`` (WPO)
            computes them, under ``no_grad``, as the product of the chosen and rejected sequences'
            ``exp(mean_t (logp_t - log sum_v p_tv^2))``; pass them detached.  Must be >= 0 (weights of a mean).
            Not allowed with ``aot*`` (TRL).
        backend: ``'auto'`` (fused loss-head kernel for CUDA inputs), ``'triton'`` or ``'torch'`` (this expression);
            see ``fastpref.losses.fused`` for what is fused (a single loss type other than ``aot*``/``sft``, reverse
            KL) and what falls back.

    Returns:
        ``(loss, metrics)``: scalar loss; detached batch means ``rewards/chosen`` (``beta * rho_w``),
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    ck = Checker("dpo_loss")
    cw = ck.floats("chosen_logps", chosen_logps)
    n = cw.numel()
    cl = ck.floats("rejected_logps", rejected_logps, n)
    rw = ck.floats("ref_chosen_logps", ref_chosen_logps, n)
    rl = ck.floats("ref_rejected_logps", ref_rejected_logps, n)
    beta = ck.number("beta", beta, gt=0.0)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type) if loss_type is not None else []
    if not types:
        raise ck.value_error("`loss_type` must name at least one loss type")
    for t in types:
        ck.choice("loss_type", t, DPO_LOSS_TYPES)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [ck.number("loss_weights", w) for w in loss_weights]
        if len(weights) != len(types):
            raise ck.value_error(
                f"`loss_weights` has {len(weights)} entries for {len(types)} loss types; they must match"
            )
    ls = ck.number("label_smoothing", label_smoothing, ge=0.0, le=1.0)
    if "exo_pair" in types and not 0.0 < ls < 1.0:
        raise ck.value_error("`label_smoothing` must be in (0, 1) for 'exo_pair' (the EXO paper recommends 1e-3)")
    if "robust" in types and not ls < 0.5:
        raise ck.value_error(f"`label_smoothing` must be in [0, 0.5) for 'robust', got {ls}")
    tau = ck.number("discopop_tau", discopop_tau, gt=0.0)
    fdiv = ck.choice("f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
    fcoef = ck.number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if fdiv != "reverse_kl" and not set(types) <= _F_DIVERGENCE_LOSS_TYPES:
        raise ck.value_error(
            f"`f_divergence_type={fdiv!r}` is only supported for loss types {sorted(_F_DIVERGENCE_LOSS_TYPES)}"
        )
    need_lengths = set(types) & _NEEDS_BOTH_LENGTHS
    if need_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ck.value_error(f"loss type(s) {sorted(need_lengths)} need `chosen_lengths` and `rejected_lengths`")
    if "sft" in types and chosen_lengths is None:
        raise ck.value_error("loss type 'sft' needs `chosen_lengths` (its NLL is a mean over the chosen tokens)")
    n_w = ck.lengths("chosen_lengths", chosen_lengths, n) if chosen_lengths is not None else None
    n_l = ck.lengths("rejected_lengths", rejected_lengths, n) if rejected_lengths is not None else None
    wpo = None
    if wpo_weights is not None:
        if {"aot", "aot_unpaired"} & set(types):
            raise ck.value_error("`wpo_weights` cannot be used with 'aot'/'aot_unpaired' (they sort the pairs)")
        wpo = ck.floats("wpo_weights", wpo_weights, n)
        wpo = ck.fail_if(wpo, ~(wpo >= 0).all(), lambda: f"`wpo_weights` must be >= 0 (per-pair weights), got min "
                         f"{float(wpo.min())}", "`wpo_weights` must be >= 0 (per-pair weights)")

    cw, cl, rw, rl = (ck.cast(x) for x in (cw, cl, rw, rl))
    dtype = ck.dtype
    if n_w is not None:
        n_w = n_w.to(dtype).clamp(min=1.0)
    if n_l is not None:
        n_l = n_l.to(dtype).clamp(min=1.0)
    if wpo is not None:
        wpo = ck.cast(wpo)

    chosen_logratios = cw - rw
    rejected_logratios = cl - rl
    chosen_scores, rejected_scores = _f_divergence_scores(chosen_logratios, rejected_logratios, fdiv, fcoef)
    if fdiv in ("forward_kl", "alpha_divergence"):
        _check_scores_finite(ck, fdiv, chosen_logratios, rejected_logratios, chosen_scores, rejected_scores)
    delta_score = chosen_scores - rejected_scores

    loss = None
    if fused.use_fused(backend, cw, cl, rw, rl, fn="dpo_loss"):
        loss = fused.dpo(types, weights, cw, cl, rw, rl, beta=beta, label_smoothing=ls, discopop_tau=tau,
                         f_divergence_type=fdiv, n_w=n_w, n_l=n_l, wpo=wpo)
    if loss is None:
        for t, w in zip(types, weights):
            per_pair = _per_pair_loss(
                t, beta, ls, tau, cw, cl, rw, rl, chosen_logratios, rejected_logratios,
                chosen_scores, rejected_scores, delta_score, n_w, n_l,
            )
            if wpo is not None:
                per_pair = per_pair * wpo
            term = per_pair.mean() * w
            loss = term if loss is None else loss + term
    if fdiv in ("forward_kl", "alpha_divergence") and not bool(torch.isfinite(loss)):
        worst = float(torch.cat([chosen_logratios, rejected_logratios]).detach().abs().max())
        raise ck.value_error(
            f"f_divergence_type={fdiv!r}: the loss overflows {loss.dtype} (largest |log-ratio| {worst:.4g}; the score "
            "grows like e^|rho|); pass float64 log-probs or use 'reverse_kl' / 'js_divergence'"
        )

    metrics = pair_metrics(beta * chosen_logratios, beta * rejected_logratios, cw, cl)
    return loss, metrics


def _f_divergence_scores(chosen_logratios, rejected_logratios, fdiv, coef):
    if fdiv == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if fdiv == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    if fdiv == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(chosen_logratios), math.log(2) + F.logsigmoid(rejected_logratios)
    # alpha_divergence: f'(t) = (t^(a-1) - 1) / (a - 1); a -> 1 falls back to reverse KL (TRL)
    if abs(coef - 1.0) < 1e-6:
        return chosen_logratios, rejected_logratios
    inv = 1.0 / (coef - 1.0)
    t_w = torch.clamp((coef - 1.0) * chosen_logratios, max=80.0)
    t_l = torch.clamp((coef - 1.0) * rejected_logratios, max=80.0)
    return (torch.exp(t_w) - 1.0) * inv, (torch.exp(t_l) - 1.0) * inv


def _check_scores_finite(ck, fdiv, clr, rlr, cs, rs) -> None:
    bad = ~(torch.isfinite(cs) & torch.isfinite(rs) & torch.isfinite(cs - rs))
    if bool(bad.any()):
        worst = float(torch.cat([clr[bad], rlr[bad]]).detach().abs().max())
        raise ck.value_error(
            f"f_divergence_type={fdiv!r}: the score of a log-ratio of magnitude {worst:.4g} exceeds {cs.dtype}'s "
            "range (the score grows like e^|rho|), so the loss is not representable; pass float64 log-probs "
            "(forward_kl is finite for rho > -709.8) or use 'reverse_kl' / 'js_divergence'"
        )


def _per_pair_loss(t, beta, ls, tau, cw, cl, rw, rl, clr, rlr, cs, rs, d, n_w, n_l):
    if t == "sigmoid":
        return -F.logsigmoid(beta * d)
    if t == "hinge":
        return torch.relu(1 - beta * d)
    if t == "ipo":
        return (cs / n_w - rs / n_l - 1 / (2 * beta)) ** 2
    if t == "exo_pair":
        z = beta * d
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    if t == "nca_pair":
        r_w, r_l = beta * clr, beta * rlr
        return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    if t == "robust":
        z = beta * d
        return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    if t == "bco_pair":
        return -F.logsigmoid(beta * clr) - F.logsigmoid(-beta * rlr)
    if t == "sppo_hard":
        return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
    if t in ("aot", "aot_unpaired"):
        if t == "aot":
            x = torch.sort(cw - cl, dim=0)[0] - torch.sort(rw - rl, dim=0)[0]
        else:
            x = torch.sort(clr, dim=0)[0] - torch.sort(rlr, dim=0)[0]
        return -F.logsigmoid(beta * x) * (1 - ls) - F.logsigmoid(-beta * x) * ls
    if t == "apo_zero":
        return 1 - torch.sigmoid(beta * clr) + torch.sigmoid(beta * rlr)
    if t == "apo_down":
        return torch.sigmoid(beta * clr) + 1 - torch.sigmoid(beta * (clr - rlr))
    if t == "discopop":
        z = beta * d
        # (1 - m) softplus(-z) + m e^-z with m = sigma(z / tau); m e^-z = exp(log sigma(z / tau) - z) never overflows
        # where the true value is finite (TRL's e^-z * m is inf * 0 = NaN at z = -90).
        return -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z)
    if t == "sft":
        return (-cw.sum() / n_w.sum()).expand(cw.shape[0])
    if t == "sigmoid_norm":
        return -F.logsigmoid(beta * (cs / n_w - rs / n_l))
    raise AssertionError(t)  # unreachable: validated


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    backend: str = "auto",
):
    r"""SimPO (Meng et al., 2024), reference-free (docs/methods.md section 1)::

        z    = beta * (logp_w / n_w - logp_l / n_l) - gamma
        loss = mean( -(1 - ls) log sigma(z) - ls log sigma(-z) )

    ``gamma`` is the **absolute** target margin, as TRL's ``CPOConfig.simpo_gamma`` (TRL computes
    ``beta * (avg_w - avg_l - simpo_gamma / beta)``); the SimPO repository's ``gamma_beta_ratio`` equals
    ``gamma / beta``.  Defaults ``beta = 2.0``, ``gamma = 0.5`` (= TRL's ``simpo_gamma`` default; ratio 0.25).
    ``gamma`` must be >= 0 (a negative target margin rewards mis-ordered pairs).  ``cpo_alpha`` (CPO's NLL term)
    is not part of SimPO; add it outside.  ``backend``: ``'auto' | 'triton' | 'torch'`` (``fastpref.losses.fused``).

    Metrics follow TRL's CPOTrainer for ``loss_type="simpo"``: ``rewards/* = beta * logp / n`` and
    ``logps/*`` are the **length-averaged** log-probs.
    """
    ck = Checker("simpo_loss")
    cw, cl, n_w, n_l = ck.pairs_with_lengths(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
    beta = ck.number("beta", beta, gt=0.0)
    gamma = ck.number("gamma", gamma, ge=0.0)
    ls = ck.number("label_smoothing", label_smoothing, ge=0.0, le=1.0)
    cw, cl = ck.cast(cw), ck.cast(cl)
    avg_w = cw / n_w.to(ck.dtype)
    avg_l = cl / n_l.to(ck.dtype)
    logits = avg_w - avg_l - gamma / beta
    loss = None
    if fused.use_fused(backend, cw, cl, fn="simpo_loss"):
        loss = fused.simpo(cw, cl, n_w, n_l, beta=beta, gamma=gamma, label_smoothing=ls)
    if loss is None:
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        loss = losses.mean()
    metrics = pair_metrics(beta * avg_w, beta * avg_l, avg_w, avg_l)
    return loss, metrics


def distill_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    beta: float = 0.1,
    backend: str = "auto",
):
    r"""e-DPO / reward-model distillation (Fisch et al., 2024; docs/methods.md section 1)::

        loss = mean( (R_w - R_l - beta * (rho_w - rho_l))^2 )

    ``chosen_rewards`` / ``rejected_rewards`` are the explicit rewards ``R`` of a reward model (data, no grad).
    Metrics: the DPO six (implicit rewards ``beta * rho``) plus ``distill/target_margin`` (mean ``R_w - R_l``).
    ``backend``: ``'auto' | 'triton' | 'torch'`` (``fastpref.losses.fused``).
    """
    ck = Checker("distill_loss")
    cw = ck.floats("chosen_logps", chosen_logps)
    n = cw.numel()
    cl = ck.floats("rejected_logps", rejected_logps, n)
    rw = ck.floats("ref_chosen_logps", ref_chosen_logps, n)
    rl = ck.floats("ref_rejected_logps", ref_rejected_logps, n)
    Rw = ck.floats("chosen_rewards", chosen_rewards, n)
    Rl = ck.floats("rejected_rewards", rejected_rewards, n)
    beta = ck.number("beta", beta, gt=0.0)
    cw, cl, rw, rl, Rw, Rl = (ck.cast(x) for x in (cw, cl, rw, rl, Rw, Rl))
    r_w, r_l = beta * (cw - rw), beta * (cl - rl)
    loss = None
    if fused.use_fused(backend, cw, cl, rw, rl, Rw, Rl, fn="distill_loss"):
        loss = fused.distill(cw, cl, rw, rl, Rw, Rl, beta=beta)
    if loss is None:
        loss = ((Rw - Rl) - (r_w - r_l)).pow(2).mean()
    metrics = pair_metrics(r_w, r_l, cw, cl)
    metrics["distill/target_margin"] = (Rw - Rl).detach().mean()
    return loss, metrics
