"""ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference Model"), reference-free.

Source: TRL's ``ORPOTrainer.odds_ratio_loss`` and ``get_batch_loss_metrics`` (``trl/experimental/orpo``, TRL 1.16),
transcribed term for term and tested against TRL's own code in ``tests/test_losses_orpo_cpo.py``; Liger's
``LigerFusedLinearORPOFunction`` computes the same odds-ratio term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import Checker
from ._ops import pair_metrics, safe_log1mexp
from .nll import nll_loss

DEFAULT_BETA = 0.1  # TRL's ORPOConfig.beta (the paper's lambda)


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
    nll_weight: float = 1.0,
    nll_logps: torch.Tensor | None = None,
    nll_lengths: torch.Tensor | None = None,
):
    r"""ORPO loss over summed response log-probs and lengths (averaged here, as ORPO scores the per-token mean)::

        a_w, a_l  = logp_w / n_w, logp_l / n_l                         (length-averaged log-probs, <= 0)
        log_odds  = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l}))
        loss      = nll_weight * NLL  -  beta * mean( log sigma(log_odds) )
        NLL       = - sum_i nll_logps_i / sum_i nll_lengths_i          (token mean; :func:`nll_loss`)

    ``log(1 - e^a)`` is :func:`fastpref.losses.functional.safe_log1mexp`: exact for ``a <= -2^-24`` (TRL's ``log1mexp``
    there), finite where an average log-prob is 0 (a certain response), where ``log(1 - 1)`` is ``-inf``.

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed response log-probs (differentiable).
        chosen_lengths, rejected_lengths: ``[B]`` response token counts.
        beta: weight of the odds-ratio term (the paper's lambda; TRL's ``ORPOConfig.beta`` default 0.1).
        nll_weight: weight of the NLL term (1: ORPO; 0 leaves the odds-ratio term alone).
        nll_logps, nll_lengths: the NLL's token sums and counts per chosen sequence; default the chosen responses
            (the paper's ``L_SFT``, Liger's with a prompt-masked target). TRL's ``ORPOTrainer`` scores the prompt
            too: pass the chosen sequences' prompt + response sums and counts.

    Returns:
        ``(loss, metrics)``; metrics as TRL's ORPOTrainer names them: ``rewards/chosen`` (``beta * a_w``),
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen`` (``a_w``),
        ``logps/rejected``, ``nll_loss``, ``log_odds_ratio`` (mean ``log sigma(log_odds)``), ``log_odds_chosen``
        (mean ``log_odds``).
    """
    ck = Checker("orpo_loss")
    cw, cl, n_w, n_l = ck.pairs_with_lengths(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
    beta = ck.number("beta", beta, gt=0.0)
    nll_weight = ck.number("nll_weight", nll_weight, ge=0.0)
    if (nll_logps is None) != (nll_lengths is None):
        raise ck.value_error("`nll_logps` and `nll_lengths` must be given together")
    if nll_logps is not None:
        nll_logps = ck.floats("nll_logps", nll_logps, cw.numel())
        nll_lengths = ck.lengths("nll_lengths", nll_lengths, cw.numel())
    cw = ck.nonpositive("chosen_logps", cw, "log-probs")
    cl = ck.nonpositive("rejected_logps", cl, "log-probs")
    cw, cl = ck.cast(cw), ck.cast(cl)
    avg_w, avg_l = cw / n_w.to(ck.dtype), cl / n_l.to(ck.dtype)
    log_odds = (avg_w - avg_l) - (safe_log1mexp(avg_w) - safe_log1mexp(avg_l))
    ratio = F.logsigmoid(log_odds)
    nll, _ = nll_loss(cw, n_w) if nll_logps is None else nll_loss(nll_logps, nll_lengths)
    nll = nll.to(ck.dtype)
    loss = nll_weight * nll - beta * ratio.mean()
    metrics = pair_metrics(beta * avg_w, beta * avg_l, avg_w, avg_l)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics
