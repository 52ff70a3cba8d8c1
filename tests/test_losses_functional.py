"""``fastpref.losses.functional`` against independent float64 transcriptions of docs/methods.md.

The references below are written from the formulas (loops over pairs / groups, naive float64 math) and share no
helper with the implementation.  Each test compares values and autograd gradients on fresh random inputs, in
float64 (tight) and float32 (fp32 rounding).  Then the identities docs/methods.md states, the existence conditions,
fp32 stability over log-probs from -1e5 to -1e-8, and input validation.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastpref.losses import functional as FL

F64 = torch.float64
TOL64 = dict(rtol=1e-10, atol=1e-12)
TOL32 = dict(rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------- float64 references
# Deliberately naive: log(1 + exp(x)), log(1 - exp(a)), explicit python loops.


def _sp(x):
    return torch.log(1 + torch.exp(x))


def _logsig(x):
    return -_sp(-x)


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def _f(x):
    return 0.5 * _sp(x) + 0.5 * _sp(-x)


def _mean(terms):
    return sum(terms) / len(terms)


def ref_dpo(cw, cl, rw, rl, *, beta, loss_type, ls=0.0, n_w=None, n_l=None, tau=0.05):
    B = len(cw)
    rho_w, rho_l = cw - rw, cl - rl
    if loss_type == "sft":
        return -cw.sum() / n_w.sum()
    if loss_type == "aot":
        x = torch.sort(cw - cl)[0] - torch.sort(rw - rl)[0]
        return _mean([-(1 - ls) * _logsig(beta * x[i]) - ls * _logsig(-beta * x[i]) for i in range(B)])
    if loss_type == "aot_unpaired":
        x = torch.sort(rho_w)[0] - torch.sort(rho_l)[0]
        return _mean([-(1 - ls) * _logsig(beta * x[i]) - ls * _logsig(-beta * x[i]) for i in range(B)])
    out = []
    for i in range(B):
        d = rho_w[i] - rho_l[i]
        a, b = beta * rho_w[i], beta * rho_l[i]
        z = beta * d
        if loss_type == "sigmoid":
            v = -_logsig(z)
        elif loss_type == "hinge":
            v = torch.clamp(1 - z, min=0)
        elif loss_type == "ipo":
            v = (rho_w[i] / n_w[i] - rho_l[i] / n_l[i] - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            v = _sig(z) * (_logsig(z) - math.log(1 - ls)) + _sig(-z) * (_logsig(-z) - math.log(ls))
        elif loss_type == "nca_pair":
            v = -_logsig(a) - 0.5 * _logsig(-a) - 0.5 * _logsig(-b)
        elif loss_type == "robust":
            v = (-(1 - ls) * _logsig(z) + ls * _logsig(-z)) / (1 - 2 * ls)
        elif loss_type == "bco_pair":
            v = -_logsig(a) - _logsig(-b)
        elif loss_type == "sppo_hard":
            v = (rho_w[i] - 1 / (2 * beta)) ** 2 + (rho_l[i] + 1 / (2 * beta)) ** 2
        elif loss_type == "apo_zero":
            v = 1 - _sig(a) + _sig(b)
        elif loss_type == "apo_down":
            v = _sig(a) + 1 - _sig(a - b)
        elif loss_type == "discopop":
            m = _sig(z / tau)
            v = (1 - m) * -_logsig(z) + m * torch.exp(-z)
        elif loss_type == "sigmoid_norm":
            v = -_logsig(beta * (rho_w[i] / n_w[i] - rho_l[i] / n_l[i]))
        else:
            raise AssertionError(loss_type)
        out.append(v)
    return _mean(out)


def ref_pro_group(lp, rlp, *, beta, alpha, eta, muhat_shat, exact):
    """(exact: 'log(1 - sum pi)' naively, valid away from a total probability of 1.)"""
    """One PRO group: - sum_k muhat_k shat_k r_k + alpha/2 sum_{i,j in labeled + h} nu_i nu_j f(r_i - r_j)."""
    K = len(lp)
    r = [beta * (lp[k] - rlp[k]) for k in range(K)]
    if exact:
        lse = torch.log(sum(torch.exp(x) for x in lp))
        rlse = torch.log(sum(torch.exp(x) for x in rlp))
        r_h = beta * (torch.log(1 - torch.exp(lse)) - torch.log(1 - torch.exp(rlse)))
    else:
        r_h = torch.zeros((), dtype=F64)
    rs = r + [r_h]
    nu = [(1 - eta) / K] * K + [eta]
    reg = sum(nu[i] * nu[j] * _f(rs[i] - rs[j]) for i in range(K + 1) for j in range(K + 1))
    return -sum(muhat_shat[k] * r[k] for k in range(K)) + alpha / 2 * reg


def ref_pro_pairwise(lp, rlp, *, beta, alpha, eta, exact):
    B = len(lp) // 2
    return _mean([
        4 * ref_pro_group([lp[i], lp[B + i]], [rlp[i], rlp[B + i]], beta=beta, alpha=alpha, eta=eta,
                          muhat_shat=[0.5 * 0.25, 0.5 * -0.25], exact=exact)
        for i in range(B)
    ])


def ref_pro_scalar(lp, rlp, R, gid, *, beta, alpha, eta, tau, exact, lam=2.0):
    """eta None: 1/(K+1) per group; alpha None: lam / (eta (1 - eta)) (PRO-S's defaults, docs/methods.md)."""
    out = []
    for g in sorted(set(gid.tolist())):
        idx = [i for i in range(len(gid)) if gid[i] == g]
        K = len(idx)
        e = 1 / (K + 1) if eta is None else eta
        a = lam / (e * (1 - e)) if alpha is None else alpha
        shat = [sum(_sig((R[k] - R[j]) / tau) for j in idx) / K - 0.5 for k in idx]
        out.append(ref_pro_group([lp[i] for i in idx], [rlp[i] for i in idx], beta=beta, alpha=a, eta=e,
                                 muhat_shat=[s / K for s in shat], exact=exact))
    return _mean(out)


def ref_pro_binary(lp, rlp, z, *, beta, lam, dw, uw, exact):
    out = []
    for i in range(len(lp)):
        r = beta * (lp[i] - rlp[i])
        r_h = beta * (torch.log(1 - torch.exp(lp[i])) - torch.log(1 - torch.exp(rlp[i]))) if exact else 0.0
        w = dw if z[i] else uw
        out.append(w * (-(float(z[i]) - 0.5) * r + lam * _f(r - r_h)))
    return _mean(out)


# -------------------------------------------------------------------------------------------------------- harness


def _logps(g, n, lo=2.0, hi=40.0):
    """Strictly negative, never zero."""
    return -(lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64))


