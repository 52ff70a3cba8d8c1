"""Backends of the fused head: ``triton`` (fused kernels) and ``torch`` (chunked PyTorch, any device).

Both expose the same two functions over *gathered scored rows*:

- ``forward(hidden, weight, bias, rows, labels, *, logit_scale, softcap) -> (lp [M], lse [M])``
- ``backward(hidden, weight, bias, rows, labels, lse, grad, *, logit_scale, softcap, compute_dh, compute_dw,
  compute_db, dw_dtype=None) -> (dh [M, D] | None, dw [V, D] | None, db [V] | None)``: accumulated in fp32 (or
  float64); ``dw`` is returned in ``dw_dtype`` (default the weight's), each vocabulary chunk written once
"""
