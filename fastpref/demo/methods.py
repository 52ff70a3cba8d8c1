"""The methods the demo trains, each a few lines over a patched model's per-sequence log-probs.

Every method gets a batch of rows from the training split (see :class:`Batch`), the policy's
:class:`fastpref.SequenceLogProbs` for those rows (and ``last_hidden`` for DRDO), the frozen reference's
precomputed log-probs where it has a reference, and returns ``(loss, metrics)`` from
:mod:`fastpref.losses.functional`.

Held-out accuracy uses each method's own reward: the implicit reward ``beta (logp - ref_logp)`` for methods with a
reference (their ``beta`` cancels in the ranking), the log-prob for reference-free TYPO and DRDO, and the
length-normalized log-prob for SimPO.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from fastpref.losses import functional as F
from fastpref.losses.auxdpo import DEFAULT_DELTA_LR, bounded_delta

__all__ = ["METHODS", "DEFAULT_METHODS", "MethodSpec", "Batch"]


@dataclasses.dataclass
class Batch:
    """One training step's rows and their data (all on the model's device).

    ``prompts`` / ``columns`` name the sequences (``Split.sequences``). Pairwise layout: ``n`` chosen rows, then
    ``n`` rejected rows (TRL's layout), then for TYPO ``n`` reference-sample rows. Group layout (binary, scalar):
    ``K`` rows per prompt, ``group_ids`` the prompt of each row.
    """

    prompts: torch.Tensor
    columns: torch.Tensor
    rewards: torch.Tensor  # true reward of each row (0 for reference samples)
    labels: torch.Tensor  # binary label of each row
    group_ids: torch.Tensor
    ref_response: Optional[torch.Tensor]  # reference log-probs of each row
    ref_prompt: Optional[torch.Tensor]
    num_pairs: int = 0


@dataclasses.dataclass
class Context:
    """What a loss may need beyond the batch (per-method trainable extras, the reference head)."""

    extras: dict
    ref_hidden_fn: Optional[Callable] = None  # (batch) -> (hidden [R, T, D], labels [R, T], segments [R, T])
    ref_weight: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str
    layout: str  # "pairs" | "pairs+unsup" | "groups"
    reference: bool  # needs the frozen reference model
    score: str  # held-out ranking: "implicit" | "logp" | "avg_logp"
    lr: float
    loss: Callable  # (logps, last_hidden, batch, ctx) -> (loss, metrics)
    note: str = ""


def _pairs(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:n], x[n: 2 * n]


def _dpo(loss_type: str, beta: float):
    def loss(lp, hidden, b, ctx):
        n = b.num_pairs
        cw, cl = _pairs(lp.response, n)
        rw, rl = _pairs(b.ref_response, n)
        nw, nl = _pairs(lp.n_response, n)
        return F.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type=loss_type, chosen_lengths=nw, rejected_lengths=nl)
    return loss


def _simpo(lp, hidden, b, ctx):
    n = b.num_pairs
    cw, cl = _pairs(lp.response, n)
    nw, nl = _pairs(lp.n_response, n)
    return F.simpo_loss(cw, cl, nw, nl, beta=2.0, gamma=0.5)


def _pro_pairwise(lp, hidden, b, ctx):
    n = 2 * b.num_pairs
    return F.pro_loss(lp.response[:n], b.ref_response[:n], feedback="pairwise", beta=0.1)


def _pro_binary(lp, hidden, b, ctx):
    return F.pro_loss(lp.response, b.ref_response, feedback="binary", labels=b.labels, beta=0.1, lam=2.0)


def _pro_scalar(lp, hidden, b, ctx):
    return F.pro_loss(lp.response, b.ref_response, feedback="scalar", rewards=b.rewards, group_ids=b.group_ids,
                      beta=0.1, tau=1.0)


DRO_BETA = 1.0
# log E_ref[exp(R / beta)] of this data (per content token E[e^w] = (10 e + 10 / e + 40) / 60, ~6 tokens): the
# constant part of log Z, so the targets start unbiased (log_z0 = 0 lets the detached prompt log-ratio drift them).
DRO_LOG_Z0 = 1.0


def _dro(lp, hidden, b, ctx):
    return F.dro_loss(lp.response, b.ref_response, lp.prompt, b.ref_prompt, b.rewards, b.group_ids,
                      beta=DRO_BETA, log_z0=DRO_LOG_Z0)


def _typo(lp, hidden, b, ctx):
    n = b.num_pairs
    cw, cl = _pairs(lp.response, n)
    return F.typo_loss(cw, cl, lp.response[2 * n:], lam=0.05)


AUXDPO_BETA = 0.1


def _auxdpo(lp, hidden, b, ctx):
    from fastpref.losses import head_null_penalty

    n = b.num_pairs
    cw, cl = _pairs(lp.response, n)
    rw, rl = _pairs(b.ref_response, n)
    delta = bounded_delta(ctx.extras["delta_raw"])  # [num_train_prompts, 2]: (chosen, rejected), cap * tanh
    idx = b.prompts[:n]
    dw, dl = delta[idx, 0], delta[idx, 1]
    ref_hidden, labels, segments = ctx.ref_hidden_fn(b)
    penalty = head_null_penalty(ref_hidden, ctx.ref_weight, labels, torch.cat([dw, dl]), segments)
    return F.auxdpo_loss(cw, cl, rw, rl, dw, dl, beta=AUXDPO_BETA, null_penalty=penalty,
                         lambda_null=1.0, lambda_amp=0.01)


def _drdo(lp, hidden, b, ctx):
    n = b.num_pairs
    head = ctx.extras["reward_head"]
    rhat = head(hidden[: 2 * n]).reshape(-1)
    cw, cl = _pairs(lp.response, n)
    hw, hl = _pairs(rhat, n)
    ow, ol = _pairs(b.rewards, n)  # oracle rewards = the true reward
    return F.drdo_loss(cw, cl, hw, hl, ow, ol, alpha=0.1, gamma=2.0)


LR = 1e-3  # one learning rate for every method's policy (AdamW, grad-norm clip 1 on the policy)
#: Method-owned parameters with their own learning rate (the authors' AuxDPO code trains delta at 5e-3).
EXTRA_LEARNING_RATES = {"delta_raw": DEFAULT_DELTA_LR}

_SPECS = [
    MethodSpec("dpo", "DPO (sigmoid)", "pairs", True, "implicit", LR, _dpo("sigmoid", 0.1), "beta 0.1"),
    MethodSpec("ipo", "IPO", "pairs", True, "implicit", LR, _dpo("ipo", 0.5), "beta (tau) 0.5"),
    MethodSpec("simpo", "SimPO", "pairs", False, "avg_logp", LR, _simpo, "beta 2, gamma 0.5"),
    MethodSpec("pro", "PRO-P (pairwise)", "pairs", True, "implicit", LR, _pro_pairwise, "beta 0.1, eta 1/3"),
    MethodSpec("pro-binary", "PRO-B (binary labels)", "groups", True, "implicit", LR, _pro_binary,
               "beta 0.1, lam 2; label = R > 0"),
    MethodSpec("pro-scalar", "PRO-S (scalar rewards)", "groups", True, "implicit", LR, _pro_scalar,
               "beta 0.1, tau 1, K = 4"),
    MethodSpec("dro", "DRO (scalar rewards)", "groups", True, "implicit", LR, _dro, f"beta {DRO_BETA:g}, log_z0 {DRO_LOG_Z0:g}"),
    MethodSpec("typo", "TYPO (+ reference samples)", "pairs+unsup", False, "logp", LR, _typo, "lam 0.05"),
    MethodSpec("auxdpo", "AuxDPO (head null-space penalty)", "pairs", True, "implicit", LR, _auxdpo,
               "beta 0.1, lambda_null 1, lambda_amp 0.01; delta lr 5e-3"),
    MethodSpec("drdo", "DRDO (oracle = true reward)", "pairs", False, "logp", LR, _drdo, "alpha 0.1, gamma 2"),
]

METHODS: dict[str, MethodSpec] = {s.name: s for s in _SPECS}
#: What ``fastpref demo`` trains with no ``--method``, in this order.
DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)
