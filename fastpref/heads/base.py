"""Shared machinery of the loss modules: one fused-head pass per model, batch layout checks.

Every module maps hidden states and an LM head to per-sequence scalars with :func:`fastpref.sequence_logprobs`
(one pass for the policy, one no-grad pass for the reference when the method has one; DRO asks for the
prompt segment in the same pass) and hands them to its functional loss in :mod:`fastpref.losses`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastpref._rows import last_row_where, row_sequences
from fastpref.logprobs import PROMPT, SequenceLogProbs, sequence_logprobs


class FusedHeadLoss(nn.Module):
    """Base class: holds the fused-head options and runs the policy and reference passes.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`fastpref.sequence_logprobs`).
        ignore_index: label value of rows that are not scored.
        logit_scale, softcap: the head's logit transform (Gemma 2: ``softcap=30``).
        validate: run the data-dependent input checks (one device synchronization per pass).
    """

    uses_prompt = False  # DRO sets this: keep prompt rows (segment 1) in the passes

    def __init__(self, *, backend: str = "auto", ignore_index: int = -100, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, validate: bool = True):
        super().__init__()
        self.backend, self.ignore_index = backend, ignore_index
        self.logit_scale, self.softcap, self.validate = logit_scale, softcap, validate

    def _segments(self, segment_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if segment_ids is None or self.uses_prompt:
            return segment_ids
        return torch.where(segment_ids == PROMPT, torch.zeros_like(segment_ids), segment_ids)  # skip prompt rows

    def logps(self, hidden, weight, labels, segment_ids=None, *, bias=None, cu_seqlens=None) -> SequenceLogProbs:
        """One fused pass; differentiable when autograd is on and an input requires grad."""
        return sequence_logprobs(hidden, weight, labels, self._segments(segment_ids), bias=bias,
                                 ignore_index=self.ignore_index, logit_scale=self.logit_scale, softcap=self.softcap,
                                 cu_seqlens=cu_seqlens, backend=self.backend, validate=self.validate)

    def reference_logps(self, ref_hidden, ref_weight, labels, segment_ids=None, *, ref_bias=None, cu_seqlens=None,
                        ref_logps: Optional[SequenceLogProbs] = None) -> SequenceLogProbs:
        """The reference pass under ``torch.no_grad()`` (nothing saved), or precomputed ``ref_logps``."""
        if ref_logps is not None:
            if ref_hidden is not None:
                raise ValueError("pass either `ref_hidden` or precomputed `ref_logps`, not both")
            if not isinstance(ref_logps, SequenceLogProbs):
                raise TypeError(f"`ref_logps` must be a fastpref.SequenceLogProbs, got {type(ref_logps).__name__}")
            return ref_logps
        if ref_hidden is None:
            raise ValueError("this loss needs the reference model: pass `ref_hidden` (and `ref_weight`) or `ref_logps`")
        if ref_weight is None:
            raise ValueError("`ref_weight` is required with `ref_hidden` (pass the policy head's weight if shared)")
        with torch.no_grad():
            return self.logps(ref_hidden, ref_weight.detach(), labels, segment_ids,
                              bias=None if ref_bias is None else ref_bias.detach(), cu_seqlens=cu_seqlens)


def split_pairs(x: torch.Tensor, name: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's pair layout: the first half of the rows are chosen, the second half rejected."""
    if x.shape[0] == 0 or x.shape[0] % 2:
        raise ValueError(f"`{name}` must hold an even, non-zero number of sequences (chosen rows, then rejected); "
                         f"got {x.shape[0]}")
    return x.chunk(2)


def last_response_rows(labels: torch.Tensor, segment_ids: Optional[torch.Tensor], *, ignore_index: int = -100,
                       cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat row index ``[S]`` of each sequence's last scored response row (the hidden state that predicts the
    sequence's last response token). Raises if a sequence has no scored response row."""
    scored = labels.reshape(-1) != ignore_index
    if segment_ids is not None:
        scored &= segment_ids.reshape(-1) == 2
    sequences, S = row_sequences(scored.numel(), labels.device, row_len=labels.shape[-1] if labels.dim() == 2 else None,
                                 cu_seqlens=cu_seqlens)
    last = last_row_where(scored, sequences, S)
    if bool((last < 0).any()):
        raise ValueError("a sequence has no scored response token, so it has no last response hidden state")
    return last