def _check(impl, ref, inputs, grad_keys, dtype=F64):
    """impl(**inputs) -> (loss, metrics); ref(**inputs) -> loss (float64).  Compare values and gradients."""
    tol = TOL64 if dtype == F64 else TOL32
    x_ref = {k: (v.detach().clone().requires_grad_(k in grad_keys) if torch.is_tensor(v) and v.is_floating_point()
                 else v) for k, v in inputs.items()}
    x_imp = {k: (v.detach().to(dtype).clone().requires_grad_(k in grad_keys)
                 if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    want = ref(**x_ref)
    got, metrics = impl(**x_imp)
    assert got.dim() == 0 and got.dtype == (F64 if dtype == F64 else torch.float32)
    for k, m in metrics.items():
        assert torch.is_tensor(m) and m.dim() == 0 and not m.requires_grad, k
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    keys = sorted(grad_keys)
    g_want = torch.autograd.grad(want, [x_ref[k] for k in keys], allow_unused=True)
    g_got = torch.autograd.grad(got, [x_imp[k] for k in keys], allow_unused=True)
    for k, a, b in zip(keys, g_got, g_want):
        a = torch.zeros_like(x_ref[k]) if a is None else a.double()
        b = torch.zeros_like(x_ref[k]) if b is None else b
        torch.testing.assert_close(a, b, **tol, msg=lambda m, k=k: f"grad {k}: {m}")
    return metrics


DTYPES = pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])


# -------------------------------------------------------------------------------------------------------- log1mexp


def test_log1mexp_accuracy_and_gradient_fp32_range():
    a64 = -torch.logspace(-8, 5, 400, dtype=F64)
    a64 = torch.cat([a64, torch.tensor([-math.log(2) + 1e-7, -math.log(2), -math.log(2) - 1e-7], dtype=F64)])
    a32 = a64.float().requires_grad_(True)
    out = FL.log1mexp(a32)
    out.sum().backward()
    a_exact = a32.detach().double()  # the fp32 inputs, exactly
    mpmath = pytest.importorskip("mpmath")  # ships with torch (via sympy)
    mpmath.mp.dps = 50
    want = torch.tensor([float(mpmath.log(1 - mpmath.exp(v))) for v in a_exact.tolist()], dtype=F64)
    assert torch.isfinite(out).all() and torch.isfinite(a32.grad).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-37)
    dwant = torch.tensor([float(-1 / (mpmath.exp(-v) - 1)) for v in a_exact.tolist()], dtype=F64)
    torch.testing.assert_close(a32.grad.double(), dwant, rtol=1e-5, atol=1e-37)


def test_log1mexp_edge_values():
    assert FL.log1mexp(torch.tensor([0.0])).item() == float("-inf")
    with pytest.raises(TypeError, match="`a`"):
        FL.log1mexp(torch.tensor([-1]))


# -------------------------------------------------------------------------------------------------------- DPO family


@DTYPES
@pytest.mark.parametrize("loss_type", FL.DPO_LOSS_TYPES)
def test_dpo_loss_types_vs_reference(loss_type, dtype):
    g = torch.Generator().manual_seed(hash(loss_type) % 1000)
    B = 7
    cw, cl = _logps(g, B), _logps(g, B)
    rw, rl = cw + 2 * torch.randn(B, generator=g, dtype=F64), cl + 2 * torch.randn(B, generator=g, dtype=F64)
    n_w, n_l = torch.randint(1, 50, (B,), generator=g), torch.randint(1, 50, (B,), generator=g)
    ls = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)
    beta = 0.3

    def impl(cw, cl, rw, rl):
        return FL.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type=loss_type, label_smoothing=ls,
                           chosen_lengths=n_w, rejected_lengths=n_l)

    def ref(cw, cl, rw, rl):
        return ref_dpo(cw, cl, rw, rl, beta=beta, loss_type=loss_type, ls=ls, n_w=n_w.double(), n_l=n_l.double())

    metrics = _check(impl, ref, dict(cw=cw, cl=cl, rw=rw, rl=rl), {"cw", "cl"}, dtype)
    if dtype == F64:
        rew_w, rew_l = beta * (cw - rw), beta * (cl - rl)
        torch.testing.assert_close(metrics["rewards/chosen"], rew_w.mean())
        torch.testing.assert_close(metrics["rewards/margins"], (rew_w - rew_l).mean())
        torch.testing.assert_close(metrics["rewards/accuracies"], (rew_w > rew_l).double().mean())
        torch.testing.assert_close(metrics["logps/rejected"], cl.mean())


def test_dpo_upcasts_low_precision():
    g = torch.Generator().manual_seed(1)
    x = [_logps(g, 5).to(torch.bfloat16).requires_grad_(True) for _ in range(4)]
    loss, _ = FL.dpo_loss(*x)
    assert loss.dtype == torch.float32
    want = ref_dpo(*[t.detach().double() for t in x], beta=0.1, loss_type="sigmoid")
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert x[0].grad.dtype == torch.bfloat16


@DTYPES
def test_simpo_vs_reference(dtype):
    g = torch.Generator().manual_seed(2)
    B = 6
    n_w, n_l = torch.randint(1, 60, (B,), generator=g), torch.randint(1, 60, (B,), generator=g)
    beta, gamma = 2.0, 0.8

    def ref(cw, cl):
        return _mean([-_logsig(beta * (cw[i] / n_w[i] - cl[i] / n_l[i]) - gamma) for i in range(B)])

    def impl(cw, cl):
        return FL.simpo_loss(cw, cl, n_w, n_l, beta=beta, gamma=gamma)

    _check(impl, ref, dict(cw=_logps(g, B), cl=_logps(g, B)), {"cw", "cl"}, dtype)


@DTYPES
def test_distill_vs_reference(dtype):
    g = torch.Generator().manual_seed(3)
    B, beta = 6, 0.2
    inputs = dict(cw=_logps(g, B), cl=_logps(g, B), rw=_logps(g, B), rl=_logps(g, B),
                  Rw=torch.randn(B, generator=g, dtype=F64), Rl=torch.randn(B, generator=g, dtype=F64))

    def ref(cw, cl, rw, rl, Rw, Rl):
        return _mean([(Rw[i] - Rl[i] - beta * ((cw[i] - rw[i]) - (cl[i] - rl[i]))) ** 2 for i in range(B)])

    def impl(cw, cl, rw, rl, Rw, Rl):
        return FL.distill_loss(cw, cl, rw, rl, Rw, Rl, beta=beta)

    _check(impl, ref, inputs, {"cw", "cl"}, dtype)


@DTYPES
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_vs_reference(loss_type, dtype):
    g = torch.Generator().manual_seed(4)
    N, beta, dw, uw = 9, 0.2, 1.0, 1.5
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1])
    inputs = dict(lp=_logps(g, N), ref_lp=_logps(g, N), kl_p=_logps(g, N), kl_r=_logps(g, N))

    def ref(lp, ref_lp, kl_p, kl_r):
        kl = max(float((kl_p - kl_r).mean()), 0.0)
        out = []
        for i in range(N):
            rho = lp[i] - ref_lp[i]
            if loss_type == "kto":
                v = dw * (1 - _sig(beta * (rho - kl))) if labels[i] else uw * (1 - _sig(beta * (kl - rho)))
            else:
                v = dw * (1 - _sig(beta * rho)) if labels[i] else uw * _sig(beta * rho)
            out.append(v)
        return _mean(out)

    def impl(lp, ref_lp, kl_p, kl_r):
        kw = dict(kl_logps=kl_p, ref_kl_logps=kl_r) if loss_type == "kto" else {}
        return FL.kto_loss(lp, ref_lp, labels, beta=beta, desirable_weight=dw, undesirable_weight=uw,
                           loss_type=loss_type, **kw)

    _check(impl, ref, inputs, {"lp"}, dtype)


