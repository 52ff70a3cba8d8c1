"""The fused head's function in chunked PyTorch: any device, memory bounded by the chunk sizes.

Same math as the Triton kernels (``kernels/linear_logprob_forward.py``, ``linear_logprob_backward.py``):
the vocabulary is walked in chunks of ``vocab_chunk`` columns with an online log-sum-exp over ``[M]`` running
statistics, rows in chunks of ``row_chunk``; the backward rebuilds each ``row_chunk x vocab_chunk`` tile of
logits from the saved ``lse``. Arithmetic is fp32 (float64 for float64 inputs): each vocabulary chunk of the
head is upcast once, so extra memory is ``O(M D + row_chunk * vocab_chunk + vocab_chunk * D)``.
"""

from __future__ import annotations

from typing import Optional

import torch

ROW_CHUNK = 1024
VOCAB_CHUNK = 8192


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], scale: float, softcap: Optional[float]):
    z = h @ w.t()
    if b is not None:
        z = z + b
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def forward(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and log-sum-exps of ``hidden[rows]`` (see the module docstring)."""
    cdt = compute_dtype(hidden.dtype)
    M, V = rows.numel(), weight.shape[0]
    h_all = hidden.index_select(0, rows).to(cdt)
    run_max = torch.full((M,), float("-inf"), dtype=cdt, device=hidden.device)
    run_sum = torch.zeros(M, dtype=cdt, device=hidden.device)
    target = torch.zeros(M, dtype=cdt, device=hidden.device)
    labels = labels.long()
    for v0, v1 in _chunks(V, vocab_chunk):
        w = weight[v0:v1].to(cdt)
        b = bias[v0:v1].to(cdt) if bias is not None else None
        for r0, r1 in _chunks(M, row_chunk):
            z = _logits(h_all[r0:r1], w, b, logit_scale, softcap)
            new_max = torch.maximum(run_max[r0:r1], z.max(dim=1).values)
            run_sum[r0:r1] = run_sum[r0:r1] * torch.exp(run_max[r0:r1] - new_max) + torch.exp(z - new_max[:, None]).sum(1)
            run_max[r0:r1] = new_max
            y = labels[r0:r1]
            inside = (y >= v0) & (y < v1)
            picked = z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            target[r0:r1] += torch.where(inside, picked, torch.zeros_like(picked))
    lse = run_max + torch.log(run_sum)
    return target - lse, lse


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    compute_dh: bool = True,
    compute_dw: bool = True,
    compute_db: bool = True,
    dw_dtype: Optional[torch.dtype] = None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``dH`` (gathered rows), ``dW`` (in ``dw_dtype``, default the weight's: each vocabulary chunk is written
    once, from its own accumulator), ``db`` of ``sum_t grad_t * lp_t``; ``None`` for what is not asked."""
    cdt = compute_dtype(hidden.dtype)
    M, (V, D) = rows.numel(), weight.shape
    compute_db = compute_db and bias is not None
    dev = hidden.device
    dh = torch.zeros((M, D), dtype=cdt, device=dev) if compute_dh else None
    dw = torch.empty((V, D), dtype=weight.dtype if dw_dtype is None else dw_dtype, device=dev) if compute_dw else None
    db = torch.empty((V,), dtype=cdt, device=dev) if compute_db else None
    h_all = hidden.index_select(0, rows).to(cdt)
    g_all = grad.to(cdt)
    labels = labels.long()
    for v0, v1 in _chunks(V, vocab_chunk):
        w = weight[v0:v1].to(cdt)
        b = bias[v0:v1].to(cdt) if bias is not None else None
        dw_chunk = torch.zeros((v1 - v0, D), dtype=cdt, device=dev) if compute_dw else None
        db_chunk = torch.zeros((v1 - v0,), dtype=cdt, device=dev) if compute_db else None
        for r0, r1 in _chunks(M, row_chunk):
            h = h_all[r0:r1]
            z = _logits(h, w, b, logit_scale, softcap)
            dz = -torch.exp(z - lse[r0:r1, None].to(cdt))
            y = labels[r0:r1]
            inside = (y >= v0) & (y < v1)
            idx = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
            dz.scatter_add_(1, idx, inside.to(cdt)[:, None])
            dz *= g_all[r0:r1, None]
            if softcap is not None:
                dz *= 1.0 - (z / softcap) ** 2
            if logit_scale != 1.0:
                dz *= logit_scale
            if compute_dh:
                dh[r0:r1] += dz @ w
            if compute_dw:
                dw_chunk += dz.t() @ h
            if compute_db:
                db_chunk += dz.sum(0)
        if compute_dw:
            dw[v0:v1] = dw_chunk
        if compute_db:
            db[v0:v1] = db_chunk
    return dh, dw, db
