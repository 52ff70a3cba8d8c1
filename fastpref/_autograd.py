"""The fused head as ``torch.library`` custom ops, with fake (meta) implementations and registered autograd.

``torch.ops.fastpref.fused_head`` takes the whole batch (every row, scored or not) and returns per-row outputs of
static shape, so ``torch.compile(fullgraph=True)`` traces a training step through it with no graph break and no
recompile across sequence lengths; the data-dependent parts (the compaction of scored rows, the input checks that
read values, the one device synchronization of the backward) run inside the ops. Eager calls take the same ops.

Forward outputs, each ``[N]`` (fp32; float64 for float64 inputs; zero on rows that are not scored): the token
log-probs ``lp`` (differentiable), the row statistics ``max`` and ``log sum`` (and, with ``stats``, ``mean_shift =
E_p[z] - max``), and with ``stats`` the per-token entropy (differentiable: its gradient ``-p (z - E_p z)`` joins
``dz`` in the same backward pass), ``log sum_v p^2``, the mean logit and argmax == label. Plus, for a frozen head,
the buffer ``unit [N, D]`` and ``flagged [N]`` (``backends/_chunked.frozen_forward``).

Backward: the general path runs the backend's chunked-GEMM backward on the rows whose upstream weights are not all
zero (the others are skipped, not masked), for the gradients that are needed. The frozen-head path scales
``unit`` by ``g_t s`` (in place in eager mode, where the buffer then *is* the gradient: no second ``[N, D]``
tensor), recomputes flagged rows exactly, and adds an entropy gradient if one flows. A second backward through
the same graph (``retain_graph=True``) recomputes through the general path. Autocast is off inside. The backward
is not differentiable: a double backward raises :data:`NOT_TWICE_DIFFERENTIABLE` instead of a wrong answer.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ._rows import row_sequences
from .backends._stats import RowStats

PROMPT, RESPONSE = 1, 2
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def backend_module(name: str):
    if name == "triton":
        from .backends import triton_fused

        return triton_fused
    from .backends import torch_chunked

    return torch_chunked


def scored_segments(labels: torch.Tensor, segment_ids: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """``[N]`` int64: 0 = not scored (padding, ``ignore_index`` labels, segment 0), 1 = prompt, 2 = response."""
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    if segment_ids is None:
        return torch.where(valid, RESPONSE, 0)
    return torch.where(valid, segment_ids.reshape(-1).long(), 0)


# -- forward ------------------------------------------------------------------------------------------------------
def _scatter(rows: torch.Tensor, values: torch.Tensor, N: int, fill=0) -> torch.Tensor:
    out = torch.full((N,), fill, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


@torch.library.custom_op("fastpref::fused_head", mutates_args=())
def fused_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    segment_ids: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    ignore_index: int,
    row_len: int,
    logit_scale: float,
    softcap: Optional[float],
    backend: str,
    frozen: bool,
    stats: bool,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused head over every row of ``hidden [N, D]`` (module docstring); ``labels``/``segment_ids`` flat
    ``[N]`` as the user gave them, ``row_len`` = T for a padded batch (0 when packed with ``cu_seqlens``)."""
    from ._validation import require_finite_number, require_softcap
    from .logprobs import data_checks  # the public API's checks, run here so compiled graphs keep them

    logit_scale = require_finite_number("logit_scale", logit_scale, positive=True)
    softcap = require_softcap(softcap)
    flat_labels = labels.reshape(-1).long()
    segments = scored_segments(flat_labels, segment_ids, ignore_index)
    if validate:
        data_checks(hidden, weight, bias, flat_labels, segment_ids, cu_seqlens, ignore_index, logit_scale,
                    row_len=row_len, segments=segments)
    rows = torch.nonzero(segments > 0).squeeze(1)
    return forward_rows(backend_module(backend), hidden, weight, bias, rows, flat_labels.index_select(0, rows),
                        logit_scale=logit_scale, softcap=softcap, frozen=frozen, stats=stats)


