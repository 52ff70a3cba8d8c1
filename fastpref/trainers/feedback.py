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
                                               samples (:class:`TYPOCollator`;
                                               :mod:`fastpref.sampling` makes them)
OracleRewardTrainer      ``"drdo"`` (DRDO)     pairs + ``oracle_chosen/rejected``  ``drdo_loss``              no
                         ``"edpo"`` (e-DPO)    pairs + ``reward_chosen/rejected``  ``distill_loss``           yes
                                               (:class:`PairwiseRewardCollator`)
DRDOOracleTrainer        (DRDO's oracle        pairs (:class:`PreferenceCollator`) ``drdo_oracle_loss``       no
                         stage)                then :meth:`~DRDOOracleTrainer.
                                               annotate` writes ``oracle_*``
AuxDPOTrainer            (AuxDPO)              pairs + ``example_index``           ``auxdpo_loss`` + null-    yes
                                               (:class:`PreferenceCollator`)       space penalty
=======================  ====================  ==================================  =========================  ==========

One trainer per data layout, with a ``method`` argument where two methods share the layout: the layout fixes the
collator and the batch checks, the method only the loss. Usage (see ``examples/``)::

    from fastpref.trainers import BinaryFeedbackTrainer, tokenize_dataset

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
* **Trainer-owned parameters** (DRDO's reward heads, AuxDPO's offsets): each joins the Trainer-built optimizer as
  its own parameter group (no weight decay; its own learning rate where the method fixes one, e.g. AuxDPO's 5e-3;
  outside ``max_grad_norm`` clipping, which covers the model), has its gradient averaged over processes before
  the step and zeroed after it, is saved as ``<name>.pt`` next to the model by ``save_model`` and every checkpoint,
  and is restored by ``train(resume_from_checkpoint=...)``.
* **Overflow** (e.g. pure fp16 training): a training step whose forward meets non-finite values, or whose gradients
  are not finite, is skipped (no parameter or optimizer state changes), logged as a warning and counted in the
  metric ``skipped_steps``, as a GradScaler would; parameters that are no longer finite raise a ``RuntimeError``
  naming one (:mod:`fastpref.integrations._step_guard`).

