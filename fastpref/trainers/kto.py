"""TRL drop-in: :class:`FastPrefKTOTrainer`, a ``trl.KTOTrainer`` whose log-probs never build logits.

::

    from trl import KTOConfig
    from fastpref.trainers import FastPrefKTOTrainer      # was: from trl import KTOTrainer

    trainer = FastPrefKTOTrainer(model, args=KTOConfig(...), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Same constructor and the stock ``KTOConfig`` (TRL 1.16), plus keyword-only ``fastpref_backend`` (``"auto"``,
``"triton"``, ``"torch"``) and ``padding_free`` (pack every batch, the KL rows too, into one row:
:class:`fastpref.trainers.collators.PackingCollator`; KTOConfig has no such field). The policy and the reference are
patched with :func:`fastpref.integrations.transformers.patch`; each forward (the completions, and TRL's mismatched
KL completions) is one fused pass with ``logps_only=True``: no ``tokens x vocab`` logits.

The loss is TRL's (:func:`fastpref.losses.functional.kto_loss`: ``loss_type`` ``"kto"`` with TRL's KL reference point,
``mean(logp_KL - ref_logp_KL)`` over the batch's mismatched rows, gathered over processes and clamped at 0, or
``"apo_zero_unpaired"``; ``desirable_weight`` / ``undesirable_weight``), and so are the logged metrics: ``kl``,
``entropy`` (over every completion token), ``num_tokens``, ``logits/chosen`` / ``logits/rejected`` (mean logit over
the desirable / undesirable completion tokens, from the fused forward's statistics), ``rewards/*``, ``logps/*``,
``aux_loss`` (MoE). The reference: ``ref_model``, a PEFT policy's adapter-disabled base (TRL's ``"ref"`` adapter when
present), or precomputed (``precompute_ref_log_probs=True``: TRL's pass calls :meth:`compute_ref_log_probs`); with
``ref_model=None`` and a model instance the reference is a frozen copy of the policy as passed (TRL 1.16 would reload
it from ``config._name_or_path``, which fails for a model built from a config). A training step whose forward or
gradients are not finite is skipped (:mod:`fastpref.integrations._step_guard`), as in :class:`FastPrefDPOTrainer`.

Refused at construction: vision datasets (TRL prepares them on the fly with its vision collator, whose image-token
layout the patch has not been checked against).
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from torch import nn

try:
    from trl import KTOConfig, KTOTrainer
except ImportError as exc:  # pragma: no cover - trl is an optional dependency
    from .._hints import install_hint

    raise ImportError(f"fastpref.trainers.kto needs TRL: {install_hint('trl')}") from exc

from ..integrations._hf_utils import find_causal_lm, is_peft_model, reference_adapter
from ..integrations._step_guard import NonFiniteStepGuard
from ..integrations._trl_utils import model_inputs_without_mask, no_gradient_checkpointing
from ..integrations.transformers import _STATE, patch
from ..logprobs import BACKENDS
from ..losses.kto import kto_loss
from .collators import PackingCollator
from .dpo import _router_aux_loss

__all__ = ["FastPrefKTOTrainer"]

_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_position_ids",
                   "KL_token_type_ids", "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}


class FastPrefKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` computing every per-sequence log-prob with fastpref's fused head (module docstring).

    Args:
        *args, **kwargs: exactly ``KTOTrainer``'s (``model``, ``ref_model``, ``args`` (a stock ``KTOConfig``), ...).
        fastpref_backend: ``"auto"``, ``"triton"`` or ``"torch"`` (:func:`fastpref.sequence_logprobs`).
        padding_free: pack every batch into one row (``position_ids`` restarting per sequence).
    """

    def __init__(self, *args, fastpref_backend: str = "auto", padding_free: bool = False, **kwargs):
        if fastpref_backend not in BACKENDS:
            raise ValueError(f"FastPrefKTOTrainer: `fastpref_backend` must be one of {BACKENDS}, "
                             f"got {fastpref_backend!r}")
        if not isinstance(padding_free, bool):
            raise TypeError(f"FastPrefKTOTrainer: `padding_free` must be a bool, got {type(padding_free).__name__}")
        self.fastpref_backend = fastpref_backend
        bound = inspect.signature(KTOTrainer.__init__).bind(self, *args, **kwargs)
        params = bound.arguments
        config, model = params.get("args"), params.get("model")
        if config is not None and not isinstance(config, KTOConfig):
            raise TypeError(f"FastPrefKTOTrainer: `args` must be a trl.KTOConfig, got {type(config).__name__}")
        precompute = bool(config is not None and config.precompute_ref_log_probs)
        uses_peft = params.get("peft_config") is not None or (isinstance(model, nn.Module) and is_peft_model(model))
        if params.get("ref_model") is None and isinstance(model, nn.Module) and not uses_peft and not precompute:
            reference = copy.deepcopy(model)  # a frozen copy of the policy as passed (module docstring)
            reference.requires_grad_(False)
            params["ref_model"] = reference.eval()
        super().__init__(*bound.args[1:], **bound.kwargs)
        if getattr(self, "_is_vision_dataset", False):
            raise NotImplementedError("FastPrefKTOTrainer: vision datasets are not supported")
        for name in ("_metrics", "ref_model", "calculate_KL", "precompute_ref_logps"):
            if not hasattr(self, name):
                raise NotImplementedError(f"FastPrefKTOTrainer: this TRL's KTOTrainer has no `{name}`; fastpref "
                                          "supports the TRL 1.x KTOTrainer layout (tested with 1.16)")
        self._fastpref_patch(self.model)
        if self.ref_model is not None:
            self._fastpref_patch(self.ref_model)
        self.padding_free = padding_free
        if padding_free:
            self.data_collator = PackingCollator(self.data_collator, prefixes=("", "KL_"))
        self._fastpref_guard = NonFiniteStepGuard(self)
        self.add_callback(self._fastpref_guard)

    # ------------------------------------------------------------------------------------------ forwards

    def _fastpref_patch(self, model: nn.Module) -> None:
        lm = find_causal_lm(self.accelerator.unwrap_model(model))
        state = lm.__dict__.get(_STATE)
        if state is None or state.backend != self.fastpref_backend or state.reduction != "sum":
            patch(model, backend=self.fastpref_backend)

    def _forward(self, model: nn.Module, batch: dict, prefix: str = "", **extra):
        """One fused forward of the ``{prefix}`` rows (the completions, or ``KL_`` the mismatched ones)."""
        self._fastpref_patch(model)
        kwargs = dict(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"],
                      completion_mask=batch[prefix + "completion_mask"], use_cache=False, logps_only=True, **extra)
        if prefix + "position_ids" in batch:  # padding-free
            kwargs["position_ids"] = batch[prefix + "position_ids"]
        with self.accelerator.autocast():
            return model(**kwargs)

    @contextlib.contextmanager
    def _reference(self):
        """The reference model (under no_grad, without gradient checkpointing): ``ref_model``, else the PEFT
        policy with its adapter disabled (TRL's ``"ref"`` adapter when there is one)."""
        if self.ref_model is not None:
            model, adapter = self.ref_model, contextlib.nullcontext()
        else:
            model = self.model
            unwrapped = self.accelerator.unwrap_model(model)
            if not is_peft_model(unwrapped):
                raise RuntimeError("FastPrefKTOTrainer: no reference model (ref_model, PEFT or precomputed)")
            adapter = reference_adapter(unwrapped)
        with torch.no_grad(), no_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
            yield model

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL's precompute pass, which passes ``ref_model`` or the policy):
        ``(completion, KL completion or None)``."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        adapter = (reference_adapter(unwrapped) if self.ref_model is None and is_peft_model(unwrapped)
                   else contextlib.nullcontext())
        with torch.no_grad(), no_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
            logps = self._forward(model, inputs).logps.response
            kl = self._forward(model, inputs, "KL_").logps.response if self.calculate_KL else None
        return logps, kl

    # ------------------------------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's KTO loss from fused log-probs; an overflowing training forward skips its step."""
        return self._fastpref_guard.loss_or_skip(model, lambda: self._fastpref_loss(model, inputs, return_outputs),
                                                 training=self.model.training and not return_outputs)

    def _fastpref_loss(self, model, inputs, return_outputs=False):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        labels = torch.as_tensor(batch["label"], dtype=torch.bool, device=device)
        gather = self.accelerator.gather_for_metrics

        kl_logps = None
        if self.calculate_KL:
            with torch.no_grad():
                kl_logps = self._forward(model, batch, "KL_").logps.response
        extra = {"return_stats": True}
        if self.aux_loss_enabled:
            extra["output_router_logits"] = True
        outputs = self._forward(model, batch, **extra)
        pol = outputs.logps
        logps = pol.response

        if self.precompute_ref_logps:
            ref_logps = batch["ref_logps"].to(logps.device)
            ref_kl_logps = batch["ref_KL_logps"] if self.calculate_KL else None
        else:
            with self._reference() as reference:
                ref_kl_logps = self._forward(reference, batch, "KL_").logps.response if self.calculate_KL else None
                ref_logps = self._forward(reference, batch).logps.response.to(logps.device)

        kl = torch.zeros(1, device=logps.device)
        if self.calculate_KL:  # TRL: the batch mean, averaged over processes, clamped at 0
            kl = (kl_logps.float() - ref_kl_logps.to(kl_logps.device).float()).mean().detach()
            kl = gather(kl).mean().clamp(min=0)
        loss, _ = kto_loss(logps, ref_logps, labels, kl=kl.reshape(()) if self.calculate_KL else None,
                           beta=self.beta, desirable_weight=self.desirable_weight,
                           undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)
        if self.aux_loss_enabled:
            aux_loss = _router_aux_loss(self.accelerator.unwrap_model(model), outputs, batch.get("attention_mask"))
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(gather(aux_loss.detach()).mean().item())
        self._log_metrics(mode, batch, pol, logps, ref_logps, labels, kl)

        if return_outputs:  # TRL's deprecated eval path: logits for compute_metrics, recomputed normally
            with torch.no_grad():
                outputs = model(**model_inputs_without_mask(batch, set(batch) - _NON_MODEL_KEYS))
            return loss, outputs
        return loss

    def _log_metrics(self, mode, batch, pol, logps, ref_logps, labels, kl) -> None:
        """TRL 1.16's KTO metrics, same names and definitions (``KTOTrainer._compute_loss``)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["kl"].append(kl.item())

        def total(x):
            return gather(x.detach().double().reshape(1)).sum().item()

        stats = pol.stats
        tokens = pol.n_response.detach().double()
        entropy_tokens = total(tokens.sum())
        metrics["entropy"].append(total(stats.response.entropy.sum()) / entropy_tokens if entropy_tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(total(batch["attention_mask"].sum())) // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]
        mean_logit = stats.response.mean_logit.detach().double()
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            count = total(tokens[rows].sum())
            if count > 0:
                metrics[f"logits/{name}"].append(total(mean_logit[rows].sum()) / count)
        rewards = self.beta * (logps.detach().float() - ref_logps.detach().float())
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            num = total(rows.sum())
            if num > 0:
                metrics[f"rewards/{name}"].append(total(rewards[rows].nansum()) / num)
                metrics[f"logps/{name}"].append(total(logps.detach().float()[rows].nansum()) / num)
        if total(labels.sum()) > 0 and total((~labels).sum()) > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
