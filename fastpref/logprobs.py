"""``sequence_logprobs``: per-sequence log-probs from last hidden states and the LM head, no logits tensor.

For a batch of S sequences with hidden states ``h_t``, head ``W [V, D]`` (bias ``b``), next-token labels
``y_t`` and segment ids (0 = not scored, 1 = prompt, 2 = response)::

    z_t     = s * (W h_t + b)                (softcap: c * tanh(z / c))
    lp_t    = z_{t, y_t} - logsumexp_v z_tv  (fp32)
    logp_i  = sum_{t in response(i)} lp_t,   plogp_i = sum_{t in prompt(i)} lp_t

(``docs/methods.md`` section 0.) Only scored rows are computed: response rows always, prompt rows only
when ``segment_ids`` marks a prompt, and in backward only rows whose gradient weight is non-zero.

Exactness: each token log-prob is ``(z_{t,y_t} - max_t) - log sum_t`` with the two statistics kept apart (never
one rounded log-sum-exp), and the per-segment totals are accumulated in float64 and returned in fp32: a
sequential fp32 sum of 8,192 token log-probs drifts by 0.26 nats, the float64 sum by nothing measurable.

``torch.compile``: the head is the custom op ``torch.ops.fastpref.fused_head`` (``_autograd.py``) over every row
of the batch, with static output shapes; what surrounds it here is plain tensor code, so a compiled training step
has no graph break and no recompile across sequence lengths (``dynamic=True``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._autograd import fused_head, reject_transforms
from ._rows import row_sequences
from .distributed import plan as _distributed
from ._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    empty_sequences_check,
    raise_failed_checks,
    require_finite_number,
    require_same_device,
    require_softcap,
    require_tensor,
    value_checks,
)

PROMPT, RESPONSE = 1, 2
BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("sum", "mean")


class TokenStatistics(NamedTuple):
    """Statistics of the head's distribution ``p = softmax(z)`` at each scored token (or their per-segment sums).

    ``entropy``: ``-sum_v p_v log p_v`` (differentiable: an entropy bonus or penalty trains through the fused
    backward). ``log_sum_p2``: ``log sum_v p_v^2`` (WPO's weights; TRL's ``log_sum_sq_probs``). ``mean_logit``:
    ``mean_v z_v`` (TRL's ``logits/chosen``). ``argmax_is_label``: the label is the first maximal logit (TRL's
    ``mean_token_accuracy``, ``is_top1``); bool per token, a count per segment.
    """

    entropy: torch.Tensor
    log_sum_p2: torch.Tensor
    mean_logit: torch.Tensor
    argmax_is_label: torch.Tensor


class SequenceStats(NamedTuple):
    """``tokens``: per-token :class:`TokenStatistics` shaped like ``labels`` (0 / False where not scored);
    ``response`` / ``prompt``: their sums over each sequence's segment, ``[S]`` (means with ``reduction="mean"``;
    ``argmax_is_label`` is then the segment's token accuracy)."""

    tokens: TokenStatistics
    response: TokenStatistics
    prompt: TokenStatistics


class SequenceLogProbs(NamedTuple):
    """Per-sequence results of :func:`sequence_logprobs`, each ``[S]`` (fp32; float64 for float64 inputs).

    ``response`` / ``prompt``: the segment's summed (or, with ``reduction="mean"``, averaged) token log-probs;
    an empty segment gives 0. ``n_response`` / ``n_prompt``: the segment's number of scored tokens (as
    floats, exact below 2**24). ``token_logps``: per-token log-probs shaped like ``labels`` (0 where not
    scored), only with ``return_token_logps=True``. ``stats``: :class:`SequenceStats`, only with
    ``return_stats=True``. Every field is its own tensor (not a view of a shared buffer).
    """

    response: torch.Tensor
    prompt: torch.Tensor
    n_response: torch.Tensor
    n_prompt: torch.Tensor
    token_logps: Optional[torch.Tensor] = None
    stats: Optional[SequenceStats] = None


class _Layout(NamedTuple):
    hidden2d: torch.Tensor  # [N, D], unit stride in D
    labels: torch.Tensor  # [N] int64
    segments: torch.Tensor  # [N] int64 in {0, 1, 2}, 0 wherever the label is ignore_index
    sequence: torch.Tensor  # [N] int64 sequence index of each row
    num_sequences: int


