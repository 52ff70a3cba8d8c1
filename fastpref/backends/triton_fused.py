"""The ``triton`` backend: Triton tile kernels (``fastpref.kernels``) and library GEMMs behind the backend interface.

Forward: the target logit by an indexed dot, the label-free log-sum-exp statistics over vocabulary splits (one
launch each), merged on the device (``O(M)``). Backward and frozen-head forward: the shared chunk loops of
:mod:`._chunked` with the Triton tiles (``logits_grad``, ``softmax_numerator``) and cuBLAS GEMMs.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpref.kernels.config import backward_chunks
from fastpref.kernels.logits_grad import logits_grad_tile
from fastpref.kernels.softmax_numerator import softmax_numerator_tile
from fastpref.kernels.target_logit import target_logits
from fastpref.kernels.vocab_logsumexp import vocab_logsumexp

from . import _chunked
from ._stats import Partials, RowStats, merge, with_target


class TritonTiles:
    """Tiles for :mod:`._chunked`: the GEMM operands stay in the head's dtype, rows are read by index."""

    def accum_dtype(self, dtype):
        return torch.float32

    def operand_dtype(self, dtype):
        return dtype

    def chunks(self, M, D, V, dtype):
        size = torch.tensor([], dtype=dtype).element_size()
        return backward_chunks(M, D, V, size)

    def rows(self, hidden, rows):
        return hidden, rows

    def weight_operand(self, weight, v0, v1):
        return weight[v0:v1]

    def target_logits(self, hidden, weight, bias, rows, labels, *, logit_scale, softcap):
        return target_logits(hidden, weight, bias, rows, labels, logit_scale=logit_scale, softcap=softcap)

    def grad_tile(self, ctx, weight, bias, labels, stats, lp, v0, v1, *, logit_scale, softcap, dz_scale, grad,
                  entropy=None):
        hidden, rows = ctx
        dz, db_part = logits_grad_tile(hidden, weight, bias, rows, labels, stats.max, stats.logsum, lp, v0, v1 - v0,
                                       logit_scale=logit_scale, softcap=softcap, dz_scale=dz_scale, grad=grad,
                                       entropy=entropy)
        return dz, None if db_part is None else db_part.sum(dim=0)

    def numerator_tile(self, ctx, weight, bias, labels, ref, v0, v1, *, logit_scale, softcap, stats=False):
        hidden, rows = ctx
        P, *parts = softmax_numerator_tile(hidden, weight, bias, rows, labels, ref, v0, v1 - v0,
                                           logit_scale=logit_scale, softcap=softcap, stats=stats)
        return P, Partials(*parts)


TILES = TritonTiles()


def _contiguous(bias: Optional[torch.Tensor], rows: torch.Tensor, labels: torch.Tensor):
    return (None if bias is None else bias.contiguous()), rows.contiguous(), labels.contiguous()


def shard_forward(hidden, weight, bias, rows, labels, *, logit_scale: float = 1.0, softcap: Optional[float] = None,
                  num_splits: Optional[int] = None, stats: bool = False) -> tuple[torch.Tensor, Partials]:
    """``(target [M], partials)`` fp32 over this weight's vocabulary: the label-free :class:`._stats.Partials`
    (``max``, ``sum``, and with ``stats`` the token statistics' sums), the label's column excluded (``-inf``/0 when
    nothing is left); ``target`` is ``-inf`` where the label is outside ``[0, V)``. A vocabulary-parallel head merges
    these across ranks (:func:`fastpref.distributed.sharded_head.merge_vocab_shards`)."""
    return _label_free(hidden, weight, bias, rows, labels, logit_scale, softcap, num_splits, stats)


def _label_free(hidden, weight, bias, rows, labels, logit_scale, softcap, num_splits, stats):
    bias, rows, labels = _contiguous(bias, rows, labels)
    target = target_logits(hidden, weight, bias, rows, labels, logit_scale=logit_scale, softcap=softcap)
    parts = vocab_logsumexp(hidden, weight, bias, rows, labels, logit_scale=logit_scale, softcap=softcap,
                            num_splits=num_splits, stats=stats)
    return target, merge(Partials.empty(target, stats), Partials(*parts))


def forward(hidden, weight, bias, rows, labels, *, logit_scale: float = 1.0, softcap: Optional[float] = None,
            num_splits: Optional[int] = None, stats: bool = False) -> tuple:
    """Token log-probs ``[M]`` and row statistics (fp32) of the rows ``hidden[rows]`` (labels in ``[0, V)``);
    with ``stats=True`` also the :class:`._stats.TokenStats` (entropy, ``log sum p^2``, mean logit, argmax)."""
    target, run = _label_free(hidden, weight, bias, rows, labels, logit_scale, softcap, num_splits, stats)
    lp, row_stats, tokens = with_target(target, run, weight.shape[0])
    return (lp, row_stats, tokens) if stats else (lp, row_stats)


def backward(hidden, weight, bias, rows, labels, stats: RowStats, lp, grad, **options):
    """See :func:`._chunked.chunked_backward`."""
    bias, rows, labels = _contiguous(bias, rows, labels)
    stats = RowStats(*(None if x is None else x.float().contiguous() for x in stats))
    if options.get("entropy_grad") is not None:
        options["entropy_grad"] = options["entropy_grad"].float().contiguous()
    return _chunked.chunked_backward(TILES, hidden, weight, bias, rows, labels, stats, lp.float().contiguous(),
                                     grad.float().contiguous(), **options)


def frozen_forward(hidden, weight, bias, rows, labels, **options):
    """See :func:`._chunked.frozen_forward`."""
    bias, rows, labels = _contiguous(bias, rows, labels)
    return _chunked.frozen_forward(TILES, hidden, weight, bias, rows, labels, **options)


def frozen_supported(dtype: torch.dtype) -> bool:
    """bf16 and fp32 heads (fp16's range cannot hold the numerators: those heads use the recompute backward)."""
    return dtype in (torch.bfloat16, torch.float32)