@DTYPES
@pytest.mark.parametrize("loss_type", ["nca", "infonca"])
def test_nca_scalar_vs_reference(loss_type, dtype):
    g = torch.Generator().manual_seed(5)
    gid = torch.tensor([3, 3, 3, 3, 1, 1, 7, 7, 7])  # K = 4, 2, 3
    N, beta, alpha = len(gid), 0.3, 0.5
    def ref(lp, ref_lp, R):
        out = []
        for grp in sorted(set(gid.tolist())):
            idx = [i for i in range(N) if gid[i] == grp]
            K = len(idx)
            z = sum(torch.exp(R[j] / alpha) for j in idx)
            q = [torch.exp(R[i] / alpha) / z for i in idx]
            r = [beta * (lp[i] - ref_lp[i]) for i in idx]
            if loss_type == "nca":
                v = -sum(_logsig(-x) for x in r) / K - sum(q[k] * _logsig(r[k]) for k in range(K))
            else:
                zr = sum(torch.exp(x) for x in r)
                v = -sum(q[k] * torch.log(torch.exp(r[k]) / zr) for k in range(K))
            out.append(v)
        return _mean(out)

    def impl(lp, ref_lp, R):
        return FL.nca_loss(lp, ref_lp, R, gid, beta=beta, alpha=alpha, loss_type=loss_type)

    inputs = dict(lp=_logps(g, N), ref_lp=_logps(g, N), R=torch.randn(N, generator=g, dtype=F64))
    _check(impl, ref, inputs, {"lp"}, dtype)


def test_nca_pairwise_is_trl_nca_pair_and_infonca_is_dpo():
    g = torch.Generator().manual_seed(6)
    cw, cl, rw, rl = (_logps(g, 5) for _ in range(4))
    lp, ref_lp = torch.cat([cw, cl]), torch.cat([rw, rl])
    torch.testing.assert_close(FL.nca_loss(lp, ref_lp, beta=0.2)[0],
                               FL.dpo_loss(cw, cl, rw, rl, beta=0.2, loss_type="nca_pair")[0])
    torch.testing.assert_close(FL.nca_loss(lp, ref_lp, beta=0.2, loss_type="infonca")[0],
                               FL.dpo_loss(cw, cl, rw, rl, beta=0.2)[0])


# ------------------------------------------------------------------------------------------------------------- PRO


@DTYPES
@pytest.mark.parametrize("hyper_response", ["exact", "zero"])
@pytest.mark.parametrize("eta,alpha", [(None, None), (0.1, None), (0.3, 2.5), (0.0, 1.0)])
def test_pro_pairwise_vs_reference(eta, alpha, hyper_response, dtype):
    g = torch.Generator().manual_seed(7)
    B, beta = 6, 0.5
    lp = _logps(g, 2 * B, lo=1.5, hi=6.0)  # high-probability responses: the hyper response matters
    ref_lp = _logps(g, 2 * B, lo=1.5, hi=6.0)
    e = 1 / 3 if eta is None else eta  # the seed's default: nu uniform over {y_w, y_l, h}
    a = 1 / (1 - e) ** 2 if alpha is None else alpha

    def ref(lp, ref_lp):
        return ref_pro_pairwise(lp, ref_lp, beta=beta, alpha=a, eta=e, exact=hyper_response == "exact")

    def impl(lp, ref_lp):
        return FL.pro_loss(lp, ref_lp, beta=beta, alpha=alpha, eta=eta, hyper_response=hyper_response,
                           require_optimum=eta != 0.0)

    metrics = _check(impl, ref, dict(lp=lp, ref_lp=ref_lp), {"lp"}, dtype)
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected", "rewards/hyper"}


@DTYPES
@pytest.mark.parametrize("hyper_response", ["exact", "zero"])
@pytest.mark.parametrize("eta,alpha,lam", [(0.2, 2.0, 2.0), (None, None, 2.0), (None, None, 0.7), (0.25, None, 3.0)])
def test_pro_scalar_vs_reference(hyper_response, eta, alpha, lam, dtype):
    g = torch.Generator().manual_seed(8)
    gid = torch.tensor([5, 2, 5, 2, 9, 9, 9, 5, 9, 5])  # interleaved groups, K = 4, 2, 4
    N, beta, tau = len(gid), 0.4, 0.7
    def ref(lp, ref_lp, R):
        return ref_pro_scalar(lp, ref_lp, R, gid, beta=beta, alpha=alpha, eta=eta, tau=tau, lam=lam,
                              exact=hyper_response == "exact")

    def impl(lp, ref_lp, R):
        return FL.pro_loss(lp, ref_lp, feedback="scalar", rewards=R, group_ids=gid, beta=beta, alpha=alpha,
                           eta=eta, tau=tau, lam=lam, hyper_response=hyper_response)

    inputs = dict(lp=_logps(g, N, lo=2.0, hi=6.0), ref_lp=_logps(g, N, lo=2.0, hi=6.0),
                  R=3 * torch.randn(N, generator=g, dtype=F64))
    _check(impl, ref, inputs, {"lp"}, dtype)


@DTYPES
@pytest.mark.parametrize("hyper_response", ["exact", "zero"])
def test_pro_binary_vs_reference(hyper_response, dtype):
    g = torch.Generator().manual_seed(9)
    z = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0])
    N, beta, lam, dw, uw = len(z), 0.5, 1.7, 1.0, 0.25

    def ref(lp, ref_lp):
        return ref_pro_binary(lp, ref_lp, z, beta=beta, lam=lam, dw=dw, uw=uw, exact=hyper_response == "exact")

    def impl(lp, ref_lp):
        return FL.pro_loss(lp, ref_lp, feedback="binary", labels=z, beta=beta, lam=lam, desirable_weight=dw,
                           undesirable_weight=uw, hyper_response=hyper_response)

    _check(impl, ref, dict(lp=_logps(g, N, lo=0.05, hi=4.0), ref_lp=_logps(g, N, lo=0.05, hi=4.0)), {"lp"}, dtype)


