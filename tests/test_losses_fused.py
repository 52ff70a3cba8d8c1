"""The fused loss heads (``fastpref.losses.fused``, kernels ``loss_pairwise`` / ``loss_grouped``) against the PyTorch
expressions they replace.

For every fused method, loss type and mode: ``backend='triton'`` (the Triton interpreter on CPU) vs
``backend='torch'`` on fresh random inputs (realistic log-probs ``-U(5, 200)``, lengths 3..50): the loss to ~1e-6
relative and the gradients (through the fused autograd Function vs autograd through the torch expression) with
respect to every differentiable input to ~1e-5; one kernel launch per loss evaluation (forward and backward
together).  Then fp32 stability (log-probs from -1e-8 to -1e5 against a float64 torch evaluation), the stable scalar
helpers themselves, the configurations that fall back to torch, and backend selection errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fastpref.kernels import loss_grouped, loss_pairwise, scalar_math
from fastpref.losses import functional as FL
from fastpref.losses.fused import use_fused

F64 = torch.float64
DPO_FUSED = loss_pairwise.DPO_TYPES


# ------------------------------------------------------------------------------------------------------- harness


class _LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel in its module and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.count = 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    spies = [_LaunchSpy(loss_pairwise._pairwise_loss_kernel), _LaunchSpy(loss_grouped._pro_scalar_kernel)]
    monkeypatch.setattr(loss_pairwise, "_pairwise_loss_kernel", spies[0])
    monkeypatch.setattr(loss_grouped, "_pro_scalar_kernel", spies[1])

    def count():
        return sum(s.count for s in spies)

    return count


def _lp(g, n, device, lo=5.0, hi=200.0):
    return (-(lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64))).float().to(device)


def _group_lp(g, sizes, device):
    """Per group, log-probs whose probabilities add up to a total in (0.05, 0.95): the hyper response
    ``log(1 - total)`` then carries real weight (for ``-U(5, 200)`` log-probs it would be ~0 and, with ``f`` in its
    linear regime, drop out of the gradient)."""
    out = []
    for k in sizes:
        total = 0.05 + 0.9 * torch.rand((), generator=g, dtype=F64)
        share = torch.rand(k, generator=g, dtype=F64) + 0.05
        out.append(torch.log(total * share / share.sum()))
    return torch.cat(out).float().to(device)


def _lengths(g, n, device):
    return torch.randint(3, 51, (n,), generator=g).to(device)


def _run(fn, inputs, grad_keys, backend, dtype=None):
    x = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.is_floating_point():
            v = v.detach().clone() if dtype is None else v.detach().to(dtype)
            v.requires_grad_(k in grad_keys)
        x[k] = v
    loss, metrics = fn(backend=backend, **x)
    keys = sorted(grad_keys)
    grads = torch.autograd.grad(loss, [x[k] for k in keys], allow_unused=True)
    grads = {k: (torch.zeros_like(x[k]) if g is None else g) for k, g in zip(keys, grads)}
    return loss, grads, metrics


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _compare(launches, fn, inputs, grad_keys, *, loss_rtol=2e-6, grad_rtol=1e-5, fused=True):
    """Fused vs torch: loss, every gradient, metrics; exactly one launch when ``fused`` (else none).  On CUDA,
    Triton's fp32 ``exp`` is ``ex2.approx`` (a few ulp, more for large arguments): the loss tolerance is 1e-5 there."""
    if loss_rtol and next(iter(inputs.values())).device.type == "cuda":
        loss_rtol = 1e-5
    before = launches()
    loss_f, g_f, m_f = _run(fn, inputs, grad_keys, "triton")
    assert launches() - before == (1 if fused else 0)
    loss_t, g_t, m_t = _run(fn, inputs, grad_keys, "torch")
    assert launches() - before == (1 if fused else 0)  # the backward launches nothing
    assert loss_f.dim() == 0 and loss_f.dtype == loss_t.dtype
    lf, lt = loss_f.item(), loss_t.item()
    assert abs(lf - lt) <= loss_rtol * abs(lt) + 1e-7, (lf, lt)
    for k in g_t:
        assert torch.isfinite(g_f[k]).all(), k
        assert _rel(g_f[k], g_t[k]) <= grad_rtol or float(g_t[k].abs().max()) == 0.0 == float(g_f[k].abs().max()), (
            k, _rel(g_f[k], g_t[k]))
    assert m_f.keys() == m_t.keys()
    for k in m_t:
        torch.testing.assert_close(m_f[k], m_t[k], rtol=1e-6, atol=1e-6, msg=k)
    return loss_f, g_f


