r"""AuxDPO's null-space penalty ``||A_B delta_B||^2`` (seed ``003``: Gopalan, Ray Chowdhury & Banerjee, 2025;
docs/methods.md section 5), differentiable in the per-sequence offsets ``delta``::

    A_B delta_B = sum_{j in B} delta_j * grad_theta0 log pi_ref(y_j)      (reference-model gradients)

``log pi_ref(y_j)`` is sequence ``j``'s summed response log-prob. Three entry points:

- :func:`head_null_penalty`: ``theta0`` = the reference LM head ``(W, b)``, exactly, from hidden states, with no
  ``N x V`` logits (fused Triton kernels or chunked PyTorch, like :func:`fastpref.sequence_logprobs`).
- :func:`param_null_penalty`: ``theta0`` = a small user-given parameter list (LoRA, last block), by double
  backward through the user's reference log-probs.
- :func:`null_space_basis`: the seed's exact parameterization ``delta = Gamma c`` with ``A Gamma = 0``.

Head penalty: derivation
------------------------
Per response row ``t`` of sequence ``seq(t)``, with ``u = s (W h_t + b)``, ``z_t = c tanh(u / c)`` (softcap ``c``;
``z_t = u`` without), ``p_t = softmax(z_t)``, ``lp_t = z_{t,y_t} - logsumexp(z_t)``::

    r_t      = d lp_t / d(W h_t + b) = s * kappa_t * (onehot(y_t) - p_t),    kappa_t = 1 - (z_t / c)^2  (1 w/o c)
    G        = sum_t delta_seq(t) r_t h_t^T        [V, D]   (= grad_W  sum_j delta_j logp_ref_j)
    g_b      = sum_t delta_seq(t) r_t              [V]      (= grad_b  ..., only when a bias is given)
    penalty  = ||G||_F^2 + ||g_b||^2

``r_t`` with weight ``delta_seq(t)`` is exactly the fused backward's ``dz_t`` (per-row gradient weight
``delta_seq(t)``), so pass 1 is ``backend.backward(..., compute_dh=False)``. ``G`` and ``g_b`` are linear in
``delta``, ``d G / d delta_j = sum_{t in j} r_t h_t^T``, hence::

    d penalty / d delta_j = 2 sum_{t in j} ( <r_t h_t^T, G> + r_t . g_b ) = 2 sum_{t in j} r_t . q_t,
    q_t = G h_t + g_b,
    r_t . q_t = s * ( kappa_{t,y_t} q_{t,y_t} - sum_v p_tv kappa_tv q_tv )

(without softcap and bias: ``2 sum_{t in j} s (G[y_t] . h_t - p_t . (G h_t))``, docs/methods.md's form). Pass 2
(``kernels/head_null_penalty.py``, or :func:`head_null_row_terms_torch`) rebuilds the logits and ``G h_t`` tile
by tile; the log-sum-exps come from the forward pass, so no online max is needed. The bias is a head parameter,
so its part ``||g_b||^2`` is included whenever ``bias`` is given. The sum over a sequence is the sum
reduction (``log pi_ref(y_j)`` = summed token log-probs), as in docs/methods.md.

Cost (units of one ``N x D x V`` matmul, docs/methods.md/DESIGN.md): forward 1 + pass 1 (logits, ``dW``) 2 +
pass 2 (logits, ``G h``) 2 = 5, and ``G`` (``V x D`` fp32) lives only inside the call: the ``[S]`` gradient is
computed eagerly in the forward when ``delta`` requires grad, and only that is saved.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from .._validation import require_finite_number, require_softcap
from ..backends import torch_chunked
from ..backends._chunked import spans
from ..backends.torch_chunked import ROW_CHUNK, VOCAB_CHUNK, compute_dtype, logits
from ..logprobs import RESPONSE, _layout, _resolve_backend

__all__ = ["head_null_penalty", "param_null_penalty", "null_space_basis", "head_null_row_terms_torch"]


# -- autograd ---------------------------------------------------------------------------------------------------
class NullPenaltyFunction(torch.autograd.Function):
    """``penalty`` as a function of ``delta`` with its gradient ``d penalty / d delta`` computed beforehand.

    ``apply(delta, penalty, grad_delta)``: forward returns ``penalty``; backward returns ``grad_out * grad_delta``.
    First order only (``once_differentiable``): both penalties are quadratic in ``delta``, and no caller needs
    their Hessian ``2 A^T A``.
    """

    @staticmethod
    def forward(ctx, delta, penalty, grad_delta):
        ctx.save_for_backward(grad_delta)
        ctx.delta_dtype = delta.dtype
        return penalty.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad_delta,) = ctx.saved_tensors
        return (grad_out.to(grad_delta.dtype) * grad_delta).to(ctx.delta_dtype), None, None


def _attach(delta: torch.Tensor, penalty: torch.Tensor, grad_delta: Optional[torch.Tensor]) -> torch.Tensor:
    if grad_delta is None:
        return penalty.detach()
    return NullPenaltyFunction.apply(delta, penalty, grad_delta)


# -- pass 2 in chunked PyTorch ----------------------------------------------------------------------------------
def head_null_row_terms_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    lp: torch.Tensor,
    g_weight: torch.Tensor,
    g_bias: Optional[torch.Tensor],
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """``u_t = r_t . (G h_t + g_b)`` for the rows ``hidden[rows]`` (module docstring), chunked like
    ``fastpref.backends.torch_chunked``; the same function as ``fastpref.kernels.head_null_penalty``.

    ``row_max``, ``row_logsum``, ``lp``: the forward's row statistics and token log-probs (``p`` is rebuilt as
    ``exp((z - max) - log sum)``, and ``1 - p`` at the label as ``-expm1(lp)``). fp32 arithmetic (float64 for
    float64 inputs); extra memory ``O(M D + row_chunk * vocab_chunk)``.
    """
    cdt = compute_dtype(hidden.dtype)
    M, V = rows.numel(), weight.shape[0]
    h_all = hidden.index_select(0, rows).to(cdt)
    row_max, row_logsum, one_minus_py = row_max.to(cdt), row_logsum.to(cdt), -torch.expm1(lp.to(cdt))
    labels = labels.long()
    u = torch.zeros(M, dtype=cdt, device=hidden.device)
    for v0, v1 in spans(V, vocab_chunk):
        w = weight[v0:v1].to(cdt)
        b = bias[v0:v1].to(cdt) if bias is not None else None
        g = g_weight[v0:v1].to(cdt)
        gb = g_bias[v0:v1].to(cdt) if g_bias is not None else None
        for r0, r1 in spans(M, row_chunk):
            h = h_all[r0:r1]
            z = logits(h, w, b, logit_scale, softcap)
            q = h @ g.t()
            if gb is not None:
                q += gb
            r = -torch.exp((z - row_max[r0:r1, None]) - row_logsum[r0:r1, None])
            y = labels[r0:r1]
            col = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
            inside = ((y >= v0) & (y < v1))[:, None]
            r.scatter_(1, col, torch.where(inside, one_minus_py[r0:r1, None], r.gather(1, col)))
            if softcap is not None:
                r *= 1.0 - (z / softcap) ** 2
            u[r0:r1] += (r * q).sum(1)
    return u * logit_scale


def _row_terms(impl):
    if impl is torch_chunked:
        return head_null_row_terms_torch
    from fastpref.kernels.head_null_penalty import head_null_row_terms

    return head_null_row_terms


# -- head penalty -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _argument_names(fn: str):
    """Errors from the shared head validation name ``hidden`` / ``weight``: rename them to this API's arguments."""
    try:
        yield
    except (TypeError, ValueError) as e:
        msg = str(e).replace("`hidden`", "`ref_hidden`").replace("`weight`", "`ref_weight`")
        raise type(e)(f"{fn}: {msg}") from e


