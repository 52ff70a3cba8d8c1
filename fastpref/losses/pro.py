"""PRO -- Proximalized Preference Optimization (seed ``000``: Guo, Li & Chen, "Proximalized Preference Optimization
for Diverse Feedback Types: A Decomposed Perspective on DPO", NeurIPS 2025).  The formulas are docs/methods.md section 2.

Defaults, where each comes from, and the existence condition it satisfies (an optimum exists = the loss is
bounded below as a labeled response's probability goes to 0):

==================  ============================  ===================================================  ============
setting             default                       source                                               condition
==================  ============================  ===================================================  ============
``beta``            0.1                           TRL's ``DPOConfig.beta`` (ours for PRO)              ``> 0``
``eta`` (PRO-P)     1/3                           the seed, App. D: ``nu`` uniform over                see alpha
                                                  ``{y_w, y_l, h}`` ("all pairs contribute equally")
``alpha`` (PRO-P)   ``1 / (1 - eta)^2`` (= 2.25)  the seed's threshold value; then ``4 PRO-P = DPO +     ``alpha (1 -
                                                  c [f(r_w - r_h) + f(r_l - r_h)]``, ``c = 2 eta / (1 -  eta^2) > 1``
                                                  eta) = 1``                                           (= 2 here)
``eta`` (PRO-S)     ``1 / (K + 1)`` per group     the seed: all pairs of ``{y_1..y_K, h}`` equal       see alpha
``alpha`` (PRO-S)   ``lam / (eta (1 - eta))``     the seed rescales the regularizer to PRO-B's         ``alpha (1-eta)
                                                  ``lam``; reading it as "the labeled-vs-hyper pairs   (K-1+eta) > K-1``
                                                  weigh ``lam`` in total, as in PRO-B" is ours         (``lam > (K-1)
                                                                                                       / K^2``)
``lam`` (PRO-B/S)   2                             ours (the paper fixes only ``lam > 1``): PRO-B's     ``lam > 1``
                                                  stationary point at ``sigma = 3/4`` / ``1/4``         (PRO-B)
``tau`` (PRO-S)     1                             ours (the seed's exact score is lost)                ``> 0``
``hyper_response``  ``'exact'``                   better founded (docs/methods.md); the seed's runs
                                                  all use ``'zero'`` (``r_h = 0``)
==================  ============================  ===================================================  ============

The seed states ``alpha (1 - eta)^2 >= 1`` as its condition; it is sufficient, not necessary.  The exact one for
PRO-P is ``alpha (1 - eta^2) > 1`` (the asymptotic slope of ``4 L`` in ``|r_l|`` is ``(alpha (1 - eta^2) - 1) / 2``),
so ``(eta, alpha) = (0.2, 1.1)`` and ``(1/3, 1.2)`` have optima and ``(0, 1)`` (plain DPO) has none.  For PRO-S the
same argument with ``|shat_k| < (K - 1) / (2K)`` and one response going to 0 gives
``alpha (1 - eta) (K - 1 + eta) > K - 1`` (for every reward set; it is PRO-P's condition at K = 2).
``require_optimum=False`` skips the check (the ``eta = 0, alpha = 1`` DPO identity needs it).

**Log-probs at 0.**  In 'exact' mode ``logpi_h = log(1 - sum_k pi_k)``; a confident model's log-prob can be exactly 0
(``pi = 1`` to fp32 or even float64) or subnormal (``-1e-40``), where ``log1mexp`` is ``-inf`` and its slope
overflows.  fastpref computes ``logpi_h = safe_log1mexp(logsumexp_k logp_k)``: ``log1mexp`` exactly while the
labeled responses leave at least ``2^-24`` of probability (what fp32 resolves), continued linearly (value and
slope) above that, so the loss and its gradient stay finite and training goes on (``logpi_h >= -17.6``).  The same
function runs in the fused kernels.  A group whose labeled responses have a total probability above ``1 + 1e-3``
(duplicated responses, positive log-probs) is invalid data and raises.
"""

from __future__ import annotations

import math

import torch

from . import fused
from ._checks import Checker
from ._ops import LOG2, Groups, group_top_metrics, pair_metrics, pro_f, safe_log1mexp

PRO_FEEDBACK = ("pairwise", "binary", "scalar")
PRO_HYPER_RESPONSE = ("exact", "zero")

