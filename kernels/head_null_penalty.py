"""AuxDPO's head null-space pass: per scored row, ``r_t . (G h_t + g_b)`` with no ``N x V`` buffer.

AuxDPO (docs/methods.md section 5) penalizes ``||G||_F^2 + ||g_b||^2`` with ``G = sum_t w_t r_t h_t^T`` and
``g_b = sum_t w_t r_t`` (the head gradients of ``sum_t w_t lp_t``, ``w_t = delta_seq(t)``: the backward
kernel's ``dW`` and ``db``). Its derivative in ``delta_j`` is ``2 sum_{t in j} u_t`` with, per row::

    r_t  = s * kappa_t * (onehot(y_t) - p_t)      (d lp_t / d(W h_t + b): the backward kernel's dz / w_t)
    q_t  = G h_t + g_b                             (g_b only with a bias)
    u_t  = r_t . q_t = s * ( kappa_{t,y_t} q_{t,y_t} - sum_v p_tv kappa_tv q_tv )

    p_t = exp((z_t - max_t) - log sum_t),   at the label 1 - p = -expm1(lp_t),
    kappa_t = 1 - (z_t / c)^2 with softcap c (else 1),   z_t as in the forward.

The logits tile ``z`` (from ``W``) and the tile ``G h_t`` are built side by side from the same rows and
columns. The forward's statistics ``(max_t, log sum_t)`` are known, so every vocabulary column contributes
independently: programs over (row block, vocabulary split) write partial sums that the launcher adds (``O(M)``),
no online max, no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import (dot_precision, launch, null_pass_config, output_buffer, plan_vocab_splits, resident_programs,
                     split_columns, upcast_dot_operands)
from .logits_tile import logits_epilogue, logits_tile, softcap_slope
from .scalar_math import expm1


@triton.jit
def _head_null_rows_kernel(
    H, W, B, G, GB, ROWS, LABELS, MAXS, LOGSUMS, LPS, OUT_PART,
    M, V, D, stride_h, stride_w, stride_g, cols_per_split,
    scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_G_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, G_UPCAST: tl.constexpr, G_DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_m, mask=m_mask, other=-1).to(tl.int64)
    row_max = tl.load(MAXS + offs_m, mask=m_mask, other=float("inf"))  # padded rows: p = 0, never NaN
    row_logsum = tl.load(LOGSUMS + offs_m, mask=m_mask, other=0.0)
    lp = tl.load(LPS + offs_m, mask=m_mask, other=0.0)

    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_end
        acc = logits_tile(H, W, rows, m_mask, offs_v, v_mask, D, stride_h, stride_w,
                          UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
        z = logits_epilogue(acc, B, offs_v, v_mask, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
        q = logits_tile(H, G, rows, m_mask, offs_v, v_mask, D, stride_h, stride_g,
                        G_UPCAST, G_DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)  # G h_t; 0 outside the vocabulary
        if HAS_G_BIAS:
            q = q + tl.load(GB + offs_v, mask=v_mask, other=0.0)[None, :]
        p = tl.exp((z - row_max[:, None]) - row_logsum[:, None])  # 0 outside the vocabulary (z = -inf)
        r = tl.where(offs_v[None, :] == labels[:, None], -expm1(lp)[:, None], -p)
        r = r * softcap_slope(tl.where(v_mask[None, :], z, 0.0), softcap, HAS_SOFTCAP)
        total += tl.sum(r * q, axis=1)

    tl.store(OUT_PART + pid_s * M + offs_m, total * scale, mask=m_mask)


def _g_operand(g_weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool, str]:
    """``G`` as a matmul operand next to ``hidden`` of ``dtype``: (tensor, upcast to fp32, dot precision).

    fp32 heads: fp32 ``G``, IEEE dot. bf16 heads: ``G`` rounded to bf16 (the backward kernel does the same to
    ``dz``), tensor-core dot. fp16 heads: ``G`` stays fp32 (it can exceed fp16's range), ``h`` is upcast, tf32.
    """
    if dtype == torch.float32:
        return g_weight.to(torch.float32).contiguous(), False, "ieee"
    if dtype == torch.bfloat16:
        return g_weight.to(torch.bfloat16).contiguous(), upcast_dot_operands(dtype), dot_precision(dtype)
    return g_weight.to(torch.float32).contiguous(), True, "tf32"


def head_null_row_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    lp: torch.Tensor,
    g_weight: torch.Tensor,
    g_bias: Optional[torch.Tensor],
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """``u [M]`` (fp32): ``u_t = r_t . (G h_t + g_b)`` for the rows ``hidden[rows]`` (module docstring).

    ``hidden [N, D]``, ``weight [V, D]`` (unit stride in D), ``bias``, ``rows``, ``labels``: as in
    ``vocab_logsumexp``; ``row_max``, ``row_logsum``, ``lp`` ``[M]``: the forward's statistics and token
    log-probs; ``g_weight [V, D]`` / ``g_bias [V]``: the head gradients ``G`` and ``g_b`` (``None``: no ``g_b``
    term; pass it exactly when the head has a bias). ``num_splits`` overrides the planned vocabulary split.
    Every pointer argument is made contiguous here (a strided or expanded bias is copied, never misread).
    """
    M, (V, D) = rows.numel(), weight.shape
    device = hidden.device
    cfg = null_pass_config(hidden.dtype)  # two [BLOCK_M, BLOCK_V] accumulators
    row_blocks = triton.cdiv(M, cfg.block_m)
    vocab_tiles = triton.cdiv(V, cfg.block_v)
    if num_splits is None:
        num_splits = plan_vocab_splits(row_blocks, vocab_tiles, resident_programs(device, cfg))
    cols_per_split, splits = split_columns(V, cfg.block_v, num_splits)

    g_op, g_upcast, g_precision = _g_operand(g_weight, hidden.dtype)
    has_bias, has_g_bias = bias is not None, g_bias is not None
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    row_max, row_logsum, lp = f32(row_max), f32(row_logsum), f32(lp)
    gb = f32(g_bias) if has_g_bias else row_max
    out_part = output_buffer((splits, M), torch.float32, device)
    padded_d = triton.cdiv(D, cfg.block_d) * cfg.block_d
    launch(_head_null_rows_kernel, (row_blocks, splits),
           (hidden, weight, bias.contiguous() if has_bias else weight, g_op, gb, rows.contiguous(),
            labels.contiguous(), row_max, row_logsum, lp, out_part,
            M, V, D, hidden.stride(0), weight.stride(0), g_op.stride(0), cols_per_split,
            float(logit_scale), float(softcap) if softcap is not None else 1.0),
           dict(HAS_BIAS=has_bias, HAS_G_BIAS=has_g_bias, HAS_SOFTCAP=softcap is not None,
                UPCAST=upcast_dot_operands(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype),
                G_UPCAST=g_upcast, G_DOT_PRECISION=g_precision,
                BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d),
           device=device, flops=4.0 * row_blocks * cfg.block_m * vocab_tiles * cfg.block_v * padded_d,
           bytes=(M + 2 * V) * D * hidden.element_size() + 4 * splits * M,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out_part.sum(dim=0) if splits > 1 else out_part[0]
