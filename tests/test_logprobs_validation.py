"""Bad input raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch

import fastpref
from helpers import make_batch


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch, request):
    if request.node.get_closest_marker("kernel_runs"):  # valid input: the kernels must run
        return

    def boom(*a, **k):
        raise AssertionError("a kernel ran on bad input")

    for mod in ("fastpref.backends.torch_chunked", "fastpref.backends.triton_fused"):
        monkeypatch.setattr(f"{mod}.forward", boom)


def _args(**over):
    h, w, y, seg, b = make_batch(B=2, T=9, D=16, V=41, seed=1, bias=True)
    kw = dict(hidden=h, weight=w, labels=y, segment_ids=seg, bias=b)
    kw.update(over)
    return kw


def _raises(exc, match, **over):
    kw = _args(**over)
    with pytest.raises(exc, match=match):
        fastpref.sequence_logprobs(**kw)


def test_hidden_not_tensor():
    _raises(TypeError, "`hidden`", hidden=[[1.0]])


def test_hidden_wrong_dims():
    _raises(ValueError, "`hidden`", hidden=torch.randn(16))


def test_weight_dtype_mismatch():
    _raises(TypeError, "`weight`", weight=torch.randn(41, 16, dtype=torch.float64))


def test_integer_hidden():
    _raises(TypeError, "`hidden`", hidden=torch.ones(2, 9, 16, dtype=torch.long))


def test_weight_hidden_size_mismatch():
    _raises(ValueError, "`weight`", weight=torch.randn(41, 15))


def test_bias_shape():
    _raises(ValueError, "`bias`", bias=torch.randn(40))


def test_labels_shape():
    _raises(ValueError, "`labels`", labels=torch.zeros(2, 8, dtype=torch.long))


def test_labels_float():
    _raises(TypeError, "`labels`", labels=torch.zeros(2, 9))


def test_label_out_of_range():
    y = make_batch(B=2, T=9, D=16, V=41, seed=1)[2]
    y[0, 5] = 41
    _raises(ValueError, "`labels`", labels=y)


def test_negative_label_other_than_ignore_index():
    y = make_batch(B=2, T=9, D=16, V=41, seed=1)[2]
    y[1, 2] = -1
    _raises(ValueError, "`labels`", labels=y)


def test_segment_ids_out_of_set():
    seg = make_batch(B=2, T=9, D=16, V=41, seed=1)[3]
    seg[0, 0] = 3
    _raises(ValueError, "`segment_ids`", segment_ids=seg)


def test_segment_ids_bool_mask_is_ambiguous():
    seg = make_batch(B=2, T=9, D=16, V=41, seed=1)[3]
    _raises(TypeError, "`segment_ids`", segment_ids=seg == 2)


def test_segment_ids_shape():
    _raises(ValueError, "`segment_ids`", segment_ids=torch.zeros(2, 8, dtype=torch.long))


def test_all_masked_sequence():
    y = make_batch(B=2, T=9, D=16, V=41, seed=1)[2]
    y[1] = -100
    _raises(ValueError, "no scored token", labels=y)


def test_all_masked_sequences_are_named():
    h, w, y, seg, _ = make_batch(B=5, T=9, D=16, V=41, seed=1)
    y[1] = -100
    _raises(ValueError, r"^sequence 1 of 5 \(0-based\) has no scored token", hidden=h, labels=y, segment_ids=seg,
            weight=w, bias=None)
    seg[3] = 0
    _raises(ValueError, r"^2 sequences \(1, 3\) of 5", hidden=h, labels=y, segment_ids=seg, weight=w, bias=None)


def test_non_finite_hidden():
    h = make_batch(B=2, T=9, D=16, V=41, seed=1)[0]
    h[0, 3, 2] = float("nan")
    _raises(ValueError, "`hidden`", hidden=h)


def test_non_finite_weight():
    w = make_batch(B=2, T=9, D=16, V=41, seed=1)[1].clone()
    w[7, 1] = float("inf")
    _raises(ValueError, "`weight`", weight=w)


def test_reduction():
    _raises(ValueError, "`reduction`", reduction="avg")


def test_backend_name():
    _raises(ValueError, "`backend`", backend="cuda")


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")])
def test_logit_scale(value):
    _raises(ValueError, "`logit_scale`", logit_scale=value)


def test_softcap():
    _raises(ValueError, "`softcap`", softcap=-3.0)


@pytest.mark.parametrize("scale", [1e38, 3e37])
def test_absurd_logit_scale(scale):
    """Finite in float32, but the logits overflow (1e38 used to return [nan, -inf])."""
    with pytest.raises(fastpref.NonFiniteError, match="`logit_scale`.*overflow|overflow.*`logit_scale`"):
        fastpref.sequence_logprobs(**_args(logit_scale=scale))
    with pytest.raises(ValueError, match="overflow"):  # with a softcap too: the logits are formed before the cap
        fastpref.sequence_logprobs(**_args(logit_scale=scale, softcap=30.0))


def test_overflowing_hidden_magnitude():
    h = make_batch(B=2, T=9, D=16, V=41, seed=1)[0] * 1e36
    _raises(fastpref.NonFiniteError, "overflow", hidden=h)


@pytest.mark.parametrize("value", [1e38, 2.0**127, float(torch.finfo(torch.float32).max)])
def test_absurd_softcap(value):
    _raises(ValueError, "`softcap`", softcap=value)


@pytest.mark.parametrize("value", [1e39, float("nan"), True, "2.0", torch.tensor(2.0)])
def test_logit_scale_not_a_float32_number(value):
    _raises((TypeError, ValueError), "`logit_scale`", logit_scale=value)


def test_cu_seqlens_as_python_list():
    kw = _packed([0, 5, 12])
    kw["cu_seqlens"] = [0, 5, 12]
    with pytest.raises(TypeError, match="`cu_seqlens` must be a torch.Tensor"):
        fastpref.sequence_logprobs(**kw)


@pytest.mark.parametrize("which", ["hidden", "all", "labels"])
def test_meta_device(which):
    kw = _args()
    names = ["hidden", "weight", "labels", "segment_ids", "bias"] if which == "all" else [which]
    for name in names:
        kw[name] = kw[name].to("meta")
    with pytest.raises(ValueError, match=f"`{names[0]}` is on the meta device"):
        fastpref.sequence_logprobs(**kw)


@pytest.mark.kernel_runs
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_numpy_and_int_scales_accepted(backend):
    np = pytest.importorskip("numpy")
    kw = _args(backend=backend)
    expected = fastpref.sequence_logprobs(**kw, logit_scale=2.0, softcap=30.0).response
    for scale, cap in [(np.float32(2.0), np.float32(30.0)), (np.float64(2.0), np.float64(30.0)), (2, 30),
                       (np.int64(2), np.int32(30))]:
        got = fastpref.sequence_logprobs(**kw, logit_scale=scale, softcap=cap).response
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.kernel_runs
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_valid_logit_scale_is_accepted(backend):
    """The overflow check is a bound, not a guess: a large scale whose logits fit float32 runs and is exact."""
    h, w, y, seg, b = make_batch(B=2, T=9, D=16, V=41, seed=1, bias=True)
    h = h * 1e-30  # logits ~1e-30, scaled by 1e30 back to ~1
    out = fastpref.sequence_logprobs(h, w, y, seg, bias=b * 1e-30, logit_scale=1e30, backend=backend)
    ref = fastpref.sequence_logprobs(h.double() * 1e30, w.double(), y, seg, bias=b.double(), backend="torch")
    torch.testing.assert_close(out.response.double(), ref.response, rtol=1e-5, atol=1e-4)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _raises(ValueError, "backend='triton'", backend="triton")


def test_device_mismatch():
    meta = torch.empty(41, 16, device="meta")
    _raises(ValueError, "`weight`", weight=meta)


def _packed(cu):
    h, w, y, seg, _ = make_batch(B=1, T=12, D=16, V=41, seed=2, prompt=False)
    return dict(hidden=h[0], weight=w, labels=y[0], segment_ids=None, bias=None, cu_seqlens=torch.tensor(cu))


@pytest.mark.parametrize("cu", [[0, 5, 5, 12], [0, 7, 4, 12], [1, 5, 12], [0, 5, 11], [0, 5, 13]])
def test_bad_cu_seqlens(cu):
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        fastpref.sequence_logprobs(**_packed(cu))


def test_packed_without_cu_seqlens():
    kw = _packed([0, 12])
    kw["cu_seqlens"] = None
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        fastpref.sequence_logprobs(**kw)


def test_padded_with_cu_seqlens():
    _raises(ValueError, "`cu_seqlens`", cu_seqlens=torch.tensor([0, 9, 18]))
