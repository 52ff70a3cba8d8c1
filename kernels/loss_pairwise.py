"""Loss head, elementwise: per-item loss terms and their closed-form gradients in one launch.

An *item* is a preference pair (chosen ``c``, rejected ``l``), or a single row (PRO-B, DRO).  For every item the
kernel computes, in fp32, the loss term ``t`` and the derivatives of ``t`` with respect to each differentiable input,
both multiplied by the optional per-item weight ``w`` (WPO weights; DRO's ``1 / (G K_g)``) and the reduction scale
``s`` (``1 / P`` for a batch mean, times the loss weight), so the loss is ``sum_i t_i`` and the backward is
``grad_out * saved gradient``.  The launcher returns one buffer ``out [NOUT, P]``: row 0 the terms, row 1
``dL/dc``, row 2 ``dL/dl``, rows 3 and 4 ``dL/dx1``, ``dL/dx2`` (``NOUT`` = 3 or 5 by loss).

``LOSS`` (constexpr; a compile-time branch) selects the formula.  ``rho_w = c - rc``, ``rho_l = l - rl``,
``d = rho_w - rho_l``, ``z = beta d``, ``r_w = beta rho_w``, ``r_l = beta rho_l``, ``sigma`` the logistic,
``ls`` label smoothing.  Scalars ``k0..k2`` are per-loss constants precomputed in float64 on the host
(:data:`PARAMS` names them).  With ``dL/dz = g``: ``dL/dc = beta g``, ``dL/dl = -beta g``.

==============  =====================================================  ===============================================
loss            term                                                   closed-form gradient
==============  =====================================================  ===============================================
sigmoid         ``-log sigma(z)``                                      ``g = -sigma(-z)``
hinge           ``relu(1 - z)``                                        ``g = -1 if 1 - z > 0 else 0``
ipo             ``u^2``, ``u = rho_w/n_w - rho_l/n_l - 1/(2 beta)``    ``dc = 2u/n_w``, ``dl = -2u/n_l``
exo_pair        ``q(log sigma(z) - log(1-ls)) + (1-q)(log sigma(-z)    ``g = q(1-q)(A - B)``, ``q = sigma(z)``,
                - log ls)``                                            ``A, B`` the two brackets
nca_pair        ``-log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log      ``dc = beta(-sigma(-r_w) + sigma(r_w)/2)``,
                sigma(-r_l)``                                          ``dl = beta sigma(r_l)/2``
robust          ``(-(1-ls) log sigma(z) + ls log sigma(-z))/(1-2ls)``  ``g = (-(1-ls)sigma(-z) - ls sigma(z))/(1-2ls)``
bco_pair        ``-log sigma(r_w) - log sigma(-r_l)``                  ``dc = -beta sigma(-r_w)``, ``dl = beta sigma(r_l)``
sppo_hard       ``(rho_w - 1/(2b))^2 + (rho_l + 1/(2b))^2``            ``dc = 2(rho_w - 1/(2b))``, ``dl = 2(rho_l + ..)``
apo_zero        ``1 - sigma(r_w) + sigma(r_l)``                        ``sigma' = sigma(x) sigma(-x)``
apo_down        ``sigma(r_w) + 1 - sigma(z)``                          ``dc = beta(sigma'(r_w) - sigma'(z))``,
                                                                       ``dl = beta sigma'(z)``
discopop        ``(1-m) softplus(-z) + m e^-z``, ``m = sigma(z/tau)``  ``g = -sigma(-z)(1-m) - softplus(-z) m(1-m)/tau
                (``m e^-z = exp(log sigma(z/tau) - z)``: finite at      - e^-z m + e^-z m(1-m)/tau``
                ``z = -90``, where ``e^-z m`` is ``inf * 0``)
sigmoid_norm    ``-log sigma(beta u)``, ``u = rho_w/n_w - rho_l/n_l``  ``dc = -beta sigma(-beta u)/n_w``, ``dl = -dc n_w/n_l``
simpo           ``-(1-ls) log sigma(z) - ls log sigma(-z)``,           ``g = -(1-ls) sigma(-z) + ls sigma(z)``,
                ``z = beta(c/n_w - l/n_l - gamma/beta)``               ``dc = beta g/n_w``, ``dl = -beta g/n_l``
distill         ``e^2``, ``e = (x1 - x2) - (r_w - r_l)``               ``dc = -2 beta e``, ``dl = 2 beta e``,
                (x = explicit rewards R_w, R_l)                        ``dx1 = 2e``, ``dx2 = -2e``
typo            ``softplus(l - c)``                                    ``dc = -sigma(l - c)``, ``dl = sigma(l - c)``
auxdpo          ``-log sigma(m)``, ``m = r_w - r_l + beta(x1 - x2)``   ``g = -sigma(-m)``; ``dx1 = beta g = -dx2``
                (x = delta_w, delta_l)
drdo            ``e^2 - alpha F H``, ``e = (x3 - x4) - (x1 - x2)``,    ``dx1 = -2e = -dx2``;  ``p = sigma(c - l)``,
                ``F = (1-p)^gamma = exp(gamma log sigma(l - c))``,     ``dc = -alpha(F - gamma F p H)``,
                ``H = c - slog1mexp(l)`` (x = rhat_w, rhat_l, R*;     ``dl = -alpha(gamma F p H - F slog1mexp'(l))``;
                R* = x3, x4 is data: no gradient)                      no gradient to R* (oracle rewards are data)
pro_pair        PRO-P (methods section 2, times 4 outside):            ``dL/dr_w = -1/8 + alpha(nu^2 f'(r_w - r_l) +
                ``-(r_w - r_l)/8 + alpha/2 (nu^2 (2 f(0) + 2 f(r_w -   eta nu f'(r_w - r_h))``, ``dL/dr_h = -alpha eta nu
                r_l)) + 2 eta nu (f(r_w - r_h) + f(r_l - r_h)) + eta^2 (f'(r_w - r_h) + f'(r_l - r_h))``, ``dr_h/dc =
                log 2)``; exact ``r_h = beta(slog1mexp(logaddexp(c,   beta slog1mexp'(lse) e^(c - lse)``; 'zero':
                l)) - (same for ref))``                                ``r_h = 0``
pro_binary      ``w_z (-(z - 1/2) r + lam f(r - r_h))``, ``r = beta      ``dc = w_z beta (-(z - 1/2) + lam f'(r - r_h)
                (c - rc)``, exact ``r_h = beta(slog1mexp(c) -          (1 - slog1mexp'(c)))`` (exact; without the last
                slog1mexp(rc))`` (x1 = label z)                        term in 'zero' mode)
dro             ``e^2``, ``e = x1 - beta(c - rc) - (beta(x2 - x3) +    ``dc = -2 beta e``, ``dx1 = 2e``
                beta log_z0)`` (x1 = R, x2/x3 = prompt log-probs)
==============  =====================================================  ===============================================

``f(x) = (softplus(x) + softplus(-x)) / 2``, ``f'(x) = sigma(x) - 1/2`` (PRO).  ``slog1mexp`` is ``safe_log1mexp``:
``log(1 - e^a)``, continued linearly above ``a = -2^-24`` so that log-probs of 0 or -1e-40 stay finite.  Stable
helpers: ``scalar_math``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .config import interpreter_active, launch, output_buffer
from .scalar_math import (
    log_sigmoid,
    logaddexp,
    pro_f,
    pro_fprime,
    safe_log1mexp,
    safe_log1mexp_grad,
    sigmoid,
    softplus,
)

# LOSS codes (constexpr) and the host constants k0..k2 each one reads.
LOSS_CODES = {
    "sigmoid": 0, "hinge": 1, "ipo": 2, "exo_pair": 3, "nca_pair": 4, "robust": 5, "bco_pair": 6,
    "sppo_hard": 7, "apo_zero": 8, "apo_down": 9, "discopop": 10, "sigmoid_norm": 11,
    "simpo": 20, "distill": 21, "typo": 22, "auxdpo": 23, "drdo": 24, "pro_pair": 25, "pro_binary": 26, "dro": 27,
}
DPO_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
             "apo_down", "discopop", "sigmoid_norm")
NUM_OUTPUTS = {name: (5 if name in ("distill", "auxdpo", "drdo", "dro") else 3) for name in LOSS_CODES}
PARAMS = {
    "ipo": "k0 = 1/(2 beta)", "exo_pair": "k0 = log(1-ls), k1 = log(ls)", "robust": "k0 = 1-ls, k1 = ls, k2 = 1-2ls",
    "sppo_hard": "k0 = 1/(2 beta)", "discopop": "k0 = tau", "simpo": "k0 = gamma/beta, k1 = 1-ls, k2 = ls",
    "drdo": "k0 = alpha, k1 = gamma", "pro_pair": "k0 = alpha, k1 = eta, k2 = nu = (1-eta)/2",
    "pro_binary": "k0 = lam, k1 = desirable_weight, k2 = undesirable_weight", "dro": "k0 = beta log_z0",
}


def host_constants(loss: str, *, beta: float = 1.0, label_smoothing: float = 0.0, tau: float = 1.0,
                   gamma: float = 0.0, alpha: float = 0.0, eta: float = 0.0, lam: float = 0.0,
                   desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                   log_z0: float = 0.0) -> tuple:
    """``(k0, k1, k2)`` for ``loss`` (float64 on the host, as the torch expressions compute them)."""
    ls = label_smoothing
    table = {
        "ipo": (1 / (2 * beta), 0.0, 0.0),
        "exo_pair": (math.log1p(-ls) if ls < 1 else 0.0, math.log(ls) if ls > 0 else 0.0, 0.0),
        "robust": (1 - ls, ls, 1 - 2 * ls),
        "sppo_hard": (0.5 / beta, 0.0, 0.0),
        "discopop": (tau, 0.0, 0.0),
        "simpo": (gamma / beta, 1 - ls, ls),
        "drdo": (alpha, gamma, 0.0),
        "pro_pair": (alpha, eta, (1.0 - eta) / 2),
        "pro_binary": (lam, desirable_weight, undesirable_weight),
        "dro": (beta * log_z0, 0.0, 0.0),
    }
    return table.get(loss, (0.0, 0.0, 0.0))


@triton.jit
def _pairwise_loss_kernel(
    C, L, RC, RL, NW, NL, X1, X2, X3, X4, WT, OUT,
    P, beta, k0, k1, k2, scale,
    LOSS: tl.constexpr, EXACT: tl.constexpr, HAS_WEIGHT: tl.constexpr, NOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    # Masked lanes load harmless values (valid log-probs, unit lengths) and are never stored.
    c = tl.load(C + offs, mask=mask, other=-1.0)
    zero = tl.zeros((BLOCK,), dtype=tl.float32)
    g1 = zero
    g2 = zero
    if LOSS <= 11:  # ------------------------------------------------------------------ DPO family (reverse KL)
        l = tl.load(L + offs, mask=mask, other=-2.0)
        rc = tl.load(RC + offs, mask=mask, other=-1.0)
        rl = tl.load(RL + offs, mask=mask, other=-2.0)
        rho_w = c - rc
        rho_l = l - rl
        z = beta * (rho_w - rho_l)
        if LOSS == 0:  # sigmoid
            t = softplus(-z)
            g = -sigmoid(-z)
            gc = beta * g
            gl = -beta * g
        elif LOSS == 1:  # hinge
            t = tl.maximum(1.0 - z, 0.0)
            g = tl.where(1.0 - z > 0.0, -1.0, 0.0)
            gc = beta * g
            gl = -beta * g
        elif LOSS == 2:  # ipo
            n_w = tl.load(NW + offs, mask=mask, other=1.0)
            n_l = tl.load(NL + offs, mask=mask, other=1.0)
            u = rho_w / n_w - rho_l / n_l - k0
            t = u * u
            gc = 2.0 * u / n_w
            gl = -2.0 * u / n_l
        elif LOSS == 3:  # exo_pair
            q = sigmoid(z)
            qm = sigmoid(-z)
            a = log_sigmoid(z) - k0
            b = log_sigmoid(-z) - k1
            t = q * a + qm * b
            g = q * qm * (a - b)
            gc = beta * g
            gl = -beta * g
        elif LOSS == 4:  # nca_pair
            r_w = beta * rho_w
            r_l = beta * rho_l
            t = -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)
            gc = beta * (-sigmoid(-r_w) + 0.5 * sigmoid(r_w))
            gl = beta * (0.5 * sigmoid(r_l))
        elif LOSS == 5:  # robust
            t = (-k0 * log_sigmoid(z) + k1 * log_sigmoid(-z)) / k2
            g = (-k0 * sigmoid(-z) - k1 * sigmoid(z)) / k2
            gc = beta * g
            gl = -beta * g
        elif LOSS == 6:  # bco_pair
            r_w = beta * rho_w
            r_l = beta * rho_l
            t = -log_sigmoid(r_w) - log_sigmoid(-r_l)
            gc = -beta * sigmoid(-r_w)
            gl = beta * sigmoid(r_l)
        elif LOSS == 7:  # sppo_hard
            a = rho_w - k0
            b = rho_l + k0
            t = a * a + b * b
            gc = 2.0 * a
            gl = 2.0 * b
        elif LOSS == 8:  # apo_zero
            r_w = beta * rho_w
            r_l = beta * rho_l
            t = 1.0 - sigmoid(r_w) + sigmoid(r_l)
            gc = -beta * (sigmoid(r_w) * sigmoid(-r_w))
            gl = beta * (sigmoid(r_l) * sigmoid(-r_l))
        elif LOSS == 9:  # apo_down
            r_w = beta * rho_w
            t = sigmoid(r_w) + 1.0 - sigmoid(z)
            sz = sigmoid(z) * sigmoid(-z)
            gc = beta * (sigmoid(r_w) * sigmoid(-r_w) - sz)
            gl = beta * sz
        elif LOSS == 10:  # discopop
            m = sigmoid(z / k0)
            mc = sigmoid(-z / k0)  # 1 - m
            sp = softplus(-z)
            em = tl.exp(log_sigmoid(z / k0) - z)  # m e^-z, never inf * 0
            t = sp * mc + em
            g = -sigmoid(-z) * mc - sp * (m * mc) / k0 - em + em * mc / k0
            gc = beta * g
            gl = -beta * g
        else:  # sigmoid_norm
            n_w = tl.load(NW + offs, mask=mask, other=1.0)
            n_l = tl.load(NL + offs, mask=mask, other=1.0)
            zn = beta * (rho_w / n_w - rho_l / n_l)
            t = softplus(-zn)
            g = -beta * sigmoid(-zn)
            gc = g / n_w
            gl = -g / n_l
    elif LOSS == 20:  # --------------------------------------------------------------------------------- SimPO
        l = tl.load(L + offs, mask=mask, other=-2.0)
        n_w = tl.load(NW + offs, mask=mask, other=1.0)
        n_l = tl.load(NL + offs, mask=mask, other=1.0)
        z = beta * (c / n_w - l / n_l - k0)
        t = -log_sigmoid(z) * k1 - log_sigmoid(-z) * k2
        g = beta * (-k1 * sigmoid(-z) + k2 * sigmoid(z))
        gc = g / n_w
        gl = -g / n_l
    elif LOSS == 21:  # ------------------------------------------------------------------------ e-DPO distill
        l = tl.load(L + offs, mask=mask, other=-2.0)
        rc = tl.load(RC + offs, mask=mask, other=-1.0)
        rl = tl.load(RL + offs, mask=mask, other=-2.0)
        x1 = tl.load(X1 + offs, mask=mask, other=0.0)
        x2 = tl.load(X2 + offs, mask=mask, other=0.0)
        e = (x1 - x2) - (beta * (c - rc) - beta * (l - rl))
        t = e * e
        gc = -2.0 * beta * e
        gl = 2.0 * beta * e
        g1 = 2.0 * e
        g2 = -2.0 * e
    elif LOSS == 22:  # ---------------------------------------------------------------------- TYPO pair term
        l = tl.load(L + offs, mask=mask, other=-2.0)
        t = softplus(l - c)
        gl = sigmoid(l - c)
        gc = -gl
    elif LOSS == 23:  # ---------------------------------------------------------------- AuxDPO sigmoid term
        l = tl.load(L + offs, mask=mask, other=-2.0)
        rc = tl.load(RC + offs, mask=mask, other=-1.0)
        rl = tl.load(RL + offs, mask=mask, other=-2.0)
        x1 = tl.load(X1 + offs, mask=mask, other=0.0)
        x2 = tl.load(X2 + offs, mask=mask, other=0.0)
        m = beta * (c - rc) - beta * (l - rl) + beta * (x1 - x2)
        t = -log_sigmoid(m)
        g = -beta * sigmoid(-m)
        gc = g
        gl = -g
        g1 = g
        g2 = -g
    elif LOSS == 24:  # ------------------------------------------------------------------------------ DRDO
        l = tl.load(L + offs, mask=mask, other=-2.0)
        x1 = tl.load(X1 + offs, mask=mask, other=0.0)
        x2 = tl.load(X2 + offs, mask=mask, other=0.0)
        x3 = tl.load(X3 + offs, mask=mask, other=0.0)
        x4 = tl.load(X4 + offs, mask=mask, other=0.0)
        e = (x3 - x4) - (x1 - x2)
        ff = tl.exp(k1 * log_sigmoid(l - c))  # (1 - p_w)^gamma, not detached
        p = sigmoid(c - l)
        h = c - safe_log1mexp(l)
        t = e * e - k0 * (ff * h)
        gc = -k0 * (ff - k1 * ff * p * h)
        gl = -k0 * (k1 * ff * p * h - ff * safe_log1mexp_grad(l))
        g1 = -2.0 * e
        g2 = 2.0 * e
    elif LOSS == 25:  # ------------------------------------------------------------------------------ PRO-P
        l = tl.load(L + offs, mask=mask, other=-2.0)
        rc = tl.load(RC + offs, mask=mask, other=-1.0)
        rl = tl.load(RL + offs, mask=mask, other=-2.0)
        r_w = beta * (c - rc)
        r_l = beta * (l - rl)
        if EXACT:
            lse = logaddexp(c, l)
            r_h = beta * (safe_log1mexp(lse) - safe_log1mexp(logaddexp(rc, rl)))
        else:
            lse = zero
            r_h = zero
        nu = k2
        reg_labeled = nu * nu * (2.0 * 0.6931471805599453 + 2.0 * pro_f(r_w - r_l))
        reg_hyper = 2.0 * k1 * nu * (pro_f(r_w - r_h) + pro_f(r_l - r_h))
        t = -(r_w - r_l) / 8.0 + 0.5 * k0 * (reg_labeled + reg_hyper + k1 * k1 * 0.6931471805599453)
        fw = pro_fprime(r_w - r_h)
        fl = pro_fprime(r_l - r_h)
        fwl = pro_fprime(r_w - r_l)
        gc = beta * (-0.125 + k0 * (nu * nu * fwl + k1 * nu * fw))
        gl = beta * (0.125 - k0 * (nu * nu * fwl) + k0 * (k1 * nu * fl))
        if EXACT:  # d r_h / d c = beta safe_log1mexp'(lse) e^(c - lse)
            d_rh = -k0 * k1 * nu * (fw + fl) * beta * safe_log1mexp_grad(lse)
            gc += d_rh * tl.exp(c - lse)
            gl += d_rh * tl.exp(l - lse)
    elif LOSS == 26:  # ------------------------------------------------------------------------------ PRO-B
        rc = tl.load(RC + offs, mask=mask, other=-1.0)
        zl = tl.load(X1 + offs, mask=mask, other=0.0)
        r = beta * (c - rc)
        if EXACT:
            r_h = beta * (safe_log1mexp(c) - safe_log1mexp(rc))
            dh = 1.0 - safe_log1mexp_grad(c)  # d(r - r_h)/dc / beta
        else:
            r_h = zero
            dh = zero + 1.0
        w = tl.where(zl > 0.5, k1, k2)
        t = w * (-(zl - 0.5) * r + k0 * pro_f(r - r_h))
        gc = w * beta * (-(zl - 0.5) + k0 * pro_fprime(r - r_h) * dh)
        gl = zero
    else:  # LOSS == 27 ----------------------------------------------------------------------------------- DRO
        rc = tl.load(RC + offs, mask=mask, other=-1.0)
        x1 = tl.load(X1 + offs, mask=mask, other=0.0)
        x2 = tl.load(X2 + offs, mask=mask, other=0.0)
        x3 = tl.load(X3 + offs, mask=mask, other=0.0)
        e = x1 - beta * (c - rc) - (beta * (x2 - x3) + k0)
        t = e * e
        gc = -2.0 * beta * e
        gl = zero
        g1 = 2.0 * e
        g2 = zero
    if HAS_WEIGHT:
        wt = tl.load(WT + offs, mask=mask, other=0.0)
        t = t * wt
        gc = gc * wt
        gl = gl * wt
        g1 = g1 * wt
        g2 = g2 * wt
    tl.store(OUT + offs, t * scale, mask=mask)
    tl.store(OUT + P + offs, gc * scale, mask=mask)
    tl.store(OUT + 2 * P + offs, gl * scale, mask=mask)
    if NOUT > 3:
        tl.store(OUT + 3 * P + offs, g1 * scale, mask=mask)
        tl.store(OUT + 4 * P + offs, g2 * scale, mask=mask)


def _block(p: int) -> int:
    # One program for batches up to 1024 items (the usual case); the interpreter likes few, wide programs too.
    return max(16, min(1024, triton.next_power_of_2(p)))


def pairwise_loss(
    loss: str,
    c: torch.Tensor,
    l: Optional[torch.Tensor] = None,
    rc: Optional[torch.Tensor] = None,
    rl: Optional[torch.Tensor] = None,
    *,
    n_w: Optional[torch.Tensor] = None,
    n_l: Optional[torch.Tensor] = None,
    x: Sequence[Optional[torch.Tensor]] = (),
    weight: Optional[torch.Tensor] = None,
    beta: float = 1.0,
    constants: tuple = (0.0, 0.0, 0.0),
    scale: float = 1.0,
    exact: bool = True,
) -> torch.Tensor:
    """Launch the kernel once over ``P = c.numel()`` items; returns ``out [NUM_OUTPUTS[loss], P]`` fp32.

    Inputs are 1-D ``[P]`` tensors on one device; they are made contiguous fp32 here (no-ops for the callers in
    ``fastpref.losses.fused``).  Unused inputs may be None.  ``constants = host_constants(loss, ...)``.
    """
    code = LOSS_CODES[loss]
    p = c.numel()
    c = c.detach().to(torch.float32).contiguous()

    def prep(t):  # unused pointers alias c (never read)
        return c if t is None else t.detach().to(torch.float32).contiguous()

    xs = list(x) + [None] * (4 - len(x))
    args = [prep(t) for t in (l, rc, rl, n_w, n_l, *xs)]
    wt = prep(weight)
    nout = NUM_OUTPUTS[loss]
    out = output_buffer((nout, p), torch.float32, c.device)
    block = _block(p)
    grid = (triton.cdiv(p, block),)
    k0, k1, k2 = (float(k) for k in constants)
    launch(_pairwise_loss_kernel, grid, (c, *args, wt, out, p, float(beta), k0, k1, k2, float(scale)),
           dict(LOSS=code, EXACT=bool(exact), HAS_WEIGHT=weight is not None, NOUT=nout, BLOCK=block),
           device=c.device, bytes=4 * p * (10 + nout), num_warps=1 if interpreter_active() else 4)
    return out