def triton_usable(device: torch.device) -> bool:
    """Triton importable, and the tensors on CUDA (or on the CPU under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from fastpref.kernels.config import interpreter_active

    return device.type == "cuda" or (device.type == "cpu" and interpreter_active())


def _backend_name(backend: str, hidden: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` and ``hidden``'s device (checks that triton can run there)."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if hidden.device.type == "cuda" and triton_usable(hidden.device) else "torch"
    if backend == "triton":
        if not triton_usable(hidden.device):
            raise ValueError(
                f"`backend='triton'` needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and an importable "
                f"triton; got a {hidden.device.type} tensor. Use backend='torch' or 'auto'."
            )
        if hidden.dtype == torch.float64:
            raise TypeError("`hidden` is float64, which the triton backend does not take; use backend='torch'")
    return backend


def _resolve_backend(backend: str, hidden: torch.Tensor):
    """The backend module for ``backend`` (see :func:`_backend_name`)."""
    from ._autograd import backend_module

    return backend_module(_backend_name(backend, hidden))


def _layout(hidden, weight, labels, segment_ids, bias, ignore_index, cu_seqlens, validate, *,
            logit_scale: float = 1.0, spread=None) -> _Layout:
    require_tensor("hidden", hidden, dims=(2, 3), dtypes=FLOAT_DTYPES)
    require_tensor("weight", weight, dims=(2,), dtypes=FLOAT_DTYPES)
    require_tensor("labels", labels, dtypes=INT_DTYPES)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"`weight` has dtype {weight.dtype} but `hidden` has {hidden.dtype}; they must match")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"`weight` is {tuple(weight.shape)} but `hidden` has hidden size {hidden.shape[-1]}")
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"`weight` must have a non-empty vocabulary and hidden size, got {tuple(weight.shape)}")
    if bias is not None:
        require_tensor("bias", bias, dims=(1,), dtypes=FLOAT_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"`bias` has {bias.shape[0]} entries but `weight` has vocabulary {weight.shape[0]}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"`bias` has dtype {bias.dtype} but `weight` has {weight.dtype}; they must match")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"`labels` is {tuple(labels.shape)} but `hidden` is {tuple(hidden.shape)}; expected {tuple(hidden.shape[:-1])}")
    if segment_ids is not None:
        if isinstance(segment_ids, torch.Tensor) and segment_ids.dtype == torch.bool:
            raise TypeError("`segment_ids` is a bool mask; pass integer ids (0 = not scored, 1 = prompt, "
                            "2 = response), e.g. `2 * completion_mask.long()`")
        require_tensor("segment_ids", segment_ids, dtypes=INT_DTYPES)
        if segment_ids.shape != labels.shape:
            raise ValueError(f"`segment_ids` is {tuple(segment_ids.shape)} but `labels` is {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"`ignore_index` must be an int, got {type(ignore_index).__name__}")
    if cu_seqlens is not None:
        require_tensor("cu_seqlens", cu_seqlens, dims=(1,), dtypes=INT_DTYPES)
    require_same_device("hidden", hidden, weight=weight, bias=bias, labels=labels, segment_ids=segment_ids, cu_seqlens=cu_seqlens)

    D = hidden.shape[-1]
    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("`cu_seqlens` goes with packed `hidden` [N, D]; padded `hidden` [B, T, D] must not pass it")
        B, T = hidden.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(f"`hidden` holds no tokens: shape {tuple(hidden.shape)}")
        sequence, num_sequences = row_sequences(B * T, hidden.device, row_len=T)
    else:
        if cu_seqlens is None:
            raise ValueError("packed `hidden` [N, D] needs `cu_seqlens` [S+1]; pass padded hidden as [B, T, D]")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"`cu_seqlens` must hold S+1 >= 2 offsets, got {cu_seqlens.numel()}")
        sequence, num_sequences = row_sequences(hidden.shape[0], hidden.device, cu_seqlens=cu_seqlens)

    flat_labels = labels.reshape(-1).long()
    segments = torch.where(flat_labels != ignore_index, RESPONSE if segment_ids is None else
                           segment_ids.reshape(-1).long(), 0)
    if validate:
        data_checks(hidden, weight, bias, flat_labels, segment_ids, cu_seqlens, ignore_index, logit_scale,
                    segments=segments, sequence=sequence, num_sequences=num_sequences, spread=spread)
    hidden2d = hidden.reshape(-1, D)
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    return _Layout(hidden2d, flat_labels, segments, sequence, num_sequences)


def data_checks(hidden, weight, bias, labels, segment_ids, cu_seqlens, ignore_index: int, logit_scale: float, *,
                row_len: int = 0, segments=None, sequence=None, num_sequences: Optional[int] = None,
                spread=None) -> None:
    """The checks that read values (one device synchronization): labels within ``[0, V)`` or ``ignore_index``,
    segment ids in {0, 1, 2}, ``cu_seqlens`` ordered, no sequence without a scored token, finite inputs and
    logits within float32's range. Raises the first failure. Runs inside the fused-head op (so compiled graphs
    keep it) and in :func:`_layout` for the other entry points. ``spread`` (a distributed head's local part):
    labels are checked against the whole head's vocabulary, and a context-parallel rank leaves the empty-sequence
    check to the group's summed counts."""
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != ignore_index
    if segments is None:
        segments = torch.where(valid, RESPONSE if segment_ids is None else segment_ids.reshape(-1).long(), 0)
    if sequence is None:
        N = flat_labels.numel()
        sequence, num_sequences = row_sequences(N, flat_labels.device, row_len=row_len or None,
                                                cu_seqlens=None if row_len else cu_seqlens)
    V = weight.shape[0] if spread is None else spread.label_bound
    checks = [(f"`labels` holds values outside [0, {V}) that are not ignore_index={ignore_index}",
               (valid & ((flat_labels < 0) | (flat_labels >= V))).any())]
    if segment_ids is not None:
        raw = segment_ids.reshape(-1).long()
        checks.append(("`segment_ids` holds values outside {0, 1, 2} (0 = not scored, 1 = prompt, 2 = response)",
                       ((raw < 0) | (raw > 2)).any()))
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        checks.append((f"`cu_seqlens` must start at 0, be strictly increasing and end at N={hidden.shape[0]}",
                       (cu[0] != 0) | (cu[-1] != hidden.shape[0]) | (cu[1:] <= cu[:-1]).any()))
    scored_per_seq = torch.zeros(num_sequences, dtype=torch.long, device=hidden.device).index_add(
        0, sequence, (segments > 0).long())
    if spread is None or spread.context_group is None:  # context parallel: checked on the group's counts
        checks.append(empty_sequences_check(scored_per_seq))
    checks += value_checks(hidden, weight, bias, logit_scale)
    raise_failed_checks(checks)


def _segment_sums(values: torch.Tensor, slot: torch.Tensor, S: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(response, prompt)`` sums ``[S]`` of per-row ``values`` (float64 accumulation), independent tensors."""
    totals = torch.zeros(2 * S, dtype=torch.float64, device=values.device).index_add(0, slot, values.double())
    totals = totals.view(S, 2)
    return totals[:, 0].to(dtype, copy=True), totals[:, 1].to(dtype, copy=True)


def _distributed_logprobs(spread, hidden, weight, labels, segment_ids, bias, ignore_index, reduction, logit_scale,
                          softcap, cu_seqlens, backend, return_token_logps, return_stats, validate,
                          totals_dtype=None) -> "SequenceLogProbs":
    """A vocabulary-parallel and/or context-parallel head (:mod:`fastpref.distributed`): every rank of a group
    checks and computes the same way; eager only (not through the custom op)."""
    layout_args = (hidden, weight, labels, segment_ids, bias, ignore_index, cu_seqlens, validate)
    layout = spread.checked_layout(_layout, validate, *layout_args, logit_scale=logit_scale, spread=spread)
    impl = _resolve_backend(backend, hidden)
    hidden2d, flat_labels, segments, sequence, S = layout
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = torch.nonzero(segments > 0).squeeze(1)
    out = spread.token_logprobs(hidden2d, weight, bias, rows, flat_labels.index_select(0, rows), impl,
                                {"logit_scale": logit_scale, "softcap": softcap}, stats=return_stats)
    lp_rows, *token_rows = out if return_stats else (out,)
    N = hidden2d.shape[0]
    scatter = lambda x: torch.zeros(N, dtype=x.dtype, device=x.device).index_put((rows,), x)  # noqa: E731
    lp = scatter(lp_rows)
    slot = sequence * 2 + (segments == PROMPT).long()
    segment_sums = lambda x: torch.zeros(2 * S, dtype=torch.float64, device=lp.device).index_add(  # noqa: E731
        0, slot, x.double()).view(S, 2)
    totals, counts = segment_sums(lp), segment_sums((segments > 0).double())
    totals, counts = spread.sequence_totals(totals, counts, validate)  # context parallel: summed across the group
    dtype = lp.dtype if totals_dtype is None else totals_dtype
    per_token = [scatter(x) for x in token_rows]
    per_segment = [spread.sum_over_context(segment_sums(x)) for x in per_token]
    if reduction == "mean":
        totals = totals / counts.clamp(min=1)
        per_segment = [x / counts.clamp(min=1) for x in per_segment]
    column = lambda x, j: x[:, j].to(dtype, copy=True)  # noqa: E731 - independent tensors
    stats = None
    if return_stats:
        stats = SequenceStats(TokenStatistics(*(x.view(labels.shape) for x in per_token)),
                              TokenStatistics(*(column(x, 0) for x in per_segment)),
                              TokenStatistics(*(column(x, 1) for x in per_segment)))
    return SequenceLogProbs(column(totals, 0), column(totals, 1), column(counts, 0), column(counts, 1),
                            lp.view(labels.shape) if return_token_logps else None, stats)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_token_logps: bool = False,
    return_stats: bool = False,
    validate: bool = True,
    totals_dtype: Optional[torch.dtype] = None,
    vocab_parallel_group=None,
    vocab_range: Optional[tuple[int, int]] = None,
    context_parallel_group=None,
) -> SequenceLogProbs:
    """Sum (or mean) of token log-probs per sequence segment, computed from hidden states and the head.

    Args:
        hidden: last hidden states, padded ``[B, T, D]`` or packed ``[N, D]`` with ``cu_seqlens``.
        weight: LM head ``[V, D]`` (same dtype as ``hidden``: float32, bfloat16, float16; float64 on the
            torch backend).
        labels: next-token target of each hidden row (already shifted), ``[B, T]`` or ``[N]``;
            ``ignore_index`` marks rows that are not scored.
        segment_ids: same shape as ``labels``: 0 = not scored, 1 = prompt, 2 = response. ``None``: every row
            whose label is not ``ignore_index`` is response. A row is scored when its segment is 1 or 2 and
            its label is not ``ignore_index``; prompt rows are computed only when some row is marked 1.
        bias: optional head bias ``[V]``.
        reduction: ``"sum"`` or ``"mean"`` (each segment divided by its length; an empty segment gives 0).
        logit_scale: multiplies the logits (``z = s * (W h + b)``); any positive real number (``float``, ``int``,
            numpy scalar) that keeps the float32 logits finite (checked with ``validate``).
        softcap: ``c`` applies ``c * tanh(z / c)`` to the logits (Gemma 2's final-logit softcapping); at most
            ``2**126`` (a larger cap changes nothing: pass None).
        cu_seqlens: ``[S+1]`` offsets of the packed sequences (flash-attention varlen convention).
        backend: ``"triton"`` (fused kernels: CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``),
            ``"torch"`` (chunked PyTorch, any device, bounded memory), ``"auto"`` (triton on CUDA, else torch).
        return_token_logps: also return per-token log-probs (differentiable), shaped like ``labels``.
        totals_dtype: the dtype of the per-sequence results (``response``, ``prompt``, counts, per-segment
            statistics). Default: the token log-probs' (fp32; float64 for float64 inputs). The sums are always
            accumulated in float64; pass ``torch.float64`` to keep them: one rounding of each total to fp32 costs up
            to half an fp32 ulp of its size (2.4e-4 nats at a total of -6,900), and a DPO margin takes differences
            of four totals, so a DPO loss built on fp32 totals carries ~1e-5 of rounding that float64 totals do not.
        return_stats: also return :class:`SequenceStats`: per-token entropy (differentiable), ``log sum p^2``,
            mean logit and argmax == label, and their per-segment sums, accumulated in the same pass over the
            vocabulary (no second pass; the forward's tiles carry a few more running sums).
        validate: run the data-dependent checks (label range, segment ids, finite values, logits within
            float32's range, ``cu_seqlens`` order, sequences with no scored token), which cost one device
            synchronization. Shape, dtype and device checks always run.
        vocab_parallel_group, vocab_range: a head sharded by vocabulary rows across a process group: ``weight``
            (and ``bias``) is this rank's plain shard, rows ``[start, stop)`` of the whole head
            (``vocab_range=(start, stop)``); ``hidden``/``labels``/``segment_ids`` are the same on every rank of
            the group and every rank gets the whole head's log-probs. A ``weight`` that is a ``Shard(0)``
            DTensor (``ColwiseParallel`` on ``lm_head``) needs neither. See :mod:`fastpref.distributed`.
        context_parallel_group: each rank holds a slice along time of the same sequences (and the whole head):
            per-sequence totals and counts are summed across the group, the head's gradient too.

    Returns:
        :class:`SequenceLogProbs`. Gradients flow to ``hidden``, ``weight`` and ``bias`` from ``response``,
        ``prompt`` and ``token_logps``. Under ``torch.no_grad()`` (a reference model) nothing is saved.

    Raises:
        TypeError / ValueError naming the offending argument, before any kernel runs; non-finite ``hidden`` /
        ``weight`` / ``bias`` or logits that could overflow float32 raise :class:`fastpref.NonFiniteError` (a
        ``ValueError``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if totals_dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"`totals_dtype` must be None, torch.float32 or torch.float64, got {totals_dtype!r}")
    # --- distributed head (fastpref.distributed): local shards and groups; None for a plain call ----------------
    spread = None
    if _distributed.requested(hidden, weight, bias, vocab_parallel_group, vocab_range, context_parallel_group):
        spread = _distributed.resolve(hidden, weight, bias, vocab_parallel_group=vocab_parallel_group,
                                      vocab_range=vocab_range, context_parallel_group=context_parallel_group)
        hidden, weight, bias = spread.hidden, spread.weight, spread.bias
    # -------------------------------------------------------------------------------------------------------------
    reject_transforms(hidden, weight, bias)
    if not torch.compiler.is_compiling():  # traced, the numbers are symbolic: the op checks them when it runs
        logit_scale = require_finite_number("logit_scale", logit_scale, positive=True)
        softcap = require_softcap(softcap)
    if spread is not None:
        return _distributed_logprobs(spread, hidden, weight, labels, segment_ids, bias, ignore_index, reduction,
                                     logit_scale, softcap, cu_seqlens, backend, return_token_logps, return_stats,
                                     validate, totals_dtype)
    layout = _layout(hidden, weight, labels, segment_ids, bias, ignore_index, cu_seqlens, False,
                     logit_scale=logit_scale)
    name = _backend_name(backend, hidden)
    hidden2d, flat_labels, segments, sequence, S = layout
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    from ._autograd import backend_module

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden2d, weight, bias))
    frozen = (needs_grad and hidden2d.requires_grad and not weight.requires_grad
              and not (bias is not None and bias.requires_grad) and backend_module(name).frozen_supported(hidden.dtype))
    row_len = hidden.shape[1] if hidden.dim() == 3 else 0
    lp, _, _, _, entropy, log_sum_p2, mean_logit, argmax, _, _ = fused_head(
        hidden2d, weight, bias, flat_labels, None if segment_ids is None else segment_ids.reshape(-1), cu_seqlens,
        ignore_index, row_len, logit_scale, softcap, name, frozen, return_stats, validate)

    scored = segments > 0
    slot = sequence * 2 + (segments == PROMPT).long()
    out_dtype = lp.dtype if totals_dtype is None else totals_dtype
    response, prompt = _segment_sums(lp, slot, S, out_dtype)
    n_response, n_prompt = _segment_sums(scored.to(lp.dtype), slot, S, out_dtype)
    if reduction == "mean":
        response, prompt = response / n_response.clamp(min=1), prompt / n_prompt.clamp(min=1)
    token_logps = lp.view(labels.shape) if return_token_logps else None
    stats = None
    if return_stats:
        tokens = TokenStatistics(entropy, log_sum_p2, mean_logit, argmax)
        per_segment = [_segment_sums(x.to(lp.dtype), slot, S, out_dtype) for x in tokens]
        if reduction == "mean":
            per_segment = [(r / n_response.clamp(min=1), p / n_prompt.clamp(min=1)) for r, p in per_segment]
        stats = SequenceStats(TokenStatistics(*(x.view(labels.shape) for x in tokens)),
                              TokenStatistics(*(r for r, _ in per_segment)),
                              TokenStatistics(*(p for _, p in per_segment)))
    return SequenceLogProbs(response, prompt, n_response, n_prompt, token_logps, stats)
