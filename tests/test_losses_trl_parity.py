"""``fastpref.losses.functional`` against TRL's own trainer code (not a transcription).

Entry points (TRL 1.16): ``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss`` and ``CPOTrainer.cpo_loss``,
called as plain functions on a minimal trainer-like object (the attributes those methods read) and a fake model
whose ``log_probs`` output puts each sequence's log-prob on its first completion token (zeros elsewhere), so TRL's
token sums and token counts reproduce exactly the per-sequence inputs given to fastpref.  Reference log-probs go
in through TRL's ``precompute_ref_log_probs`` path (``inputs["ref_chosen_logps"]`` ...).
"""

from __future__ import annotations

import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from fastpref.losses.functional import DPO_LOSS_TYPES, dpo_loss, kto_loss, simpo_loss  # noqa: E402

TOL = dict(rtol=2e-6, atol=2e-6)  # fp32 rounding (the two sides order a few operations differently)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def _new_metrics():
    return {"train": defaultdict(list), "eval": defaultdict(list)}


class _FakeModel:
    """Returns the fused-LM-head outputs TRL reads; ``log_probs`` comes from a table keyed by the first input id."""

    def __init__(self, tables):
        self.tables = tables

    def __call__(self, input_ids=None, labels=None, fused_lm_head=True, **kwargs):
        lp, lssp = self.tables[int(input_ids[0, 0])]
        zeros = torch.zeros_like(lp.detach())
        return SimpleNamespace(
            log_probs=lp,
            log_sum_sq_probs=lssp if lssp is not None else zeros,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros(lp.shape, dtype=torch.bool),
        )