def _check_delta(fn: str, delta, num_sequences: Optional[int] = None, device: Optional[torch.device] = None,
                 *, values: bool = True):
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"{fn}: `delta` must be a torch.Tensor, got {type(delta).__name__}")
    if not delta.is_floating_point():
        raise TypeError(f"{fn}: `delta` must have a floating dtype, got {delta.dtype}")
    if delta.dim() != 1:
        raise ValueError(f"{fn}: `delta` must be 1-D [S] (one offset per sequence), got shape {tuple(delta.shape)}")
    if num_sequences is not None and delta.numel() != num_sequences:
        raise ValueError(f"{fn}: `delta` has {delta.numel()} entries but the batch holds {num_sequences} sequences")
    if device is not None and delta.device != device:
        raise ValueError(f"{fn}: `delta` is on {delta.device} but `ref_hidden` is on {device}")
    if values and not bool(torch.isfinite(delta).all()):
        raise ValueError(f"{fn}: `delta` holds non-finite values (nan or inf)")


def head_null_penalty(
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""AuxDPO's null-space penalty restricted to the reference LM head, exactly (module docstring)::

        penalty = || sum_t delta_seq(t) r_t h_t^T ||_F^2  +  || sum_t delta_seq(t) r_t ||^2   (bias part iff bias)
        d penalty / d delta_j = 2 sum_{t in j} r_t . (G h_t + g_b)

    Args:
        ref_hidden: the reference model's last hidden states, padded ``[B, T, D]`` or packed ``[N, D]`` with
            ``cu_seqlens`` (same layouts and dtypes as :func:`fastpref.sequence_logprobs`).
        ref_weight: the reference head ``[V, D]``; ``bias``: its optional bias ``[V]``.
        labels, segment_ids, ignore_index, logit_scale, softcap, cu_seqlens, backend: as in
            :func:`fastpref.sequence_logprobs`. Only response rows count (segment 2, or every row whose label
            is not ``ignore_index`` when ``segment_ids`` is None); prompt rows are ignored.
        delta: ``[S]`` floating offsets, one per sequence (the batch's entries of AuxDPO's ``delta``).

    Returns:
        A scalar (fp32; float64 for float64 heads), differentiable w.r.t. ``delta`` only (first order).
        ``ref_hidden``, ``ref_weight`` and ``bias`` are constants: no gradient flows to them.

    Raises:
        TypeError / ValueError naming the argument, before any kernel runs.
    """
    fn = "head_null_penalty"
    _check_delta(fn, delta, values=False)  # type, dtype, dims; length, device and values once S is known
    with _argument_names(fn):
        logit_scale = require_finite_number("logit_scale", logit_scale, positive=True)
        softcap = require_softcap(softcap)
        detach = lambda x: None if x is None else x.detach()  # noqa: E731
        hidden, weight, bias = detach(ref_hidden), detach(ref_weight), detach(bias)
        hidden2d, flat_labels, segments, sequence, S = _layout(
            hidden, weight, labels, segment_ids, bias, ignore_index, cu_seqlens, True, logit_scale=logit_scale)
        impl = _resolve_backend(backend, hidden)
    _check_delta(fn, delta, S, hidden.device)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    need_grad = torch.is_grad_enabled() and delta.requires_grad

    cdt = compute_dtype(hidden.dtype)
    rows = torch.nonzero(segments == RESPONSE).squeeze(1)
    row_labels = flat_labels.index_select(0, rows)
    row_seq = sequence.index_select(0, rows)
    row_weight = delta.detach().to(cdt).index_select(0, row_seq)
    active = row_weight != 0
    if not bool(active.any()):  # delta vanishes on every scored row: G = 0, penalty and gradient are 0
        zero = torch.zeros((), dtype=cdt, device=hidden.device)
        return _attach(delta, zero, torch.zeros(S, dtype=cdt, device=hidden.device) if need_grad else None)

    options = {"logit_scale": logit_scale, "softcap": softcap}
    all_active = bool(active.all())
    if all_active or need_grad:
        lp, stats = impl.forward(hidden2d, weight, bias, rows, row_labels, **options)
        lp_a, stats_a = (lp, stats) if all_active else (lp[active], stats.select(active))
    else:  # pass 1 needs only the rows with a non-zero weight
        lp_a, stats_a = impl.forward(hidden2d, weight, bias, rows[active], row_labels[active], **options)
    sel = (lambda x: x) if all_active else (lambda x: x[active])  # noqa: E731
    _, g_weight, g_bias = impl.backward(
        hidden2d, weight, bias, sel(rows), sel(row_labels), stats_a, lp_a, sel(row_weight),
        compute_dh=False, compute_dw=True, compute_db=bias is not None, dw_dtype=cdt, **options)
    penalty = g_weight.to(cdt).square().sum()
    if g_bias is not None:
        penalty = penalty + g_bias.to(cdt).square().sum()

    grad_delta = None
    if need_grad:
        u = _row_terms(impl)(hidden2d, weight, bias, rows, row_labels, stats.max, stats.logsum, lp, g_weight, g_bias,
                             **options)
        grad_delta = 2.0 * torch.zeros(S, dtype=cdt, device=hidden.device).index_add(0, row_seq, u.to(cdt))
    return _attach(delta, penalty, grad_delta)


# -- small parameter sets through autograd ----------------------------------------------------------------------
def _check_params(fn: str, params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"{fn}: `params` must be a sequence of tensors, got {type(params).__name__}") from None
    if not params:
        raise ValueError(f"{fn}: `params` is empty")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"{fn}: `params[{i}]` must be a floating torch.Tensor, got "
                            f"{p.dtype if isinstance(p, torch.Tensor) else type(p).__name__}")
        if not p.requires_grad and not p.is_leaf:
            raise ValueError(f"{fn}: `params[{i}]` is a non-leaf tensor that does not require grad")
    return params


@contextlib.contextmanager
def _requiring_grad(params: list[torch.Tensor]):
    """Frozen (reference) leaves are switched to ``requires_grad=True`` for the call and restored after it."""
    switched = [p for p in params if not p.requires_grad]
    for p in switched:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in switched:
            p.requires_grad_(False)


def _reference_logps(fn: str, ref_logps_fn: Callable[[], torch.Tensor], num_sequences: int, against: str):
    logps = ref_logps_fn()
    if not isinstance(logps, torch.Tensor) or not logps.is_floating_point():
        raise TypeError(f"{fn}: `ref_logps_fn()` must return a floating torch.Tensor [S], got "
                        f"{logps.dtype if isinstance(logps, torch.Tensor) else type(logps).__name__}")
    if logps.dim() != 1 or logps.numel() != num_sequences:
        raise ValueError(f"{fn}: `ref_logps_fn()` returned shape {tuple(logps.shape)} but {against} says "
                         f"S={num_sequences}: expected [{num_sequences}]")
    if not logps.requires_grad:
        raise ValueError(f"{fn}: `ref_logps_fn()` does not depend on `params` (no graph): call it with grad "
                         "enabled, not under torch.no_grad()")
    return logps


def _flat_grads(grads, params, dtype) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for g, p in zip(grads, params)])


def param_null_penalty(
    ref_logps_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    delta: torch.Tensor,
) -> torch.Tensor:
    r"""AuxDPO's penalty for a small parameter list, through autograd (seed 003's form)::

        A_B delta_B = grad_params( sum_j delta_j * ref_logp_j )      (create_graph=True)
        penalty     = sum_{p in params} || (A_B delta_B)_p ||^2

    Args:
        ref_logps_fn: a callable (no arguments) returning the reference log-probs ``[S]`` of the batch's
            sequences as a function of ``params``. It is called once, with grad enabled. It must be
            **double-differentiable** (the gradient in ``delta`` is a double backward): materialized logits
            (``fastpref.reference.sequence_logprobs_reference``, ``log_softmax``) work; fastpref's fused
            ``sequence_logprobs`` with the triton backend does not (its backward is not differentiable) and is
            reported as an error.
        params: the reference parameters ``theta0`` (LoRA weights, the last block, the head). Frozen leaves
            are switched to ``requires_grad`` for the call only; no gradient ever reaches them (the penalty's
            gradient w.r.t. ``delta`` is computed inside the call by ``torch.autograd.grad``).
        delta: ``[S]`` floating offsets.

    Returns:
        A scalar (fp32, or float64 when the log-probs are float64), differentiable w.r.t. ``delta`` (first order).
    """
    fn = "param_null_penalty"
    params = _check_params(fn, params)
    _check_delta(fn, delta)
    need_grad = torch.is_grad_enabled() and delta.requires_grad
    with torch.enable_grad(), _requiring_grad(params):
        logps = _reference_logps(fn, ref_logps_fn, delta.numel(), "`delta`")
        cdt = torch.promote_types(logps.dtype, torch.float32)
        d = delta.detach().to(device=logps.device, dtype=logps.dtype).requires_grad_(need_grad)
        grads = torch.autograd.grad((d * logps).sum(), params, create_graph=need_grad, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(f"{fn}: `ref_logps_fn()` does not depend on any of `params`")
        penalty = sum(g.to(cdt).square().sum() for g in grads if g is not None)
        grad_delta = None
        if need_grad:
            if not penalty.requires_grad:
                raise RuntimeError(f"{fn}: the gradient of `ref_logps_fn()` is not differentiable in `delta`; "
                                   "compute the reference log-probs with double-differentiable ops "
                                   "(materialized logits), not through a fused autograd Function")
            (grad_delta,) = torch.autograd.grad(penalty, d)
            grad_delta = grad_delta.to(device=delta.device)
    return _attach(delta, penalty.detach().to(delta.device), grad_delta)


def null_space_basis(
    ref_logps_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    num_sequences: int,
    *,
    rtol: float = 1e-6,
) -> torch.Tensor:
    r"""Orthonormal basis ``Gamma [S, k]`` of the null space of ``A = [grad_params ref_logp_1, ..., ref_logp_S]``.

    ``A`` (``P x S``, ``P`` = number of parameters in ``params``) is built column by column with S backward
    passes through ``ref_logps_fn()`` (single backward: fastpref's fused log-probs work here), in float64.
    Then ``A = Q R`` and ``R = U Sigma V^T`` (full ``V``, ``S x S``); the columns of ``V`` whose singular
    value is ``<= rtol * sigma_max`` (and those beyond ``rank <= min(P, S)``) span ``N(A)``. With
    ``delta = Gamma c`` the seed's null-space constraint ``A delta = 0`` holds exactly (to ``rtol``), so
    AuxDPO's penalty vanishes and ``c`` is the trainable parameter.

    Cost: S backward passes and ``8 P S`` bytes for ``A``: for small parameter sets (LoRA, last block, head).
    Returns ``Gamma`` in the log-probs' dtype (at least fp32) on their device; ``k = 0`` columns when ``A``
    has full column rank.
    """
    fn = "null_space_basis"
    params = _check_params(fn, params)
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"{fn}: `num_sequences` must be a positive int, got {num_sequences!r}")
    rtol = require_finite_number("rtol", rtol)
    if rtol < 0:
        raise ValueError(f"{fn}: `rtol` must be >= 0, got {rtol}")
    with torch.enable_grad(), _requiring_grad(params):
        logps = _reference_logps(fn, ref_logps_fn, num_sequences, "`num_sequences`")
        columns = []
        for j in range(num_sequences):
            grads = torch.autograd.grad(logps[j], params, retain_graph=j < num_sequences - 1, allow_unused=True)
            columns.append(_flat_grads(grads, params, torch.float64))
    A = torch.stack(columns, dim=1)  # [P, S]
    R = torch.linalg.qr(A, mode="r").R  # [min(P, S), S]
    _, sv, vh = torch.linalg.svd(R, full_matrices=True)
    top = float(sv.max()) if sv.numel() else 0.0
    rank = int((sv > rtol * top).sum()) if top > 0 else 0
    gamma = vh[rank:].transpose(0, 1).contiguous()
    return gamma.to(torch.promote_types(logps.dtype, torch.float32))
