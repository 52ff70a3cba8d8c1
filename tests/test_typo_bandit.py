"""The TYPO seed's bandit experiment (seed 002, "New Desiderata for DPO", its Figure 2), with the functional losses.

Three responses; pairs drawn from ``pi_ref = (0.4, 0.4, 0.2)`` (ties dropped) and labeled by Bradley-Terry
preferences from ``pi* = (0.6, 0.3, 0.1)`` (``P(y > y') = pi*(y) / (pi*(y) + pi*(y'))``); TYPO's unsupervised rows
are further samples from ``pi_ref``.  The policy is ``pi_theta = softmax(theta)`` (started at ``pi_ref``) and the
losses see ``logps = log pi_theta`` of the sampled responses.  Full-batch Adam on a fixed sampled data set.

TYPO (``lam = 1e-5``) recovers ``pi*``: its pairwise term is the BT likelihood with ``log pi`` as the score, whose
minimizer on the simplex is ``pi*`` itself.  DPO and IPO, whose population optima are ``pi_ref * exp(score / beta)``-
shaped, put (almost) all the mass on the mode.  ``beta = 0.02`` for both (at 0.1 DPO already sits at 0.999 on the
mode and IPO at 0.81).
"""

from __future__ import annotations

import pytest
import torch

from fastpref.losses.functional import dpo_loss, typo_loss

PI_STAR = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
PI_REF = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)


def _dataset(n_pairs=5000, n_unsup=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.multinomial(PI_REF, n_pairs, replacement=True, generator=g)
    b = torch.multinomial(PI_REF, n_pairs, replacement=True, generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    a_wins = torch.rand(a.numel(), generator=g, dtype=torch.float64) < PI_STAR[a] / (PI_STAR[a] + PI_STAR[b])
    y_w, y_l = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    y_u = torch.multinomial(PI_REF, n_unsup, replacement=True, generator=g)
    return y_w, y_l, y_u


def _train(method, data, *, beta=0.02, steps=300, lr=0.05):
    y_w, y_l, y_u = data
    ref = PI_REF.log()
    ones = torch.ones(y_w.numel())
    theta = PI_REF.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        logp = torch.log_softmax(theta, dim=0)
        if method == "typo":
            loss, _ = typo_loss(logp[y_w], logp[y_l], logp[y_u], lam=1e-5)
        elif method == "dpo":
            loss, _ = dpo_loss(logp[y_w], logp[y_l], ref[y_w], ref[y_l], beta=beta)
        else:  # ipo: a response is one "token" here, lengths 1
            loss, _ = dpo_loss(logp[y_w], logp[y_l], ref[y_w], ref[y_l], beta=beta, loss_type="ipo",
                               chosen_lengths=ones, rejected_lengths=ones)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(theta.detach(), dim=0)


@pytest.fixture
def one_thread():
    """Thousands of tiny ops: intra-op threads only add synchronization (10x slower on a busy 2-core CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_typo_bandit_recovers_pi_star_dpo_ipo_collapse_to_mode(one_thread):
    torch.manual_seed(0)
    data = _dataset()
    pi_typo = _train("typo", data)
    assert (pi_typo - PI_STAR).abs().max() < 0.02, pi_typo
    for method in ("dpo", "ipo"):
        pi = _train(method, data)
        assert pi[0] > 0.99, (method, pi)  # the mode of pi*
        assert pi[1:].sum() < 0.01, (method, pi)
