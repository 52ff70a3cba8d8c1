"""Fused loss heads: the per-method math of the functional losses as one Triton launch (``fastpref.kernels``
``loss_pairwise`` / ``loss_grouped``), wrapped in autograd functions, plus the backend dispatch.

Each functional loss takes ``backend="auto" | "triton" | "torch"`` and, after its validation, asks
:func:`use_fused`.  When the answer is yes and the configuration is supported, the helper below computes the loss
with one kernel launch that writes the per-item loss terms **and** the closed-form gradients ``dL/dlogp`` (and
``dL/d`` every other differentiable input), already scaled by the reduction; the loss is ``terms.sum()`` (one
``torch.sum`` over the ``[P]`` or ``[G]`` terms: deterministic, no atomics) and the backward is
``grad_out * saved gradient`` (no second launch; not twice differentiable).  Otherwise the helper returns None and
the loss runs its PyTorch expression, which stays the reference (tests compare the two) and the fallback.

Computed in fp32.  Fused (backend 'triton', or 'auto' on CUDA):

* ``dpo_loss``: one ``loss_type`` (with its ``loss_weights`` entry) among ``sigmoid, hinge, ipo, exo_pair,
  nca_pair, robust, bco_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm``, ``f_divergence_type=
  'reverse_kl'``, optional ``wpo_weights`` (detached);
* ``simpo_loss``, ``distill_loss``, ``auxdpo_loss``'s sigmoid term (the ``lambda_amp`` and null-space penalties
  stay in torch), ``typo_loss``'s pair term (the unsupervised term, ``-lam mean(logp_u)``, has a constant gradient
  and stays in torch), ``drdo_loss`` (gradients to both log-probs and the student rewards; the oracle
  rewards are data, detached as in the torch expression);
* ``pro_loss``: pairwise (elementwise kernel, exact hyper response per pair), binary (per row), scalar (grouped
  kernel, one program per group, groups of up to 1024 rows);
* ``dro_loss``: elementwise; a row's term is weighted ``1 / (G K_g)`` (mean over each prompt's responses, then
  over prompts: the loss is separable per row, so no grouping is needed in the kernel).

Falls back to torch (same result): float64 inputs (the kernels are fp32; float64 callers want float64), ``aot``,
``aot_unpaired`` (they sort over the batch), ``sft`` (a batch-level NLL, nothing to fuse), several loss types at
once, f-divergences other than reverse KL, PRO-S groups larger than 1024, and any input that requires grad where
the kernel has no gradient for it (PRO's reference log-probs, lengths, ``wpo_weights``: see ``_GRADS``).  Every
other differentiable input gets its closed-form gradient (reference log-probs of the DPO family, e-DPO and AuxDPO
as ``-dL/dlogp``; rewards of e-DPO, PRO-S and DRO; AuxDPO's delta; DRDO's student rewards).
"""

from __future__ import annotations

import torch

from fastpref.logprobs import triton_usable

BACKENDS = ("auto", "triton", "torch")


def use_fused(backend: str, *tensors: torch.Tensor, fn: str | None = None) -> bool:
    """Whether to compute a loss with the fused loss-head kernels.

    ``'auto'``: fused when the tensors are CUDA tensors and triton is importable; ``'torch'``: never; ``'triton'``:
    always where the kernels can run (CUDA, or CPU tensors with ``TRITON_INTERPRET=1``), else ``ValueError``.
    float64 inputs always take the torch path (the kernels compute in fp32).
    """
    prefix = f"{fn}: " if fn else ""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{prefix}`backend` must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "torch" or not tensors:
        return False
    device = tensors[0].device
    if backend == "auto":
        ok = device.type == "cuda" and triton_usable(device)
    else:
        if not triton_usable(device):
            raise ValueError(
                f"{prefix}`backend='triton'` needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1) and an "
                f"importable triton; got {device.type} tensors. Use backend='torch' or 'auto'."
            )
        ok = True
    return ok and not any(t.dtype == torch.float64 for t in tensors if t is not None)


# ----------------------------------------------------------------------------------------------- autograd glue

