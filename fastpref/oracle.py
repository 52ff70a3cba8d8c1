"""DRDO's oracle stage (docs/methods.md section 6): the oracle's rewards ``R*`` for the student run.

DRDO distills an oracle reward model into the policy. The oracle is trained first
(:class:`fastpref.trainers.DRDOOracleTrainer`: a causal LM with a reward head on the hidden state of the last response
token, loss :func:`fastpref.losses.drdo_oracle_loss` with ``a = 0.01``), then it annotates every preference pair with
``R*(x, y_w)`` and ``R*(x, y_l)``: :func:`annotate_oracle_rewards` writes them as the ``oracle_chosen`` /
``oracle_rejected`` columns that :class:`fastpref.trainers.OracleRewardTrainer` (``method="drdo"``) and
``FastPrefDPOTrainer(method="drdo")`` read. The rewards are data: computed without gradient, with the oracle in
eval mode, and frozen from then on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from .trainers.collators import PreferenceCollator
from .integrations.transformers import is_patched, patch

__all__ = ["ORACLE_COLUMNS", "annotate_oracle_rewards", "oracle_rewards"]

ORACLE_COLUMNS = ("oracle_chosen", "oracle_rejected")
_RESPONSE = 2


def oracle_rewards(model: nn.Module, reward_head: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The reward ``[N]`` of each row of a collated batch (``input_ids``, ``attention_mask``, ``segment_ids``): the
    reward head on the patched ``model``'s hidden state of each row's last response token (``.last_hidden``).
    Differentiable (the oracle stage trains through it); :func:`annotate_oracle_rewards` calls it without grad."""
    if not is_patched(model):
        raise ValueError("oracle_rewards: `model` must be patched (fastpref.integrations.transformers.patch)")
    segments = batch["segment_ids"]
    segments = torch.where(segments == _RESPONSE, segments, torch.zeros_like(segments))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], segment_ids=segments,
                logps_only=True)
    dtype = next(reward_head.parameters()).dtype
    return reward_head(out.last_hidden.to(dtype)).reshape(-1)


def _pad_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


@torch.no_grad()
def annotate_oracle_rewards(
    model: nn.Module,
    reward_head: nn.Module,
    dataset,
    *,
    batch_size: int = 8,
    collator: Optional[PreferenceCollator] = None,
    backend: str = "auto",
    columns: tuple[str, str] = ORACLE_COLUMNS,
):
    """Annotate preference pairs with a trained oracle's rewards ``R*`` (DRDO's oracle stage, docs/methods.md section 6).

    Args:
        model: the oracle causal LM (patched here if it is not yet; its own ``forward`` is unchanged).
        reward_head: its reward head (``hidden_size -> 1``), e.g. ``DRDOOracleTrainer.reward_head``.
        dataset: pairs ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids", ...}``: a
            ``datasets.Dataset`` or a list of dicts (tokenize text with
            :func:`fastpref.trainers.collators.tokenize_dataset`).
        batch_size: pairs per forward pass.
        collator: how to pad (default :class:`fastpref.trainers.collators.PreferenceCollator` with the model's pad
            token).
        backend: the fused head's backend when ``model`` is patched here.
        columns: the names of the two reward columns (default ``oracle_chosen``, ``oracle_rejected``).

    Returns:
        The dataset with the two float columns added (a new ``datasets.Dataset``, or a new list of new dicts).
        Computed without gradient, the model and head in eval mode (their modes are restored afterwards).
    """
    if not isinstance(model, nn.Module) or not isinstance(reward_head, nn.Module):
        raise TypeError("annotate_oracle_rewards: `model` and `reward_head` must be torch modules")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"annotate_oracle_rewards: `batch_size` must be a positive int, got {batch_size!r}")
    if (not isinstance(columns, (tuple, list)) or len(columns) != 2 or not all(isinstance(c, str) for c in columns)):
        raise ValueError(f"annotate_oracle_rewards: `columns` must be two column names, got {columns!r}")
    if not isinstance(dataset, Sequence) and not hasattr(dataset, "column_names"):
        raise TypeError(f"annotate_oracle_rewards: `dataset` must be a datasets.Dataset or a list of dicts, got "
                        f"{type(dataset).__name__}")
    if not is_patched(model):
        patch(model, backend=backend)
    if collator is None:
        collator = PreferenceCollator(pad_token_id=_pad_token_id(model))
    device = next(model.parameters()).device
    modes = (model.training, reward_head.training)
    model.eval()
    reward_head.eval()
    chosen, rejected = [], []
    try:
        n = len(dataset)
        for start in range(0, n, batch_size):
            examples = [dataset[i] for i in range(start, min(start + batch_size, n))]
            batch = {k: v.to(device) for k, v in collator(examples).items() if isinstance(v, torch.Tensor)}
            rewards = oracle_rewards(model, reward_head, batch).float().cpu()
            b = len(examples)
            chosen += rewards[:b].tolist()
            rejected += rewards[b:].tolist()
    finally:
        model.train(modes[0])
        reward_head.train(modes[1])
    if hasattr(dataset, "add_column"):
        return dataset.add_column(columns[0], chosen).add_column(columns[1], rejected)
    return [dict(ex, **{columns[0]: c, columns[1]: r}) for ex, c, r in zip(dataset, chosen, rejected)]