# ------------------------------------------------------------------------------------------------- DPO family

# beta per type so that z = beta * Delta is O(1) for log-probs in [-200, -5] (every branch is exercised).
_DPO_BETA = {"ipo": 0.5, "sppo_hard": 0.1, "sigmoid_norm": 2.0, "discopop": 0.01}


@pytest.mark.parametrize("loss_type", DPO_FUSED)
def test_dpo_loss_types(loss_type, device, launches):
    g = torch.Generator().manual_seed(100 + DPO_FUSED.index(loss_type))
    B = 37
    inputs = dict(cw=_lp(g, B, device), cl=_lp(g, B, device), rw=_lp(g, B, device), rl=_lp(g, B, device))
    n_w, n_l = _lengths(g, B, device), _lengths(g, B, device)
    beta = _DPO_BETA.get(loss_type, 0.02)
    ls = 0.2 if loss_type == "robust" else 0.05

    def fn(cw, cl, rw, rl, backend):
        return FL.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type=loss_type, label_smoothing=ls,
                           chosen_lengths=n_w, rejected_lengths=n_l, backend=backend)

    _compare(launches, fn, inputs, {"cw", "cl", "rw", "rl"})


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop"])
def test_dpo_wpo_weights_and_loss_weight(loss_type, device, launches):
    g = torch.Generator().manual_seed(7)
    B = 20
    inputs = dict(cw=_lp(g, B, device), cl=_lp(g, B, device), rw=_lp(g, B, device), rl=_lp(g, B, device))
    wpo = torch.rand(B, generator=g).to(device) + 0.1
    n = _lengths(g, B, device)
    beta = _DPO_BETA.get(loss_type, 0.02)

    def fn(cw, cl, rw, rl, backend):
        return FL.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type=[loss_type], loss_weights=[0.7], wpo_weights=wpo,
                           chosen_lengths=n, rejected_lengths=n.flip(0), backend=backend)

    _compare(launches, fn, inputs, {"cw", "cl", "rw", "rl"})


def test_simpo(device, launches):
    g = torch.Generator().manual_seed(11)
    B = 25
    n_w, n_l = _lengths(g, B, device), _lengths(g, B, device).float()

    def fn(cw, cl, backend):
        return FL.simpo_loss(cw, cl, n_w, n_l, beta=2.0, gamma=0.5, label_smoothing=0.1, backend=backend)

    _compare(launches, fn, dict(cw=_lp(g, B, device), cl=_lp(g, B, device)), {"cw", "cl"})


def test_distill(device, launches):
    g = torch.Generator().manual_seed(12)
    B = 19
    inputs = dict(cw=_lp(g, B, device), cl=_lp(g, B, device), rw=_lp(g, B, device), rl=_lp(g, B, device),
                  Rw=torch.randn(B, generator=g).to(device), Rl=torch.randn(B, generator=g).to(device))

    def fn(cw, cl, rw, rl, Rw, Rl, backend):
        return FL.distill_loss(cw, cl, rw, rl, Rw, Rl, beta=0.05, backend=backend)

    _compare(launches, fn, inputs, set(inputs))


# ------------------------------------------------------------------------------------------ TYPO, AuxDPO, DRDO


def test_typo(device, launches):
    g = torch.Generator().manual_seed(13)
    inputs = dict(cw=_lp(g, 21, device, 1, 30), cl=_lp(g, 21, device, 1, 30), cu=_lp(g, 9, device))

    def fn(cw, cl, cu, backend):
        return FL.typo_loss(cw, cl, cu, lam=0.05, backend=backend)

    _compare(launches, fn, inputs, set(inputs))