* **Padding-free batches** (``padding_free=True``): the collator's batches are packed into one row
  (:class:`fastpref.trainers.collators.PackingCollator`, KTO's KL rows too) with ``position_ids`` restarting per
  sequence; same losses and gradients as padded batches.

Not covered: DeepSpeed/FSDP preparation of a separate ``ref_model`` (it is moved to the device, not wrapped),
precomputed reference log-probs.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import nn
try:
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
    from .._hints import install_hint

    raise ImportError(f"fastpref.trainers.feedback needs transformers: {install_hint('hf')}") from exc

from .._method_names import where
from .collators import (
    BinaryFeedbackCollator,
    PackingCollator,
    PairwiseRewardCollator,
    PreferenceCollator,
    ScalarFeedbackCollator,
    TYPOCollator,
)
from ..distributed.replicated import ReplicatedParameters
from ..distributed.wrappers import whole_shape
from ..integrations._hf_utils import find_causal_lm, head_parameters, is_peft_model, reference_adapter, resolve_head
from ..integrations._trl_utils import (
    capture_backbone_hidden,
    model_inputs_without_mask,
    packed_offsets,
    response_logps_materialized,
)
from ..integrations.transformers import _STATE, _targets, patch
from ..losses import (
    auxdpo_loss,
    distill_loss,
    drdo_loss,
    drdo_oracle_loss,
    dro_loss,
    head_null_penalty,
    kto_loss,
    param_null_penalty,
    pro_loss,
    typo_loss,
)
from ..losses.auxdpo import (
    DEFAULT_CAP,
    DEFAULT_DELTA_LR,
    DEFAULT_INIT_STD,
    DEFAULT_LAMBDA_AMP,
    DEFAULT_LAMBDA_NULL,
    bounded_delta,
)
from ..losses.drdo import DEFAULT_ALPHA, DEFAULT_GAMMA, DEFAULT_ORACLE_A
from ..losses.dro import DEFAULT_LOG_Z0
from ..integrations._step_guard import NonFiniteError, NonFiniteStepGuard
from ..losses.kto import KTO_LOSS_TYPES
from ..losses.pro import DEFAULT_LAM, DEFAULT_TAU, PRO_HYPER_RESPONSE

__all__ = [
    "AuxDPOTrainer",
    "BinaryFeedbackTrainer",
    "DRDOOracleTrainer",
    "FastPrefTrainer",
    "INDEX_COLUMN",
    "OracleRewardTrainer",
    "REWARD_HEAD_NAME",
    "ScalarFeedbackTrainer",
    "TYPOTrainer",
]

REWARD_HEAD_NAME = "reward_head.pt"
INDEX_COLUMN = "example_index"
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
        data_collator: default: the layout's collator from :mod:`fastpref.trainers.collators`, padding with the
            tokenizer's (else the config's, else 0) pad token id.
        backend: :func:`fastpref.sequence_logprobs` backend (``"auto"``: triton on CUDA, else torch).
        disable_dropout: set the dropout modules' ``p`` to 0 (default True, as TRL).
        padding_free: pack every batch into one row without padding
            (:class:`fastpref.trainers.collators.PackingCollator` around the collator): ``position_ids`` restart at
            each sequence, the backbone attends within each sequence (transformers 5 builds the block-diagonal mask
            from them) and the fused head scores the packed rows through its varlen path. Same losses and gradients
            as padded batches, no compute on padding.
        **kwargs: the other ``transformers.Trainer`` arguments (``callbacks``, ``optimizers``, ...).
    """

    uses_reference: bool = True
    uses_prompt: bool = False
    required_columns: tuple[str, ...] = ("input_ids", "attention_mask", "segment_ids")
    collator_hint: str = "fastpref.trainers.collators"

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
        padding_free: bool = False,
        **kwargs,
    ):
        name = type(self).__name__
        if not isinstance(padding_free, bool):
            raise TypeError(f"{name}: `padding_free` must be a bool, got {type(padding_free).__name__}")
        self.padding_free = padding_free
        if not hasattr(self, "_owned"):
            self._owned: dict[str, tuple[nn.Module, Optional[float]]] = {}  # name -> (module, learning rate)
        self._backend = backend
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
        if padding_free:
            data_collator = PackingCollator(data_collator, prefixes=("", "KL_"))
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
        for module, _ in self._owned.values():
            module.to(self.args.device)
        if self._owned:  # replicated on every rank: gradients averaged over the ranks before each step, cleared
            # after it (the Trainer clears only the model's and DDP averages only the model's)
            self.add_callback(ReplicatedParameters(self.owned_parameters(), self._owned_param_groups,
                                                   own_optimizer=False))

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
                     position_ids=inputs.get(prefix + "position_ids"),  # padding-free batches
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

    # ----------------------------------------------------------------------------------------- owned parameters

    def owned_parameters(self) -> list[torch.Tensor]:
        """The trainable parameters of the trainer-owned modules (see the module docstring)."""
        return [p for module, _ in self._owned.values() for p in module.parameters() if p.requires_grad]

    def _owned_param_groups(self, exclude: frozenset = frozenset()) -> list[dict]:
        """One optimizer group per trainer-owned module (its own learning rate where it has one, no weight decay),
        leaving out the parameters whose ``id`` is in ``exclude``."""
        groups = []
        for module, lr in self._owned.values():
            params = [p for p in module.parameters() if p.requires_grad and id(p) not in exclude]
            if params:
                group = {"params": params, "weight_decay": 0.0}
                if lr is not None:
                    group["lr"] = lr
                groups.append(group)
        return groups

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        present = frozenset(id(p) for group in optimizer.param_groups for p in group["params"])
        for group in self._owned_param_groups(present):
            optimizer.add_param_group(group)
        return optimizer

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self._owned and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            for name, (module, _) in self._owned.items():
                torch.save(module.state_dict(), os.path.join(output_dir, f"{name}.pt"))

    def load_owned(self, name: str, directory: str) -> None:
        """Load the owned module ``name`` from ``directory/<name>.pt`` (written by ``save_model``)."""
        module = self._owned[name][0]
        path = os.path.join(directory, f"{name}.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {name} at {path}")
        device = next(module.parameters()).device
        module.load_state_dict(torch.load(path, map_location=device, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in self._owned:
            if os.path.isfile(os.path.join(resume_from_checkpoint, f"{name}.pt")):
                self._load_owned_from_checkpoint(name, resume_from_checkpoint)

    def _load_owned_from_checkpoint(self, name: str, directory: str) -> None:
        self.load_owned(name, directory)

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
    desirable), collated by :class:`fastpref.trainers.collators.BinaryFeedbackCollator`.

    * PRO-B (docs/methods.md section 2, :func:`fastpref.losses.pro_loss` with ``feedback="binary"``)::

          L_row = w_z (-(z - 1/2) r_y + lam f(r_y - r_h)),   r = beta (logp - ref_logp),  h = hyper response

      ``beta=0.1`` (TRL's default), ``lam=2.0`` (ours; needs ``lam > 1``: the stationary point ``sigma(r_y - r_h) =
      1/2 + (z - 1/2)/lam`` with ``r_h = 0``, ``1/2 + (1 - pi_y)(z - 1/2)/lam`` with the exact hyper response, must
      lie in (0, 1)), ``hyper_response="exact"``, ``desirable_weight = undesirable_weight = 1``. For imbalanced data
      the seed (trained at 1:100) scales the minority class's loss by the imbalance ratio: e.g.
      ``desirable_weight=100`` when desirable rows are 100 times rarer (``fastpref reproduce``, pro-binary-imbalance).
    * KTO (TRL ``KTOTrainer``, :func:`fastpref.losses.kto_loss`), ``loss_type`` ``"kto"`` or ``"apo_zero_unpaired"``.
      **KL reference point** (``loss_type="kto"``), as TRL estimates it: the collator pairs prompt ``i`` with the
      completion of row ``i - 1`` of the same batch (``KL_*`` columns); ``z_ref = clamp(mean(logp_KL - ref_logp_KL),
      min=0)`` over those mismatched rows (policy and reference, no gradient; averaged over processes), detached.
      It needs ``per_device_train_batch_size >= 2`` (one row has no mismatched partner), as in TRL.
    """

    required_columns = ("input_ids", "attention_mask", "segment_ids", "label")
    collator_hint = "fastpref.trainers.collators.BinaryFeedbackCollator"

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
            self.collator_hint = "fastpref.trainers.collators.BinaryFeedbackCollator(kl=True)"
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
    :class:`fastpref.trainers.collators.ScalarFeedbackCollator` into K rows sharing a ``group_id``; groups are never
    split (``per_device_train_batch_size`` counts prompts). Regroup one-row-per-completion data with
    :func:`fastpref.trainers.collators.group_rows`.

    * PRO-S (docs/methods.md section 2, :func:`fastpref.losses.pro_loss` with ``feedback="scalar"``): needs K >= 2 per
      prompt. ``beta=0.1``; ``eta=None`` (per group ``1/(K+1)``: the seed's "all pairs contribute equally"),
      ``alpha=None`` (``lam / (eta (1-eta))``: the regularizer scaled to PRO-B's ``lam``), ``lam=2.0`` (ours),
      ``tau=1.0`` (score temperature, ours), ``hyper_response="exact"``. Existence (checked):
      ``alpha (1-eta)(K-1+eta) > K-1`` in every group (with the defaults: ``lam > (K-1)/K^2``, at most 1/4).
    * DRO (docs/methods.md section 3, :func:`fastpref.losses.dro_loss`; seed "Direct Reward Optimization: A Point-wise
      Alignment Approach"): ``(R - beta rho - beta log Z)^2`` with ``beta log Z = sg(beta (plogp - ref_plogp)) +
      beta log_z0``; the prompt log-prob comes from the same pass (``segment_ids`` prompt = 1). K >= 1.
      ``beta=0.1``, ``log_z0=50.0``: the seed's reported setting (it sweeps ``log_z0`` in [-50, 500]).
    """

    required_columns = ("input_ids", "attention_mask", "segment_ids", "reward", "group_id")
    collator_hint = "fastpref.trainers.collators.ScalarFeedbackCollator"

    def __init__(self, model, args=None, *, method: str = "pro", beta: float = 0.1, alpha: Optional[float] = None,
                 eta: Optional[float] = None, lam: float = DEFAULT_LAM, tau: float = DEFAULT_TAU,
                 hyper_response: str = "exact", log_z0: float = DEFAULT_LOG_Z0, **kwargs):
        self.method = _choice(type(self).__name__, "method", method, ("pro", "dro"))
        self.uses_prompt = method == "dro"
        self.beta, self.alpha, self.eta, self.lam, self.tau = beta, alpha, eta, lam, tau
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
                        alpha=self.alpha, eta=self.eta, lam=self.lam, tau=self.tau,
                        hyper_response=self.hyper_response)

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
    """TYPO (docs/methods.md section 4, :func:`fastpref.losses.typo_loss`; seed "New Desiderata for Direct Preference
    Optimization"), reference-free::

        loss = mean_pairs softplus(logp_l - logp_w) + lam * mean_unsup(-logp_u)        (lam = 0.05, the seed's)

    Data (:class:`fastpref.trainers.collators.TYPOCollator`): pair examples ``{"prompt_input_ids", "chosen_input_ids",
    "rejected_input_ids"}`` and reference-sample examples ``{"prompt_input_ids", "completion_input_ids",
    "unsup": True}`` (responses sampled from the reference model: :func:`fastpref.sampling.sample_reference_responses`
    makes them with the seed's settings), mixed in one dataset. A batch that happens to hold only pairs uses the
    supervised term alone, one holding only unsup rows ``lam * mean(-logp_u)`` alone (the metrics of the missing
    term are then not logged).
    """

    uses_reference = False
    required_columns = ("input_ids", "attention_mask", "segment_ids", "unsup")
    collator_hint = "fastpref.trainers.collators.TYPOCollator"

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
                             "rejected rows (use fastpref.trainers.collators.TYPOCollator)")
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


# --------------------------------------------------------------------------------------------- owned parameters


# --------------------------------------------------------------------------------------------- reward heads


class _RewardHeadTrainer(FastPrefTrainer):
    """A trainer that owns a reward head ``r = v . h + c`` on the hidden state **of** each sequence's last response
    token (the patched model's ``.last_hidden``), trained by the same optimizer in its own group (learning rate
    ``reward_head_learning_rate`` or ``args.learning_rate``) and saved as ``reward_head.pt``."""

    def _init_reward_head(self, model, reward_head: Optional[nn.Module], learning_rate: Optional[float]) -> None:
        name = type(self).__name__
        if reward_head is None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name}: `model` must be a torch module, got {type(model).__name__}")
            # from the head module: its weight may be a ZeRO-3 placeholder (loaded under zero.Init) or a shard
            hidden_size = whole_shape(resolve_head(find_causal_lm(model).get_output_embeddings()))[1]
            reward_head = nn.Linear(hidden_size, 1)
        elif not isinstance(reward_head, nn.Module) or not list(reward_head.parameters()):
            raise TypeError(f"{name}: `reward_head` must be a torch module with parameters, got {type(reward_head)}")
        if learning_rate is not None and not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < 1e9):
            raise ValueError(f"{name}: `reward_head_learning_rate` must be a positive number, got {learning_rate!r}")
        self.reward_head = reward_head
        self.reward_head_learning_rate = learning_rate
        self._owned = {"reward_head": (reward_head, learning_rate)}

    def reward(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The reward ``[S]`` of each sequence from its ``last_hidden [S, D]`` (hidden state of its last response
        token)."""
        head_dtype = next(self.reward_head.parameters()).dtype
        return self.reward_head(last_hidden.to(head_dtype)).reshape(-1)

    def load_reward_head(self, directory: str) -> None:
        """Load :attr:`reward_head`'s weights from ``directory/reward_head.pt`` (written by ``save_model``)."""
        path = os.path.join(directory, REWARD_HEAD_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no reward head at {path}")
        self.load_owned("reward_head", directory)

    def _load_owned_from_checkpoint(self, name: str, directory: str) -> None:
        if name == "reward_head":
            self.load_reward_head(directory)
        else:  # pragma: no cover - reward-head trainers own nothing else
            super()._load_owned_from_checkpoint(name, directory)

    def _check_pairs(self, inputs, num_pairs: int) -> None:
        cu = packed_offsets(inputs)  # padding-free: the packed sequences
        n = inputs["input_ids"].shape[0] if cu is None else cu.numel() - 1
        if n != 2 * num_pairs:
            raise ValueError(f"{type(self).__name__}: {n} sequences for {num_pairs} pairs; rows must be the B chosen "
                             "then the B rejected completions (fastpref.trainers.collators)")


class OracleRewardTrainer(_RewardHeadTrainer):
    """Pairs with explicit per-response rewards: DRDO (``method="drdo"``, default) or e-DPO (``method="edpo"``).

    Data (:class:`fastpref.trainers.collators.PairwiseRewardCollator`): ``{"prompt_input_ids", "chosen_input_ids",
    "rejected_input_ids"}`` plus ``oracle_chosen``/``oracle_rejected`` (DRDO; :class:`DRDOOracleTrainer` trains the
    oracle and annotates them) or ``reward_chosen``/``reward_rejected`` (e-DPO); rows are the B chosen completions
    then the B rejected ones (TRL layout).

    * DRDO (docs/methods.md section 6, :func:`fastpref.losses.drdo_loss`), reference-free::

          L = (R*_w - R*_l - (rhat_w - rhat_l))^2 - alpha (1 - p_w)^gamma (logp_w - log1mexp(logp_l))

      ``alpha=0.1``, ``gamma=2.0`` (the seed's best). The student reward ``rhat = v . h + c`` is :attr:`reward_head`
      (default ``nn.Linear(hidden_size, 1)``, float32) applied to the patched model's ``.last_hidden``: the hidden
      state **of** each sequence's last response token. The oracle rewards are data (no gradient). The trainer owns
      the head: its own parameter group (no weight decay, learning rate ``reward_head_learning_rate`` or
      ``args.learning_rate``; not included in gradient clipping), saved as ``reward_head.pt`` next to the model by
      ``save_model`` and every checkpoint, restored by ``train(resume_from_checkpoint=...)``; load it elsewhere with
      :meth:`load_reward_head`.
    * e-DPO (Fisch et al. 2024, :func:`fastpref.losses.distill_loss`)::

          L = (R_w - R_l - beta (rho_w - rho_l))^2,        beta = 0.1, reference model as DPO
    """

    collator_hint = "fastpref.trainers.collators.PairwiseRewardCollator"

    def __init__(self, model, args=None, *, method: str = "drdo", alpha: float = DEFAULT_ALPHA,
                 gamma: float = DEFAULT_GAMMA, beta: float = 0.1, reward_head: Optional[nn.Module] = None,
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
            self._init_reward_head(model, reward_head, reward_head_learning_rate)
        else:
            distill_loss(one, one, one, one, one, one, beta=beta)
            if reward_head is not None:
                raise ValueError("OracleRewardTrainer(method='edpo') has no reward head; do not pass `reward_head`")
            self.reward_head, self.reward_head_learning_rate = None, reward_head_learning_rate
        super().__init__(model, args, **kwargs)

    @property
    def method_name(self) -> str:
        return "DRDO" if self.method == "drdo" else "e-DPO"

    def default_collator(self, pad_token_id: int):
        return PairwiseRewardCollator(pad_token_id=pad_token_id, reward_columns=self.reward_columns)

    def loss_and_metrics(self, model, inputs):
        rw, rl = inputs[self.reward_columns[0]], inputs[self.reward_columns[1]]
        self._check_pairs(inputs, rw.numel())
        out = self.forward_logps(model, inputs)
        lp = out.logps.response
        b = lp.numel() // 2
        if self.method == "drdo":
            self.reward_head.train(self.model.training)
            rhat = self.reward(out.last_hidden)
            return drdo_loss(lp[:b], lp[b:], rhat[:b], rhat[b:], rw, rl, alpha=self.alpha, gamma=self.gamma)
        ref = self.reference_logps(inputs).response
        return distill_loss(lp[:b], lp[b:], ref[:b], ref[b:], rw, rl, beta=self.beta)


class DRDOOracleTrainer(_RewardHeadTrainer):
    """DRDO's oracle stage (docs/methods.md section 6): train the oracle reward model, then annotate ``R*``.

    The oracle is a causal LM (usually a copy of the SFT model) with a reward head ``r(x, y) = v . h + c`` on the
    hidden state of the last response token, trained on preference pairs with (:func:`fastpref.losses.drdo_oracle_loss`)::

        L = -mean_i [ (1 - a) log sigma(r(x, y_w) - r(x, y_l)) + a * logp_w ]      (a = 0.01, the seed's App. C.1)

    (reward-model likelihood plus a language-model regularizer on the chosen response; ``logp_w`` is the summed
    response log-prob from the fused head). Reference-free. Data:
    :class:`fastpref.trainers.collators.PreferenceCollator` pairs ``{"prompt_input_ids", "chosen_input_ids",
    "rejected_input_ids"}``. The reward head is owned as in :class:`OracleRewardTrainer`. After training,
    :meth:`annotate` (:func:`fastpref.oracle.annotate_oracle_rewards`) adds the oracle's rewards as
    ``oracle_chosen`` / ``oracle_rejected`` columns to a pairs dataset: the data of the student run
    (:class:`OracleRewardTrainer` with ``method="drdo"``).
    """

    uses_reference = False
    collator_hint = "fastpref.trainers.collators.PreferenceCollator"

    def __init__(self, model, args=None, *, a: float = DEFAULT_ORACLE_A, reward_head: Optional[nn.Module] = None,
                 reward_head_learning_rate: Optional[float] = None, **kwargs):
        one = torch.tensor([-1.0])
        drdo_oracle_loss(one, one, one, a=a)  # checks `a`
        self.a = a
        self._init_reward_head(model, reward_head, reward_head_learning_rate)
        super().__init__(model, args, **kwargs)

    @property
    def method_name(self) -> str:
        return "DRDO oracle"

    def default_collator(self, pad_token_id: int):
        return PreferenceCollator(pad_token_id=pad_token_id)

    def loss_and_metrics(self, model, inputs):
        out = self.forward_logps(model, inputs)
        lp = out.logps.response
        b = lp.numel() // 2
        self._check_pairs(inputs, b)
        self.reward_head.train(self.model.training)
        r = self.reward(out.last_hidden)
        return drdo_oracle_loss(r[:b], r[b:], lp[:b], a=self.a)

    def annotate(self, dataset, *, batch_size: int = 8):
        """``dataset`` (pairs) with the trained oracle's rewards as ``oracle_chosen`` / ``oracle_rejected`` columns
        (:func:`fastpref.oracle.annotate_oracle_rewards`, no gradient, eval mode)."""
        from ..oracle import annotate_oracle_rewards

        collator = self.data_collator if isinstance(self.data_collator, PreferenceCollator) else None
        return annotate_oracle_rewards(self.accelerator.unwrap_model(self.model), self.reward_head, dataset,
                                       batch_size=batch_size, collator=collator, backend=self._backend)


# --------------------------------------------------------------------------------------------- AuxDPO


class _Offsets(nn.Module):
    """AuxDPO's per-example offsets: ``delta_raw [2 n]`` (``delta = cap * tanh(delta_raw)``)."""

    def __init__(self, num: int, init_std: float):
        super().__init__()
        self.delta_raw = nn.Parameter(torch.randn(num) * init_std)


def with_example_index(dataset, column: str = INDEX_COLUMN):
    """``dataset`` with an ``example_index`` column (its row number) when it has none: a ``datasets.Dataset``
    through ``add_column``, a list of dicts as a new list. Other datasets must carry the column."""
    if dataset is None:
        return None
    if hasattr(dataset, "column_names") and hasattr(dataset, "add_column"):
        if column in dataset.column_names:
            return dataset
        return dataset.add_column(column, list(range(len(dataset))))
    if isinstance(dataset, list):
        if all(isinstance(ex, dict) and column in ex for ex in dataset):
            return dataset
        if any(isinstance(ex, dict) and column in ex for ex in dataset):
            raise ValueError(f"some examples have an `{column}` column and others do not")
        return [dict(ex, **{column: i}) for i, ex in enumerate(dataset)]
    return dataset


class AuxDPOTrainer(FastPrefTrainer):
    """AuxDPO (docs/methods.md section 5; Gopalan, Ray Chowdhury & Banerjee 2025, "Why DPO is a Misspecified Estimator
    and How to Fix It"), with the authors' delta layout and optimizer group::

        m_i  = beta (rho_w - rho_l + delta_{2i} - delta_{2i+1}),   delta = cap * tanh(delta_raw)
        L    = -mean_i log sigma(m_i) + lambda_null ||A_B delta_B||^2 - lambda_amp/2 (mean delta_w^2 + mean delta_l^2)

    Data: :class:`fastpref.trainers.collators.PreferenceCollator` pairs plus ``example_index`` (the example's index into
    ``delta``; added as the row number when the training dataset (a ``datasets.Dataset`` or a list) has none).
    The trainer owns ``delta_raw [2 n]`` (``n = num_examples``, default max index + 1), initialised from N(0, 1e-3)
    (``init_std``), trained in **its own optimizer group at learning rate** ``delta_learning_rate`` **= 5e-3 without
    weight decay** (the authors' setting: at the policy's ~5e-7 delta never moves and AuxDPO is DPO), saved as
    ``auxdpo_delta.pt``. Evaluation uses ``delta = 0`` (the offsets belong to the training examples).

    ``null_penalty``:
    ``"head"`` (default): exact for the reference LM head (:func:`fastpref.losses.head_null_penalty`, one more fused
    pass on the reference hidden states): scalable, and a **weaker** constraint than the authors';
    ``"params"``: the authors' form over every reference parameter the policy trains (all of them when fine-tuning
    fully), through double backward on materialized logits (:func:`fastpref.losses.param_null_penalty`): exact,
    for small models or parameter sets; needs a separate ``ref_model`` (the default frozen copy works; a PEFT policy
    without one does not);
    ``None``: no null-space term.
    Defaults ``beta = 0.1`` (TRL's, ours), ``lambda_null = 1``, ``lambda_amp = 0.01``, ``cap = 1`` (the authors').
    """

    collator_hint = "fastpref.trainers.collators.PreferenceCollator(index_column='example_index')"
    null_penalties = ("head", "params", None)

    def __init__(self, model, args=None, *, beta: float = 0.1, lambda_null: float = DEFAULT_LAMBDA_NULL,
                 lambda_amp: float = DEFAULT_LAMBDA_AMP, cap: float = DEFAULT_CAP, init_std: float = DEFAULT_INIT_STD,
                 delta_learning_rate: float = DEFAULT_DELTA_LR, null_penalty: Optional[str] = "head",
                 num_examples: Optional[int] = None, train_dataset=None, **kwargs):
        name = type(self).__name__
        one = torch.tensor([-1.0])
        auxdpo_loss(one, one, one, one, one * 0, one * 0, beta=beta, null_penalty=one[0] * 0, lambda_null=lambda_null,
                    lambda_amp=lambda_amp)  # checks the hyperparameters
        bounded_delta(one, cap)  # checks `cap`
        if null_penalty not in self.null_penalties:
            raise ValueError(f"{name}: `null_penalty` must be one of {self.null_penalties}, got {null_penalty!r}")
        for arg, value in (("init_std", init_std), ("delta_learning_rate", delta_learning_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
                raise ValueError(f"{name}: `{arg}` must be a finite number >= 0, got {value!r}")
        self.beta, self.lambda_null, self.lambda_amp, self.cap = beta, lambda_null, lambda_amp, cap
        self.null_penalty = null_penalty
        train_dataset = with_example_index(train_dataset)
        self.num_delta_examples = self._num_examples(train_dataset, num_examples)
        self.offsets = _Offsets(2 * self.num_delta_examples, init_std)
        self._owned = {"auxdpo_delta": (self.offsets, delta_learning_rate)}
        super().__init__(model, args, train_dataset=train_dataset, **kwargs)
        if null_penalty == "params" and self.ref_model is None:
            raise ValueError(f"{name}: null_penalty='params' differentiates the reference model's parameters, so it "
                             "needs a separate `ref_model` (a PEFT policy's adapter-disabled base has none to "
                             "differentiate); pass ref_model=..., or use null_penalty='head'")

    @staticmethod
    def _num_examples(dataset, num_examples: Optional[int]) -> int:
        if num_examples is not None:
            if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
                raise ValueError(f"AuxDPOTrainer: `num_examples` must be a positive int, got {num_examples!r}")
            return num_examples
        if dataset is None:
            raise ValueError("AuxDPOTrainer: pass `train_dataset` (or `num_examples`): delta has one pair of offsets "
                             "per training example")
        try:
            index = [int(ex[INDEX_COLUMN]) for ex in dataset]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"AuxDPOTrainer: every training example needs an integer `{INDEX_COLUMN}` "
                             f"(or pass `num_examples`): {exc}") from None
        if not index:
            raise ValueError("AuxDPOTrainer: `train_dataset` is empty")
        if min(index) < 0:
            raise ValueError(f"AuxDPOTrainer: `{INDEX_COLUMN}` holds negative values")
        return max(index) + 1

    @property
    def method_name(self) -> str:
        return "AuxDPO"

    @property
    def delta(self) -> torch.Tensor:
        """The offsets ``cap * tanh(delta_raw)`` ``[2 * num_examples]`` (example i: ``delta[2i]`` chosen,
        ``delta[2i+1]`` rejected)."""
        return bounded_delta(self.offsets.delta_raw, self.cap)

    def default_collator(self, pad_token_id: int):
        return PreferenceCollator(pad_token_id=pad_token_id, index_column=INDEX_COLUMN, index_optional=True)

    def _segments(self, segment_ids: torch.Tensor) -> torch.Tensor:
        return torch.where(segment_ids == _RESPONSE, segment_ids, torch.zeros_like(segment_ids))

    def loss_and_metrics(self, model, inputs):
        lp = self.forward_logps(model, inputs).logps.response
        b = lp.numel() // 2
        if lp.numel() != 2 * b:
            raise ValueError("AuxDPOTrainer: rows must be B chosen then B rejected completions")
        training = self.model.training
        if training:
            if INDEX_COLUMN not in inputs:
                raise ValueError(f"AuxDPOTrainer: every training batch needs `{INDEX_COLUMN}` "
                                 "(fastpref.trainers.collators.PreferenceCollator(index_column='example_index'))")
            index = inputs[INDEX_COLUMN].to(lp.device).long()
            if index.shape != (b,) or bool(((index < 0) | (index >= self.num_delta_examples)).any()):
                raise ValueError(f"AuxDPOTrainer: `{INDEX_COLUMN}` must hold {b} values in [0, {self.num_delta_examples})")
            delta = self.delta
            dw, dl = delta[2 * index], delta[2 * index + 1]
        else:  # delta belongs to the training examples: evaluation is AuxDPO with zero offsets
            dw = dl = torch.zeros(b, device=lp.device)
        penalty = None
        if self.null_penalty == "head" and training:
            ref, penalty = self._head_penalty(inputs, torch.cat([dw, dl]))
        else:
            ref = self.reference_logps(inputs).response
            if self.null_penalty == "params" and training:
                penalty = self._param_penalty(inputs, torch.cat([dw, dl]))
        return auxdpo_loss(lp[:b], lp[b:], ref[:b].to(lp.device), ref[b:].to(lp.device), dw, dl, beta=self.beta,
                           null_penalty=None if penalty is None else penalty.to(lp.device).reshape(()),
                           lambda_null=self.lambda_null, lambda_amp=self.lambda_amp)

    def _reference_model(self):
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        policy = self.accelerator.unwrap_model(self.model)
        return policy, reference_adapter(policy)

    def _head_penalty(self, inputs, delta: torch.Tensor):
        """Reference log-probs and ``||A_head delta||^2`` from one reference forward (its hidden states captured)."""
        model, adapter = self._reference_model()
        with torch.no_grad(), adapter, capture_backbone_hidden(model) as store:
            ref = self.forward_logps(model, inputs).logps.response
        lm = find_causal_lm(model)
        transform = lm.__dict__[_STATE].transform
        weight, bias = head_parameters(resolve_head(lm.get_output_embeddings()), transform)
        labels, segments, cu, _, _ = _targets(inputs["input_ids"], inputs["attention_mask"],
                                              inputs.get("position_ids"), None, self._segments(inputs["segment_ids"]),
                                              None, {}, False)
        hidden = store[-1].detach().to(device=weight.device, dtype=weight.dtype)
        if cu is not None:  # padding-free: the packed rows and their offsets
            hidden, labels, segments, cu = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), \
                segments.reshape(-1), cu.to(weight.device)
        penalty = head_null_penalty(hidden, weight.detach(), labels.to(weight.device),
                                    delta.to(device=weight.device, dtype=torch.float32), segments.to(weight.device),
                                    bias=None if bias is None else bias.detach(), logit_scale=transform.logit_scale,
                                    softcap=transform.softcap, cu_seqlens=cu, backend=self._backend)
        return ref, penalty

    def _param_penalty(self, inputs, delta: torch.Tensor):
        """``||A delta||^2`` over the reference copies of every parameter the policy trains (the authors' form)."""
        policy = self.accelerator.unwrap_model(self.model)
        trained = {n for n, p in policy.named_parameters() if p.requires_grad}
        params = [p for n, p in self.ref_model.named_parameters() if n in trained]
        if not params:
            raise ValueError("AuxDPOTrainer: null_penalty='params' found no reference parameter named like the "
                             "policy's trainable ones; the reference model must have the policy's architecture")
        labels, segments, cu, _, _ = _targets(inputs["input_ids"], inputs["attention_mask"],
                                              inputs.get("position_ids"), None, self._segments(inputs["segment_ids"]),
                                              None, {}, False)
        model_inputs = model_inputs_without_mask(inputs, ("input_ids", "attention_mask", "position_ids"))

        def ref_logps():  # materialized logits: double-differentiable
            logits = self.ref_model(**model_inputs, use_cache=False).logits
            return response_logps_materialized(logits, labels, segments, cu)

        return param_null_penalty(ref_logps, params, delta)