def test_pro_pairwise_eta0_alpha1_times4_is_dpo():
    """docs/methods.md: with eta = 0, alpha = 1, PRO-P x 4 has exactly DPO sigmoid's gradient (value: DPO + log 2)."""
    g = torch.Generator().manual_seed(10)
    B = 8
    for dtype in (F64, torch.float32):
        cw, cl = _logps(g, B).to(dtype), _logps(g, B).to(dtype)
        rw, rl = (cw + torch.randn(B, generator=g, dtype=F64).to(dtype)), (cl + torch.randn(B, generator=g, dtype=F64).to(dtype))
        for beta in (0.1, 1.0):
            lp = torch.cat([cw, cl]).requires_grad_(True)
            pro, _ = FL.pro_loss(lp, torch.cat([rw, rl]), beta=beta, eta=0.0, alpha=1.0, require_optimum=False)
            (g_pro,) = torch.autograd.grad(pro, lp)
            lp2 = torch.cat([cw, cl]).requires_grad_(True)
            dpo, _ = FL.dpo_loss(lp2[:B], lp2[B:], rw, rl, beta=beta)
            (g_dpo,) = torch.autograd.grad(dpo, lp2)
            tol = TOL64 if dtype == F64 else dict(rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g_pro, g_dpo, **tol)
            torch.testing.assert_close(pro, dpo + math.log(2), **tol)


def test_pro_exact_hyper_response_tends_to_zero_mode():
    g = torch.Generator().manual_seed(11)
    for feedback, extra in [("pairwise", {}), ("binary", {"labels": torch.tensor([1, 0, 1, 0, 0, 1])}),
                            ("scalar", {"rewards": torch.randn(6, generator=g, dtype=F64),
                                        "group_ids": torch.tensor([0, 0, 0, 1, 1, 1])})]:
        gaps = []
        for shift in (1.0, 10.0, 50.0):
            lp = (_logps(g, 6, lo=0.0, hi=2.0) - shift).requires_grad_(True)
            ref_lp = _logps(g, 6, lo=0.0, hi=2.0) - shift
            ex, m = FL.pro_loss(lp, ref_lp, feedback=feedback, hyper_response="exact", **extra)
            (g_ex,) = torch.autograd.grad(ex, lp)
            ze, _ = FL.pro_loss(lp, ref_lp, feedback=feedback, hyper_response="zero", **extra)
            (g_ze,) = torch.autograd.grad(ze, lp)
            gaps.append((abs(float((ex - ze).detach())), float((g_ex - g_ze).abs().max()),
                         abs(float(m["rewards/hyper"]))))
        assert gaps[0][0] > 1e-6 and gaps[0][1] > 1e-6, (feedback, gaps)  # near the top of the simplex the modes differ ...
        assert gaps[0] > gaps[1] > gaps[2], (feedback, gaps)  # ... and the gap shrinks as log-probs fall
        assert max(gaps[2]) < 1e-15, (feedback, gaps)  # at logps ~ -50, r_h ~ e^-50


def test_pro_existence_conditions():
    """docs/methods.md: PRO-P has an optimum iff alpha (1 - eta^2) > 1 (the seed's alpha (1 - eta)^2 >= 1 is only
    sufficient); PRO-S iff alpha (1 - eta)(K - 1 + eta) > K - 1; PRO-B iff lam > 1."""
    g = torch.Generator().manual_seed(12)
    lp, ref_lp = _logps(g, 8), _logps(g, 8)
    FL.pro_loss(lp, ref_lp)  # defaults eta = 1/3, alpha = 2.25: alpha (1 - eta^2) = 2
    for eta, alpha in [(0.2, 1.1), (1 / 3, 1.2), (0.2, 1 / 0.64), (0.5, None)]:  # optima the old check refused
        FL.pro_loss(lp, ref_lp, eta=eta, alpha=alpha)
    for eta, alpha in [(0.0, 1.0), (0.0, 0.99), (0.5, 1.3), (0.2, 1 / 0.96)]:
        with pytest.raises(ValueError, match="no optimum"):
            FL.pro_loss(lp, ref_lp, eta=eta, alpha=alpha)
    FL.pro_loss(lp, ref_lp, eta=0.0, alpha=1.0, require_optimum=False)  # the DPO identity's explicit opt-out
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])  # K = 2, 2, 4
    R = torch.randn(8, dtype=F64)
    FL.pro_loss(lp, ref_lp, feedback="scalar", rewards=R, group_ids=gid)  # eta = 1/(K+1), alpha from lam = 2
    FL.pro_loss(lp, ref_lp, feedback="scalar", rewards=R, group_ids=gid, lam=0.26)  # > (K-1)/K^2: 1/4 at K=2
    FL.pro_loss(lp, ref_lp, feedback="scalar", rewards=R, group_ids=torch.tensor([0] * 4 + [1] * 4),
                lam=0.19)  # K = 4 only: (K-1)/K^2 = 3/16
    with pytest.raises(ValueError, match="no optimum for group 0 \\(K=2\\)"):
        FL.pro_loss(lp, ref_lp, feedback="scalar", rewards=R, group_ids=gid, lam=0.25)  # = (K-1)/K^2 at K=2
    # K=4: alpha (1 - eta)(3 + eta) > 3; at eta = 0.2: alpha > 3 / (0.8 * 3.2) = 1.171875
    FL.pro_loss(lp, ref_lp, feedback="scalar", rewards=R, group_ids=gid, eta=0.2, alpha=1.18)
    with pytest.raises(ValueError, match="no optimum for group 2 \\(K=4\\)"):
        FL.pro_loss(lp, ref_lp, feedback="scalar", rewards=R, group_ids=gid, eta=0.2, alpha=1.17)
    with pytest.raises(ValueError, match="`eta`"):
        FL.pro_loss(lp, ref_lp, eta=1.0)
    labels = torch.tensor([1, 0] * 4)
    FL.pro_loss(lp, ref_lp, feedback="binary", labels=labels)  # default lam = 2 > 1
    FL.pro_loss(lp, ref_lp, feedback="binary", labels=labels, lam=1.001)
    for lam in (1.0, 0.5, -2.0):
        with pytest.raises(ValueError, match="`lam` must be > 1|`lam` must be > 0"):
            FL.pro_loss(lp, ref_lp, feedback="binary", labels=labels, lam=lam)


def _pro_p_slope(eta, alpha, t):
    """d(4 L)/d|r_l| of one PRO-P group (exact hyper response) at r_l = -t, by autograd in float64."""
    lp = torch.tensor([-0.5, -0.7 - t], dtype=F64, requires_grad=True)
    loss, _ = FL.pro_loss(lp, torch.tensor([-0.7, -0.7], dtype=F64), beta=1.0, eta=eta, alpha=alpha,
                          require_optimum=False)
    (grad,) = torch.autograd.grad(loss, lp)
    return -float(grad[1])


def test_pro_pairwise_asymptotic_slope_is_the_existence_condition():
    """The slope of 4 L as the rejected response's probability goes to 0 is (alpha (1 - eta^2) - 1) / 2."""
    for eta, alpha in [(0.2, 1.1), (1 / 3, 1.2), (0.0, 1.0), (0.1, 0.9), (1 / 3, 2.25)]:
        slope = _pro_p_slope(eta, alpha, 200.0)
        assert slope == pytest.approx((alpha * (1 - eta**2) - 1) / 2, abs=1e-12), (eta, alpha)


