"""``AuxDPOTrainer`` (the authors' delta layout and optimizer group, both null-space penalties) and DRDO's oracle
stage (``DRDOOracleTrainer`` + ``fastpref.oracle.annotate_oracle_rewards``), against float64 computations from the
unpatched models' logits; the defaults docs/methods.md fixes for PRO-S and DRO in ``ScalarFeedbackTrainer``."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpref.collators import PreferenceCollator  # noqa: E402
from fastpref.losses import auxdpo_loss, dpo_loss, drdo_oracle_loss, param_null_penalty  # noqa: E402
from fastpref.oracle import annotate_oracle_rewards  # noqa: E402
from fastpref.reference import sequence_logprobs_reference  # noqa: E402
from fastpref.trainer import (  # noqa: E402
    AuxDPOTrainer,
    DRDOOracleTrainer,
    OracleRewardTrainer,
    ScalarFeedbackTrainer,
)
from test_trainer import D, _args, _close, _ids, _model, _ref_logps, _train  # noqa: E402
import test_trainer  # noqa: E402


def _pairs(n=8):
    test_trainer._gen.manual_seed(5)
    return [{"prompt_input_ids": _ids(2 + i % 3), "chosen_input_ids": _ids(2 + i % 2), "rejected_input_ids": _ids(3)}
            for i in range(n)]


def _response_rows(batch):
    """Row labels / segments of the response tokens (row t predicts token t + 1), as the patched model builds them."""
    ids, attn, seg = batch["input_ids"], batch["attention_mask"], batch["segment_ids"]
    rows = torch.zeros_like(seg)
    rows[:, :-1] = torch.where((seg[:, 1:] == 2) & attn[:, 1:].bool() & attn[:, :-1].bool(), 2, 0)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(rows[:, :-1] == 2, ids[:, 1:], -100)
    return labels, rows


# --------------------------------------------------------------------------------------------------------- AuxDPO


def test_auxdpo_trainer_first_loss_delta_group_and_saving(tmp_path):
    model, ref = _model(0), _model(1)
    policy0, ref0 = copy.deepcopy(model), copy.deepcopy(ref)
    trainer = AuxDPOTrainer(model, _args(tmp_path, learning_rate=1e-2), ref_model=ref, train_dataset=_pairs(),
                            beta=0.5, lambda_amp=0.5, init_std=0.3)
    assert trainer.num_delta_examples == 8 and trainer.offsets.delta_raw.shape == (16,)
    raw0 = trainer.offsets.delta_raw.detach().clone()
    records = _train(trainer)
    batch, loss = records[0]

    # expected: float64 log-probs, delta = tanh(raw), head penalty by autograd on the float64 reference head
    pol, _, _ = _ref_logps(policy0, batch)
    rlp, _, _ = _ref_logps(ref0, batch)
    idx = batch["example_index"]
    delta = torch.tanh(raw0.double())
    dw, dl = delta[2 * idx], delta[2 * idx + 1]
    with torch.no_grad():
        hidden = ref0.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels, rows = _response_rows(batch)
    w = ref0.get_output_embeddings().weight.detach().double().requires_grad_(False)
    pen = param_null_penalty(lambda: sequence_logprobs_reference(hidden.double(), w, labels, rows)["response"], [w],
                             torch.cat([dw, dl]))
    b = pol.numel() // 2
    expected, _ = auxdpo_loss(pol[:b], pol[b:], rlp[:b], rlp[b:], dw, dl, beta=0.5, null_penalty=pen, lambda_amp=0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)

    # its own optimizer group: lr 5e-3, no weight decay; delta moved
    groups = [g for g in trainer.optimizer.param_groups if any(p is trainer.offsets.delta_raw for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["initial_lr"] == 5e-3
    assert not torch.equal(trainer.offsets.delta_raw.detach(), raw0)
    assert trainer.offsets.delta_raw.grad is None  # zeroed after each step
    assert float(trainer.delta.detach().abs().max()) < 1.0  # cap
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "auxdpo_delta.pt").is_file()

    # evaluation: delta = 0 and no penalty, i.e. DPO
    trainer.model.eval()
    eval_batch = PreferenceCollator(pad_token_id=0)(_pairs(4))
    eval_loss = trainer.compute_loss(trainer.model, eval_batch)
    pol, _, _ = _ref_logps(trainer.model, eval_batch)
    rlp, _, _ = _ref_logps(ref0, eval_batch)
    _close(eval_loss, dpo_loss(pol[:4], pol[4:], rlp[:4], rlp[4:], beta=0.5)[0])


def test_auxdpo_trainer_all_parameter_null_space_penalty(tmp_path):
    """null_penalty='params': the authors' form over every parameter the policy trains (all of them here)."""
    model, ref = _model(0), _model(1)
    ref0 = copy.deepcopy(ref)
    trainer = AuxDPOTrainer(model, _args(tmp_path, max_steps=1), ref_model=ref, train_dataset=_pairs(4),
                            beta=0.5, null_penalty="params", init_std=0.3)
    raw0 = trainer.offsets.delta_raw.detach().clone()
    batch = trainer.data_collator(trainer.train_dataset)
    trainer.model.train()
    loss, metrics = trainer.loss_and_metrics(trainer.model, batch)

    ref64 = copy.deepcopy(ref0).double()
    params = list(ref64.parameters())
    labels, rows = _response_rows(batch)
    ids, attn = batch["input_ids"], batch["attention_mask"]

    def ref_logps():
        logits = ref64(input_ids=ids, attention_mask=attn).logits
        tok = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (tok * (rows[:, :-1] == 2)).sum(-1)

    delta = torch.tanh(raw0.double())
    idx = batch["example_index"]
    want = param_null_penalty(ref_logps, params, torch.cat([delta[2 * idx], delta[2 * idx + 1]]))
    assert float(metrics["auxdpo/null_penalty"]) == pytest.approx(float(want), rel=1e-4)
    assert float(want) > 0
    loss.backward()
    assert trainer.offsets.delta_raw.grad is not None and trainer.offsets.delta_raw.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())  # the reference stays frozen


