"""``fastpref.integrations.liger``: the Liger-convention classes against Liger's own classes (liger-kernel, eager on
the CPU: ``compiled=False``) on Liger's test shapes and data (its ``test/chunked_loss`` tests, fp32): loss, every
returned metric in Liger's order, and the gradients to the input, the head weight and bias.

Loss and gradients are held tighter than Liger's own tolerance (``atol=1e-5, rtol=5e-4``): the two differ by fp32
rounding only (measured: loss 4e-6 relative, where Liger is 4e-6 and fastpref 2e-7 from float64; gradients within
1e-5 in ``||g - g_liger|| / ||g_liger||``). Metrics get Liger's tolerance: Liger sums ~1e4-nat token log-probs in
fp32 (4e-4 absolute rounding at the big shape, and rewards subtract two such sums), fastpref in float64."""

from __future__ import annotations

import pytest
import torch

liger = pytest.importorskip("liger_kernel.chunked_loss")

from fastpref.integrations import liger as fp  # noqa: E402
from conftest import rel_err  # noqa: E402

TOLERANCES = {"loss": dict(rtol=2e-5, atol=1e-6), "metric": dict(rtol=5e-4, atol=1e-5)}
GRAD_TOL = 1e-5
BIG, SMALL = (8, 128, 1024, 4096), (3, 47, 31, 123)  # Liger's test shapes (B, T, H, V)