def test_pro_pairwise_default_is_dpo_plus_proximal_term():
    """eta = 1/3, alpha = 1/(1-eta)^2: 4 PRO-P = DPO + f(r_w - r_h) + f(r_l - r_h) + const (c = 2 eta/(1-eta) = 1)."""
    g = torch.Generator().manual_seed(31)
    B, beta = 5, 0.3
    cw, cl, rw, rl = (_logps(g, B, lo=0.5, hi=5.0) for _ in range(4))
    lp = torch.cat([cw, cl])
    pro, _ = FL.pro_loss(lp, torch.cat([rw, rl]), beta=beta)
    dpo, _ = FL.dpo_loss(cw, cl, rw, rl, beta=beta)
    r_w, r_l = beta * (cw - rw), beta * (cl - rl)
    r_h = beta * (torch.log(1 - torch.exp(cw) - torch.exp(cl)) - torch.log(1 - torch.exp(rw) - torch.exp(rl)))
    alpha, eta, nu = 2.25, 1 / 3, 1 / 3
    const = 2 * alpha * (2 * nu**2 + eta**2) * math.log(2)  # 4 * alpha/2 * the diagonal f(0) terms
    want = dpo + (_f(r_w - r_h) + _f(r_l - r_h)).mean() + const
    torch.testing.assert_close(pro, want, **TOL64)


def test_pro_log_prob_of_zero_or_subnormal_is_finite_and_continuous():
    """Issue 9: a log-prob of exactly 0 (or -1e-40) must not stop PRO 'exact': finite loss and gradient, and the
    function is continuous into that region (safe_log1mexp's linear continuation above -2^-24)."""
    for dtype in (F64, torch.float32):
        for c0 in (0.0, -1e-40, -1e-9, -3e-8):
            lp = torch.tensor([c0, -0.3, -30.0, -40.0], dtype=dtype, requires_grad=True)  # pairs (c0, -30), (-0.3, -40)
            ref = torch.tensor([-0.1, -0.2, -3.0, -4.0], dtype=dtype)
            for feedback, extra in [("pairwise", {}), ("binary", {"labels": torch.tensor([1, 1, 0, 0])}),
                                    ("scalar", {"rewards": torch.tensor([1.0, 0.5, -1.0, 0.0], dtype=dtype),
                                                "group_ids": torch.tensor([0, 1, 0, 1])})]:
                loss, m = FL.pro_loss(lp, ref, feedback=feedback, **extra)
                (grad,) = torch.autograd.grad(loss, lp)
                assert torch.isfinite(loss) and torch.isfinite(grad).all(), (dtype, c0, feedback, loss, grad)
                assert torch.isfinite(m["logps/hyper"]) and float(m["logps/hyper"]) >= -18.0
    # continuity at the switch point -2^-24 (value and slope)
    eps = 2.0**-24
    vals = []
    for c0 in (-eps * (1 + 1e-9), -eps * (1 - 1e-9)):
        lp = torch.tensor([c0, -30.0], dtype=F64, requires_grad=True)
        loss, _ = FL.pro_loss(lp, torch.tensor([-0.1, -30.0], dtype=F64))
        vals.append((float(loss.detach()), float(torch.autograd.grad(loss, lp)[0][0])))
    assert vals[0][0] == pytest.approx(vals[1][0], rel=1e-9) and vals[0][1] == pytest.approx(vals[1][1], rel=1e-6)


def test_pro_group_mass_above_one_still_raises():
    with pytest.raises(ValueError, match="total probability"):
        FL.pro_loss(torch.tensor([-0.1, -0.2]), torch.tensor([-3.0, -3.0]))
    with pytest.raises(ValueError, match="logps.*<= 0"):
        FL.pro_loss(torch.tensor([1e-3, -5.0]), torch.tensor([-3.0, -3.0]))
    # rounding: a chosen log-prob of 0 with a rejected one of -20 is total probability 1 + 2e-9: accepted
    loss, _ = FL.pro_loss(torch.tensor([0.0, -20.0]), torch.tensor([-3.0, -3.0]))
    assert torch.isfinite(loss)


def test_pro_binary_stationary_point():
    """PRO-B's stationary point: sigma(r_y - r_h) = 1/2 + (z - 1/2)/lam (docs/methods.md), zero hyper mode."""
    lam, beta = 1.6, 1.0
    for z, target in [(1, 0.5 + 0.5 / lam), (0, 0.5 - 0.5 / lam)]:
        x = torch.tensor([math.log(target / (1 - target))], dtype=F64)  # r = logit(target) with ref 0
        lp = (x - 3.0).requires_grad_(True)
        loss, _ = FL.pro_loss(lp, torch.tensor([-3.0], dtype=F64), feedback="binary", labels=torch.tensor([z]),
                              beta=beta, lam=lam, hyper_response="zero")
        (grad,) = torch.autograd.grad(loss, lp)
        assert abs(float(grad)) < 1e-12


def test_pro_binary_stationary_point_exact_hyper_response():
    """With the exact hyper response the stationary point is sigma(r_y - r_h) = 1/2 + (1 - pi_y)(z - 1/2)/lam."""
    lam, beta, ref = 1.6, 0.7, torch.tensor([-1.2], dtype=F64)
    for z in (1, 0):
        def grad_at(logp):
            lp = torch.tensor([logp], dtype=F64, requires_grad=True)
            loss, _ = FL.pro_loss(lp, ref, feedback="binary", labels=torch.tensor([z]), beta=beta, lam=lam)
            return float(torch.autograd.grad(loss, lp)[0])

        lo, hi = -30.0, -1e-6  # bisection on the gradient (monotone here)
        for _ in range(200):
            mid = (lo + hi) / 2
            if (grad_at(mid) > 0) == (grad_at(lo) > 0):
                lo = mid
            else:
                hi = mid
        lp = torch.tensor(lo, dtype=F64)
        pi = torch.exp(lp)
        x = beta * (lp - ref[0]) - beta * (torch.log1p(-pi) - torch.log1p(-torch.exp(ref[0])))
        assert float(torch.sigmoid(x)) == pytest.approx(0.5 + float(1 - pi) * (z - 0.5) / lam, abs=1e-9)
        assert float(torch.sigmoid(x)) != pytest.approx(0.5 + (z - 0.5) / lam, abs=1e-3)  # not the 'zero' point


# ------------------------------------------------------------------------------------------- DRO, TYPO, AuxDPO, DRDO


