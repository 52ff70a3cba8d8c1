"""AuxDPO (seed ``003``: Gopalan, Ray Chowdhury & Banerjee, "Why DPO is a Misspecified Estimator and How to Fix
It", 2025), METHODS.md section 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused
from ._checks import Checker
from ._ops import pair_metrics

# Not fixed by METHODS.md or the seed's surviving text; tune per task.  lambda_null = 1 weighs the null-space
# penalty like the DPO term; lambda_amp = 0.01 only bounds delta (the bounded sign, METHODS.md section 5).
DEFAULT_LAMBDA_NULL = 1.0
DEFAULT_LAMBDA_AMP = 0.01


def auxdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    delta_chosen: torch.Tensor,
    delta_rejected: torch.Tensor,
    *,
    beta: float,
    null_penalty: torch.Tensor | None = None,
    lambda_null: float = DEFAULT_LAMBDA_NULL,
    lambda_amp: float = DEFAULT_LAMBDA_AMP,
    backend: str = "auto",
):
    r"""AuxDPO loss (seed 003; METHODS.md section 5)::

        m_i  = beta * ( rho_w,i - rho_l,i + delta_w,i - delta_l,i )
        loss = -mean_i log sigma(m_i)  +  lambda_null * ||A_B delta_B||^2  +  lambda_amp * ||delta_B||^2

    ``delta_chosen`` / ``delta_rejected`` are the batch's entries of the per-example offsets (``delta_{2i-1}``,
    ``delta_{2i}``; gathered from the trainable parameter by dataset index), ``||delta_B||^2`` their summed squares.
    ``null_penalty`` is the already-computed ``||A_B delta_B||^2`` (a one-value tensor, >= 0, differentiable in
    ``delta``; ``A_B delta_B = sum_j delta_j grad_theta0 log pi_ref(y_j)``), or None to omit the term.
    ``beta`` has no default (as in the contract); ``lambda_null = 1``, ``lambda_amp = 0.01`` are placeholders
    the seed does not fix.  ``backend``: ``'auto' | 'triton' | 'torch'``; the fused kernel computes the sigmoid term
    and its gradients to the log-probs and to delta (the penalties are plain PyTorch either way).

    Metrics: the DPO six (``rewards/* = beta rho`` without delta), ``auxdpo/delta_margin`` (mean
    ``delta_w - delta_l``), ``auxdpo/delta_sq`` (``||delta_B||^2``), ``auxdpo/null_penalty`` (when given).
    """
    ck = Checker("auxdpo_loss")
    cw = ck.floats("chosen_logps", chosen_logps)
    n = cw.numel()
    cl = ck.floats("rejected_logps", rejected_logps, n)
    rw = ck.floats("ref_chosen_logps", ref_chosen_logps, n)
    rl = ck.floats("ref_rejected_logps", ref_rejected_logps, n)
    dw = ck.floats("delta_chosen", delta_chosen, n)
    dl = ck.floats("delta_rejected", delta_rejected, n)
    beta = ck.number("beta", beta, gt=0.0)
    lambda_null = ck.number("lambda_null", lambda_null, ge=0.0)
    lambda_amp = ck.number("lambda_amp", lambda_amp, ge=0.0)
    pen = None
    if null_penalty is not None:
        pen = ck.scalar_tensor("null_penalty", null_penalty)
        if not bool(pen >= 0):
            raise ck.value_error(f"`null_penalty` is a squared norm and must be >= 0, got {float(pen)}")
    cw, cl, rw, rl, dw, dl = (ck.cast(x) for x in (cw, cl, rw, rl, dw, dl))

    r_w, r_l = beta * (cw - rw), beta * (cl - rl)
    m = r_w - r_l + beta * (dw - dl)
    delta_sq = dw.pow(2).sum() + dl.pow(2).sum()
    nll = None
    if fused.use_fused(backend, cw, cl, rw, rl, dw, dl, fn="auxdpo_loss"):
        nll = fused.auxdpo_pairs(cw, cl, rw, rl, dw, dl, beta=beta)
    if nll is None:
        nll = -F.logsigmoid(m).mean()
    loss = nll + lambda_amp * delta_sq
    if pen is not None:
        loss = loss + lambda_null * ck.cast(pen)
    metrics = pair_metrics(r_w, r_l, cw, cl)
    metrics["auxdpo/delta_margin"] = (dw - dl).detach().mean()
    metrics["auxdpo/delta_sq"] = delta_sq.detach()
    if pen is not None:
        metrics["auxdpo/null_penalty"] = pen.detach()
    return loss, metrics