def forward_rows(impl, hidden, weight, bias, rows, row_labels, *, logit_scale, softcap, frozen, stats):
    """The op's work once the scored ``rows`` are known: the backend's (frozen) forward, outputs scattered to
    every row (``benchmarks.cost`` calls this directly on meta tensors to count the work)."""
    N = hidden.shape[0]
    options = {"logit_scale": logit_scale, "softcap": softcap}
    with no_autocast(hidden.device):
        if frozen:
            lp, row_stats, unit, flagged, *tokens = impl.frozen_forward(hidden, weight, bias, rows, row_labels,
                                                                         stats=stats, **options)
        else:
            lp, row_stats, *tokens = impl.forward(hidden, weight, bias, rows, row_labels, stats=stats, **options)
            unit = hidden.new_empty((0, hidden.shape[1]))
            flagged = torch.empty((0,), dtype=torch.bool, device=hidden.device)
    cdt = compute_dtype(hidden.dtype)
    outs = [_scatter(rows, lp.to(cdt), N), _scatter(rows, row_stats.max.to(cdt), N),
            _scatter(rows, row_stats.logsum.to(cdt), N)]
    if stats:
        t = tokens[0]
        outs += [_scatter(rows, row_stats.mean_shift.to(cdt), N), _scatter(rows, t.entropy.to(cdt), N),
                 _scatter(rows, t.log_sum_p2.to(cdt), N), _scatter(rows, t.mean_logit.to(cdt), N),
                 _scatter(rows, t.argmax_is_label, N, False)]
    else:
        empty = lambda: torch.empty((0,), dtype=cdt, device=hidden.device)  # noqa: E731
        outs += [empty(), empty(), empty(), empty(), torch.empty((0,), dtype=torch.bool, device=hidden.device)]
    if frozen:
        flagged = _scatter(rows, flagged, N, False)
    return (*outs, unit, flagged)


@fused_head.register_fake
def _fused_head_fake(hidden, weight, bias, labels, segment_ids, cu_seqlens, ignore_index, row_len, logit_scale,
                     softcap, backend, frozen, stats, validate):
    N, D = hidden.shape
    cdt = compute_dtype(hidden.dtype)
    vec = lambda n, dtype=cdt: hidden.new_empty((n,), dtype=dtype)  # noqa: E731
    k = N if stats else 0
    return (vec(N), vec(N), vec(N), vec(k), vec(k), vec(k), vec(k), vec(k, torch.bool),
            hidden.new_empty((N if frozen else 0, D)), vec(N if frozen else 0, torch.bool))


# -- backward -----------------------------------------------------------------------------------------------------
def _active_rows(segments: torch.Tensor, grad: torch.Tensor, entropy_grad: Optional[torch.Tensor]) -> torch.Tensor:
    weight = grad != 0
    if entropy_grad is not None:
        weight = weight | (entropy_grad != 0)
    return torch.nonzero((segments > 0) & weight).squeeze(1)


def _general_backward(hidden, weight, bias, labels, segment_ids, ignore_index, row_max, row_logsum, mean_shift, lp,
                      grad, entropy_grad, logit_scale, softcap, backend, need_dh, need_dw, need_db, *,
                      recompute: bool = False):
    """The backend's chunked backward on the rows with a non-zero upstream weight; gradients of every row.
    ``recompute``: first redo the forward statistics of exactly those rows, so the backward's tiles and the
    statistics come from the same row set (bit-identical logits even at logits of ~1e3)."""
    flat_labels = labels.reshape(-1).long()
    segments = scored_segments(flat_labels, segment_ids, ignore_index)
    rows = _active_rows(segments, grad, entropy_grad)
    row_labels = flat_labels.index_select(0, rows)
    impl = backend_module(backend)
    take = lambda x: None if x is None else x.index_select(0, rows)  # noqa: E731
    options = {"logit_scale": logit_scale, "softcap": softcap}
    with no_autocast(hidden.device):
        if recompute:
            lp_r, stats, *_ = impl.forward(hidden, weight, bias, rows, row_labels, stats=entropy_grad is not None,
                                           **options)
        else:
            lp_r = take(lp)
            stats = RowStats(row_max, row_logsum, mean_shift if mean_shift.numel() else None).select(rows)
        return impl.backward(hidden, weight, bias, rows, row_labels, stats, lp_r, take(grad),
                             entropy_grad=take(entropy_grad), compute_dh=need_dh, compute_dw=need_dw,
                             compute_db=need_db and bias is not None, **options)