def test_auxdpo_trainer_errors(tmp_path):
    with pytest.raises(ValueError, match="null_penalty"):
        AuxDPOTrainer(_model(0), _args(tmp_path), train_dataset=_pairs(), null_penalty="all")
    with pytest.raises(ValueError, match="lambda_amp"):
        AuxDPOTrainer(_model(0), _args(tmp_path), train_dataset=_pairs(), lambda_amp=-1.0)
    with pytest.raises(ValueError, match="train_dataset"):
        AuxDPOTrainer(_model(0), _args(tmp_path))
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model(0), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="separate `ref_model`"):
        AuxDPOTrainer(lora, _args(tmp_path), train_dataset=_pairs(), null_penalty="params")


# ----------------------------------------------------------------------------------------------- DRDO oracle stage


def test_drdo_oracle_stage_trains_annotates_and_feeds_the_student(tmp_path):
    model = _model(2)
    oracle0 = copy.deepcopy(model)
    trainer = DRDOOracleTrainer(model, _args(tmp_path), train_dataset=_pairs())
    assert trainer.a == 0.01 and trainer.ref_model is None
    head0 = copy.deepcopy(trainer.reward_head)
    records = _train(trainer)
    batch, loss = records[0]
    lp, _, hidden = _ref_logps(oracle0, batch)  # hidden state OF each last response token
    r = head0.double()(hidden.double()).reshape(-1)
    b = lp.numel() // 2
    _close(loss, drdo_oracle_loss(r[:b], r[b:], lp[:b], a=0.01)[0])
    assert not torch.equal(trainer.reward_head.weight.detach(), head0.weight.detach())

    trainer.model.train()
    data = trainer.annotate(_pairs(), batch_size=3)
    assert trainer.model.training and trainer.reward_head.training  # annotate ran in eval mode and restored the modes
    assert all({"oracle_chosen", "oracle_rejected"} <= set(ex) for ex in data)
    batch = trainer.data_collator(_pairs())
    _, _, hidden = _ref_logps(trainer.model, batch)
    with torch.no_grad():
        want = trainer.reward_head(hidden.float()).reshape(-1)
    got = torch.tensor([ex["oracle_chosen"] for ex in data] + [ex["oracle_rejected"] for ex in data])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    student = OracleRewardTrainer(_model(0), _args(tmp_path, max_steps=1), train_dataset=data)
    student.train()
    assert student.state.global_step == 1


def test_annotate_datasets_dataset_and_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    from fastpref.integrations.transformers import is_patched

    model = _model(0)
    head = torch.nn.Linear(D, 1)
    ds = datasets.Dataset.from_list(_pairs(5))
    out = annotate_oracle_rewards(model, head, ds, batch_size=2, backend="torch")
    assert is_patched(model) and out.num_rows == 5 and {"oracle_chosen", "oracle_rejected"} <= set(out.column_names)
    listed = annotate_oracle_rewards(model, head, _pairs(5), batch_size=5)
    torch.testing.assert_close(torch.tensor(out["oracle_chosen"]), torch.tensor([e["oracle_chosen"] for e in listed]))
    with pytest.raises(ValueError, match="batch_size"):
        annotate_oracle_rewards(model, head, _pairs(2), batch_size=0)
    with pytest.raises(TypeError, match="dataset"):
        annotate_oracle_rewards(model, head, 3)
    with pytest.raises(ValueError, match="`a`"):
        DRDOOracleTrainer(_model(0), _args(tmp_path), train_dataset=_pairs(), a=2.0)


# --------------------------------------------------------------------------------------------------- defaults


def test_scalar_feedback_trainer_defaults_are_the_seeds():
    params = inspect.signature(ScalarFeedbackTrainer.__init__).parameters
    assert params["log_z0"].default == 50.0 and params["beta"].default == 0.1  # DRO: the seed's setting
    assert params["eta"].default is None and params["alpha"].default is None  # PRO-S: 1/(K+1), lam/(eta(1-eta))
    assert params["lam"].default == 2.0
    oracle = inspect.signature(DRDOOracleTrainer.__init__).parameters
    assert oracle["a"].default == 0.01
    aux = inspect.signature(AuxDPOTrainer.__init__).parameters
    assert aux["delta_learning_rate"].default == 5e-3 and aux["cap"].default == 1.0
    assert aux["init_std"].default == 1e-3 and aux["lambda_amp"].default == 0.01
