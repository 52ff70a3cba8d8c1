"""Loss head, grouped: PRO-S (scalar feedback), one program per prompt group, loss and gradients in one launch.

Rows are grouped by prompt; the host passes the rows in group order (``rows``, a stable argsort of the group
index) and each group's ``start`` and ``count`` (CSR offsets, like ``cu_seqlens``).  Program ``g`` gathers its
``K`` members' ``lp, ref, R`` (``BLOCK_K >= K`` lanes), and computes, in fp32 (docs/methods.md section 2)::

    r_k       = beta (lp_k - ref_k)
    lse       = m + log1p(sum_{k != argmax} e^{lp_k - m})              (as Groups.logsumexp; same for ref)
    r_h       = beta (slog1mexp(lse) - slog1mexp(ref_lse))            ('exact';  r_h = 0 for 'zero')
    shat_k    = (1/K) sum_j sigma((R_k - R_j) / tau) - 1/2,   nu = (1 - eta) / K
    L_g       = -sum_k shat_k r_k / K + alpha/2 (nu^2 sum_{k,j} f(r_k - r_j) + 2 eta nu sum_k f(r_k - r_h)
                                                  + eta^2 log 2)

and the closed-form gradients (``f' (x) = sigma(x) - 1/2``, odd; ``sigma'_{kj} = sigma(1 - sigma)`` at
``(R_k - R_j)/tau``)::

    dL/dr_k   = -shat_k / K + alpha (nu^2 sum_j f'(r_k - r_j) + eta nu f'(r_k - r_h))
    dL/dr_h   = -alpha eta nu sum_k f'(r_k - r_h)
    dL/dlp_k  = beta dL/dr_k + dL/dr_h * beta slog1mexp'(lse) e^{lp_k - lse}   (the last term only when 'exact')
    dL/dR_k   = -(1 / (K^2 tau)) sum_j sigma'_{kj} (r_k - r_j)

``eta`` and ``alpha`` are per group (``ETA[g]``, ``ALPHA[g]``: PRO-S's defaults depend on K).  ``slog1mexp`` is
``safe_log1mexp`` (``log(1 - e^a)``, continued linearly above ``a = -2^-24``; finite at a log-prob of 0).
The ``K x K`` terms are built in column chunks of ``BLOCK_J`` (tile ``BLOCK_K x BLOCK_J <= 1024``: larger tiles spill
registers at 4 warps on sm_90, ``tests/compile_sm90.py``).  Every value
and gradient is multiplied by ``scale`` (``1/G``: the loss is the mean over groups); the gradients are stored
straight at the members' row positions, the group terms at ``out_group[g]`` (loss = their sum, on the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import interpreter_active, launch, output_buffer
from .scalar_math import log1p, pro_f, pro_fprime, safe_log1mexp, safe_log1mexp_grad, sigmoid

MAX_GROUP = 1024  # larger groups: the callers fall back to PyTorch
MAX_TILE = 1024  # BLOCK_K x BLOCK_J elements per column chunk (4096 spilled 48-376 bytes of stack on sm_90)


def group_tile(kmax: int) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_J)`` for groups of up to ``kmax`` rows (every variant is compiled in CI)."""
    block_k = max(2, triton.next_power_of_2(kmax))
    return block_k, max(1, min(block_k, MAX_TILE // block_k))


@triton.jit
def _group_lse(x, mk, offs_k, BLOCK_K: tl.constexpr):
    xm = tl.where(mk, x, float("-inf"))
    m = tl.max(xm, axis=0)
    arg = tl.min(tl.where(mk & (xm == m), offs_k, BLOCK_K), axis=0)
    rest = tl.sum(tl.where(mk & (offs_k != arg), tl.exp(tl.where(mk, x, m) - m), 0.0), axis=0)
    return m + log1p(rest)


@triton.jit
def _pro_scalar_kernel(
    LP, REF, R, ROWS, STARTS, COUNTS, ETA, ALPHA, OUT_GROUP, OUT,
    N, beta, tau, scale,
    EXACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(STARTS + g)
    count = tl.load(COUNTS + g)
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < count
    rows_k = tl.load(ROWS + start + offs_k, mask=mk, other=0)
    lp_k = tl.load(LP + rows_k, mask=mk, other=-1.0)
    ref_k = tl.load(REF + rows_k, mask=mk, other=-1.0)
    R_k = tl.load(R + rows_k, mask=mk, other=0.0)
    r_k = beta * (lp_k - ref_k)
    kf = count.to(tl.float32)

    if EXACT:
        lse = _group_lse(lp_k, mk, offs_k, BLOCK_K)
        r_h = beta * (safe_log1mexp(lse) - safe_log1mexp(_group_lse(ref_k, mk, offs_k, BLOCK_K)))
    else:
        lse = 0.0
        r_h = 0.0

    sig_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    f_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    fp_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    dR_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j0 in range(0, count, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < count
        rows_j = tl.load(ROWS + start + offs_j, mask=mj, other=0)
        r_j = beta * (tl.load(LP + rows_j, mask=mj, other=-1.0) - tl.load(REF + rows_j, mask=mj, other=-1.0))
        R_j = tl.load(R + rows_j, mask=mj, other=0.0)
        pm = mk[:, None] & mj[None, :]
        s = sigmoid((R_k[:, None] - R_j[None, :]) / tau)
        ds = s * sigmoid((R_j[None, :] - R_k[:, None]) / tau)  # sigma'
        dr = r_k[:, None] - r_j[None, :]
        sig_sum += tl.sum(tl.where(pm, s, 0.0), axis=1)
        f_sum += tl.sum(tl.where(pm, pro_f(dr), 0.0), axis=1)
        fp_sum += tl.sum(tl.where(pm, pro_fprime(dr), 0.0), axis=1)
        dR_sum += tl.sum(tl.where(pm, ds * dr, 0.0), axis=1)

    # loaded after the loop: fewer values live across it (no spill at BLOCK_K x BLOCK_J = 128 x 8 on sm_90)
    eta = tl.load(ETA + g)
    alpha = tl.load(ALPHA + g)
    nu = (1.0 - eta) / kf
    shat = sig_sum / kf - 0.5
    muhat_shat = shat / kf
    linear = -tl.sum(tl.where(mk, muhat_shat * r_k, 0.0), axis=0)
    reg_labeled = nu * nu * tl.sum(tl.where(mk, f_sum, 0.0), axis=0)
    reg_hyper = 2.0 * eta * nu * tl.sum(tl.where(mk, pro_f(r_k - r_h), 0.0), axis=0)
    loss = linear + 0.5 * alpha * (reg_labeled + reg_hyper + eta * eta * 0.6931471805599453)
    tl.store(OUT_GROUP + g, loss * scale)

    fh = pro_fprime(r_k - r_h)
    d_rk = -muhat_shat + alpha * (nu * nu * fp_sum + eta * nu * fh)
    g_lp = beta * d_rk
    if EXACT:
        d_rh = -alpha * eta * nu * tl.sum(tl.where(mk, fh, 0.0), axis=0)
        lp_k = tl.load(LP + rows_k, mask=mk, other=-1.0)  # reloaded: not kept live across the loop
        g_lp += d_rh * beta * safe_log1mexp_grad(lse) * tl.exp(lp_k - lse)
    g_R = -dR_sum / (kf * kf * tau)
    tl.store(OUT + rows_k, g_lp * scale, mask=mk)
    tl.store(OUT + N + rows_k, g_R * scale, mask=mk)


def pro_scalar_loss(
    lp: torch.Tensor,
    ref: torch.Tensor,
    rewards: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    kmax: int,
    *,
    beta: float,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    tau: float,
    exact: bool,
):
    """One launch over the ``G = counts.numel()`` groups.  Returns ``(group_terms [G], grads [2, N])`` fp32:
    ``grads[0] = dL/dlp``, ``grads[1] = dL/dR`` in row order, all already scaled by ``1/G``; ``L = group_terms.sum()``.
    ``rows`` (int32/int64, group order), ``starts``, ``counts`` (int32) as described in the module docstring;
    ``kmax <= MAX_GROUP`` the largest count; ``eta``, ``alpha``: per-group ``[G]`` tensors."""
    if kmax > MAX_GROUP:
        raise ValueError(f"pro_scalar_loss: groups of up to {MAX_GROUP} rows, got {kmax}")
    n = lp.numel()
    num_groups = counts.numel()
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    lp, ref, rewards, eta, alpha = f32(lp), f32(ref), f32(rewards), f32(eta), f32(alpha)
    out_group = output_buffer((num_groups,), torch.float32, lp.device)
    out = output_buffer((2, n), torch.float32, lp.device)
    block_k, block_j = group_tile(kmax)
    launch(_pro_scalar_kernel, (num_groups,),
           (lp, ref, rewards, rows.contiguous(), starts.contiguous(), counts.contiguous(), eta, alpha, out_group, out,
            n, float(beta), float(tau), 1.0 / num_groups),
           dict(EXACT=bool(exact), BLOCK_K=block_k, BLOCK_J=block_j), device=lp.device,
           bytes=4 * (5 * n + 5 * num_groups), num_warps=1 if interpreter_active() else 4)
    return out_group, out
