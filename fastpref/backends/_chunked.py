"""The chunk loops both backends share: the chunked-GEMM backward and the frozen-head forward.

A backend supplies the tiles (:class:`TileOps`: Triton kernels, or the same math in PyTorch); the loops, the
GEMMs (:func:`._gemm.accumulate_mm`, fp32 accumulation) and every scaling live here once.

**Backward** (gradients of ``sum_t g_t lp_t``; docs/methods.md section 0), rows outer, vocabulary inner::

    for each row chunk c (Mc rows, gathered by index):
        Hg_c = (g_t s / gmax) h_t                                     [Mc, D]  operand dtype (dW only)
        for each vocabulary chunk [v0, v1):
            dz   = dz_scale kappa (onehot - p)                        [Mc, Vc] operand dtype (the tile kernel)
            dH_c += dz W[v0:v1] / dz_scale                            fp32 accumulation across the chunks
            dW[v0:v1] += (gmax / dz_scale) dz^T Hg_c                  fp32 inside each GEMM
            db[v0:v1] += s sum_t g_t kappa (onehot - p)               fp32 (from the tile kernel)
        dH[rows of c] = (g_t s) dH_c                                  the row weight after the product

No atomics; deterministic run to run. The per-row weight ``g`` never multiplies ``dz`` before it is rounded
(fp16 would flush ``g (onehot - p)`` to zero); ``gmax = max |g|`` keeps the weighted rows in range. ``dW`` in
fp32 is exact; a bf16/fp16 ``dW`` is rounded once per row chunk (``ceil(M / Mc)`` times: 4 at the Llama-3-8B DPO
shape, where ``Mc = 2048``) instead of holding a ``V x D`` fp32 buffer (2 GiB). Extra memory is
``Mc (Vc + D) b + 4 Mc D`` bytes (``config.backward_chunks``: 56 MiB at the 8B head).

**Frozen head** (the weight needs no gradient, the hidden states do): the forward also forms, per row,
``unit_t = kappa_{t,y_t} (1 - p_{t,y_t}) W[y_t] - sum_{v != y_t} p_tv kappa_tv W_v`` (fp32 accumulation of
``P W[v0:v1]`` chunk by chunk, ``P`` relative to the target logit: no rescaling), and writes it into a buffer
shaped like ``hidden`` that the backward scales by ``g_t s`` in place and returns as the gradient itself: the
backward is elementwise, 1 unit instead of 3. Rows whose maximum logit exceeds their target logit by more than
:data:`FROZEN_LIMIT` nats (``lp_t < -60``) are flagged and recomputed exactly by the backward above.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from fastpref.kernels.config import backward_chunks

from ._gemm import accumulate_mm
from ._stats import Partials, RowStats, TokenStats, merge, with_target

FROZEN_LIMIT = 60.0  # nats: beyond it, P entries reach e^60 and the fp32 sum of P W could lose range
FP16_DZ_SCALE = 4096.0


class TileOps(Protocol):
    """What a backend provides to the shared loops (see ``torch_chunked.TorchTiles``, ``triton_fused.TritonTiles``)."""

    def accum_dtype(self, dtype: torch.dtype) -> torch.dtype: ...
    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype: ...
    def chunks(self, M: int, D: int, V: int, dtype: torch.dtype) -> tuple[int, int]: ...
    def rows(self, hidden: torch.Tensor, rows: torch.Tensor): ...
    def weight_operand(self, weight: torch.Tensor, v0: int, v1: int) -> torch.Tensor: ...
    def target_logits(self, hidden, weight, bias, rows, labels, *, logit_scale, softcap) -> torch.Tensor: ...
    def grad_tile(self, rows_ctx, weight, bias, labels, stats: RowStats, lp, v0: int, v1: int, *,
                  logit_scale, softcap, dz_scale, grad, entropy) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...
    def numerator_tile(self, rows_ctx, weight, bias, labels, ref, v0: int, v1: int, *,
                       logit_scale, softcap, stats) -> tuple[torch.Tensor, Partials]: ...


def spans(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _dz_scale(operand: torch.dtype) -> float:
    return FP16_DZ_SCALE if operand == torch.float16 else 1.0


def _row_weights(grad: torch.Tensor, entropy_grad: Optional[torch.Tensor], stats: RowStats):
    """``(row scale w, tile coefficients or None)``: without an entropy gradient ``w = g``; with one,
    ``w = max(|g|, |gamma|)`` and the tile forms ``(g / w) (onehot - p) - (gamma / w) p (z - E z)``."""
    if entropy_grad is None:
        return grad, None
    if stats.mean_shift is None:
        raise ValueError("an entropy gradient needs the forward's per-token statistics (mean_shift)")
    w = torch.maximum(grad.abs(), entropy_grad.abs())
    safe = torch.where(w == 0, torch.ones_like(w), w)
    return w, (grad / safe, entropy_grad / safe, stats.mean_shift)


def chunked_backward(
    ops: TileOps,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    stats: RowStats,
    lp: torch.Tensor,
    grad: torch.Tensor,
    *,
    entropy_grad: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    compute_dh: bool = True,
    compute_dw: bool = True,
    compute_db: bool = True,
    dw_dtype: Optional[torch.dtype] = None,
    grad_max: Optional[float] = None,
    row_chunk: Optional[int] = None,
    vocab_chunk: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dh [N, D], dw [V, D], db [V])`` of ``sum_t grad_t lp_t (+ sum_t entropy_grad_t H_t)`` (module docstring);
    ``None`` where not asked.

    ``entropy_grad``: an upstream gradient on the per-token entropy (needs ``stats.mean_shift``, from a forward
    with statistics); its logit gradient ``-p (z - E_p z)`` joins ``dz`` in the same tiles. ``grad_max``:
    ``max`` of the row scales if the caller already read it (one device synchronization otherwise, only when
    ``dW`` is needed). ``row_chunk`` / ``vocab_chunk`` override the backend's chunk sizes (tests).
    """
    M, (V, D) = rows.numel(), weight.shape
    compute_db = compute_db and bias is not None
    acc, op = ops.accum_dtype(hidden.dtype), ops.operand_dtype(hidden.dtype)
    mc, vc = ops.chunks(M, D, V, hidden.dtype)
    mc, vc = row_chunk or mc, vocab_chunk or vc
    dz_scale, s = _dz_scale(op), float(logit_scale)
    dev = hidden.device
    grad, coef = _row_weights(grad.to(acc), None if entropy_grad is None else entropy_grad.to(acc), stats)

    dh = torch.zeros_like(hidden) if compute_dh else None
    dw = torch.empty((V, D), dtype=dw_dtype or weight.dtype, device=dev) if compute_dw else None
    db = torch.zeros((V,), dtype=acc, device=dev) if compute_db else None
    if M == 0:
        if dw is not None:
            dw.zero_()
        return dh, dw, None if db is None else db.to(bias.dtype)
    if compute_dw and (grad_max is None or coef is not None):
        grad_max = float(grad.abs().max()) if dev.type != "meta" else 1.0
    gmax = grad_max if compute_dw and grad_max else 1.0

    for ci, (r0, r1) in enumerate(spans(M, mc)):
        rows_c, g_c = rows[r0:r1], grad[r0:r1]
        ctx = ops.rows(hidden, rows_c)
        stats_c, lp_c, labels_c = stats.select(slice(r0, r1)), lp[r0:r1], labels[r0:r1]
        coef_c = None if coef is None else tuple(x[r0:r1] for x in coef)
        hg = None
        if compute_dw:
            hg = hidden.index_select(0, rows_c).to(op)
            hg.mul_((g_c * (s / gmax))[:, None])  # in place: one rounding, no fp32 copy of the rows
        dh_c = torch.empty((r1 - r0, D), dtype=acc, device=dev) if compute_dh else None
        for vi, (v0, v1) in enumerate(spans(V, vc)):
            dz, db_c = ops.grad_tile(ctx, weight, bias, labels_c, stats_c, lp_c, v0, v1, logit_scale=s,
                                     softcap=softcap, dz_scale=dz_scale, grad=g_c if compute_db else None,
                                     entropy=coef_c)
            if compute_dh:
                accumulate_mm(dh_c, dz, ops.weight_operand(weight, v0, v1), alpha=1.0 / dz_scale, beta_zero=vi == 0)
            if compute_dw:
                accumulate_mm(dw[v0:v1], dz.t(), hg, alpha=gmax / dz_scale, beta_zero=ci == 0)
            if compute_db:
                db[v0:v1] += s * db_c
            del dz
        del hg, ctx  # before the write-out and the next chunk: one chunk's buffers live at a time
        if compute_dh:
            dh_c.mul_((g_c * s)[:, None])
            dh.index_copy_(0, rows_c, dh_c.to(hidden.dtype))
        del dh_c
    return dh, dw, None if db is None else db.to(bias.dtype)


