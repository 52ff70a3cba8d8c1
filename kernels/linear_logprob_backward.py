"""Backward: gradients of ``sum_t g_t * lp_t`` with one weight ``g_t`` per scored row, no ``N x V`` buffer.

    p_t  = softmax(z_t) = exp(z_t - lse_t)               (lse saved by the forward)
    dz_t = g_t * (onehot(y_t) - p_t)                      [softcap: * (1 - (z_t / c)^2)]  * s
    dH_t = dz_t W,      dW = sum_t dz_t^T h_t,      db = sum_t dz_t

One program per (row block, vocabulary block) rebuilds its logits tile once, forms ``dz`` in registers and
adds its contributions to ``dH`` and ``dW`` (fp32 accumulators, atomic adds) one ``BLOCK_D`` slice at a time.
Rows are gathered by index; the caller passes only rows with ``g_t != 0``.

Memory: ``dH`` accumulates in fp32 ``[M, D]`` (O(tokens)). ``dW`` accumulates in an fp32 buffer of
``vocab_chunk`` rows only: the launcher walks the vocabulary in chunks (one launch each, same arithmetic) and
writes each finished chunk into the ``dW`` output in its final dtype, so no ``V x D`` fp32 buffer exists
unless fp32 is the output dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import backward_config, dot_precision, upcast_dot_operands

DW_BUFFER_BYTES = 64 * 2**20  # the fp32 dW accumulator of one vocabulary chunk
from .logits_tile import logits_epilogue, logits_tile


@triton.jit
def _linear_logprob_backward_kernel(
    H, W, B, ROWS, LABELS, LSE, GRAD, DH, DW, DB,
    M, v_begin, v_end, D, stride_h, stride_w, stride_dh, stride_dw,
    scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_m, mask=m_mask, other=-1).to(tl.int64)
    lse = tl.load(LSE + offs_m, mask=m_mask, other=0.0)
    g = tl.load(GRAD + offs_m, mask=m_mask, other=0.0)
    offs_v = (v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_mask = offs_v < v_end

    acc = logits_tile(H, W, rows, m_mask, offs_v, v_mask, D, stride_h, stride_w,
                      UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
    z = logits_epilogue(acc, B, offs_v, v_mask, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])  # 0 on columns outside the vocabulary (z = -inf)
    onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p)
    if HAS_SOFTCAP:
        t = tl.where(v_mask[None, :], z / softcap, 0.0)
        dz = dz * (1.0 - t * t)
    dz = dz * scale
    if COMPUTE_DB:
        tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=v_mask)

    dz_op = dz.to(H.dtype.element_ty)  # operand precision of the matmuls, as the forward's
    if UPCAST:
        dz_op = dz_op.to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if COMPUTE_DH:
            w = tl.load(W + offs_v[:, None] * stride_w + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(DH + offs_m[:, None].to(tl.int64) * stride_dh + offs_d[None, :], dh,
                          mask=m_mask[:, None] & d_mask[None, :])
        if COMPUTE_DW:
            h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(DW + (offs_v - v_begin)[:, None] * stride_dw + offs_d[None, :], dw,
                          mask=v_mask[:, None] & d_mask[None, :])


def linear_logprob_backward(
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
    vocab_chunk: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """fp32 ``dH [M, D]`` (for the gathered rows, in ``rows`` order), ``dW [V, D]`` (in ``dw_dtype``, default
    the weight's) and fp32 ``db [V]``.

    ``grad [M]`` is ``dL/dlp`` per row. A gradient that is not asked for is returned as ``None`` and its
    work is skipped at compile time (a frozen head costs no ``dW`` matmul). ``vocab_chunk`` bounds the fp32
    ``dW`` accumulator (default: ``DW_BUFFER_BYTES``); the frozen-head path needs none and runs one launch.
    """
    M, (V, D) = rows.numel(), weight.shape
    device = hidden.device
    compute_db = compute_db and bias is not None
    dw_dtype = weight.dtype if dw_dtype is None else dw_dtype
    dh = torch.zeros((M, D), dtype=torch.float32, device=device) if compute_dh else None
    db = torch.zeros((V,), dtype=torch.float32, device=device) if compute_db else None
    if compute_dw:
        dw = (torch.zeros if M == 0 else torch.empty)((V, D), dtype=dw_dtype, device=device)
    else:
        dw = None
    if M == 0 or not (compute_dh or compute_dw or compute_db):
        return dh, dw, db
    cfg = backward_config(hidden.dtype)
    if not compute_dw:
        chunk = V
    elif vocab_chunk is not None:
        chunk = max(1, int(vocab_chunk))
    elif dw_dtype == torch.float32:
        chunk = V  # the output itself is the fp32 accumulator
    else:
        chunk = max(cfg.block_v, DW_BUFFER_BYTES // (4 * D) // cfg.block_v * cfg.block_v)
    accumulate_in_output = compute_dw and chunk >= V and dw_dtype == torch.float32
    buffer = None
    if compute_dw:
        buffer = dw.zero_() if accumulate_in_output else torch.empty((min(chunk, V), D), dtype=torch.float32, device=device)
    dummy = lse  # any fp32 tensor: pointer arguments of disabled branches are never read
    grad32 = grad.to(torch.float32).contiguous()
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        if compute_dw and not accumulate_in_output:
            buffer.zero_()
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(v1 - v0, cfg.block_v))
        _linear_logprob_backward_kernel[grid](
            hidden, weight, bias if bias is not None else weight, rows, labels, lse, grad32,
            dh if dh is not None else dummy, buffer if buffer is not None else dummy, db if db is not None else dummy,
            M, v0, v1, D, hidden.stride(0), weight.stride(0), D, D,
            float(logit_scale), float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            UPCAST=upcast_dot_operands(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if compute_dw and not accumulate_in_output:
            dw[v0:v1] = buffer[: v1 - v0]
    return dh, dw, db
