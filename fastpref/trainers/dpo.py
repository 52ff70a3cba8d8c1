"""TRL drop-in: :class:`FastPrefDPOTrainer`, a ``trl.DPOTrainer`` whose log-probs never build logits.

::

    from trl import DPOConfig
    from fastpref.trainers import FastPrefDPOTrainer          # (also importable from fastpref.integrations.trl)

    trainer = FastPrefDPOTrainer(model, args=DPOConfig(...), train_dataset=dataset,
                                 processing_class=tokenizer)                       # every TRL loss_type
    trainer = FastPrefDPOTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 method="pro", method_kwargs={"eta": 0.1})        # a fastpref method
    trainer.train()

Same constructor and the stock ``DPOConfig``; three keyword-only additions:

``method`` (default ``"dpo"``), ``method_kwargs`` (a dict, the method's own settings), ``fastpref_backend``
(``"auto"``: Triton on CUDA, else chunked PyTorch; or ``"triton"`` / ``"torch"``; used by the fused head and by
the functional loss, whose fused loss-head kernel runs on CUDA).

The policy (and the reference model, when there is one) is patched with
:func:`fastpref.integrations.transformers.patch`; each step calls it with ``logps_only=True``, so per-sequence
log-probs come from the fused head (the LM head module is never called, no ``tokens x vocab`` tensor exists).
The reference log-probs come from the same fused forward under ``torch.no_grad()``: from ``ref_model``, from the
adapter-disabled base of a PEFT policy (TRL's ``"ref"`` adapter when the model came with one), and also in
``precompute_ref_log_probs=True`` (TRL's precompute pass calls :meth:`FastPrefDPOTrainer.compute_ref_log_probs`).
With LoRA the head weight has ``requires_grad=False``, so the fused backward skips ``dW`` by itself. Both forwards
run under ``accelerator.autocast()`` (TRL's default ``bf16=True`` is mixed precision), as stock's do.

Methods (``beta`` is always ``DPOConfig.beta``; ``label_smoothing`` is read from the config where a method uses it):

=========  ===========================================================  =========================================
method     loss (:mod:`fastpref.losses.functional`)                     ``method_kwargs`` (defaults)
=========  ===========================================================  =========================================
``dpo``    ``dpo_loss`` for every ``DPOConfig.loss_type`` (a list with  none: ``loss_type``, ``loss_weights``,
           ``loss_weights`` too), TRL's formulas and metrics            ``label_smoothing``, ``discopop_tau``,
                                                                        ``f_divergence_type``,
                                                                        ``f_alpha_divergence_coef``, ``ld_alpha``
                                                                        come from ``DPOConfig``
``pro``    ``pro_loss(feedback="pairwise")`` (PRO-P, reported x4)       ``eta`` (1/3: the seed's), ``alpha``
                                                                        (None -> ``1/(1-eta)^2``),
                                                                        ``hyper_response`` (``"exact"``),
                                                                        ``require_optimum`` (True: ``alpha
                                                                        (1 - eta^2) > 1``)
``simpo``  ``simpo_loss`` (reference-free)                              ``gamma`` (0.5); ``label_smoothing`` from
                                                                        the config
``typo``   refused by default: TYPO needs responses sampled from the    ``lam``: only ``0.0`` (the supervised
           reference model, which TRL's preference data cannot carry:   term alone, stated explicitly)
           use :class:`fastpref.trainers.TYPOTrainer` with
           :func:`fastpref.sampling.sample_reference_responses`.
           ``method_kwargs={"lam": 0.0}`` trains the pairwise term
           ``typo_loss(..., unsup_logps=None)`` alone, by choice
``drdo``   ``drdo_loss`` (reference-free); rewards ``rhat`` from a      ``alpha`` (0.1), ``gamma`` (2.0),
           trainer-owned reward head on the patched model's             ``reward_head`` (an ``nn.Module`` D -> 1;
           ``.last_hidden`` (the hidden state of the last response      default ``nn.Linear(D, 1)``)
           token); needs dataset columns ``oracle_chosen`` and
           ``oracle_rejected`` (the oracle rewards R*, data:
           :func:`fastpref.oracle.annotate_oracle_rewards`)
``auxdpo`` ``auxdpo_loss``; the trainer owns ``delta_raw`` (2 per        ``lambda_null`` (1.0), ``lambda_amp``
           training example) and ``delta = cap tanh(delta_raw)``         (0.01), ``cap`` (1.0), ``init_std``
           (``delta[2i]`` chosen, ``delta[2i+1]`` rejected) indexed by   (1e-3), ``delta_learning_rate`` (5e-3),
           the dataset column ``example_index`` (added as the row       ``null_penalty`` (``"head"``: the exact
           number when a ``datasets.Dataset`` lacks it), trained in its  LM-head penalty from the reference hidden
           own optimizer group at ``delta_learning_rate`` without       states; ``"params"``: the authors' form
           weight decay (the authors' settings); evaluation uses        over every reference parameter the
           ``delta = 0``                                                policy trains; None), ``num_examples``
                                                                        (max index + 1)
=========  ===========================================================  =========================================

``pro`` with ``hyper_response="exact"`` needs each pair's two responses to differ (their probabilities must sum
below 1).

The reference model: with ``ref_model=None`` the reference-free methods (``simpo``, ``typo``, ``drdo``) have none
(nothing is built, loaded or precomputed; ``precompute_ref_log_probs=True`` and ``sync_ref_model=True`` are refused
for them; a ``ref_model`` passed anyway is left unused), and the other methods use a frozen copy of the policy as
passed (``copy.deepcopy``; TRL 1.16 would instead reload the policy from ``config._name_or_path``, which fails for
a model built from a config with ``Repo id must use alphanumeric chars``). With PEFT the reference is the
adapter-disabled policy, with ``precompute_ref_log_probs=True`` the policy before training, as in TRL.

The extra trainable modules (DRDO's reward head, AuxDPO's ``delta_raw``) live in ``trainer.fastpref_modules`` (an
``nn.ModuleDict``; also ``trainer.reward_head`` / ``trainer.delta_raw``, and ``trainer.delta`` the bounded offsets):
each joins the optimizer as its own parameter group (no weight decay; the reward head at the policy's learning
rate, AuxDPO's offsets at ``delta_learning_rate`` = 5e-3: at the policy's ~5e-7 they would never move and AuxDPO
would be DPO; ``max_grad_norm`` clipping covers the model's parameters only, as Trainer clips), and
:meth:`save_model` writes their state dict to ``fastpref_modules.pt`` next to the model (resuming from a checkpoint
does not reload them). They need the Trainer-built optimizer. With several processes they are replicated on every
rank and their gradients averaged over the ranks before each step (DDP's rule); under DeepSpeed or FSDP (which own
the model's optimizer) the same groups get their own optimizer of the Trainer's class, settings and schedule
(:mod:`fastpref.distributed.replicated`).

AuxDPO's null-space penalty: ``"head"`` restricts ``A`` to the reference LM head (exact, one more fused pass; a
weaker constraint than the authors', whose ``A`` spans every trainable parameter); ``"params"`` is the authors'
form, by double backward through the reference model's materialized logits over its copies of the parameters the
policy trains (all of them in full fine-tuning): exact but costly, for small models; it needs a separate
``ref_model`` (a PEFT policy's adapter-disabled base is refused).

Overflow (e.g. pure fp16 training that diverges): where stock ``DPOTrainer`` applies a NaN update and carries on with
NaN parameters, a training step whose forward meets non-finite values or whose gradients are not finite is skipped
(no parameter or optimizer state changes), logged as a warning and counted in the metric ``skipped_steps``, as a
GradScaler would; parameters that are no longer finite raise a ``RuntimeError`` naming one
(:mod:`fastpref.integrations._step_guard`).

Logged metrics: everything stock ``DPOTrainer`` logs, under TRL's names and definitions (TRL 1.16
``_compute_loss``): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, ``num_tokens``, ``aux_loss``, and the token metrics ``entropy`` (mean over every
completion token), ``logits/chosen`` / ``logits/rejected`` (mean over the chosen / rejected completion tokens of the
token's mean logit) and ``mean_token_accuracy`` (fraction of the chosen completion tokens whose label is the argmax),
which come from the fused forward's per-token statistics (``return_stats=True``, accumulated with the log-sum-exp in
the same pass); plus each fastpref method's own, e.g. ``rewards/hyper``, ``drdo/distill``.

WPO (``use_weighting=True``): TRL's per-pair weights ``exp(mean_t (log p(y_t) - log sum_v p_v^2))`` (chosen times
rejected, no gradient) from the same statistics. Padding-free batches (``padding_free=True``; TRL 1.16 itself falls
back to padding with a warning): every batch is packed into one row after TRL's collator
(:class:`fastpref.trainers.collators.PackingCollator`), ``position_ids`` restarting per sequence; transformers builds
the block-diagonal attention from them and the fused head scores the packed rows (its varlen path): the same losses
and gradients as padded batches, no compute on padding (TRL's precompute pass, inside the constructor, sees padded
batches). ``rpo_alpha`` and ``reference_free`` (fields of other TRL releases) are computed: RPO adds
``rpo_alpha`` times the chosen tokens' NLL (metric ``nll_loss``); reference-free DPO uses reference log-probs of 0.

Refused at construction, each because it cannot be computed here (never a silent difference):

* ``use_liger_loss=True`` (other TRL releases): it asks for Liger's fused loss in place of this one;
* vision datasets: TRL prepares them on the fly with its vision collator, whose image-token layout the fused path has
  not been checked against;
* ``method="typo"`` without ``lam=0``: TYPO's unsupervised term needs responses sampled from the reference model,
  which a preference dataset does not carry (:class:`fastpref.trainers.TYPOTrainer` takes them);
* ``drdo`` / ``auxdpo`` with a user-built optimizer that lacks their trainer-owned parameters (they would not train);
  AuxDPO's ``null_penalty="params"`` under FSDP / DeepSpeed (it differentiates sharded reference parameters) or
  without a separate ``ref_model``;
* contradictions: ``precompute_ref_log_probs`` / ``sync_ref_model`` with a reference-free method, DPO-only config
  fields with another method, TRL's own refusals (WPO with ``aot``, ...).

Several processes (tested under accelerate with DDP, FSDP2 and DeepSpeed ZeRO-3; the patch itself also under
FSDP1): the patched forward reads the head where it is whole and runs the fused head inside the head's own FSDP
unit / ZeRO-3 module when it is sharded there; the reference model, which TRL wraps in its constructor, is patched
after wrapping and its head checked on a gathered copy on every rank; AuxDPO's head penalty reads the reference
head gathered without gradient (:mod:`fastpref.distributed.wrappers`). ``null_penalty="params"`` is refused under
FSDP / DeepSpeed (it differentiates the sharded reference parameters).

TRL hooks overridden (TRL 1.16): ``compute_loss`` (Trainer's public hook; TRL's private ``_compute_loss`` is
not called), ``compute_ref_log_probs(model, inputs)`` (called by TRL's precompute pass), the Trainer hooks
``_set_signature_columns_if_needed`` (keeps the extra columns), ``create_optimizer`` and ``save_model``. The
constructor checks that the TRL it runs on has the pieces it relies on and raises otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from typing import Any, Optional

import torch
from torch import nn

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - trl is an optional dependency
    from .._hints import install_hint

    raise ImportError(f"fastpref.trainers.dpo needs TRL: {install_hint('trl')}") from exc

from .._method_names import where
from ..distributed.replicated import ReplicatedParameters
from ..distributed.wrappers import probe_head, whole_parameters, whole_shape
from ..logprobs import BACKENDS
from ..losses.auxdpo import (
    DEFAULT_CAP,
    DEFAULT_DELTA_LR,
    DEFAULT_INIT_STD,
    DEFAULT_LAMBDA_AMP,
    DEFAULT_LAMBDA_NULL,
    auxdpo_loss,
    bounded_delta,
)
from ..losses.auxdpo_penalty import head_null_penalty, param_null_penalty
from ..losses.dpo import dpo_loss, simpo_loss
from ..losses.drdo import drdo_loss
from ..losses.nll import nll_loss
from ..losses.pro import DEFAULT_ETA, PRO_HYPER_RESPONSE, pro_loss
from ..losses.typo import typo_loss
from ..integrations._hf_utils import find_causal_lm, head_parameters, is_peft_model, reference_adapter, resolve_head
from ..integrations._step_guard import NonFiniteStepGuard
from ..integrations._trl_utils import (
    ExtraColumnsCollator,
    capture_backbone_hidden,
    completion_counts,
    ld_segment_ids,
    model_inputs_without_mask,
    no_gradient_checkpointing,
    packed_offsets,
    response_logps_materialized,
)
from .collators import PackingCollator
from ..integrations.transformers import _STATE, _targets, patch

__all__ = ["FastPrefDPOTrainer", "METHODS", "ORACLE_COLUMNS", "INDEX_COLUMN"]

METHODS = ("dpo", "pro", "simpo", "typo", "drdo", "auxdpo")
REFERENCE_FREE = ("simpo", "typo", "drdo")
ORACLE_COLUMNS = ("oracle_chosen", "oracle_rejected")
INDEX_COLUMN = "example_index"
_NULL_PENALTIES = ("head", "params", None)
# method -> its own settings and their defaults (``beta`` always comes from DPOConfig.beta)
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {},
    "pro": {"eta": DEFAULT_ETA, "alpha": None, "hyper_response": "exact", "require_optimum": True},
    "simpo": {"gamma": 0.5},
    "typo": {"lam": None},
    "drdo": {"alpha": 0.1, "gamma": 2.0, "reward_head": None},
    "auxdpo": {"lambda_null": DEFAULT_LAMBDA_NULL, "lambda_amp": DEFAULT_LAMBDA_AMP, "null_penalty": "head",
               "num_examples": None, "cap": DEFAULT_CAP, "init_std": DEFAULT_INIT_STD,
               "delta_learning_rate": DEFAULT_DELTA_LR},
}
# Batch keys that are not model inputs: TRL's, and the extra columns of drdo/auxdpo.
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *ORACLE_COLUMNS, INDEX_COLUMN}
_DEFAULT_DPO_FIELDS = {"loss_type": ["sigmoid"], "loss_weights": None, "f_divergence_type": "reverse_kl",
                       "ld_alpha": None, "use_weighting": False, "rpo_alpha": None, "reference_free": False}


def _error(message: str) -> ValueError:
    return ValueError(f"FastPrefDPOTrainer: {message}")


class FastPrefDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` computing every per-sequence log-prob with fastpref's fused head (module docstring).

    Args:
        *args, **kwargs: exactly ``DPOTrainer``'s (``model``, ``ref_model``, ``args`` (a stock ``DPOConfig``),
            ``data_collator``, ``train_dataset``, ``eval_dataset``, ``processing_class``, ...).
        method: ``"dpo"`` (TRL's ``loss_type``\\ s from the config), ``"pro"``, ``"simpo"``, ``"typo"``,
            ``"drdo"`` or ``"auxdpo"``.
        method_kwargs: the method's own settings (see the module docstring); unknown keys raise.
        fastpref_backend: ``"auto"``, ``"triton"`` or ``"torch"`` (:func:`fastpref.sequence_logprobs`).

    Raises:
        ValueError / NotImplementedError / TypeError at construction for a configuration the fused path
        cannot reproduce exactly, or a bad method setting (the functional loss is tried on a dummy batch).
    """

    def __init__(self, *args, method: str = "dpo", method_kwargs: Optional[dict] = None,
                 fastpref_backend: str = "auto", **kwargs):
        bound = inspect.signature(DPOTrainer.__init__).bind(self, *args, **kwargs)
        params = bound.arguments
        config = params.get("args")
        if config is None:  # what DPOTrainer does, done here so the checks below see the config
            model = params.get("model")
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            config = DPOConfig(f"{(name or 'model').rstrip('/').split('/')[-1]}-DPO")
            params["args"] = config
        if not isinstance(config, DPOConfig):
            raise TypeError(f"FastPrefDPOTrainer: `args` must be a trl.DPOConfig, got {type(config).__name__}")
        _check_trl(config)
        if method not in METHODS:
            hint = where(method)
            raise _error(f"`method` must be one of {METHODS}, got {method!r}" + (f"; {hint}" if hint else ""))
        if fastpref_backend not in BACKENDS:
            raise _error(f"`fastpref_backend` must be one of {BACKENDS}, got {fastpref_backend!r}")
        self.fastpref_method = method
        self.fastpref_backend = fastpref_backend
        self.fastpref_method_kwargs = _method_settings(method, method_kwargs)
        _check_config(config, method, self.fastpref_method_kwargs)
        train_dataset = params.get("train_dataset")
        if train_dataset is not None:
            params["train_dataset"] = self._check_dataset(train_dataset, "train_dataset", train=True)
        eval_dataset = params.get("eval_dataset")
        if isinstance(eval_dataset, dict):
            for name, dataset in eval_dataset.items():
                self._check_dataset(dataset, f"eval_dataset[{name!r}]", train=False)
        elif eval_dataset is not None:
            self._check_dataset(eval_dataset, "eval_dataset", train=False)
        if method in ("drdo", "auxdpo"):
            _check_owned_modules(config, method, self.fastpref_method_kwargs, params.get("optimizers"))
        skip_reference = self._resolve_reference(params, config)

        # TRL 1.16 turns padding_free off with a warning ("temporarily unavailable"); fastpref packs the batches
        # itself (below), so TRL sees padding_free=False and the config keeps the user's value.
        padding_free = bool(getattr(config, "padding_free", False))
        # TRL's precompute pass (inside DPOTrainer.__init__) already calls compute_ref_log_probs, which patches
        # the model it is given on first use.
        try:
            if padding_free:
                config.padding_free = False
            with _no_reference_loading(self) if skip_reference else contextlib.nullcontext():
                super().__init__(*bound.args[1:], **bound.kwargs)
        finally:
            if padding_free:
                config.padding_free = True

        missing = [name for name in ("_metrics", "ref_model") if not hasattr(self, name)]
        if missing:
            raise NotImplementedError(f"FastPrefDPOTrainer: this TRL's DPOTrainer has no {missing}; fastpref "
                                      "supports the TRL 1.x DPOTrainer layout (tested with 1.16)")
        if getattr(self, "_is_vision_dataset", False):
            raise NotImplementedError("FastPrefDPOTrainer: vision datasets are not supported: TRL prepares them on the "
                                      "fly with its vision collator, whose image-token layout the fused path has not "
                                      "been checked against; use the stock DPOTrainer for vision-language models")
        self._fastpref_patch_all()
        self._fastpref_guard = NonFiniteStepGuard(self)
        self.add_callback(self._fastpref_guard)
        self.fastpref_modules = nn.ModuleDict()
        self._fastpref_columns: dict[str, torch.dtype] = {}
        if method == "drdo":
            head = self.fastpref_method_kwargs["reward_head"]
            if head is None:  # sized from the head module (its weight may be a ZeRO-3 placeholder or a shard)
                hidden_size = whole_shape(self._fastpref_head())[1]
                head = nn.Linear(hidden_size, 1)
            self.fastpref_modules["reward_head"] = head.to(self.args.device)
            self._fastpref_columns.update({name: torch.float32 for name in ORACLE_COLUMNS})
        elif method == "auxdpo":
            settings = self.fastpref_method_kwargs
            if settings["null_penalty"] == "params" and self.ref_model is None:
                raise _error("method='auxdpo' with null_penalty='params' differentiates the reference model's "
                             "parameters, so it needs a separate `ref_model` (a PEFT policy's adapter-disabled base "
                             "has none to differentiate); pass ref_model=..., or use null_penalty='head'")
            if settings["null_penalty"] == "params" and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                raise NotImplementedError("FastPrefDPOTrainer: method='auxdpo' with null_penalty='params' "
                                          "differentiates the reference model's parameters, which FSDP / DeepSpeed "
                                          "shard; use null_penalty='head' (the reference head, gathered)")
            offsets = nn.Module()
            offsets.delta_raw = nn.Parameter(torch.randn(2 * self._fastpref_num_examples) * settings["init_std"])
            self.fastpref_modules["auxdpo"] = offsets.to(self.args.device)
            self._fastpref_columns[INDEX_COLUMN] = torch.long
        if self._fastpref_columns:
            optional = {INDEX_COLUMN}  # evaluation batches of auxdpo use delta = 0 and need no index
            self.data_collator = ExtraColumnsCollator(self.data_collator, self._fastpref_columns, optional)
        self.padding_free = padding_free
        if padding_free:  # every later batch (training, evaluation) packed into one row; the precompute pass,
            self.data_collator = PackingCollator(self.data_collator)  # done above, saw padded batches
        # The extra parameters are replicated on every rank: gradients averaged over the ranks before each step and
        # cleared after it (the Trainer clears only the model's); under DeepSpeed / FSDP, which own the model's
        # optimizer, their groups get an optimizer of their own (fastpref.distributed.replicated)
        self._fastpref_replicated = ReplicatedParameters(
            list(self.fastpref_modules.parameters()), self._fastpref_param_groups,
            own_optimizer=bool(self.is_deepspeed_enabled or self.is_fsdp_enabled),
            step_skipped=lambda: self.accelerator.optimizer_step_was_skipped)
        if len(self.fastpref_modules):
            self.add_callback(self._fastpref_replicated)

    # ------------------------------------------------------------------------------------------ properties

    @property
    def reward_head(self) -> Optional[nn.Module]:
        """DRDO's student reward head (``method="drdo"``), else None."""
        return self.fastpref_modules["reward_head"] if "reward_head" in self.fastpref_modules else None

    @property
    def delta_raw(self) -> Optional[nn.Parameter]:
        """AuxDPO's trainable ``delta_raw [2 * num_examples]`` (``method="auxdpo"``), else None."""
        return self.fastpref_modules["auxdpo"].delta_raw if "auxdpo" in self.fastpref_modules else None

    @property
    def delta(self) -> Optional[torch.Tensor]:
        """AuxDPO's per-example offsets ``cap * tanh(delta_raw)`` ``[2 * num_examples]`` (``method="auxdpo"``)."""
        if "auxdpo" not in self.fastpref_modules:
            return None
        return bounded_delta(self.fastpref_modules["auxdpo"].delta_raw, self.fastpref_method_kwargs["cap"])

    @property
    def uses_reference(self) -> bool:
        """False for the reference-free methods and for ``reference_free=True`` (a config field of other TRL
        releases: the reference log-probs are 0)."""
        return self.fastpref_method not in REFERENCE_FREE and not getattr(self.args, "reference_free", False)

    # ------------------------------------------------------------------------------------------ setup

    def _resolve_reference(self, params: dict, config: DPOConfig) -> bool:
        """The reference model, before TRL builds one. Returns True when TRL must not load one.

        TRL 1.16, given ``ref_model=None`` and a model instance without PEFT, *reloads* the policy from
        ``model.config._name_or_path``: that fails for a model built from a config (``Repo id must use
        alphanumeric chars ... ''``) and silently differs from the policy for one changed after loading. Here:

        * reference-free methods (``simpo``, ``typo``, ``drdo``) get no reference at all (nothing built, loaded or
          precomputed); ``precompute_ref_log_probs`` and ``sync_ref_model`` are refused for them;
        * the other methods get a frozen copy of the policy as passed (``copy.deepcopy``, ``requires_grad=False``,
          eval mode), as TRL's own ``create_reference_model`` and older TRL releases do. With PEFT (a
          ``PeftModel`` or ``peft_config``) the reference is the adapter-disabled policy and with
          ``precompute_ref_log_probs=True`` the policy before training, as in TRL; a model given by name is loaded
          by TRL, reference included.
        """
        model, ref_model = params.get("model"), params.get("ref_model")
        method = self.fastpref_method
        uses_peft = params.get("peft_config") is not None or (isinstance(model, nn.Module) and is_peft_model(model))
        if method in REFERENCE_FREE or getattr(config, "reference_free", False):
            what = f"method={method!r}" if method in REFERENCE_FREE else "`reference_free=True`"
            if config.precompute_ref_log_probs:
                raise _error(f"{what} is reference-free: `precompute_ref_log_probs=True` would run a "
                             "reference pass it never uses; set it to False")
            if getattr(config, "sync_ref_model", False):
                raise _error(f"{what} is reference-free: there is no reference to sync (`sync_ref_model=True`)")
            return ref_model is None and not uses_peft
        if ref_model is None and isinstance(model, nn.Module) and not uses_peft and not config.precompute_ref_log_probs:
            reference = copy.deepcopy(model)
            reference.requires_grad_(False)
            params["ref_model"] = reference.eval()
        return False

    def _check_dataset(self, dataset, name: str, *, train: bool):
        method = self.fastpref_method
        try:
            columns = set(dataset.column_names or ())
        except Exception:  # pragma: no cover - IterableDataset without known features
            columns = set()
        if not columns:
            try:
                columns = set(next(iter(dataset)).keys())
            except Exception:  # pragma: no cover
                columns = set()
        if {"image", "images"} & columns:
            raise NotImplementedError(f"FastPrefDPOTrainer: vision datasets are not supported (`{name}` has images)")
        if method == "drdo":
            missing = [c for c in ORACLE_COLUMNS if c not in columns]
            if missing:
                raise _error(f"method='drdo' needs the oracle rewards as columns {list(ORACLE_COLUMNS)} of "
                             f"`{name}`; missing {missing}")
        if method == "auxdpo" and train:
            settings = self.fastpref_method_kwargs
            if INDEX_COLUMN not in columns:
                if not hasattr(dataset, "add_column") or not hasattr(dataset, "__len__"):
                    raise _error(f"method='auxdpo' needs an `{INDEX_COLUMN}` column (the example's index into "
                                 f"`delta`) in `{name}`")
                dataset = dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
            num = settings["num_examples"]
            if num is None:
                if not hasattr(dataset, "__len__"):
                    raise _error("method='auxdpo' with an IterableDataset needs `method_kwargs['num_examples']`")
                index = dataset[INDEX_COLUMN]
                if len(index) == 0:
                    raise _error(f"`{name}` is empty")
                num = int(max(index)) + 1
                if min(index) < 0:
                    raise _error(f"`{name}[{INDEX_COLUMN!r}]` holds negative indices")
            elif hasattr(dataset, "__len__") and len(dataset):
                index = dataset[INDEX_COLUMN]
                if min(index) < 0 or max(index) >= num:
                    raise _error(f"`{name}[{INDEX_COLUMN!r}]` holds indices outside [0, num_examples={num})")
            self._fastpref_num_examples = num
        return dataset

    def _fastpref_patch(self, model: nn.Module) -> None:
        lm = find_causal_lm(self.accelerator.unwrap_model(model))
        state = lm.__dict__.get(_STATE)
        if state is None or state.backend != self.fastpref_backend or state.reduction != "sum":
            # the wrapped model itself (DDP / FSDP / a DeepSpeed engine): a sharded head is checked by gathering it
            # through its wrapper, the same way on every rank
            patch(model, backend=self.fastpref_backend)  # verifies against the class's forward, autocast off

    def _fastpref_patch_all(self) -> None:
        self._fastpref_patch(self.model)
        if self.ref_model is not None:
            self._fastpref_patch(self.ref_model)

    def _fastpref_head(self) -> nn.Module:
        lm = find_causal_lm(self.accelerator.unwrap_model(self.model))
        return resolve_head(lm.get_output_embeddings())

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for name in getattr(self, "_fastpref_columns", {}):
            if self._signature_columns is not None and name not in self._signature_columns:
                self._signature_columns.append(name)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.optimizer is not None and not self._fastpref_replicated.own_optimizer:
            held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            for group in self._fastpref_param_groups(held):
                self.optimizer.add_param_group(group)
        return optimizer if optimizer is not None else self.optimizer

    def _fastpref_param_groups(self, held=frozenset()) -> list[dict]:
        """One optimizer group per trainer-owned module (no weight decay; AuxDPO's offsets at their own rate)."""
        groups = []
        for name, module in self.fastpref_modules.items():
            new = [p for p in module.parameters() if p.requires_grad and id(p) not in held]
            if new:
                group = {"params": new, "weight_decay": 0.0}
                if name == "auxdpo":  # the authors' learning rate for delta, not the policy's
                    group["lr"] = self.fastpref_method_kwargs["delta_learning_rate"]
                groups.append(group)
        return groups

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if len(list(self.fastpref_modules.parameters())) and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.fastpref_modules.state_dict(), os.path.join(output_dir, "fastpref_modules.pt"))

    # ------------------------------------------------------------------------------------------ forwards

    def _model_kwargs(self, inputs: dict, *, ld: bool) -> dict:
        kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        kwargs["logps_only"] = True
        if ld:
            kwargs["segment_ids"] = ld_segment_ids(inputs["completion_mask"], packed_offsets(inputs))
        else:
            kwargs["completion_mask"] = inputs["completion_mask"]
        return kwargs

    def _sequence_logps(self, logps) -> torch.Tensor:
        """Per-sequence log-prob TRL's loss sees: the response sum, or LD-DPO's shared + ld_alpha * tail."""
        ld_alpha = getattr(self.args, "ld_alpha", None)
        if ld_alpha is None:
            return logps.response
        return logps.response + ld_alpha * logps.prompt

    def _reference_forward(self, model: nn.Module, inputs: dict, *, capture: bool = False):
        """Fused reference forward under no_grad: ``(per-sequence logps [2B], captured hidden or None, head)``."""
        kwargs = self._model_kwargs(inputs, ld=getattr(self.args, "ld_alpha", None) is not None)
        kwargs.pop("output_router_logits", None)
        unwrapped = self.accelerator.unwrap_model(model)
        adapter = reference_adapter(unwrapped) if self.ref_model is None and is_peft_model(unwrapped) else contextlib.nullcontext()
        self._fastpref_patch(model)
        with torch.no_grad(), no_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            if capture:
                with capture_backbone_hidden(unwrapped) as store:
                    out = model(**kwargs)
                lm = find_causal_lm(unwrapped)
                return self._sequence_logps(out.logps), store[-1], (lm, model)
            out = model(**kwargs)
        return self._sequence_logps(out.logps), None, None

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL's precompute pass), from the fused forward."""
        logps, _, _ = self._reference_forward(model, inputs)
        return logps.chunk(2, dim=0)

    # ------------------------------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss (or the selected method's) from fused log-probs. In training, a forward that overflows
        (:class:`fastpref.NonFiniteError`) gives a NaN loss and its optimizer step is skipped
        (:mod:`fastpref.integrations._step_guard`)."""
        return self._fastpref_guard.loss_or_skip(model, lambda: self._fastpref_loss(model, inputs, return_outputs),
                                                 training=self.model.training and not return_outputs)

    def _fastpref_loss(self, model, inputs, return_outputs=False):
        mode = "train" if self.model.training else "eval"
        args = self.args
        method = self.fastpref_method
        completion_mask = inputs["completion_mask"]
        ld = getattr(args, "ld_alpha", None) is not None
        aux = bool(getattr(self, "aux_loss_enabled", False))

        self._fastpref_patch(model)
        kwargs = self._model_kwargs(inputs, ld=ld)
        kwargs["return_stats"] = True  # entropy, mean logit, argmax == label, log sum p^2: TRL's
        # token metrics and WPO
        if aux:
            kwargs["output_router_logits"] = True
        with self.accelerator.autocast():  # as accelerate's wrapper of the prepared model's forward would
            outputs = model(**kwargs)
        pol = outputs.logps
        logps = self._sequence_logps(pol)
        chosen, rejected = logps.chunk(2, dim=0)

        ref_hidden = ref_head = None
        if self.uses_reference:
            if args.precompute_ref_log_probs:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
                ref_chosen, ref_rejected = ref_chosen.to(chosen.device), ref_rejected.to(chosen.device)
            else:
                reference = self.ref_model if self.ref_model is not None else self.model
                capture = (method == "auxdpo" and self.fastpref_method_kwargs["null_penalty"] == "head"
                           and mode == "train")
                ref_logps, ref_hidden, ref_head = self._reference_forward(reference, inputs, capture=capture)
                ref_chosen, ref_rejected = ref_logps.to(chosen.device).chunk(2, dim=0)
        else:  # reference-free (TRL's reference_free=True: the reference assigns every response log-prob 0)
            ref_chosen, ref_rejected = torch.zeros_like(chosen.detach()), torch.zeros_like(rejected.detach())

        settings = self.fastpref_method_kwargs
        backend = self.fastpref_backend
        if method == "dpo":
            loss, metrics = self._dpo_loss(chosen, rejected, ref_chosen, ref_rejected, pol, completion_mask,
                                           packed_offsets(inputs),
                                           wpo_weights=self._wpo_weights(pol) if args.use_weighting else None)
        elif method == "pro":
            loss, metrics = pro_loss(torch.cat([chosen, rejected]), torch.cat([ref_chosen, ref_rejected]),
                                     feedback="pairwise", beta=args.beta, backend=backend, **settings)
        elif method == "simpo":
            n_chosen, n_rejected = pol.n_response.chunk(2, dim=0)
            loss, metrics = simpo_loss(chosen, rejected, n_chosen, n_rejected, beta=args.beta,
                                       label_smoothing=args.label_smoothing, backend=backend, **settings)
        elif method == "typo":  # lam = 0.0, explicitly: the supervised term alone (checked at construction)
            loss, metrics = typo_loss(chosen, rejected, unsup_logps=None, backend=backend)
        elif method == "drdo":
            head = self.fastpref_modules["reward_head"]
            dtype = next(head.parameters()).dtype
            rhat = head(outputs.last_hidden.to(dtype)).reshape(-1)
            rhat_chosen, rhat_rejected = rhat.chunk(2, dim=0)
            oracle_chosen, oracle_rejected = (inputs[c].to(chosen.device) for c in ORACLE_COLUMNS)
            loss, metrics = drdo_loss(chosen, rejected, rhat_chosen, rhat_rejected, oracle_chosen, oracle_rejected,
                                      alpha=settings["alpha"], gamma=settings["gamma"], backend=backend)
        else:  # auxdpo
            loss, metrics = self._auxdpo_loss(inputs, chosen, rejected, ref_chosen, ref_rejected, ref_hidden,
                                              ref_head, mode)

        if aux:
            aux_loss = _router_aux_loss(self.model, outputs, inputs.get("attention_mask"))
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())

        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if pol.stats is not None:
            self._log_token_metrics(pol, mode)
        for key, value in metrics.items():
            value = value.detach().reshape(1).float()
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())

        if return_outputs:  # TRL's deprecated eval path: logits for compute_metrics, recomputed normally
            with torch.no_grad():
                plain = model_inputs_without_mask(inputs, set(inputs) - _NON_MODEL_KEYS)
                outputs = model(**plain)
            return loss, outputs
        return loss

    def _log_token_metrics(self, pol, mode: str) -> None:
        """TRL's token-level metrics from the fused forward's statistics, as TRL 1.16's ``_compute_loss`` defines
        them: ``entropy`` (mean over every completion token), ``logits/chosen`` / ``logits/rejected`` (mean over
        the chosen / rejected completion tokens of the token's mean logit ``mean_v z_v``) and
        ``mean_token_accuracy`` (fraction of the chosen completion tokens whose label is the argmax); token sums
        and counts gathered over the processes before dividing, 0 where there is no token."""
        stats = pol.stats

        def completion(name):  # per sequence, over its completion tokens (both segments under LD-DPO)
            return (getattr(stats.response, name) + getattr(stats.prompt, name)).detach().double()

        entropy, mean_logit, correct = completion("entropy"), completion("mean_logit"), completion("argmax_is_label")
        tokens = (pol.n_response + pol.n_prompt).detach().double()
        half = tokens.shape[0] // 2
        gather = self.accelerator.gather_for_metrics

        def ratio(num, den):
            num, den = gather(num.reshape(1)).sum().item(), gather(den.reshape(1)).sum().item()
            return num / den if den > 0 else 0.0

        self._metrics[mode]["entropy"].append(ratio(entropy.sum(), tokens.sum()))
        self._metrics[mode]["logits/chosen"].append(ratio(mean_logit[:half].sum(), tokens[:half].sum()))
        self._metrics[mode]["logits/rejected"].append(ratio(mean_logit[half:].sum(), tokens[half:].sum()))
        self._metrics[mode]["mean_token_accuracy"].append(ratio(correct[:half].sum(), tokens[:half].sum()))

    @staticmethod
    def _wpo_weights(pol) -> torch.Tensor:
        """WPO's per-pair weights (Zhou et al., 2024, eq. 2; TRL 1.16's ``use_weighting=True``), without gradient:
        per sequence ``exp(mean over its completion tokens of (log p(y_t) - log sum_v p_v^2))``, chosen times
        rejected. The token sums come from the fused forward (``log sum_v p_v^2`` is one of its statistics)."""
        with torch.no_grad():
            logps = (pol.response + pol.prompt).double()  # the tokens' own log-probs (no LD weighting, as TRL)
            log_sum_p2 = (pol.stats.response.log_sum_p2 + pol.stats.prompt.log_sum_p2).double()
            tokens = (pol.n_response + pol.n_prompt).double().clamp(min=1)
            weights = torch.exp((logps - log_sum_p2) / tokens)
            chosen, rejected = weights.chunk(2, dim=0)
            return (chosen * rejected).float()

    def _dpo_loss(self, chosen, rejected, ref_chosen, ref_rejected, pol, completion_mask, offsets, *,
                  wpo_weights=None):
        args = self.args
        # TRL: ipo / sigmoid_norm divide by completion_mask.sum(1); sft averages the scored (shifted) tokens'
        # raw log-probs (no LD weighting).
        counts, scored = completion_counts(completion_mask, offsets)  # offsets: a padding-free batch's, or None
        n_chosen, n_rejected = counts.chunk(2, dim=0)
        n_scored, _ = scored.chunk(2, dim=0)
        ld = getattr(args, "ld_alpha", None) is not None
        raw_chosen = (pol.response + pol.prompt if ld else pol.response).chunk(2, dim=0)[0]
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        common = dict(beta=args.beta, label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
                      f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                      wpo_weights=None if wpo_weights is None else wpo_weights.to(chosen.device),
                      backend=self.fastpref_backend)
        loss = None
        for loss_type, weight in zip(args.loss_type, weights):
            if loss_type == "sft":
                term, _ = dpo_loss(raw_chosen, rejected, ref_chosen, ref_rejected, loss_type="sft",
                                   chosen_lengths=n_scored, **common)
            else:
                term, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type,
                                   chosen_lengths=n_chosen, rejected_lengths=n_rejected, **common)
            term = term * weight
            loss = term if loss is None else loss + term
        rpo_alpha = getattr(args, "rpo_alpha", None)
        nll = None
        if rpo_alpha is not None:  # RPO (a config field of other TRL releases): + rpo_alpha * the chosen tokens' NLL
            nll, _ = nll_loss(raw_chosen, n_scored)
            loss = loss + rpo_alpha * nll
        with torch.no_grad():
            chosen_rewards = args.beta * (chosen.float() - ref_chosen.float())
            rejected_rewards = args.beta * (rejected.float() - ref_rejected.float())
            metrics = {
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen.float().mean(),
                "logps/rejected": rejected.float().mean(),
            }
            if nll is not None:
                metrics["nll_loss"] = nll.detach()
        return loss, metrics

    def _auxdpo_loss(self, inputs, chosen, rejected, ref_chosen, ref_rejected, ref_hidden, ref_head, mode):
        settings = self.fastpref_method_kwargs
        delta = self.delta
        if mode == "train":
            if INDEX_COLUMN not in inputs:
                raise _error(f"method='auxdpo' needs the `{INDEX_COLUMN}` column in every training batch")
            index = inputs[INDEX_COLUMN].to(delta.device).long()
            if bool(((index < 0) | (index >= delta.numel() // 2)).any()):
                raise _error(f"`{INDEX_COLUMN}` holds values outside [0, {delta.numel() // 2})")
            delta_chosen, delta_rejected = delta[2 * index], delta[2 * index + 1]
        else:  # delta belongs to the training examples; evaluation is AuxDPO with zero offsets
            delta_chosen = delta_rejected = torch.zeros_like(chosen)
        penalty = None
        if mode == "train" and settings["null_penalty"] == "params":
            penalty = self._param_null_penalty(inputs, torch.cat([delta_chosen, delta_rejected]))
            penalty = penalty.to(chosen.device).reshape(())
        elif ref_hidden is not None:
            lm, wrapped = ref_head
            module = lm.get_output_embeddings()
            head, transform = resolve_head(module), lm.__dict__[_STATE].transform
            # read outside the reference forward, without gradient: gathered when sharded (every rank)
            with whole_parameters(module, head, root=wrapped) as whole:
                weight, bias = head_parameters(probe_head(head, whole), transform)
                penalty = self._auxdpo_penalty(inputs, ref_hidden, weight, bias, transform, delta_chosen,
                                               delta_rejected, chosen)
        return auxdpo_loss(chosen, rejected, ref_chosen, ref_rejected, delta_chosen.to(chosen.device),
                           delta_rejected.to(chosen.device), beta=self.args.beta, null_penalty=penalty,
                           lambda_null=settings["lambda_null"], lambda_amp=settings["lambda_amp"],
                           backend=self.fastpref_backend)

    def _auxdpo_penalty(self, inputs, ref_hidden, weight, bias, transform, delta_chosen, delta_rejected, chosen):
        """AuxDPO's exact LM-head null-space penalty from the reference hidden states and the whole head."""
        labels, segments, cu, _, _ = _targets(inputs["input_ids"], inputs.get("attention_mask"),
                                              inputs.get("position_ids"), inputs["completion_mask"], None, None, {},
                                              False)
        hidden = ref_hidden.detach().to(device=weight.device, dtype=weight.dtype)  # the head's dtype
        if cu is not None:  # padding-free: the packed rows and their offsets
            hidden, labels, segments = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), segments.reshape(-1)
            cu = cu.to(weight.device)
        return head_null_penalty(
            hidden, weight.detach(), labels.to(weight.device),
            torch.cat([delta_chosen, delta_rejected]).to(torch.float32), segments.to(weight.device),
            bias=None if bias is None else bias.detach(), logit_scale=transform.logit_scale,
            softcap=transform.softcap, cu_seqlens=cu, backend=self.fastpref_backend).to(chosen.device).reshape(())

    def _param_null_penalty(self, inputs, delta: torch.Tensor) -> torch.Tensor:
        """AuxDPO's ``||A delta||^2`` over the reference copies of every parameter the policy trains (the authors'
        form), by double backward through the reference model's materialized logits."""
        policy = self.accelerator.unwrap_model(self.model)
        reference = self.accelerator.unwrap_model(self.ref_model)
        trained = {n for n, p in policy.named_parameters() if p.requires_grad}
        params = [p for n, p in reference.named_parameters() if n in trained]
        if not params:
            raise _error("null_penalty='params' found no reference parameter named like the policy's trainable "
                         "ones; the reference model must have the policy's architecture")
        labels, segments, cu, _, _ = _targets(inputs["input_ids"], inputs.get("attention_mask"),
                                              inputs.get("position_ids"), inputs["completion_mask"], None, None, {},
                                              False)
        model_inputs = model_inputs_without_mask(inputs, ("input_ids", "attention_mask", "position_ids"))

        def ref_logps():  # the model's own forward (not logps_only): double-differentiable
            logits = reference(**model_inputs, use_cache=False).logits
            return response_logps_materialized(logits, labels, segments, cu)

        return param_null_penalty(ref_logps, params, delta.to(torch.float32))


