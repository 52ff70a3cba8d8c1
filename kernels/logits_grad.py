"""Backward, step 1 of each (row chunk, vocabulary chunk): the logits-gradient tile, written for library GEMMs.

For the scored rows ``t`` of a row chunk and the columns ``v`` of a vocabulary chunk ``[v0, v0 + vc)``::

    p_tv   = exp((z_tv - max_t) - log sum_t)            (the forward's statistics; p is never rebuilt from one
                                                         rounded lse, so logits of 1e4 lose nothing)
    e_tv   = onehot(y_t)_v - p_tv,   at v = y_t:  1 - p_{t,y_t} = -expm1(lp_t)   (exact when p -> 1)
    dz_tv  = dz_scale * kappa_tv * e_tv,   kappa = 1 - (z / c)^2 with softcap c, else 1

``dz`` is stored in the GEMM operand dtype (the head's dtype) as ``[rows, vc]``; the caller forms
``dH_c += dz W[v0:v0+vc]`` and ``dW[v0:v0+vc] += dz^T (g H_c)`` with fp32 accumulation, applying the per-row
weight ``g`` to the product's rows, never to ``dz`` before its rounding (``g e`` in fp16 underflows).
``dz_scale`` is 4096 for fp16 (keeps ``p`` down to 1.5e-8 in fp16's normal range), 1 otherwise.
With ``ENTROPY`` (an upstream gradient on the token entropy ``H_t = -sum_v p log p``, whose logit gradient is
``-p_tv (z_tv - E_p[z_t])``), the tile holds both terms with per-row coefficients ``a_t, b_t`` (the row weights
divided by the larger of the two, so neither underflows)::

    e_tv = a_t (onehot - p)_tv - b_t p_tv ((z_tv - max_t) - mean_shift_t),   mean_shift_t = E_p[z_t] - max_t

With ``COMPUTE_DB``: ``db_part[b, v] = sum_{t in row block b} g_t kappa_tv e_tv`` in fp32 (summed by the caller;
``g_t`` the row's scale).
No atomics: every output element is written by exactly one program.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import TileConfig, dot_precision, grad_tile_config, launch, output_buffer, upcast_dot_operands
from .logits_tile import logits_epilogue, logits_tile, softcap_slope
from .scalar_math import expm1


@triton.jit
def _logits_grad_kernel(
    H, W, B, ROWS, LABELS, MAXS, LOGSUMS, LPS, GRAD, COEF_A, COEF_B, MEAN_SHIFT, DZ, DB_PART,
    M, v_begin, vc, D, stride_h, stride_w, stride_dz,
    scale, softcap, dz_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DB: tl.constexpr, ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_m, mask=m_mask, other=-1).to(tl.int64)
    row_max = tl.load(MAXS + offs_m, mask=m_mask, other=float("inf"))  # padded rows: p = exp(-inf) = 0, never NaN
    row_logsum = tl.load(LOGSUMS + offs_m, mask=m_mask, other=0.0)
    lp = tl.load(LPS + offs_m, mask=m_mask, other=0.0)
    local_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = local_v < vc
    offs_v = (v_begin + local_v).to(tl.int64)

    acc = logits_tile(H, W, rows, m_mask, offs_v, v_mask, D, stride_h, stride_w,
                      UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
    z = logits_epilogue(acc, B, offs_v, v_mask, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp((z - row_max[:, None]) - row_logsum[:, None])
    e = tl.where(offs_v[None, :] == labels[:, None], -expm1(lp)[:, None], -p)
    if ENTROPY:
        a = tl.load(COEF_A + offs_m, mask=m_mask, other=0.0)
        b = tl.load(COEF_B + offs_m, mask=m_mask, other=0.0)
        mean_shift = tl.load(MEAN_SHIFT + offs_m, mask=m_mask, other=0.0)
        centered = tl.where(v_mask[None, :] & m_mask[:, None], (z - row_max[:, None]) - mean_shift[:, None], 0.0)
        e = a[:, None] * e - b[:, None] * p * centered
    e = e * softcap_slope(tl.where(v_mask[None, :], z, 0.0), softcap, HAS_SOFTCAP)

    dz = (e * dz_scale).to(DZ.dtype.element_ty)
    tl.store(DZ + offs_m[:, None].to(tl.int64) * stride_dz + local_v[None, :], dz,
             mask=m_mask[:, None] & v_mask[None, :])
    if COMPUTE_DB:
        g = tl.load(GRAD + offs_m, mask=m_mask, other=0.0)
        tl.store(DB_PART + pid_m * vc + local_v, tl.sum(e * g[:, None], axis=0), mask=v_mask)


def logits_grad_tile(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    lp: torch.Tensor,
    v_begin: int,
    vc: int,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    dz_scale: float = 1.0,
    grad: Optional[torch.Tensor] = None,
    entropy: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    tile: Optional[TileConfig] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dz [mc, vc] in hidden's dtype, db_part)`` for the rows ``hidden[rows]`` (``mc = rows.numel()``) and the
    vocabulary columns ``[v_begin, v_begin + vc)`` (module docstring). ``row_max``, ``row_logsum``, ``lp``:
    fp32 ``[mc]`` from the forward; ``grad`` (fp32 ``[mc]``): with it, also ``db_part [row blocks, vc]`` fp32.
    ``entropy``: ``(a, b, mean_shift)`` fp32 ``[mc]`` each, the two terms' row coefficients (module docstring)."""
    mc, D = rows.numel(), hidden.shape[1]
    cfg = tile or grad_tile_config(hidden.dtype, heavy=entropy is not None, device=hidden.device)
    dz = output_buffer((mc, vc), hidden.dtype, hidden.device)
    row_blocks, vocab_tiles = triton.cdiv(mc, cfg.block_m), triton.cdiv(vc, cfg.block_v)
    compute_db = grad is not None
    db_part = output_buffer((row_blocks, vc), torch.float32, hidden.device) if compute_db else None
    padded_d = triton.cdiv(D, cfg.block_d) * cfg.block_d
    launch(_logits_grad_kernel, (row_blocks, vocab_tiles),
           (hidden, weight, bias if bias is not None else weight, rows, labels, row_max, row_logsum, lp,
            grad if compute_db else row_max, *(entropy if entropy is not None else (row_max,) * 3),
            dz, db_part if compute_db else row_max,
            mc, v_begin, vc, D, hidden.stride(0), weight.stride(0), dz.stride(0),
            float(logit_scale), float(softcap) if softcap is not None else 1.0, float(dz_scale)),
           dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, COMPUTE_DB=compute_db,
                ENTROPY=entropy is not None,
                UPCAST=upcast_dot_operands(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype),
                BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d),
           device=hidden.device,
           flops=2.0 * row_blocks * cfg.block_m * vocab_tiles * cfg.block_v * padded_d,
           bytes=(mc + vc) * D * hidden.element_size() + mc * vc * hidden.element_size() + 16 * mc,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dz, db_part
