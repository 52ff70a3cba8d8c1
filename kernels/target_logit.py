"""The target logit of every scored row by an indexed dot: ``z_{t, y_t} = s * (h_t . W[y_t] + b[y_t])`` (softcap).

The vocabulary kernels exclude each row's label column and take its logit from here, so the forward's epilogue
carries no label bookkeeping, and ``lp_t = (z_{t,y_t} - max_t) - log sum_t`` uses one value of ``z_{t,y_t}``
everywhere (``max_t`` starts at it; the sum counts it once, as ``exp(z_{t,y_t} - max_t)``).

fp32 products and fp32 accumulation over ``D`` (bf16 x bf16 products are exact in fp32). A label outside
``[0, V)`` (a vocabulary-parallel shard that does not own it) gives ``-inf`` and reads nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import launch, output_buffer, target_config
from .logits_tile import tanh


@triton.jit
def _target_logit_kernel(
    H, W, B, ROWS, LABELS, OUT,
    M, V, D, stride_h, stride_w,
    scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_m, mask=m_mask, other=-1).to(tl.int64)
    owned = m_mask & (labels >= 0) & (labels < V)
    labels = tl.where(owned, labels, 0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = owned[:, None] & (offs_d < D)[None, :]
        h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + labels[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(B + labels, mask=m_mask, other=0.0).to(tl.float32)
    z = acc * scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    tl.store(OUT + offs_m, tl.where(owned, z, float("-inf")), mask=m_mask)


def target_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """``z [M]`` (fp32): the logit of ``labels[i]`` for the row ``hidden[rows[i]]`` (``-inf`` where the label is
    outside ``[0, V)``).

    ``hidden [N, D]`` and ``weight [V, D]`` have unit stride in D; ``rows``, ``labels`` contiguous int ``[M]``;
    ``bias`` contiguous ``[V]`` or None.
    """
    M, D, V = rows.numel(), hidden.shape[1], weight.shape[0]
    cfg = target_config()
    out = output_buffer((M,), torch.float32, hidden.device)
    grid = (triton.cdiv(M, cfg.block_m),)
    launch(_target_logit_kernel, grid,
           (hidden, weight, bias if bias is not None else weight, rows, labels, out, M, V, D, hidden.stride(0),
            weight.stride(0), float(logit_scale), float(softcap) if softcap is not None else 1.0),
           dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d),
           device=hidden.device, flops=2.0 * M * D, bytes=M * D * hidden.element_size() * 2 + 4 * M,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
