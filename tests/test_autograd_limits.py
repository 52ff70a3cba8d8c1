"""What the fused head's autograd does outside plain first-order reverse mode (issue 9, items 6 and 8).

- Double backward (``create_graph=True``, ``gradgradcheck``): a clear "not twice differentiable" error on both
  backends, never a silently wrong Hessian-vector product (the torch backend's was 0.36 off before).
- ``torch.func`` transforms (``jvp``, ``vmap``) and forward-mode dual tensors: a clear error, never a ``None``
  tangent.
- Under ``torch.autocast`` the head computes in its own dtype's precision (autocast used to run the torch
  backend's matmuls in bf16 for fp32 inputs: 3.4e-4 forward error).
"""

import pytest
import torch

import fastpref
from helpers import leaf, make_batch


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_raises_a_clear_error(backend):
    h, w, y, seg, _ = make_batch(B=2, T=7, D=8, V=13, seed=1)
    hl, wl = leaf(h), leaf(w)
    out = fastpref.sequence_logprobs(hl, wl, y, seg, backend=backend)
    (gh,) = torch.autograd.grad(out.response.sum(), hl, create_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        gh.pow(2).sum().backward()


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # gradcheck on fp32 inputs (triton): we expect a refusal
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradgradcheck_refuses_instead_of_answering_wrongly(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    h, w, y, seg, _ = make_batch(B=2, T=5, D=4, V=7, seed=2, dtype=dtype)

    def f(h):
        return fastpref.sequence_logprobs(h, w, y, seg, backend=backend).response

    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.gradgradcheck(f, (leaf(h),), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_create_graph_without_differentiating_the_head_still_works():
    """A gradient penalty elsewhere (create_graph=True) is fine as long as nobody differentiates the head's part."""
    h, w, y, seg, _ = make_batch(B=2, T=7, D=8, V=13, seed=3)
    hl, wl = leaf(h), leaf(w)
    x = leaf(torch.randn(3))
    loss = fastpref.sequence_logprobs(hl, wl, y, seg).response.sum() + (x ** 3).sum()
    gx, gh = torch.autograd.grad(loss, (x, hl), create_graph=True)
    gx.sum().backward()  # d/dx of 3x^2: does not go through the head
    torch.testing.assert_close(x.grad, 6 * x.detach())


# torch's forward-AD decompositions call torch.jit.script when first loaded (torch's own deprecation, not ours)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_jvp_and_vmap_raise_clear_errors(backend):
    h, w, y, seg, _ = make_batch(B=2, T=7, D=8, V=13, seed=4)

    def f(h):
        return fastpref.sequence_logprobs(h, w, y, seg, backend=backend).response

    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.jvp(f, (h,), (torch.ones_like(h),))
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(f)(h[None].expand(2, -1, -1, -1))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(h, torch.ones_like(h))
        with pytest.raises(RuntimeError, match="forward-mode"):
            f(dual)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("frozen", [False, True])
def test_autocast_does_not_lower_the_heads_precision(backend, frozen):
    h, w, y, seg, _ = make_batch(seed=5)
    grads = []
    for autocast in (False, True):
        hl, wl = leaf(h), leaf(w, not frozen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fastpref.sequence_logprobs(hl, wl, y, seg, backend=backend)
            out.response.sum().backward()
        assert out.response.dtype == torch.float32
        grads.append((out.response.detach(), hl.grad, None if frozen else wl.grad))
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