@pytest.mark.parametrize("with_null", [False, True])
def test_auxdpo(with_null, device, launches):
    g = torch.Generator().manual_seed(14)
    B = 17
    inputs = dict(cw=_lp(g, B, device), cl=_lp(g, B, device), rw=_lp(g, B, device), rl=_lp(g, B, device),
                  dw=torch.randn(B, generator=g).to(device) * 5, dl=torch.randn(B, generator=g).to(device) * 5)
    if with_null:
        inputs["pen"] = torch.rand((), generator=g).to(device)

    def fn(cw, cl, rw, rl, dw, dl, backend, pen=None):
        return FL.auxdpo_loss(cw, cl, rw, rl, dw, dl, beta=0.05, null_penalty=pen, lambda_amp=0.01,
                              backend=backend)

    _compare(launches, fn, inputs, set(inputs))


@pytest.mark.parametrize("gamma", [0.0, 2.0, 1.5])
def test_drdo(gamma, device, launches):
    g = torch.Generator().manual_seed(15)
    B = 23
    inputs = dict(cw=_lp(g, B, device, 1, 20), cl=_lp(g, B, device, 1, 20),
                  hw=torch.randn(B, generator=g).to(device), hl=torch.randn(B, generator=g).to(device),
                  ow=torch.randn(B, generator=g).to(device), ol=torch.randn(B, generator=g).to(device))

    def fn(cw, cl, hw, hl, ow, ol, backend):
        return FL.drdo_loss(cw, cl, hw, hl, ow, ol, alpha=0.1, gamma=gamma, backend=backend)

    _, grads = _compare(launches, fn, inputs, set(inputs))
    assert float(grads["ow"].abs().max()) == 0.0 == float(grads["ol"].abs().max())  # oracle rewards are data


# ---------------------------------------------------------------------------------------------------------- PRO


@pytest.mark.parametrize("hyper", ["exact", "zero"])
@pytest.mark.parametrize("eta,alpha", [(0.1, None), (0.0, 1.0), (0.3, 3.0)])
def test_pro_pairwise(hyper, eta, alpha, device, launches):
    g = torch.Generator().manual_seed(16)
    B = 15
    # pairs holding 5%..95% of the mass (the hyper response matters), then pairs of ordinary sequences
    lp = _group_lp(g, [2] * B, device).view(B, 2).t().reshape(-1)  # TRL layout: chosen half, rejected half
    ref = _group_lp(g, [2] * B, device).view(B, 2).t().reshape(-1)
    lp2, ref2 = _lp(g, 2 * B, device), _lp(g, 2 * B, device)
    inputs = dict(lp=torch.cat([lp[:B], lp2[:B], lp[B:], lp2[B:]]), ref=torch.cat([ref[:B], ref2[:B], ref[B:],
                                                                                       ref2[B:]]))

    def fn(lp, ref, backend):
        return FL.pro_loss(lp, ref, beta=0.5, eta=eta, alpha=alpha, hyper_response=hyper, backend=backend,
                           require_optimum=eta != 0.0)

    _compare(launches, fn, inputs, {"lp"})


@pytest.mark.parametrize("hyper", ["exact", "zero"])
def test_pro_binary(hyper, device, launches):
    g = torch.Generator().manual_seed(17)
    N = 30
    labels = (torch.rand(N, generator=g) < 0.3).to(device)
    inputs = dict(lp=_lp(g, N, device, 0.01, 8), ref=_lp(g, N, device, 0.01, 8))

    def fn(lp, ref, backend):
        return FL.pro_loss(lp, ref, feedback="binary", labels=labels, beta=0.5, lam=1.5, desirable_weight=1.0,
                           undesirable_weight=0.01, hyper_response=hyper, backend=backend)

    _compare(launches, fn, inputs, {"lp"})