@torch.library.custom_op("fastpref::fused_head_backward", mutates_args=())
def fused_head_backward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    segment_ids: Optional[torch.Tensor], ignore_index: int, row_max: torch.Tensor, row_logsum: torch.Tensor,
    mean_shift: torch.Tensor, lp: torch.Tensor, grad: torch.Tensor, entropy_grad: Optional[torch.Tensor],
    logit_scale: float, softcap: Optional[float], backend: str, need_dh: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh [N, D], dw [V, D], db [V])`` of ``sum_t grad_t lp_t + sum_t entropy_grad_t H_t``; an empty tensor
    for each gradient not asked for."""
    dh, dw, db = _general_backward(hidden, weight, bias, labels, segment_ids, ignore_index, row_max, row_logsum,
                                   mean_shift, lp, grad, entropy_grad, logit_scale, softcap, backend, need_dh,
                                   need_dw, need_db)
    return (dh if dh is not None else hidden.new_empty((0,)), dw if dw is not None else weight.new_empty((0,)),
            db if db is not None else weight.new_empty((0,)))


@fused_head_backward.register_fake
def _fused_head_backward_fake(hidden, weight, bias, labels, segment_ids, ignore_index, row_max, row_logsum,
                              mean_shift, lp, grad, entropy_grad, logit_scale, softcap, backend, need_dh, need_dw,
                              need_db):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_dw else weight.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if (need_db and bias is not None) else weight.new_empty((0,)))


def _frozen_backward(unit, flagged, hidden, weight, bias, labels, segment_ids, ignore_index, row_max, row_logsum,
                     mean_shift, lp, grad, entropy_grad, logit_scale, softcap, backend, *, inplace: bool):
    """The hidden states' gradient from the frozen forward's ``unit``: ``g_t s unit_t``, plus the exact backward
    of flagged rows and of an entropy gradient (their rows only, statistics recomputed for them)."""
    dh = unit if inplace else unit.clone()
    dh.mul_((grad * logit_scale)[:, None])  # one rounding into unit's dtype
    redo_lp = grad * flagged  # flagged rows: unit holds 0 there; their lp part is recomputed exactly
    checks = [(redo_lp != 0).any()]
    if entropy_grad is not None:
        checks.append((entropy_grad != 0).any())
    host = host_values(checks, [0.0] * len(checks))
    if any(host):
        ent = entropy_grad if (entropy_grad is not None and host[-1]) else None
        extra, _, _ = _general_backward(hidden, weight, bias, labels, segment_ids, ignore_index, row_max,
                                        row_logsum, mean_shift, lp, redo_lp, ent, logit_scale, softcap, backend,
                                        True, False, False, recompute=True)
        dh += extra
    return dh


@torch.library.custom_op("fastpref::fused_head_frozen_backward", mutates_args=())
def fused_head_frozen_backward(
    unit: torch.Tensor, flagged: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, segment_ids: Optional[torch.Tensor], ignore_index: int, row_max: torch.Tensor,
    row_logsum: torch.Tensor, mean_shift: torch.Tensor, lp: torch.Tensor, grad: torch.Tensor,
    entropy_grad: Optional[torch.Tensor], logit_scale: float, softcap: Optional[float], backend: str,
) -> torch.Tensor:
    """The frozen head's hidden-state gradient as a new tensor (the compiled path; eager scales ``unit`` in place)."""
    return _frozen_backward(unit, flagged, hidden, weight, bias, labels, segment_ids, ignore_index, row_max,
                            row_logsum, mean_shift, lp, grad, entropy_grad, logit_scale, softcap, backend,
                            inplace=False)