# ---------------------------------------------------------------------------------------------- checks


@contextlib.contextmanager
def _no_reference_loading(trainer: "FastPrefDPOTrainer"):
    """While ``DPOTrainer.__init__`` runs: TRL's reference loading (``create_model_from_path`` once the trainer has
    its ``model``; the policy given by name is loaded before that, normally) yields no model, so a reference-free
    method leaves ``ref_model`` None without loading anything."""
    import trl.trainer.dpo_trainer as dpo_module

    original = dpo_module.create_model_from_path

    def load(*args, **kwargs):
        if getattr(trainer, "model", None) is None:  # the policy, given as a name
            return original(*args, **kwargs)
        return None

    dpo_module.create_model_from_path = load
    try:
        yield
    finally:
        dpo_module.create_model_from_path = original


def _check_trl(config: DPOConfig) -> None:
    """The pieces of TRL's DPOTrainer this subclass relies on (TRL 1.x)."""
    problems = []
    if config.precompute_ref_log_probs:  # the precompute pass must call our compute_ref_log_probs(model, inputs)
        ref = getattr(DPOTrainer, "compute_ref_log_probs", None)
        if ref is None or list(inspect.signature(ref).parameters)[1:3] != ["model", "inputs"]:
            problems.append("`compute_ref_log_probs(self, model, inputs)` (for precompute_ref_log_probs=True)")
    init = inspect.signature(DPOTrainer.__init__).parameters
    for name in ("model", "ref_model", "args", "train_dataset"):
        if name not in init:
            problems.append(f"the `{name}` constructor argument")
    import trl.trainer.dpo_trainer as dpo_module

    if not callable(getattr(dpo_module, "create_model_from_path", None)):  # how a reference-free method skips it
        problems.append("`trl.trainer.dpo_trainer.create_model_from_path` (the reference-model loader)")
    if problems:
        import trl

        raise NotImplementedError(
            f"FastPrefDPOTrainer supports TRL 1.x's DPOTrainer (tested with 1.16); TRL {trl.__version__} lacks "
            + ", ".join(problems))