def _data(B, T, H, V, *, bias, ref_bias, ignore_index, seed, paired=True):
    """Liger's test data: ``randn`` inputs and heads, random targets, a random number of them ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    B = 2 * B if paired else B
    x = torch.randn(B, T, H, generator=g)
    ref_x = torch.randn(B, T, H, generator=g)
    w, ref_w = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    ref_b = torch.randn(V, generator=g) if ref_bias else None
    target = torch.randint(0, V, (B, T), generator=g)
    k = int(torch.randint(1, B * T // 2, (1,), generator=g))
    target.view(-1)[torch.randperm(B * T, generator=g)[:k]] = ignore_index
    return x, ref_x, w, ref_w, b, ref_b, target


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]


def _close(got, want, what):
    if "grad" in what:  # the project's gradient metric, ||g - g_liger|| / ||g_liger||
        err = rel_err(got, want)
        assert err < GRAD_TOL, f"{what}: relative error {err:.2e}"
        return
    torch.testing.assert_close(got.detach().float(), want.detach().float(), msg=what, **TOLERANCES[what.split()[0]])


def _compare(theirs, ours, call):
    """``call(module, x, w, b)`` -> ``(loss, metrics)``; compares losses, metrics and gradients."""
    results = []
    for module, (x, w, b) in ((theirs, _leaves(*call.inputs)), (ours, _leaves(*call.inputs))):
        loss, metrics = call(module, x, w, b)
        loss.backward()
        results.append((loss, metrics, x.grad, w.grad, None if b is None else b.grad))
    (loss1, m1, gx1, gw1, gb1), (loss2, m2, gx2, gw2, gb2) = results
    _close(loss2, loss1, "loss")
    assert len(m1) == len(m2), (len(m1), len(m2))
    for i, (a, e) in enumerate(zip(m2, m1)):
        _close(a, e, f"metric {i}")
    _close(gx2, gx1, "input grad")
    _close(gw2, gw1, "weight grad")
    if gb1 is not None:
        _close(gb2, gb1, "bias grad")


class _Call:
    def __init__(self, inputs, fn):
        self.inputs, self.fn = inputs, fn

    def __call__(self, module, x, w, b):
        return self.fn(module, x, w, b)


CASES = [  # (shape, bias, ref_bias, ignore_index, beta, backend)
    (BIG, True, False, 42, 0.2, "torch"),
    (SMALL, True, True, -100, 0.1, "torch"),
    (SMALL, False, True, 42, 0.2, "torch"),
    (SMALL, True, False, -100, 0.1, "triton"),
]


@pytest.mark.parametrize("shape, bias, ref_bias, ignore_index, beta, backend", CASES)
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_dpo(shape, bias, ref_bias, ignore_index, beta, backend, compute_nll_loss):
    x, ref_x, w, ref_w, b, ref_b, target = _data(*shape, bias=bias, ref_bias=ref_bias, ignore_index=ignore_index,
                                                 seed=1)
    kw = dict(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss, alpha=0.7)
    theirs = liger.LigerFusedLinearDPOLoss(**kw, compiled=False)
    ours = fp.LigerFusedLinearDPOLoss(**kw, backend=backend)
    _compare(theirs, ours, _Call((x, w, b), lambda m, x_, w_, b_: m(w_, x_, target, b_, ref_input=ref_x,
                                                                   ref_weight=ref_w, ref_bias=ref_b)))


@pytest.mark.parametrize("loss_type, extra", [("hinge", {}), ("apo_zero", {}), ("apo_down", {}), ("sppo_hard", {}),
                                              ("nca_pair", {}), ("bco_pair", {}), ("robust", {"label_smoothing": 0.1}),
                                              ("exo_pair", {"label_smoothing": 1e-3}), ("discopop", {})])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_dpo_loss_types(loss_type, extra, average_log_prob):
    x, ref_x, w, ref_w, b, ref_b, target = _data(*SMALL, bias=True, ref_bias=True, ignore_index=-100, seed=2)
    x, ref_x = x * 0.05, ref_x * 0.05  # log-ratios of a few nats, where the variants differ from each other
    kw = dict(loss_type=loss_type, average_log_prob=average_log_prob, **extra)
    theirs = liger.LigerFusedLinearDPOLoss(**kw, compiled=False)
    ours = fp.LigerFusedLinearDPOLoss(**kw, backend="torch")
    _compare(theirs, ours, _Call((x, w, b), lambda m, x_, w_, b_: m(w_, x_, target, b_, ref_x, ref_w, ref_b)))


def test_dpo_without_reference_model():
    x, _, w, _, b, _, target = _data(*SMALL, bias=True, ref_bias=False, ignore_index=-100, seed=3)
    theirs = liger.LigerFusedLinearDPOLoss(use_ref_model=False, compiled=False)
    ours = fp.LigerFusedLinearDPOLoss(use_ref_model=False, backend="torch")
    _compare(theirs, ours, _Call((x * 0.05, w, b), lambda m, x_, w_, b_: m(w_, x_, target, b_)))


@pytest.mark.parametrize("shape, bias, ref_bias, ignore_index, beta, backend", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpo(shape, bias, ref_bias, ignore_index, beta, backend, label_smoothing):
    x, _, w, _, b, _, target = _data(*shape, bias=bias, ref_bias=False, ignore_index=ignore_index, seed=4)
    kw = dict(ignore_index=ignore_index, beta=beta, alpha=0.85, label_smoothing=label_smoothing,
              average_log_prob=shape is SMALL)
    theirs = liger.LigerFusedLinearCPOLoss(**kw, compiled=False)
    ours = fp.LigerFusedLinearCPOLoss(**kw, backend=backend)
    _compare(theirs, ours, _Call((x, w, b), lambda m, x_, w_, b_: m(w_, x_, target, b_)))


@pytest.mark.parametrize("shape, bias, ref_bias, ignore_index, beta, backend", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo(shape, bias, ref_bias, ignore_index, beta, backend, label_smoothing):
    x, _, w, _, b, _, target = _data(*shape, bias=bias, ref_bias=False, ignore_index=ignore_index, seed=5)
    kw = dict(ignore_index=ignore_index, beta=beta, gamma=0.85, label_smoothing=label_smoothing)
    theirs = liger.LigerFusedLinearSimPOLoss(**kw, compiled=False)
    ours = fp.LigerFusedLinearSimPOLoss(**kw, backend=backend)
    _compare(theirs, ours, _Call((x, w, b), lambda m, x_, w_, b_: m(w_, x_, target, b_)))


@pytest.mark.parametrize("shape, bias, ref_bias, ignore_index, beta, backend", CASES)
@pytest.mark.parametrize("with_nll_target", [False, True])
def test_orpo(shape, bias, ref_bias, ignore_index, beta, backend, with_nll_target):
    x, _, w, _, b, _, target = _data(*shape, bias=bias, ref_bias=False, ignore_index=ignore_index, seed=6)
    x = x * 0.05  # average log-probs near 0 as well as far from it: ORPO's log(1 - p) matters
    nll_target = torch.randint(0, shape[3], target.shape, generator=torch.Generator().manual_seed(7))
    nll_target[:, :3] = ignore_index
    kw = dict(ignore_index=ignore_index, beta=beta)
    theirs = liger.LigerFusedLinearORPOLoss(**kw, compiled=False)
    ours = fp.LigerFusedLinearORPOLoss(**kw, backend=backend)
    extra = {"nll_target": nll_target} if with_nll_target else {}
    _compare(theirs, ours, _Call((x, w, b), lambda m, x_, w_, b_: m(w_, x_, target, b_, **extra)))


@pytest.mark.parametrize("shape, bias, ref_bias, ignore_index, beta, backend", CASES)
@pytest.mark.parametrize("kl", [None, "random"])
def test_kto(shape, bias, ref_bias, ignore_index, beta, backend, kl):
    x, ref_x, w, ref_w, b, ref_b, target = _data(*shape, bias=bias, ref_bias=ref_bias, ignore_index=ignore_index,
                                                 seed=8, paired=False)
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(2, (shape[0],), generator=g, dtype=torch.bool)
    labels[0], labels[-1] = True, False
    kl_value = torch.randn(1, generator=g) if kl else None  # Liger's test: randn(1), negative values included
    kw = dict(ignore_index=ignore_index, beta=beta, use_ref_model=True, average_log_prob=True)
    theirs = liger.LigerFusedLinearKTOLoss(**kw, compiled=False)
    ours = fp.LigerFusedLinearKTOLoss(**kw, backend=backend)
    _compare(theirs, ours, _Call((x, w, b), lambda m, x_, w_, b_: m(
        _input=x_, lin_weight=w_, target=target, bias=b_, preference_labels=labels, ref_input=ref_x,
        ref_weight=ref_w, ref_bias=ref_b, kl=kl_value)))


def test_same_constructor_and_forward_signatures_as_liger():
    import inspect

    for name in fp.__all__:
        theirs, ours = getattr(liger, name), getattr(fp, name)
        t_init = [p for p in inspect.signature(theirs.__init__).parameters.values()]
        o_init = [p for p in inspect.signature(ours.__init__).parameters.values() if p.name != "backend"]
        assert [(p.name, p.default) for p in t_init] == [(p.name, p.default) for p in o_init], name
        t_fwd = [(p.name, p.default) for p in inspect.signature(theirs.forward).parameters.values()]
        o_fwd = [(p.name, p.default) for p in inspect.signature(ours.forward).parameters.values()]
        assert t_fwd == o_fwd, name


def test_bad_input_raises_naming_the_argument():
    loss = fp.LigerFusedLinearDPOLoss(backend="torch")
    x, ref_x, w, ref_w, b, ref_b, target = _data(*SMALL, bias=False, ref_bias=False, ignore_index=-100, seed=10)
    with pytest.raises(ValueError, match="even"):
        loss(w, x[:5], target[:5], ref_input=ref_x[:5], ref_weight=ref_w)
    with pytest.raises(ValueError, match="ref_input"):
        loss(w, x, target)
    with pytest.raises(ValueError, match="Unsupported loss_type"):
        fp.LigerFusedLinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        fp.LigerFusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="chunk_size"):
        fp.LigerFusedLinearCPOLoss(chunk_size=0)
    target[0] = -100  # a sequence with no scored target: Liger gives NaN (averaged) or 0; fastpref says so
    with pytest.raises(ValueError, match="no scored token|scored"):
        fp.LigerFusedLinearSimPOLoss(backend="torch")(w, x, target)
    with pytest.raises(ValueError, match="preference_labels"):
        fp.LigerFusedLinearKTOLoss(backend="torch")(x, w, target)
