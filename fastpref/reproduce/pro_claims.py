"""PRO's claims (seed 000: Guo, Li & Chen, "Proximalized Preference Optimization for Diverse Feedback Types",
NeurIPS 2025; docs/methods.md section 2), through :func:`fastpref.losses.pro_loss`.

* **PRO-P = DPO** at ``eta = 0, alpha = 1``: the decomposition's optimizer + regularizer has DPO's gradient, reported
  times 4 (the population weight of one ordered pair). Checked on random sequence log-probs (float64).
* **Existence boundary**: the loss is bounded below as the rejected response's probability goes to 0 iff
  ``alpha (1 - eta^2) > 1``; the asymptotic slope of ``4 L`` in ``|r_l|`` is ``(alpha (1 - eta^2) - 1) / 2``. Measured
  by autograd at ``r_l = -400``; ``(0.2, 1.1)`` and ``(1/3, 1.2)`` have optima (the seed's sufficient condition
  ``alpha (1 - eta)^2 >= 1`` refuses them), ``(0, 1)`` (plain DPO) has none.
* **PRO-B at 1:100**: the seed trains binary feedback at 1:100 desirable:undesirable and scales the minority's loss by
  the imbalance ratio. Toy: a desirable and an undesirable response the model cannot tell apart (one shared logit
  ``theta``, a third response at 0), ``hyper_response='zero'`` (the seed's setting): the minimizer of fastpref's
  PRO-B loss on 1 desirable + 100 undesirable rows with ``desirable_weight = 100`` equals the balanced (1:1) one; without
  the weight the majority drags the desirable response down, to the stationary point
  ``sigma(r) = 1/2 + (W_d - W_u) / (2 lam (W_d + W_u))`` (``W`` = rows x weight).
"""

from __future__ import annotations

import math

import torch

from ..losses.functional import dpo_loss, pro_loss
from . import ClaimResult

F64 = torch.float64


# ----------------------------------------------------------------------------------------------- PRO-P = DPO


def run_identity() -> ClaimResult:
    g = torch.Generator().manual_seed(0)
    B, beta = 32, 0.1
    cw, cl = -(5 + 195 * torch.rand(B, generator=g, dtype=F64)), -(5 + 195 * torch.rand(B, generator=g, dtype=F64))
    rw, rl = cw + 3 * torch.randn(B, generator=g, dtype=F64), cl + 3 * torch.randn(B, generator=g, dtype=F64)
    lp = torch.cat([cw, cl]).requires_grad_(True)
    pro, _ = pro_loss(lp, torch.cat([rw, rl]), beta=beta, eta=0.0, alpha=1.0, require_optimum=False)
    (g_pro,) = torch.autograd.grad(pro, lp)
    lp2 = torch.cat([cw, cl]).requires_grad_(True)
    dpo, _ = dpo_loss(lp2[:B], lp2[B:], rw, rl, beta=beta)
    (g_dpo,) = torch.autograd.grad(dpo, lp2)
    grad_err = float((g_pro - g_dpo).abs().max() / g_dpo.abs().max())
    offset = float((pro - dpo).detach())
    passed = grad_err < 1e-12 and abs(offset - math.log(2)) < 1e-12

    def plot(ax):
        ax.plot(g_dpo.numpy(), g_pro.numpy(), "o", ms=3)
        lim = [float(g_dpo.min()), float(g_dpo.max())]
        ax.plot(lim, lim, "k-", lw=0.5)
        ax.set_xlabel("dDPO / dlogp")
        ax.set_ylabel("d(4 PRO-P) / dlogp, eta=0, alpha=1")
        ax.set_title(f"PRO-P x4 = DPO: max rel. gradient gap {grad_err:.0e}")

    return ClaimResult(
        name="pro-dpo-identity", title="PRO-P (x4) = DPO at eta = 0, alpha = 1 (seed 000)",
        paper="4 PRO-P at eta = 0, alpha = 1 has exactly DPO's gradient (value: DPO + log 2)",
        fastpref=f"max relative gradient difference {grad_err:.1e}; value - DPO = {offset:.15f} (log 2 = "
                 f"{math.log(2):.15f})",
        passed=passed, details={"gradient_error": grad_err, "value_offset": offset}, plot=plot)


# ----------------------------------------------------------------------------------------------- existence


POINTS = ((0.2, 1.1), (1 / 3, 1.2), (0.0, 1.0), (0.5, 1.3), (1 / 3, 2.25), (0.2, 1.0 / 0.96))


def asymptotic_slope(eta: float, alpha: float, t: float = 400.0) -> float:
    """``d(4 L) / d|r_l|`` of one PRO-P pair (beta = 1, exact hyper response) at ``r_l = -t``."""
    lp = torch.tensor([-0.5, -0.7 - t], dtype=F64, requires_grad=True)
    loss, _ = pro_loss(lp, torch.tensor([-0.7, -0.7], dtype=F64), beta=1.0, eta=eta, alpha=alpha,
                       require_optimum=False)
    (grad,) = torch.autograd.grad(loss, lp)
    return -float(grad[1])


def validates(eta: float, alpha: float) -> bool:
    try:
        pro_loss(torch.tensor([-1.0, -2.0], dtype=F64), torch.tensor([-1.5, -1.0], dtype=F64), eta=eta, alpha=alpha)
        return True
    except ValueError:
        return False