_INPUTS = ("c", "l", "rc", "rl", "x1", "x2", "x3", "x4")
# Gradient of each Function input: (row of the kernel's output, sign), "detached" (the torch expression detaches
# it: no gradient), or absent (the kernel has none: a caller whose input requires grad falls back to torch).
_RHO = {"c": (1, 1.0), "l": (2, 1.0), "rc": (1, -1.0), "rl": (2, -1.0)}  # terms depend on c, rc only via c - rc
_GRADS = {
    **{t: _RHO for t in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                         "apo_zero", "apo_down", "discopop", "sigmoid_norm")},
    "simpo": {"c": (1, 1.0), "l": (2, 1.0)},
    "typo": {"c": (1, 1.0), "l": (2, 1.0)},
    "distill": {**_RHO, "x1": (3, 1.0), "x2": (4, 1.0)},
    "auxdpo": {**_RHO, "x1": (3, 1.0), "x2": (4, 1.0)},
    "drdo": {"c": (1, 1.0), "l": (2, 1.0), "x1": (3, 1.0), "x2": (4, 1.0), "x3": "detached", "x4": "detached"},
    "pro_pair": {"c": (1, 1.0), "l": (2, 1.0)},
    "pro_binary": {"c": (1, 1.0), "x1": "detached"},
    "dro": {"c": (1, 1.0), "rc": (1, -1.0), "x1": (3, 1.0), "x2": "detached", "x3": "detached"},
}


def _grads_supported(grads: dict, named: dict, extra=()) -> bool:
    """Every input that requires grad has a kernel gradient (or is detached by the torch expression too)."""
    for name, t in named.items():
        if t is not None and t.requires_grad and name not in grads:
            return False
    return not any(t is not None and t.requires_grad for t in extra)


class _PairwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss, launch_kwargs, c, l, rc, rl, x1, x2, x3, x4):
        from fastpref.kernels import loss_pairwise

        out = loss_pairwise.pairwise_loss(loss, c, l, rc, rl, x=(x1, x2, x3, x4), **launch_kwargs)
        ctx.save_for_backward(out)
        ctx.loss = loss
        return out[0].sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        grads = _GRADS[ctx.loss]
        result = [None, None]
        for i, name in enumerate(_INPUTS):
            spec = grads.get(name)
            if not ctx.needs_input_grad[2 + i] or spec is None or spec == "detached":
                result.append(None)
            else:
                row, sign = spec
                result.append(out[row] * (grad_out * sign))
        return tuple(result)


def _pairwise(loss, *, c, l=None, rc=None, rl=None, x=(), n_w=None, n_l=None, weight=None, beta=1.0,
              scale=1.0, exact=True, **consts):
    """The fused loss, or None when an input needs a gradient the kernel does not provide."""
    from fastpref.kernels import loss_pairwise

    x = tuple(x) + (None,) * (4 - len(x))
    named = dict(zip(_INPUTS, (c, l, rc, rl, *x)))
    if not _grads_supported(_GRADS[loss], named, extra=(n_w, n_l, weight)):
        return None
    kwargs = dict(n_w=n_w, n_l=n_l, weight=weight, beta=beta, scale=scale, exact=exact,
                  constants=loss_pairwise.host_constants(loss, beta=beta, **consts))
    return _PairwiseLoss.apply(loss, kwargs, c, l, rc, rl, *x)


# ------------------------------------------------------------------------------------------- per-method helpers
# Each takes the validated, cast (fp32) tensors of its functional loss and returns the loss, or None to fall back.

_DPO_FUSED = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm")


def dpo(types, weights, cw, cl, rw, rl, *, beta, label_smoothing, discopop_tau, f_divergence_type, n_w, n_l, wpo):
    """``sum_t weights[t] * mean_i(wpo_i * loss_t,i)`` for a single fused ``loss_type``."""
    if len(types) != 1 or types[0] not in _DPO_FUSED or f_divergence_type != "reverse_kl":
        return None
    return _pairwise(types[0], c=cw, l=cl, rc=rw, rl=rl, n_w=n_w, n_l=n_l, weight=wpo, beta=beta,
                     scale=weights[0] / cw.numel(), label_smoothing=label_smoothing, tau=discopop_tau)