def _token_layout(seq_logps, lengths, T, marker):
    """input_ids / masks for rows with ``lengths[i]`` completion tokens at the end of a width-T row, and per-token
    log-probs ``[N, T-1]`` (shifted) holding ``seq_logps[i]`` at the first completion token (differentiable)."""
    n = seq_logps.numel()
    input_ids = torch.full((n, T), marker, dtype=torch.long)
    attention_mask = torch.ones(n, T, dtype=torch.long)
    completion_mask = torch.zeros(n, T, dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        assert 1 <= L <= T - 1
        completion_mask[i, T - L :] = 1
    first = T - lengths - 1  # first completion token in shifted coordinates
    lp = torch.zeros(n, T - 1).index_put((torch.arange(n), first), seq_logps)
    return input_ids, attention_mask, completion_mask, lp


def _pair_data(seed, B=6, T=24):
    g = torch.Generator().manual_seed(seed)
    pol = -(5.0 + 75.0 * torch.rand(2 * B, generator=g))
    ref = pol + 3.0 * torch.randn(2 * B, generator=g)
    lengths = torch.randint(1, T - 1, (2 * B,), generator=g)
    lssp = -torch.rand(2 * B, T - 1, generator=g)  # WPO's log sum_v p^2 per token
    return pol, ref, lengths, lssp, T


def _trl_dpo(loss_types, *, beta, label_smoothing=0.0, discopop_tau=0.05, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, loss_weights=None, use_weighting=False, seed=0):
    pol, ref, lengths, lssp, T = _pair_data(seed)
    B = pol.numel() // 2
    leaf = pol.clone().requires_grad_(True)
    input_ids, attention_mask, completion_mask, lp = _token_layout(leaf, lengths, T, marker=7)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=list(loss_types),
        loss_weights=list(loss_weights) if loss_weights else [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=_new_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    model = _FakeModel({7: (lp, lssp)})
    loss = DPOTrainer._compute_loss(fake, model, inputs, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}

    # fastpref on the same per-sequence scalars
    mine = pol.clone().requires_grad_(True)
    wpo = None
    if use_weighting:
        mask = completion_mask[:, 1:].float()
        w = torch.exp(((lp.detach() - lssp) * mask).sum(1) / mask.sum(1))
        wpo = w[:B] * w[B:]
    my_loss, my_metrics = dpo_loss(
        mine[:B], mine[B:], ref[:B], ref[B:], beta=beta,
        loss_type=list(loss_types) if len(loss_types) > 1 else loss_types[0],
        label_smoothing=label_smoothing, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_weights=loss_weights, wpo_weights=wpo,
    )
    my_loss.backward()
    return (loss.detach(), leaf.grad, metrics), (my_loss.detach(), mine.grad, my_metrics)


def _assert_same(trl_side, mine):
    (loss, grad, metrics), (my_loss, my_grad, my_metrics) = trl_side, mine
    assert my_loss.dtype == torch.float32
    torch.testing.assert_close(my_loss, loss, **TOL)
    torch.testing.assert_close(my_grad, grad, **TOL)
    for k in METRICS:
        assert not my_metrics[k].requires_grad
        torch.testing.assert_close(my_metrics[k].item(), metrics[k], rtol=1e-5, atol=1e-6, msg=k)


def _smoothing(loss_type):
    return {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_every_loss_type_matches_trl(loss_type, beta):
    _assert_same(*_trl_dpo([loss_type], beta=beta, label_smoothing=_smoothing(loss_type), seed=int(beta * 10)))


def test_every_trl_loss_type_is_covered():
    from trl.trainer.dpo_config import DPOConfig

    import inspect

    src = inspect.getsource(DPOTrainer._compute_loss)
    for t in DPO_LOSS_TYPES:
        assert f'loss_type == "{t}"' in src
    assert src.count("elif loss_type ==") + 1 == len(DPO_LOSS_TYPES), "TRL ships a loss type fastpref lacks"
    assert DPOConfig.__dataclass_fields__["beta"].default == 0.1


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_dpo_f_divergences_match_trl(f_divergence_type, loss_type):
    _assert_same(*_trl_dpo([loss_type], beta=0.1, label_smoothing=_smoothing(loss_type),
                           f_divergence_type=f_divergence_type, f_alpha_divergence_coef=0.3, seed=3))


def test_dpo_discopop_tau_matches_trl():
    _assert_same(*_trl_dpo(["discopop"], beta=0.2, discopop_tau=0.5, seed=4))


def test_dpo_multi_loss_with_weights_matches_trl():
    # MPO-style combination (TRL: loss_type list + loss_weights)
    _assert_same(*_trl_dpo(["sigmoid", "bco_pair", "sft"], beta=0.1, loss_weights=[0.8, 0.2, 1.0], seed=5))


# ('hinge' and 'sft' are left out: TRL 1.16 multiplies their per-sequence loss in place (`*=`) on a relu output /
# an expanded tensor, which autograd rejects in backward.)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "apo_zero"])
def test_dpo_wpo_weighting_matches_trl(loss_type):
    _assert_same(*_trl_dpo([loss_type], beta=0.1, use_weighting=True, seed=6))


# ---------------------------------------------------------------------------------------------------------- KTO


def _trl_kto(loss_type, *, beta=0.1, dw=1.0, uw=1.0, kl_shift=0.5, seed=0, N=10, T=20):
    g = torch.Generator().manual_seed(seed)
    pol = -(5.0 + 60.0 * torch.rand(N, generator=g))
    ref = pol + 3.0 * torch.randn(N, generator=g)
    labels = torch.rand(N, generator=g) < 0.5
    labels[0], labels[1] = True, False
    lengths = torch.randint(1, T - 1, (N,), generator=g)
    kl_pol = -(5.0 + 60.0 * torch.rand(N, generator=g))
    kl_ref = kl_pol - kl_shift + torch.randn(N, generator=g)
    kl_lengths = torch.randint(1, T - 1, (N,), generator=g)

    leaf = pol.clone().requires_grad_(True)
    input_ids, attention_mask, completion_mask, lp = _token_layout(leaf, lengths, T, marker=7)
    kl_ids, kl_attn, kl_cmask, kl_lp = _token_layout(kl_pol, kl_lengths, T, marker=8)
    calculate_kl = loss_type == "kto"
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        calculate_KL=calculate_kl,
        precompute_ref_logps=True,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        aux_loss_enabled=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=_new_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "label": labels,
        "ref_logps": ref,
    }
    if calculate_kl:
        batch.update(KL_input_ids=kl_ids, KL_attention_mask=kl_attn, KL_completion_mask=kl_cmask, ref_KL_logps=kl_ref)
    model = _FakeModel({7: (lp, None), 8: (kl_lp, None)})
    loss = KTOTrainer._compute_loss(fake, model, batch, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}

    mine = pol.clone().requires_grad_(True)
    kwargs = dict(kl_logps=kl_pol, ref_kl_logps=kl_ref) if calculate_kl else {}
    my_loss, my_metrics = kto_loss(mine, ref, labels, beta=beta, desirable_weight=dw, undesirable_weight=uw,
                                   loss_type=loss_type, **kwargs)
    my_loss.backward()
    torch.testing.assert_close(my_loss.detach(), loss.detach(), **TOL)
    torch.testing.assert_close(mine.grad, leaf.grad, **TOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        torch.testing.assert_close(my_metrics[k].item(), metrics[k], rtol=1e-5, atol=1e-6, msg=k)
    return my_metrics


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(loss_type):
    _trl_kto(loss_type, beta=0.2, dw=1.0, uw=1.33, seed=1)


def test_kto_negative_kl_is_clamped_like_trl():
    metrics = _trl_kto("kto", kl_shift=-3.0, seed=2)
    assert metrics["kl"].item() == 0.0


# ---------------------------------------------------------------------------------------------------------- SimPO


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_simpo(label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(7)
    B = 8
    cw, cl = -(5 + 75 * torch.rand(B, generator=g)), -(5 + 75 * torch.rand(B, generator=g))
    n_w, n_l = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    beta, gamma = 2.0, 0.7
    fake = SimpleNamespace(alpha=0.0, accelerator=_Accelerator(), loss_type="simpo", simpo_gamma=gamma, beta=beta,
                           label_smoothing=label_smoothing)
    avg = torch.cat([cw / n_w, cl / n_l]).requires_grad_(True)  # TRL's average_log_prob=True for simpo
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, avg[:B], avg[B:])
    losses.mean().backward()

    mine = torch.cat([cw, cl]).requires_grad_(True)
    loss, metrics = simpo_loss(mine[:B], mine[B:], n_w, n_l, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    loss.backward()
    torch.testing.assert_close(loss.detach(), losses.mean().detach(), **TOL)
    # d/dlogp = d/davg / n
    torch.testing.assert_close(mine.grad, avg.grad / torch.cat([n_w, n_l]).float(), **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean(), **TOL)
