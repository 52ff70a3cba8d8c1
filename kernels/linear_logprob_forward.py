"""Forward: token log-probs of scored rows straight from hidden states and the head, no ``N x V`` buffer.

For each scored row ``t`` (gathered by index from ``hidden``) and label ``y_t``:

    z_t   = s * (W h_t + b)      [optional softcap c * tanh(z / c)]
    lse_t = logsumexp_v z_tv     (online over vocabulary tiles, fp32)
    lp_t  = z_{t, y_t} - lse_t

Small ``M`` still fills the GPU: the vocabulary is split across ``num_splits`` programs per row block, each
writes a partial log-sum-exp and its share of the target logit, and the launcher merges them (``O(M)``).
Only ``lse`` (``[M]`` fp32) needs to be kept for the backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import dot_precision, forward_config, num_vocab_splits, output_buffer, upcast_dot_operands
from .logits_tile import logits_epilogue, logits_tile


@triton.jit
def _linear_logprob_forward_kernel(
    H, W, B, ROWS, LABELS, LSE_PART, TGT_PART,
    M, V, D, stride_h, stride_w, cols_per_split,
    scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_m, mask=m_mask, other=-1).to(tl.int64)

    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_end
        acc = logits_tile(H, W, rows, m_mask, offs_v, v_mask, D, stride_h, stride_w,
                          UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
        z = logits_epilogue(acc, B, offs_v, v_mask, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)

    out = pid_s * M + offs_m
    tl.store(LSE_PART + out, run_max + tl.log(run_sum), mask=m_mask)
    tl.store(TGT_PART + out, target, mask=m_mask)


def linear_logprob_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    num_splits: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs ``lp [M]`` and log-sum-exps ``lse [M]`` (fp32) of the rows ``hidden[rows]``.

    ``hidden [N, D]`` and ``weight [V, D]`` have unit stride in the last dimension; ``rows [M]`` indexes
    ``hidden``; ``labels [M]`` lie in ``[0, V)`` (validated by the caller). ``num_splits`` overrides the
    automatic vocabulary split (tests use it to exercise the merge).
    """
    M, (V, D) = rows.numel(), weight.shape
    device = hidden.device
    cfg = forward_config(hidden.dtype)
    row_blocks = triton.cdiv(M, cfg.block_m)
    vocab_tiles = triton.cdiv(V, cfg.block_v)
    splits = num_splits if num_splits is not None else num_vocab_splits(row_blocks, vocab_tiles, device)
    splits = max(1, min(splits, vocab_tiles))
    cols_per_split = triton.cdiv(vocab_tiles, splits) * cfg.block_v
    splits = triton.cdiv(V, cols_per_split)  # every split holds at least one real column

    lse_part = output_buffer((splits, M), torch.float32, device)
    tgt_part = output_buffer((splits, M), torch.float32, device)
    if M > 0:
        _linear_logprob_forward_kernel[(row_blocks, splits)](
            hidden, weight, bias if bias is not None else weight, rows, labels, lse_part, tgt_part,
            M, V, D, hidden.stride(0), weight.stride(0), cols_per_split,
            float(logit_scale), float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            UPCAST=upcast_dot_operands(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
    target = tgt_part.sum(dim=0) if splits > 1 else tgt_part[0]
    return target - lse, lse
