"""sequence_logprobs against a float64 materialized-logits reference, both backends (triton via interpreter)."""

import pytest
import torch

import fastpref
from fastpref.reference import sequence_logprobs_reference
from helpers import TOLERANCES, float64_leaves, leaf, make_batch
from conftest import rel_err

BACKENDS = ["torch", "triton"]


def _check(backend, dtype, *, bias=False, scale=1.0, softcap=None, reduction="sum", seed=0, prompt=True, **shape):
    h, w, y, seg, b = make_batch(dtype=dtype, bias=bias, seed=seed, prompt=prompt, **shape)
    h, w, b = leaf(h), leaf(w), leaf(b)
    out = fastpref.sequence_logprobs(h, w, y, seg, bias=b, logit_scale=scale, softcap=softcap,
                                     reduction=reduction, backend=backend)
    S = y.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    up_r, up_p = torch.randn(S, generator=g), torch.randn(S, generator=g)  # random upstream weights
    (out.response * up_r + out.prompt * up_p).sum().backward()

    h64, w64, b64 = float64_leaves(h, w, b)
    ref = sequence_logprobs_reference(h64, w64, y, seg, bias=b64, logit_scale=scale, softcap=softcap, reduction=reduction)
    (ref["response"] * up_r.double() + ref["prompt"] * up_p.double()).sum().backward()

    tol_val, tol_grad = TOLERANCES[dtype]
    assert out.response.dtype == torch.float32
    for name in ("response", "prompt"):
        torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=tol_val, atol=tol_val)
    assert torch.equal(out.n_response.double(), ref["n_response"])
    assert torch.equal(out.n_prompt.double(), ref["n_prompt"])
    assert rel_err(h.grad, h64.grad) < tol_grad
    assert rel_err(w.grad, w64.grad) < tol_grad
    if bias:
        assert rel_err(b.grad, b64.grad) < tol_grad
    return out, h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_gradients(backend, dtype):
    _check(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,scale,softcap", [(True, 1.0, None), (False, 0.7, None), (True, 1.3, 4.0)])
def test_bias_scale_softcap(backend, dtype, bias, scale, softcap):
    _check(backend, dtype, bias=bias, scale=scale, softcap=softcap, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_reduction(backend):
    _check(backend, torch.float32, reduction="mean", seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_segment_ids_means_every_label_is_response(backend):
    out, _ = _check(backend, torch.float32, prompt=False, seed=7)
    assert torch.all(out.n_prompt == 0) and torch.all(out.prompt == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscored_rows_get_zero_gradient(backend):
    h, w, y, seg, _ = make_batch(seed=11)
    h = leaf(h)
    out = fastpref.sequence_logprobs(h, leaf(w), y, seg, backend=backend)
    out.response.sum().backward()  # prompt unused: its rows must get nothing either
    not_response = ((seg != 2) | (y == -100)).unsqueeze(-1).expand_as(h)
    assert torch.all(h.grad[not_response] == 0)
    assert torch.all(h.grad[~not_response] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_padded_and_packed_agree(backend, reduction):
    h, w, y, seg, _ = make_batch(B=3, T=29, seed=13)
    lengths = [29, 17, 23]  # packed drops each sequence's tail
    parts = [slice(0, n) for n in lengths]
    hp = torch.cat([h[i, s] for i, s in enumerate(parts)])
    yp = torch.cat([y[i, s] for i, s in enumerate(parts)])
    sp = torch.cat([seg[i, s] for i, s in enumerate(parts)])
    cu = torch.tensor([0] + lengths).cumsum(0)
    y_pad, seg_pad = y.clone(), seg.clone()
    for i, n in enumerate(lengths):
        y_pad[i, n:], seg_pad[i, n:] = -100, 0
    hl, wl, hpl, wpl = leaf(h), leaf(w), leaf(hp), leaf(w)
    a = fastpref.sequence_logprobs(hl, wl, y_pad, seg_pad, backend=backend, reduction=reduction)
    b = fastpref.sequence_logprobs(hpl, wpl, yp, sp, cu_seqlens=cu, backend=backend, reduction=reduction)
    for x, z in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, z, rtol=1e-6, atol=1e-6)
    (a.response.sum() + a.prompt.sum()).backward()
    (b.response.sum() + b.prompt.sum()).backward()
    torch.testing.assert_close(wl.grad, wpl.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([hl.grad[i, s] for i, s in enumerate(parts)]), hpl.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_prompt_and_empty_response_sequences(backend):
    h, w, y, seg, _ = make_batch(B=3, T=19, seed=17)
    seg[1] = 1  # all prompt: no response token
    seg[2, :] = 0
    seg[2, 4] = 2  # a single response token
    hl = leaf(h)
    out = fastpref.sequence_logprobs(hl, leaf(w), y, seg, backend=backend, reduction="mean")
    ref = sequence_logprobs_reference(h.double(), w.double(), y, seg, reduction="mean")
    assert out.n_response[1] == 0 and out.response[1] == 0
    assert out.n_response[2] == 1 and out.n_prompt[2] == 0
    torch.testing.assert_close(out.response.double(), ref["response"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.prompt.double(), ref["prompt"], rtol=1e-6, atol=1e-6)
    out.response.sum().backward()
    assert torch.all(hl.grad[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logps(backend):
    h, w, y, seg, _ = make_batch(seed=19)
    hl = leaf(h)
    out = fastpref.sequence_logprobs(hl, leaf(w), y, seg, backend=backend, return_token_logps=True)
    ref = sequence_logprobs_reference(h.double(), w.double(), y, seg)
    assert out.token_logps.shape == y.shape
    torch.testing.assert_close(out.token_logps.double(), ref["token_logps"], rtol=1e-6, atol=1e-6)
    g = torch.randn(y.shape)
    (out.token_logps * g).sum().backward()
    h64 = h.double().requires_grad_()
    (sequence_logprobs_reference(h64, w.double(), y, seg)["token_logps"] * g.double()).sum().backward()
    assert rel_err(hl.grad, h64.grad) < 1e-5
