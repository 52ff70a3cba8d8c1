"""DRO -- Direct Reward Optimization (seed ``001``: "Direct Reward Optimization: A Point-wise Alignment Approach",
anonymous, under review).  The formula is docs/methods.md section 3.

Not Richemond et al. 2024 ("Offline Regularised Reinforcement Learning for Large Language Models Alignment"), whose
DRO-V learns a value network; this method regresses on the detached prompt log-ratio plus an offset ``log_z0``.
Defaults ``beta = 0.1``, ``log_z0 = 50``: the seed's reported setting (its Fig. 2(b), the chosen reward falling
with ``log_z0`` at slope ``-beta``, is reproduced under the ``beta * log_z0`` reading used here; ``fastpref
reproduce`` checks it).
"""

from __future__ import annotations

import torch

from . import fused
from ._checks import Checker
from ._ops import Groups

DEFAULT_BETA = 0.1
DEFAULT_LOG_Z0 = 50.0


def dro_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    prompt_logps: torch.Tensor,
    ref_prompt_logps: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
    log_z0: float = DEFAULT_LOG_Z0,
    backend: str = "auto",
):
    r"""DRO loss (seed 001; docs/methods.md section 3): point-wise regression on an explicit reward ``R``::

        beta log Z_i = sg( beta (plogp_i - ref_plogp_i) ) + beta * log_z0      # prompt log-ratio, detached
        L_i          = ( R_i - beta (logp_i - ref_logp_i) - beta log Z_i )^2
        loss         = mean over prompts ( mean over that prompt's responses of L_i )

    Args:
        logps, ref_logps: response log-probs ``[N]`` (policy, reference).
        prompt_logps, ref_prompt_logps: prompt-segment log-probs ``[N]`` of each row (every prompt token after the
            first); detached here whatever their ``requires_grad``.
        rewards: explicit rewards ``R`` ``[N]`` (data, from any reward model).
        group_ids: integer prompt id ``[N]`` for the per-prompt mean (a prompt may have a single response).
        beta: temperature (> 0; default 0.1, the seed's setting).
        log_z0: offset of ``log Z`` (default 50, the seed's setting; the seed sweeps it in [-50, 500]: larger moves
            every target down, the chosen reward at slope ``-beta``).
        backend: ``'auto' | 'triton' | 'torch'``: the fused loss-head kernel (``fastpref.losses.fused``; rows
            weighted ``1 / (G K_g)``) or this PyTorch expression.

    Metrics: ``rewards/mean`` and ``logps/mean`` (means of ``beta rho`` and ``logp``), ``dro/residual`` (mean of
    ``R - beta rho - beta log Z``), ``dro/log_z`` (mean ``beta log Z``), ``dro/target`` (mean ``R``).
    """
    ck = Checker("dro_loss")
    lp = ck.floats("logps", logps)
    n = lp.numel()
    ref = ck.floats("ref_logps", ref_logps, n)
    plp = ck.floats("prompt_logps", prompt_logps, n)
    rplp = ck.floats("ref_prompt_logps", ref_prompt_logps, n)
    R = ck.floats("rewards", rewards, n)
    gid = ck.group_ids("group_ids", group_ids, n)
    beta = ck.number("beta", beta, gt=0.0)
    log_z0 = ck.number("log_z0", log_z0)
    lp, ref, plp, rplp, R = (ck.cast(x) for x in (lp, ref, plp, rplp, R))

    groups = Groups(gid)
    with torch.no_grad():
        beta_log_z = beta * (plp - rplp) + beta * log_z0
    implicit = beta * (lp - ref)
    resid = R - implicit - beta_log_z
    loss = None
    if fused.use_fused(backend, lp, ref, plp, rplp, R, fn="dro_loss"):
        loss = fused.dro(groups, lp, ref, plp, rplp, R, beta=beta, log_z0=log_z0)
    if loss is None:
        loss = groups.mean(resid.pow(2)).mean()
    with torch.no_grad():
        metrics = {
            "rewards/mean": implicit.mean(),
            "logps/mean": lp.mean(),
            "dro/residual": resid.mean(),
            "dro/log_z": beta_log_z.mean(),
            "dro/target": R.mean(),
        }
    return loss, metrics
