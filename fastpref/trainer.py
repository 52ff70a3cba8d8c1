"""``transformers.Trainer`` classes for the feedback types TRL's DPO trainer cannot take.

=======================  ====================  ==================================  =========================  ==========
trainer                  ``method``            data (collator)                     loss (fastpref.losses)     reference
=======================  ====================  ==================================  =========================  ==========
BinaryFeedbackTrainer    ``"pro"`` (PRO-B)     one completion + ``label`` per row  ``pro_loss(binary)``       yes
                         ``"kto"`` (KTO)       (:class:`BinaryFeedbackCollator`)   ``kto_loss``               yes
ScalarFeedbackTrainer    ``"pro"`` (PRO-S)     one prompt + K completions +        ``pro_loss(scalar)``       yes
                         ``"dro"`` (DRO)       K rewards per row                   ``dro_loss``               yes
                                               (:class:`ScalarFeedbackCollator`)
TYPOTrainer              (TYPO)                pairs + ``unsup`` reference         ``typo_loss``              no
                                               samples (:class:`TYPOCollator`)
OracleRewardTrainer      ``"drdo"`` (DRDO)     pairs + ``oracle_chosen/rejected``  ``drdo_loss``              no
                         ``"edpo"`` (e-DPO)    pairs + ``reward_chosen/rejected``  ``distill_loss``           yes
                                               (:class:`PairwiseRewardCollator`)
=======================  ====================  ==================================  =========================  ==========

One trainer per data layout, with a ``method`` argument where two methods share the layout: the layout fixes the
collator and the batch checks, the method only the loss. Usage (see ``examples/``)::

    from fastpref.collators import tokenize_dataset
    from fastpref.trainer import BinaryFeedbackTrainer

    data = tokenize_dataset(rows, tokenizer)         # rows: {"prompt", "completion", "label"} (text)
    trainer = BinaryFeedbackTrainer(model, TrainingArguments(...), method="kto", train_dataset=data,
                                    processing_class=tokenizer)
    trainer.train()

What the base class :class:`FastPrefTrainer` does:

* **Patches** the policy with :func:`fastpref.integrations.transformers.patch` (in place; called without
  ``logps_only`` the model behaves as before, so saving and generation are unchanged). ``compute_loss`` calls it
  with ``logps_only=True`` and the batch's ``segment_ids``: per-sequence log-probs come from the fused head, no
  ``tokens x vocab`` logits tensor is built. The prompt segment is scored only by methods that use it (DRO).
* **Reference model** (methods marked "yes"): ``ref_model`` if given (frozen: ``requires_grad_(False)``, eval mode,
  patched, moved to the training device); else, for a PEFT ``PeftModel`` policy, the same model with its adapters
  disabled (``disable_adapter()``); else a frozen deep copy of the policy made before training (as TRL). Reference
  log-probs are computed under ``torch.no_grad()`` through the same fused path.
* **Metrics** with TRL's names (``rewards/chosen``, ``logps/rejected``, ``kl``, ...; whatever the functional loss
  returns) are accumulated per step in ``self._metrics[mode]`` and averaged into the logs in :meth:`log` (over the
  steps since the last log and over processes), eval ones prefixed ``eval_``, as TRL's trainers do.
* **Columns**: ``args.remove_unused_columns`` is set to False (the model's ``forward`` does not name the layout's
  columns, so the stock Trainer would drop them); ``model_accepts_loss_kwargs`` is False (the loss is a batch mean,
  which the Trainer divides by the gradient-accumulation steps). The first train/eval example is checked against
  the layout at construction, so missing columns fail before training starts.
* ``disable_dropout=True`` (TRL's default) sets every ``nn.Dropout`` of the policy and reference to ``p = 0``.
* **Overflow** (e.g. pure fp16 training): a training step whose forward meets non-finite values, or whose gradients
  are not finite, is skipped (no parameter or optimizer state changes), logged as a warning and counted in the
  metric ``skipped_steps``, as a GradScaler would; parameters that are no longer finite raise a ``RuntimeError``
  naming one (:mod:`fastpref.integrations._step_guard`).

Not covered: DeepSpeed/FSDP preparation of a separate ``ref_model`` (it is moved to the device, not wrapped),
precomputed reference log-probs, packed (padding-free) batches.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import nn
try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
    from ._hints import install_hint

    raise ImportError(f"fastpref.trainer needs transformers: {install_hint('hf')}") from exc

from ._method_names import where
from .collators import BinaryFeedbackCollator, PairwiseRewardCollator, ScalarFeedbackCollator, TYPOCollator
from .integrations._hf_utils import find_causal_lm, is_peft_model, reference_adapter, resolve_head
from .integrations._step_guard import NonFiniteError, NonFiniteStepGuard
from .integrations.transformers import patch
from .losses import distill_loss, drdo_loss, dro_loss, kto_loss, pro_loss, typo_loss
from .losses.kto import KTO_LOSS_TYPES
from .losses.pro import DEFAULT_ETA, DEFAULT_LAM, PRO_HYPER_RESPONSE

__all__ = [
    "BinaryFeedbackTrainer",
    "FastPrefTrainer",
    "OracleRewardTrainer",
    "REWARD_HEAD_NAME",
    "ScalarFeedbackTrainer",
    "TYPOTrainer",
]

REWARD_HEAD_NAME = "reward_head.pt"
_RESPONSE = 2


def _choice(owner: str, name: str, value, choices) -> str:
    if value not in choices:
        hint = where(value) if name == "method" else None
        raise ValueError(f"{owner}: `{name}` must be one of {tuple(choices)}, got {value!r}"
                         + (f"; {hint}" if hint else ""))
    return value


class FastPrefTrainer(Trainer):
    """Base class: a ``transformers.Trainer`` whose loss is a fastpref functional loss of fused per-sequence
    log-probs (see the module docstring). Subclasses set :attr:`uses_reference`, :attr:`uses_prompt`,
    :attr:`required_columns`, build the default collator in :meth:`default_collator` and compute the loss in
    :meth:`loss_and_metrics`.

    Args:
        model: a ``*ForCausalLM`` (or a PEFT ``PeftModel`` around one); patched in place.
        args: ``transformers.TrainingArguments`` (default: ``output_dir="trainer_output"``).
        ref_model: the frozen reference model for methods that use one (see the module docstring); an error for
            methods that do not.
        data_collator: default: the layout's collator from :mod:`fastpref.collators`, padding with the tokenizer's
            (else the config's, else 0) pad token id.
        backend: :func:`fastpref.sequence_logprobs` backend (``"auto"``: triton on CUDA, else torch).
        disable_dropout: set the dropout modules' ``p`` to 0 (default True, as TRL).
        **kwargs: the other ``transformers.Trainer`` arguments (``callbacks``, ``optimizers``, ...).
    """

    uses_reference: bool = True
    uses_prompt: bool = False
    required_columns: tuple[str, ...] = ("input_ids", "attention_mask", "segment_ids")
    collator_hint: str = "fastpref.collators"

    def __init__(
        self,
        model: nn.Module,
        args: Optional[TrainingArguments] = None,
        *,
        ref_model: Optional[nn.Module] = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        backend: str = "auto",
        disable_dropout: bool = True,
        **kwargs,
    ):
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: `model` must be a torch module (a *ForCausalLM or a PeftModel), got "
                            f"{type(model).__name__}; load it first, e.g. AutoModelForCausalLM.from_pretrained(...)")
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        args.remove_unused_columns = False  # the layouts' columns are not arguments of the model's forward

        self.is_peft_policy = is_peft_model(model)
        if self.uses_reference:
            if ref_model is model:
                raise ValueError(f"{name}: `ref_model` must be a separate model (or None), not the policy itself")
            if ref_model is None and not self.is_peft_policy:
                ref_model = copy.deepcopy(model)  # TRL's default: a frozen copy of the initial policy
            if ref_model is not None:
                ref_model.requires_grad_(False)
                ref_model.eval()
        elif ref_model is not None:
            raise ValueError(f"{name}: {self.method_name} uses no reference model; do not pass `ref_model`")
        if disable_dropout:
            for m in (model, ref_model):
                if m is not None:
                    for module in m.modules():
                        if isinstance(module, nn.Dropout):
                            module.p = 0.0
        patch(model, backend=backend)
        if ref_model is not None:
            patch(ref_model, backend=backend)
        self.ref_model = ref_model

        if data_collator is None:
            data_collator = self.default_collator(self._pad_token_id(model, processing_class))
        self._check_first_example(data_collator, train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            for key, ds in eval_dataset.items():
                self._check_first_example(data_collator, ds, f"eval_dataset[{key!r}]")
        else:
            self._check_first_example(data_collator, eval_dataset, "eval_dataset")

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean: the Trainer scales it for accumulation
        self._fastpref_guard = NonFiniteStepGuard(self)  # overflowing steps are skipped, as a GradScaler would
        self.add_callback(self._fastpref_guard)
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list),
                                                                  "eval": defaultdict(list)}
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)

    # ----------------------------------------------------------------------------------------- subclass hooks

    @property
    def method_name(self) -> str:
        return type(self).__name__

    def default_collator(self, pad_token_id: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_and_metrics(self, model: nn.Module, inputs: dict[str, torch.Tensor]):  # pragma: no cover - abstract
        """Return ``(loss, metrics)`` for one collated batch (the functional loss's output)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _pad_token_id(model, processing_class) -> int:
        for source in (processing_class, getattr(model, "config", None)):
            for attr in ("pad_token_id", "eos_token_id"):
                value = getattr(source, attr, None) if source is not None else None
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    return value
        return 0

    def _check_first_example(self, collator, dataset, what: str) -> None:
        check = getattr(collator, "validate_example", None)
        if dataset is None or check is None:
            return
        try:
            if len(dataset) == 0:
                return
            example = dataset[0]
        except (TypeError, KeyError, IndexError, NotImplementedError):  # iterable datasets: checked per batch
            return
        try:
            check(example, 0)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{type(self).__name__} ({self.method_name}), {what}: {exc}") from None

    def _check_batch(self, inputs: dict[str, Any]) -> None:
        missing = [k for k in self.required_columns if k not in inputs]
        if missing:
            raise ValueError(
                f"{type(self).__name__} ({self.method_name}): the batch has no {missing} (it has {sorted(inputs)}). "
                f"Collate with {self.collator_hint} (the default) and keep `remove_unused_columns=False`.")

    def _segments(self, segment_ids: torch.Tensor) -> torch.Tensor:
        if self.uses_prompt:
            return segment_ids
        return torch.where(segment_ids == _RESPONSE, segment_ids, torch.zeros_like(segment_ids))

    def forward_logps(self, model: nn.Module, inputs: dict[str, torch.Tensor], prefix: str = ""):
        """Call a patched model with ``logps_only=True`` on the batch's ``{prefix}input_ids`` etc. Returns the
        :class:`~fastpref.integrations.transformers.LogProbsOutput` (``.logps``, ``.last_hidden``)."""
        return model(input_ids=inputs[prefix + "input_ids"], attention_mask=inputs[prefix + "attention_mask"],
                     segment_ids=self._segments(inputs[prefix + "segment_ids"]), logps_only=True)

    @torch.no_grad()
    def reference_logps(self, inputs: dict[str, torch.Tensor], prefix: str = ""):
        """The reference model's :class:`fastpref.SequenceLogProbs` for the batch, without gradient."""
        if self.ref_model is not None:
            return self.forward_logps(self.ref_model, inputs, prefix).logps
        policy = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(policy):  # pragma: no cover - guarded in __init__
            raise RuntimeError("no reference model")
        with reference_adapter(policy):
            return self.forward_logps(policy, inputs, prefix).logps

    # ----------------------------------------------------------------------------------------- Trainer API

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        self._check_batch(inputs)
        try:
            loss, metrics = self.loss_and_metrics(model, inputs)
        except NonFiniteError as exc:  # an overflowing forward in training: a NaN loss, the step skipped
            if mode != "train" or return_outputs:
                raise
            return self._fastpref_guard.overflow_loss(model, exc)
        self._store_metrics(metrics, mode)
        if return_outputs:
            return loss, metrics
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _store_metrics(self, metrics: dict[str, Any], mode: str) -> None:
        if not metrics:
            return
        keys = list(metrics)
        device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), None)
        values = torch.stack([torch.as_tensor(metrics[k], device=device).detach().float().reshape(-1).mean()
                              for k in keys]).tolist()  # one device synchronization for all metrics
        for k, v in zip(keys, values):
            self._metrics[mode][k].append(v)

    def _reduce_metrics(self, mode: str) -> dict[str, float]:
        local = {k: (sum(v), len(v)) for k, v in self._metrics[mode].items() if v}
        if self.accelerator.num_processes <= 1:
            return {k: s / n for k, (s, n) in local.items()}
        import torch.distributed as dist

        gathered = [None] * self.accelerator.num_processes
        dist.all_gather_object(gathered, sorted(local))
        keys = sorted(set().union(*gathered))
        if not keys:
            return {}
        totals = torch.tensor([list(local.get(k, (0.0, 0))) for k in keys], dtype=torch.float64,
                              device=self.accelerator.device)
        dist.all_reduce(totals)
        return {k: float(s / n) for k, (s, n) in zip(keys, totals.tolist()) if n > 0}

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._reduce_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()


