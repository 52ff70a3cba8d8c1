"""``fastpref.trainer`` and ``fastpref.collators``: the Trainer classes for binary, scalar, reference-sample and
oracle-reward feedback.

Every trainer/method trains two steps on a tiny Llama; the first step's loss must equal the functional loss of
log-probs computed independently from the **unpatched** model's logits (float64 log_softmax/gather on a copy of
the initial weights) on the same batch. Also: collator layouts checked by hand, groups kept whole, the reference
model frozen, the DRDO reward head trained and saved, clear errors on bad data, and every ``examples/`` script.
"""

from __future__ import annotations

import copy
import os
import runpy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpref.collators import (  # noqa: E402
    BinaryFeedbackCollator,
    PairwiseRewardCollator,
    ScalarFeedbackCollator,
    TYPOCollator,
    group_rows,
    pad_sequences,
    tokenize_dataset,
)
from fastpref.losses import distill_loss, drdo_loss, dro_loss, kto_loss, pro_loss, typo_loss  # noqa: E402
from fastpref.trainer import (  # noqa: E402
    REWARD_HEAD_NAME,
    BinaryFeedbackTrainer,
    OracleRewardTrainer,
    ScalarFeedbackTrainer,
    TYPOTrainer,
)

V, D = 61, 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # logits of realistic spread (the random init gives near-uniform ones)
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                  dataloader_pin_memory=False)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


_gen = torch.Generator()  # each data factory reseeds it: the data do not depend on the test order


def _ids(n: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=_gen).tolist()


def _binary_data(n=8):
    _gen.manual_seed(1)
    return [{"prompt_input_ids": _ids(2 + i % 3), "completion_input_ids": _ids(2 + (i * 5) % 4), "label": i % 3 != 1}
            for i in range(n)]


def _scalar_data(n=4):
    _gen.manual_seed(2)
    out = []
    for i in range(n):
        k = 2 + i % 3
        out.append({"prompt_input_ids": _ids(2 + i % 2),
                    "completion_input_ids": [_ids(2 + (i + j) % 3) for j in range(k)],
                    "reward": [float(torch.randn((), generator=_gen)) for _ in range(k)]})
    return out


def _pair_data(n=8, columns=("oracle_chosen", "oracle_rejected")):
    _gen.manual_seed(3)
    return [{"prompt_input_ids": _ids(2 + i % 3), "chosen_input_ids": _ids(2 + i % 2), "rejected_input_ids": _ids(3),
             columns[0]: 1.0 + 0.1 * i, columns[1]: -0.5 + 0.2 * i} for i in range(n)]


def _typo_data():
    _gen.manual_seed(4)
    pairs = [{"prompt_input_ids": _ids(3), "chosen_input_ids": _ids(2 + i % 2), "rejected_input_ids": _ids(3)}
             for i in range(4)]
    unsup = [{"prompt_input_ids": _ids(2), "completion_input_ids": _ids(3 + i % 2), "unsup": True} for i in range(4)]
    return [row for pair in zip(pairs, unsup) for row in pair]  # interleaved: every batch of 4 has both kinds


# --------------------------------------------------------------------------------------------- float64 reference


@torch.no_grad()
def _ref_logps(model, batch, prefix=""):
    """(response, prompt, last_hidden) per sequence from the unpatched model's logits, in float64."""
    ids, attn, seg = (batch[prefix + k] for k in ("input_ids", "attention_mask", "segment_ids"))
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    lp = out.logits.double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    scored = (attn[:, 1:] * attn[:, :-1]).bool()
    response = (lp * ((seg[:, 1:] == 2) & scored)).sum(-1)
    prompt = (lp * ((seg[:, 1:] == 1) & scored)).sum(-1)
    last = torch.stack([torch.nonzero((seg[i] == 2) & attn[i].bool())[-1, 0] for i in range(ids.shape[0])])
    hidden = out.hidden_states[-1][torch.arange(ids.shape[0]), last]  # the hidden state OF the last response token
    return response, prompt, hidden


def _train(trainer):
    """Train, recording each compute_loss call's (batch, loss)."""
    records = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        records.append(({k: v.detach().clone() for k, v in inputs.items()}, loss.detach().clone()))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    return records


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_updated(model, before):
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed in training"


