"""Backends of the fused head: ``triton`` (fused kernels + library GEMMs) and ``torch`` (chunked PyTorch, any device).

Both expose the same functions over *gathered scored rows* (``hidden[rows]``, labels ``[M]``):

- ``forward(hidden, weight, bias, rows, labels, *, logit_scale, softcap) -> (lp [M], RowStats)``: token
  log-probs ``lp_t = (z_{t,y_t} - max_t) - log sum_t`` and the statistics ``(max_t, log sum_t)`` kept apart
  (never one rounded ``lse``).
- ``backward(hidden, weight, bias, rows, labels, stats, lp, grad, *, logit_scale, softcap, compute_dh,
  compute_dw, compute_db, dw_dtype=None) -> (dh [N, D] | None, dw [V, D] | None, db [V] | None)``: the gradients
  of ``sum_t grad_t lp_t``; ``dh`` has the shape of ``hidden`` (zero on rows not in ``rows``), ``dw`` is in
  ``dw_dtype`` (default the weight's).
- ``frozen_forward(...) -> (lp, RowStats, unit [N, D], flagged [M])``: the frozen-head (LoRA) forward, which also
  returns each row's unscaled hidden-state gradient, so its backward is elementwise (``_chunked.frozen_forward``).

The chunk loops and GEMMs are shared (:mod:`._chunked`); a backend supplies the tiles (:class:`._chunked.TileOps`).
"""
