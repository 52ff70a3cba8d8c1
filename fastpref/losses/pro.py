"""PRO -- Proximalized Preference Optimization (seed ``000``: Guo, Li & Chen, "Proximalized Preference Optimization
for Diverse Feedback Types: A Decomposed Perspective on DPO", NeurIPS 2025).  The formulas are METHODS.md section 2.
"""

from __future__ import annotations

import torch

from . import fused
from ._checks import Checker
from ._ops import LOG2, Groups, group_top_metrics, log1mexp, pair_metrics, pro_f

PRO_FEEDBACK = ("pairwise", "binary", "scalar")
PRO_HYPER_RESPONSE = ("exact", "zero")

# Defaults and the existence conditions they satisfy (an optimum exists / the loss is bounded below):
#   pairwise, scalar:  alpha * (1 - eta)^2 >= 1  (METHODS.md section 2).  eta = 0.1 puts 10% of nu's mass on the
#                      hyper response; alpha = None resolves to 1 / (1 - eta)^2 (= 1.2346 for eta = 0.1), the
#                      boundary where the labeled pair's term is exactly the DPO term and the hyper-response terms
#                      are the proximal regularizer.
#   binary:            lam > 1 (the stationary point sigma(r_y - r_h) = 1/2 + (z - 1/2)/lam lies in (0, 1)).
#                      lam = 2 puts it at sigma = 3/4 (desirable) and 1/4 (undesirable).
DEFAULT_ETA = 0.1
DEFAULT_LAM = 2.0
_TOL = 1e-9


