"""Loss modules: loss and gradients against float64 log-probs (materialized logits) fed to the functional loss."""

import pytest
import torch
from torch import nn

import fastpref
from fastpref.losses import functional as F
from fastpref.losses import param_null_penalty
from fastpref.reference import sequence_logprobs_reference
from conftest import rel_err

BACKENDS = ["torch", "triton"]
D, V, T = 24, 53, 17


def make(S, seed, *, prompt=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, D, generator=g)
    href = h + 0.3 * torch.randn(S, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    y = torch.randint(0, V, (S, T), generator=g)
    seg = torch.full((S, T), 2)
    for i in range(S):
        p = int(torch.randint(2, 7, (1,), generator=g))
        e = int(torch.randint(p + 3, T + 1, (1,), generator=g))
        seg[i, :p] = 1 if prompt else 0
        seg[i, e:] = 0
        y[i, e:] = -100
    return h, href, w, y, seg


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def ref64(h, w, y, seg, **kw):
    return sequence_logprobs_reference(h.double(), w.double(), y, seg, **kw)


def compare(module_loss, expected_loss, pairs, tol=1e-5):
    """pairs: (fastpref grad, float64 grad) tuples."""
    torch.testing.assert_close(module_loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in pairs:
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "sft", "aot"])
def test_dpo_loss_module(backend, loss_type):
    h, href, w, y, seg = make(6, 1)
    mod = fastpref.DPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=0.1, backend=backend)
    hl, wl = leaves(h, w)
    loss, metrics = mod(hl, wl, y, seg, ref_hidden=href, ref_weight=w)
    loss.backward()
    h64, w64 = leaves(h.double(), w.double())
    pol, ref = ref64(h64, w64, y, seg), ref64(href, w, y, seg)
    s = lambda x: x.chunk(2)  # noqa: E731
    (cw, cl), (rw, rl), (nw, nl) = s(pol["response"]), s(ref["response"]), s(pol["n_response"])
    exp, exp_metrics = F.dpo_loss(cw, cl, rw, rl, beta=0.2, loss_type=loss_type, label_smoothing=0.1,
                                  chosen_lengths=nw, rejected_lengths=nl)
    exp.backward()
    compare(loss, exp, [(hl.grad, h64.grad), (wl.grad, w64.grad)])
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}
    for k, v in exp_metrics.items():
        torch.testing.assert_close(metrics[k].double(), v.double(), rtol=1e-5, atol=1e-5)
    prompt_rows = (seg == 1).unsqueeze(-1).expand_as(hl)
    assert torch.all(hl.grad[prompt_rows] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_precomputed_reference_equals_reference_pass(backend):
    h, href, w, y, seg = make(4, 2)
    mod = fastpref.DPOLoss(backend=backend)
    with torch.no_grad():
        pre = fastpref.sequence_logprobs(href, w, y, torch.where(seg == 1, 0, seg), backend=backend)
    a, _ = mod(h, w, y, seg, ref_hidden=href, ref_weight=w)
    b, _ = mod(h, w, y, seg, ref_logps=pre)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_simpo_module(backend):
    h, _, w, y, seg = make(4, 3)
    hl, wl = leaves(h, w)
    loss, _ = fastpref.SimPOLoss(beta=2.0, gamma=0.3, backend=backend)(hl, wl, y, seg)
    loss.backward()
    h64, w64 = leaves(h.double(), w.double())
    pol = ref64(h64, w64, y, seg)
    cw, cl = pol["response"].chunk(2)
    nw, nl = pol["n_response"].chunk(2)
    exp, _ = F.simpo_loss(cw, cl, nw, nl, beta=2.0, gamma=0.3)
    exp.backward()
    compare(loss, exp, [(hl.grad, h64.grad), (wl.grad, w64.grad)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feedback", ["pairwise", "binary", "scalar"])
def test_pro_module(backend, feedback):
    S = 6
    h, href, w, y, seg = make(S, 4)
    kw = {}
    if feedback == "binary":
        kw["labels_desirable"] = torch.tensor([1, 0, 1, 1, 0, 0])
    if feedback == "scalar":
        kw["rewards"], kw["group_ids"] = torch.randn(S), torch.tensor([0, 0, 0, 1, 1, 1])
    mod = fastpref.PROLoss(feedback=feedback, beta=0.3, backend=backend)
    hl, wl = leaves(h, w)
    loss, metrics = mod(hl, wl, y, seg, ref_hidden=href, ref_weight=w, **kw)
    loss.backward()
    h64, w64 = leaves(h.double(), w.double())
    fkw = {"labels": kw.get("labels_desirable"), "rewards": kw.get("rewards"), "group_ids": kw.get("group_ids")}
    exp, _ = F.pro_loss(ref64(h64, w64, y, seg)["response"], ref64(href, w, y, seg)["response"],
                        feedback=feedback, beta=0.3, **fkw)
    exp.backward()
    compare(loss, exp, [(hl.grad, h64.grad), (wl.grad, w64.grad)])
    assert "rewards/hyper" in metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_dro_module_uses_detached_prompt_from_the_same_pass(backend):
    S = 5
    h, href, w, y, seg = make(S, 5)
    R, gid = torch.randn(S), torch.tensor([0, 0, 1, 1, 1])
    mod = fastpref.DROLoss(beta=0.1, log_z0=2.0, backend=backend)
    hl, wl = leaves(h, w)
    loss, _ = mod(hl, wl, y, seg, rewards=R, group_ids=gid, ref_hidden=href, ref_weight=w)
    loss.backward()
    h64, w64 = leaves(h.double(), w.double())
    pol, ref = ref64(h64, w64, y, seg), ref64(href, w, y, seg)
    exp, _ = F.dro_loss(pol["response"], ref["response"], pol["prompt"], ref["prompt"], R, gid, beta=0.1, log_z0=2.0)
    exp.backward()
    compare(loss, exp, [(hl.grad, h64.grad), (wl.grad, w64.grad)])
    assert torch.all(hl.grad[(seg == 1).unsqueeze(-1).expand_as(hl)] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_typo_module_with_unsup_rows(backend):
    S = 7  # rows 0..5 are 3 pairs (chosen 0,2,4 / rejected 1,3,5 after the mask), row 6 is a reference sample
    h, _, w, y, seg = make(S, 6)
    unsup = torch.tensor([False, True, False, False, False, False, False])
    hl, wl = leaves(h, w)
    loss, metrics = fastpref.TYPOLoss(lam=0.5, backend=backend)(hl, wl, y, seg, unsup=unsup)
    loss.backward()
    h64, w64 = leaves(h.double(), w.double())
    lp = ref64(h64, w64, y, seg)["response"]
    cw, cl = lp[~unsup].chunk(2)
    exp, _ = F.typo_loss(cw, cl, lp[unsup], lam=0.5)
    exp.backward()
    compare(loss, exp, [(hl.grad, h64.grad), (wl.grad, w64.grad)])
    assert "logps/unsup" in metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_auxdpo_module_head_penalty(backend):
    S, num_examples = 4, 5
    h, href, w, y, seg = make(S, 7)
    idx = torch.tensor([3, 1])
    mod = fastpref.AuxDPOLoss(num_examples, beta=0.2, lambda_null=0.7, lambda_amp=0.05, cap=1.5, backend=backend)
    with torch.no_grad():
        mod.delta_raw.copy_(torch.randn(2 * num_examples, generator=torch.Generator().manual_seed(8)))
    hl, wl = leaves(h, w)
    loss, metrics = mod(hl, wl, y, seg, example_index=idx, ref_hidden=href, ref_weight=w)
    loss.backward()

    h64, w64 = leaves(h.double(), w.double())
    raw64 = mod.delta_raw.detach().double().requires_grad_()
    delta64 = 1.5 * torch.tanh(raw64)  # delta = cap * tanh(delta_raw)
    dw, dl = delta64[2 * idx], delta64[2 * idx + 1]
    resp = torch.where(seg == 1, 0, seg)
    w_ref = w.double().requires_grad_()
    pen = param_null_penalty(lambda: sequence_logprobs_reference(href.double(), w_ref, y, resp)["response"], [w_ref],
                             torch.cat([dw, dl]))
    cw, cl = ref64(h64, w64, y, seg)["response"].chunk(2)
    rw, rl = ref64(href, w, y, seg)["response"].chunk(2)
    exp, _ = F.auxdpo_loss(cw, cl, rw, rl, dw, dl, beta=0.2, null_penalty=pen, lambda_null=0.7, lambda_amp=0.05)
    exp.backward()
    compare(loss, exp, [(hl.grad, h64.grad), (wl.grad, w64.grad), (mod.delta_raw.grad, raw64.grad)], tol=1e-4)
    assert metrics["auxdpo/null_penalty"] > 0
    untouched = torch.ones(2 * num_examples, dtype=torch.bool)
    untouched[torch.cat([2 * idx, 2 * idx + 1])] = False
    assert torch.all(mod.delta_raw.grad[untouched] == 0)


def test_auxdpo_module_delta_layout_init_and_optimizer_group():
    """The authors' layout: delta = cap tanh(delta_raw), delta_raw ~ N(0, 1e-3), its own group at lr 5e-3 without
    weight decay (docs/methods.md section 5)."""
    torch.manual_seed(0)
    mod = fastpref.AuxDPOLoss(5000)
    assert mod.delta_raw.shape == (10000,) and mod.delta_raw.requires_grad
    raw = mod.delta_raw.detach()
    assert 0.9e-3 < float(raw.std()) < 1.1e-3 and abs(float(raw.mean())) < 1e-4
    torch.testing.assert_close(mod.delta.detach(), torch.tanh(raw))
    with torch.no_grad():
        mod.delta_raw.fill_(50.0)
    assert float(mod.delta.detach().max()) <= 1.0  # bounded by cap
    group = mod.optimizer_group()
    assert group["lr"] == 5e-3 and group["weight_decay"] == 0.0 and group["params"] == [mod.delta_raw]


@pytest.mark.parametrize("backend", BACKENDS)
def test_drdo_module_reward_head_on_last_response_row(backend):
    S = 4
    h, _, w, y, seg = make(S, 9)
    y[:, -1], seg[:, -1] = -100, 0  # every last response token has its own hidden row
    oracle = torch.randn(S)
    torch.manual_seed(0)
    mod = fastpref.DRDOLoss(hidden_size=D, alpha=0.3, gamma=2.0, backend=backend)
    hl, wl = leaves(h, w)
    loss, _ = mod(hl, wl, y, seg, oracle_rewards=oracle)
    loss.backward()

    h64, w64 = leaves(h.double(), w.double())
    head64 = nn.Linear(D, 1).double()
    head64.load_state_dict(mod.reward_head.state_dict())
    # the row OF the last response token: one after the last scored row (which predicts it)
    last = torch.tensor([int(torch.nonzero((seg[i] == 2) & (y[i] != -100)).max()) + 1 for i in range(S)])
    rhat = head64(h64[torch.arange(S), last]).squeeze(-1)
    cw, cl = ref64(h64, w64, y, seg)["response"].chunk(2)
    exp, _ = F.drdo_loss(cw, cl, *rhat.chunk(2), *oracle.chunk(2), alpha=0.3, gamma=2.0)
    exp.backward()
    compare(loss, exp, [(hl.grad, h64.grad), (wl.grad, w64.grad), (mod.reward_head.weight.grad, head64.weight.grad)])


def test_drdo_rewards_see_the_last_response_token():
    """Issue 10: two responses that differ only in their last token got identical student rewards (the head read the
    row predicting that token).  With the row of the token itself, the rewards differ."""
    torch.manual_seed(1)
    emb = torch.randn(V, D)
    ids = torch.randint(0, V, (2, T))
    ids[1] = ids[0]
    ids[1, 9] = (ids[0, 9] + 1) % V  # response = tokens 4..9, the last one differs
    h = torch.cumsum(emb[ids], dim=1)  # a causal "model": row t sees tokens 0..t
    labels = torch.full((2, T), -100)
    labels[:, 3:9] = ids[:, 4:10]  # row t predicts token t+1
    seg = torch.zeros(2, T, dtype=torch.long)
    seg[:, 3:9] = 2
    mod = fastpref.DRDOLoss(hidden_size=D, backend="torch")
    rows = fastpref.heads.base.last_response_rows(labels, seg)
    assert rows.tolist() == [9, T + 9]
    rhat = mod.reward_head(h.reshape(-1, D)[rows]).squeeze(-1)
    assert abs(float((rhat[0] - rhat[1]).detach())) > 1e-4
    labels[0, -1], seg[0, -1] = 5, 2  # a response labeled on the last row has no hidden row for its last token
    with pytest.raises(ValueError, match="sequence 0.*reward_hidden"):
        fastpref.heads.base.last_response_rows(labels, seg)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: fastpref.DPOLoss(beta=-1.0), "DPOLoss: dpo_loss: `beta`"),
        (lambda: fastpref.DPOLoss(loss_type="dpo"), "DPOLoss: .*unknown loss_type"),
        (lambda: fastpref.DPOLoss(loss_type="robust", label_smoothing=0.5), "DPOLoss: .*label_smoothing"),
        (lambda: fastpref.DPOLoss(loss_kwargs={"discopop_tau": 0.0}), "DPOLoss: .*discopop_tau"),
        (lambda: fastpref.DPOLoss(loss_kwargs={"no_such": 1}), "DPOLoss: .*no_such"),
        (lambda: fastpref.DPOLoss(backend="cuda"), "DPOLoss: `backend`"),
        (lambda: fastpref.DPOLoss(logit_scale=0.0), "DPOLoss: `logit_scale`"),
        (lambda: fastpref.DPOLoss(softcap=float("inf")), "DPOLoss: `softcap`"),
        (lambda: fastpref.SimPOLoss(gamma=-1.0), "SimPOLoss: .*gamma"),
        (lambda: fastpref.PROLoss(eta=0.0, alpha=1.0), "PROLoss: .*no optimum"),
        (lambda: fastpref.PROLoss(feedback="binary", lam=1.0), "PROLoss: .*`lam` must be > 1"),
        (lambda: fastpref.PROLoss(feedback="scalar", lam=0.2), "PROLoss: .*no optimum"),
        (lambda: fastpref.PROLoss(feedback="listwise"), "PROLoss: .*feedback"),
        (lambda: fastpref.PROLoss(hyper_response="approx"), "PROLoss: .*hyper_response"),
        (lambda: fastpref.DROLoss(beta=0.0), "DROLoss: .*beta"),
        (lambda: fastpref.TYPOLoss(lam=-1.0), "TYPOLoss: .*lam"),
        (lambda: fastpref.AuxDPOLoss(3, beta=0.0), "AuxDPOLoss: .*beta"),
        (lambda: fastpref.AuxDPOLoss(3, lambda_amp=-1.0), "AuxDPOLoss: .*lambda_amp"),
        (lambda: fastpref.AuxDPOLoss(3, cap=0.0), "AuxDPOLoss: `cap`"),
        (lambda: fastpref.DRDOLoss(hidden_size=D, gamma=-1.0), "DRDOLoss: .*gamma"),
    ],
)
def test_module_settings_checked_at_construction(build, match):
    """Issue 9, item 11: a bad setting fails when the module is built, not after two fused passes."""
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_module_accepts_triton_backend_without_running_a_kernel_at_construction(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU machine building modules for a later CUDA run
    for build in (lambda: fastpref.DPOLoss(backend="triton"), lambda: fastpref.PROLoss(backend="triton"),
                  lambda: fastpref.DRDOLoss(hidden_size=D, backend="triton")):
        build()


def test_reference_errors_name_ref_arguments():
    """Issue 9, item 11: errors about the reference pass name `ref_hidden` / `ref_weight`, not `hidden` / `weight`."""
    h, href, w, y, seg = make(4, 13)
    mod = fastpref.DPOLoss()
    with pytest.raises(ValueError, match="`ref_weight`.*`ref_hidden`"):
        mod(h, w, y, seg, ref_hidden=href, ref_weight=w[:, :-1])
    with pytest.raises(TypeError, match="`ref_weight`.*`ref_hidden`"):
        mod(h, w, y, seg, ref_hidden=href, ref_weight=w.double())
    with pytest.raises(ValueError, match="`ref_hidden` holds non-finite"):
        bad = href.clone()
        bad[0, 0, 0] = float("nan")
        mod(h, w, y, seg, ref_hidden=bad, ref_weight=w)
    with pytest.raises(TypeError, match="`ref_hidden` must be a torch.Tensor"):
        mod(h, w, y, seg, ref_hidden=href.numpy(), ref_weight=w)
    aux = fastpref.AuxDPOLoss(3)
    with pytest.raises(ValueError, match="`ref_weight`"):
        aux(h, w, y, seg, example_index=torch.tensor([0, 1]), ref_hidden=href, ref_weight=w[:-1, :-1])


def test_module_errors():
    h, href, w, y, seg = make(4, 10)
    with pytest.raises(ValueError, match="reference"):
        fastpref.DPOLoss()(h, w, y, seg)
    with pytest.raises(ValueError, match="even"):
        fastpref.DPOLoss()(h[:3], w, y[:3], seg[:3], ref_hidden=href[:3], ref_weight=w)
    with pytest.raises(ValueError, match="`ref_weight`"):
        fastpref.DPOLoss()(h, w, y, seg, ref_hidden=href)
    with pytest.raises(ValueError, match="`segment_ids`"):
        fastpref.DROLoss(beta=0.1, log_z0=0.0)(h, w, y, None, rewards=torch.randn(4), group_ids=torch.arange(4),
                                              ref_hidden=href, ref_weight=w)
    aux = fastpref.AuxDPOLoss(3)
    with pytest.raises(ValueError, match="`example_index`"):
        aux(h, w, y, seg, example_index=torch.tensor([0, 3]), ref_hidden=href, ref_weight=w)
    with pytest.raises(ValueError, match="`num_examples`"):
        fastpref.AuxDPOLoss(0)
    with pytest.raises(ValueError, match="`unsup`"):
        fastpref.TYPOLoss()(h, w, y, seg, unsup=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_size"):
        fastpref.DRDOLoss()
    with pytest.raises(ValueError, match="`oracle_rewards`"):
        fastpref.DRDOLoss(hidden_size=D)(h, w, y, seg, oracle_rewards=torch.randn(3))


def test_typo_module_without_unsup_rows():
    h, _, w, y, seg = make(4, 12)
    loss, metrics = fastpref.TYPOLoss(lam=0.5)(h, w, y, seg)
    cw, cl = ref64(h, w, y, seg)["response"].chunk(2)
    torch.testing.assert_close(loss.double(), torch.nn.functional.softplus(cl - cw).mean(), rtol=1e-5, atol=1e-6)
