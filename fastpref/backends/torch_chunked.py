"""The fused head's function in chunked PyTorch: any device, memory bounded by the chunk sizes.

Same math as the Triton backend, tile for tile (:mod:`._chunked` runs the same loops over both): the target logit
by an indexed dot, the label-free online log-sum-exp over vocabulary chunks, ``lp = (z_y - max) - log sum``, and
the chunked-GEMM backward with ``1 - p_y = -expm1(lp)``. Arithmetic is fp32 (float64 for float64 inputs): each
chunk of the head and of the rows is upcast once per use, so extra memory is
``O(row_chunk * (vocab_chunk + D))``. Autocast is off inside (the head computes what its dtype says).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpref.kernels.config import backward_chunks

from . import _chunked
from ._chunked import spans
from ._stats import Partials, RowStats, merge, merge_partials, with_target

ROW_CHUNK = 1024
VOCAB_CHUNK = 8192
WORKSPACE_BYTES = 96 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], scale: float, softcap: Optional[float]):
    """``z = s (h w^T + b)``, softcapped; in the operands' dtype."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _slope(z: torch.Tensor, softcap: Optional[float]) -> Optional[torch.Tensor]:
    return None if softcap is None else 1.0 - (z / softcap) ** 2


def _set_label_column(tile: torch.Tensor, labels: torch.Tensor, v0: int, values: torch.Tensor) -> None:
    """``tile[t, y_t - v0] = values[t]`` for the rows whose label falls in this chunk (no host synchronization)."""
    col = (labels - v0).clamp(0, tile.shape[1] - 1)[:, None]
    inside = ((labels >= v0) & (labels < v0 + tile.shape[1]))[:, None]
    tile.scatter_(1, col, torch.where(inside, values.to(tile.dtype)[:, None], tile.gather(1, col)))


class TorchTiles:
    """Tiles for :mod:`._chunked` in PyTorch: rows gathered and upcast once per row chunk."""

    def accum_dtype(self, dtype):
        return compute_dtype(dtype)

    def operand_dtype(self, dtype):
        return compute_dtype(dtype)

    def chunks(self, M, D, V, dtype):
        size = compute_dtype(dtype).itemsize
        return backward_chunks(M, D, V, size, size, workspace=WORKSPACE_BYTES, vocab_chunk=VOCAB_CHUNK)

    def rows(self, hidden, rows):
        return hidden.index_select(0, rows).to(compute_dtype(hidden.dtype))

    def weight_operand(self, weight, v0, v1):
        return weight[v0:v1].to(compute_dtype(weight.dtype))

    def _logits(self, h, weight, bias, v0, v1, scale, softcap):
        cdt = h.dtype
        b = None if bias is None else bias[v0:v1].to(cdt)
        return logits(h, weight[v0:v1].to(cdt), b, scale, softcap)

    def target_logits(self, hidden, weight, bias, rows, labels, *, logit_scale, softcap):
        """``z_{t, y_t}`` per row; ``-inf`` where the label is outside ``[0, V)`` (a shard that does not own it)."""
        cdt = compute_dtype(hidden.dtype)
        V = weight.shape[0]
        out = torch.empty((rows.numel(),), dtype=cdt, device=hidden.device)
        for r0, r1 in spans(rows.numel(), ROW_CHUNK):
            y = labels[r0:r1]
            owned = (y >= 0) & (y < V)
            y = torch.where(owned, y, torch.zeros_like(y))
            h = hidden.index_select(0, rows[r0:r1]).to(cdt)
            z = (h * weight.index_select(0, y).to(cdt)).sum(dim=1)
            if bias is not None:
                z = z + bias.index_select(0, y).to(cdt)
            z = z * logit_scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            out[r0:r1] = torch.where(owned, z, torch.full_like(z, float("-inf")))
        return out

    def grad_tile(self, h, weight, bias, labels, stats, lp, v0, v1, *, logit_scale, softcap, dz_scale, grad,
                  entropy=None):
        z = self._logits(h, weight, bias, v0, v1, logit_scale, softcap)
        p = torch.exp((z - stats.max[:, None]) - stats.logsum[:, None])
        e = -p
        _set_label_column(e, labels, v0, -torch.expm1(lp))
        if entropy is not None:
            a, b, mean_shift = entropy
            e = a[:, None] * e - b[:, None] * p * ((z - stats.max[:, None]) - mean_shift[:, None])
        slope = _slope(z, softcap)
        if slope is not None:
            e.mul_(slope)
        db = None if grad is None else grad @ e
        return e, db

    def numerator_tile(self, h, weight, bias, labels, ref, v0, v1, *, logit_scale, softcap, stats=False):
        from fastpref.kernels.softmax_numerator import NUMERATOR_CLAMP

        z = self._logits(h, weight, bias, v0, v1, logit_scale, softcap)
        part = _label_free_partials(z, labels, v0, stats, _mask_label(z, labels, v0))
        slope = _slope(torch.where(z == float("-inf"), torch.zeros_like(z), z), softcap)
        P = torch.exp(torch.clamp(z - ref[:, None], max=NUMERATOR_CLAMP))
        if slope is not None:
            P.mul_(slope)
        return P, part


