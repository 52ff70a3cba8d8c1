"""TYPO's three-response bandit (seed 002, "New Desiderata for Direct Preference Optimization", its Fig. 2).

Three responses; pairs are drawn from ``pi_ref = (0.4, 0.4, 0.2)`` (ties dropped) and labeled by Bradley-Terry
preferences of ``pi* = (0.6, 0.3, 0.1)`` (``P(y > y') = pi*(y) / (pi*(y) + pi*(y'))``); TYPO's unsupervised rows are
further samples from ``pi_ref``. The policy is ``softmax(theta)``, started at ``pi_ref``, trained full-batch with Adam
on the losses of :mod:`fastpref.losses.functional` (``typo_loss``, ``dpo_loss`` sigmoid and ipo).

Claim: TYPO (``lam`` small: 1e-5) recovers ``pi*`` (its pairwise term is the BT likelihood with ``log pi`` as the
score); DPO and IPO (``beta = 0.02``) put almost all mass on the mode; with strong regularization (TYPO
``lam = 100``, DPO/IPO ``beta = 100``) all three stay at ``pi_ref``.
"""

from __future__ import annotations

import torch

from ..losses.functional import dpo_loss, typo_loss
from . import ClaimResult

PI_STAR = (0.6, 0.3, 0.1)
PI_REF = (0.4, 0.4, 0.2)
N_PAIRS = N_UNSUP = 5000
STEPS, LR = 300, 0.05
TOL_STAR, TOL_REF, MODE = 0.02, 0.03, 0.99


def dataset(seed: int = 0):
    pi_star = torch.tensor(PI_STAR, dtype=torch.float64)
    pi_ref = torch.tensor(PI_REF, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    a = torch.multinomial(pi_ref, N_PAIRS, replacement=True, generator=g)
    b = torch.multinomial(pi_ref, N_PAIRS, replacement=True, generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    a_wins = torch.rand(a.numel(), generator=g, dtype=torch.float64) < pi_star[a] / (pi_star[a] + pi_star[b])
    y_w, y_l = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    y_u = torch.multinomial(pi_ref, N_UNSUP, replacement=True, generator=g)
    return y_w, y_l, y_u


def train(method: str, data, *, beta: float = 0.02, lam: float = 1e-5) -> torch.Tensor:
    """Final ``pi`` of ``method`` ('typo', 'dpo', 'ipo') on ``data``."""
    y_w, y_l, y_u = data
    ref = torch.tensor(PI_REF, dtype=torch.float64).log()
    ones = torch.ones(y_w.numel(), dtype=torch.float64)
    theta = ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=LR)
    for _ in range(STEPS):
        logp = torch.log_softmax(theta, dim=0)
        if method == "typo":
            loss, _ = typo_loss(logp[y_w], logp[y_l], logp[y_u], lam=lam)
        elif method == "dpo":
            loss, _ = dpo_loss(logp[y_w], logp[y_l], ref[y_w], ref[y_l], beta=beta)
        else:  # ipo: a response is one "token", lengths 1
            loss, _ = dpo_loss(logp[y_w], logp[y_l], ref[y_w], ref[y_l], beta=beta, loss_type="ipo",
                               chosen_lengths=ones, rejected_lengths=ones)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(theta.detach(), dim=0)


def run() -> ClaimResult:
    data = dataset()
    pi_star, pi_ref = torch.tensor(PI_STAR, dtype=torch.float64), torch.tensor(PI_REF, dtype=torch.float64)
    learned = {"typo": train("typo", data), "dpo": train("dpo", data), "ipo": train("ipo", data)}
    strong = {"typo": train("typo", data, lam=100.0), "dpo": train("dpo", data, beta=100.0),
              "ipo": train("ipo", data, beta=100.0)}
    typo_err = float((learned["typo"] - pi_star).abs().max())
    mode = {m: float(learned[m][0]) for m in ("dpo", "ipo")}
    ref_err = max(float((p - pi_ref).abs().max()) for p in strong.values())
    passed = typo_err < TOL_STAR and min(mode.values()) > MODE and ref_err < TOL_REF
    fmt = lambda p: "(" + ", ".join(f"{float(x):.3f}" for x in p) + ")"  # noqa: E731

    def plot(ax):
        import numpy as np

        rows = [("pi*", pi_star), ("pi_ref", pi_ref), ("TYPO", learned["typo"]), ("DPO", learned["dpo"]),
                ("IPO", learned["ipo"]), ("TYPO lam=100", strong["typo"])]
        x = np.arange(3)
        width = 0.8 / len(rows)
        for i, (label, p) in enumerate(rows):
            ax.bar(x + (i - len(rows) / 2 + 0.5) * width, p.numpy(), width, label=label)
        ax.set_xticks(x, ["y1", "y2", "y3"])
        ax.set_ylabel("final pi(y)")
        ax.set_title("TYPO bandit: TYPO -> pi*, DPO/IPO -> mode")
        ax.legend(fontsize=6)

    return ClaimResult(
        name="typo-bandit", title="TYPO three-response bandit (seed 002, Fig. 2)",
        paper="TYPO -> pi* = (0.6, 0.3, 0.1); DPO, IPO -> the mode; strong regularization: all stay at pi_ref",
        fastpref=(f"TYPO {fmt(learned['typo'])}; DPO {fmt(learned['dpo'])}; IPO {fmt(learned['ipo'])}; "
                  f"lam/beta=100: max |pi - pi_ref| = {ref_err:.3f}"),
        passed=passed,
        details={"pi": {k: v.tolist() for k, v in learned.items()},
                 "pi_strong": {k: v.tolist() for k, v in strong.items()}, "typo_max_error": typo_err,
                 "mode_mass": mode, "strong_max_error_to_ref": ref_err},
        plot=plot)
