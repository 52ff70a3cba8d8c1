"""Forward: per scored row, online log-sum-exp statistics of the logits over vocabulary splits, label excluded.

For row ``t`` and the columns of split ``s`` other than the row's label ``y_t``::

    max_s[t] = max_v z_tv,        sum_s[t] = sum_v exp(z_tv - max_s[t])

(``max_s = -inf``, ``sum_s = 0`` when the split holds no such column). The caller merges the splits with the
target logit ``z_{t,y_t}`` (``kernels/target_logit.py``) into ``max_t`` and ``log sum_t``; nothing of size
``rows x V`` is written.

With ``STATS`` the same pass also accumulates, online (rescaled with the running max), what the per-token
statistics need (``backends/_stats.py`` turns them into entropy, ``log sum p^2``, mean logit, argmax == label)::

    t1_s = sum_v e_v (z_v - max_s),   t2_s = sum_v e_v^2,   zsum_s = sum_v z_v,   before_s = max_{v < y_t} z_v
    label_s = z_{t, y_t} as this tile computed it (-inf when the split does not hold the label)
    (e_v = exp(z_v - max_s), label excluded; t1 is kept relative to the max so a peaked row loses nothing;
    argmax == label compares label_s with the other columns of the same tiles, so ties resolve as argmax does)

Grid: one program per (row block, vocabulary split), ordered by a grouped swizzle: ``GROUP_M`` consecutive row
blocks take consecutive program ids for every split, so the programs resident at once share ``GROUP_M`` row
blocks of ``H`` and the same ``W`` tiles in L2 (a row-block-major grid re-reads ``H`` from HBM for every split; a
split-major one re-reads ``W`` for every row block). The split count fills whole waves of resident programs
(``config.plan_vocab_splits``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import (TileConfig, dot_precision, forward_config, launch, output_buffer, plan_vocab_splits,
                     resident_programs, split_columns, upcast_dot_operands)
from .logits_tile import logits_epilogue, logits_tile


@triton.jit
def _vocab_logsumexp_kernel(
    H, W, B, ROWS, LABELS, MAX_PART, SUM_PART, T1_PART, T2_PART, ZSUM_PART, BEFORE_PART, LABEL_PART,
    M, V, D, stride_h, stride_w, cols_per_split, num_splits,
    scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STATS: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * num_splits
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(row_blocks - first, GROUP_M)
    within = pid % per_group
    pid_m = first + within % size
    pid_s = within // size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_m, mask=m_mask, other=-1).to(tl.int64)
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    before = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    at_label = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_end
        acc = logits_tile(H, W, rows, m_mask, offs_v, v_mask, D, stride_h, stride_w,
                          UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
        z = logits_epilogue(acc, B, offs_v, v_mask, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
        is_label = offs_v[None, :] == labels[:, None]
        if STATS:
            at_label = tl.maximum(at_label, tl.max(tl.where(is_label, z, float("-inf")), axis=1))
        z = tl.where(is_label, float("-inf"), z)  # the label's logit comes from the dot
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # a tile holding only the label: no NaN
        rescale = tl.exp(run_max - safe)
        e = tl.exp(z - safe[:, None])
        if STATS:
            finite = z != float("-inf")
            shift = tl.where(run_max == float("-inf"), 0.0, run_max - safe)
            t1 = rescale * (t1 + run_sum * shift) + tl.sum(e * tl.where(finite, z - safe[:, None], 0.0), axis=1)
            t2 = rescale * rescale * t2 + tl.sum(e * e, axis=1)
            zsum += tl.sum(tl.where(finite, z, 0.0), axis=1)
            before = tl.maximum(before, tl.max(tl.where(offs_v[None, :] < labels[:, None], z, float("-inf")), axis=1))
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        run_max = new_max

    out = pid_s * M + offs_m
    tl.store(MAX_PART + out, run_max, mask=m_mask)
    tl.store(SUM_PART + out, run_sum, mask=m_mask)
    if STATS:
        tl.store(T1_PART + out, t1, mask=m_mask)
        tl.store(T2_PART + out, t2, mask=m_mask)
        tl.store(ZSUM_PART + out, zsum, mask=m_mask)
        tl.store(BEFORE_PART + out, before, mask=m_mask)
        tl.store(LABEL_PART + out, at_label, mask=m_mask)


def vocab_logsumexp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    num_splits: Optional[int] = None,
    tile: Optional[TileConfig] = None,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``(max_part, sum_part)``, each ``[splits, M]`` fp32 (module docstring), for the rows ``hidden[rows]``; with
    ``stats`` also ``(t1_part, t2_part, zsum_part, before_part)``.

    ``hidden [N, D]`` and ``weight [V, D]`` have unit stride in D; ``rows``, ``labels`` contiguous ``[M]``;
    ``bias`` contiguous or None. ``num_splits`` overrides the planned split count (tests use it), ``tile`` the
    tile configuration (``benchmarks.tune_head`` times the candidates).
    """
    M, (V, D) = rows.numel(), weight.shape
    cfg = tile or forward_config(hidden.dtype, stats, hidden.device)
    row_blocks = triton.cdiv(M, cfg.block_m)
    vocab_tiles = triton.cdiv(V, cfg.block_v)
    if num_splits is None:
        num_splits = plan_vocab_splits(row_blocks, vocab_tiles, resident_programs(hidden.device, cfg))
    cols_per_split, splits = split_columns(V, cfg.block_v, num_splits)

    parts = [output_buffer((splits, M), torch.float32, hidden.device) for _ in range(7 if stats else 2)]
    max_part, sum_part = parts[:2]
    extra = parts[2:] if stats else (max_part,) * 5
    padded_d = triton.cdiv(D, cfg.block_d) * cfg.block_d
    launch(_vocab_logsumexp_kernel, (row_blocks * splits,),
           (hidden, weight, bias if bias is not None else weight, rows, labels, max_part, sum_part,
            *extra, M, V, D, hidden.stride(0), weight.stride(0), cols_per_split, splits,
            float(logit_scale), float(softcap) if softcap is not None else 1.0),
           dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                UPCAST=upcast_dot_operands(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype),
                STATS=stats, GROUP_M=cfg.group_m, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d),
           device=hidden.device,
           flops=2.0 * row_blocks * cfg.block_m * vocab_tiles * cfg.block_v * padded_d,
           bytes=(M + V) * D * hidden.element_size() + 4 * len(parts) * splits * M,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return tuple(parts)
