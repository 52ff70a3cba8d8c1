"""AuxDPO's null-space penalty (docs/methods.md section 5): the fused head form against a float64 autograd reference,
the autograd form for parameter lists, the exact null-space basis, and bad input.

Tolerances (relative): fp32 1e-5 for the penalty and ``||g - g_ref|| / ||g_ref||`` of ``d/d delta``; bf16 1e-2
(fp16 too) for the gradient and 1.5e-2 for the bf16 penalty value. Under Triton's interpreter the fused backward's
``dz.to(bf16)`` truncates instead of rounding to nearest (seen with triton 3.9), so ``G`` comes out biased
low by ~2^-9 per element and ``||G||^2`` by 0.4-0.8% on these shapes; on the GPU the cast rounds to nearest.
"""

import pytest
import torch

import fastpref
from fastpref.backends import torch_chunked
from fastpref.losses import auxdpo_penalty as ap
from fastpref.losses.auxdpo_penalty import head_null_penalty, null_space_basis, param_null_penalty
from fastpref.reference import sequence_logprobs_reference
from conftest import rel_err
from helpers import make_batch

SHAPE = dict(B=4, T=13, D=24, V=71)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.5e-2, 1e-2), torch.float16: (1e-2, 1e-2)}  # (penalty, grad)
HEADS = {  # name: (bias, logit_scale, softcap)
    "plain": (False, 1.0, None),
    "bias": (True, 1.0, None),
    "bias_scale_softcap": (True, 0.7, 4.0),
}