# --------------------------------------------------------------------------------------------- binary feedback


class BinaryFeedbackTrainer(FastPrefTrainer):
    """Binary feedback: PRO-B (``method="pro"``, default) or KTO (``method="kto"``).

    Data: one example per completion, ``{"prompt_input_ids", "completion_input_ids", "label"}`` (label True/1 =
    desirable), collated by :class:`fastpref.collators.BinaryFeedbackCollator`.

    * PRO-B (METHODS.md section 2, :func:`fastpref.losses.pro_loss` with ``feedback="binary"``)::

          L_row = w_z (-(z - 1/2) r_y + lam f(r_y - r_h)),   r = beta (logp - ref_logp),  h = hyper response

      ``beta=0.1``, ``lam=2.0`` (needs ``lam > 1``: the stationary point ``sigma(r_y - r_h) = 1/2 + (z - 1/2)/lam``
      must lie in (0, 1)), ``hyper_response="exact"``, ``desirable_weight = undesirable_weight = 1``.
    * KTO (TRL ``KTOTrainer``, :func:`fastpref.losses.kto_loss`), ``loss_type`` ``"kto"`` or ``"apo_zero_unpaired"``.
      **KL reference point** (``loss_type="kto"``), as TRL estimates it: the collator pairs prompt ``i`` with the
      completion of row ``i - 1`` of the same batch (``KL_*`` columns); ``z_ref = clamp(mean(logp_KL - ref_logp_KL),
      min=0)`` over those mismatched rows (policy and reference, no gradient; averaged over processes), detached.
      It needs ``per_device_train_batch_size >= 2`` (one row has no mismatched partner), as in TRL.
    """

    required_columns = ("input_ids", "attention_mask", "segment_ids", "label")
    collator_hint = "fastpref.collators.BinaryFeedbackCollator"

    def __init__(self, model, args=None, *, method: str = "pro", beta: float = 0.1, lam: float = DEFAULT_LAM,
                 hyper_response: str = "exact", desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 loss_type: str = "kto", **kwargs):
        self.method = _choice(type(self).__name__, "method", method, ("pro", "kto"))
        self.beta, self.lam, self.hyper_response = beta, lam, hyper_response
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.loss_type = _choice(type(self).__name__, "loss_type", loss_type, KTO_LOSS_TYPES)
        self.uses_kl = method == "kto" and loss_type == "kto"
        if self.uses_kl:
            self.required_columns = self.required_columns + ("KL_input_ids", "KL_attention_mask", "KL_segment_ids")
            self.collator_hint = "fastpref.collators.BinaryFeedbackCollator(kl=True)"
        self._check_hyperparameters()
        if self.uses_kl and args is not None and args.per_device_train_batch_size < 2:
            raise ValueError(
                "BinaryFeedbackTrainer(method='kto'): KTO's KL estimate pairs each prompt with another row's "
                "completion of the same batch, so `per_device_train_batch_size` must be >= 2 (or use "
                "loss_type='apo_zero_unpaired')")
        super().__init__(model, args, **kwargs)

    @property
    def method_name(self) -> str:
        return "PRO-B" if self.method == "pro" else f"KTO ({self.loss_type})"

    def _check_hyperparameters(self) -> None:
        lp, ref, lab = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False])
        if self.method == "pro":
            _choice("BinaryFeedbackTrainer", "hyper_response", self.hyper_response, PRO_HYPER_RESPONSE)
            self._loss_pro(lp, ref, lab)
        else:
            self._loss_kto(lp, ref, lab, torch.tensor(0.0))

    def default_collator(self, pad_token_id: int):
        return BinaryFeedbackCollator(pad_token_id=pad_token_id, kl=self.uses_kl)

    def _loss_pro(self, lp, ref, labels):
        return pro_loss(lp, ref, feedback="binary", labels=labels, beta=self.beta, lam=self.lam,
                        hyper_response=self.hyper_response, desirable_weight=self.desirable_weight,
                        undesirable_weight=self.undesirable_weight)

    def _loss_kto(self, lp, ref, labels, kl):
        return kto_loss(lp, ref, labels, kl=kl, beta=self.beta, desirable_weight=self.desirable_weight,
                        undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)

    def kl_estimate(self, model, inputs) -> torch.Tensor:
        """KTO's KL reference point before clamping: ``mean(logp_KL - ref_logp_KL)`` over the mismatched rows,
        without gradient, averaged over processes."""
        with torch.no_grad():
            kl_logps = self.forward_logps(model, inputs, "KL_").logps.response
            ref_kl_logps = self.reference_logps(inputs, "KL_").response
            kl = (kl_logps.float() - ref_kl_logps.float()).mean()
            if self.accelerator.num_processes > 1:
                kl = self.accelerator.gather(kl.reshape(1)).mean()
        return kl

    def loss_and_metrics(self, model, inputs):
        lp = self.forward_logps(model, inputs).logps.response
        ref = self.reference_logps(inputs).response
        labels = inputs["label"]
        if self.method == "pro":
            return self._loss_pro(lp, ref, labels)
        kl = self.kl_estimate(model, inputs) if self.uses_kl else None
        return self._loss_kto(lp, ref, labels, kl)