@fused_head_frozen_backward.register_fake
def _frozen_backward_fake(unit, flagged, hidden, *args):
    return torch.empty_like(hidden)


# -- autograd -----------------------------------------------------------------------------------------------------
_INPUTS = ("hidden", "weight", "bias", "labels", "segment_ids", "cu_seqlens", "ignore_index", "row_len",
           "logit_scale", "softcap", "backend", "frozen", "stats", "validate")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_INPUTS, inputs))
    lp, row_max, row_logsum, mean_shift, entropy, lsp2, mean_logit, argmax, unit, flagged = output
    ctx.mark_non_differentiable(row_max, row_logsum, mean_shift, lsp2, mean_logit, argmax, unit, flagged)
    ctx.set_materialize_grads(False)
    ctx.options = {k: args[k] for k in ("ignore_index", "logit_scale", "softcap", "backend")}
    ctx.frozen, ctx.stats, ctx.consumed = args["frozen"], args["stats"], False
    saved = [args["hidden"], args["weight"], args["bias"], args["labels"], args["segment_ids"], row_max, row_logsum,
             mean_shift, lp, flagged]
    ctx.unit = None
    if args["frozen"]:
        if torch.compiler.is_compiling():
            saved.append(unit)
        else:  # an alias without the output's grad_fn: no reference cycle, and free to be scaled in place
            ctx.unit = unit.detach()
    ctx.save_for_backward(*saved)


def _not_twice_differentiable(grads: tuple, anchors: tuple) -> tuple:
    """Under ``create_graph=True`` return aliases of ``grads`` whose own backward raises
    :data:`NOT_TWICE_DIFFERENTIABLE`. The aliasing node also takes the ``anchors`` (the upstream gradients and the
    inputs), so any second derivative towards the inputs passes through it and raises, instead of silently
    finding no path (a zero Hessian)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
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


def _backward(ctx, grad_lp, grad_max, grad_logsum, grad_shift, grad_entropy, *unused):
    hidden, weight, bias, labels, segment_ids, row_max, row_logsum, mean_shift, lp, flagged, *rest = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    o = ctx.options
    grad = grad_lp if grad_lp is not None else torch.zeros_like(lp)
    grad = grad.to(lp.dtype)
    ent = None if (grad_entropy is None or not ctx.stats) else grad_entropy.to(lp.dtype)
    common = (hidden, weight, bias, labels, segment_ids, o["ignore_index"], row_max, row_logsum, mean_shift, lp,
              grad, ent, o["logit_scale"], o["softcap"], o["backend"])
    with torch.no_grad():
        if ctx.frozen and torch.compiler.is_compiling():
            dh = torch.ops.fastpref.fused_head_frozen_backward(rest[0], flagged, *common)
            grads = (dh, None, None)
        elif ctx.frozen and ctx.unit is not None and not ctx.consumed:
            unit, ctx.unit, ctx.consumed = ctx.unit, None, True
            with no_autocast(hidden.device):
                grads = (_frozen_backward(unit, flagged, *common, inplace=True), None, None)
        else:
            dh, dw, db = torch.ops.fastpref.fused_head_backward(*common, need_dh, need_dw, need_db and bias is not None)
            grads = (dh if need_dh else None, dw if need_dw else None, db if (need_db and bias is not None) else None)
    grads = _not_twice_differentiable(grads, (grad_lp, grad_entropy, hidden, weight, bias))
    return grads + (None,) * (len(_INPUTS) - 3)


torch.library.register_autograd("fastpref::fused_head", _backward, setup_context=_setup_context)


def reject_transforms(*tensors) -> None:
    """``torch.func`` transforms (vmap, jvp, grad) and forward-mode dual tensors are not supported by the fused
    head: say so instead of returning a missing tangent or failing inside PyTorch."""
    if torch.compiler.is_compiling():
        return
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
