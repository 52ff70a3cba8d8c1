"""The autograd function that joins a backend's forward and backward for the fused head.

``FusedHead.apply(hidden2d, weight, bias, rows, labels, backend, options)`` returns ``lp [M]`` for the scored rows
``hidden2d[rows]``. Two paths, chosen in the forward from what needs a gradient:

- **general**: the forward saves the row statistics ``(max, log sum)`` and ``lp`` (``O(M)``); the backward runs
  the backend's chunked-GEMM backward on the rows whose upstream weight is non-zero (the others are skipped,
  not masked), asking only for the gradients that are needed.
- **frozen head** (LoRA: the head needs no gradient, the hidden states do; bf16/fp32 on the triton backend, any
  dtype on torch): the forward also writes each row's unscaled hidden-state gradient into a buffer shaped like
  ``hidden2d``; the backward scales it by ``g_t s`` in place and returns it as the gradient (elementwise; see
  ``backends/_chunked.py``). A second backward through the same graph (``retain_graph=True``) recomputes.

One device synchronization per backward reads everything the host needs (are all rows active, ``max |g|``,
any flagged row). Autocast is off inside both passes. The backward is not differentiable: differentiating it
(``create_graph=True``, double backward, ``gradgradcheck``) raises a clear error instead of a wrong answer.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .backends._chunked import spans
from .backends._stats import RowStats

NOT_TWICE_DIFFERENTIABLE = (
    "fastpref's fused head (sequence_logprobs and the loss modules built on it) is not twice differentiable: its "
    "backward is a fused kernel. For second derivatives (Hessian-vector products, gradient penalties through the "
    "head) use fastpref.reference.sequence_logprobs_reference, which materializes the logits."
)


def no_autocast(device: torch.device):
    """Autocast off for the head's own arithmetic (it computes in the precision its dtype says)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def host_values(values: Sequence[torch.Tensor], defaults: Sequence[float]) -> list[float]:
    """Read 0-d tensors to Python in one synchronization (``defaults`` on ``meta`` tensors: counting runs)."""
    if not values:
        return []
    if any(v.device.type == "meta" for v in values):
        return list(defaults)
    return torch.stack([v.reshape(()).to(torch.float64) for v in values]).tolist()


def _not_twice_differentiable(grads: tuple, anchors: tuple) -> tuple:
    """Under ``create_graph=True`` return aliases of ``grads`` whose own backward raises
    :data:`NOT_TWICE_DIFFERENTIABLE`. The aliasing node also takes the ``anchors`` (the upstream gradient and the
    inputs), so any second derivative towards the inputs passes through it and raises, instead of silently
    finding no path (a zero Hessian)."""
    if not torch.is_grad_enabled():
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    links = [a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]
    err = torch._C._functions.DelayedError(NOT_TWICE_DIFFERENTIABLE.encode(), len(present) + len(links))
    wrapped = err(*[grads[i].detach().requires_grad_() for i in present], *links)
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, w in zip(present, wrapped):
        out[i] = w
    return tuple(out)


def _scale_rows_(buffer: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor, chunk: int = 4096) -> None:
    """``buffer[rows[i]] *= scale[i]`` in place, a few thousand rows at a time."""
    for r0, r1 in spans(rows.numel(), chunk):
        rows_c = rows[r0:r1]
        buffer.index_copy_(0, rows_c, buffer.index_select(0, rows_c).mul_(scale[r0:r1, None]))


class FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, rows, labels, backend, options):
        frozen = (ctx.needs_input_grad[0] and not ctx.needs_input_grad[1] and not ctx.needs_input_grad[2]
                  and backend.frozen_supported(hidden2d.dtype))
        with no_autocast(hidden2d.device):
            if frozen:
                lp, stats, unit, flagged = backend.frozen_forward(hidden2d, weight, bias, rows, labels, **options)
            else:
                lp, stats = backend.forward(hidden2d, weight, bias, rows, labels, **options)
                unit = flagged = None
        ctx.save_for_backward(hidden2d, weight, bias, rows, labels, lp, stats.max, stats.logsum)
        ctx.unit, ctx.flagged = unit, flagged  # intermediates: the unit buffer becomes the gradient in place
        ctx.backend, ctx.options = backend, options
        return lp

    @staticmethod
    def backward(ctx, grad_lp):
        hidden2d, weight, bias, rows, labels, lp, row_max, row_logsum = ctx.saved_tensors
        stats = RowStats(row_max, row_logsum)
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        options, backend = ctx.options, ctx.backend
        with torch.no_grad(), no_autocast(hidden2d.device):
            grad = grad_lp.to(lp.dtype)
            active = grad != 0
            unit, flagged = ctx.unit, ctx.flagged
            reads = [active.all(), grad.abs().max() if grad.numel() else grad.new_zeros(())]
            if unit is not None:
                reads.append((flagged & active).any())
            host = host_values(reads, [1.0, 1.0, 0.0][: len(reads)])
            all_active, grad_max = bool(host[0]), host[1]

            if unit is not None:  # frozen head: the gradient is already formed, up to each row's weight
                ctx.unit = ctx.flagged = None
                _scale_rows_(unit, rows, grad * options.get("logit_scale", 1.0))
                if host[2]:  # flagged rows: their statistics again from the same row set, then the exact backward
                    redo = torch.nonzero(flagged & active).squeeze(1)
                    rows_r, labels_r = rows[redo], labels[redo]
                    lp_r, stats_r = backend.forward(hidden2d, weight, bias, rows_r, labels_r, **options)
                    dh, _, _ = backend.backward(hidden2d, weight, bias, rows_r, labels_r, stats_r, lp_r, grad[redo],
                                                compute_dh=True, compute_dw=False, compute_db=False, **options)
                    unit += dh
                grads = (unit, None, None)
            else:
                if not all_active:
                    keep = torch.nonzero(active).squeeze(1)
                    rows, labels, stats, lp, grad = rows[keep], labels[keep], stats.select(keep), lp[keep], grad[keep]
                grads = backend.backward(hidden2d, weight, bias, rows, labels, stats, lp, grad, compute_dh=need_dh,
                                         compute_dw=need_dw, compute_db=need_db, grad_max=grad_max, **options)
                grads = tuple(g if need else None for g, need in zip(grads, (need_dh, need_dw, need_db)))
        return _not_twice_differentiable(grads, (grad_lp, hidden2d, weight, bias)) + (None, None, None, None)


def reject_transforms(*tensors) -> None:
    """``torch.func`` transforms (vmap, jvp, grad) and forward-mode dual tensors are not supported by the fused
    head: say so instead of returning a missing tangent or failing inside PyTorch."""
    try:
        level = torch._C._functorch.maybe_current_level()
    except AttributeError:  # pragma: no cover - older torch
        level = None
    if level is not None:
        raise RuntimeError("fastpref.sequence_logprobs does not support torch.func transforms (vmap, jvp, grad, "
                           "jacrev...): its kernels take whole batches and have no forward-mode derivative. Call it "
                           "outside the transform, or use fastpref.reference.sequence_logprobs_reference.")
    from torch.autograd.forward_ad import unpack_dual

    for t in tensors:
        if t is not None and unpack_dual(t).tangent is not None:
            raise RuntimeError("fastpref.sequence_logprobs has no forward-mode derivative (dual tensors of "
                               "torch.autograd.forward_ad); use fastpref.reference.sequence_logprobs_reference.")
