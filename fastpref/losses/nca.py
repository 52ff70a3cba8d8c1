"""NCA / InfoNCA (Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards", NeurIPS 2024):
the scalar-reward peers of PRO-S.

Source: the authors' ``NCATrainer.nca_loss`` (github.com/thu-ml/Noise-Contrastive-Alignment, ``reward_trainer.py``)
for K responses with rewards, and TRL's ``nca_pair`` (= their ``preference_trainer.py``) for pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import Checker
from ._ops import Groups, group_top_metrics, pair_metrics

NCA_LOSS_TYPES = ("nca", "infonca")


def nca_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    alpha: float = 1e-3,
    loss_type: str = "nca",
):
    r"""NCA / InfoNCA over groups of responses to one prompt.  With ``r_k = beta (logp_k - ref_logp_k)`` and the
    soft labels ``q = softmax_k(R_k / alpha)`` of a group of K responses::

        nca:     L_g = -(1/K) sum_k log sigma(-r_k) - sum_k q_k log sigma(r_k)
        infonca: L_g = -sum_k q_k log softmax_k(r)_k
        loss     = mean over groups of L_g

    Two layouts:

    * **pairwise** (``rewards`` and ``group_ids`` both None): TRL's layout, the first half of the rows are the
      chosen responses, the second half the rejected ones (row ``b`` pairs with ``b + B``), hard labels ``q = (1, 0)``.
      NCA is then exactly TRL's ``nca_pair`` (``-log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)``) and
      InfoNCA is DPO's sigmoid loss.
    * **scalar** (``rewards`` and ``group_ids`` given): any K >= 2 per group, groups may differ in size.  ``alpha``
      is the soft-label temperature (default 1e-3 = the reference ``NCATrainer``'s ``temperature_alpha``, which
      makes ``q`` nearly one-hot on the best response).  With equal K the per-group mean equals the reference
      code's batch mean.

    Metrics: the DPO six; in scalar mode "chosen" is each group's highest-reward response and "rejected" the
    mean over the group's others (as the reference trainer's ``A0`` vs ``A1..A3``).
    """
    ck = Checker("nca_loss")
    lp = ck.floats("logps", logps)
    n = lp.numel()
    ref = ck.floats("ref_logps", ref_logps, n)
    beta = ck.number("beta", beta, gt=0.0)
    ck.choice("loss_type", loss_type, NCA_LOSS_TYPES)
    if (rewards is None) != (group_ids is None):
        raise ck.value_error("`rewards` and `group_ids` must be given together (scalar mode) or both omitted")
    scalar = rewards is not None
    if scalar:
        R = ck.floats("rewards", rewards, n)
        gid = ck.group_ids("group_ids", group_ids, n)
        alpha = ck.number("alpha", alpha, gt=0.0)
    elif n % 2:
        raise ck.value_error(f"pairwise layout needs an even number of rows (chosen then rejected), got {n}")

    lp, ref = ck.cast(lp), ck.cast(ref)
    r = beta * (lp - ref)
    if scalar:
        groups = Groups(gid)
        if bool((groups.counts < 2).any()):
            raise ck.value_error("`group_ids`: every group needs at least 2 responses")
        q = groups.softmax(ck.cast(R) / alpha)
    else:
        groups = Groups.pairs(n // 2, lp.device)
        q = torch.zeros(groups.num, 2, dtype=lp.dtype, device=lp.device)
        q[:, 0] = 1.0
    rp = groups.pad(r)
    mask = groups.mask
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    if loss_type == "nca":
        neg = torch.where(mask, F.logsigmoid(-rp), zero).sum(1) / groups.counts.to(r.dtype)
        pos = torch.where(mask, q * F.logsigmoid(rp), zero).sum(1)
        per_group = -neg - pos
    else:
        # padding slots hold -inf logits; zero them before the product, else 0 * -inf poisons q's gradient
        logp_model = torch.where(mask, torch.log_softmax(groups.pad(r, float("-inf")), dim=1), zero)
        per_group = -(q * logp_model).sum(1)
    loss = per_group.mean()

    if scalar:
        metrics = group_top_metrics(groups, ck.cast(R), r, lp)
    else:
        b = n // 2
        metrics = pair_metrics(r[:b], r[b:], lp[:b], lp[b:])
    return loss, metrics
