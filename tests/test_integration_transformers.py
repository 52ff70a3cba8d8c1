"""``fastpref.integrations.transformers``: patched tiny causal LMs give the unpatched model's log-probs and grads.

Every reference is the unpatched model's own logits, reduced in float64 (log_softmax, gather, mask, sum), so
the comparison covers the backbone call, the head (weight, bias, tying), the logit transform read from the
config, the shift by one and the masking.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpref.integrations.transformers import LogProbsOutput, is_patched, patch, unpatch  # noqa: E402

V, D = 97, 32
LOGP_TOL = 1e-5  # fp32 sequence log-probs, relative
GRAD_TOL = 1e-5  # fp32 gradients, ||g - g_ref|| / ||g_ref|| per parameter

_COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(arch: str):
    t = transformers
    if arch == "llama":
        return t.LlamaConfig(**_COMMON)
    if arch == "qwen2":
        return t.Qwen2Config(**_COMMON)
    if arch == "mistral":
        return t.MistralConfig(**_COMMON)
    if arch == "gemma2":  # soft-capped logits; tied embeddings
        return t.Gemma2Config(**_COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                              final_logit_softcapping=2.5)
    if arch == "phi3":
        return t.Phi3Config(**_COMMON)
    if arch == "gpt2":  # tied embeddings
        return t.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    if arch == "phi":  # the head has a bias
        return t.PhiConfig(**{k: v for k, v in _COMMON.items() if k != "num_key_value_heads"},
                           resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if arch == "granite":  # logits divided by config.logits_scaling
        return t.GraniteConfig(**_COMMON, logits_scaling=4.0)
    if arch == "cohere":  # logits multiplied by config.logit_scale
        return t.CohereConfig(**_COMMON, logit_scale=0.5)
    if arch == "opt":  # the causal LM calls `self.model.decoder`, not its base model
        return t.OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=D, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":  # the head is `embed_out`
        return t.GPTNeoXConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":  # mixture of experts
        return t.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    raise KeyError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "phi", "granite", "cohere", "opt", "gpt_neox",
         "mixtral"]


def _model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager")
    model.float().eval()
    head = model.get_output_embeddings()
    with torch.no_grad():  # logits of realistic spread (random init gives near-uniform ones)
        head.weight.normal_(0.0, 0.6)
        if getattr(head, "bias", None) is not None:
            head.bias.normal_(0.0, 1.0)
    return model


def _batch(B=3, T=11, seed=0, left_pad=False, prompt_segments=False):
    """Random ids, a padding mask, and per-token completion / segment marks (TRL layout, aligned with ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attention = torch.zeros(B, T, dtype=torch.long)
    completion = torch.zeros(B, T, dtype=torch.long)
    segments = torch.zeros(B, T, dtype=torch.long)
    lengths = [T, T - 3, T - 5][:B] + [T - 1] * max(0, B - 3)
    for i, n in enumerate(lengths):
        p = 2 + i  # prompt tokens
        span = slice(T - n, T) if left_pad else slice(0, n)
        attention[i, span] = 1
        start = span.start
        segments[i, start:start + p] = 1
        segments[i, start + p:span.stop] = 2
        completion[i, start + p:span.stop] = 1
        ids[i, attention[i] == 0] = 0
    return ids, attention, completion, segments


def _reference(logits: torch.Tensor, ids: torch.Tensor, segments: torch.Tensor, attention=None):
    """float64 (response, prompt) per sequence from full logits, token t predicted by row t - 1 (a token
    predicted from a padding position is not scored)."""
    lp = logits.double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    seg = segments[:, 1:] if attention is None else segments[:, 1:] * attention[:, :-1]
    return (lp * (seg == 2)).sum(-1), (lp * (seg == 1)).sum(-1), lp


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(got: dict, want: dict, tol: float = GRAD_TOL):
    """``||g - g_ref|| / ||g_ref||`` per parameter; a parameter whose true gradient is zero (a key-projection
    bias, which softmax cancels) holds only rounding noise, so the norm is floored at 1e-4 of the total."""
    assert got.keys() == want.keys()
    assert got, "no gradients"
    total = torch.sqrt(sum(g.double().norm() ** 2 for g in want.values()))
    for name in want:
        diff = (got[name].double() - want[name].double()).norm()
        err = float(diff / torch.clamp(want[name].double().norm(), min=1e-4 * total))
        assert err < tol, f"{name}: rel err {err:.2e}"


def _compare(model, ids, attention, completion, segments, *, use_segments=False, tol=1.0, **call):
    """Run the patched and the unpatched path; compare log-probs and gradients of a random weighting."""
    g = torch.Generator().manual_seed(1)
    w_resp, w_prompt = torch.randn(ids.shape[0], generator=g), torch.randn(ids.shape[0], generator=g)
    w_resp, w_prompt = w_resp.to(ids.device), w_prompt.to(ids.device)
    ref_segments = segments if use_segments else completion * 2
    logits = model(ids, attention_mask=attention).logits
    ref_resp, ref_prompt, _ = _reference(logits, ids, ref_segments, attention)
    ((ref_resp * w_resp).sum() + (ref_prompt * w_prompt).sum()).backward()
    want = _grads(model)

    marks = {"segment_ids": segments} if use_segments else {"completion_mask": completion}
    out = model(ids, attention_mask=attention, logps_only=True, **marks, **call)
    assert isinstance(out, LogProbsOutput)
    lt = LOGP_TOL * tol
    torch.testing.assert_close(out.logps.response.double(), ref_resp.detach(), rtol=lt, atol=lt)
    torch.testing.assert_close(out.logps.prompt.double(), ref_prompt.detach(), rtol=lt, atol=lt)
    ((out.logps.response * w_resp).sum() + (out.logps.prompt * w_prompt).sum()).backward()
    _assert_grads_close(_grads(model), want, GRAD_TOL * tol)
    return out


# --------------------------------------------------------------------------------- equality with the model


@pytest.mark.parametrize("arch", ARCHS)
def test_logps_and_grads_match_unpatched(arch):
    model = patch(_model(arch), backend="torch")
    ids, attention, completion, segments = _batch()
    out = _compare(model, ids, attention, completion, segments)
    assert torch.equal(out.logps.n_response, (completion[:, 1:] * attention[:, :-1]).sum(-1).float())
    assert out.hidden_states is None and "logits" not in out  # no logits, no full hidden states kept


def test_config_transforms_are_picked_up():
    from types import SimpleNamespace as NS

    from fastpref.integrations._hf_utils import head_transform

    assert head_transform(_model("gemma2")).softcap == 2.5
    assert head_transform(_model("granite")).logit_scale == pytest.approx(0.25)
    assert head_transform(_model("cohere")).logit_scale == pytest.approx(0.5)
    plain = head_transform(_model("llama"))
    assert plain.logit_scale == 1.0 and plain.softcap is None and plain.vocab_limit is None
    # Architectures too large to build here: the config table alone.
    fake = lambda **cfg: NS(config=NS(**cfg))  # noqa: E731
    assert head_transform(fake(model_type="hyperclovax", logits_scaling=4.0)).logit_scale == 4.0  # multiplies
    assert head_transform(fake(model_type="granitemoehybrid", logits_scaling=4.0)).logit_scale == 0.25
    assert head_transform(fake(model_type="recurrent_gemma", logits_soft_cap=30.0)).softcap == 30.0
    assert head_transform(fake(model_type="xlstm", output_logit_soft_cap=15.0)).softcap == 15.0
    inkling = head_transform(fake(model_type="inkling", logits_mup_width_multiplier=8.0, unpadded_vocab_size=90))
    assert (inkling.logit_scale, inkling.bias_factor, inkling.vocab_limit) == (0.125, 8.0, 90)
    muse = head_transform(fake(model_type="muse_spark", output_multiplier=2.0, final_logit_softcapping=30.0))
    assert (muse.logit_scale, muse.softcap) == (2.0, 30.0)
    assert head_transform(fake(model_type="other_moe", output_multiplier=2.0)).logit_scale == 1.0  # a router knob
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        head_transform(fake(model_type="gemma2", final_logit_softcapping=-1.0))


def test_left_padding_and_segment_ids_give_prompt_logps():
    model = patch(_model("qwen2"), backend="torch")
    ids, attention, completion, segments = _batch(left_pad=True)
    out = _compare(model, ids, attention, completion, segments, use_segments=True)
    assert (out.logps.n_prompt > 0).all() and (out.logps.n_response > 0).all()


def test_token_logps_and_last_hidden():
    model = patch(_model("llama"), backend="torch")
    ids, attention, completion, _ = _batch()
    out = model(ids, attention_mask=attention, completion_mask=completion, logps_only=True,
                return_token_logps=True)
    _, _, lp = _reference(model(ids, attention_mask=attention).logits, ids, completion * 2)
    tok = out.logps.token_logps
    assert tok.shape == ids.shape and (tok[:, 0] == 0).all()
    torch.testing.assert_close(tok[:, 1:].double(), (lp * completion[:, 1:]).detach(), rtol=1e-5, atol=1e-6)
    hidden = model.model(ids, attention_mask=attention).last_hidden_state
    last_token = torch.stack([torch.nonzero(row).max() for row in completion])  # last response token t
    # the hidden state OF that token (its input row), as a reward model reads it; not row t - 1, which predicts it
    torch.testing.assert_close(out.last_hidden, hidden[torch.arange(len(ids)), last_token])
    out.last_hidden.sum().backward()  # differentiable
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_last_hidden_tells_responses_differing_in_their_last_token_apart():
    """Issue 10: DRDO's reward head read the row predicting the last response token, so two responses differing only
    in that token had identical `last_hidden` (difference 0.0).  The row of the token itself differs."""
    model = patch(_model("llama"), backend="torch")
    torch.manual_seed(3)
    ids = torch.randint(3, 40, (1, 9)).repeat(2, 1)
    ids[1, 7] = ids[0, 7] + 1  # last completion token (position 7; position 8 is padding)
    attention = torch.ones_like(ids)
    attention[:, 8] = 0
    completion = torch.zeros_like(ids)
    completion[:, 4:8] = 1
    out = model(ids, attention_mask=attention, completion_mask=completion, logps_only=True)
    assert float((out.last_hidden[0] - out.last_hidden[1]).detach().abs().max()) > 1e-3


def test_head_is_never_called():
    model = patch(_model("gpt2"), backend="torch")
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    ids, attention, completion, _ = _batch()
    model(ids, attention_mask=attention, completion_mask=completion, logps_only=True)
    assert calls == []
    model(ids, attention_mask=attention)
    assert calls == [1]


def test_triton_backend(device):
    """The fused kernels: on CUDA when there is one, else through the interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    model = patch(_model("gemma2").to(device), backend="triton")
    ids, attention, completion, segments = (x.to(device) for x in _batch(B=2, T=9))
    _compare(model, ids, attention, completion, segments, use_segments=True, tol=1.0 if device == "cpu" else 10.0)


def _checkpointing(model):
    # transformers 5.23 renamed gradient_checkpointing_enable (still there, deprecated); 5.17 has only the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def test_gradient_checkpointing():
    model = _model("llama")
    _checkpointing(model)
    model.train()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    patch(model, backend="torch")
    ids, attention, completion, segments = _batch()
    _compare(model, ids, attention, completion, segments)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_peft_lora(checkpointing):
    peft = pytest.importorskip("peft")
    base = _model("llama")
    if checkpointing:
        _checkpointing(base)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    if checkpointing:
        model.train()
    assert patch(model, backend="torch") is model
    assert is_patched(model) and is_patched(base)
    ids, attention, completion, segments = _batch()
    _compare(model, ids, attention, completion, segments)
    head = base.get_output_embeddings()
    assert not head.weight.requires_grad and head.weight.grad is None  # frozen head: no dW
    unpatch(model)
    assert not is_patched(base)


# --------------------------------------------------------------------------------- packed inputs


def _pack(ids, attention, completion):
    rows = [(i[a.bool()], c[a.bool()]) for i, a, c in zip(ids, attention, completion)]
    collator = transformers.DataCollatorWithFlattening(return_tensors="pt")
    batch = collator([{"input_ids": r.tolist()} for r, _ in rows])
    return batch["input_ids"], batch["position_ids"], torch.cat([c for _, c in rows])[None]


@pytest.mark.parametrize("layout", ["position_ids", "cu_seqlens", "flash_kwargs"])
def test_packed_equals_padded(layout):
    model = patch(_model("mistral"), backend="torch")
    ids, attention, completion, _ = _batch()
    padded = model(ids, attention_mask=attention, completion_mask=completion, logps_only=True)
    padded.logps.response.sum().backward()
    want = _grads(model)

    packed_ids, position_ids, packed_completion = _pack(ids, attention, completion)
    lengths = attention.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    if layout == "position_ids":
        call = {"position_ids": position_ids}
    elif layout == "cu_seqlens":
        call = {"cu_seqlens": cu}
    else:
        collator = transformers.DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)
        batch = collator([{"input_ids": r[a.bool()].tolist()} for r, a in zip(ids, attention)])
        call = {k: batch[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    packed = model(packed_ids, completion_mask=packed_completion, logps_only=True, **call)
    assert torch.equal(packed.cu_seqlens, cu)
    torch.testing.assert_close(packed.logps.response, padded.logps.response, rtol=LOGP_TOL, atol=LOGP_TOL)
    torch.testing.assert_close(packed.last_hidden, padded.last_hidden, rtol=1e-5, atol=1e-5)
    packed.logps.response.sum().backward()
    _assert_grads_close(_grads(model), want)


def test_packed_never_scores_across_boundaries():
    model = patch(_model("llama"), backend="torch")
    ids, attention, completion, _ = _batch()
    packed_ids, position_ids, _ = _pack(ids, attention, completion)
    everything = torch.ones_like(packed_ids)  # every token marked: the first of each sequence must still be skipped
    out = model(packed_ids, position_ids=position_ids, completion_mask=everything, logps_only=True)
    assert torch.equal(out.logps.n_response, (attention.sum(-1) - 1).float())
    padded = model(ids, attention_mask=attention, completion_mask=attention, logps_only=True)
    torch.testing.assert_close(out.logps.response, padded.logps.response, rtol=LOGP_TOL, atol=LOGP_TOL)


# --------------------------------------------------------------------------------- unchanged behaviour


def test_normal_call_unchanged_and_unpatch_restores():
    model = _model("phi")
    ids, attention, _, _ = _batch()
    labels = ids.masked_fill(attention == 0, -100)
    before = model(ids, attention_mask=attention, labels=labels)
    class_forward = type(model).forward
    patch(model)
    assert is_patched(model) and "forward" in model.__dict__
    during = model(ids, attention_mask=attention, labels=labels)
    assert torch.equal(during.logits, before.logits) and torch.equal(during.loss, before.loss)
    assert type(during) is type(before)
    unpatch(model)
    assert not is_patched(model) and "forward" not in model.__dict__ and type(model).forward is class_forward
    after = model(ids, attention_mask=attention, labels=labels)
    assert torch.equal(after.logits, before.logits)
    assert unpatch(model) is model  # unpatching twice is a no-op


def test_signature_and_deepcopy():
    import inspect

    model = patch(_model("llama"), backend="torch")
    params = inspect.signature(model.forward).parameters
    for name in ("input_ids", "attention_mask", "completion_mask", "segment_ids", "logps_only"):
        assert name in params  # transformers.Trainer keeps the dataset columns the forward names
    clone = copy.deepcopy(model)  # TRL builds its reference model this way
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(2)
    ids, attention, completion, _ = _batch()
    ours = model(ids, attention_mask=attention, completion_mask=completion, logps_only=True).logps.response
    theirs = clone(ids, attention_mask=attention, completion_mask=completion, logps_only=True).logps.response
    ref, _, _ = _reference(clone(ids, attention_mask=attention).logits, ids, completion * 2)
    torch.testing.assert_close(theirs.double(), ref, rtol=LOGP_TOL, atol=LOGP_TOL)
    assert not torch.allclose(ours, theirs)


def test_autocast_bf16():
    model = patch(_model("llama"), backend="torch")
    ids, attention, completion, _ = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=attention, completion_mask=completion, logps_only=True)
        logits = model(ids, attention_mask=attention).logits
    assert logits.dtype == torch.bfloat16
    ref, _, _ = _reference(logits, ids, completion * 2)
    torch.testing.assert_close(out.logps.response.double(), ref, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------- validation


def test_bad_arguments_name_the_argument():
    model = patch(_model("llama"), backend="torch")
    ids, attention, completion, segments = _batch()
    with pytest.raises(ValueError, match="completion_mask"):
        model(ids, attention_mask=attention, completion_mask=completion[:, :-1], logps_only=True)
    with pytest.raises(ValueError, match="not both"):
        model(ids, attention_mask=attention, completion_mask=completion, segment_ids=segments, logps_only=True)
    with pytest.raises(ValueError, match="completion_mask"):
        model(ids, attention_mask=attention, logps_only=True)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=segments + 2, logps_only=True)
    with pytest.raises(ValueError, match="completion_mask"):
        model(ids, completion_mask=completion * 3, logps_only=True)
    with pytest.raises(TypeError, match="completion_mask"):
        model(ids, completion_mask=completion.float(), logps_only=True)
    with pytest.raises(TypeError, match="completion_mask"):
        model(ids, attention_mask=attention, completion_mask=completion)  # without logps_only
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids, completion_mask=completion, logps_only=True)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(3, 11, D), completion_mask=completion, logps_only=True)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, completion_mask=completion, cu_seqlens=torch.tensor([0, 11]), logps_only=True)
    with pytest.raises(ValueError, match="backend"):
        patch(_model("llama"), backend="cuda")
    with pytest.raises(ValueError, match="reduction"):
        patch(_model("llama"), reduction="avg")
    with pytest.raises(ValueError, match="get_output_embeddings"):
        patch(transformers.LlamaModel(_config("llama")))
    with pytest.raises(TypeError, match="model"):
        patch("llama")


def test_unknown_head_transform_is_caught():
    class DoubledLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = DoubledLogits(_config("llama"))
    with pytest.raises(ValueError, match="scale"):
        patch(model)
    assert not is_patched(model)
    patch(model, verify=False)  # the caller's responsibility
    assert is_patched(model)


def test_reduction_mean():
    model = patch(_model("llama"), backend="torch", reduction="mean")
    ids, attention, completion, _ = _batch()
    out = model(ids, attention_mask=attention, completion_mask=completion, logps_only=True)
    ref, _, _ = _reference(model(ids, attention_mask=attention).logits, ids, completion * 2)
    n = (completion[:, 1:] * attention[:, :-1]).sum(-1)
    torch.testing.assert_close(out.logps.response.double(), ref / n, rtol=LOGP_TOL, atol=LOGP_TOL)


# --------------------------------------------------------------------------------- pickling, is_patched


def _logps(model, batch):
    ids, attention, completion, _ = batch
    return model(ids, attention_mask=attention, completion_mask=completion, logps_only=True).logps.response


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy", "copy"])
def test_the_patch_survives_pickling_and_copies(how):
    import io
    import pickle

    model = patch(_model("gemma2"), backend="torch", reduction="mean")  # non-default settings travel too
    batch = _batch()
    expected = _logps(model, batch)
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    else:
        clone = getattr(copy, how)(model)
    assert is_patched(clone) and clone.forward.__self__ is clone
    torch.testing.assert_close(_logps(clone, batch), expected, rtol=0, atol=0)
    assert clone.__dict__["_fastpref_patch"].reduction == "mean"
    import inspect

    assert "logps_only" in inspect.signature(clone.forward).parameters
    ids, attention, _, _ = batch
    torch.testing.assert_close(clone(ids, attention_mask=attention).logits, model(ids, attention_mask=attention).logits)
    if how != "copy":  # a shallow copy shares the parameters; the others own theirs
        with torch.no_grad():
            clone.get_output_embeddings().weight.mul_(2)
        assert not torch.allclose(_logps(clone, batch), expected)
        torch.testing.assert_close(_logps(model, batch), expected, rtol=0, atol=0)
    unpatch(clone)
    assert not is_patched(clone) and "forward" not in clone.__dict__ and "__reduce_ex__" not in clone.__dict__
    assert is_patched(model)
    again = pickle.loads(pickle.dumps(clone))  # unpatched travels unpatched
    assert not is_patched(again) and "_fastpref_patch" not in again.__dict__


def test_is_patched_is_true_to_fact():
    import functools
    import pickle
    import types

    model = patch(_model("llama"), backend="torch")
    patched_forward = model.forward

    @functools.wraps(patched_forward)  # a wrapper that calls the patched forward (as accelerate's autocast does)
    def wrapper(*args, **kwargs):
        return patched_forward(*args, **kwargs)

    model.forward = wrapper
    assert is_patched(model)
    _logps(model, _batch())
    model.forward = types.MethodType(type(model).forward, model)  # replaced: logps_only would be swallowed
    assert not is_patched(model)
    clone = pickle.loads(pickle.dumps(model))
    assert not is_patched(clone) and "_fastpref_patch" not in clone.__dict__
    other = patch(_model("llama"), backend="torch")
    model.forward = other.forward  # another model's patched forward computes with the other model's weights
    assert not is_patched(model)
    patch(model)  # patching again restores it
    assert is_patched(model) and model.forward.__self__ is model
