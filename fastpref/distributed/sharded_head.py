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
from ..backends._stats import RowStats, finish, merge_partials
from ._collectives import ProcessGroup


def merge_vocab_shards(target: torch.Tensor, shard_max: torch.Tensor, shard_sum: torch.Tensor,
                       group: ProcessGroup) -> tuple[torch.Tensor, RowStats]:
    """``(lp, stats) [M]`` of the whole head from each rank's ``shard_forward`` output: two all-reduces."""
    top = torch.stack([target, shard_max])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    target, run_max = top[0], top[1]
    safe = torch.where(run_max == float("-inf"), torch.zeros_like(run_max), run_max)
    run_sum = shard_sum * torch.exp(shard_max - safe)  # 0 where this shard had nothing (shard_max = -inf)
    dist.all_reduce(run_sum, op=dist.ReduceOp.SUM, group=group)
    run_max, run_sum = merge_partials(target, torch.ones_like(target), run_max[None], run_sum[None])
    return finish(target, run_max, run_sum)


class ShardedHead(torch.autograd.Function):
    """``lp [M]`` of the rows ``hidden2d[rows]`` (module docstring). ``labels`` are global vocabulary ids."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, rows, labels, backend, options, vocab_group: Optional[ProcessGroup],
                vocab_start: int, context_group: Optional[ProcessGroup]):
        with no_autocast(hidden2d.device):
            if vocab_group is None:
                local_labels = labels
                lp, stats = backend.forward(hidden2d, weight, bias, rows, labels, **options)
            else:
                local_labels = labels - vocab_start  # outside [0, V_shard): not this shard's token
                target, shard_max, shard_sum = backend.shard_forward(hidden2d, weight, bias, rows, local_labels,
                                                                     **options)
                lp, stats = merge_vocab_shards(target, shard_max, shard_sum, vocab_group)
        ctx.save_for_backward(hidden2d, weight, bias, rows, local_labels, lp, stats.max, stats.logsum)
        ctx.backend, ctx.options = backend, options
        ctx.vocab_group, ctx.context_group = vocab_group, context_group
        return lp

    @staticmethod
    def backward(ctx, grad_lp):
        hidden2d, weight, bias, rows, labels, lp, row_max, row_logsum = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        with torch.no_grad(), no_autocast(hidden2d.device):
            grad = grad_lp.to(lp.dtype)
            dh, dw, db = ctx.backend.backward(hidden2d, weight, bias, rows, labels, RowStats(row_max, row_logsum), lp,
                                              grad, compute_dh=need_dh, compute_dw=need_dw, compute_db=need_db,
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
        return _not_twice_differentiable(grads, (grad_lp, hidden2d, weight, bias)) + (None,) * 7