def frozen_forward(
    ops: TileOps,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    stats: bool = False,
    row_chunk: Optional[int] = None,
    vocab_chunk: Optional[int] = None,
) -> tuple:
    """``(lp [M], row stats, unit [N, D], flagged [M])`` for a frozen head (module docstring), and the
    :class:`TokenStats` as a fifth element with ``stats=True``.

    ``unit`` has ``hidden``'s shape and dtype, zero on rows not in ``rows`` and on flagged rows; the hidden-state
    gradient of ``sum_t g_t lp_t`` is ``g_t s unit_t`` on every row that is not flagged.
    """
    M, (V, D) = rows.numel(), weight.shape
    acc = ops.accum_dtype(hidden.dtype)
    mc, vc = ops.chunks(M, D, V, hidden.dtype)
    mc, vc = row_chunk or mc, vocab_chunk or vc
    dev = hidden.device
    target = ops.target_logits(hidden, weight, bias, rows, labels, logit_scale=logit_scale, softcap=softcap).to(acc)
    unit = torch.zeros_like(hidden)
    flagged = torch.empty((M,), dtype=torch.bool, device=dev)
    pieces = []
    for r0, r1 in spans(M, mc):
        rows_c, labels_c, t_c = rows[r0:r1], labels[r0:r1], target[r0:r1]
        ctx = ops.rows(hidden, rows_c)
        u = torch.empty((r1 - r0, D), dtype=acc, device=dev)
        run = Partials.empty(t_c, stats)
        for vi, (v0, v1) in enumerate(spans(V, vc)):
            P, part = ops.numerator_tile(ctx, weight, bias, labels_c, t_c, v0, v1, logit_scale=logit_scale,
                                         softcap=softcap, stats=stats)
            accumulate_mm(u, P, ops.weight_operand(weight, v0, v1), beta_zero=vi == 0)
            run = merge(run, part)
            del P
        lp_c, stats_c, tokens_c = with_target(t_c, run, V)
        kappa_y = 1.0 - (t_c / softcap) ** 2 if softcap is not None else torch.ones_like(t_c)
        u.mul_(-torch.exp(lp_c)[:, None])  # sum_{v != y} p_v kappa_v W_v = p_y * u
        u.addcmul_(weight.index_select(0, labels_c), (kappa_y * -torch.expm1(lp_c))[:, None])
        flag_c = (stats_c.max - t_c) > FROZEN_LIMIT
        u.masked_fill_(flag_c[:, None], 0.0)
        unit.index_copy_(0, rows_c, u.to(hidden.dtype))
        flagged[r0:r1] = flag_c
        pieces.append((lp_c, stats_c, tokens_c))
        del u, ctx
    lp = torch.cat([p[0] for p in pieces]) if pieces else target.clone()
    row_stats = RowStats(*(None if pieces[0][1][i] is None else torch.cat([p[1][i] for p in pieces])
                           for i in range(3))) if pieces else RowStats(target.clone(), target.clone())
    out = (lp, row_stats, unit, flagged)
    if stats:
        out += (TokenStats(*(torch.cat([p[2][i] for p in pieces]) for i in range(4))),) if pieces else (
            TokenStats(*(target.clone() for _ in range(3)), target > 0),)
    return out