def _assert_frozen(ref, before):
    for name, p in ref.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
        assert torch.equal(p.detach(), before[name]), name


def _close(actual, expected):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- collators


def test_pad_sequences_hand_checked():
    out = pad_sequences([[5, 6], [5]], [[7, 8, 9], [7]], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 7, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 2, 2, 2], [1, 2, 0, 0, 0]]
    left = pad_sequences([[5, 6], [5]], [[7, 8, 9], [7]], pad_token_id=3, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[3, 3, 3, 5, 6, 7, 8, 9], [3, 3, 3, 3, 3, 3, 5, 7]]
    assert left["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert left["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 2]]
    cut = pad_sequences([[5, 6]], [[7, 8, 9]], max_length=3)
    assert cut["input_ids"].tolist() == [[5, 6, 7]] and cut["segment_ids"].tolist() == [[1, 1, 2]]
    with pytest.raises(ValueError, match="leaves no completion"):
        pad_sequences([[5, 6]], [[7]], max_length=2)


def test_binary_collator_hand_checked_with_kl_rows():
    examples = [{"prompt_input_ids": [5, 6], "completion_input_ids": [7, 8, 9], "label": True},
                {"prompt_input_ids": [5], "completion_input_ids": [10], "label": 0}]
    out = BinaryFeedbackCollator(pad_token_id=0, kl=True)(examples)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 10, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 2, 2, 2], [1, 2, 0, 0, 0]]
    assert out["label"].dtype == torch.bool and out["label"].tolist() == [True, False]
    # KL rows: prompt i with the completion of row i - 1 (cyclically), as TRL's KTOTrainer
    assert out["KL_input_ids"].tolist() == [[5, 6, 10, 0], [5, 7, 8, 9]]
    assert out["KL_segment_ids"].tolist() == [[1, 1, 2, 0], [1, 2, 2, 2]]
    assert out["KL_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert "KL_input_ids" not in BinaryFeedbackCollator()(examples)


def test_scalar_collator_flattens_whole_groups():
    examples = [{"prompt_input_ids": [5], "completion_input_ids": [[7], [8, 9], [10]], "reward": [1.0, 0.0, 0.5]},
                {"prompt_input_ids": [6, 6], "completion_input_ids": [[11, 12], [13]], "reward": [-1, 2]}]
    out = ScalarFeedbackCollator(pad_token_id=0, min_group_size=2)(examples)
    assert out["input_ids"].tolist() == [[5, 7, 0, 0], [5, 8, 9, 0], [5, 10, 0, 0], [6, 6, 11, 12], [6, 6, 13, 0]]
    assert out["segment_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 2, 0], [1, 2, 0, 0], [1, 1, 2, 2], [1, 1, 2, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["group_id"].tolist() == [0, 0, 0, 1, 1]
    assert out["reward"].dtype == torch.float32 and out["reward"].tolist() == [1.0, 0.0, 0.5, -1.0, 2.0]
    # every batch of examples is a batch of whole groups: the groups' sizes are the examples' K
    for batch in (_scalar_data(5)[:2], _scalar_data(5)[1:4]):
        gid = ScalarFeedbackCollator()(batch)["group_id"]
        assert torch.bincount(gid).tolist() == [len(ex["completion_input_ids"]) for ex in batch]
        assert (gid[1:] >= gid[:-1]).all()  # contiguous
    # one-completion-per-row data regroups into one example per prompt
    flat = [{"prompt_input_ids": [5], "completion_input_ids": [7], "reward": 1.0},
            {"prompt_input_ids": [6], "completion_input_ids": [8], "reward": 0.0},
            {"prompt_input_ids": [5], "completion_input_ids": [9], "reward": 0.5}]
    assert group_rows(flat) == [{"prompt_input_ids": [5], "completion_input_ids": [[7], [9]], "reward": [1.0, 0.5]},
                                {"prompt_input_ids": [6], "completion_input_ids": [[8]], "reward": [0.0]}]


def test_typo_and_pairwise_collators_row_order():
    examples = [{"prompt_input_ids": [5], "completion_input_ids": [20], "unsup": True},
                {"prompt_input_ids": [5], "chosen_input_ids": [7], "rejected_input_ids": [8, 8]},
                {"prompt_input_ids": [6], "chosen_input_ids": [9], "rejected_input_ids": [10], "unsup": False}]
    out = TYPOCollator(pad_token_id=0)(examples)
    assert out["input_ids"].tolist() == [[5, 7, 0], [6, 9, 0], [5, 8, 8], [6, 10, 0], [5, 20, 0]]
    assert out["segment_ids"].tolist() == [[1, 2, 0], [1, 2, 0], [1, 2, 2], [1, 2, 0], [1, 2, 0]]
    assert out["unsup"].tolist() == [False, False, False, False, True]
    pairs = [{"prompt_input_ids": [5], "chosen_input_ids": [7], "rejected_input_ids": [8, 8], "reward_chosen": 1,
              "reward_rejected": 0.5}]
    out = PairwiseRewardCollator(reward_columns=("reward_chosen", "reward_rejected"))(pairs)
    assert out["input_ids"].tolist() == [[5, 7, 0], [5, 8, 8]]
    assert out["segment_ids"].tolist() == [[1, 2, 0], [1, 2, 2]]
    assert out["reward_chosen"].tolist() == [1.0] and out["reward_rejected"].tolist() == [0.5]


@pytest.mark.parametrize("collator, example, match", [
    (BinaryFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [7]}, "no column 'label'"),
    (BinaryFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [7], "label": 2}, "0/1"),
    (BinaryFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [7], "label": "yes"}, "0/1"),
    (BinaryFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [], "label": 1}, "is empty"),
    (BinaryFeedbackCollator(), {"prompt": "hi", "completion": "yo", "label": 1}, "tokenize_dataset"),
    (BinaryFeedbackCollator(), {"prompt_input_ids": "hi", "completion_input_ids": [7], "label": 1}, "token ids"),
    (ScalarFeedbackCollator(min_group_size=2), {"prompt_input_ids": [5], "completion_input_ids": [[7]],
                                                "reward": [1.0]}, "group of 1"),
    (ScalarFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [[7], [8]], "reward": [1.0]},
     "2 completions but 1 rewards"),
    (ScalarFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [[7]], "reward": [float("nan")]},
     "not finite"),
    (ScalarFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [7, 8], "reward": [1.0, 0.0]},
     "list of K completions"),
    (ScalarFeedbackCollator(), {"prompt_input_ids": [5], "completion_input_ids": [[7]]}, "no column 'reward'"),
    (TYPOCollator(), {"prompt_input_ids": [5], "unsup": True}, "no column 'completion_input_ids'"),
    (TYPOCollator(), {"prompt_input_ids": [5], "chosen_input_ids": [7]}, "no column 'rejected_input_ids'"),
    (PairwiseRewardCollator(), {"prompt_input_ids": [5], "chosen_input_ids": [7], "rejected_input_ids": [8],
                                "oracle_chosen": 1.0}, "no column 'oracle_rejected'"),
])
def test_collators_reject_bad_data(collator, example, match):
    with pytest.raises(ValueError, match=match):
        collator([example])


