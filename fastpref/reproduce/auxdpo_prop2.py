"""AuxDPO's Prop. 2 example (seed 003: Gopalan, Ray Chowdhury & Banerjee, "Why DPO is a Misspecified Estimator and
How to Fix It"): DPO reverses a preference that AuxDPO keeps.

Three responses with true rewards ``r* = (1, 2, 0)``; the policy class ``pi_theta ∝ (e^theta, e^-theta, 1)``
(misspecified: it cannot represent ``r*``), ``theta_0 = 0`` the reference. Three comparisons, (y1, y2), (y2, y3)
and (y3, y1), annotated ``n12 : n23 : n31 = 1 : 1 : 100`` times with Bradley-Terry labels (``P(y > y') =
sigma(r*(y) - r*(y'))``; ``1000`` rows in all, each comparison's rows split by its label probability). The truth
prefers y2 to y1, i.e. ``theta < 0``; DPO (``beta = 1``) fits the dominant (y3, y1) comparison and ends at
``theta = +0.91``.

AuxDPO through fastpref's public API: each comparison is one example of the dataset with its pair of offsets
(``delta = cap * tanh(delta_raw)``, cap 1, ``delta_raw ~ N(0, 1e-3)``; the example's annotations share them), the
loss is :func:`fastpref.losses.auxdpo_loss` (anti-collapse ``-lambda_amp/2 (mean delta_w^2 + mean delta_l^2)``,
``lambda_amp = 0.01``) plus ``lambda_null ||A delta||^2`` from :func:`fastpref.losses.param_null_penalty` with
``grad_theta log pi_ref = (1, -1, 0)`` (``lambda_null = 1``), and ``delta_raw`` trains in its own Adam group at
learning rate 5e-3 (theta at 0.05). Claim: it ends at ``theta < 0``. Controls: delta at a policy's learning rate
(5e-7: it never moves) and the pre-fix ``+lambda_amp * sum_rows delta^2`` penalty both end at DPO's theta.
"""

from __future__ import annotations

import torch

from ..losses import param_null_penalty
from ..losses.functional import auxdpo_loss, dpo_loss
from . import ClaimResult

R_STAR = (1.0, 2.0, 0.0)
COMPARISONS = ((0, 1, 1.0), (1, 2, 1.0), (2, 0, 100.0))  # (a, b, relative count)
ROWS = 1000
BETA, THETA_LR, DELTA_LR, POLICY_LR = 1.0, 0.05, 5e-3, 5e-7
DPO_STEPS, AUX_STEPS = 300, 1000


def log_pi(theta: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(torch.stack([theta, -theta, torch.zeros_like(theta)]), 0)


def annotations():
    """Rows: example index, winner, loser, and whether the example's first response won."""
    r = torch.tensor(R_STAR, dtype=torch.float64)
    total = sum(c for _, _, c in COMPARISONS)
    example, first_won = [], []
    for k, (a, b, count) in enumerate(COMPARISONS):
        p = float(torch.sigmoid(r[a] - r[b]))
        for won, share in ((True, p), (False, 1 - p)):
            n = round(ROWS * count * share / total)
            example += [k] * n
            first_won += [won] * n
    k, first = torch.tensor(example), torch.tensor(first_won)
    a = torch.tensor([c[0] for c in COMPARISONS])[k]
    b = torch.tensor([c[1] for c in COMPARISONS])[k]
    return k, torch.where(first, a, b), torch.where(first, b, a), first


def train(form: str, steps: int, delta_lr: float = DELTA_LR, seed: int = 0):
    """``form``: 'dpo', 'auxdpo' (docs/methods.md section 5) or 'prefix' (the pre-fix ``+lambda_amp sum delta^2``).
    Returns the theta trajectory and the final offsets."""
    k, win, lose, first = annotations()
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    theta_ref = torch.zeros((), dtype=torch.float64)
    ref = log_pi(theta_ref)
    responses = torch.tensor([y for a, b, _ in COMPARISONS for y in (a, b)])  # delta[2k], delta[2k+1]
    g = torch.Generator().manual_seed(seed)
    delta_raw = (torch.randn(2 * len(COMPARISONS), generator=g, dtype=torch.float64) * 1e-3).requires_grad_(True)
    opt = torch.optim.Adam([{"params": [theta], "lr": THETA_LR}, {"params": [delta_raw], "lr": delta_lr}])
    path = []
    for _ in range(steps):
        lp = log_pi(theta)
        if form == "dpo":
            loss, _ = dpo_loss(lp[win], lp[lose], ref[win], ref[lose], beta=BETA)
        else:
            delta = torch.tanh(delta_raw)  # cap = 1
            d_first, d_second = delta[2 * k], delta[2 * k + 1]
            dw, dl = torch.where(first, d_first, d_second), torch.where(first, d_second, d_first)
            penalty = param_null_penalty(lambda: log_pi(theta_ref)[responses], [theta_ref], delta)
            if form == "auxdpo":
                loss, _ = auxdpo_loss(lp[win], lp[lose], ref[win], ref[lose], dw, dl, beta=BETA, null_penalty=penalty,
                                      lambda_null=1.0, lambda_amp=0.01)
            else:  # what fastpref computed before the fix: a penalty summed over rows
                loss, _ = auxdpo_loss(lp[win], lp[lose], ref[win], ref[lose], dw, dl, beta=BETA, null_penalty=penalty,
                                      lambda_null=1.0, lambda_amp=0.0)
                loss = loss + 0.01 * (dw.pow(2) + dl.pow(2)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        path.append(float(theta.detach()))
    return path, torch.tanh(delta_raw.detach())


def run() -> ClaimResult:
    dpo, _ = train("dpo", DPO_STEPS)
    aux, delta = train("auxdpo", AUX_STEPS)
    slow, _ = train("auxdpo", AUX_STEPS, delta_lr=POLICY_LR)
    prefix, _ = train("prefix", AUX_STEPS)
    final = {"dpo": dpo[-1], "auxdpo": aux[-1], "auxdpo_policy_lr": slow[-1], "prefix": prefix[-1]}
    passed = (0.85 < final["dpo"] < 0.97 and final["auxdpo"] < 0.0
              and abs(final["auxdpo_policy_lr"] - final["dpo"]) < 0.02 and final["prefix"] > 0.8)

    def plot(ax):
        ax.plot(range(1, DPO_STEPS + 1), dpo, label="DPO")
        ax.plot(range(1, AUX_STEPS + 1), aux, label="AuxDPO (delta lr 5e-3)")
        ax.plot(range(1, AUX_STEPS + 1), slow, "--", label="AuxDPO, delta at lr 5e-7")
        ax.plot(range(1, AUX_STEPS + 1), prefix, ":", label="pre-fix +lambda_amp sum delta^2")
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("theta (< 0: y2 preferred, the truth)")
        ax.set_title("AuxDPO Prop. 2: DPO reverses, AuxDPO keeps")
        ax.legend(fontsize=6)

    return ClaimResult(
        name="auxdpo-prop2", title="AuxDPO Prop. 2 reversal and its fix (seed 003)",
        paper="DPO: theta = +0.91 (y1 > y2, reversed); AuxDPO: theta < 0 (the true order y2 > y1)",
        fastpref=(f"DPO theta = {final['dpo']:+.3f}; AuxDPO theta = {final['auxdpo']:+.3f}; delta at lr 5e-7: "
                  f"{final['auxdpo_policy_lr']:+.3f}; pre-fix penalty: {final['prefix']:+.3f}"),
        passed=passed, details={"theta": final, "delta": delta.tolist()}, plot=plot)