def _delta(S, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(S, generator=g).to(dtype)


def reference_penalty(h, w, y, seg, delta, *, bias=None, logit_scale=1.0, softcap=None, cu_seqlens=None):
    """float64, materialized logits: G = grad_(W, b) sum_j delta_j logp_j (create_graph), ||G||^2, autograd."""
    w64 = w.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    d64 = delta.detach().double().requires_grad_()
    lp = sequence_logprobs_reference(h.detach().double(), w64, y, seg, bias=b64, logit_scale=logit_scale,
                                     softcap=softcap, cu_seqlens=cu_seqlens)["response"]
    params = [w64] if b64 is None else [w64, b64]
    grads = torch.autograd.grad((d64 * lp).sum(), params, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    (grad_delta,) = torch.autograd.grad(penalty, d64)
    return penalty.detach(), grad_delta


def _fused(h, w, y, seg, delta, backend, **kw):
    d = delta.detach().clone().requires_grad_()
    p = head_null_penalty(h, w, y, d, seg, backend=backend, **kw)
    p.backward()
    return p.detach(), d.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_penalty_matches_float64_autograd(dtype, head, backend):
    has_bias, scale, cap = HEADS[head]
    h, w, y, seg, b = make_batch(**SHAPE, dtype=dtype, seed=3, bias=has_bias)
    delta = _delta(SHAPE["B"], 3)
    kw = dict(bias=b, logit_scale=scale, softcap=cap)
    pen, grad = _fused(h, w, y, seg, delta, backend, **kw)
    ref_pen, ref_grad = reference_penalty(h, w, y, seg, delta, **kw)
    tol_p, tol_g = TOL[dtype]
    assert pen.dtype == torch.float32 and pen.dim() == 0
    assert rel_err(pen, ref_pen) < tol_p
    assert grad.dtype == delta.dtype
    assert rel_err(grad, ref_grad) < tol_g


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_offsets_keep_their_gradient(backend):
    """Rows whose delta is 0 add nothing to G but their sequence's derivative is not 0; all-zero delta gives 0."""
    h, w, y, seg, b = make_batch(**SHAPE, seed=5, bias=True)
    delta = _delta(SHAPE["B"], 5)
    delta[1] = 0.0
    pen, grad = _fused(h, w, y, seg, delta, backend, bias=b, softcap=6.0)
    ref_pen, ref_grad = reference_penalty(h, w, y, seg, delta, bias=b, softcap=6.0)
    assert rel_err(pen, ref_pen) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    assert grad[1].abs() > 0
    pen0, grad0 = _fused(h, w, y, seg, torch.zeros(SHAPE["B"]), backend, bias=b)
    assert pen0 == 0 and torch.all(grad0 == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_layout_matches_reference(backend):
    B, T = SHAPE["B"], SHAPE["T"]
    h, w, y, seg, _ = make_batch(**SHAPE, seed=7)
    lengths = torch.tensor([13, 9, 11, 6])
    keep = torch.arange(T)[None, :] < lengths[:, None]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    hp, yp, sp = h[keep], y[keep], seg[keep]
    delta = _delta(B, 7)
    pen, grad = _fused(hp, w, yp, sp, delta, backend, cu_seqlens=cu, logit_scale=1.3)
    ref_pen, ref_grad = reference_penalty(hp, w, yp, sp, delta, cu_seqlens=cu, logit_scale=1.3)
    assert rel_err(pen, ref_pen) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_prompt_rows_do_not_count():
    h, w, y, seg, _ = make_batch(**SHAPE, seed=9)
    delta = _delta(SHAPE["B"], 9)
    with_prompt = head_null_penalty(h, w, y, delta, seg, backend="torch")
    no_prompt = head_null_penalty(h, w, y, delta, torch.where(seg == 1, 0, seg), backend="torch")
    torch.testing.assert_close(with_prompt, no_prompt, rtol=1e-6, atol=0)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_row_terms_kernel_matches_torch_across_splits(splits):
    from fastpref.kernels.head_null_penalty import head_null_row_terms

    g = torch.Generator().manual_seed(splits)
    M, D, V = 41, 24, 150
    hidden = torch.randn(M + 9, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.4
    bias = torch.randn(V, generator=g)
    rows = torch.randperm(M + 9, generator=g)[:M].sort().values
    labels = torch.randint(0, V, (M,), generator=g)
    g_weight, g_bias = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    kw = dict(logit_scale=0.8, softcap=5.0)
    lp, stats = torch_chunked.forward(hidden, weight, bias, rows, labels, **kw)
    u = head_null_row_terms(hidden, weight, bias, rows, labels, stats.max, stats.logsum, lp, g_weight, g_bias,
                            num_splits=splits, **kw)
    u_ref = ap.head_null_row_terms_torch(hidden, weight, bias, rows, labels, stats.max, stats.logsum, lp, g_weight,
                                         g_bias, row_chunk=7, vocab_chunk=33, **kw)
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-5)


def test_constants_get_no_gradient_and_no_grad_skips_pass_two(monkeypatch):
    h, w, y, seg, b = make_batch(**SHAPE, seed=11, bias=True)
    hl, wl, bl = (x.clone().requires_grad_() for x in (h, w, b))
    d = _delta(SHAPE["B"], 11).requires_grad_()
    head_null_penalty(hl, wl, y, d, seg, bias=bl, backend="torch").backward()
    assert d.grad is not None and hl.grad is None and wl.grad is None and bl.grad is None

    def boom(impl):
        raise AssertionError("pass 2 ran although no gradient is needed")

    monkeypatch.setattr(ap, "_row_terms", boom)
    p = head_null_penalty(h, w, y, d.detach(), seg, bias=b, backend="torch")
    with torch.no_grad():
        q = head_null_penalty(h, w, y, d, seg, bias=b, backend="torch")
    assert not p.requires_grad and not q.requires_grad and torch.equal(p, q)


# -- parameter lists through autograd ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)])
def test_param_penalty_equals_head_penalty(backend, dtype, tol):
    h, w, y, seg, b = make_batch(**SHAPE, seed=13, bias=True, dtype=dtype)
    kw = dict(logit_scale=0.9, softcap=5.0)
    delta = _delta(SHAPE["B"], 13, dtype)
    pen, grad = _fused(h, w, y, seg, delta, backend, bias=b, **kw)

    w64, b64 = w.double(), b.double()  # frozen leaves: switched on for the call and restored
    fn = lambda: sequence_logprobs_reference(h.double(), w64, y, seg, bias=b64, **kw)["response"]  # noqa: E731
    d = delta.clone().requires_grad_()
    pen2 = param_null_penalty(fn, [w64, b64], d)
    pen2.backward()
    assert rel_err(pen, pen2) < tol and rel_err(grad, d.grad) < tol
    assert not w64.requires_grad and w64.grad is None and b64.grad is None


def test_param_penalty_rejects_fused_logprobs():
    """The triton backend's backward is not differentiable, so the double backward cannot see delta."""
    h, w, y, seg, _ = make_batch(B=2, T=9, D=16, V=41, seed=15)
    w = w.clone()
    fn = lambda: fastpref.sequence_logprobs(h, w, y, seg, backend="triton").response  # noqa: E731
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        param_null_penalty(fn, [w], torch.randn(2, requires_grad=True))


def _lora_problem(S=24, T=5, D=6, V=9, seed=17):
    """A frozen head plus a rank-1 LoRA pair (P = D + V = 15 parameters < S): a real null space."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    lora_a = torch.randn(1, D, generator=g, dtype=torch.float64) * 0.3
    lora_b = torch.randn(V, 1, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (S, T), generator=g)

    def logps_of(a, b):
        return sequence_logprobs_reference(h, w + b @ a, y)["response"]

    return logps_of, [lora_a, lora_b]


def test_null_space_basis_is_an_orthonormal_basis_of_the_null_space():
    S = 24
    logps_of, params = _lora_problem(S=S)
    ref_logps = lambda: logps_of(*params)  # noqa: E731
    gamma = null_space_basis(ref_logps, params, S)
    assert all(not p.requires_grad and p.grad is None for p in params)

    jac = torch.autograd.functional.jacobian(logps_of, tuple(params))  # an independent route to A
    A = torch.cat([j.reshape(S, -1) for j in jac], dim=1).t()  # [P, S]
    k = S - int(torch.linalg.matrix_rank(A))
    assert gamma.dtype == torch.float64 and gamma.shape == (S, k) and k >= S - 15
    torch.testing.assert_close(gamma.t() @ gamma, torch.eye(k, dtype=gamma.dtype), atol=1e-12, rtol=0)
    assert (A @ gamma).abs().max() < 1e-12 * A.abs().max()

    c = torch.randn(k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    on = param_null_penalty(ref_logps, params, gamma @ c)
    off = param_null_penalty(ref_logps, params, torch.randn(S, dtype=torch.float64))
    assert off > 0 and on < 1e-20 * off


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.fixture
def no_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran on bad input")

    for mod in ("fastpref.backends.torch_chunked", "fastpref.backends.triton_fused"):
        monkeypatch.setattr(f"{mod}.forward", boom)
        monkeypatch.setattr(f"{mod}.backward", boom)


@pytest.mark.parametrize("bad,exc", [
    (torch.randn(3), ValueError),                         # wrong length (S = 4)
    (torch.randn(4, 1), ValueError),                      # not 1-D
    (torch.arange(4), TypeError),                         # integer dtype
    (torch.tensor([0.1, float("nan"), 0.2, 0.3]), ValueError),
    (torch.tensor([0.1, float("inf"), 0.2, 0.3]), ValueError),
    ([0.1, 0.2, 0.3, 0.4], TypeError),                    # not a tensor
])
def test_bad_delta_raises_before_any_kernel(no_kernel, bad, exc):
    h, w, y, seg, _ = make_batch(**SHAPE, seed=19)
    with pytest.raises(exc, match="`delta`"):
        head_null_penalty(h, w, y, bad, seg)


def test_bad_head_arguments_are_named(no_kernel):
    h, w, y, seg, _ = make_batch(**SHAPE, seed=19)
    d = torch.randn(4)
    with pytest.raises(TypeError, match="`ref_weight`"):
        head_null_penalty(h, w.double(), y, d, seg)
    with pytest.raises(ValueError, match="`ref_hidden`"):
        head_null_penalty(h[0, 0], w, y, d, seg)
    with pytest.raises(ValueError, match="`labels`"):
        head_null_penalty(h, w, y.clamp(max=SHAPE["V"]) + 1, d, seg)
    with pytest.raises(ValueError, match="`softcap`"):
        head_null_penalty(h, w, y, d, seg, softcap=-1.0)
    with pytest.raises(ValueError, match="`backend`"):
        head_null_penalty(h, w, y, d, seg, backend="cuda")


def test_param_functions_bad_input():
    logps_of, params = _lora_problem(S=6)
    fn = lambda: logps_of(*params)  # noqa: E731
    with pytest.raises(ValueError, match="`delta`"):
        param_null_penalty(fn, params, torch.randn(5))
    with pytest.raises(TypeError, match="`delta`"):
        param_null_penalty(fn, params, torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="`delta`"):
        param_null_penalty(fn, params, torch.full((6,), float("nan")))
    with pytest.raises(TypeError, match="`params"):
        param_null_penalty(fn, [params[0], "x"], torch.randn(6))
    with pytest.raises(ValueError, match="no graph"):
        param_null_penalty(lambda: fn().detach(), params, torch.randn(6))
    with pytest.raises(ValueError, match="`num_sequences`"):
        null_space_basis(fn, params, 0)
    with pytest.raises(ValueError, match="`num_sequences`"):
        null_space_basis(fn, params, 7)
    assert all(not p.requires_grad for p in params)