def test_trainers_reject_bad_data_and_settings(tmp_path):
    model = _model()
    # missing column / bad label / PRO-S group of one: caught on the first example, before training
    with pytest.raises(ValueError, match="no column 'label'"):
        BinaryFeedbackTrainer(model, _args(tmp_path), train_dataset=[{"prompt_input_ids": [5],
                                                                      "completion_input_ids": [7]}])
    with pytest.raises(ValueError, match="0/1"):
        BinaryFeedbackTrainer(model, _args(tmp_path), method="kto",
                              train_dataset=[{"prompt_input_ids": [5], "completion_input_ids": [7], "label": 3}])
    single = [{"prompt_input_ids": [5], "completion_input_ids": [[7, 8]], "reward": [1.0]}]
    with pytest.raises(ValueError, match="needs at least 2"):
        ScalarFeedbackTrainer(model, _args(tmp_path), method="pro", train_dataset=single)
    ScalarFeedbackTrainer(model, _args(tmp_path), method="dro", train_dataset=single)  # DRO takes K = 1
    with pytest.raises(ValueError, match="no column 'oracle_chosen'"):
        OracleRewardTrainer(model, _args(tmp_path), train_dataset=_pair_data(2, ("reward_chosen", "reward_rejected")))
    # a later bad example fails at collate time with the same message
    data = _binary_data(4)
    data[3] = dict(data[3], label=0.5)
    trainer = BinaryFeedbackTrainer(model, _args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="0/1"):
        trainer.train()
    # a foreign collator that drops the layout's columns
    trainer = BinaryFeedbackTrainer(_model(), _args(tmp_path), method="kto", train_dataset=_binary_data(4),
                                    data_collator=BinaryFeedbackCollator(kl=False))
    with pytest.raises(ValueError, match=r"no \['KL_input_ids'"):
        trainer.train()
    # hyperparameters and options, checked at construction
    with pytest.raises(ValueError, match="lam"):
        BinaryFeedbackTrainer(model, _args(tmp_path), lam=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ScalarFeedbackTrainer(model, _args(tmp_path), alpha=0.5)
    with pytest.raises(ValueError, match="method"):
        OracleRewardTrainer(model, _args(tmp_path), method="dpo")
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        BinaryFeedbackTrainer(model, _args(tmp_path, per_device_train_batch_size=1), method="kto")
    with pytest.raises(ValueError, match="no reference model"):
        TYPOTrainer(model, _args(tmp_path), ref_model=_model(1))
    with pytest.raises(TypeError, match="torch module"):
        TYPOTrainer("gpt2", _args(tmp_path))


# --------------------------------------------------------------------------------------------- training parity


CASES = {
    # name: (trainer class, constructor kwargs, data factory, uses a reference model)
    "pro-b": (BinaryFeedbackTrainer, dict(method="pro", beta=0.5, lam=1.5, desirable_weight=1.3), _binary_data, True),
    "kto": (BinaryFeedbackTrainer, dict(method="kto", beta=0.5, undesirable_weight=0.7), _binary_data, True),
    "pro-s": (ScalarFeedbackTrainer, dict(method="pro", beta=0.5, eta=0.2, tau=0.5), _scalar_data, True),
    "dro": (ScalarFeedbackTrainer, dict(method="dro", beta=0.5, log_z0=1.5), _scalar_data, True),
    "typo": (TYPOTrainer, dict(lam=0.3), _typo_data, False),
    "drdo": (OracleRewardTrainer, dict(method="drdo", alpha=0.2, gamma=2.0), _pair_data, False),
    "edpo": (OracleRewardTrainer, dict(method="edpo", beta=0.5),
             lambda: _pair_data(8, ("reward_chosen", "reward_rejected")), True),
}


def _expected_loss(name, trainer, batch, policy, ref, head):
    pol, pol_prompt, hidden = _ref_logps(policy, batch)
    if ref is not None:
        rlp, rlp_prompt, _ = _ref_logps(ref, batch)
    if name == "pro-b":
        return pro_loss(pol, rlp, feedback="binary", labels=batch["label"], beta=0.5, lam=1.5, desirable_weight=1.3)
    if name == "kto":
        kl = (_ref_logps(policy, batch, "KL_")[0] - _ref_logps(ref, batch, "KL_")[0]).mean()
        assert float(kl) != 0.0
        return kto_loss(pol, rlp, batch["label"], kl=kl, beta=0.5, undesirable_weight=0.7)
    if name == "pro-s":
        return pro_loss(pol, rlp, feedback="scalar", rewards=batch["reward"].double(), group_ids=batch["group_id"],
                        beta=0.5, eta=0.2, tau=0.5)
    if name == "dro":
        return dro_loss(pol, rlp, pol_prompt, rlp_prompt, batch["reward"].double(), batch["group_id"], beta=0.5,
                        log_z0=1.5)
    if name == "typo":
        unsup = batch["unsup"]
        pairs = pol[~unsup]
        b = pairs.numel() // 2
        assert b > 0 and unsup.any()
        return typo_loss(pairs[:b], pairs[b:], pol[unsup], lam=0.3)
    b = pol.numel() // 2
    if name == "drdo":
        rhat = head(hidden.to(head.weight.dtype)).reshape(-1).double()
        return drdo_loss(pol[:b], pol[b:], rhat[:b], rhat[b:], batch["oracle_chosen"].double(),
                         batch["oracle_rejected"].double(), alpha=0.2, gamma=2.0)
    return distill_loss(pol[:b], pol[b:], rlp[:b], rlp[b:], batch["reward_chosen"].double(),
                        batch["reward_rejected"].double(), beta=0.5)


@pytest.mark.parametrize("name", list(CASES))
def test_two_steps_first_loss_matches_functional(name, tmp_path):
    cls, kwargs, data, uses_ref = CASES[name]
    model = _model(0)
    policy0 = copy.deepcopy(model)  # unpatched copy of the initial weights
    extra = {}
    if uses_ref:
        ref = _model(1)  # a different model, so that the implicit rewards are not 0 at the first step
        ref0 = copy.deepcopy(ref)
        extra["ref_model"] = ref
    trainer = cls(model, _args(tmp_path), train_dataset=data(), **kwargs, **extra)
    head0 = copy.deepcopy(trainer.reward_head) if name == "drdo" else None
    before = _params(model)
    records = _train(trainer)

    assert len(records) == 2 and trainer.state.global_step == 2
    batch, loss = records[0]
    expected, _ = _expected_loss(name, trainer, batch, policy0, ref0 if uses_ref else None, head0)
    _close(loss, expected)
    assert all(torch.isfinite(l) for _, l in records)
    _assert_updated(model, before)
    if uses_ref:
        assert trainer.ref_model is ref
        _assert_frozen(ref, _params(ref0))
    else:
        assert trainer.ref_model is None
    # TRL-named metrics, accumulated per step and logged
    logged = trainer.state.log_history[0]
    keys = {"pro-b": "rewards/chosen", "kto": "kl", "pro-s": "rewards/hyper", "dro": "dro/log_z",
            "typo": "typo/unsupervised", "drdo": "drdo/distill", "edpo": "distill/target_margin"}
    assert keys[name] in logged and "logps/" + ("mean" if name == "dro" else "chosen") in logged
    if name == "kto":  # the logged KL is TRL's clamped, batch-level estimate
        kl = (_ref_logps(policy0, batch, "KL_")[0] - _ref_logps(ref0, batch, "KL_")[0]).mean().clamp(min=0)
        assert logged["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)


def test_default_reference_is_a_frozen_copy(tmp_path):
    model = _model(0)
    trainer = BinaryFeedbackTrainer(model, _args(tmp_path), train_dataset=_binary_data())
    ref = trainer.ref_model
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    ref_before = _params(ref)
    records = _train(trainer)
    _assert_frozen(ref, ref_before)
    # at the first step policy == reference, so every implicit reward is 0: PRO-B is w * lam * log 2
    assert float(records[0][1]) == pytest.approx(2.0 * 0.6931471805599453, rel=1e-5)


@pytest.mark.parametrize("name", ["pro-s", "typo"])
def test_pure_fp16_overflowing_step_is_skipped(name, tmp_path, caplog):
    """Pure fp16 (half weights, no scaler): an overflowing forward skips its step, as a GradScaler would; training
    goes on, the skip is logged and counted. (It used to raise `hidden` holds non-finite values.)"""
    cls, kwargs, data, _ = CASES[name]
    model = _model(0).half()
    # SGD: pure-fp16 AdamW itself turns weights to NaN at the first step (eps = 1e-8 underflows in float16)
    trainer = cls(model, _args(tmp_path, max_steps=3, optim="sgd"), train_dataset=data(), **kwargs)
    snapshots = []
    trainer.add_callback(type("Snap", (transformers.TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, model=None, **kw: snapshots.append(_params(model))}))
    calls = [0]

    def overflow(module, args, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 2:
                output.last_hidden_state = output.last_hidden_state.masked_fill(
                    torch.zeros_like(output.last_hidden_state, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True),
                    float("inf"))
                return output
        return None

    handle = model.model.register_forward_hook(overflow)
    try:
        with caplog.at_level("WARNING", logger="fastpref"):
            trainer.train()
    finally:
        handle.remove()
    assert trainer.state.global_step == 3 and len(snapshots) == 3
    assert all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0])
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [e.get("skipped_steps", 0) for e in trainer.state.log_history if "loss" in e] == [0, 1, 1]
    assert "skipped" in caplog.text
    assert trainer.lr_scheduler.last_epoch == 2  # the skipped step did not advance the schedule (as GradScaler's)


def test_method_names_map_to_these_trainers():
    """Every `SomeTrainer(method='x')` of the name table is accepted by that trainer (it gets as far as the model
    check), and a method of another trainer is refused with a pointer to it."""
    import re

    import fastpref.trainer as trainers
    from fastpref._method_names import TRAINER_CALLS

    checked = 0
    for name, call in TRAINER_CALLS.items():
        for cls_name, method in re.findall(r"(\w+Trainer)\(method='([\w-]+)'\)", call):
            if cls_name == "FastPrefDPOTrainer":
                continue
            with pytest.raises(TypeError, match="model"):  # the method passed; the missing model did not
                getattr(trainers, cls_name)(None, method=method)
            checked += 1
    assert checked >= 5
    with pytest.raises(ValueError, match=re.escape("ScalarFeedbackTrainer(method='dro')")):
        BinaryFeedbackTrainer(_model(), method="dro")
    with pytest.raises(ValueError, match=re.escape("BinaryFeedbackTrainer(method='pro')")):
        ScalarFeedbackTrainer(_model(), method="pro-binary")


def test_peft_reference_is_the_adapter_disabled_base(tmp_path):
    peft = pytest.importorskip("peft")
    base = _model(0)
    base0 = copy.deepcopy(base)
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"],
                                                      init_lora_weights=False))
    policy0 = copy.deepcopy(model)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainer = BinaryFeedbackTrainer(model, _args(tmp_path), method="kto", train_dataset=_binary_data())
    assert trainer.ref_model is None and trainer.is_peft_policy
    records = _train(trainer)
    batch, loss = records[0]
    pol = _ref_logps(policy0, batch)[0]
    ref = _ref_logps(base0, batch)[0]
    assert (pol - ref).abs().max() > 1e-3  # the adapter matters
    kl = (_ref_logps(policy0, batch, "KL_")[0] - _ref_logps(base0, batch, "KL_")[0]).mean()
    _close(loss, kto_loss(pol, ref, batch["label"], kl=kl)[0])
    for n, p in model.named_parameters():  # only the adapter trains
        if "lora_" not in n:
            assert torch.equal(p.detach(), base_params[n]), n


