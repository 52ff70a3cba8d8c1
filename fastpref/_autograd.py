"""The autograd function that joins a backend's forward and backward for the fused head.

``TokenLogProbs.apply(hidden2d, weight, bias, rows, labels, backend, options)`` returns ``lp [M]`` for the
scored rows ``hidden2d[rows]``; its backward takes ``dL/dlp [M]`` (one weight per row: the per-sequence
gradient expanded to tokens by the segment sums' own backward), drops rows whose weight is exactly zero,
and asks the backend only for the gradients that are needed.
"""

from __future__ import annotations

import torch


class TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, rows, labels, backend, options):
        lp, lse = backend.forward(hidden2d, weight, bias, rows, labels, **options)
        ctx.save_for_backward(hidden2d, weight, bias, rows, labels, lse)
        ctx.backend, ctx.options = backend, options
        return lp

    @staticmethod
    def backward(ctx, grad_lp):
        hidden2d, weight, bias, rows, labels, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        active = grad_lp != 0
        if not bool(active.all()):
            rows, labels, lse, grad_lp = rows[active], labels[active], lse[active], grad_lp[active]
        options = {k: v for k, v in ctx.options.items() if k != "num_splits"}
        dh, dw, db = ctx.backend.backward(
            hidden2d, weight, bias, rows, labels, lse, grad_lp,
            compute_dh=need_dh, compute_dw=need_dw, compute_db=need_db and bias is not None, **options,
        )
        grad_hidden = None
        if need_dh:
            grad_hidden = torch.zeros_like(hidden2d)
            grad_hidden.index_copy_(0, rows, dh.to(hidden2d.dtype))
        grad_weight = dw.to(weight.dtype) if need_dw else None
        grad_bias = db.to(bias.dtype) if (need_db and bias is not None) else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
