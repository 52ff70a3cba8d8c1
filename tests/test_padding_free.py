"""Padding-free batches (``padding_free=True``): packed rows with restarting ``position_ids`` give the same losses,
gradients and trained parameters as padded batches, in every trainer (feedback trainers and the TRL drop-ins).

transformers 5 builds the block-diagonal attention mask from the restarting positions (eager and SDPA attention, on
the CPU); the fused head scores the packed rows through its varlen path (``cu_seqlens``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpref.trainers import (  # noqa: E402
    AuxDPOTrainer,
    BinaryFeedbackTrainer,
    DRDOOracleTrainer,
    OracleRewardTrainer,
    ScalarFeedbackTrainer,
    TYPOTrainer,
)
from fastpref.trainers.collators import BinaryFeedbackCollator, PackingCollator, pack_batch  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_trainer import _args, _binary_data, _model, _pair_data, _scalar_data, _typo_data  # noqa: E402

LOSS_TOL, GRAD_TOL = 1e-5, 1e-5


class _Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _run(cls, data, tmp_path, padding_free, *, model_kwargs=None, prepare=None, **kwargs):
    recorder = _Recorder()
    # SGD: Adam's m / sqrt(v) turns rounding-level differences of near-zero gradients into full steps
    trainer = cls(_model(0), _args(tmp_path / str(padding_free), optim="sgd"), train_dataset=data,
                  padding_free=padding_free,
                  callbacks=[recorder], **kwargs)
    if prepare is not None:
        prepare(trainer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer, losses, recorder.grads, params


def _assert_same(packed, padded):
    _, p_losses, p_grads, p_params = packed
    _, q_losses, q_grads, q_params = padded
    assert len(p_losses) == len(q_losses) == 2
    for a, b in zip(p_losses, q_losses):
        assert abs(a - b) <= LOSS_TOL * max(1.0, abs(b)), (p_losses, q_losses)
    assert len(p_grads) == len(q_grads) == 2
    for pg, qg in zip(p_grads, q_grads):
        assert pg.keys() == qg.keys()
        for name in qg:
            if qg[name].norm() > 1e-12:
                assert rel_err(pg[name], qg[name]) < GRAD_TOL, (name, rel_err(pg[name], qg[name]))
    for name in q_params:
        torch.testing.assert_close(p_params[name], q_params[name], rtol=1e-5, atol=1e-6, msg=name)


def test_pack_batch_hand_checked():
    examples = [{"prompt_input_ids": [5, 6], "completion_input_ids": [7, 8, 9], "label": True},
                {"prompt_input_ids": [5], "completion_input_ids": [10], "label": 0}]
    out = PackingCollator(BinaryFeedbackCollator(pad_token_id=0, kl=True), prefixes=("", "KL_"))(examples)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 10]]
    assert out["segment_ids"].tolist() == [[1, 1, 2, 2, 2, 1, 2]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert out["attention_mask"].tolist() == [[1] * 7]
    assert out["label"].tolist() == [True, False]  # per-sequence columns pass through
    assert out["KL_input_ids"].tolist() == [[5, 6, 10, 5, 7, 8, 9]]
    assert out["KL_position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="no token"):
        pack_batch({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0],
                                                                                                   [0, 0, 0]])})
    with pytest.raises(ValueError, match="position_ids"):
        pack_batch(out)


@pytest.mark.parametrize("cls, data, kwargs", [
    (BinaryFeedbackTrainer, _binary_data, {"method": "pro"}),
    (BinaryFeedbackTrainer, _binary_data, {"method": "kto"}),  # KL rows packed too
    (ScalarFeedbackTrainer, _scalar_data, {"method": "pro"}),
    (ScalarFeedbackTrainer, _scalar_data, {"method": "dro"}),  # prompt segment
    (TYPOTrainer, _typo_data, {}),
    (OracleRewardTrainer, _pair_data, {"method": "drdo"}),  # last response token's hidden state
    (OracleRewardTrainer, lambda: _pair_data(8, ("reward_chosen", "reward_rejected")), {"method": "edpo"}),
    (DRDOOracleTrainer, _pair_data, {}),
], ids=["pro-binary", "kto", "pro-scalar", "dro", "typo", "drdo", "edpo", "drdo-oracle"])
def test_feedback_trainers_padding_free_equals_padded(cls, data, kwargs, tmp_path):
    padded = _run(cls, data(), tmp_path, False, **kwargs)
    packed = _run(cls, data(), tmp_path, True, **kwargs)
    _assert_same(packed, padded)
    batch = next(iter(packed[0].get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch


@pytest.mark.parametrize("null_penalty", ["head", "params"])
def test_auxdpo_padding_free_equals_padded(null_penalty, tmp_path):
    from test_trainer_auxdpo_drdo import _pairs

    raw = []

    def same_offsets(trainer):  # the offsets' random initialization, shared
        if not raw:
            raw.append(trainer.offsets.delta_raw.detach().clone())
        with torch.no_grad():
            trainer.offsets.delta_raw.copy_(raw[0])

    padded = _run(AuxDPOTrainer, _pairs(), tmp_path, False, ref_model=_model(1), null_penalty=null_penalty,
                  init_std=0.3, prepare=same_offsets)
    packed = _run(AuxDPOTrainer, _pairs(), tmp_path, True, ref_model=_model(1), null_penalty=null_penalty,
                  init_std=0.3, prepare=same_offsets)
    _assert_same(packed, padded)