def test_drdo_reward_head_gets_gradient_is_updated_and_saved(tmp_path):
    model = _model(0)
    trainer = OracleRewardTrainer(model, _args(tmp_path, save_strategy="steps", save_steps=2),
                                  train_dataset=_pair_data())
    head = trainer.reward_head
    assert isinstance(head, torch.nn.Linear) and head.in_features == D
    # a gradient reaches the head through the loss
    batch = trainer.data_collator(_pair_data(4))
    trainer.compute_loss(trainer.model, batch).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # (the bias cancels in rhat_w - rhat_l: its gradient is 0)
    head.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    before = copy.deepcopy(head.state_dict())
    trainer.train()
    assert any(id(p) in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]}
               for p in head.parameters())
    assert not torch.equal(head.weight.detach(), before["weight"])
    assert head.weight.grad is None  # zeroed after each optimizer step (the Trainer zeroes only the model's)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / REWARD_HEAD_NAME).is_file()
    trained = copy.deepcopy(head.state_dict())
    with torch.no_grad():
        head.weight.zero_()
    trainer.load_reward_head(str(out))
    assert torch.equal(head.weight, trained["weight"])
    # checkpoints carry the head, and resuming restores it (with its optimizer state)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / REWARD_HEAD_NAME).is_file()
    resumed = OracleRewardTrainer(_model(0), _args(tmp_path, max_steps=3), train_dataset=_pair_data())
    loaded = []
    load = resumed.load_reward_head
    resumed.load_reward_head = lambda directory: (loaded.append(directory), load(directory))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert loaded == [str(checkpoint)] and resumed.state.global_step == 3