@pytest.mark.parametrize("hyper", ["exact", "zero"])
@pytest.mark.parametrize("eta", [0.2, None])
def test_pro_scalar_groups_of_different_sizes(hyper, eta, device, launches):
    g = torch.Generator().manual_seed(18)
    sizes = [2, 5, 3, 17, 2, 9]  # BLOCK_K = 32: every group masks lanes
    gid = torch.cat([torch.full((k,), 10 * i + 3) for i, k in enumerate(sizes)])
    perm = torch.randperm(gid.numel(), generator=g)
    gid = gid[perm].to(device)  # rows of a group are scattered over the batch
    N = gid.numel()
    inputs = dict(lp=_group_lp(g, sizes, device)[perm], ref=_group_lp(g, sizes, device)[perm],
                  R=torch.randn(N, generator=g).to(device))

    def fn(lp, ref, R, backend):
        return FL.pro_loss(lp, ref, feedback="scalar", rewards=R, group_ids=gid, beta=0.5, eta=eta, tau=0.7,
                           hyper_response=hyper, backend=backend)  # eta None: 1/(K+1) per group

    _compare(launches, fn, inputs, {"lp", "R"})


def test_pro_scalar_large_group_chunks(device, launches):
    """A group larger than the column chunk (BLOCK_K = 256 -> BLOCK_J = 16): the K x K terms span chunks."""
    g = torch.Generator().manual_seed(19)
    gid = torch.cat([torch.zeros(150, dtype=torch.long), torch.ones(3, dtype=torch.long)]).to(device)
    N = gid.numel()
    inputs = dict(lp=_group_lp(g, [150, 3], device), ref=_group_lp(g, [150, 3], device),
                  R=torch.randn(N, generator=g).to(device))

    def fn(lp, ref, R, backend):
        return FL.pro_loss(lp, ref, feedback="scalar", rewards=R, group_ids=gid, beta=0.1, backend=backend)

    _compare(launches, fn, inputs, {"lp", "R"})


# ---------------------------------------------------------------------------------------------------------- DRO


def test_dro_groups_including_size_one(device, launches):
    g = torch.Generator().manual_seed(20)
    gid = torch.tensor([4, 4, 4, 9, 1, 1, 7, 7, 7, 7, 2]).to(device)  # 9 and 2: single responses
    N = gid.numel()
    inputs = dict(lp=_lp(g, N, device), ref=_lp(g, N, device), plp=_lp(g, N, device, 10, 50),
                  rplp=_lp(g, N, device, 10, 50), R=torch.randn(N, generator=g).to(device))

    def fn(lp, ref, plp, rplp, R, backend):
        return FL.dro_loss(lp, ref, plp, rplp, R, gid, beta=0.05, log_z0=2.5, backend=backend)

    _compare(launches, fn, inputs, set(inputs))  # the prompt log-probs get no gradient either way


# ----------------------------------------------------------------------------------------- fp32 stability


def _extreme_pairs(device):
    """Chosen log-probs from -1e-8 to -1e5; each rejected one leaves the pair's total probability < 1."""
    cw = -torch.logspace(-8, 5, 27, dtype=F64)
    cl = torch.clamp(torch.log(-torch.expm1(cw)) - 1.0, min=-1e5)
    return cw.float().to(device), cl.float().to(device)


def _extreme_cases():
    ones = lambda x, v: torch.full_like(x, v)  # noqa: E731
    return {
        "dpo_sigmoid": lambda lp, ref, b: FL.dpo_loss(lp[:27], lp[27:], ref[:27], ref[27:], beta=1e-4, backend=b),
        "dpo_discopop": lambda lp, ref, b: FL.dpo_loss(lp[:27], lp[27:], ref[:27], ref[27:], beta=1e-4,
                                                       loss_type="discopop", backend=b),
        "dpo_exo": lambda lp, ref, b: FL.dpo_loss(lp[:27], lp[27:], ref[:27], ref[27:], beta=1e-4,
                                                  loss_type="exo_pair", label_smoothing=1e-3, backend=b),
        "simpo": lambda lp, ref, b: FL.simpo_loss(lp[:27], lp[27:], ones(lp[:27], 40.0), ones(lp[:27], 40.0),
                                                  backend=b),
        "typo": lambda lp, ref, b: FL.typo_loss(lp[:27], lp[27:], ref[:27], backend=b),
        "auxdpo": lambda lp, ref, b: FL.auxdpo_loss(lp[:27], lp[27:], ref[:27], ref[27:], ones(lp[:27], 0.5),
                                                    ones(lp[:27], -0.5), beta=1e-4, backend=b),
        "drdo": lambda lp, ref, b: FL.drdo_loss(lp[:27], lp[27:], ones(lp[:27], 0.5), ones(lp[:27], -0.5),
                                                ones(lp[:27], 1.0), ones(lp[:27], 0.0), backend=b),
        "pro_pairwise": lambda lp, ref, b: FL.pro_loss(lp, ref, beta=0.1, backend=b),
        "pro_binary": lambda lp, ref, b: FL.pro_loss(lp, ref, feedback="binary",
                                                     labels=torch.arange(lp.numel(), device=lp.device) % 2,
                                                     beta=0.1, backend=b),
        "pro_scalar": lambda lp, ref, b: FL.pro_loss(lp, ref, feedback="scalar",
                                                     rewards=torch.linspace(-1, 1, lp.numel(), device=lp.device,
                                                                            dtype=lp.dtype),
                                                     group_ids=torch.arange(lp.numel(), device=lp.device) % 27,
                                                     beta=0.1, backend=b),
        "dro": lambda lp, ref, b: FL.dro_loss(lp, ref, ref, lp, ones(lp, 0.3), torch.arange(lp.numel(),
                                              device=lp.device) % 5, beta=1e-4, log_z0=1.0, backend=b),
    }


