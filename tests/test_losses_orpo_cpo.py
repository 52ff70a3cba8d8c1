"""ORPO, CPO and the NLL term (functional losses and modules) against TRL's own trainer code (TRL 1.16).

Functional level: ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss`` called on a minimal trainer-like object.
Module level: ``CPOTrainer.get_batch_loss_metrics`` / ``ORPOTrainer.get_batch_loss_metrics`` (TRL's whole loss path:
padding, label shifting, the NLL's cross-entropy, the metrics) on a fake model whose logits are ``h W^T + b``
materialized from the same hidden states the fastpref module reads, so losses and gradients to ``h``, ``W``, ``b``
are compared end to end.
"""

from __future__ import annotations

import types
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

with warnings.catch_warnings():  # TRL warns on every first import of trl.experimental
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

import fastpref  # noqa: E402
from fastpref.losses.functional import CPO_LOSS_TYPES, cpo_loss, dpo_loss, nll_loss, orpo_loss  # noqa: E402
from conftest import rel_err  # noqa: E402

TOL = dict(rtol=2e-6, atol=2e-6)
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


def _pairs(seed, B=8):
    g = torch.Generator().manual_seed(seed)
    n_w, n_l = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    cw = -(0.05 + 2 * torch.rand(B, generator=g)) * n_w  # >= -80: e^logp stays a normal float32 (TRL's AlphaPO
    cl = -(0.05 + 2 * torch.rand(B, generator=g)) * n_l  # computes exp(logp) ** -alpha)
    return cw, cl, n_w, n_l


# ------------------------------------------------------------------------------------------------ functional


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.4, -0.3])
def test_cpo_loss_matches_trl(loss_type, alpha):
    cw, cl, n_w, n_l = _pairs(1)
    B = cw.numel()
    beta, ls, gamma = 0.3, (0.1 if loss_type in ("sigmoid", "simpo") else 0.0), 0.7
    fake = SimpleNamespace(alpha=alpha, accelerator=_Accelerator(), loss_type=loss_type, simpo_gamma=gamma,
                           beta=beta, label_smoothing=ls)
    averaged = loss_type in ("ipo", "simpo")
    lengths = torch.cat([n_w, n_l]).float()
    trl_in = (torch.cat([cw, cl]) / (lengths if averaged else 1)).requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, trl_in[:B], trl_in[B:])
    losses.mean().backward()

    mine = torch.cat([cw, cl]).requires_grad_(True)
    loss, metrics = cpo_loss(mine[:B], mine[B:], n_w, n_l, beta=beta, loss_type=loss_type, label_smoothing=ls,
                             simpo_gamma=gamma, alpha=alpha, cpo_alpha=0.0, backend="torch")
    loss.backward()
    torch.testing.assert_close(loss.detach(), losses.mean().detach(), **TOL)
    expected_grad = trl_in.grad / lengths if averaged else trl_in.grad
    torch.testing.assert_close(mine.grad, expected_grad, **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["logps/chosen"], trl_in[:B].detach().mean(), **TOL)
    assert metrics["nll_loss"].item() == 0.0


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_cpo_fused_kernels_equal_the_expression(loss_type):
    cw, cl, n_w, n_l = _pairs(2)
    results = []
    for backend in ("torch", "triton"):
        x = torch.cat([cw, cl]).requires_grad_(True)
        loss, _ = cpo_loss(x[:8], x[8:], n_w, n_l, beta=0.2, loss_type=loss_type, label_smoothing=0.0,
                           cpo_alpha=0.5, backend=backend)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_cpo_alphapo_is_finite_where_trl_overflows():
    # e^s underflows for s < -103 in fp32: TRL's exp(s) ** -alpha is inf there; the reward itself is representable
    cw, cl = torch.tensor([-150.0]), torch.tensor([-160.0])
    loss, metrics = cpo_loss(cw, cl, torch.ones(1), torch.ones(1), alpha=0.1, beta=0.1, backend="torch")
    assert torch.isfinite(loss)
    expected = -torch.expm1(torch.tensor(15.0, dtype=torch.float64)) / 0.1 * 0.1
    torch.testing.assert_close(metrics["rewards/chosen"].double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="AlphaPO"):
        cpo_loss(torch.tensor([-2000.0]), cl, torch.ones(1), torch.ones(1), alpha=0.1, backend="torch")


@pytest.mark.parametrize("bad, match", [
    (dict(loss_type="kto_pair"), "loss_type"), (dict(beta=0.0), "beta"), (dict(simpo_gamma=-1.0), "simpo_gamma"),
    (dict(label_smoothing=1.5), "label_smoothing"), (dict(cpo_alpha=-1.0), "cpo_alpha"),
    (dict(nll_logps=torch.tensor([-1.0])), "nll_lengths"),
])
def test_cpo_rejects_bad_settings(bad, match):
    x = torch.tensor([-3.0])
    with pytest.raises(ValueError, match=match):
        cpo_loss(x, x - 1, torch.ones(1), torch.ones(1), **bad)


