"""TRL drop-ins: :class:`FastPrefCPOTrainer` (CPO, CPO-SimPO, hinge, IPO, AlphaPO) and :class:`FastPrefORPOTrainer`.

::

    from trl.experimental.cpo import CPOConfig
    from fastpref.trainers import FastPrefCPOTrainer      # was: from trl.experimental.cpo import CPOTrainer

    trainer = FastPrefCPOTrainer(model, args=CPOConfig(...), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Same constructors and configs as TRL's ``CPOTrainer`` / ``ORPOTrainer`` (``trl.experimental``, TRL 1.16: both are
reference-free and share their data pipeline), plus a keyword-only ``fastpref_backend`` (``"auto"``, ``"triton"``,
``"torch"``). The policy is patched with :func:`fastpref.integrations.transformers.patch`; each step calls it with
``logps_only=True``, so the sequence log-probs and the NLL come from one fused pass (no ``tokens x vocab`` logits).
TRL's ``get_batch_loss_metrics`` is replaced, with the same loss and the same metrics under the same names:

* CPO: :func:`fastpref.losses.functional.cpo_loss` (``loss_type`` ``sigmoid`` / ``hinge`` / ``ipo`` / ``simpo``,
  ``label_smoothing``, ``simpo_gamma``, AlphaPO's ``alpha``, ``cpo_alpha`` times the chosen completions' NLL);
* ORPO: :func:`fastpref.losses.functional.orpo_loss` on length-averaged log-probs, plus the chosen sequences' NLL over
  prompt **and** completion tokens, as TRL's ORPOTrainer computes it;
* metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/*``,
  ``nll_loss`` (ORPO: ``log_odds_ratio``, ``log_odds_chosen``) and ``logits/chosen`` / ``logits/rejected``: TRL's
  mean of every logit of every position of the chosen / rejected rows (ORPO: all but the last position), computed
  exactly from the backbone's hidden states (:mod:`fastpref._logit_totals`; a softcapped head takes one no-grad fused
  pass over the rows). ``eval_`` prefix in evaluation, as TRL.

MoE models: the router load-balancing loss is added as TRL's trainers add the model's ``aux_loss``.

Refused at construction: encoder-decoder models (the patch serves decoder-only ``*ForCausalLM``), and labels that are
not the input ids (a custom collator: the fused head scores ``input_ids`` shifted by one, as TRL's
``get_batch_logps`` does with TRL's own collator). A training step whose forward or gradients are not finite (pure
fp16) is skipped and counted in the logged ``skipped_steps``, as in :class:`~fastpref.trainers.FastPrefDPOTrainer`,
where stock applies the NaN update; in evaluation a non-finite forward raises.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

try:
    import warnings

    with warnings.catch_warnings():  # TRL warns on every import of trl.experimental
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
except ImportError as exc:  # pragma: no cover - trl is an optional dependency
    from .._hints import install_hint

    raise ImportError(f"fastpref.trainers.cpo needs TRL (trl.experimental.cpo / orpo): {install_hint('trl')}") from exc

from .._logit_totals import logits_total
from ..logprobs import BACKENDS
from ..losses.cpo import cpo_loss
from ..losses.orpo import orpo_loss
from ..integrations._hf_utils import find_causal_lm, head_parameters, resolve_head
from ..integrations._step_guard import NonFiniteStepGuard
from ..integrations._trl_utils import capture_backbone_hidden
from ..integrations.transformers import _STATE, patch
from .dpo import _router_aux_loss

__all__ = ["FastPrefCPOTrainer", "FastPrefORPOTrainer"]

PROMPT, RESPONSE = 1, 2


class _FusedPairLoss:
    """What the two drop-ins share: patching, the fused forward over TRL's concatenated batch, the metrics."""

    _nll_on_prompt: bool  # ORPO: the NLL scores the chosen prompts too
    _logits_exclude_last: bool  # ORPO: ``logits/*`` over all positions but the last

    def _fastpref_init(self, fastpref_backend: str) -> None:
        name = type(self).__name__
        if fastpref_backend not in BACKENDS:
            raise ValueError(f"{name}: `fastpref_backend` must be one of {BACKENDS}, got {fastpref_backend!r}")
        self.fastpref_backend = fastpref_backend

    def _fastpref_after_init(self) -> None:
        if self.is_encoder_decoder:
            raise NotImplementedError(f"{type(self).__name__}: encoder-decoder models are not supported (the fused "
                                      "head patches decoder-only *ForCausalLM models)")
        self._fastpref_patch(self.model)
        self._fastpref_guard = NonFiniteStepGuard(self)  # overflowing steps are skipped, as a GradScaler would
        self.add_callback(self._fastpref_guard)

    def _fastpref_patch(self, model: nn.Module) -> None:
        lm = find_causal_lm(self.accelerator.unwrap_model(model))
        state = lm.__dict__.get(_STATE)
        if state is None or state.backend != self.fastpref_backend or state.reduction != "sum":
            patch(model, backend=self.fastpref_backend)

    def _padding_value(self) -> int:  # pragma: no cover - per trainer
        raise NotImplementedError

    def _batch_rows(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """TRL's concatenated batch as ``(input_ids, attention_mask, segment_ids, B)`` (chosen rows first)."""
        cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self._padding_value(),
                                       device=self.accelerator.device)
        ids, attention, labels = (cat[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        scored = labels != -100
        if bool((scored & (labels != ids)).any()):
            raise ValueError(f"{type(self).__name__}: the batch's labels are not its input ids where they are scored "
                             "(a custom collator?); the fused head scores `input_ids` shifted by one, as TRL's "
                             "get_batch_logps does with TRL's collator")
        segments = torch.where(scored, RESPONSE, 0)
        B = batch["chosen_labels"].shape[0]
        if self._nll_on_prompt:  # the chosen rows' other attended tokens: TRL's ORPO NLL labels
            prompt = (attention == 1) & ~scored
            prompt[B:] = False
            segments = torch.where(prompt, PROMPT, segments)
        return ids, attention, segments, B

    def get_batch_loss_metrics(self, model, batch: dict, train_eval: Literal["train", "eval"] = "train"):
        """TRL's loss and metrics (``get_batch_loss_metrics``) from one fused forward. In training, a forward that
        overflows (:class:`fastpref.NonFiniteError`) gives a NaN loss, no metrics, and its optimizer step is
        skipped (:mod:`fastpref.integrations._step_guard`)."""
        return self._fastpref_guard.loss_or_skip(
            model, lambda: self._fused_loss_metrics(model, batch, train_eval),
            training=train_eval == "train" and self.model.training, skipped=({},))

    def _fused_loss_metrics(self, model, batch: dict, train_eval: str):
        ids, attention, segments, B = self._batch_rows(batch)
        self._fastpref_patch(model)
        unwrapped = self.accelerator.unwrap_model(model)
        kwargs = dict(input_ids=ids, attention_mask=attention, segment_ids=segments, use_cache=False,
                      logps_only=True)
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        with capture_backbone_hidden(unwrapped) as store:
            outputs = model(**kwargs)
        pol = outputs.logps
        loss, metrics = self._fastpref_loss(pol, B)
        if self.aux_loss_enabled:
            loss = loss + self.aux_loss_coef * _router_aux_loss(unwrapped, outputs, attention)

        hidden = store[-1]
        if self._logits_exclude_last:
            hidden = hidden[:, :-1]
        lm = find_causal_lm(unwrapped)
        state = lm.__dict__[_STATE]
        weight, bias = head_parameters(resolve_head(lm.get_output_embeddings()), state.transform)
        hidden = hidden.to(weight.device)
        vocab = weight.shape[0]
        totals = {}
        for name, rows in (("chosen", hidden[:B]), ("rejected", hidden[B:])):
            total = logits_total(rows, weight, bias, logit_scale=state.transform.logit_scale,
                                 softcap=state.transform.softcap, backend=self.fastpref_backend)
            totals[f"logits/{name}"] = total / (rows.shape[0] * rows.shape[1] * vocab)

        prefix = "eval_" if train_eval == "eval" else ""
        gather = self.accelerator.gather_for_metrics
        logged = {}
        for key, value in {**metrics, **totals}.items():
            logged[f"{prefix}{key}"] = gather(value.detach().reshape(1).float()).mean().item()
        return loss, logged


class FastPrefCPOTrainer(_FusedPairLoss, CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` computing its log-probs and NLL with fastpref's fused head (module
    docstring). Arguments: exactly ``CPOTrainer``'s, plus ``fastpref_backend``."""

    _nll_on_prompt = False
    _logits_exclude_last = False

    def __init__(self, *args, fastpref_backend: str = "auto", **kwargs):
        self._fastpref_init(fastpref_backend)
        super().__init__(*args, **kwargs)
        self._fastpref_after_init()

    def _padding_value(self) -> int:
        return self.pad_token_id

    def _fastpref_loss(self, pol, B: int):
        n = pol.n_response
        return cpo_loss(pol.response[:B], pol.response[B:], n[:B], n[B:], beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, simpo_gamma=getattr(self, "simpo_gamma", 0.5),
                        alpha=self.alpha, cpo_alpha=self.cpo_alpha, backend=self.fastpref_backend)


class FastPrefORPOTrainer(_FusedPairLoss, ORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` computing its log-probs and NLL with fastpref's fused head (module
    docstring). Arguments: exactly ``ORPOTrainer``'s, plus ``fastpref_backend``."""

    _nll_on_prompt = True
    _logits_exclude_last = True

    def __init__(self, *args, fastpref_backend: str = "auto", **kwargs):
        self._fastpref_init(fastpref_backend)
        super().__init__(*args, **kwargs)
        self._fastpref_after_init()

    def _padding_value(self) -> int:
        return self.padding_value

    def _fastpref_loss(self, pol, B: int):
        n = pol.n_response
        return orpo_loss(pol.response[:B], pol.response[B:], n[:B], n[B:], beta=self.beta,
                         nll_logps=(pol.response + pol.prompt)[:B], nll_lengths=(n + pol.n_prompt)[:B])