def _method_settings(method: str, method_kwargs: Optional[dict]) -> dict:
    if method_kwargs is None:
        method_kwargs = {}
    if not isinstance(method_kwargs, dict):
        raise TypeError(f"FastPrefDPOTrainer: `method_kwargs` must be a dict, got {type(method_kwargs).__name__}")
    defaults = _METHOD_DEFAULTS[method]
    if "beta" in method_kwargs:
        raise _error("`beta` is set with `DPOConfig.beta`, not in `method_kwargs`")
    if "label_smoothing" in method_kwargs:
        raise _error("`label_smoothing` is set with `DPOConfig.label_smoothing`, not in `method_kwargs`")
    unknown = sorted(set(method_kwargs) - set(defaults))
    if unknown:
        allowed = sorted(defaults) or "none"
        raise _error(f"unknown `method_kwargs` {unknown} for method={method!r} (allowed: {allowed})")
    return {**defaults, **method_kwargs}


def _check_config(config: DPOConfig, method: str, settings: dict) -> None:
    """Raise for what the fused path cannot reproduce, and try the method's loss on a dummy batch."""
    if getattr(config, "use_liger_loss", False):  # a field of other TRL releases
        raise NotImplementedError("FastPrefDPOTrainer: `use_liger_loss=True` asks for Liger's fused loss in place of "
                                  "the one FastPrefDPOTrainer computes: the two cannot both compute it. Drop it (the "
                                  "fused head is already fastpref's), or use Liger's own trainer")
    rpo_alpha = getattr(config, "rpo_alpha", None)
    if rpo_alpha is not None and (isinstance(rpo_alpha, bool) or not isinstance(rpo_alpha, (int, float))
                                  or not math.isfinite(rpo_alpha) or rpo_alpha < 0):
        raise _error(f"`rpo_alpha` must be a finite number >= 0 or None, got {rpo_alpha!r}")
    if method != "dpo":
        for name, default in _DEFAULT_DPO_FIELDS.items():
            value = getattr(config, name, default)
            if value != default:
                raise _error(f"`DPOConfig.{name}={value!r}` is only used with method='dpo' (got method={method!r})")
        if config.label_smoothing and method != "simpo":
            raise _error(f"`DPOConfig.label_smoothing` is only used with method='dpo' or 'simpo' "
                         f"(got method={method!r})")
    if method == "drdo":
        head = settings["reward_head"]
        if head is not None and not isinstance(head, nn.Module):
            raise TypeError(f"FastPrefDPOTrainer: `method_kwargs['reward_head']` must be an nn.Module, "
                            f"got {type(head).__name__}")
    if method == "auxdpo":
        if settings["null_penalty"] not in _NULL_PENALTIES:
            raise _error(f"`method_kwargs['null_penalty']` must be one of {_NULL_PENALTIES}, "
                         f"got {settings['null_penalty']!r}")
        if settings["null_penalty"] == "head" and config.precompute_ref_log_probs:
            raise _error("method='auxdpo' with null_penalty='head' needs the reference hidden states of every "
                         "batch, so not precompute_ref_log_probs=True; set null_penalty=None or precompute=False")
        num = settings["num_examples"]
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
            raise _error(f"`method_kwargs['num_examples']` must be a positive int, got {num!r}")
    try:
        _dummy_loss(config, method, settings)
    except (TypeError, ValueError) as exc:
        raise _error(f"bad configuration for method={method!r}: {exc}") from exc