def _mask_label(z: torch.Tensor, labels: torch.Tensor, v0: int) -> torch.Tensor:
    """Set each row's label column (when it falls in this chunk) to ``-inf``; return its logit there (``-inf``
    when the chunk does not hold the label)."""
    col = (labels - v0).clamp(0, z.shape[1] - 1)[:, None]
    inside = ((labels >= v0) & (labels < v0 + z.shape[1]))[:, None]
    ninf = torch.full_like(z[:, :1], float("-inf"))
    at_label = torch.where(inside, z.gather(1, col), ninf)
    z.scatter_(1, col, torch.where(inside, ninf, z.gather(1, col)))
    return at_label.squeeze(1)


def _label_free_partials(z: torch.Tensor, labels: torch.Tensor, v0: int, stats: bool,
                         at_label: Optional[torch.Tensor] = None) -> Partials:
    """Partial statistics ``[1, rows]`` of a logits chunk whose label column is already ``-inf``."""
    top = z.amax(dim=1)
    safe = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    shifted = z - safe[:, None]
    e = torch.exp(shifted)
    if not stats:
        return Partials(top[None], e.sum(dim=1)[None])
    finite = z != float("-inf")
    cols = torch.arange(v0, v0 + z.shape[1], device=z.device)
    before = torch.where(cols[None, :] < labels[:, None], z, torch.full_like(z, float("-inf"))).amax(dim=1)
    zero = torch.zeros_like(z)
    return Partials(top[None], e.sum(dim=1)[None], (e * torch.where(finite, shifted, zero)).sum(dim=1)[None],
                    (e * e).sum(dim=1)[None], torch.where(finite, z, zero).sum(dim=1)[None], before[None],
                    at_label[None])


TILES = TorchTiles()


def _label_free(hidden, weight, bias, rows, labels, logit_scale, softcap, row_chunk, vocab_chunk, stats):
    cdt = compute_dtype(hidden.dtype)
    M, V = rows.numel(), weight.shape[0]
    labels = labels.long()
    target = TILES.target_logits(hidden, weight, bias, rows, labels, logit_scale=logit_scale, softcap=softcap)
    out = Partials.empty(torch.empty((M,), dtype=cdt, device=hidden.device), stats)
    for r0, r1 in spans(M, row_chunk):
        h = TILES.rows(hidden, rows[r0:r1])
        y = labels[r0:r1]
        run = Partials(*(x[r0:r1] for x in out if x is not None))
        for v0, v1 in spans(V, vocab_chunk):
            z = TILES._logits(h, weight, bias, v0, v1, logit_scale, softcap)
            run = merge(run, _label_free_partials(z, y, v0, stats, _mask_label(z, y, v0)))
        for dst, src in zip(out, run):
            if dst is not None:
                dst[r0:r1] = src
    return target, out


def shard_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    stats: bool = False,
) -> tuple[torch.Tensor, Partials]:
    """``(target [M], partials)`` over this weight's vocabulary, the label's column excluded from the partials;
    ``target = -inf`` where the label is outside ``[0, V)`` (see ``triton_fused.shard_forward``)."""
    return _label_free(hidden, weight, bias, rows, labels, logit_scale, softcap, row_chunk, vocab_chunk, stats)


def forward(hidden, weight, bias, rows, labels, *, logit_scale: float = 1.0, softcap: Optional[float] = None,
            row_chunk: int = ROW_CHUNK, vocab_chunk: int = VOCAB_CHUNK, stats: bool = False) -> tuple:
    """Token log-probs ``[M]`` and row statistics of ``hidden[rows]`` (see the module docstring); with
    ``stats=True`` also the :class:`._stats.TokenStats`."""
    target, run = _label_free(hidden, weight, bias, rows, labels, logit_scale, softcap, row_chunk, vocab_chunk, stats)
    lp, row_stats, tokens = with_target(target, run, weight.shape[0])
    return (lp, row_stats, tokens) if stats else (lp, row_stats)


def backward(hidden, weight, bias, rows, labels, stats: RowStats, lp, grad, **options):
    """See :func:`._chunked.chunked_backward`."""
    return _chunked.chunked_backward(TILES, hidden, weight, bias, rows, labels.long(), stats, lp, grad, **options)


def frozen_forward(hidden, weight, bias, rows, labels, **options):
    """See :func:`._chunked.frozen_forward`."""
    return _chunked.frozen_forward(TILES, hidden, weight, bias, rows, labels.long(), **options)


def frozen_supported(dtype: torch.dtype) -> bool:
    """Every dtype: the numerators are formed in fp32 (float64) here."""
    return True


__all__ = ["forward", "shard_forward", "backward", "frozen_forward", "frozen_supported", "compute_dtype", "logits", "merge_partials"]