@DTYPES
def test_dro_vs_reference(dtype):
    g = torch.Generator().manual_seed(13)
    gid = torch.tensor([4, 4, 1, 4, 8, 1, 1, 1])  # K = 3, 4, 1
    N, beta, log_z0 = len(gid), 0.3, 2.5
    inputs = dict(lp=_logps(g, N), ref_lp=_logps(g, N), plp=_logps(g, N), rplp=_logps(g, N),
                  R=torch.randn(N, generator=g, dtype=F64))

    def ref(lp, ref_lp, plp, rplp, R):
        out = []
        for grp in sorted(set(gid.tolist())):
            idx = [i for i in range(N) if gid[i] == grp]
            terms = []
            for i in idx:
                blogz = (beta * (plp[i] - rplp[i])).detach() + beta * log_z0
                terms.append((R[i] - beta * (lp[i] - ref_lp[i]) - blogz) ** 2)
            out.append(_mean(terms))
        return _mean(out)

    def impl(lp, ref_lp, plp, rplp, R):
        return FL.dro_loss(lp, ref_lp, plp, rplp, R, gid, beta=beta, log_z0=log_z0)

    # the prompt term is detached: its gradient must be zero
    _check(impl, ref, inputs, {"lp", "plp", "rplp"}, dtype)


@DTYPES
def test_typo_vs_reference(dtype):
    g = torch.Generator().manual_seed(14)
    B, U, lam = 6, 5, 0.05

    def ref(cw, cl, cu):
        return _mean([_sp(cl[i] - cw[i]) for i in range(B)]) + lam * _mean([-cu[j] for j in range(U)])

    def impl(cw, cl, cu):
        return FL.typo_loss(cw, cl, cu, lam=lam)

    _check(impl, ref, dict(cw=_logps(g, B), cl=_logps(g, B), cu=_logps(g, U)), {"cw", "cl", "cu"}, dtype)


@DTYPES
@pytest.mark.parametrize("with_null", [True, False])
def test_auxdpo_vs_reference(with_null, dtype):
    g = torch.Generator().manual_seed(15)
    B, beta, lnull, lamp = 6, 0.2, 0.7, 0.05
    inputs = dict(cw=_logps(g, B), cl=_logps(g, B), rw=_logps(g, B), rl=_logps(g, B),
                  dw=torch.randn(B, generator=g, dtype=F64), dl=torch.randn(B, generator=g, dtype=F64),
                  pen=torch.rand((), generator=g, dtype=F64) + 0.1)

    def ref(cw, cl, rw, rl, dw, dl, pen):
        dpo = _mean([-_logsig(beta * ((cw[i] - rw[i]) - (cl[i] - rl[i]) + dw[i] - dl[i])) for i in range(B)])
        amp = _mean([dw[i] ** 2 for i in range(B)]) + _mean([dl[i] ** 2 for i in range(B)])
        return dpo + (lnull * pen if with_null else 0.0) - lamp / 2 * amp  # anti-collapse (docs/methods.md section 5)

    def impl(cw, cl, rw, rl, dw, dl, pen):
        return FL.auxdpo_loss(cw, cl, rw, rl, dw, dl, beta=beta, null_penalty=pen if with_null else None,
                              lambda_null=lnull, lambda_amp=lamp)

    _check(impl, ref, inputs, {"cw", "cl", "dw", "dl", "pen"}, dtype)


@DTYPES
@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.5])
def test_drdo_vs_reference(gamma, dtype):
    g = torch.Generator().manual_seed(16)
    B, alpha = 7, 0.3
    inputs = dict(cw=_logps(g, B, lo=0.05, hi=8.0), cl=_logps(g, B, lo=0.05, hi=8.0),
                  hw=torch.randn(B, generator=g, dtype=F64), hl=torch.randn(B, generator=g, dtype=F64),
                  ow=torch.randn(B, generator=g, dtype=F64), ol=torch.randn(B, generator=g, dtype=F64))

    def ref(cw, cl, hw, hl, ow, ol):
        out = []
        for i in range(B):
            p_w = _sig(cw[i] - cl[i])
            focal = (1 - p_w) ** gamma  # not detached
            out.append((ow[i] - ol[i] - (hw[i] - hl[i])) ** 2
                       - alpha * focal * (cw[i] - torch.log(1 - torch.exp(cl[i]))))
        return _mean(out)

    def impl(cw, cl, hw, hl, ow, ol):
        return FL.drdo_loss(cw, cl, hw, hl, ow, ol, alpha=alpha, gamma=gamma)

    _check(impl, ref, inputs, {"cw", "cl", "hw", "hl"}, dtype)


@DTYPES
def test_drdo_oracle_vs_reference(dtype):
    g = torch.Generator().manual_seed(17)
    B, a = 6, 0.25

    def ref(rw, rl, cw):
        return _mean([-((1 - a) * _logsig(rw[i] - rl[i]) + a * cw[i]) for i in range(B)])

    def impl(rw, rl, cw):
        return FL.drdo_oracle_loss(rw, rl, cw, a=a)

    inputs = dict(rw=torch.randn(B, generator=g, dtype=F64), rl=torch.randn(B, generator=g, dtype=F64),
                  cw=_logps(g, B))
    _check(impl, ref, inputs, {"rw", "rl", "cw"}, dtype)


# ------------------------------------------------------------------------------------------------ fp32 stability


def _extreme_pairs():
    """Chosen log-probs from -1e-8 to -1e5; each rejected one leaves the pair's total probability < 1."""
    cw = -torch.logspace(-8, 5, 27, dtype=F64)
    cl = torch.clamp(torch.log(-torch.expm1(cw)) - 1.0, min=-1e5)  # log((1 - p_w) / e)
    return cw, cl


def test_fp32_stability_extreme_logps():
    cw, cl = _extreme_pairs()
    rw, rl = cl.flip(0), cw.flip(0)  # reference: the pairs reversed (still valid groups)
    lp64, ref64 = torch.cat([cw, cl]), torch.cat([rw, rl])
    cases = {
        "pro_pairwise": lambda lp, ref: FL.pro_loss(lp, ref, beta=0.1),
        "pro_binary": lambda lp, ref: FL.pro_loss(lp, ref, feedback="binary",
                                                  labels=torch.arange(lp.numel()) % 2, beta=0.1),
        "pro_scalar": lambda lp, ref: FL.pro_loss(lp, ref, feedback="scalar", rewards=torch.linspace(-1, 1, lp.numel()),
                                                  group_ids=torch.arange(lp.numel()) % 27, beta=0.1),
        "drdo": lambda lp, ref: FL.drdo_loss(lp[:27], lp[27:], ref[:27] * 0 + 0.5, ref[27:] * 0 - 0.5,
                                             ref[:27] * 0 + 1.0, ref[27:] * 0),
        "dpo": lambda lp, ref: FL.dpo_loss(lp[:27], lp[27:], ref[:27], ref[27:], beta=1e-4),
        "typo": lambda lp, ref: FL.typo_loss(lp[:27], lp[27:], ref[:27]),
    }
    for name, fn in cases.items():
        lp32 = lp64.float().requires_grad_(True)
        loss32, _ = fn(lp32, ref64.float())
        (g32,) = torch.autograd.grad(loss32, lp32)
        lp = lp32.detach().double().requires_grad_(True)  # the same (fp32-representable) inputs in float64
        loss64, _ = fn(lp, ref64.float().double())
        (g64,) = torch.autograd.grad(loss64, lp)
        assert torch.isfinite(loss32) and torch.isfinite(g32).all(), name
        torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------------------- bad inputs


