"""Device helpers shared by every kernel that rebuilds a ``[BLOCK_M, BLOCK_V]`` tile of logits.

    z = s * (h W^T + b),   optionally  z <- c * tanh(z / c)     (Gemma-2 final-logit softcap)
"""

import triton
import triton.language as tl

from .scalar_math import expm1


@triton.jit
def tanh(x):
    """``tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|))``, sign restored: no overflow, exact limits, no libdevice,
    and no cancellation at small ``|x|`` (``(1 - e^{-2|x|}) / (1 + e^{-2|x|})`` loses ``2^-24 / |x|`` relative
    there: 4e-6 nats in the logits at softcap 30, 4e-4 at 1e4)."""
    em = expm1(-2.0 * tl.abs(x))
    t = -em / (2.0 + em)
    return tl.where(x >= 0, t, -t)


@triton.jit
def logits_tile(
    H, W, rows, m_mask, offs_v, v_mask, D, stride_h, stride_w,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 ``h W^T`` for the rows ``rows`` (gathered by index, int64) and vocabulary columns ``offs_v``."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + offs_v[None, :] * stride_w + offs_d[:, None], mask=v_mask[None, :] & d_mask[:, None], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def logits_epilogue(acc, B, offs_v, v_mask, scale, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Bias, logit scale and softcap on an fp32 tile; columns outside the vocabulary become -inf."""
    if HAS_BIAS:
        b = tl.load(B + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    z = acc * scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return tl.where(v_mask[None, :], z, float("-inf"))


@triton.jit
def softcap_slope(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """``dz/du`` of the softcap ``z = c tanh(u / c)`` as a function of ``z``: ``1 - (z / c)^2`` (1 without)."""
    if HAS_SOFTCAP:
        t = z / softcap
        return 1.0 - t * t
    return tl.full(z.shape, 1.0, tl.float32)