@pytest.mark.parametrize("name", list(_extreme_cases()))
def test_fp32_stability_extreme_logps_match_float64(name, device, launches):
    cw, cl = _extreme_pairs(device)
    lp32, ref32 = torch.cat([cw, cl]), torch.cat([cl.flip(0), cw.flip(0)])
    fn = _extreme_cases()[name]
    x = lp32.clone().requires_grad_(True)
    before = launches()
    loss, _ = fn(x, ref32, "triton")
    assert launches() - before == 1
    (g,) = torch.autograd.grad(loss, x)
    x64 = lp32.double().requires_grad_(True)  # the same (fp32-representable) inputs, float64 torch expression
    loss64, _ = fn(x64, ref32.double(), "torch")
    (g64,) = torch.autograd.grad(loss64, x64)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


def _zero_logp_cases():
    """Issue 9: log-probs of exactly 0 and subnormal ones (each pair/group keeps total probability <= 1)."""
    lp = torch.tensor([0.0, -1e-40, -3e-8, -0.5, -30.0, -28.0, -25.0, -2.0])  # pairs (0, -30), (-1e-40, -28), ...
    ref = torch.tensor([-1e-40, 0.0, -0.2, -1.0, -9.0, -8.0, -7.0, -6.0])
    return lp, ref, {
        "pro_pairwise": lambda lp, ref, b: FL.pro_loss(lp, ref, beta=0.5, backend=b),
        "pro_binary": lambda lp, ref, b: FL.pro_loss(lp, ref, feedback="binary", beta=0.5, backend=b,
                                                     labels=torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], device=lp.device)),
        "pro_scalar": lambda lp, ref, b: FL.pro_loss(lp, ref, feedback="scalar", beta=0.5, backend=b,
                                                     rewards=torch.linspace(-1, 1, 8, device=lp.device),
                                                     group_ids=torch.tensor([0, 1, 2, 3] * 2, device=lp.device)),
        "drdo": lambda lp, ref, b: FL.drdo_loss(ref[:4], lp[:4], lp[4:] * 0.01, ref[4:] * 0.01,
                                                torch.ones(4, device=lp.device), torch.zeros(4, device=lp.device),
                                                backend=b),
    }


@pytest.mark.parametrize("name", list(_zero_logp_cases()[2]))
def test_log_prob_zero_and_subnormal_finite_and_backends_agree(name, device, launches):
    lp, ref, cases = _zero_logp_cases()
    fn = cases[name]
    out = {}
    for backend in ("triton", "torch"):
        x = lp.to(device).clone().requires_grad_(True)
        loss, _ = fn(x, ref.to(device), backend)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), (backend, loss, g)
        out[backend] = (loss.detach().double(), g.double())
    x64 = lp.double().to(device).requires_grad_(True)  # and float64, the same function (safe_log1mexp's constants)
    loss64, _ = fn(x64, ref.double().to(device), "torch")
    (g64,) = torch.autograd.grad(loss64, x64)
    for backend, (loss, g) in out.items():
        torch.testing.assert_close(loss, loss64.detach(), rtol=1e-5, atol=1e-6, msg=backend)
        torch.testing.assert_close(g, g64, rtol=1e-4, atol=1e-3, msg=backend)