# --------------------------------------------------------------------------------------------- scalar feedback


class ScalarFeedbackTrainer(FastPrefTrainer):
    """Scalar feedback: PRO-S (``method="pro"``, default) or DRO (``method="dro"``).

    Data: one example per **prompt** holding its K completions and their rewards, ``{"prompt_input_ids",
    "completion_input_ids": [K lists], "reward": [K floats]}``, flattened by
    :class:`fastpref.collators.ScalarFeedbackCollator` into K rows sharing a ``group_id``; groups are never split
    (``per_device_train_batch_size`` counts prompts). Regroup one-row-per-completion data with
    :func:`fastpref.collators.group_rows`.

    * PRO-S (METHODS.md section 2, :func:`fastpref.losses.pro_loss` with ``feedback="scalar"``): needs K >= 2 per
      prompt. ``beta=0.1``, ``eta=0.1`` (hyper-response mass), ``alpha=None`` (-> ``1 / (1 - eta)^2``, the smallest
      value with an optimum: ``alpha (1 - eta)^2 >= 1``), ``tau=1.0`` (score temperature), ``hyper_response="exact"``.
    * DRO (METHODS.md section 3, :func:`fastpref.losses.dro_loss`): ``(R - beta rho - beta log Z)^2`` with
      ``beta log Z = sg(beta (plogp - ref_plogp)) + beta log_z0``; the prompt log-prob comes from the same pass
      (``segment_ids`` prompt = 1). K >= 1. ``dro_loss`` has no defaults; here ``beta=0.1`` and ``log_z0=0.0`` (no
      offset; the seed sweeps it in [-50, 500]).
    """

    required_columns = ("input_ids", "attention_mask", "segment_ids", "reward", "group_id")
    collator_hint = "fastpref.collators.ScalarFeedbackCollator"

    def __init__(self, model, args=None, *, method: str = "pro", beta: float = 0.1, alpha: Optional[float] = None,
                 eta: float = DEFAULT_ETA, tau: float = 1.0, hyper_response: str = "exact", log_z0: float = 0.0,
                 **kwargs):
        self.method = _choice(type(self).__name__, "method", method, ("pro", "dro"))
        self.uses_prompt = method == "dro"
        self.beta, self.alpha, self.eta, self.tau = beta, alpha, eta, tau
        self.hyper_response, self.log_z0 = hyper_response, log_z0
        self._check_hyperparameters()
        super().__init__(model, args, **kwargs)

    @property
    def method_name(self) -> str:
        return "PRO-S" if self.method == "pro" else "DRO"

    def _check_hyperparameters(self) -> None:
        lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
        rewards, groups = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
        if self.method == "pro":
            _choice("ScalarFeedbackTrainer", "hyper_response", self.hyper_response, PRO_HYPER_RESPONSE)
            self._loss_pro(lp, ref, rewards, groups)
        else:
            dro_loss(lp, ref, lp, ref, rewards, groups, beta=self.beta, log_z0=self.log_z0)

    def default_collator(self, pad_token_id: int):
        return ScalarFeedbackCollator(pad_token_id=pad_token_id, min_group_size=2 if self.method == "pro" else 1)

    def _loss_pro(self, lp, ref, rewards, groups):
        return pro_loss(lp, ref, feedback="scalar", rewards=rewards, group_ids=groups, beta=self.beta,
                        alpha=self.alpha, eta=self.eta, tau=self.tau, hyper_response=self.hyper_response)

    def loss_and_metrics(self, model, inputs):
        pol = self.forward_logps(model, inputs).logps
        ref = self.reference_logps(inputs)
        rewards, groups = inputs["reward"], inputs["group_id"]
        if self.method == "pro":
            return self._loss_pro(pol.response, ref.response, rewards, groups)
        return dro_loss(pol.response, ref.response, pol.prompt.detach(), ref.prompt, rewards, groups,
                        beta=self.beta, log_z0=self.log_z0)


