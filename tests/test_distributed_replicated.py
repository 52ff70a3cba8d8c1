"""Trainer-owned parameters (AuxDPO's offsets, DRDO's reward head) in one process: the callback that keeps them
in step across ranks also clears their gradients after each step (the Trainer clears only the model's), drops a
non-finite step, and under DeepSpeed/FSDP steps them with their own optimizer. Several processes:
tests/test_distributed_trl.py."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from fastpref.distributed.replicated import ReplicatedParameters, average_gradients


class _State:
    max_steps = 4


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                             report_to=[], use_cpu=True, **kw)


def test_gradients_are_cleared_after_each_step(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    cb = ReplicatedParameters([p], lambda: [{"params": [p]}], own_optimizer=False)
    (p * 2).sum().backward()
    cb.on_pre_optimizer_step(_args(tmp_path), _State(), None)
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0))  # one process: the mean is the gradient itself
    cb.on_optimizer_step(_args(tmp_path), _State(), None)
    assert p.grad is None  # the next step does not add this step's gradient again


def test_own_optimizer_uses_the_groups_and_the_trainer_settings(tmp_path):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    cb = ReplicatedParameters([a, b], lambda: [{"params": [a], "lr": 0.1}, {"params": [b]}], own_optimizer=True)
    args = _args(tmp_path)
    cb.on_train_begin(args, _State(), None)
    assert isinstance(cb.optimizer, torch.optim.SGD)
    (a.sum() + 2 * b.sum()).backward()
    cb.on_pre_optimizer_step(args, _State(), None)
    torch.testing.assert_close(a.detach(), torch.full((2,), -0.1))  # its group's learning rate
    torch.testing.assert_close(b.detach(), torch.full((1,), -1.0))  # the Trainer's (0.5)


def test_non_finite_gradients_drop_the_step(tmp_path):
    a = torch.nn.Parameter(torch.zeros(2))
    cb = ReplicatedParameters([a], lambda: [{"params": [a]}], own_optimizer=True)
    cb.on_train_begin(_args(tmp_path), _State(), None)
    a.grad = torch.tensor([1.0, float("nan")])
    cb.on_pre_optimizer_step(_args(tmp_path), _State(), None)
    assert a.grad is None and torch.equal(a.detach(), torch.zeros(2))
    assert average_gradients([]) is True


def test_own_schedule_holds_back_after_a_step_the_trainer_skipped(tmp_path):
    a = torch.nn.Parameter(torch.zeros(2))
    skipped = [False]
    cb = ReplicatedParameters([a], lambda: [{"params": [a]}], own_optimizer=True, step_skipped=lambda: skipped[0])
    args = _args(tmp_path)
    cb.on_train_begin(args, _State(), None)
    for skip in (False, True, False):
        skipped[0] = skip
        a.grad = torch.ones(2)
        cb.on_pre_optimizer_step(args, _State(), None)
        cb.on_optimizer_step(args, _State(), None)
    assert cb.scheduler.last_epoch == 2  # advanced with the Trainer's schedule: not after the skipped step