def test_discopop_margin_minus_90_finite_on_both_backends(device, launches):
    cw = torch.tensor([-100.0, -10.0], device=device)
    cl = torch.tensor([-10.0, -12.0], device=device)
    zeros = torch.zeros(2, device=device)
    for backend in ("triton", "torch"):
        x = cw.clone().requires_grad_(True)
        loss, _ = FL.dpo_loss(x, cl, zeros, zeros, beta=1.0, loss_type="discopop", backend=backend)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), backend
        assert float(g[0]) == pytest.approx(-0.5, rel=1e-5)  # -sigma(90) / 2


@triton.jit
def _helpers_kernel(X, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=-1.0)
    tl.store(OUT + offs, scalar_math.log1mexp(x), mask=m)
    tl.store(OUT + N + offs, scalar_math.recip_expm1_neg(x), mask=m)
    tl.store(OUT + 2 * N + offs, scalar_math.expm1(x), mask=m)
    tl.store(OUT + 3 * N + offs, scalar_math.log1p(-0.5 * tl.exp(x)), mask=m)
    tl.store(OUT + 4 * N + offs, scalar_math.softplus(-x), mask=m)
    tl.store(OUT + 5 * N + offs, scalar_math.log_sigmoid(x), mask=m)
    tl.store(OUT + 6 * N + offs, scalar_math.sigmoid(x), mask=m)
    tl.store(OUT + 7 * N + offs, scalar_math.expm1(-x * 1e-4), mask=m)


@triton.jit
def _safe_helpers_kernel(X, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=-1.0)
    tl.store(OUT + offs, scalar_math.safe_log1mexp(x), mask=m)
    tl.store(OUT + N + offs, scalar_math.safe_log1mexp_grad(x), mask=m)


def test_safe_log1mexp_kernel_helper_matches_torch(device):
    """The kernels' safe_log1mexp and its slope against fastpref.losses._ops.safe_log1mexp (float64 autograd), from
    -1e5 through the switch point -2^-24 to 0, subnormals included."""
    from fastpref.losses._ops import SAFE_LOG1MEXP_EPS, log1mexp, safe_log1mexp

    a64 = torch.cat([-torch.logspace(-12, 5, 200, dtype=F64),
                     torch.tensor([0.0, -1e-40, -1e-30, -SAFE_LOG1MEXP_EPS, -3e-8, -1e-7], dtype=F64)])
    x = a64.float().to(device)
    n = x.numel()
    out = torch.empty(2, n, device=device)
    _safe_helpers_kernel[(1,)](x, out, n, BLOCK=triton.next_power_of_2(n))
    a = x.double().cpu().requires_grad_(True)
    want = safe_log1mexp(a)
    (want_grad,) = torch.autograd.grad(want.sum(), a)
    far = a.detach() <= -SAFE_LOG1MEXP_EPS
    torch.testing.assert_close(want.detach()[far], log1mexp(a.detach()[far]))  # below the switch: log1mexp itself
    assert torch.isfinite(out).all()
    rtol = 3e-6 if device == "cpu" else 2e-5
    torch.testing.assert_close(out[0].double().cpu(), want.detach(), rtol=rtol, atol=1e-30)
    torch.testing.assert_close(out[1].double().cpu(), want_grad, rtol=rtol, atol=1e-30)


def test_scalar_math_helpers_accuracy(device):
    a64 = -torch.logspace(-8, 5, 300, dtype=F64)
    a64 = torch.cat([a64, torch.tensor([-math.log(2) + 1e-7, -math.log(2), -math.log(2) - 1e-7], dtype=F64)])
    x = a64.float().to(device)
    n = x.numel()
    out = torch.empty(8, n, device=device)
    _helpers_kernel[(1,)](x, out, n, BLOCK=triton.next_power_of_2(n))
    a = x.double().cpu()  # the fp32 inputs, exactly
    want = [
        torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a))),
        1 / torch.expm1(-a),
        torch.expm1(a),
        torch.log1p(-0.5 * torch.exp(a)),
        torch.nn.functional.softplus(-a),
        torch.nn.functional.logsigmoid(a),
        torch.sigmoid(a),
        torch.expm1(-a * 1e-4),
    ]
    for i, w in enumerate(want):
        got = out[i].double().cpu()
        assert torch.isfinite(got).all(), i
        rtol = 3e-6 if device == "cpu" else 2e-5  # CUDA: tl.exp is ex2.approx(x * log2 e)
        torch.testing.assert_close(got, w, rtol=rtol, atol=1e-30, msg=f"helper {i}")