DEFAULT_BETA = 0.1
DEFAULT_ETA = 1.0 / 3.0  # PRO-P (PRO-S: 1 / (K + 1) per group)
DEFAULT_LAM = 2.0
DEFAULT_TAU = 1.0
# Total probability a group's labeled responses may exceed 1 by (rounding of log-probs near 0) before the data is
# called invalid; in (1, 1 + 1e-3] the hyper response is safe_log1mexp's linear continuation.
MASS_SLACK = 1e-3
_LOG_MASS_SLACK = math.log1p(MASS_SLACK)


def pairwise_alpha(eta: float) -> float:
    """PRO-P's default ``alpha = 1 / (1 - eta)^2`` (the seed's threshold value)."""
    return 1.0 / (1.0 - eta) ** 2


def pairwise_has_optimum(eta: float, alpha: float) -> bool:
    """PRO-P has an optimum iff ``alpha (1 - eta^2) > 1`` (docs/methods.md section 2)."""
    return alpha * (1.0 - eta * eta) > 1.0


def scalar_has_optimum(eta: float, alpha: float, k: int) -> bool:
    """PRO-S with K responses has an optimum for every reward set if ``alpha (1 - eta)(K - 1 + eta) > K - 1``."""
    return alpha * (1.0 - eta) * (k - 1 + eta) > k - 1