# --------------------------------------------------------------------------------------------- TYPO


class TYPOTrainer(FastPrefTrainer):
    """TYPO (METHODS.md section 4, :func:`fastpref.losses.typo_loss`), reference-free::

        loss = mean_pairs softplus(logp_l - logp_w) + lam * mean_unsup(-logp_u)        (lam = 0.05)

    Data (:class:`fastpref.collators.TYPOCollator`): pair examples ``{"prompt_input_ids", "chosen_input_ids",
    "rejected_input_ids"}`` and reference-sample examples ``{"prompt_input_ids", "completion_input_ids",
    "unsup": True}`` (responses sampled from the reference model), mixed in one dataset. A batch that happens to hold
    only pairs uses the supervised term alone, one holding only unsup rows ``lam * mean(-logp_u)`` alone (the
    metrics of the missing term are then not logged).
    """

    uses_reference = False
    required_columns = ("input_ids", "attention_mask", "segment_ids", "unsup")
    collator_hint = "fastpref.collators.TYPOCollator"

    def __init__(self, model, args=None, *, lam: float = 0.05, **kwargs):
        self.lam = lam
        typo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), lam=lam)  # checks `lam`
        super().__init__(model, args, **kwargs)

    @property
    def method_name(self) -> str:
        return "TYPO"

    def default_collator(self, pad_token_id: int):
        return TYPOCollator(pad_token_id=pad_token_id)

    def loss_and_metrics(self, model, inputs):
        lp = self.forward_logps(model, inputs).logps.response
        unsup = inputs["unsup"].bool()
        pairs, samples = lp[~unsup], lp[unsup]
        if pairs.numel() % 2:
            raise ValueError(f"TYPOTrainer: the batch has {pairs.numel()} pair rows; pairs need chosen rows then "
                             "rejected rows (use fastpref.collators.TYPOCollator)")
        b = pairs.numel() // 2
        if b and samples.numel():
            return typo_loss(pairs[:b], pairs[b:], samples, lam=self.lam)
        if b:  # no reference samples in this batch: the supervised term only
            loss, metrics = typo_loss(pairs[:b], pairs[b:], pairs.new_zeros(1), lam=0.0)
            for key in ("logps/unsup", "typo/unsupervised"):
                metrics.pop(key)
            return loss, metrics
        unsup_term = (-samples.float()).mean()
        return self.lam * unsup_term, {"logps/unsup": (-unsup_term).detach(), "typo/unsupervised": unsup_term.detach()}