def test_evaluate_logs_eval_metrics(tmp_path):
    data = _binary_data()
    trainer = BinaryFeedbackTrainer(_model(0), _args(tmp_path, max_steps=1, per_device_eval_batch_size=4),
                                    method="kto", ref_model=_model(1), train_dataset=data, eval_dataset=data)
    trainer.train()
    trainer.evaluate()
    logged = trainer.state.log_history[-1]  # as TRL: the method's metrics go to the logs
    assert {"eval_loss", "eval_kl", "eval_rewards/chosen", "eval_logps/rejected"} <= set(logged)
    assert all(v == v for v in logged.values())  # no NaN
    assert "kl" not in logged  # eval metrics do not leak into the train ones


def test_typo_batches_with_one_kind_of_rows(tmp_path):
    pairs = [row for row in _typo_data() if not row.get("unsup")]
    samples = [row for row in _typo_data() if row.get("unsup")]
    model = _model(0)
    policy0 = copy.deepcopy(model)
    trainer = TYPOTrainer(model, _args(tmp_path, max_steps=1), train_dataset=pairs, lam=0.3)
    batch = trainer.data_collator(pairs)
    loss = trainer.compute_loss(model, batch)
    pol = _ref_logps(policy0, batch)[0]
    _close(loss, torch.nn.functional.softplus(pol[4:] - pol[:4]).mean())
    batch = trainer.data_collator(samples)
    _close(trainer.compute_loss(model, batch), 0.3 * (-_ref_logps(policy0, batch)[0]).mean())