def run_existence() -> ClaimResult:
    rows = []
    for eta, alpha in POINTS:
        c = alpha * (1 - eta**2)
        rows.append({"eta": eta, "alpha": alpha, "alpha(1-eta^2)": c, "predicted": (c - 1) / 2,
                     "measured": asymptotic_slope(eta, alpha), "seed_condition": alpha * (1 - eta) ** 2 >= 1,
                     "accepted": validates(eta, alpha)})
    slope_err = max(abs(r["measured"] - r["predicted"]) for r in rows)
    passed = slope_err < 1e-9 and all(r["accepted"] == (r["alpha(1-eta^2)"] > 1) for r in rows)
    named = {(0.2, 1.1): "(0.2, 1.1)", (1 / 3, 1.2): "(1/3, 1.2)", (0.0, 1.0): "(0, 1)"}
    summary = "; ".join(f"{named[(r['eta'], r['alpha'])]}: slope {_clean(r['measured']):+.4f} "
                        f"{'optimum' if r['measured'] > 0 else 'no optimum'}"
                        for r in rows if (r["eta"], r["alpha"]) in named)

    def plot(ax):
        xs = [r["alpha(1-eta^2)"] for r in rows]
        ax.plot(xs, [r["measured"] for r in rows], "o", label="measured (autograd)")
        grid = [min(xs) - 0.05, max(xs) + 0.05]
        ax.plot(grid, [(x - 1) / 2 for x in grid], "k-", lw=0.5, label="(alpha (1-eta^2) - 1) / 2")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.axvline(1.0, color="grey", lw=0.5)
        for r in rows:
            ax.annotate(f"({r['eta']:.2g},{r['alpha']:.3g})", (r["alpha(1-eta^2)"], r["measured"]), fontsize=6)
        ax.set_xlabel("alpha (1 - eta^2)")
        ax.set_ylabel("asymptotic slope of 4L in |r_l|")
        ax.set_title("PRO existence: optimum iff alpha (1-eta^2) > 1")
        ax.legend(fontsize=6)

    return ClaimResult(
        name="pro-existence", title="PRO's existence boundary (seed 000; docs/methods.md section 2)",
        paper="optimum iff alpha (1 - eta^2) > 1; slope (alpha (1 - eta^2) - 1) / 2; (0.2, 1.1), (1/3, 1.2) have one, "
              "(0, 1) none",
        fastpref=f"{summary}; max |measured - predicted slope| {slope_err:.1e}; pro_loss accepts exactly the points "
                 "with an optimum",
        passed=passed, details={"points": rows}, plot=plot)


# ----------------------------------------------------------------------------------------------- PRO-B 1:100


LAM, BETA = 2.0, 1.0


def _log_pi(theta):
    return torch.log_softmax(torch.stack([theta, theta, torch.zeros_like(theta)]), 0)  # desirable, undesirable, other


def binary_minimizer(n_d: int, n_u: int, desirable_weight: float = 1.0) -> float:
    """The desirable response's implicit reward at the minimizer of PRO-B (bisection on the autograd gradient)."""
    y = torch.tensor([0] * n_d + [1] * n_u)
    z = torch.tensor([1] * n_d + [0] * n_u)
    ref = _log_pi(torch.zeros((), dtype=F64))

    def grad(theta: float) -> float:
        t = torch.tensor(theta, dtype=F64, requires_grad=True)
        loss, _ = pro_loss(_log_pi(t)[y], ref[y], feedback="binary", labels=z, beta=BETA, lam=LAM,
                           desirable_weight=desirable_weight, hyper_response="zero")
        return float(torch.autograd.grad(loss, t)[0])

    lo, hi = -20.0, 20.0  # the loss is convex in theta here
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if grad(mid) < 0 else (lo, mid)
    theta = torch.tensor((lo + hi) / 2, dtype=F64)
    return float(BETA * (_log_pi(theta)[0] - ref[0]))


def _clean(x: float) -> float:
    """``x`` without a sign on a rounding-level zero (prints +0.0000, not -0.0000)."""
    return 0.0 if abs(x) < 5e-9 else x


def run_binary_imbalance() -> ClaimResult:
    balanced = binary_minimizer(1, 1)
    unweighted = binary_minimizer(1, 100)
    reweighted = binary_minimizer(1, 100, desirable_weight=100.0)
    w_d, w_u = 1.0, 100.0
    s = 0.5 + (w_d - w_u) / (2 * LAM * (w_d + w_u))
    predicted = math.log(s / (1 - s))
    passed = abs(reweighted - balanced) < 1e-9 and abs(unweighted - predicted) < 1e-6 and unweighted < -0.5

    def plot(ax):
        labels = ["1:1", "1:100", "1:100, x100"]
        values = [balanced, unweighted, reweighted]
        bars = ax.bar(labels, values, color=["C0", "C3", "C2"])
        for bar, v in zip(bars, values):
            ax.annotate(f"{_clean(v):+.4f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=7)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_ylabel("desirable response's reward r_d")
        ax.set_title("PRO-B 1:100: reweighting recovers the balanced fit")

    return ClaimResult(
        name="pro-binary-imbalance", title="PRO-B at a 1:100 class imbalance (seed 000)",
        paper="at 1:100, scaling the minority's loss by the imbalance ratio (100) restores the balanced training",
        fastpref=(f"desirable reward r_d: 1:1 {_clean(balanced):+.4f}; 1:100 x100 {_clean(reweighted):+.4f}; "
                  f"1:100 unweighted {unweighted:+.4f} (stationary point {predicted:+.4f}: the majority drags it "
                  "down)"),
        passed=passed, details={"balanced": balanced, "unweighted": unweighted, "reweighted": reweighted,
                                "predicted_unweighted": predicted}, plot=plot)
