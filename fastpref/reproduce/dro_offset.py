"""DRO's offset ``log_z0`` (seed 001, "Direct Reward Optimization: A Point-wise Alignment Approach", Fig. 2(b)).

One prompt, four responses with explicit rewards ``R = (1, 0.5, -0.5, -1)`` among ``V = 1000`` possible responses; the
reference is uniform, the policy ``softmax(theta)`` starts there and is trained with Adam on
:func:`fastpref.losses.dro_loss` (``beta = 0.1``; the prompt log-ratio is 0: the toy has no prompt model) for each
``log_z0`` in 10..60 (the seed sweeps -50..500; its setting is 50). DRO regresses ``beta rho`` on
``R - beta log Z``, so once every target is reachable (``sum_y pi_ref e^{R/beta - log_z0} < 1``) the chosen
response's implicit reward ``beta rho`` falls with ``log_z0`` at slope ``-beta`` (the reading ``beta * log_z0`` of
the seed's offset; the other reading, ``+ log_z0``, would give slope -1).
"""

from __future__ import annotations

import torch

from ..losses.functional import dro_loss
from . import ClaimResult

REWARDS = (1.0, 0.5, -0.5, -1.0)
V, BETA = 1000, 0.1
LOG_Z0 = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
STEPS, LR = 400, 1.0


def train(log_z0: float) -> float:
    """The chosen (highest-reward) response's implicit reward ``beta (logp - ref_logp)`` after training."""
    R = torch.tensor(REWARDS, dtype=torch.float64)
    k = R.numel()
    ref = torch.full((V,), -torch.log(torch.tensor(float(V), dtype=torch.float64)))
    theta = torch.zeros(V, dtype=torch.float64, requires_grad=True)
    zeros, group = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.long)
    opt = torch.optim.Adam([theta], lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    for _ in range(STEPS):
        logp = torch.log_softmax(theta, 0)[:k]
        loss, _ = dro_loss(logp, ref[:k], zeros, zeros, R, group, beta=BETA, log_z0=log_z0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    logp = torch.log_softmax(theta.detach(), 0)[:k]
    return float(BETA * (logp[0] - ref[0]))


def run() -> ClaimResult:
    chosen = [train(z) for z in LOG_Z0]
    x = torch.tensor(LOG_Z0, dtype=torch.float64)
    y = torch.tensor(chosen, dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    target = [REWARDS[0] - BETA * z for z in LOG_Z0]
    residual = max(abs(a - b) for a, b in zip(chosen, target))
    passed = abs(slope + BETA) < 0.01 * BETA and residual < 1e-3

    def plot(ax):
        ax.plot(LOG_Z0, chosen, "o", label="fastpref (trained)")
        ax.plot(LOG_Z0, target, "-", lw=0.8, label=f"R_w - beta log_z0 (slope -{BETA:g})")
        ax.set_xlabel("log_z0")
        ax.set_ylabel("chosen reward beta * rho")
        ax.set_title(f"DRO offset: slope {slope:.4f} (paper: -beta = -{BETA:g})")
        ax.legend(fontsize=6)

    return ClaimResult(
        name="dro-offset", title="DRO's log_z0 offset (seed 001, Fig. 2(b))",
        paper=f"the chosen reward falls with log_z0 at slope -beta (= -{BETA:g})",
        fastpref=f"slope {slope:.5f} over log_z0 = {LOG_Z0[0]:g}..{LOG_Z0[-1]:g}; max |reward - target| {residual:.1e}",
        passed=passed, details={"log_z0": list(LOG_Z0), "chosen_reward": chosen, "slope": slope}, plot=plot)