def simpo(cw, cl, n_w, n_l, *, beta, gamma, label_smoothing):
    return _pairwise("simpo", c=cw, l=cl, n_w=n_w.to(cw.dtype), n_l=n_l.to(cw.dtype), beta=beta,
                     scale=1.0 / cw.numel(), gamma=gamma, label_smoothing=label_smoothing)


def distill(cw, cl, rw, rl, Rw, Rl, *, beta):
    return _pairwise("distill", c=cw, l=cl, rc=rw, rl=rl, x=(Rw, Rl), beta=beta, scale=1.0 / cw.numel())


def typo_pairs(cw, cl):
    """TYPO's supervised term ``mean softplus(logp_l - logp_w)``."""
    return _pairwise("typo", c=cw, l=cl, scale=1.0 / cw.numel())


def auxdpo_pairs(cw, cl, rw, rl, dw, dl, *, beta):
    """AuxDPO's ``-mean log sigma(m)``; the delta penalties are added by the caller."""
    return _pairwise("auxdpo", c=cw, l=cl, rc=rw, rl=rl, x=(dw, dl), beta=beta, scale=1.0 / cw.numel())


def drdo(cw, cl, hw, hl, ow, ol, *, alpha, gamma):
    return _pairwise("drdo", c=cw, l=cl, x=(hw, hl, ow, ol), scale=1.0 / cw.numel(), alpha=alpha, gamma=gamma)


def pro_pairwise(lp, ref, *, beta, alpha, eta, exact):
    """PRO-P, ``4 * mean over pairs``; rows in TRL layout (chosen half, then rejected half)."""
    b = lp.numel() // 2
    return _pairwise("pro_pair", c=lp[:b], l=lp[b:], rc=ref[:b], rl=ref[b:], beta=beta, scale=4.0 / b,
                     exact=exact, alpha=alpha, eta=eta)


def pro_binary(lp, ref, labels, *, beta, lam, desirable_weight, undesirable_weight, exact):
    return _pairwise("pro_binary", c=lp, rc=ref, x=(labels.to(lp.dtype),), beta=beta, scale=1.0 / lp.numel(),
                     exact=exact, lam=lam, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)


def dro(groups, lp, ref, plp, rplp, R, *, beta, log_z0):
    """DRO: ``sum_i (R_i - beta rho_i - beta log Z_i)^2 / (G K_g(i))`` (= mean over prompts of per-prompt means)."""
    weight = (1.0 / (groups.counts.to(lp.dtype) * groups.num))[groups.inv]
    return _pairwise("dro", c=lp, rc=ref, x=(R, plp, rplp), weight=weight, beta=beta, log_z0=log_z0)


class _ProScalarLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch, lp, ref, R):
        from fastpref.kernels import loss_grouped

        terms, grads = loss_grouped.pro_scalar_loss(lp, ref, R, **launch)
        ctx.save_for_backward(grads)
        return terms.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grads,) = ctx.saved_tensors
        g_lp = grads[0] * grad_out if ctx.needs_input_grad[1] else None
        g_R = grads[1] * grad_out if ctx.needs_input_grad[3] else None
        return None, g_lp, None, g_R


def pro_scalar(groups, lp, ref, R, *, beta, alpha, eta, tau, exact):
    """PRO-S, mean over groups, one program per group (``groups``: ``fastpref.losses._ops.Groups``; ``alpha`` and
    ``eta``: per-group ``[G]`` tensors, in sorted-group order)."""
    from fastpref.kernels.loss_grouped import MAX_GROUP

    if ref.requires_grad or groups.kmax > MAX_GROUP:
        return None
    rows = torch.argsort(groups.inv, stable=True).to(torch.int32)
    counts = groups.counts.to(torch.int32)
    starts = (torch.cumsum(groups.counts, 0) - groups.counts).to(torch.int32)
    launch = dict(rows=rows, starts=starts, counts=counts, kmax=groups.kmax, beta=beta, alpha=alpha.to(lp.device),
                  eta=eta.to(lp.device), tau=tau, exact=exact)
    return _ProScalarLoss.apply(launch, lp, ref, R)


__all__ = ["BACKENDS", "use_fused"]
