"""AuxDPO (seed ``003``: Gopalan, Ray Chowdhury & Banerjee, "Why DPO is a Misspecified Estimator and How to Fix
It", 2025), docs/methods.md section 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused
from ._checks import Checker
from ._ops import pair_metrics

# Defaults of the authors' public code (docs/methods.md section 5): lambda_null = 1.0 weighs the null-space penalty like
# the DPO term; lambda_amp = 0.01 weighs the anti-collapse term; cap = 1.0 bounds delta = cap * tanh(delta_raw);
# delta_raw starts from N(0, 1e-3) (read as standard deviation 1e-3) and trains in its own optimizer group at
# learning rate 5e-3 without weight decay (at a policy's ~5e-7 delta never moves and AuxDPO is DPO).
DEFAULT_LAMBDA_NULL = 1.0
DEFAULT_LAMBDA_AMP = 0.01
DEFAULT_CAP = 1.0
DEFAULT_INIT_STD = 1e-3
DEFAULT_DELTA_LR = 5e-3


def bounded_delta(delta_raw: torch.Tensor, cap: float = DEFAULT_CAP) -> torch.Tensor:
    """AuxDPO's offsets ``delta = cap * tanh(delta_raw)`` (docs/methods.md section 5; ``|delta| < cap``)."""
    if not isinstance(delta_raw, torch.Tensor) or not delta_raw.is_floating_point():
        raise TypeError("bounded_delta: `delta_raw` must be a floating torch.Tensor")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (0 < cap < float("inf")):
        raise ValueError(f"bounded_delta: `cap` must be a finite number > 0, got {cap!r}")
    return cap * torch.tanh(delta_raw)


def auxdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    delta_chosen: torch.Tensor,
    delta_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    null_penalty: torch.Tensor | None = None,
    lambda_null: float = DEFAULT_LAMBDA_NULL,
    lambda_amp: float = DEFAULT_LAMBDA_AMP,
    backend: str = "auto",
):
    r"""AuxDPO loss (seed 003: Gopalan, Ray Chowdhury & Banerjee, "Why DPO is a Misspecified Estimator and How to
    Fix It", 2025; docs/methods.md section 5)::

        m_i  = beta * ( rho_w,i - rho_l,i + delta_w,i - delta_l,i )
        loss = -mean_i log sigma(m_i)  +  lambda_null * ||A_B delta_B||^2
               -  lambda_amp / 2 * ( mean_i delta_w,i^2 + mean_i delta_l,i^2 )

    The last term is the **anti-collapse** term of the seed's objective (which asks to "maintain ||delta_B|| > 0
    ... to avoid the trivial solution"), in the authors' code's form: it rewards offsets away from 0, and is a batch
    *mean* like the DPO term, so its weight does not grow with the batch.  It is bounded because ``delta`` is:
    pass the already-bounded offsets ``delta = cap * tanh(delta_raw)`` (:func:`bounded_delta`; the batch's entries
    ``delta_{2i-1}``, ``delta_{2i}`` of the per-example parameter, gathered by dataset index).
    ``null_penalty`` is the already-computed ``||A_B delta_B||^2`` (a one-value tensor, >= 0, differentiable in
    ``delta``; ``A_B delta_B = sum_j delta_j grad_theta0 log pi_ref(y_j)``: :func:`fastpref.losses.head_null_penalty`
    for the LM head, :func:`fastpref.losses.param_null_penalty` for a parameter list), or None to omit the term.

    Defaults: ``beta = 0.1`` (TRL's ``DPOConfig.beta``; ours), and from the authors' public code
    ``lambda_null = 1.0``, ``lambda_amp = 0.01``; ``delta``
    itself: ``cap = 1.0``, ``delta_raw ~ N(0, 1e-3)``, own optimizer group at learning rate 5e-3, no weight decay
    (:class:`fastpref.AuxDPOLoss`, :class:`fastpref.trainers.AuxDPOTrainer`).  ``backend``: ``'auto' | 'triton' |
    'torch'``; the fused kernel computes the sigmoid term and its gradients to the log-probs and to delta (the
    penalties are plain PyTorch either way).

    Metrics: the DPO six (``rewards/* = beta rho`` without delta), ``auxdpo/delta_margin`` (mean
    ``delta_w - delta_l``), ``auxdpo/delta_sq`` (``mean delta_w^2 + mean delta_l^2``), ``auxdpo/null_penalty``
    (when given).
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
    delta_sq = dw.pow(2).mean() + dl.pow(2).mean()
    nll = None
    if fused.use_fused(backend, cw, cl, rw, rl, dw, dl, fn="auxdpo_loss"):
        nll = fused.auxdpo_pairs(cw, cl, rw, rl, dw, dl, beta=beta)
    if nll is None:
        nll = -F.logsigmoid(m).mean()
    loss = nll - 0.5 * lambda_amp * delta_sq  # anti-collapse: rewards |delta| > 0
    if pen is not None:
        loss = loss + lambda_null * ck.cast(pen)
    metrics = pair_metrics(r_w, r_l, cw, cl)
    metrics["auxdpo/delta_margin"] = (dw - dl).detach().mean()
    metrics["auxdpo/delta_sq"] = delta_sq.detach()
    if pen is not None:
        metrics["auxdpo/null_penalty"] = pen.detach()
    return loss, metrics