# ------------------------------------------------------------------------------------------------ fallbacks


def _small(device, seed=21, B=9):
    g = torch.Generator().manual_seed(seed)
    return dict(cw=_lp(g, B, device), cl=_lp(g, B, device), rw=_lp(g, B, device), rl=_lp(g, B, device))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="aot", label_smoothing=0.1),
        dict(loss_type="aot_unpaired"),
        dict(loss_type="sft"),
        dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5]),
        dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    ],
    ids=["aot", "aot_unpaired", "sft", "multi", "js"],
)
def test_unsupported_dpo_configurations_fall_back(kwargs, device, launches):
    n = torch.full((9,), 10, device=device)

    def fn(cw, cl, rw, rl, backend):
        return FL.dpo_loss(cw, cl, rw, rl, beta=0.01, chosen_lengths=n, rejected_lengths=n, backend=backend,
                           **kwargs)

    _compare(launches, fn, _small(device), {"cw", "cl"}, loss_rtol=0.0, grad_rtol=0.0, fused=False)


def test_float64_inputs_and_grad_needing_inputs_fall_back(device, launches):
    x = _small(device)
    x64 = {k: v.double() for k, v in x.items()}
    _compare(launches, lambda backend, **k: FL.dpo_loss(**_pos(k), beta=0.01, backend=backend), x64, {"cw"},
             loss_rtol=0.0, grad_rtol=0.0, fused=False)
    # wpo_weights that require grad: the kernel has no gradient for them -> torch (same result, gradient included)
    wpo = torch.rand(9, device=device) + 0.5
    _compare(launches, lambda backend, wpo, **k: FL.dpo_loss(**_pos(k), beta=0.01, wpo_weights=wpo, backend=backend),
             {**x, "wpo": wpo}, {"cw", "wpo"}, loss_rtol=0.0, grad_rtol=0.0, fused=False)
    # PRO with reference log-probs that require grad
    lp, ref = torch.cat([x["cw"], x["cl"]]), torch.cat([x["rw"], x["rl"]])
    _compare(launches, lambda lp, ref, backend: FL.pro_loss(lp, ref, backend=backend), dict(lp=lp, ref=ref),
             {"lp", "ref"}, loss_rtol=0.0, grad_rtol=0.0, fused=False)


def _pos(k):
    return dict(chosen_logps=k["cw"], rejected_logps=k["cl"], ref_chosen_logps=k["rw"], ref_rejected_logps=k["rl"])


def test_auto_on_cpu_uses_torch(launches):
    x = _small("cpu")
    before = launches()
    FL.dpo_loss(**_pos(x), backend="auto")
    FL.pro_loss(torch.cat([x["cw"], x["cl"]]), torch.cat([x["rw"], x["rl"]]))
    assert launches() == before


def test_backend_errors(monkeypatch):
    x = _small("cpu")
    with pytest.raises(ValueError, match="dpo_loss.*`backend`"):
        FL.dpo_loss(**_pos(x), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (
        lambda: FL.dpo_loss(**_pos(x), backend="triton"),
        lambda: FL.dpo_loss(**_pos(x), loss_type="aot", backend="triton"),  # raises even where it would fall back
        lambda: FL.pro_loss(torch.cat([x["cw"], x["cl"]]), torch.cat([x["rw"], x["rl"]]), backend="triton"),
        lambda: FL.typo_loss(x["cw"], x["cl"], x["rw"], backend="triton"),
    ):
        with pytest.raises(ValueError, match="`backend='triton'`"):
            call()
    assert use_fused("torch", x["cw"]) is False
    assert FL.dpo_loss(**_pos(x), backend="torch")[0].dim() == 0