# --------------------------------------------------------------------------------------------- oracle rewards


class _ZeroRewardHeadGrad(TrainerCallback):
    """The Trainer zeroes only the model's gradients after each optimizer step; this does the reward head's, and
    averages them over processes before the step (the head is not wrapped in DDP)."""

    def __init__(self, head: nn.Module, trainer: "OracleRewardTrainer"):
        self.head, self.trainer = head, trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        world = self.trainer.accelerator.num_processes
        if world > 1:
            import torch.distributed as dist

            for p in self.head.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.head.zero_grad(set_to_none=True)


class OracleRewardTrainer(FastPrefTrainer):
    """Pairs with explicit per-response rewards: DRDO (``method="drdo"``, default) or e-DPO (``method="edpo"``).

    Data (:class:`fastpref.collators.PairwiseRewardCollator`): ``{"prompt_input_ids", "chosen_input_ids",
    "rejected_input_ids"}`` plus ``oracle_chosen``/``oracle_rejected`` (DRDO) or ``reward_chosen``/``reward_rejected``
    (e-DPO); rows are the B chosen completions then the B rejected ones (TRL layout).

    * DRDO (METHODS.md section 6, :func:`fastpref.losses.drdo_loss`), reference-free::

          L = (R*_w - R*_l - (rhat_w - rhat_l))^2 - alpha (1 - p_w)^gamma (logp_w - log1mexp(logp_l))

      ``alpha=0.1``, ``gamma=2.0``. The student reward ``rhat = v . h + c`` is :attr:`reward_head` (default
      ``nn.Linear(hidden_size, 1)``, float32) applied to the patched model's ``.last_hidden`` (the hidden state at the
      position predicting each sequence's last response token). The trainer owns it: it is trained by the same
      optimizer (its own parameter group, no weight decay, learning rate ``reward_head_learning_rate`` or
      ``args.learning_rate``; not included in gradient clipping), saved as ``reward_head.pt`` next to the model by
      ``save_model`` and every checkpoint, and restored by ``train(resume_from_checkpoint=...)``; load it elsewhere
      with :meth:`load_reward_head`.
    * e-DPO (Fisch et al. 2024, :func:`fastpref.losses.distill_loss`)::

          L = (R_w - R_l - beta (rho_w - rho_l))^2,        beta = 0.1, reference model as DPO
    """

    collator_hint = "fastpref.collators.PairwiseRewardCollator"

    def __init__(self, model, args=None, *, method: str = "drdo", alpha: float = 0.1, gamma: float = 2.0,
                 beta: float = 0.1, reward_head: Optional[nn.Module] = None,
                 reward_head_learning_rate: Optional[float] = None, **kwargs):
        self.method = _choice(type(self).__name__, "method", method, ("drdo", "edpo"))
        self.uses_reference = method == "edpo"
        self.alpha, self.gamma, self.beta = alpha, gamma, beta
        self.reward_columns = ("oracle_chosen", "oracle_rejected") if method == "drdo" else ("reward_chosen",
                                                                                              "reward_rejected")
        self.required_columns = ("input_ids", "attention_mask", "segment_ids", *self.reward_columns)
        one = torch.tensor([-1.0])
        if method == "drdo":
            drdo_loss(one, one * 2, one, one, one, one, alpha=alpha, gamma=gamma)  # checks the hyperparameters
            if reward_head is None:
                if not isinstance(model, nn.Module):
                    raise TypeError(f"OracleRewardTrainer: `model` must be a torch module, got {type(model).__name__}")
                hidden_size = resolve_head(find_causal_lm(model).get_output_embeddings()).weight.shape[-1]
                reward_head = nn.Linear(hidden_size, 1)
            elif not isinstance(reward_head, nn.Module):
                raise TypeError(f"OracleRewardTrainer: `reward_head` must be a torch module, got {type(reward_head)}")
        else:
            distill_loss(one, one, one, one, one, one, beta=beta)
            if reward_head is not None:
                raise ValueError("OracleRewardTrainer(method='edpo') has no reward head; do not pass `reward_head`")
        self.reward_head = reward_head
        self.reward_head_learning_rate = reward_head_learning_rate
        super().__init__(model, args, **kwargs)
        if self.reward_head is not None:
            self.reward_head.to(self.args.device)
            self.add_callback(_ZeroRewardHeadGrad(self.reward_head, self))

    @property
    def method_name(self) -> str:
        return "DRDO" if self.method == "drdo" else "e-DPO"

    def default_collator(self, pad_token_id: int):
        return PairwiseRewardCollator(pad_token_id=pad_token_id, reward_columns=self.reward_columns)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.reward_head is not None:
            present = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [p for p in self.reward_head.parameters() if p.requires_grad and id(p) not in present]
            if params:
                group = {"params": params, "weight_decay": 0.0}
                if self.reward_head_learning_rate is not None:
                    group["lr"] = self.reward_head_learning_rate
                optimizer.add_param_group(group)
        return optimizer

    def reward(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The student reward ``rhat [S]`` of each sequence from its ``last_hidden [S, D]``."""
        head_dtype = next(self.reward_head.parameters()).dtype
        return self.reward_head(last_hidden.to(head_dtype)).reshape(-1)

    def loss_and_metrics(self, model, inputs):
        self._check_pairs(inputs)
        out = self.forward_logps(model, inputs)
        lp = out.logps.response
        b = lp.numel() // 2
        rw, rl = inputs[self.reward_columns[0]], inputs[self.reward_columns[1]]
        if self.method == "drdo":
            self.reward_head.train(self.model.training)
            rhat = self.reward(out.last_hidden)
            return drdo_loss(lp[:b], lp[b:], rhat[:b], rhat[b:], rw, rl, alpha=self.alpha, gamma=self.gamma)
        ref = self.reference_logps(inputs).response
        return distill_loss(lp[:b], lp[b:], ref[:b], ref[b:], rw, rl, beta=self.beta)

    def _check_pairs(self, inputs) -> None:
        n, b = inputs["input_ids"].shape[0], inputs[self.reward_columns[0]].numel()
        if n != 2 * b:
            raise ValueError(f"OracleRewardTrainer: {n} sequences for {b} pairs; rows must be the B chosen then the B "
                             "rejected completions (fastpref.collators.PairwiseRewardCollator)")

    # ----------------------------------------------------------------------------------------- saving

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.reward_head is not None and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.reward_head.state_dict(), os.path.join(output_dir, REWARD_HEAD_NAME))

    def load_reward_head(self, directory: str) -> None:
        """Load :attr:`reward_head`'s weights from ``directory/reward_head.pt`` (written by ``save_model``)."""
        path = os.path.join(directory, REWARD_HEAD_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no reward head at {path}")
        state = torch.load(path, map_location=next(self.reward_head.parameters()).device, weights_only=True)
        self.reward_head.load_state_dict(state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.reward_head is not None and os.path.isfile(os.path.join(resume_from_checkpoint, REWARD_HEAD_NAME)):
            self.load_reward_head(resume_from_checkpoint)