def pro_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    feedback: str = "pairwise",
    labels: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    beta: float = DEFAULT_BETA,
    alpha: float | None = None,
    eta: float | None = None,
    lam: float = DEFAULT_LAM,
    tau: float = DEFAULT_TAU,
    hyper_response: str = "exact",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    require_optimum: bool = True,
    backend: str = "auto",
):
    r"""PRO loss (seed 000; docs/methods.md section 2), one loss for three feedback types.

    For a prompt group of K labeled responses with ``r_k = beta (logp_k - ref_logp_k)`` and the **hyper response**
    ``h`` standing for every unlabeled response::

        logpi_h   = safe_log1mexp(logsumexp_k logp_k)     ref_logpi_h = safe_log1mexp(logsumexp_k ref_logp_k)
        r_h       = beta (logpi_h - ref_logpi_h)           # hyper_response='exact';  r_h = 0 for 'zero'
        f(x)      = 1/2 softplus(x) + 1/2 softplus(-x)
        L_group   = - sum_k muhat_k shat_k r_k  +  alpha/2 * sum_{i,j in {1..K, h}} nu_i nu_j f(r_i - r_j)

    The double sum runs over all ordered pairs, the diagonal included (``f(0) = log 2``: a constant with zero
    gradient).  ``nu`` puts ``eta`` on ``h`` and ``1 - eta`` spread evenly over the K labeled responses.
    ``safe_log1mexp`` is ``log(1 - e^a)``, continued linearly within ``2^-24`` of ``a = 0`` (module docstring).

    * ``feedback='pairwise'`` (PRO-P): rows in TRL's layout (first half chosen, second half rejected; row ``b``
      pairs with ``b + B``), K=2, ``muhat = (1/2, 1/2)``, ``shat = (+1/4, -1/4)``, ``nu = ((1-eta)/2, (1-eta)/2, eta)``.
      Reported **times 4** (``loss = mean_pairs 4 L_group``) so that with ``eta = 0, alpha = 1`` its gradient is
      exactly DPO sigmoid's (value: DPO's plus ``log 2``).  Defaults ``eta = 1/3``, ``alpha = 1/(1-eta)^2 = 2.25``,
      with which ``4 L = DPO + f(r_w - r_h) + f(r_l - r_h) + const``.  Needs ``alpha (1 - eta^2) > 1``.
    * ``feedback='binary'`` (PRO-B): every row is its own group (K=1) with ``labels`` z in {0, 1}::

          L_row = w_z * ( -(z - 1/2) r_y + lam * f(r_y - r_h) ),   loss = mean over rows

      ``w_1 = desirable_weight``, ``w_0 = undesirable_weight`` (for imbalanced data the seed trains at 1:100 and
      scales the minority class's loss by the imbalance ratio).  Needs ``lam > 1``.  Stationary point:
      ``sigma(r_y - r_h) = 1/2 + (z - 1/2)/lam`` with ``r_h = 0`` ('zero'), and
      ``1/2 + (1 - pi_y)(z - 1/2)/lam`` with the exact hyper response.  ``alpha`` and ``eta`` are not used.
    * ``feedback='scalar'`` (PRO-S): rows grouped by ``group_ids`` (K >= 2 per group, sizes may differ) with scalar
      ``rewards`` R: ``muhat_k = 1/K``, ``shat_k = (1/K) sum_j sigma((R_k - R_j)/tau) - 1/2``, ``nu_k = (1-eta)/K``;
      ``loss = mean over groups of L_group``.  Defaults per group: ``eta = 1/(K+1)`` (``nu`` uniform over the K
      responses and ``h``) and ``alpha = lam / (eta (1 - eta))``, so the pairs ``(y_k, h)`` weigh ``lam`` in total
      as PRO-B's single pair does (K = 1 is PRO-B).  Needs ``alpha (1-eta)(K-1+eta) > K-1`` in every group.

    Args:
        logps, ref_logps: policy / reference response log-probs ``[N]`` (``<= 0``).  In 'exact' mode each group's
            labeled responses must have total probability at most ``1 + 1e-3`` (distinct responses; the slack
            absorbs rounding near 0).
        beta: implicit-reward temperature (default 0.1).
        alpha: regularizer weight; ``None``: ``1 / (1 - eta)^2`` (PRO-P), ``lam / (eta (1 - eta))`` (PRO-S).
        eta: hyper-response mass in ``nu``, in [0, 1); ``None``: 1/3 (PRO-P), ``1 / (K + 1)`` per group (PRO-S).
        lam: PRO-B regularizer weight (> 1), and PRO-S's when ``alpha`` is None (default 2).
        tau: PRO-S score temperature, > 0 (default 1).
        hyper_response: 'exact' (docs/methods.md) or 'zero' (the seed's experimental shortcut ``r_h = 0``).
        require_optimum: validate the existence condition (default True); False allows e.g. ``eta = 0, alpha = 1``.
        backend: ``'auto' | 'triton' | 'torch'``: the fused loss-head kernel (hyper-response aggregate in fp32 in
            the kernel; ``fastpref.losses.fused``) or this PyTorch expression.

    Returns:
        ``(loss, metrics)``; metrics are the DPO six (pairwise; binary: per class, KTO-style; scalar: each group's
        best-reward response vs the mean of the others) plus ``rewards/hyper`` and ``logps/hyper`` (means of ``r_h``
        and of the policy's ``logpi_h``; ``logps/hyper`` only in 'exact' mode).
    """
    ck = Checker("pro_loss")
    lp = ck.floats("logps", logps)
    n = lp.numel()
    ref = ck.floats("ref_logps", ref_logps, n)
    ck.choice("feedback", feedback, PRO_FEEDBACK)
    ck.choice("hyper_response", hyper_response, PRO_HYPER_RESPONSE)
    beta = ck.number("beta", beta, gt=0.0)
    if not isinstance(require_optimum, bool):
        raise ck.type_error(f"`require_optimum` must be a bool, got {type(require_optimum).__name__}")
    exact = hyper_response == "exact"

    if feedback != "binary" and labels is not None:
        raise ck.value_error("`labels` is only used with feedback='binary'")
    if feedback != "scalar" and (rewards is not None or group_ids is not None):
        raise ck.value_error("`rewards` and `group_ids` are only used with feedback='scalar'")

    if feedback == "binary":
        if labels is None:
            raise ck.value_error("feedback='binary' needs `labels` (1 = desirable, 0 = undesirable)")
        lab = ck.labels("labels", labels, n)
        lam = _check_lam(ck, lam, require_optimum)
        dw = ck.number("desirable_weight", desirable_weight, ge=0.0)
        uw = ck.number("undesirable_weight", undesirable_weight, ge=0.0)
        if exact:
            ck.nonpositive("logps", lp, "a log-prob; the hyper response is log(1 - pi)")
            ck.nonpositive("ref_logps", ref, "a log-prob; the hyper response is log(1 - pi)")
        lp, ref = ck.cast(lp), ck.cast(ref)
        fused_loss = None
        if fused.use_fused(backend, lp, ref, fn="pro_loss"):
            fused_loss = fused.pro_binary(lp, ref, lab, beta=beta, lam=lam, desirable_weight=dw,
                                          undesirable_weight=uw, exact=exact)
        return _pro_binary(lp, ref, lab, beta, lam, dw, uw, exact, fused_loss)

    if eta is not None:
        eta = ck.number("eta", eta, ge=0.0, lt=1.0)
    if alpha is not None:
        alpha = ck.number("alpha", alpha, gt=0.0)

    if feedback == "pairwise":
        if n % 2:
            raise ck.value_error(f"feedback='pairwise' needs an even number of rows (chosen then rejected), got {n}")
        eta = DEFAULT_ETA if eta is None else eta
        alpha = pairwise_alpha(eta) if alpha is None else alpha
        if require_optimum and not pairwise_has_optimum(eta, alpha):
            raise ck.value_error(
                f"PRO-P has no optimum for alpha={alpha:g}, eta={eta:g}: it needs alpha * (1 - eta^2) > 1 "
                f"(got {alpha * (1.0 - eta * eta):.6g}); use alpha > {1.0 / (1.0 - eta * eta):.6g}, or "
                "require_optimum=False"
            )
        groups = Groups.pairs(n // 2, lp.device)
        eta_g = alpha_g = None
    else:
        if rewards is None or group_ids is None:
            raise ck.value_error("feedback='scalar' needs `rewards` and `group_ids`")
        R = ck.floats("rewards", rewards, n)
        gid = ck.group_ids("group_ids", group_ids, n)
        tau = ck.number("tau", tau, gt=0.0)
        groups = Groups(gid)
        if bool((groups.counts < 2).any()):
            raise ck.value_error("`group_ids`: every PRO-S group needs at least 2 responses")
        eta_g, alpha_g = _scalar_weights(ck, groups, eta, alpha, lam, require_optimum)

    lp, ref = ck.cast(lp), ck.cast(ref)
    if exact:
        _check_group_mass(ck, groups, lp, "logps")
        _check_group_mass(ck, groups, ref, "ref_logps")
    dtype = lp.dtype
    r = beta * (lp - ref)
    counts = groups.counts.to(dtype)

    if exact:
        logpi_h = safe_log1mexp(groups.logsumexp(lp))
        ref_logpi_h = safe_log1mexp(groups.logsumexp(ref))
        r_h = beta * (logpi_h - ref_logpi_h)
    else:
        logpi_h = None
        r_h = torch.zeros(groups.num, dtype=dtype, device=lp.device)

    b = n // 2
    fused_loss = None
    if fused.use_fused(backend, lp, ref, fn="pro_loss"):
        if feedback == "pairwise":
            fused_loss = fused.pro_pairwise(lp, ref, beta=beta, alpha=alpha, eta=eta, exact=exact)
        else:
            fused_loss = fused.pro_scalar(groups, lp, ref, ck.cast(R), beta=beta, alpha=alpha_g, eta=eta_g,
                                          tau=tau, exact=exact)
    if fused_loss is None:
        if feedback == "pairwise":
            # muhat_k shat_k = (1/2)(+-1/4)
            linear = -(r[:b] - r[b:]) / 8.0
            eta_t = torch.full((groups.num,), eta, dtype=dtype, device=lp.device)
            alpha_t = torch.full((groups.num,), alpha, dtype=dtype, device=lp.device)
        else:
            Rp = groups.pad(ck.cast(R))
            pm = groups.mask[:, :, None] & groups.mask[:, None, :]
            sig = torch.where(pm, torch.sigmoid((Rp[:, :, None] - Rp[:, None, :]) / tau), 0.0)
            shat = sig.sum(2) / counts[:, None] - 0.5  # [G, K] (padding rows are garbage, masked below)
            muhat_shat = torch.where(groups.mask, shat / counts[:, None], 0.0)
            linear = -(muhat_shat * groups.pad(r)).sum(1)
            eta_t, alpha_t = eta_g.to(dtype), alpha_g.to(dtype)

        nu = (1.0 - eta_t) / counts  # per labeled response, [G]
        reg_labeled = nu**2 * groups.pairwise(r, pro_f)
        reg_hyper = 2.0 * eta_t * nu * groups.sum(pro_f(r - r_h[groups.inv]))
        reg_diag_h = eta_t**2 * LOG2
        per_group = linear + 0.5 * alpha_t * (reg_labeled + reg_hyper + reg_diag_h)
        loss = 4.0 * per_group.mean() if feedback == "pairwise" else per_group.mean()
    else:
        loss = fused_loss

    if feedback == "pairwise":
        metrics = pair_metrics(r[:b], r[b:], lp[:b], lp[b:])
    else:
        metrics = group_top_metrics(groups, ck.cast(R), r, lp)
    metrics["rewards/hyper"] = r_h.detach().mean()
    if logpi_h is not None:
        metrics["logps/hyper"] = logpi_h.detach().mean()
    return loss, metrics


def _check_lam(ck: Checker, lam, require_optimum: bool) -> float:
    lam = ck.number("lam", lam, gt=0.0)
    if require_optimum and not lam > 1.0:
        raise ck.value_error(
            f"`lam` must be > 1 for feedback='binary' (no optimum otherwise: the stationary point "
            f"sigma(r_y - r_h) = 1/2 + (z - 1/2)/lam must lie in (0, 1)); got {lam}"
        )
    return lam


def _scalar_weights(ck: Checker, groups: Groups, eta, alpha, lam, require_optimum: bool):
    """Per-group ``eta`` and ``alpha`` of PRO-S (float64 ``[G]``), checked against the existence condition."""
    k = groups.counts.to(torch.float64)
    eta_g = 1.0 / (k + 1.0) if eta is None else torch.full_like(k, eta)
    if alpha is None:
        lam = ck.number("lam", lam, gt=0.0)
        if bool((eta_g == 0).any()):
            raise ck.value_error("eta = 0 leaves no hyper response to scale `lam` by: pass `alpha` explicitly")
        alpha_g = lam / (eta_g * (1.0 - eta_g))
    else:
        alpha_g = torch.full_like(k, alpha)
    if require_optimum:
        lhs = alpha_g * (1.0 - eta_g) * (k - 1.0 + eta_g)
        bad = lhs <= k - 1.0
        if bool(bad.any()):
            g = int(torch.nonzero(bad)[0])
            kg = int(groups.counts[g])
            raise ck.value_error(
                f"PRO-S has no optimum for group {g} (K={kg}): it needs alpha * (1 - eta) * (K - 1 + eta) > K - 1, "
                f"got alpha={float(alpha_g[g]):.6g}, eta={float(eta_g[g]):.6g} "
                f"({float(lhs[g]):.6g} <= {kg - 1}); raise `alpha` (or `lam`), or require_optimum=False"
            )
    return eta_g, alpha_g


def _pro_binary(lp, ref, lab, beta, lam, dw, uw, exact, fused_loss=None):
    r = beta * (lp - ref)
    if exact:
        logpi_h = safe_log1mexp(lp)
        r_h = beta * (logpi_h - safe_log1mexp(ref))
    else:
        logpi_h = None
        r_h = torch.zeros_like(r)
    if fused_loss is None:
        z = lab.to(r.dtype)
        w = torch.where(lab, torch.full_like(r, dw), torch.full_like(r, uw))
        per_row = w * (-(z - 0.5) * r + lam * pro_f(r - r_h))
        loss = per_row.mean()
    else:
        loss = fused_loss
    metrics = {}
    with torch.no_grad():
        if bool(lab.any()):
            metrics["rewards/chosen"] = r[lab].mean()
            metrics["logps/chosen"] = lp[lab].mean()
        if bool((~lab).any()):
            metrics["rewards/rejected"] = r[~lab].mean()
            metrics["logps/rejected"] = lp[~lab].mean()
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics["rewards/hyper"] = r_h.mean()
        if logpi_h is not None:
            metrics["logps/hyper"] = logpi_h.mean()
    return loss, metrics


def _check_group_mass(ck: Checker, groups: Groups, x: torch.Tensor, name: str) -> None:
    if not bool((x <= 0).all()):
        raise ck.value_error(f"`{name}` must be <= 0 (log-probs); got max {float(x.max())}")
    lse = groups.logsumexp(x.detach())
    if not bool((lse <= _LOG_MASS_SLACK).all()):
        g = int(torch.argmax(lse))
        raise ck.value_error(
            f"`{name}`: the labeled responses of group {g} have total probability {math.exp(float(lse[g])):.6g} > 1 "
            f"(+{MASS_SLACK:g} rounding slack), so the hyper response pi(h) = 1 - sum_k pi(y_k) is negative; a "
            "group's responses must be distinct (or use hyper_response='zero')"
        )