def _t(*v):
    return torch.tensor(v, dtype=torch.float32)


LP = _t(-1.0, -2.0, -3.0)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: FL.dpo_loss(LP, _t(-1, -2), LP, LP), ValueError, "rejected_logps"),
        (lambda: FL.dpo_loss(LP[None], LP[None], LP[None], LP[None]), ValueError, "1-D"),
        (lambda: FL.dpo_loss(torch.tensor([-1, -2]), _t(-1, -2), _t(-1, -2), _t(-1, -2)), TypeError, "floating"),
        (lambda: FL.dpo_loss([-1.0], LP, LP, LP), TypeError, "chosen_logps"),
        (lambda: FL.dpo_loss(_t(), _t(), _t(), _t()), ValueError, "empty"),
        (lambda: FL.dpo_loss(LP, LP, LP, _t(-1, float("nan"), -3)), ValueError, "ref_rejected_logps.*non-finite"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="dpo"), ValueError, "unknown loss_type"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="ipo"), ValueError, "chosen_lengths"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="sft"), ValueError, "chosen_lengths"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="ipo", chosen_lengths=torch.tensor([1, 0, 2]),
                             rejected_lengths=torch.tensor([1, 1, 1])), ValueError, "chosen_lengths.*positive"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="ipo", chosen_lengths=torch.tensor([1, 2]),
                             rejected_lengths=torch.tensor([1, 1, 1])), ValueError, "chosen_lengths"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="exo_pair"), ValueError, "label_smoothing"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, beta=0.0), ValueError, "beta"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="bco_pair", f_divergence_type="forward_kl"), ValueError,
         "f_divergence_type"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError,
         "loss_weights"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, loss_type="aot", wpo_weights=LP.exp()), ValueError, "wpo_weights"),
        (lambda: FL.simpo_loss(LP, LP, torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]), gamma=-0.1), ValueError,
         "gamma"),
        (lambda: FL.simpo_loss(LP, LP, torch.tensor([1, 2, 3]), torch.tensor([True, True, True])), TypeError,
         "rejected_lengths"),
        (lambda: FL.distill_loss(LP, LP, LP, LP, LP, _t(1.0)), ValueError, "rejected_rewards"),
        (lambda: FL.kto_loss(LP, LP, torch.tensor([1, 0, 1])), ValueError, "kl"),
        (lambda: FL.kto_loss(LP, LP, torch.tensor([1, 2, 1]), kl=0.0), ValueError, "labels"),
        (lambda: FL.kto_loss(LP, LP, torch.tensor([1, 0, 1]), kl=torch.tensor([0.1, 0.2])), ValueError, "kl"),
        (lambda: FL.nca_loss(LP, LP), ValueError, "even"),
        (lambda: FL.nca_loss(LP, LP, rewards=LP), ValueError, "group_ids"),
        (lambda: FL.nca_loss(LP, LP, rewards=LP, group_ids=torch.tensor([0, 0, 1])), ValueError, "at least 2"),
        (lambda: FL.pro_loss(LP, LP), ValueError, "even number of rows"),
        (lambda: FL.pro_loss(LP, LP, feedback="listwise"), ValueError, "unknown feedback"),
        (lambda: FL.pro_loss(LP[:2], LP[:2], hyper_response="approx"), ValueError, "unknown hyper_response"),
        (lambda: FL.pro_loss(LP, LP, feedback="scalar", rewards=LP, group_ids=torch.tensor([0, 0, 1])),
         ValueError, "at least 2"),
        (lambda: FL.pro_loss(LP, LP, feedback="scalar", rewards=LP, group_ids=_t(0, 0, 0)), TypeError, "group_ids"),
        (lambda: FL.pro_loss(LP, LP, feedback="scalar", group_ids=torch.tensor([0, 0, 0])), ValueError, "rewards"),
        (lambda: FL.pro_loss(LP, LP, feedback="binary"), ValueError, "labels"),
        (lambda: FL.pro_loss(LP, LP, feedback="binary", labels=torch.tensor([1, 0, -1])), ValueError, "labels"),
        (lambda: FL.pro_loss(LP, LP, feedback="binary", labels=torch.tensor([1, 0, 1]), lam=1.0), ValueError, "lam"),
        (lambda: FL.pro_loss(_t(-1, 0.5, -2), LP, feedback="binary", labels=torch.tensor([1, 0, 1])), ValueError,
         "logps.*<= 0"),
        (lambda: FL.pro_loss(_t(-0.1, -0.2), _t(-3, -3)), ValueError, "logps.*total probability"),
        (lambda: FL.pro_loss(_t(-3, -3), _t(-1e-3, -3)), ValueError, "ref_logps.*total probability"),
        (lambda: FL.pro_loss(_t(-3, -3), _t(-3, -3), eta=0.5, alpha=1.0), ValueError, "no optimum"),
        (lambda: FL.pro_loss(LP[:2], LP[:2], labels=torch.tensor([1, 0])), ValueError, "labels"),
        (lambda: FL.dro_loss(LP, LP, LP, LP, LP, torch.tensor([0, 0]), beta=0.1, log_z0=0.0), ValueError,
         "group_ids"),
        (lambda: FL.dro_loss(LP, LP, LP, LP, LP, torch.tensor([0, 0, 1]), beta=-1.0, log_z0=0.0), ValueError,
         "beta"),
        (lambda: FL.typo_loss(LP, LP, _t()), ValueError, "unsup_logps.*empty"),
        (lambda: FL.typo_loss(LP, LP, LP, lam=-0.1), ValueError, "lam"),
        (lambda: FL.auxdpo_loss(LP, LP, LP, LP, LP, _t(0.0, 1.0), beta=0.1), ValueError, "delta_rejected"),
        (lambda: FL.auxdpo_loss(LP, LP, LP, LP, LP, LP, beta=0.1, null_penalty=_t(-1.0)), ValueError, "null_penalty"),
        (lambda: FL.auxdpo_loss(LP, LP, LP, LP, LP, LP, beta=0.1, null_penalty=LP), ValueError, "null_penalty"),
        (lambda: FL.drdo_loss(LP, LP, LP, LP, LP, LP, gamma=-1.0), ValueError, "gamma"),
        (lambda: FL.drdo_loss(LP, _t(-1, 0.5, -2), LP, LP, LP, LP), ValueError, "rejected_logps.*<= 0"),
        (lambda: FL.dpo_loss(LP, LP, LP, LP, wpo_weights=_t(1.0, -0.5, 1.0)), ValueError, "wpo_weights.*>= 0"),
        (lambda: FL.drdo_oracle_loss(LP, LP, LP, a=1.5), ValueError, "`a`"),
    ],
)
def test_bad_inputs_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_discopop_is_finite_where_the_exponential_term_overflows():
    """Issue 9: at beta * margin = -90, DiscoPOP is softplus(90) = 90 (its e^-z term is e^90 * sigma(-1800) ~ e^-1710);
    TRL's expression gives NaN (inf * 0).  Gradient: -sigma(90) * beta per unit of margin."""
    for dtype in (torch.float32, F64):
        cw = torch.tensor([-100.0, -10.0], dtype=dtype, requires_grad=True)
        zeros = torch.zeros(2, dtype=dtype)
        cl = torch.tensor([-10.0, -12.0], dtype=dtype)
        loss, _ = FL.dpo_loss(cw, cl, zeros, zeros, beta=1.0, loss_type="discopop")  # z = -90 and z = 2
        (g,) = torch.autograd.grad(loss, cw)
        z2 = torch.tensor(2.0, dtype=F64)
        m2 = torch.sigmoid(z2 / 0.05)
        want = (90.0 + float(-(1 - m2) * torch.nn.functional.logsigmoid(z2) + m2 * torch.exp(-z2))) / 2
        assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
        assert torch.isfinite(g).all() and float(g[0]) == pytest.approx(-0.5, rel=1e-6)