def _dummy_loss(config: DPOConfig, method: str, settings: dict) -> None:
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    cw, cl, rw, rl, n = t(-3.0, -4.0), t(-5.0, -2.5), t(-3.5, -4.5), t(-4.5, -3.0), t(2.0, 3.0)
    if method == "dpo":
        loss_weights = config.loss_weights
        if loss_weights is not None and len(loss_weights) != len(config.loss_type):
            raise ValueError(f"`loss_weights` has {len(loss_weights)} entries for {len(config.loss_type)} loss types")
        dpo_loss(cw, cl, rw, rl, beta=config.beta, loss_type=config.loss_type, loss_weights=loss_weights,
                 label_smoothing=config.label_smoothing, chosen_lengths=n, rejected_lengths=n,
                 discopop_tau=config.discopop_tau, f_divergence_type=config.f_divergence_type,
                 f_alpha_divergence_coef=config.f_alpha_divergence_coef)
        ld = config.ld_alpha
        if ld is not None and (isinstance(ld, bool) or not isinstance(ld, (int, float)) or not math.isfinite(ld)):
            raise ValueError(f"`ld_alpha` must be a finite number or None, got {ld!r}")
    elif method == "pro":
        if settings["hyper_response"] not in PRO_HYPER_RESPONSE:
            raise ValueError(f"`hyper_response` must be one of {PRO_HYPER_RESPONSE}")
        pro_loss(torch.cat([cw, cl]), torch.cat([rw, rl]), feedback="pairwise", beta=config.beta, **settings)
    elif method == "simpo":
        simpo_loss(cw, cl, n, n, beta=config.beta, label_smoothing=config.label_smoothing, **settings)
    elif method == "typo":
        if settings["lam"] is None or settings["lam"] != 0.0:
            raise NotImplementedError(
                "FastPrefDPOTrainer: method='typo' needs responses sampled from the reference model for its "
                "unsupervised term (lam * E[-log pi(y_u)], lam = 0.05), which a TRL preference dataset cannot carry; "
                "without them it would silently train with lam = 0. Use fastpref.trainers.TYPOTrainer with samples "
                "from fastpref.sampling.sample_reference_responses, or pass method_kwargs={'lam': 0.0} to train the "
                "supervised term alone on purpose")
        typo_loss(cw, cl, unsup_logps=None)
    elif method == "drdo":
        drdo_loss(cw, cl, t(0.0, 0.0), t(0.0, 0.0), t(1.0, 0.0), t(0.0, 1.0), alpha=settings["alpha"],
                  gamma=settings["gamma"])
    else:
        auxdpo_loss(cw, cl, rw, rl, t(0.0, 0.0), t(0.0, 0.0), beta=config.beta, null_penalty=t(0.0)[0],
                    lambda_null=settings["lambda_null"], lambda_amp=settings["lambda_amp"])
        bounded_delta(cw, settings["cap"])
        for name in ("init_std", "delta_learning_rate"):
            value = settings[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")


def _check_owned_modules(config: DPOConfig, method: str, settings: dict, optimizers) -> None:
    """drdo / auxdpo train a module the trainer owns (outside the model): the Trainer's optimizer must hold it."""
    optimizer = (optimizers or (None, None))[0]
    if optimizer is None:
        return
    head = settings.get("reward_head")
    if method == "drdo" and head is not None:
        given = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if all(id(p) in given for p in head.parameters()):
            return
    owned = "the reward head" if method == "drdo" else "delta"
    raise _error(f"method={method!r} trains `trainer.fastpref_modules` ({owned}), "
                 "which the optimizer passed in `optimizers` does not hold; let the Trainer build the optimizer (for "
                 "drdo you may also pass `method_kwargs['reward_head']` and include its parameters)")


def _router_aux_loss(model: nn.Module, outputs, attention_mask) -> torch.Tensor:
    """MoE load-balancing loss, as TRL 1.16's fused LM head computes it (Mixtral's function)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    router_logits = getattr(outputs, "router_logits", None)
    if router_logits is None:
        raise _error("the model returned no router logits for its MoE auxiliary loss; set "
                     "`router_aux_loss_coef=0.0` to train without it")
    text_config = find_causal_lm(model).config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts")
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)
