"""Bad input raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch

import fastpref
from helpers import make_batch


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
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
