"""Per-token statistics of the head's distribution from the fused forward (issue 12 item 1), against float64.

entropy ``-sum_v p log p``, ``log sum_v p^2`` (WPO's weights), the mean logit ``mean_v z`` and whether the argmax is
the label (first maximal index, as ``argmax``), accumulated online with the log-sum-exp; and the entropy's gradient
``-p (z - E_p z)`` in the same backward pass as the log-probs'.
"""

import pytest
import torch

from fastpref.backends import torch_chunked, triton_fused
from fastpref.reference import head_logits

BACKENDS = [torch_chunked, triton_fused]


def _problem(seed=0, M=41, D=24, V=173, dtype=torch.float32, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M + 7, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * spread).to(dtype)
    rows = torch.randperm(M + 7, generator=g)[:M].sort().values
    labels = torch.randint(0, V, (M,), generator=g)
    return hidden, weight, rows, labels


def _reference(hidden, weight, bias, rows, labels, **kw):
    z = head_logits(hidden[rows].double(), weight.double(), None if bias is None else bias.double(), **kw)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return {"lp": logp.gather(1, labels[:, None]).squeeze(1), "entropy": -(p * logp).sum(-1),
            "log_sum_p2": torch.logsumexp(2 * logp, -1), "mean_logit": z.mean(-1),
            "argmax_is_label": z.argmax(-1) == labels}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_token_statistics_match_float64(backend, frozen, softcap):
    hidden, weight, rows, labels = _problem(seed=1)
    bias = torch.randn(weight.shape[0])
    labels[:5] = torch.argmax(hidden[rows[:5]] @ weight.t() + bias, -1)  # some rows whose label is the argmax
    kw = dict(logit_scale=1.2, softcap=softcap)
    if frozen:
        lp, stats, _, _, tokens = backend.frozen_forward(hidden, weight, bias, rows, labels, stats=True, row_chunk=16,
                                                         vocab_chunk=64, **kw)
    else:
        lp, stats, tokens = backend.forward(hidden, weight, bias, rows, labels, stats=True, **kw)
    ref = _reference(hidden, weight, bias, rows, labels, **kw)
    torch.testing.assert_close(lp.double(), ref["lp"], rtol=1e-6, atol=1e-6)
    for name in ("entropy", "log_sum_p2", "mean_logit"):
        torch.testing.assert_close(getattr(tokens, name).double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(tokens.argmax_is_label, ref["argmax_is_label"]) and tokens.argmax_is_label[:5].all()
    lp_plain, stats_plain = backend.forward(hidden, weight, bias, rows, labels, **kw)
    torch.testing.assert_close(lp, lp_plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties_take_the_first_index(backend):
    """As ``torch.argmax``: a label tied with an earlier column is not the argmax; tied with a later one, it is."""
    D, V = 16, 40
    weight = torch.randn(V, D)
    weight[7] = weight[21]  # columns 7 and 21 give identical logits
    hidden = (weight[21] * 4).repeat(2, 1)  # ... and they are each row's maximum
    rows, labels = torch.arange(2), torch.tensor([21, 7])
    _, _, tokens = backend.forward(hidden, weight, None, rows, labels, stats=True)
    assert tokens.argmax_is_label.tolist() == [False, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_stays_exact_for_peaked_rows(backend):
    """``t1`` is kept relative to the running max: a row with logits of ~1e3 and a near-one-hot softmax keeps its
    tiny entropy to the precision of its fp32 logits (``lse - E_p[z]`` in fp32 would cancel to noise of ~6e-5:
    1e3 x 2^-24). The float64 reference uses exact logits; ours carry fp32 rounding of ~3e-4 nats, which moves
    entropies of ~1e-5 by up to a few 1e-3 relative."""
    hidden, weight, rows, labels = _problem(seed=2, M=9, spread=40.0)
    _, _, tokens = backend.forward(hidden, weight, None, rows, labels, stats=True)
    ref = _reference(hidden, weight, None, rows, labels)
    assert (ref["entropy"] < 1e-4).any()
    torch.testing.assert_close(tokens.entropy.double(), ref["entropy"], rtol=1e-2, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_gradient_joins_the_log_prob_gradient(backend, dtype):
    hidden, weight, rows, labels = _problem(seed=3, dtype=dtype)
    bias = torch.randn(weight.shape[0]).to(dtype)
    kw = dict(softcap=6.0)
    lp, stats, tokens = backend.forward(hidden, weight, bias, rows, labels, stats=True, **kw)
    g = torch.randn(rows.numel())
    g[::4] = 0.0  # rows with only an entropy gradient
    gamma = torch.randn(rows.numel())
    gamma[1::3] = 0.0  # rows with only a log-prob gradient
    dh, dw, db = backend.backward(hidden, weight, bias, rows, labels, stats, lp, g, entropy_grad=gamma,
                                  row_chunk=16, vocab_chunk=64, **kw)
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
    ref = _reference(h64, w64, b64, rows, labels, **kw)
    ((ref["lp"] * g.double()).sum() + (ref["entropy"] * gamma.double()).sum()).backward()
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for x, r in ((dh, h64.grad), (dw, w64.grad), (db, b64.grad)):
        assert float((x.double() - r).norm() / r.norm()) < bound
