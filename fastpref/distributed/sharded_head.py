"""The fused head over a vocabulary shard and/or a slice of the tokens: one autograd function, exact.

**Vocabulary parallel** (``vocab_group``; each rank holds the head rows ``[v0, v1)`` of ``W [V, D]``, the same
hidden states and labels). With ``z_t`` the logits of row ``t`` and ``y_t`` its label (METHODS.md section 0)::

    forward   per rank: target_t = z_{t,y_t} if v0 <= y_t < v1 else -inf,
                        (m_t, s_t) = max and sum_v exp(z_tv - m_t) over the shard's columns, the label's excluded
              all-reduce MAX of [target; m]   (2 x M floats)   -> z_{t,y_t}, M_t = max_r m_t
              all-reduce SUM of s_t exp(m_t - M_t)  (M floats)  -> S_t
              lp_t = (z_{t,y_t} - max_t) - log sum_t  from (target, 1) merged with (M_t, S_t)   (_stats.finish)
    backward  per rank: the backend's chunked backward on its shard with the GLOBAL (max, log sum) and lp, labels
              shifted by v0 (outside the shard: no one-hot column); dH summed over the group (one all-reduce of
              the scored rows, [M, D]); each rank keeps its rows of dW (and db).

With token statistics (``stats``: entropy, log sum p^2, mean logit, argmax == label; ``backends/_stats.py``) each
shard's label-free partials also carry ``t1 = sum e (z - m)``, ``t2 = sum e^2``, ``zsum`` and, for argmax == label,
``before`` (the max over the columns before the label: all of a shard below the label, none above it) and
``label``: the MAX all-reduce takes ``[target; m; before; label]``, the SUM all-reduce the sums rescaled to the
global max ``[s; t1; t2; zsum]``, and ``_stats.with_target`` finishes as in one process. The entropy's gradient
``-p (z - E_p z)`` uses the global ``E_p z`` in each shard's backward tiles; dH is summed as above.

No ``[tokens, V]`` or ``[tokens, V / tp]`` tensor exists: only the backend's chunks. The upstream gradient of ``lp``
must be the same on every rank of the group (a loss computed from the replicated ``lp``, as tensor parallelism
computes it), so that the summed ``dH`` is the gradient of that one loss.

**Context parallel** (``context_group``; each rank holds a slice of every sequence's tokens and the whole head):
the per-sequence totals are summed across the group by the caller (``_collectives.sum_across_group``, identity
backward), and here ``dW`` / ``db`` are summed across the group in the backward, so that every rank holds the
whole head gradient (a data-parallel wrapper that then averages identical values leaves it unchanged). The hidden
states' gradient stays each rank's own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .._autograd import _not_twice_differentiable, no_autocast
from ..backends._stats import Partials, RowStats, TokenStats, rescaled, with_target
from ._collectives import ProcessGroup


def merge_vocab_shards(target: torch.Tensor, part: Partials, group: ProcessGroup, vocab_size: Optional[int],
                       shard_rows: int) -> tuple[torch.Tensor, RowStats, Optional[TokenStats]]:
    """``(lp, row statistics, token statistics or None) [M]`` of the whole head from each rank's ``shard_forward``
    output (module docstring): an all-reduce MAX of ``[target; max]`` (and the statistics' ``before`` / ``label``),
    then an all-reduce SUM of the sums rescaled to the global maximum (and ``t1``, ``t2``, ``zsum``)."""
    stats = part.t1 is not None
    top = torch.stack([target, part.max] + ([part.before, part.label] if stats else []))
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    target, run_max = top[0], top[1]
    total, t1, t2 = rescaled(part, run_max)  # 0 where this shard had nothing (part.max = -inf)
    sums = torch.stack([total] + ([t1, t2, part.zsum] if stats else []))
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if not stats:
        return with_target(target, Partials(run_max, sums[0]), 0)
    if vocab_size is None:  # a raw shard checked without `validate`: the ranks' ranges were not exchanged
        count = torch.tensor([float(shard_rows)], dtype=torch.float64, device=target.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        vocab_size = int(count.item())
    return with_target(target, Partials(run_max, sums[0], sums[1], sums[2], sums[3], top[2], top[3]), vocab_size)


class ShardedHead(torch.autograd.Function):
    """``lp [M]`` of the rows ``hidden2d[rows]`` (module docstring); with ``stats`` also the token statistics
    ``(entropy, log_sum_p2, mean_logit, argmax_is_label) [M]`` of the whole head, the entropy differentiable (its
    gradient ``-p (z - E_p z)`` joins each shard's backward tiles). ``labels`` are global vocabulary ids."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, rows, labels, backend, options, vocab_group: Optional[ProcessGroup],
                vocab_start: int, context_group: Optional[ProcessGroup], vocab_size: Optional[int], stats: bool):
        with no_autocast(hidden2d.device):
            if vocab_group is None:
                local_labels = labels
                lp, row_stats, *tokens = backend.forward(hidden2d, weight, bias, rows, labels, stats=stats, **options)
                tokens = tokens[0] if stats else None
            else:
                local_labels = labels - vocab_start  # outside [0, V_shard): not this shard's token
                target, part = backend.shard_forward(hidden2d, weight, bias, rows, local_labels, stats=stats,
                                                     **options)
                lp, row_stats, tokens = merge_vocab_shards(target, part, vocab_group, vocab_size, weight.shape[0])
        mean_shift = row_stats.mean_shift if stats else lp.new_empty(0)
        ctx.save_for_backward(hidden2d, weight, bias, rows, local_labels, lp, row_stats.max, row_stats.logsum,
                              mean_shift)
        ctx.backend, ctx.options, ctx.stats = backend, options, stats
        ctx.vocab_group, ctx.context_group = vocab_group, context_group
        ctx.set_materialize_grads(False)
        if not stats:
            return lp
        ctx.mark_non_differentiable(tokens.log_sum_p2, tokens.mean_logit, tokens.argmax_is_label)
        return (lp, *tokens)

    @staticmethod
    def backward(ctx, grad_lp, grad_entropy=None, *unused):
        hidden2d, weight, bias, rows, labels, lp, row_max, row_logsum, mean_shift = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        with torch.no_grad(), no_autocast(hidden2d.device):
            grad = torch.zeros_like(lp) if grad_lp is None else grad_lp.to(lp.dtype)
            extra = {} if grad_entropy is None else {"entropy_grad": grad_entropy.to(lp.dtype)}
            stats = RowStats(row_max, row_logsum, mean_shift if ctx.stats else None)
            dh, dw, db = ctx.backend.backward(hidden2d, weight, bias, rows, labels, stats, lp, grad,
                                              compute_dh=need_dh, compute_dw=need_dw, compute_db=need_db, **extra,
                                              **ctx.options)
            if ctx.vocab_group is not None and need_dh:  # each shard's part of dH; only the scored rows travel
                part = dh.index_select(0, rows)
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=ctx.vocab_group)
                dh.index_copy_(0, rows, part)
            if ctx.context_group is not None:
                for g in (dw if need_dw else None, db if need_db else None):
                    if g is not None:
                        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.context_group)
        grads = (dh if need_dh else None, dw if need_dw else None, db if need_db else None)
        upstream = tuple(g for g in (grad_lp, grad_entropy) if g is not None)
        return _not_twice_differentiable(grads, (*upstream, hidden2d, weight, bias)) + (None,) * 9
