"""Shared machinery of the loss modules: one fused-head pass per model, batch layout checks.

Every module maps hidden states and an LM head to per-sequence scalars with :func:`fastpref.sequence_logprobs`
(one pass for the policy, one no-grad pass for the reference when the method has one; DRO asks for the
prompt segment in the same pass) and hands them to its functional loss in :mod:`fastpref.losses`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from typing import Callable, Optional

import torch
from torch import nn

from fastpref._rows import last_row_where, row_sequences
from fastpref.logprobs import BACKENDS, PROMPT, SequenceLogProbs, sequence_logprobs

_REFERENCE_NAMES = {"hidden": "ref_hidden", "weight": "ref_weight", "bias": "ref_bias"}


@contextlib.contextmanager
def reference_argument_names():
    """Errors of the reference pass name the module's arguments (``ref_hidden``, ``ref_weight``, ``ref_bias``), not
    :func:`fastpref.sequence_logprobs`'s (``hidden``, ``weight``, ``bias``)."""
    try:
        yield
    except (TypeError, ValueError) as e:
        msg = re.sub(r"`(hidden|weight|bias)`", lambda m: f"`{_REFERENCE_NAMES[m.group(1)]}`", str(e))
        raise type(e)(msg) from e


class FusedHeadLoss(nn.Module):
    """Base class: holds the fused-head options and runs the policy and reference passes.

    The passes return their per-sequence totals in float64 (``totals_dtype=torch.float64``): a loss head takes
    differences of totals of thousands of nats, where one fp32 rounding each would cost ~1e-5 of loss; the loss
    heads therefore run their PyTorch expression in float64 ([S] scalars: nothing next to the head).

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
        name = type(self).__name__
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{name}: `backend` must be one of {BACKENDS}, got {backend!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{name}: `ignore_index` must be an int, got {type(ignore_index).__name__}")
        logit_scale = _positive(name, "logit_scale", logit_scale)
        if softcap is not None:
            softcap = _positive(name, "softcap", softcap)
        if not isinstance(validate, bool):
            raise TypeError(f"{name}: `validate` must be a bool, got {type(validate).__name__}")
        self.backend, self.ignore_index = backend, ignore_index
        self.logit_scale, self.softcap, self.validate = logit_scale, softcap, validate

    def _check_settings(self, dummy_loss: Callable[[], object]) -> None:
        """Run the module's functional loss once on a tiny CPU batch at construction, so that a bad setting
        (``beta``, ``loss_type``, ...) fails here, naming the module, instead of after two fused passes."""
        try:
            dummy_loss()
        except (TypeError, ValueError) as e:
            raise type(e)(f"{type(self).__name__}: {e}") from None

    def _segments(self, segment_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if segment_ids is None or self.uses_prompt:
            return segment_ids
        return torch.where(segment_ids == PROMPT, torch.zeros_like(segment_ids), segment_ids)  # skip prompt rows

    def logps(self, hidden, weight, labels, segment_ids=None, *, bias=None, cu_seqlens=None) -> SequenceLogProbs:
        """One fused pass; differentiable when autograd is on and an input requires grad."""
        return sequence_logprobs(hidden, weight, labels, self._segments(segment_ids), bias=bias,
                                 ignore_index=self.ignore_index, logit_scale=self.logit_scale, softcap=self.softcap,
                                 cu_seqlens=cu_seqlens, backend=self.backend, validate=self.validate,
                                 totals_dtype=torch.float64)

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
        for arg, value in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"`{arg}` must be a torch.Tensor, got {type(value).__name__}")
        with torch.no_grad(), reference_argument_names():
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
    """Flat row index ``[S]`` of the hidden state **of** each sequence's last response token: the row whose input is
    that token, as a reward model reads it (docs/methods.md section 6).

    Rows follow fastpref's convention (``labels[t]`` is the token at position ``t + 1``): the last scored response
    row ``t`` predicts the last response token, whose own hidden state is row ``t + 1`` of the same sequence. Reading
    row ``t`` instead would give two responses that differ only in their last token identical rewards.

    Raises ``ValueError`` naming the sequence when it has no scored response row, or when its last response token
    has no hidden row (its label sits on the sequence's last row: pass hidden states that include that token).
    """
    scored = labels.reshape(-1) != ignore_index
    if segment_ids is not None:
        scored &= segment_ids.reshape(-1) == 2
    sequences, S = row_sequences(scored.numel(), labels.device, row_len=labels.shape[-1] if labels.dim() == 2 else None,
                                 cu_seqlens=cu_seqlens)
    last = last_row_where(scored, sequences, S)
    if bool((last < 0).any()):
        i = int(torch.nonzero(last < 0)[0])
        raise ValueError(f"sequence {i} has no scored response token, so it has no last response hidden state")
    if cu_seqlens is None:
        row_len = labels.shape[-1] if labels.dim() == 2 else scored.numel()
        ends = (torch.arange(S, device=labels.device) + 1) * row_len
    else:
        ends = cu_seqlens[1:].to(device=labels.device, dtype=torch.long)
    beyond = last + 1 >= ends
    if bool(beyond.any()):
        i = int(torch.nonzero(beyond)[0])
        raise ValueError(
            f"sequence {i}: its last response token is labeled on the sequence's last row, so its own hidden state "
            "(the row after it, which a reward head reads) is not in `hidden`; include that token's row "
            "(label = ignore_index) or pass `reward_hidden`")
    return last + 1


def _positive(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: `{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: `{name}` must be a finite number > 0, got {value}")
    return value
