"""KTO (Ethayarajh et al., 2024) over per-sequence log-probs: the binary-feedback peer of PRO-B.

Source: TRL's ``KTOTrainer._compute_loss`` (``trl/trainer/kto_trainer.py``, TRL 1.16), transcribed term for term
(tested against TRL's own code in ``tests/test_losses_trl_parity.py``).
"""

from __future__ import annotations

import torch

from ._checks import Checker

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl: torch.Tensor | float | None = None,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
):
    r"""KTO loss (TRL ``KTOTrainer``).  Rows are single responses with ``labels`` in {0, 1} (1 = desirable)::

        rho   = logp - ref_logp
        z_ref = clamp(sg(mean(kl_logps - ref_kl_logps)), min=0)       # or the given `kl`, detached and clamped
        kto:               desirable  1 - sigma(beta (rho - z_ref))     undesirable  1 - sigma(beta (z_ref - rho))
        apo_zero_unpaired: desirable  1 - sigma(beta rho)               undesirable  sigma(beta rho)
        loss  = mean over rows of  (desirable_weight | undesirable_weight) * row loss

    The KL reference point is trainer state in TRL (policy and reference log-probs of mismatched prompt/completion
    pairs, averaged over the batch and gathered over ranks): pass either the estimate ``kl`` (a float or one-value
    tensor; it is detached and clamped at 0 like TRL) or the rows ``kl_logps`` / ``ref_kl_logps`` to average here.
    ``loss_type="kto"`` needs one of them (pass ``kl=0.0`` to drop it); ``apo_zero_unpaired`` uses none.

    Metrics (TRL names, means over the rows of each class, present only when that class has rows):
    ``rewards/chosen``, ``logps/chosen`` (desirable), ``rewards/rejected``, ``logps/rejected`` (undesirable),
    ``rewards/margins`` (when both are present), and ``kl``.
    """
    ck = Checker("kto_loss")
    lp = ck.floats("logps", logps)
    n = lp.numel()
    ref = ck.floats("ref_logps", ref_logps, n)
    lab = ck.labels("labels", labels, n)
    beta = ck.number("beta", beta, gt=0.0)
    dw = ck.number("desirable_weight", desirable_weight, ge=0.0)
    uw = ck.number("undesirable_weight", undesirable_weight, ge=0.0)
    ck.choice("loss_type", loss_type, KTO_LOSS_TYPES)
    if kl is not None and (kl_logps is not None or ref_kl_logps is not None):
        raise ck.value_error("pass either `kl` or `kl_logps`/`ref_kl_logps`, not both")
    if (kl_logps is None) != (ref_kl_logps is None):
        raise ck.value_error("`kl_logps` and `ref_kl_logps` must be given together")
    kl_t = None
    if kl is not None:
        if isinstance(kl, torch.Tensor):
            kl_t = ck.scalar_tensor("kl", kl)
        else:
            kl_t = torch.tensor(ck.number("kl", kl), device=lp.device)
    elif kl_logps is not None:
        klp = ck.floats("kl_logps", kl_logps)
        rklp = ck.floats("ref_kl_logps", ref_kl_logps, klp.numel())
    elif loss_type == "kto":
        raise ck.value_error(
            "loss_type='kto' needs the KL reference point: pass `kl` or `kl_logps` and `ref_kl_logps`"
        )

    lp, ref = ck.cast(lp), ck.cast(ref)
    dtype = ck.dtype
    if loss_type == "kto":
        if kl_t is None:
            kl_t = (ck.cast(klp) - ck.cast(rklp)).mean()
        kl_t = kl_t.detach().to(dtype).clamp(min=0)
    else:
        kl_t = torch.zeros((), dtype=dtype, device=lp.device)

    logratios = lp - ref
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (logratios - kl_t))
        rejected_losses = 1 - torch.sigmoid(beta * (kl_t - logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * logratios)
        rejected_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(lab, dw * chosen_losses, uw * rejected_losses)
    loss = losses.mean()

    metrics = {"kl": kl_t.detach()}
    with torch.no_grad():
        rewards = beta * logratios
        if bool(lab.any()):
            metrics["rewards/chosen"] = rewards[lab].mean()
            metrics["logps/chosen"] = lp[lab].mean()
        if bool((~lab).any()):
            metrics["rewards/rejected"] = rewards[~lab].mean()
            metrics["logps/rejected"] = lp[~lab].mean()
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics

