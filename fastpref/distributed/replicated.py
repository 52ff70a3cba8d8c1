"""Parameters a trainer owns outside the model (AuxDPO's offsets ``delta``, DRDO's reward head) across processes.

They are replicated: every rank holds all of them (they are small: ``2 x examples`` floats, ``D + 1`` weights) and
updates them identically. Their gradient is produced by each rank's own batch, so before every optimizer step it is
averaged over the data-parallel ranks, exactly as DDP, FSDP and ZeRO average the model's (one all-reduce of all of
them, flattened), and cleared after it. When DeepSpeed or FSDP owns the model's optimizer (DeepSpeed wraps it in its
ZeRO optimizer; accelerate's FSDP2 maps every optimizer parameter to a model parameter), they get an optimizer of
their own, of the
Trainer's class and settings (``TrainingArguments.optim``, its learning rate and betas; no weight decay) and
the Trainer's learning-rate schedule, stepped at the same points as the model's.
"""

from __future__ import annotations

import warnings

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from transformers import TrainerCallback


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params: Sequence[torch.Tensor], group=None) -> bool:
    """``p.grad`` := mean over the ranks of ``group`` (all of them, in one all-reduce). A parameter without a
    gradient on some rank counts as zero there; when some rank has no gradient for any of them (its step was
    dropped, e.g. by :class:`fastpref.integrations._step_guard.NonFiniteStepGuard`) or the mean is not finite, every
    rank drops them all (``grad = None``) and False is returned: the same decision on every rank."""
    if not params:
        return True
    size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    grads = [p.grad for p in params]
    if size == 1:
        present = [g for g in grads if g is not None]
        usable = bool(present) and all(bool(torch.isfinite(g).all()) for g in present)
    else:
        dense = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        none = float(all(g is None for g in grads))
        marker = dense[0].new_full((1,), none, dtype=torch.float32)  # 1: this rank has no gradient at all
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in dense] + [marker])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        usable = bool(flat[-1] == 0) and bool(torch.isfinite(flat).all())
        flat /= size
        offset = 0
        for p, g in zip(params, dense):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
    if not usable:
        for p in params:
            p.grad = None
    return usable


def broadcast_from_first(params: Sequence[torch.Tensor], group=None) -> None:
    """Every rank's ``params`` := the first rank's (a random initialization drawn on each rank may differ)."""
    if world_size() == 1:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src, group=group)


class ReplicatedParameters(TrainerCallback):
    """A ``transformers.TrainerCallback`` that keeps trainer-owned parameters in step on every rank (module
    docstring): before each optimizer step their gradients are averaged over the ranks; after it they are cleared
    (the Trainer clears only the model's). ``param_groups()`` gives their optimizer groups; with ``own_optimizer``
    (DeepSpeed / FSDP) this callback builds an optimizer of the Trainer's class and settings over those groups and
    steps it, with the Trainer's learning-rate schedule (held back after a step the Trainer skipped, as
    ``step_skipped()`` reports); otherwise the groups are in the Trainer's optimizer."""

    def __init__(self, params: Sequence[torch.nn.Parameter], param_groups: Callable[[], list], *, own_optimizer: bool,
                 step_skipped: Optional[Callable[[], bool]] = None):
        self.params = [p for p in params if p.requires_grad]
        self.param_groups = param_groups
        self.own_optimizer = own_optimizer
        self.step_skipped = step_skipped
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None

    def on_train_begin(self, args, state, control, **kwargs):
        broadcast_from_first(self.params)  # replicated: every rank starts from rank 0's values
        if not self.own_optimizer or self.optimizer is not None or not self.params:
            return
        from transformers import Trainer
        from transformers.optimization import get_scheduler

        cls, settings = Trainer.get_optimizer_cls_and_kwargs(args)
        self.optimizer = cls(self.param_groups(), **settings)
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(state.max_steps),
                                       num_training_steps=state.max_steps,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        usable = average_gradients(self.params)
        if self.optimizer is not None and usable:  # a dropped step (non-finite gradients) moves none of them
            self.optimizer.step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # the schedule advances when the Trainer's does: not after a step the Trainer's optimizer skipped
        # (``step_skipped``: accelerate's ``optimizer_step_was_skipped``, set by GradScaler or NonFiniteStepGuard)
        skipped = self.step_skipped is not None and self.step_skipped()
        if self.scheduler is not None and not skipped:
            with warnings.catch_warnings():  # after a step where only these parameters were dropped, torch reports
                # "lr_scheduler.step() before optimizer.step()" when it is the first one
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.scheduler.step()
        for p in self.params:
            p.grad = None