# --------------------------------------------------------------------------------------------- tokenization


def _tiny_tokenizer():
    sys.path.insert(0, EXAMPLES)
    try:
        from _tiny import tiny_tokenizer
    finally:
        sys.path.remove(EXAMPLES)
    return tiny_tokenizer()


def test_tokenize_dataset_lists_and_datasets():
    tok = _tiny_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    blue, sky = tok.convert_tokens_to_ids("blue"), tok.convert_tokens_to_ids("sky")
    rows = [{"prompt": "sky", "completion": "blue", "label": True},
            {"prompt": "sky", "completion": ["blue", "sky blue"], "reward": [1.0, 0.0]},
            {"prompt": "sky", "chosen": "blue", "rejected": "sky", "oracle_chosen": 1.0}]
    out = tokenize_dataset(rows, tok)
    assert out[0] == {"prompt_input_ids": [bos, sky], "completion_input_ids": [blue, eos], "label": True}
    assert out[1]["completion_input_ids"] == [[blue, eos], [sky, blue, eos]] and out[1]["reward"] == [1.0, 0.0]
    assert out[2] == {"prompt_input_ids": [bos, sky], "chosen_input_ids": [blue, eos], "rejected_input_ids": [sky, eos],
                      "oracle_chosen": 1.0}
    datasets = pytest.importorskip("datasets")
    ds = tokenize_dataset(datasets.Dataset.from_list(rows[:1] * 2), tok)
    assert set(ds.column_names) == {"label", "prompt_input_ids", "completion_input_ids"}
    assert ds[0]["completion_input_ids"] == [blue, eos]
    BinaryFeedbackCollator()(list(ds))  # a datasets.Dataset feeds the collators as is
    # a dataset mixing TYPO's pair rows and unsup rows (the missing columns become None)
    mixed = datasets.Dataset.from_dict({"prompt": ["sky", "sky"], "chosen": ["blue", None],
                                        "rejected": ["sky", None], "completion": [None, "blue"],
                                        "unsup": [None, True]})
    mixed = tokenize_dataset(mixed, tok)
    assert TYPOCollator()(list(mixed))["unsup"].tolist() == [False, False, True]


# --------------------------------------------------------------------------------------------- examples


EXAMPLE_SCRIPTS = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py") and not f.startswith("_"))


def test_every_trainer_has_an_example():
    assert set(EXAMPLE_SCRIPTS) >= {"binary_feedback.py", "scalar_feedback.py", "typo.py", "oracle_rewards.py"}


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_example_runs(script, monkeypatch, capsys):
    """Each script runs as ``python examples/<script>`` would (``__main__``, its directory on ``sys.path``), in
    this process to spare the interpreter start-up."""
    monkeypatch.syspath_prepend(EXAMPLES)
    monkeypatch.setattr(sys, "argv", [script])
    sys.modules.pop("_tiny", None)
    runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "mean training loss" in printed and "nan" not in printed.lower()
