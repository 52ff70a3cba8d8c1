"""The NLL (SFT) term that preference methods add to their loss: CPO, ORPO, RPO, TRL's DPO ``sft`` loss type, and
Liger's ``compute_nll_loss`` option of every preference loss.

One definition serves all of them: the **token mean** of the chosen sequences' negative log-likelihood over the
whole batch, ``-sum_i logp_i / sum_i n_i``, where ``logp_i`` is the summed log-prob of the tokens the term scores in
chosen sequence ``i`` and ``n_i`` their number. Sources: TRL ``CPOTrainer.concatenated_forward`` /
``ORPOTrainer.concatenated_forward`` (``nn.CrossEntropyLoss()`` over the chosen rows: a mean over their scored
tokens), TRL ``DPOTrainer._compute_loss`` (``loss_type="sft"``: ``-chosen_per_token_logps[chosen_mask].mean()``) and
Liger ``LigerFusedLinearPreferenceBase`` (the chosen tokens' summed NLL divided by the number of chosen targets that
are not ``ignore_index``). Which tokens are scored differs between them (TRL's ORPO scores the prompt too): that is
the caller's choice of segment, not a different loss.
"""

from __future__ import annotations

import torch

from ._checks import Checker


def nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor):
    r"""NLL term of the chosen sequences, a token mean over the batch::

        loss = - sum_i logp_i / sum_i n_i

    Args:
        chosen_logps: ``[B]`` summed log-probs of the scored tokens of each chosen sequence (differentiable).
        chosen_lengths: ``[B]`` their token counts (> 0).

    Returns:
        ``(loss, {"nll_loss": loss.detach()})`` (TRL's CPO/ORPO metric name). Computed in at least fp32.
    """
    ck = Checker("nll_loss")
    cw = ck.floats("chosen_logps", chosen_logps)
    n_w = ck.lengths("chosen_lengths", chosen_lengths, cw.numel())
    cw = ck.cast(cw)
    loss = -cw.sum() / n_w.to(ck.dtype).sum()
    return loss, {"nll_loss": loss.detach()}