def test_orpo_loss_matches_trl():
    cw, cl, n_w, n_l = _pairs(3)
    B, beta = cw.numel(), 0.25
    lengths = torch.cat([n_w, n_l]).float()
    avg = (torch.cat([cw, cl]) / lengths).requires_grad_(True)
    fake = SimpleNamespace(beta=beta, accelerator=_Accelerator())
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        fake, avg[:B], avg[B:])
    (-losses.mean()).backward()

    mine = torch.cat([cw, cl]).requires_grad_(True)
    loss, metrics = orpo_loss(mine[:B], mine[B:], n_w, n_l, beta=beta, nll_weight=0.0)
    loss.backward()
    torch.testing.assert_close(loss.detach(), -losses.mean().detach(), **TOL)
    torch.testing.assert_close(mine.grad, avg.grad / lengths, **TOL)
    torch.testing.assert_close(metrics["log_odds_ratio"], log_odds_ratio.detach(), **TOL)
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds_chosen.detach(), **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["logps/rejected"], avg[B:].detach().mean(), **TOL)


def test_orpo_is_finite_for_a_certain_response():
    # an average log-prob of exactly 0: log(1 - 1) = -inf in the odds; safe_log1mexp keeps loss and gradient finite
    x = torch.tensor([0.0, -2.0], requires_grad=True)
    loss, _ = orpo_loss(x[:1], x[1:], torch.ones(1), torch.ones(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="<= 0"):
        orpo_loss(torch.tensor([0.5]), torch.tensor([-1.0]), torch.ones(1), torch.ones(1))


def test_nll_loss_is_the_token_mean_and_dpo_sft():
    cw, cl, n_w, n_l = _pairs(4)
    loss, metrics = nll_loss(cw, n_w)
    torch.testing.assert_close(loss, -cw.sum() / n_w.sum().float())
    sft, _ = dpo_loss(cw, cl, cw, cl, loss_type="sft", chosen_lengths=n_w)
    torch.testing.assert_close(loss, sft)
    assert metrics["nll_loss"] == loss
    with pytest.raises(ValueError, match="chosen_lengths"):
        nll_loss(cw, torch.zeros_like(n_w))


# ------------------------------------------------------------------------------------------------ modules vs TRL


D, V = 16, 41


def _token_batch(seed, B=3, T=14, bias=True):
    """TRL's padded pair batch (``chosen_input_ids`` ...) and the same batch in fastpref's row layout."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    ids = torch.randint(1, V, (2 * B, T), generator=g)
    attention = torch.ones(2 * B, T, dtype=torch.long)
    trl_labels = ids.clone()
    seg = torch.zeros(2 * B, T, dtype=torch.long)  # fastpref: segment of the token scored by row t (token t + 1)
    for i in range(2 * B):
        p = int(torch.randint(2, 5, (1,), generator=g))
        e = int(torch.randint(p + 2, T + 1, (1,), generator=g))
        attention[i, e:] = 0
        ids[i, e:] = 0
        trl_labels[i, :p] = -100
        trl_labels[i, e:] = -100
        seg[i, : p - 1], seg[i, p - 1 : e - 1] = 1, 2
    labels = torch.full((2 * B, T), -100)
    labels[:, :-1] = torch.where(seg[:, :-1] > 0, ids[:, 1:], -100)
    batch = {}
    for name, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch.update({f"{name}_input_ids": ids[rows], f"{name}_attention_mask": attention[rows],
                      f"{name}_labels": trl_labels[rows]})
    return h, w, b, labels, seg, batch


class _LogitsModel:
    """TRL calls ``model(input_ids, attention_mask=..., use_cache=False)``; the logits are ``h W^T + b``."""

    def __init__(self, h, w, b):
        self.h, self.w, self.b = h, w, b

    def __call__(self, input_ids, **kwargs):
        logits = self.h @ self.w.T
        return SimpleNamespace(logits=logits if self.b is None else logits + self.b)


def _trl_metrics(trainer_cls, fake, h, w, b, batch):
    fake.accelerator = _Accelerator()
    fake.is_encoder_decoder = False
    fake.aux_loss_enabled = False
    fake.concatenated_inputs = trainer_cls.concatenated_inputs
    fake.get_batch_logps = trainer_cls.get_batch_logps
    fake.concatenated_forward = types.MethodType(trainer_cls.concatenated_forward, fake)
    for name in ("cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_cls, name):
            setattr(fake, name, types.MethodType(getattr(trainer_cls, name), fake))
    leaves = [None if x is None else x.clone().requires_grad_(True) for x in (h, w, b)]
    loss, metrics = trainer_cls.get_batch_loss_metrics(fake, _LogitsModel(*leaves), batch, "train")
    loss.backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves], metrics


def _fastpref(module, h, w, b, labels, seg):
    leaves = [None if x is None else x.clone().requires_grad_(True) for x in (h, w, b)]
    loss, metrics = module(leaves[0], leaves[1], labels, seg, bias=leaves[2])
    loss.backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves], metrics


def _compare(trl_side, mine, names):
    (loss, grads, metrics), (my_loss, my_grads, my_metrics) = trl_side, mine
    torch.testing.assert_close(my_loss.double(), loss.double(), rtol=1e-5, atol=1e-6)  # modules: float64 totals
    for got, want in zip(my_grads, grads):
        if want is not None:
            assert rel_err(got, want) < 1e-5
    for k in names:
        torch.testing.assert_close(float(my_metrics[k]), float(metrics[k]), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type, alpha, cpo_alpha", [("sigmoid", 0.0, 1.0), ("hinge", 0.0, 0.5),
                                                         ("ipo", 0.0, 1.0), ("simpo", 0.0, 1.0),
                                                         ("simpo", 0.2, 0.0)])
def test_cpo_module_matches_trl_cpo_trainer(backend, loss_type, alpha, cpo_alpha):
    h, w, b, labels, seg, batch = _token_batch(5)
    beta, ls, gamma = 0.2, (0.1 if loss_type in ("sigmoid", "simpo") else 0.0), 0.3
    fake = SimpleNamespace(pad_token_id=0, cpo_alpha=cpo_alpha, loss_type=loss_type, beta=beta, label_smoothing=ls,
                           simpo_gamma=gamma, alpha=alpha)
    trl_side = _trl_metrics(CPOTrainer, fake, h, w, b, batch)
    module = fastpref.CPOLoss(beta=beta, loss_type=loss_type, label_smoothing=ls, simpo_gamma=gamma, alpha=alpha,
                              cpo_alpha=cpo_alpha, backend=backend)
    _compare(trl_side, _fastpref(module, h, w, b, labels, seg), PAIR_METRICS + ("nll_loss",))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_orpo_module_matches_trl_orpo_trainer(backend):
    h, w, b, labels, seg, batch = _token_batch(6)
    fake = SimpleNamespace(padding_value=0, beta=0.15)
    trl_side = _trl_metrics(ORPOTrainer, fake, h, w, b, batch)
    module = fastpref.ORPOLoss(beta=0.15, nll_on_prompt=True, backend=backend)  # TRL scores the prompt in the NLL
    mine = _fastpref(module, h, w, b, labels, seg)
    _compare(trl_side, mine, PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"))


def test_orpo_module_nll_on_the_response_by_default():
    h, w, b, labels, seg, _ = _token_batch(7)
    loss, metrics = fastpref.ORPOLoss(backend="torch")(h, w, labels, seg, bias=b)
    lp = fastpref.sequence_logprobs(h, w, labels, torch.where(seg == 1, 0, seg), bias=b, backend="torch",
                                    totals_dtype=torch.float64)
    n = lp.response.numel() // 2
    torch.testing.assert_close(metrics["nll_loss"], -lp.response[:n].sum() / lp.n_response[:n].sum())


@pytest.mark.parametrize("module_cls", [fastpref.DPOLoss, fastpref.SimPOLoss])
def test_dpo_and_simpo_modules_add_the_nll_term(module_cls):
    h, w, b, labels, seg, _ = _token_batch(8)
    href = h + 0.1
    kwargs = dict(ref_hidden=href, ref_weight=w, ref_bias=b) if module_cls is fastpref.DPOLoss else {}
    plain, _ = module_cls(backend="torch")(h, w, labels, seg, bias=b, **kwargs)
    with_nll, metrics = module_cls(nll_weight=0.7, backend="torch")(h, w, labels, seg, bias=b, **kwargs)
    lp = fastpref.sequence_logprobs(h, w, labels, torch.where(seg == 1, 0, seg), bias=b, backend="torch",
                                    totals_dtype=torch.float64)
    n = lp.response.numel() // 2
    nll = -lp.response[:n].sum() / lp.n_response[:n].sum()
    torch.testing.assert_close(with_nll, plain + 0.7 * nll)
    torch.testing.assert_close(metrics["nll_loss"], nll)
    with pytest.raises(ValueError, match="nll_weight"):
        module_cls(nll_weight=-1.0)
