"""``C += alpha * A @ B`` with fp32 accumulation into an fp32 ``C``, for bf16/fp16 (or fp32) ``A`` and ``B``.

The chunked-GEMM backward and the frozen-head forward accumulate ``dH`` and ``u`` in fp32 across vocabulary
chunks from low-precision operands. Where the installed torch has ``torch.addmm(..., out_dtype=torch.float32)``
on CUDA, cuBLAS does this; this kernel is the fallback (and any-stride: ``A`` may be a transposed view).
``beta_zero`` ignores ``C``'s content (a first write into an uninitialized buffer). Deterministic: each
``C`` tile is owned by one program, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import dot_precision, interpreter_active, launch, upcast_dot_operands


@triton.jit
def _matmul_accumulate_kernel(
    A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, alpha,
    BETA_ZERO: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(blocks_m - first, GROUP_M)
    pid_m = first + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = offs_k < K
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    c_ptr = C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = m_mask[:, None] & n_mask[None, :]
    out = acc * alpha
    if not BETA_ZERO:
        out += tl.load(c_ptr, mask=mask, other=0.0)
    tl.store(c_ptr, out, mask=mask)


def matmul_accumulate(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0,
                      beta_zero: bool = False) -> torch.Tensor:
    """``c = alpha * a @ b + (0 if beta_zero else c)`` in place; ``c`` fp32 ``[M, N]``, ``a [M, K]``, ``b [K, N]``
    of one dtype (any strides)."""
    M, K = a.shape
    N = b.shape[1]
    small = interpreter_active()
    bm, bn, bk, warps, stages = (16, 16, 16, 1, 1) if small else (128, 128, 64, 8, 3)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    launch(_matmul_accumulate_kernel, grid,
           (a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            float(alpha)),
           dict(BETA_ZERO=beta_zero, UPCAST=upcast_dot_operands(a.dtype), DOT_PRECISION=dot_precision(a.dtype),
                GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
           device=c.device, flops=2.0 * M * N * K,
           bytes=(M * K + K * N) * a.element_size() + M * N * 4 * (1 if beta_zero else 2),
           num_warps=warps, num_stages=stages)
    return c
