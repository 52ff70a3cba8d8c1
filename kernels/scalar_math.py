"""Stable fp32 scalar math for the loss-head kernels (``@triton.jit`` helpers, elementwise on any block).

Only ``tl.exp``, ``tl.log``, ``tl.abs``, ``tl.where``, ``tl.maximum`` and ``tl.minimum`` are used (no libdevice, no
``tl.math.log1p``/``expm1``: the same code runs under Triton 3.6 on the GPU and 3.9's CPU interpreter).  Every helper
keeps the branch that ``tl.where`` discards finite (both branches are evaluated), and none overflows for the
arguments the losses feed it (sequence log-probs from -1e5 to -1e-8, their differences, rewards).

=====================  ==========================================================================================
``log1p(y)``           Kahan's trick: ``u = 1 + y``; ``y`` if ``u == 1`` else ``log(u) * y / (u - 1)`` (the rounding
                       of ``u`` cancels: exact to a few ulp for every ``y > -1``)
``expm1(x)``           Kahan's dual trick for ``|x| < ln 2``: ``u = e^x``; ``x`` if ``u == 1`` else
                       ``(u - 1) * x / log(u)``; ``e^x - 1`` otherwise (no cancellation there)
``log1mexp(a)``        ``log(1 - e^a)``, ``a < 0`` (methods section 0): ``log(-expm1(a))`` for ``a > -ln 2``,
                       ``log1p(-e^a)`` otherwise; each branch sees a clamped argument
``recip_expm1_neg(a)`` ``1 / expm1(-a) = -d log1mexp(a) / da``, ``a < 0`` (argument clamped at 80: ``e^-80`` is the
                       answer to fp32 precision beyond it)
``safe_log1mexp(a)``   ``log1mexp(a)`` for ``a <= -2^-24``, its tangent line at ``-2^-24`` above (a log-prob of 0 or
                       -1e-40 stays finite; ``fastpref.losses._ops.safe_log1mexp``); ``safe_log1mexp_grad(a)`` its
                       derivative (``-recip_expm1_neg(a)``, or the constant slope above ``-2^-24``)
``sigmoid(x)``         ``1 / (1 + e^-|x|)`` or ``e^-|x| / (1 + e^-|x|)`` (never overflows)
``softplus(x)``        ``max(x, 0) + log1p(e^-|x|)``
``log_sigmoid(x)``     ``min(x, 0) - log1p(e^-|x|)``  (``= -softplus(-x)``)
``logaddexp(a, b)``    ``max + log1p(e^(min - max))`` (as ``Groups.logsumexp`` for two terms)
``pro_f(x)``           ``f(x) = 1/2 softplus(x) + 1/2 softplus(-x)``;  ``pro_fprime(x) = sigma(x) - 1/2``
=====================  ==========================================================================================
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def log1p(y):
    u = 1.0 + y
    d = u - 1.0
    exact = d == 0.0
    return tl.where(exact, y, tl.log(u) * (y / tl.where(exact, 1.0, d)))


@triton.jit
def expm1(x):
    small = tl.abs(x) < 0.6931471805599453
    xs = tl.where(small, x, 0.5)  # the Kahan branch only ever sees |x| < ln 2: no overflow, log(u) != 0 unless u == 1
    u = tl.exp(xs)
    um1 = u - 1.0
    lu = tl.log(u)
    exact = um1 == 0.0
    kahan = tl.where(exact, xs, um1 * (xs / tl.where(exact, 1.0, lu)))
    return tl.where(small, kahan, tl.exp(x) - 1.0)


@triton.jit
def log1mexp(a):
    near = a > -0.6931471805599453
    a_near = tl.where(near, a, -0.6931471805599453)
    a_far = tl.where(near, -0.6931471805599453, a)
    return tl.where(near, tl.log(-expm1(a_near)), log1p(-tl.exp(a_far)))


@triton.jit
def recip_expm1_neg(a):
    return 1.0 / expm1(tl.minimum(-a, 80.0))


# fastpref.losses._ops.SAFE_LOG1MEXP_EPS = 2^-24, and log1mexp / its slope there (float64 on the host).
SAFE_EPS = 5.960464477539063e-08
SAFE_L0 = -16.63553236324101
SAFE_D0 = -16777215.500000004


@triton.jit
def safe_log1mexp(a):
    near = a > -5.960464477539063e-08
    exact = log1mexp(tl.minimum(a, -5.960464477539063e-08))
    return tl.where(near, -16.63553236324101 + (a + 5.960464477539063e-08) * -16777215.500000004, exact)


@triton.jit
def safe_log1mexp_grad(a):
    near = a > -5.960464477539063e-08
    return tl.where(near, -16777215.500000004, -recip_expm1_neg(tl.minimum(a, -5.960464477539063e-08)))


@triton.jit
def sigmoid(x):
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, inv, e * inv)


@triton.jit
def softplus(x):
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def log_sigmoid(x):
    return tl.minimum(x, 0.0) - log1p(tl.exp(-tl.abs(x)))


@triton.jit
def logaddexp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + log1p(tl.exp(lo - hi))


@triton.jit
def pro_f(x):
    return 0.5 * softplus(x) + 0.5 * softplus(-x)


@triton.jit
def pro_fprime(x):
    return sigmoid(x) - 0.5
