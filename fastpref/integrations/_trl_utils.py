"""Helpers for :mod:`fastpref.trainers.dpo`: batch layout, reference contexts, extra data columns.

Nothing here imports TRL's private helpers; the small context managers TRL uses for the reference forward
(``use_adapter``, ``disable_gradient_checkpointing``) are re-implemented so that a TRL release that moves or
renames them does not break the trainer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ._hf_utils import find_backbone, find_causal_lm

PROMPT, RESPONSE = 1, 2


@contextlib.contextmanager
def no_gradient_checkpointing(model: nn.Module, gradient_checkpointing_kwargs: Optional[dict] = None):
    """Turn gradient checkpointing off for a no-grad (reference) forward and back on afterwards, as TRL does
    (reentrant checkpointing warns when no input requires grad)."""
    lm = find_causal_lm(model)
    new_api = hasattr(lm, "is_activation_checkpointing")  # transformers >= 5.2x renamed the API
    if new_api:
        enabled = bool(lm.is_activation_checkpointing)
        disable, enable = lm.activation_checkpointing_disable, lm.activation_checkpointing_enable
    else:
        enabled = bool(getattr(lm, "is_gradient_checkpointing", False))
        disable = getattr(lm, "gradient_checkpointing_disable", None)
        enable = getattr(lm, "gradient_checkpointing_enable", None)
    if enabled:
        disable()
    try:
        yield
    finally:
        if enabled:
            enable(gradient_checkpointing_kwargs)


def packed_offsets(inputs: dict[str, Any], prefix: str = "") -> Optional[torch.Tensor]:
    """``cu_seqlens [S + 1]`` of a padding-free batch (``{prefix}position_ids`` restarting at 0 for every packed
    sequence, :class:`fastpref.trainers.collators.PackingCollator`), or None for a padded batch."""
    position_ids = inputs.get(prefix + "position_ids")
    if position_ids is None:
        return None
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)
    return torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)])


def unpack(x: torch.Tensor, cu: torch.Tensor, fill=0) -> torch.Tensor:
    """Packed ``[1, N]`` values as padded ``[S, T_max]`` rows (right padding with ``fill``)."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    rows = torch.split(x.reshape(-1), lengths)
    out = x.new_full((len(lengths), max(lengths)), fill)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def repack(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack`: the rows' first ``length`` values, concatenated to ``[1, N]``."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)])[None]


def completion_counts(completion_mask: torch.Tensor, cu: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: ``(completion tokens, completion tokens after the sequence's first position)`` (TRL's
    ``completion_mask.sum(1)`` and ``completion_mask[:, 1:].sum(1)``), padded or packed."""
    cm = completion_mask.long() if cu is None else unpack(completion_mask.long(), cu)
    return cm.sum(dim=1), cm[:, 1:].sum(dim=1)


def model_inputs_without_mask(inputs: dict[str, Any], keys) -> dict[str, Any]:
    """``inputs`` restricted to ``keys`` for a model's own forward; a padding-free batch goes without its (all
    ones) ``attention_mask``: transformers builds the block-diagonal mask from ``position_ids`` only when none is
    given."""
    out = {k: v for k, v in inputs.items() if k in keys}
    if "position_ids" in out:
        out.pop("attention_mask", None)
    return out


def response_logps_materialized(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor,
                                cu: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sequence summed response log-probs from materialized ``logits [B, T, V]`` (double-differentiable, for
    AuxDPO's parameter null-space penalty), with the rows, labels and segments of
    :func:`fastpref.integrations.transformers._targets` (padded or packed)."""
    token = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    token = token * (segments == RESPONSE)
    if cu is None:
        return token.sum(dim=-1)
    sequence = torch.searchsorted(cu[1:].contiguous(), torch.arange(token.numel(), device=token.device), right=True)
    return token.new_zeros(cu.numel() - 1).index_add(0, sequence, token.reshape(-1))


def ld_segment_ids(completion_mask: torch.Tensor, cu: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Segment ids for TRL's LD-DPO (``ld_alpha``): the first ``min(n_chosen, n_rejected)`` completion tokens of
    each pair are segment 2 ("shared", the fused output's ``response``), the rest of the completion segment 1
    ("tail", its ``prompt``), everything else 0. Rows: chosen first, then rejected (TRL's layout); a packed
    ``[1, N]`` mask with its ``cu`` offsets gives packed ids.

    Mirrors TRL 1.16 ``DPOTrainer._compute_loss``: counts run over ``completion_mask[:, 1:]`` (the scored
    positions), so a completion token at position 0 (empty prompt) is never scored.
    """
    if cu is not None:
        return repack(ld_segment_ids(unpack(completion_mask, cu)), cu)
    cm = completion_mask.clone().long()
    cm[:, 0] = 0
    position = cm.cumsum(dim=1)
    lengths = cm.sum(dim=1)
    chosen, rejected = lengths.chunk(2, dim=0)
    shared = torch.minimum(chosen, rejected).repeat(2)[:, None]
    segments = torch.zeros_like(cm)
    segments[(cm == 1) & (position <= shared)] = RESPONSE
    segments[(cm == 1) & (position > shared)] = PROMPT
    return segments


class ExtraColumnsCollator:
    """Wraps a preference collator and adds per-example columns (``oracle_chosen``, ``example_index``, ...) as
    tensors: TRL's ``DataCollatorForPreference`` drops every column it does not know."""

    def __init__(self, collator: Callable, columns: dict[str, torch.dtype], optional: Sequence[str] = ()):
        self.collator = collator
        self.columns = dict(columns)
        self.optional = set(optional)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for name, dtype in self.columns.items():
            if name in batch:
                continue
            missing = [i for i, example in enumerate(examples) if name not in example or example[name] is None]
            if name in self.optional and len(missing) == len(examples):
                continue
            if missing:
                raise KeyError(f"FastPrefDPOTrainer: the batch's examples {missing} have no `{name}` column, which "
                               "the selected method needs (train and eval datasets alike)")
            batch[name] = torch.tensor([example[name] for example in examples], dtype=dtype)
        return batch

    def __getattr__(self, name: str):  # pad_token_id, max_length, ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


@contextlib.contextmanager
def capture_backbone_hidden(model: nn.Module):
    """Record the last hidden state the backbone of ``model`` (a causal LM, or a PEFT model around one) returns
    during the block: yields a list that holds it afterwards (AuxDPO's head null-space penalty reads the
    reference hidden states of the same forward that gives the reference log-probs)."""
    store: list[torch.Tensor] = []
    backbone = find_backbone(find_causal_lm(model))

    def hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0]
        store.append(hidden)

    handle = backbone.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
