"""What fastpref's trainers do with a training step that overflows: skip it, as a gradient scaler would.

Pure fp16 training (weights and activations in float16, no ``torch.amp.GradScaler``) can overflow: a hidden
state or a gradient becomes inf/NaN. Stock ``transformers``/TRL trainers then apply the NaN update and carry on
with NaN parameters; the fused head, which checks its inputs, raised ``hidden holds non-finite values`` at that step.
Neither is what a mixed-precision user expects. With ``fp16=True`` the Trainer's ``GradScaler`` skips any step
whose gradients are not finite (and lowers its loss scale), and training goes on. fastpref's trainers do the
same whatever the precision:

* a **forward** that meets non-finite values (:class:`fastpref.NonFiniteError` from the fused head: an inf/NaN
  hidden state, or logits past float32's range) in training gives a NaN loss that reaches every trainable
  parameter, so the step's gradients are NaN, on every process (DDP all-reduces them);
* before each optimizer step, **gradients** that are not all finite make :class:`NonFiniteStepGuard` drop them
  all (``grad = None``: torch optimizers then leave every parameter and its state untouched), log a warning and
  count the step in the logged metric ``skipped_steps``. With gradient accumulation the whole step is skipped,
  as GradScaler does;
* when the **parameters themselves** are no longer finite (an update overflowed float16 although its
  gradients were finite), skipping cannot help: the forward's failure becomes a ``RuntimeError`` naming the
  parameter and saying what to change.

With a ``GradScaler`` (``fp16=True``) the scaler keeps doing the skipping (and its loss scale); under DeepSpeed,
DeepSpeed's overflow handling does. A skipped step does not advance the learning-rate schedule, as with GradScaler:
the guard reports the skip through accelerate's ``AcceleratedOptimizer.step_was_skipped`` (the flag the Trainer
reads after each step). Evaluation does not skip: a non-finite forward raises there.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import TrainerCallback

from .._validation import NonFiniteError

__all__ = ["NonFiniteError", "NonFiniteStepGuard", "SKIPPED_STEPS"]

SKIPPED_STEPS = "skipped_steps"
logger = logging.getLogger("fastpref")


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors]
    if not flags:
        return True
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())  # one synchronization


class NonFiniteStepGuard(TrainerCallback):
    """Skips optimizer steps whose gradients are not finite (see the module docstring); one per trainer.

    ``trainer`` needs ``optimizer``, ``accelerator``, ``state`` and a ``_metrics`` (or ``_stored_metrics``) dict of
    per-mode lists (the fastpref trainers and TRL's have one): ``_metrics["train"]["skipped_steps"]`` holds the
    count once a step was skipped, so every later log shows it.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.skipped = 0

    # ------------------------------------------------------------------------------------------ the forward

    def loss_or_skip(self, model: nn.Module, compute: Callable[[], Any], *, training: bool, skipped: Any = None):
        """``compute()``; when it raises :class:`NonFiniteError` in training, :meth:`overflow_loss` instead (or
        ``(overflow_loss, *skipped)`` when ``skipped`` is a tuple of what else ``compute`` would have returned).
        Outside training the error propagates: evaluation does not skip."""
        try:
            return compute()
        except NonFiniteError as exc:
            if not training:
                raise
            loss = self.overflow_loss(model, exc)
            return loss if skipped is None else (loss, *skipped)

    def overflow_loss(self, model: nn.Module, error: NonFiniteError) -> torch.Tensor:
        """The training loss to return in place of one whose forward raised ``error``: NaN, with a NaN gradient for
        every trainable parameter of ``model`` (the step is then skipped). Raises ``RuntimeError`` when the
        parameters are no longer finite."""
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not _all_finite(p.detach() for _, p in params):
            bad = next(name for name, p in params if not bool(torch.isfinite(p.detach()).all()))
            raise RuntimeError(
                f"{type(self.trainer).__name__}: the parameter `{bad}` holds non-finite values at step "
                f"{self.trainer.state.global_step}: training has diverged (an optimizer update made a "
                f"{params[0][1].dtype} weight non-finite). Train in mixed precision instead of a half-precision model "
                "(load it in "
                "float32 and set bf16=True, or fp16=True, which keeps float32 weights and scales the loss), or "
                f"lower the learning rate. ({error})") from error
        logger.warning("%s: step %d: %s; the step's optimizer update will be skipped",
                       type(self.trainer).__name__, self.trainer.state.global_step + 1, error)
        device = params[0][1].device if params else torch.device("cpu")
        loss = torch.full((), float("nan"), device=device, requires_grad=not params)
        for _, p in params:
            loss = loss + (p.sum() * float("nan")).float().to(device)
        return loss

    # ------------------------------------------------------------------------------------------ the step

    def _skipping_is_ours(self) -> bool:
        accelerator = self.trainer.accelerator
        if getattr(accelerator, "scaler", None) is not None:  # GradScaler (fp16=True) skips by itself
            return False
        return not getattr(self.trainer, "is_deepspeed_enabled", False)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        optimizer = self.trainer.optimizer
        if optimizer is None or not self._skipping_is_ours():
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        skip = not _all_finite(grads)
        # accelerate's flag for a step its GradScaler skipped (never set without a scaler): the Trainer then holds
        # its learning-rate schedule back, as it does for GradScaler's skips
        if hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = skip
        if not skip:
            return
        for p in params:
            p.grad = None
        self.skipped += 1
        logger.warning("%s: step %d: non-finite gradients; the optimizer step is skipped (%d skipped so far)",
                       type(self.trainer).__name__, state.global_step + 1, self.skipped)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.skipped:
            # TRL's DPO/KTO trainers and fastpref's keep ``_metrics``; TRL's CPO/ORPO keep ``_stored_metrics``
            metrics = getattr(self.trainer, "_metrics", None)
            if metrics is None:
                metrics = self.trainer._stored_metrics
            metrics["train"][SKIPPED_STEPS] = [float(self.skipped)]
