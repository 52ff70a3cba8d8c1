"""Frozen head (LoRA), forward: the softmax numerators of a (row chunk, vocabulary chunk) tile, for a library GEMM.

With the head frozen, ``dH_t = g_t s (kappa_{t,y_t} W[y_t] - sum_v p_tv kappa_tv W_v)`` needs only
``u_t = sum_v p_tv kappa_tv W_v``, which the forward accumulates chunk by chunk as ``u += P W[v0:v0+vc]``
(fp32 accumulation) with, for the rows of the chunk and every column except the row's label::

    P_tv = exp(min(z_tv - ref_t, clamp)) * kappa_tv           ref_t = z_{t, y_t} (the target logit)

``P`` is relative to the target logit, which is known before the vocabulary walk (so no online rescaling of
``u``): the label entry would be exactly 1, the entries of a confident row are small, and ``clamp`` (80) keeps
``P`` finite in fp32/bf16. Rows whose true maximum exceeds ``ref_t`` by more than the caller's limit are flagged
by the caller and recomputed exactly in the backward. The label column is written as 0 (the caller adds its
term as ``(1 - p_y) kappa_y W[y]`` with ``1 - p_y = -expm1(lp)``).

Per (row, vocabulary tile) it also writes the exact log-sum-exp statistics of the tile, label excluded,
``max_part[tile, t]`` and ``sum_part[tile, t] = sum_v exp(z_tv - max_part)``: the forward's ``(max, log sum)``
come from the same pass; with ``STATS`` also the per-token statistics' partials (``t1, t2, zsum, before``, as in
``vocab_logsumexp``). No atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import TileConfig, dot_precision, grad_tile_config, launch, output_buffer, upcast_dot_operands
from .logits_tile import logits_epilogue, logits_tile, softcap_slope

NUMERATOR_CLAMP = 80.0  # exp(80) = 5.5e34: finite in fp32 and bf16


@triton.jit
def _softmax_numerator_kernel(
    H, W, B, ROWS, LABELS, REF, P, MAX_PART, SUM_PART, T1_PART, T2_PART, ZSUM_PART, BEFORE_PART, LABEL_PART,
    M, v_begin, vc, D, stride_h, stride_w, stride_p,
    scale, softcap, clamp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_m, mask=m_mask, other=-1).to(tl.int64)
    ref = tl.load(REF + offs_m, mask=m_mask, other=float("inf"))
    local_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = local_v < vc
    offs_v = (v_begin + local_v).to(tl.int64)

    acc = logits_tile(H, W, rows, m_mask, offs_v, v_mask, D, stride_h, stride_w,
                      UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
    z = logits_epilogue(acc, B, offs_v, v_mask, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
    is_label = offs_v[None, :] == labels[:, None]
    at_label = tl.max(tl.where(is_label, z, float("-inf")), axis=1)
    z = tl.where(is_label, float("-inf"), z)

    tile_max = tl.max(z, axis=1)
    safe = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    e = tl.exp(z - safe[:, None])
    out = pid_v * M + offs_m
    tl.store(MAX_PART + out, tile_max, mask=m_mask)
    tl.store(SUM_PART + out, tl.sum(e, axis=1), mask=m_mask)
    if STATS:
        finite = z != float("-inf")
        tl.store(T1_PART + out, tl.sum(e * tl.where(finite, z - safe[:, None], 0.0), axis=1), mask=m_mask)
        tl.store(T2_PART + out, tl.sum(e * e, axis=1), mask=m_mask)
        tl.store(ZSUM_PART + out, tl.sum(tl.where(finite, z, 0.0), axis=1), mask=m_mask)
        tl.store(BEFORE_PART + out, tl.max(tl.where(offs_v[None, :] < labels[:, None], z, float("-inf")), axis=1),
                 mask=m_mask)
        tl.store(LABEL_PART + out, at_label, mask=m_mask)

    num = tl.exp(tl.minimum(z - ref[:, None], clamp))
    num = num * softcap_slope(tl.where(z == float("-inf"), 0.0, z), softcap, HAS_SOFTCAP)
    tl.store(P + offs_m[:, None].to(tl.int64) * stride_p + local_v[None, :], num.to(P.dtype.element_ty),
             mask=m_mask[:, None] & v_mask[None, :])


def softmax_numerator_tile(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    ref: torch.Tensor,
    v_begin: int,
    vc: int,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    tile: Optional[TileConfig] = None,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``(P [mc, vc] in hidden's dtype, max_part [tiles, mc], sum_part [tiles, mc])`` (module docstring) for the
    rows ``hidden[rows]`` and the columns ``[v_begin, v_begin + vc)``; ``ref`` fp32 ``[mc]``. With ``stats``, also
    ``(t1_part, t2_part, zsum_part, before_part, label_part)``."""
    mc, D = rows.numel(), hidden.shape[1]
    cfg = tile or grad_tile_config(hidden.dtype, heavy=stats, device=hidden.device)
    row_blocks, vocab_tiles = triton.cdiv(mc, cfg.block_m), triton.cdiv(vc, cfg.block_v)
    P = output_buffer((mc, vc), hidden.dtype, hidden.device)
    parts = [output_buffer((vocab_tiles, mc), torch.float32, hidden.device) for _ in range(7 if stats else 2)]
    extra = parts[2:] if stats else parts[:1] * 5
    padded_d = triton.cdiv(D, cfg.block_d) * cfg.block_d
    launch(_softmax_numerator_kernel, (row_blocks, vocab_tiles),
           (hidden, weight, bias if bias is not None else weight, rows, labels, ref, P, *parts[:2], *extra,
            mc, v_begin, vc, D, hidden.stride(0), weight.stride(0), P.stride(0),
            float(logit_scale), float(softcap) if softcap is not None else 1.0, NUMERATOR_CLAMP),
           dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                UPCAST=upcast_dot_operands(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype), STATS=stats,
                BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d),
           device=hidden.device,
           flops=2.0 * row_blocks * cfg.block_m * vocab_tiles * cfg.block_v * padded_d,
           bytes=(mc + vc) * D * hidden.element_size() + mc * vc * hidden.element_size() + 4 * len(parts) * vocab_tiles * mc,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (P, *parts)