def test_f_divergence_scores_beyond_float32_raise_with_the_reason():
    """Issue 9: forward_kl's 1 - e^{-rho} exceeds fp32 for rho < -88.7: documented ValueError, not inf/NaN;
    float64 inputs are finite there; alpha_divergence's clamped exponent keeps it finite (TRL's clamp)."""
    cw, cl = torch.tensor([-100.0, -5.0]), torch.tensor([-3.0, -6.0])
    rw = rl = torch.zeros(2)
    with pytest.raises(ValueError, match="forward_kl.*100.*float64"):
        FL.dpo_loss(cw, cl, rw, rl, f_divergence_type="forward_kl")
    loss64, _ = FL.dpo_loss(cw.double(), cl.double(), rw.double(), rl.double(), f_divergence_type="forward_kl")
    assert torch.isfinite(loss64)
    ok, _ = FL.dpo_loss(torch.tensor([-80.0, -5.0]), cl, rw, rl, f_divergence_type="forward_kl")  # in range
    assert torch.isfinite(ok)
    loss, _ = FL.dpo_loss(torch.tensor([-1000.0, -5.0]), cl, rw, rl, f_divergence_type="alpha_divergence")
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="alpha_divergence"):
        FL.dpo_loss(torch.tensor([-1e6, -5.0]), cl, rw, rl, f_divergence_type="alpha_divergence",
                    f_alpha_divergence_coef=1 - 1e-4)  # e^80 / 1e-4 > 3.4e38


def test_infonca_groups_of_different_sizes_give_finite_reward_gradients():
    """Issue 9: the -inf padding of smaller groups made 0 * -inf = NaN in the gradient to `rewards`."""
    g = torch.Generator().manual_seed(42)
    gid = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    lp, ref = _logps(g, 9), _logps(g, 9)
    R = torch.randn(9, generator=g, dtype=F64).requires_grad_(True)
    lp_ = lp.clone().requires_grad_(True)
    loss, _ = FL.nca_loss(lp_, ref, R, gid, loss_type="infonca", alpha=0.5)
    g_lp, g_R = torch.autograd.grad(loss, [lp_, R])
    assert torch.isfinite(g_R).all() and torch.isfinite(g_lp).all()
    # against a per-group float64 reference
    R2, lp2 = R.detach().clone().requires_grad_(True), lp.clone().requires_grad_(True)
    terms = []
    for k in range(3):
        idx = (gid == k).nonzero().squeeze(1)
        q = torch.softmax(R2[idx] / 0.5, 0)
        terms.append(-(q * torch.log_softmax(0.1 * (lp2[idx] - ref[idx]), 0)).sum())
    want = sum(terms) / 3
    w_lp, w_R = torch.autograd.grad(want, [lp2, R2])
    torch.testing.assert_close(loss, want, **TOL64)
    torch.testing.assert_close(g_R, w_R, **TOL64)
    torch.testing.assert_close(g_lp, w_lp, **TOL64)


def test_drdo_oracle_rewards_are_detached_and_log_prob_zero_is_finite():
    g = torch.Generator().manual_seed(43)
    B = 4
    cw, cl = _logps(g, B).requires_grad_(True), _logps(g, B)
    cl[0] = 0.0  # a rejected response the model is certain of (rounded to exactly 0)
    cl[1] = -1e-40
    cl.requires_grad_(True)
    hw, hl = torch.randn(B, dtype=F64, requires_grad=True), torch.randn(B, dtype=F64, requires_grad=True)
    ow, ol = torch.randn(B, dtype=F64, requires_grad=True), torch.randn(B, dtype=F64, requires_grad=True)
    loss, _ = FL.drdo_loss(cw, cl, hw, hl, ow, ol)
    grads = torch.autograd.grad(loss, [cw, cl, hw, hl, ow, ol], allow_unused=True)
    assert grads[4] is None and grads[5] is None  # oracle rewards are data
    assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in grads[:4])


def test_drdo_oracle_default_a_is_the_seeds():
    import inspect
    assert inspect.signature(FL.drdo_oracle_loss).parameters["a"].default == 0.01


def test_auxdpo_amplitude_term_is_anti_collapse_and_a_batch_mean():
    """docs/methods.md section 5: -lambda_amp/2 (mean delta_w^2 + mean delta_l^2): its gradient pushes delta away from 0,
    and duplicating the batch changes nothing (a mean, not a sum over rows)."""
    g = torch.Generator().manual_seed(44)
    B = 5
    cw, cl, rw, rl = (_logps(g, B) for _ in range(4))
    dw = (0.1 * torch.randn(B, generator=g, dtype=F64)).requires_grad_(True)
    dl = (0.1 * torch.randn(B, generator=g, dtype=F64)).requires_grad_(True)
    lamp = 0.5
    full, _ = FL.auxdpo_loss(cw, cl, rw, rl, dw, dl, beta=0.1, lambda_amp=lamp)
    base, _ = FL.auxdpo_loss(cw, cl, rw, rl, dw, dl, beta=0.1, lambda_amp=0.0)
    gw, gl = torch.autograd.grad(full - base, [dw, dl])
    torch.testing.assert_close(gw, -lamp * dw.detach() / B, **TOL64)  # d/d delta of -lamp/2 mean(delta^2)
    torch.testing.assert_close(gl, -lamp * dl.detach() / B, **TOL64)
    two, _ = FL.auxdpo_loss(*(torch.cat([x, x]) for x in (cw, cl, rw, rl, dw.detach(), dl.detach())), beta=0.1,
                            lambda_amp=lamp)
    torch.testing.assert_close(two, full.detach(), **TOL64)


def test_typo_without_unsup_rows_is_the_supervised_term_alone():
    g = torch.Generator().manual_seed(41)
    cw, cl = -torch.rand(5, generator=g, dtype=torch.float64) * 40, -torch.rand(5, generator=g, dtype=torch.float64) * 40
    loss, metrics = FL.typo_loss(cw, cl, None, lam=0.3)
    torch.testing.assert_close(loss, torch.nn.functional.softplus(cl - cw).mean())
    assert "logps/unsup" not in metrics and "typo/unsupervised" not in metrics
