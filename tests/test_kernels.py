"""The backends' forward/backward functions directly: vocabulary splits, chunking, skipped work."""

import pytest
import torch

import fastpref
from fastpref.backends import torch_chunked, triton_fused
from fastpref.kernels.config import output_buffer
from fastpref.reference import token_logprobs_reference
from helpers import leaf, make_batch


def _rows_problem(seed=0, M=53, D=48, V=301, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M + 20, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.35).to(dtype)
    rows = torch.randperm(M + 20, generator=g)[:M].sort().values
    labels = torch.randint(0, V, (M,), generator=g)
    return hidden, weight, rows, labels


def test_poisoned_buffers_are_nan():
    assert torch.isnan(output_buffer((3, 2), torch.float32, torch.device("cpu"))).all()


@pytest.mark.parametrize("splits", [1, 2, 3, 10])
def test_forward_vocabulary_split_merge(splits):
    hidden, weight, rows, labels = _rows_problem(seed=splits)
    lp, lse = triton_fused.forward(hidden, weight, None, rows, labels, num_splits=splits)
    ref = token_logprobs_reference(hidden[rows].double(), weight.double(), labels)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(hidden[rows].double() @ weight.double().t(), -1),
                               rtol=1e-6, atol=1e-5)


def test_torch_backend_small_chunks_match_one_chunk():
    hidden, weight, rows, labels = _rows_problem(seed=4)
    bias = torch.randn(weight.shape[0])
    kw = dict(logit_scale=0.9, softcap=3.0)
    lp1, lse1 = torch_chunked.forward(hidden, weight, bias, rows, labels, row_chunk=5, vocab_chunk=37, **kw)
    lp2, lse2 = torch_chunked.forward(hidden, weight, bias, rows, labels, row_chunk=10_000, vocab_chunk=10_000, **kw)
    torch.testing.assert_close(lp1, lp2, rtol=1e-6, atol=1e-6)
    grad = torch.randn(rows.numel())
    a = torch_chunked.backward(hidden, weight, bias, rows, labels, lse1, grad, row_chunk=5, vocab_chunk=37, **kw)
    b = torch_chunked.backward(hidden, weight, bias, rows, labels, lse2, grad, row_chunk=10_000, vocab_chunk=10_000, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [torch_chunked, triton_fused])
def test_backends_agree_on_backward(backend):
    hidden, weight, rows, labels = _rows_problem(seed=9)
    bias = torch.randn(weight.shape[0])
    lp, lse = backend.forward(hidden, weight, bias, rows, labels, softcap=6.0)
    grad = torch.randn(rows.numel())
    dh, dw, db = backend.backward(hidden, weight, bias, rows, labels, lse, grad, softcap=6.0)
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden[rows], weight, bias))
    (token_logprobs_reference(h64, w64, labels, b64, softcap=6.0) * grad.double()).sum().backward()
    for x, ref in ((dh, h64.grad), (dw, w64.grad), (db, b64.grad)):
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-6)


class _Spy:
    """Wraps a backend module and records what the autograd function asks of it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def forward(self, *args, **kw):
        self.calls.append(("forward", args[3].clone(), kw))
        return self.inner.forward(*args, **kw)

    def backward(self, *args, **kw):
        self.calls.append(("backward", args[3].clone(), kw))
        return self.inner.backward(*args, **kw)


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(torch_chunked)
    monkeypatch.setattr("fastpref.logprobs._resolve_backend", lambda backend, hidden: s)
    return s


def test_prompt_rows_skipped_in_backward_when_unused(spy):
    h, w, y, seg, _ = make_batch(seed=21)
    out = fastpref.sequence_logprobs(leaf(h), leaf(w), y, seg)
    out.response.sum().backward()
    (_, fwd_rows, _), (_, bwd_rows, _) = spy.calls
    flat_seg, flat_y = seg.reshape(-1), y.reshape(-1)
    assert torch.equal(fwd_rows, torch.nonzero((flat_seg > 0) & (flat_y != -100)).squeeze(1))
    assert torch.equal(bwd_rows, torch.nonzero((flat_seg == 2) & (flat_y != -100)).squeeze(1))


def test_prompt_rows_not_computed_when_not_asked(spy):
    h, w, y, seg, _ = make_batch(seed=23)
    seg = torch.where(seg == 1, 0, seg)
    fastpref.sequence_logprobs(h, w, y, seg)
    rows = spy.calls[0][1]
    assert torch.all(seg.reshape(-1)[rows] == 2)


def test_frozen_head_computes_no_weight_gradient(spy):
    h, w, y, seg, b = make_batch(seed=25, bias=True)
    hl = leaf(h)
    out = fastpref.sequence_logprobs(hl, w, y, seg, bias=b)  # weight and bias frozen (LoRA)
    out.response.sum().backward()
    kw = spy.calls[-1][2]
    assert kw["compute_dh"] and not kw["compute_dw"] and not kw["compute_db"]
    assert hl.grad is not None and w.grad is None


def test_no_grad_saves_nothing_and_returns_plain_tensors(spy):
    h, w, y, seg, _ = make_batch(seed=27)
    with torch.no_grad():
        out = fastpref.sequence_logprobs(leaf(h), leaf(w), y, seg)
    assert out.response.grad_fn is None and not out.response.requires_grad
    assert [c[0] for c in spy.calls] == ["forward"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deterministic_repeat(backend):
    h, w, y, seg, _ = make_batch(seed=29)
    a = fastpref.sequence_logprobs(h, w, y, seg, backend=backend)
    b = fastpref.sequence_logprobs(h, w, y, seg, backend=backend)
    assert torch.equal(a.response, b.response)


def test_torch_backend_gradcheck_float64():
    h, w, y, seg, b = make_batch(B=2, T=7, D=5, V=11, dtype=torch.float64, seed=31, bias=True)

    def f(h, w, b):
        out = fastpref.sequence_logprobs(h, w, y, seg, bias=b, backend="torch", softcap=2.0, reduction="mean")
        return out.response, out.prompt

    assert torch.autograd.gradcheck(f, (leaf(h), leaf(w), leaf(b)))


@pytest.mark.parametrize("chunk", [37, 64, 1000])
def test_triton_backward_vocabulary_chunks_match_one_launch(chunk):
    hidden, weight, rows, labels = _rows_problem(seed=33)
    bias = torch.randn(weight.shape[0])
    lp, lse = triton_fused.forward(hidden, weight, bias, rows, labels, softcap=5.0)
    grad = torch.randn(rows.numel())
    one = triton_fused.backward(hidden, weight, bias, rows, labels, lse, grad, softcap=5.0, vocab_chunk=10**6)
    many = triton_fused.backward(hidden, weight, bias, rows, labels, lse, grad, softcap=5.0, vocab_chunk=chunk)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [torch_chunked, triton_fused])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_gradient_comes_in_the_weight_dtype(backend, dtype):
    hidden, weight, rows, labels = _rows_problem(seed=35, dtype=dtype)
    _, lse = backend.forward(hidden, weight, None, rows, labels)
    grad = torch.randn(rows.numel())
    dh, dw, _ = backend.backward(hidden, weight, None, rows, labels, lse, grad)
    assert dw.dtype == dtype and dh.dtype == torch.float32
    _, dw32, _ = backend.backward(hidden, weight, None, rows, labels, lse, grad, dw_dtype=torch.float32)
    assert dw32.dtype == torch.float32
    torch.testing.assert_close(dw.float(), dw32.to(dtype).float())
