"""Parameters a trainer owns outside the model (AuxDPO's offsets ``delta``, DRDO's reward head) across processes.

They are replicated: every rank holds all of them (they are small: ``2 x examples`` floats, ``D + 1`` weights) and
updates them identically. Their gradient is produced by each rank's own batch, so before every optimizer step it is
averaged over the data-parallel ranks, exactly as DDP, FSDP and ZeRO average the model's (one all-reduce of all of
them, flattened). When DeepSpeed or FSDP2 owns the model's optimizer (DeepSpeed wraps it in its ZeRO optimizer;
accelerate's FSDP2 maps every optimizer parameter to a model parameter), they get an optimizer of their own, of the
Trainer's class and settings (``TrainingArguments.optim``, its learning rate and betas; no weight decay) and
the Trainer's learning-rate schedule, stepped at the same points as the model's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from transformers import TrainerCallback


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params: Sequence[torch.Tensor], group=None) -> None:
    """``p.grad`` := mean over the ranks of ``group`` (all of them, in one all-reduce); a missing gradient counts as
    zero (every rank calls this with the same parameters, whatever its batch touched)."""
    size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


class ReplicatedParameters(TrainerCallback):
    """A ``transformers.TrainerCallback`` that keeps trainer-owned parameters in step on every rank (module
    docstring). ``own_optimizer``: build and step their own optimizer (DeepSpeed / FSDP2); otherwise they are in the
    Trainer's optimizer and only their gradients are averaged here."""

    def __init__(self, params: Sequence[torch.nn.Parameter], *, own_optimizer: bool):
        self.params = [p for p in params if p.requires_grad]
        self.own_optimizer = own_optimizer
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.own_optimizer or self.optimizer is not None or not self.params:
            return
        from transformers import Trainer
        from transformers.optimization import get_scheduler

        cls, settings = Trainer.get_optimizer_cls_and_kwargs(args)
        self.optimizer = cls([{"params": self.params, "weight_decay": 0.0}], **settings)
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(state.max_steps),
                                       num_training_steps=state.max_steps,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        average_gradients(self.params)
        if self.optimizer is not None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