def pro_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    feedback: str = "pairwise",
    labels: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float | None = None,
    eta: float = DEFAULT_ETA,
    lam: float = DEFAULT_LAM,
    tau: float = 1.0,
    hyper_response: str = "exact",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    backend: str = "auto",
):
    r"""PRO loss (seed 000; METHODS.md section 2), one loss for three feedback types.

    For a prompt group of K labeled responses with ``r_k = beta (logp_k - ref_logp_k)`` and the **hyper response**
    ``h`` standing for every unlabeled response::

        logpi_h   = log1mexp(logsumexp_k logp_k)          ref_logpi_h = log1mexp(logsumexp_k ref_logp_k)
        r_h       = beta (logpi_h - ref_logpi_h)           # hyper_response='exact';  r_h = 0 for 'zero'
        f(x)      = 1/2 softplus(x) + 1/2 softplus(-x)
        L_group   = - sum_k muhat_k shat_k r_k  +  alpha/2 * sum_{i,j in {1..K, h}} nu_i nu_j f(r_i - r_j)

    The double sum runs over all ordered pairs, the diagonal included (``f(0) = log 2``: a constant,
    ``alpha/2 * log 2 * sum_i nu_i^2`` per group, with zero gradient).  ``nu`` puts ``eta`` on ``h`` and ``1 - eta``
    spread evenly over the K labeled responses.

    * ``feedback='pairwise'`` (PRO-P): rows in TRL's layout (first half chosen, second half rejected; row ``b``
      pairs with ``b + B``), K=2, ``muhat = (1/2, 1/2)``, ``shat = (+1/4, -1/4)``, ``nu = ((1-eta)/2, (1-eta)/2, eta)``.
      Reported **times 4** (``loss = mean_pairs 4 L_group``) so that with ``eta = 0, alpha = 1`` its gradient is
      exactly DPO sigmoid's (and its value DPO's plus ``2 log 2 * sum nu^2``).  Needs ``alpha (1 - eta)^2 >= 1``.
    * ``feedback='binary'`` (PRO-B): every row is its own group (K=1) with ``labels`` z in {0, 1}::

          L_row = w_z * ( -(z - 1/2) r_y + lam * f(r_y - r_h) ),   loss = mean over rows

      ``w_1 = desirable_weight``, ``w_0 = undesirable_weight`` (for imbalanced data; the seed trains at 1:100).
      Needs ``lam > 1``.  ``alpha`` and ``eta`` are not used.
    * ``feedback='scalar'`` (PRO-S): rows grouped by ``group_ids`` (K >= 2 per group, sizes may differ) with scalar
      ``rewards`` R: ``muhat_k = 1/K``, ``shat_k = (1/K) sum_j sigma((R_k - R_j)/tau) - 1/2``, ``nu_k = (1-eta)/K``;
      ``loss = mean over groups of L_group`` (not rescaled: with K=2 and tau -> 0 it is PRO-P / 4).  Needs
      ``alpha (1 - eta)^2 >= 1``: the linear term is ``-(1/K^2) sum_{k<j} a_kj (r_k - r_j)`` with
      ``|a_kj| = |sigma((R_k - R_j)/tau) - 1/2| < 1/2`` and ``f(x) >= |x|/2``, so every labeled pair's term is
      bounded below for every K and every reward set, as in PRO-P.

    Args:
        logps, ref_logps: policy / reference response log-probs ``[N]``.  In 'exact' mode each group's labeled
            responses must have total probability < 1 (``logsumexp_k logp_k < 0``, same for the reference).
        beta: implicit-reward temperature (default 0.1).
        alpha: regularizer weight; ``None`` -> ``1 / (1 - eta)^2``, the smallest value with an optimum.
        eta: hyper-response mass in ``nu``, in [0, 1) (default 0.1).
        lam: PRO-B regularizer weight, > 1 (default 2).
        tau: PRO-S score temperature, > 0 (default 1).
        hyper_response: 'exact' (METHODS.md) or 'zero' (the seed's experimental shortcut ``r_h = 0``).
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
    exact = hyper_response == "exact"

    if feedback != "binary" and labels is not None:
        raise ck.value_error("`labels` is only used with feedback='binary'")
    if feedback != "scalar" and (rewards is not None or group_ids is not None):
        raise ck.value_error("`rewards` and `group_ids` are only used with feedback='scalar'")

    if feedback == "binary":
        if labels is None:
            raise ck.value_error("feedback='binary' needs `labels` (1 = desirable, 0 = undesirable)")
        lab = ck.labels("labels", labels, n)
        lam = ck.number("lam", lam)
        if not lam > 1.0:
            raise ck.value_error(
                f"`lam` must be > 1 for feedback='binary' (no optimum otherwise: the stationary point "
                f"sigma(r_y - r_h) = 1/2 + (z - 1/2)/lam must lie in (0, 1)); got {lam}"
            )
        dw = ck.number("desirable_weight", desirable_weight, ge=0.0)
        uw = ck.number("undesirable_weight", undesirable_weight, ge=0.0)
        if exact:
            ck.negative("logps", lp, "the hyper response needs log1mexp(logp)")
            ck.negative("ref_logps", ref, "the hyper response needs log1mexp(ref_logp)")
        lp, ref = ck.cast(lp), ck.cast(ref)
        fused_loss = None
        if fused.use_fused(backend, lp, ref, fn="pro_loss"):
            fused_loss = fused.pro_binary(lp, ref, lab, beta=beta, lam=lam, desirable_weight=dw,
                                          undesirable_weight=uw, exact=exact)
        return _pro_binary(lp, ref, lab, beta, lam, dw, uw, exact, fused_loss)

    eta = ck.number("eta", eta, ge=0.0, lt=1.0)
    alpha = 1.0 / (1.0 - eta) ** 2 if alpha is None else ck.number("alpha", alpha, gt=0.0)
    if alpha * (1.0 - eta) ** 2 < 1.0 - _TOL:
        raise ck.value_error(
            f"PRO has no optimum for alpha={alpha}, eta={eta}: it needs alpha * (1 - eta)^2 >= 1 "
            f"(got {alpha * (1.0 - eta) ** 2:.6g}); use alpha >= {1.0 / (1.0 - eta) ** 2:.6g}"
        )

    if feedback == "pairwise":
        if n % 2:
            raise ck.value_error(f"feedback='pairwise' needs an even number of rows (chosen then rejected), got {n}")
        groups = Groups.pairs(n // 2, lp.device)
    else:
        if rewards is None or group_ids is None:
            raise ck.value_error("feedback='scalar' needs `rewards` and `group_ids`")
        R = ck.floats("rewards", rewards, n)
        gid = ck.group_ids("group_ids", group_ids, n)
        tau = ck.number("tau", tau, gt=0.0)
        groups = Groups(gid)
        if bool((groups.counts < 2).any()):
            raise ck.value_error("`group_ids`: every PRO-S group needs at least 2 responses")

    lp, ref = ck.cast(lp), ck.cast(ref)
    if exact:
        _check_group_mass(ck, groups, lp, "logps")
        _check_group_mass(ck, groups, ref, "ref_logps")
    dtype = lp.dtype
    r = beta * (lp - ref)
    counts = groups.counts.to(dtype)

    if exact:
        logpi_h = log1mexp(groups.logsumexp(lp))
        ref_logpi_h = log1mexp(groups.logsumexp(ref))
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
            fused_loss = fused.pro_scalar(groups, lp, ref, ck.cast(R), beta=beta, alpha=alpha, eta=eta, tau=tau,
                                          exact=exact)
    if fused_loss is None:
        if feedback == "pairwise":
            # muhat_k shat_k = (1/2)(+-1/4)
            linear = -(r[:b] - r[b:]) / 8.0
        else:
            Rp = groups.pad(ck.cast(R))
            pm = groups.mask[:, :, None] & groups.mask[:, None, :]
            sig = torch.where(pm, torch.sigmoid((Rp[:, :, None] - Rp[:, None, :]) / tau), 0.0)
            shat = sig.sum(2) / counts[:, None] - 0.5  # [G, K] (padding rows are garbage, masked below)
            muhat_shat = torch.where(groups.mask, shat / counts[:, None], 0.0)
            linear = -(muhat_shat * groups.pad(r)).sum(1)

        nu = (1.0 - eta) / counts  # per labeled response, [G]
        reg_labeled = nu**2 * groups.pairwise(r, pro_f)
        reg_hyper = 2.0 * eta * nu * groups.sum(pro_f(r - r_h[groups.inv]))
        reg_diag_h = eta**2 * LOG2
        per_group = linear + 0.5 * alpha * (reg_labeled + reg_hyper + reg_diag_h)
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


def _pro_binary(lp, ref, lab, beta, lam, dw, uw, exact, fused_loss=None):
    r = beta * (lp - ref)
    if exact:
        logpi_h = log1mexp(lp)
        r_h = beta * (logpi_h - log1mexp(ref))
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
    lse = groups.logsumexp(x.detach())
    if not bool((lse < 0).all()):
        g = int(torch.argmax(lse))
        raise ck.value_error(
            f"`{name}`: the labeled responses of group {g} have total probability >= 1 "
            f"(logsumexp = {float(lse[g]):.3g}), so the hyper response pi(h) = 1 - sum_k pi(y_k) is not positive; "
            "log-probs must be < 0 and a group's responses distinct (or use hyper_response='zero')"
        )

