"""The backends' forward/backward functions directly: splits, chunking, the frozen head, skipped work, no atomics."""

import inspect
import pathlib

import pytest
import torch

import fastpref
from fastpref.backends import _chunked, torch_chunked, triton_fused
from fastpref.kernels import config as kconfig
from fastpref.kernels.config import output_buffer, plan_vocab_splits
from fastpref.kernels.matmul_accumulate import matmul_accumulate
from fastpref.reference import token_logprobs_reference
from helpers import leaf, make_batch

BACKENDS = [torch_chunked, triton_fused]


def _rows_problem(seed=0, M=53, D=48, V=301, dtype=torch.float32, spread=0.35):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M + 20, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * spread).to(dtype)
    rows = torch.randperm(M + 20, generator=g)[:M].sort().values
    labels = torch.randint(0, V, (M,), generator=g)
    return hidden, weight, rows, labels


def _reference_grads(hidden, weight, bias, rows, labels, grad, **kw):
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    lp = token_logprobs_reference(h64[rows], w64, labels, b64, **kw)
    (lp * grad.double()).sum().backward()
    return lp.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


def test_poisoned_buffers_are_nan():
    assert torch.isnan(output_buffer((3, 2), torch.float32, torch.device("cpu"))).all()


@pytest.mark.parametrize("splits", [1, 2, 3, 10])
def test_forward_vocabulary_split_merge(splits):
    hidden, weight, rows, labels = _rows_problem(seed=splits)
    lp, stats = triton_fused.forward(hidden, weight, None, rows, labels, num_splits=splits)
    z64 = hidden[rows].double() @ weight.double().t()
    ref = token_logprobs_reference(hidden[rows].double(), weight.double(), labels)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((stats.max + stats.logsum).double(), torch.logsumexp(z64, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.max.double(), z64.amax(-1), rtol=1e-6, atol=1e-6)


def test_torch_backend_small_chunks_match_one_chunk():
    hidden, weight, rows, labels = _rows_problem(seed=4)
    bias = torch.randn(weight.shape[0])
    kw = dict(logit_scale=0.9, softcap=3.0)
    lp1, st1 = torch_chunked.forward(hidden, weight, bias, rows, labels, row_chunk=5, vocab_chunk=37, **kw)
    lp2, st2 = torch_chunked.forward(hidden, weight, bias, rows, labels, row_chunk=10_000, vocab_chunk=10_000, **kw)
    torch.testing.assert_close(lp1, lp2, rtol=1e-6, atol=1e-6)
    grad = torch.randn(rows.numel())
    a = torch_chunked.backward(hidden, weight, bias, rows, labels, st1, lp1, grad, row_chunk=5, vocab_chunk=37, **kw)
    b = torch_chunked.backward(hidden, weight, bias, rows, labels, st2, lp2, grad, row_chunk=10_000,
                               vocab_chunk=10_000, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_float64_backward(backend):
    hidden, weight, rows, labels = _rows_problem(seed=9)
    bias = torch.randn(weight.shape[0])
    lp, stats = backend.forward(hidden, weight, bias, rows, labels, softcap=6.0)
    grad = torch.randn(rows.numel())
    dh, dw, db = backend.backward(hidden, weight, bias, rows, labels, stats, lp, grad, softcap=6.0)
    lp64, dh64, dw64, db64 = _reference_grads(hidden, weight, bias, rows, labels, grad, softcap=6.0)
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-6, atol=1e-6)
    assert dh.shape == hidden.shape  # the whole hidden's gradient, zero on rows that were not asked for
    for x, ref in ((dh, dh64), (dw, dw64), (db, db64)):
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row_chunk,vocab_chunk", [(16, 37), (20, 64), (10**6, 10**6), (7, 301)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_backward_chunks_match_float64(row_chunk, vocab_chunk, dtype):
    hidden, weight, rows, labels = _rows_problem(seed=33, dtype=dtype)
    bias = torch.randn(weight.shape[0]).to(dtype)
    lp, stats = triton_fused.forward(hidden, weight, bias, rows, labels, softcap=5.0)
    grad = torch.rand(rows.numel()) * 0.02 + 0.005  # small row weights: fp16 g*(onehot - p) would underflow
    dh, dw, db = triton_fused.backward(hidden, weight, bias, rows, labels, stats, lp, grad, softcap=5.0,
                                       row_chunk=row_chunk, vocab_chunk=vocab_chunk)
    _, dh64, dw64, db64 = _reference_grads(hidden, weight, bias, rows, labels, grad, softcap=5.0)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for x, ref in ((dh, dh64), (dw, dw64), (db, db64)):
        err = float((x.double() - ref).norm() / ref.norm())
        assert err < bound, (dtype, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    hidden, weight, rows, labels = _rows_problem(seed=3)
    lp, stats = backend.forward(hidden, weight, None, rows, labels)
    grad = torch.randn(rows.numel())
    a = backend.backward(hidden, weight, None, rows, labels, stats, lp, grad, compute_db=False, row_chunk=16,
                         vocab_chunk=64)
    b = backend.backward(hidden, weight, None, rows, labels, stats, lp, grad, compute_db=False, row_chunk=16,
                         vocab_chunk=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_gradient_comes_in_the_weight_dtype(backend, dtype):
    hidden, weight, rows, labels = _rows_problem(seed=35, dtype=dtype)
    lp, stats = backend.forward(hidden, weight, None, rows, labels)
    grad = torch.randn(rows.numel())
    dh, dw, _ = backend.backward(hidden, weight, None, rows, labels, stats, lp, grad)
    assert dw.dtype == dtype and dh.dtype == dtype
    _, dw32, _ = backend.backward(hidden, weight, None, rows, labels, stats, lp, grad, dw_dtype=torch.float32)
    assert dw32.dtype == torch.float32
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 1e-6  # one rounding apart at most
    torch.testing.assert_close(dw.float(), dw32.to(dtype).float(), rtol=ulp, atol=1e-6)


# -- frozen head ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,bias", [(None, False), (4.0, True)])
def test_frozen_forward_unit_is_the_hidden_gradient(backend, softcap, bias):
    hidden, weight, rows, labels = _rows_problem(seed=41)
    b = torch.randn(weight.shape[0]) if bias else None
    kw = dict(logit_scale=1.3, softcap=softcap)
    lp, stats, unit, flagged = backend.frozen_forward(hidden, weight, b, rows, labels, row_chunk=16, vocab_chunk=64,
                                                      **kw)
    lp64, dh64, _, _ = _reference_grads(hidden, weight, b, rows, labels, torch.ones(rows.numel()), **kw)
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-6, atol=1e-6)
    assert not flagged.any()
    torch.testing.assert_close((unit * 1.3).double(), dh64, rtol=1e-5, atol=1e-6)
    lp2, stats2 = backend.forward(hidden, weight, b, rows, labels, **kw)
    torch.testing.assert_close(stats.max, stats2.max, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.logsum, stats2.logsum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_autograd_matches_float64_with_flagged_rows(backend):
    """Rows whose label lies > 60 nats below the maximum are recomputed by the exact backward."""
    h, w, y, seg, _ = make_batch(seed=43, B=2, T=23)
    h = h.clone()
    h[0, 3:6] *= 14.0  # very confident rows: their labels sit 70-140 nats below the row's maximum
    hl = leaf(h)
    out = fastpref.sequence_logprobs(hl, w, y, seg, backend=backend)
    up = torch.randn(2)
    (out.response * up).sum().backward()
    h64 = h.double().requires_grad_()
    ref = fastpref.reference.sequence_logprobs_reference(h64, w.double(), y, seg)
    (ref["response"] * up.double()).sum().backward()
    torch.testing.assert_close(out.response.double(), ref["response"], rtol=1e-6, atol=1e-5)
    err = float((hl.grad.double() - h64.grad).norm() / h64.grad.norm())
    assert err < 1e-5
    lp_min = float(ref["token_logps"].detach()[0, 3:6].min())
    assert lp_min < -_chunked.FROZEN_LIMIT  # the case really had flagged rows


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_second_backward_recomputes(backend):
    h, w, y, seg, _ = make_batch(seed=45)
    hl = leaf(h)
    out = fastpref.sequence_logprobs(hl, w, y, seg, backend=backend)
    loss = (out.response * torch.arange(1.0, 4.0)).sum()
    loss.backward(retain_graph=True)
    first = hl.grad.clone()
    hl.grad = None
    loss.backward()
    torch.testing.assert_close(hl.grad, first, rtol=1e-5, atol=1e-6)


# -- skipped work -----------------------------------------------------------------------------------------------------
class _Spy:
    """Wraps a backend module and records what the autograd function asks of it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def frozen_supported(self, dtype):
        return self.inner.frozen_supported(dtype)

    def forward(self, *args, **kw):
        self.calls.append(("forward", args[3].clone(), kw))
        return self.inner.forward(*args, **kw)

    def frozen_forward(self, *args, **kw):
        self.calls.append(("frozen_forward", args[3].clone(), kw))
        return self.inner.frozen_forward(*args, **kw)

    def backward(self, *args, **kw):
        self.calls.append(("backward", args[3].clone(), kw))
        return self.inner.backward(*args, **kw)


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(torch_chunked)
    monkeypatch.setattr("fastpref._autograd.backend_module", lambda name: s)
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


def test_frozen_head_takes_the_elementwise_backward(spy):
    h, w, y, seg, b = make_batch(seed=25, bias=True)
    hl = leaf(h)
    out = fastpref.sequence_logprobs(hl, w, y, seg, bias=b)  # weight and bias frozen (LoRA)
    out.response.sum().backward()
    assert [c[0] for c in spy.calls] == ["frozen_forward"]  # no recomputing backward pass at all
    assert hl.grad is not None and w.grad is None


def test_trainable_bias_with_frozen_weight_takes_the_general_path(spy):
    h, w, y, seg, b = make_batch(seed=26, bias=True)
    bl = leaf(b)
    out = fastpref.sequence_logprobs(leaf(h), w, y, seg, bias=bl)
    out.response.sum().backward()
    kw = spy.calls[-1][2]
    assert spy.calls[-1][0] == "backward" and kw["compute_db"] and not kw["compute_dw"]
    assert bl.grad is not None and w.grad is None


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


# -- real-GPU hazards the interpreter would not show --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_bias_on_padded_rows_gives_finite_gradients(backend):
    """Masked rows of a tile load ``max = +inf`` (p = 0), never 0 (which overflows to NaN once s*b > 88)."""
    hidden, weight, rows, labels = _rows_problem(seed=51, M=19)  # 19 rows: the last row block is padded
    bias = torch.randn(weight.shape[0]) * 3 + 120.0
    impl = triton_fused if backend == "triton" else torch_chunked
    lp, stats = impl.forward(hidden, weight, bias, rows, labels)
    grad = torch.randn(rows.numel())
    dh, dw, db = impl.backward(hidden, weight, bias, rows, labels, stats, lp, grad)
    _, dh64, dw64, db64 = _reference_grads(hidden, weight, bias, rows, labels, grad)
    for x, ref in ((dh, dh64), (dw, dw64), (db, db64)):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_non_contiguous_bias(backend, layout):
    h, w, y, seg, _ = make_batch(seed=53)
    V = w.shape[0]
    bias = torch.randn(1).expand(V) if layout == "expanded" else torch.randn(2 * V)[::2]
    bl = bias.detach().clone().requires_grad_()
    hl, wl = leaf(h), leaf(w)
    out = fastpref.sequence_logprobs(hl, wl, y, seg, bias=bl, backend=backend)
    out.response.sum().backward()
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, bias.contiguous()))
    ref = fastpref.reference.sequence_logprobs_reference(h64, w64, y, seg, bias=b64)
    ref["response"].sum().backward()
    torch.testing.assert_close(out.response.double(), ref["response"], rtol=1e-6, atol=1e-5)
    for x, r in ((hl, h64), (wl, w64), (bl, b64)):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def test_no_head_kernel_uses_atomics():
    """The head's kernels write every output element from one program: deterministic, no fenced atomics."""
    kernels = pathlib.Path(inspect.getfile(kconfig)).parent
    for name in ("target_logit", "vocab_logsumexp", "logits_grad", "softmax_numerator", "matmul_accumulate",
                 "head_null_penalty", "logits_tile"):
        assert "tl.atomic" not in (kernels / f"{name}.py").read_text(), name


@pytest.mark.parametrize("row_blocks,vocab_tiles,resident", [
    (64, 1002, 132),  # Llama-3-8B head, M 8,192, 128 x 128 tiles, an H100/H200
    (1, 1002, 132),  # one row block: spread the vocabulary over the machine
    (500, 1002, 132),  # plenty of row blocks
    (3, 5, 1),  # the interpreter: one program at a time
])
def test_vocab_split_plan_fills_whole_waves(row_blocks, vocab_tiles, resident):
    def cost(s):  # waves of resident programs x (vocabulary tiles per program + one tile of overhead)
        return -(-row_blocks * s // resident) * (-(-vocab_tiles // s) + 1)

    s = plan_vocab_splits(row_blocks, vocab_tiles, resident)
    best = min(cost(k) for k in range(1, vocab_tiles + 1))
    assert cost(s) == best and all(cost(k) > best for k in range(1, s))  # optimal, fewest splits among optima
    if (row_blocks, vocab_tiles) == (64, 1002):
        waves, tiles = -(-row_blocks * s // resident), -(-vocab_tiles // s)
        assert waves * tiles <= 1.05 * row_blocks * vocab_tiles / resident  # within 5% of perfectly even waves
        assert cost(1) > 1.2 * cost(s)  # the first kernels' row-block-major grid left a 2.42-wave tail


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matmul_accumulate_kernel(transpose_a, dtype):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(37, 29, generator=g).to(dtype)
    a = a.t().contiguous().t() if transpose_a else a
    b = torch.randn(29, 21, generator=g).to(dtype)
    c0 = torch.randn(37, 21, generator=g)
    c = matmul_accumulate(c0.clone(), a, b, alpha=0.5)
    expected = c0.double() + 0.5 * a.double() @ b.double()
    torch.testing.assert_close(c.double(), expected, rtol=1e-5, atol=1e-5)
    nan = torch.full((37, 21), float("nan"))
    torch.testing.assert_close(matmul_accumulate(nan, a, b, beta_zero=True).double(), a.double() @ b.double(),
                               rtol=1e-5, atol=1e-5)


def test_launch_runs_under_the_tensors_device(monkeypatch):
    """Every launcher goes through ``config.launch``, which enters ``torch.cuda.device(tensor device)``: tensors on
    ``cuda:1`` while the current device is ``cuda:0`` launch on ``cuda:1`` (checked here with a stand-in kernel)."""
    entered, launched = [], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(str(self.device))

        def __exit__(self, *exc):
            entered.append("exit")

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, entered[-1]))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    kconfig.launch(Kernel(), (3, 1), (), {}, device=torch.device("cuda", 1))
    assert launched == [((3, 1), "cuda:1")] and entered == ["cuda:1", "exit"]
    kconfig.launch(Kernel(), (0, 1), (), {}, device=torch.device("cuda", 1))  # an empty grid launches nothing
    assert len(launched) == 1


def test_every_launcher_goes_through_launch():
    import re

    kernels = pathlib.Path(inspect.getfile(kconfig)).parent
    for path in kernels.glob("*.py"):
        direct = re.findall(r"_\w+_kernel\[", path.read_text())
        assert not direct, f"{path.name} launches {direct} directly, without the device guard of config.launch"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stats", [False, True])
def test_vocabulary_shards_merge_into_the_whole_head(backend, stats):
    """``shard_forward`` on two vocabulary shards (labels shifted, unowned labels outside [0, V_shard)) merges into
    the whole head's statistics (and, with ``stats``, token statistics: argmax == label judged across shards): what a
    vocabulary-parallel head all-reduces."""
    from fastpref.backends._stats import Partials, merge, with_target

    hidden, weight, rows, labels = _rows_problem(seed=61, V=301)
    bias = torch.randn(weight.shape[0])
    kw = dict(logit_scale=1.1, softcap=7.0)
    cut = 117
    labels[:4] = torch.tensor([0, cut - 1, cut, weight.shape[0] - 1])  # the shards' edges
    z = 7.0 * torch.tanh(1.1 * (hidden[rows] @ weight.t() + bias) / 7.0)
    labels[4:40] = z[4:40].argmax(dim=1)  # argmax == label on many rows, in either shard
    assert (labels[4:40] < cut).any() and (labels[4:40] >= cut).any()
    lp, row_stats, *tokens = backend.forward(hidden, weight, bias, rows, labels, stats=stats, **kw)
    parts = [backend.shard_forward(hidden, weight[a:b], bias[a:b], rows, labels - a, stats=stats, **kw)
             for a, b in ((0, cut), (cut, weight.shape[0]))]
    target = torch.maximum(parts[0][0], parts[1][0])  # exactly one shard owns each label
    assert torch.isfinite(target).all() and (torch.isinf(parts[0][0]) ^ torch.isinf(parts[1][0])).all()
    stacked = Partials(*(None if x is None else torch.stack([p[1][i] for p in parts])
                         for i, x in enumerate(parts[0][1])))
    lp2, stats2, tokens2 = with_target(target, merge(Partials.empty(target, stats), stacked), weight.shape[0])
    torch.testing.assert_close(lp2, lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats2.max, row_stats.max, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats2.logsum, row_stats.logsum, rtol=1e-5, atol=1e-6)
    if stats:
        (tokens,) = tokens
        torch.testing.assert_close(stats2.mean_shift, row_stats.mean_shift, rtol=1e-5, atol=1e-6)
        for name in ("entropy", "log_sum_p2", "mean_logit"):
            torch.testing.assert_close(getattr(tokens2, name), getattr(tokens, name), rtol=1e-5, atol=1e-6)
        assert torch.equal(tokens2.argmax_is_label, tokens.argmax_is_label) and tokens.argmax_is_label.sum() >= 30
    grad = torch.randn(rows.numel())
    entropy_grad = {"entropy_grad": torch.randn(rows.numel())} if stats else {}
    dh, dw, db = backend.backward(hidden, weight, bias, rows, labels, row_stats, lp, grad, **entropy_grad, **kw)
    shard = [backend.backward(hidden, weight[a:b], bias[a:b], rows, labels - a, stats2, lp2, grad, **entropy_grad,
                              **kw)
             for a, b in ((0, cut), (cut, weight.shape[0]))]
    torch.testing.assert_close(shard[0][0] + shard[1][0], dh, rtol=1e-5, atol=1e-6)  # dH: all-reduced
    torch.testing.assert_close(torch.cat([shard[0][1], shard[1][1]]), dw, rtol=1e-5, atol=1e-6)  # dW: own rows
    torch.testing.assert_close(torch.cat([shard[0][2], shard[1][2]]), db, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [30.0, 1e4])
def test_softcap_keeps_small_arguments_exact(softcap):
    """``c tanh(z / c)`` with ``|z / c|`` small: the Triton tanh must not cancel (it used to lose 2^-24 / |z/c|)."""
    hidden, weight, rows, labels = _rows_problem(seed=71, spread=0.6)
    lp, _ = triton_fused.forward(hidden, weight, None, rows, labels, softcap=softcap)
    ref = token_logprobs_reference(hidden[rows].double(), weight.double(), labels, softcap=softcap)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-6)
