"""Property tests over shapes, segment layouts, bias/scale/softcap, for both backends."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpref
from fastpref.reference import sequence_logprobs_reference
from conftest import rel_err


@st.composite
def problems(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 23))
    D = draw(st.integers(1, 40))
    V = draw(st.integers(2, 97))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 3, (B, T), generator=g)
    seg[:, draw(st.integers(0, T - 1))] = draw(st.sampled_from([1, 2]))  # every sequence scores a token
    labels = torch.randint(0, V, (B, T), generator=g)
    labels = torch.where((torch.rand(B, T, generator=g) < 0.1) & (seg == 0), -100, labels)
    return dict(
        hidden=torch.randn(B, T, D, generator=g),
        weight=torch.randn(V, D, generator=g) * 0.5,
        labels=labels,
        segment_ids=seg,
        bias=torch.randn(V, generator=g) if draw(st.booleans()) else None,
        logit_scale=draw(st.sampled_from([1.0, 0.5, 2.0])),
        softcap=draw(st.sampled_from([None, 3.0])),
        reduction=draw(st.sampled_from(["sum", "mean"])),
        upstream=torch.randn(2, B, generator=g),
    )


def _check(p, backend):
    up = p.pop("upstream")
    h, w = p.pop("hidden").requires_grad_(), p.pop("weight").requires_grad_()
    out = fastpref.sequence_logprobs(h, w, backend=backend, **p)
    (out.response * up[0] + out.prompt * up[1]).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bias = p.pop("bias")
    ref = sequence_logprobs_reference(h64, w64, bias=None if bias is None else bias.double(), **p)
    (ref["response"] * up[0].double() + ref["prompt"] * up[1].double()).sum().backward()
    torch.testing.assert_close(out.response.double(), ref["response"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prompt.double(), ref["prompt"], rtol=1e-5, atol=1e-5)
    if w64.grad.norm() > 0:
        assert rel_err(w.grad, w64.grad) < 1e-4
        assert rel_err(h.grad, h64.grad) < 1e-4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_torch_backend_matches_reference(p):
    _check(p, "torch")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_triton_backend_matches_reference(p):
    _check(p, "triton")
