"""Patch a Hugging Face causal LM so that it returns per-sequence log-probs without building logits.

::

    from fastpref.integrations.transformers import patch

    model = patch(AutoModelForCausalLM.from_pretrained(...))          # or a PEFT PeftModel around one
    out = model(input_ids, attention_mask=attention_mask, completion_mask=completion_mask, logps_only=True)
    out.logps.response        # [B] summed log-probs of the completion tokens (fastpref.SequenceLogProbs)
    out.last_hidden           # [B, D] hidden state of each sequence's last response token (a reward head's input)

The patched call runs the model's backbone (``getattr(model, model.base_model_prefix)``, i.e.
``model.base_model``; ``model.get_decoder()`` as a fallback) and feeds its last hidden states, the head
from ``model.get_output_embeddings()`` (weight and bias) and the logit transform read from the config to
:func:`fastpref.sequence_logprobs`. The LM head module is never called, so no ``tokens x vocab`` tensor
exists. Nothing is copied from any architecture's ``forward``; called without ``logps_only=True`` the model
runs its own ``forward`` unchanged.

Conventions (TRL's): token ``t`` of ``input_ids`` is scored when ``completion_mask[t] == 1`` (or
``segment_ids[t]`` is 1 = prompt / 2 = response), from the hidden state at position ``t - 1``. A token is
never scored when it or its predecessor has ``attention_mask == 0``, nor when it is the first token of a
sequence (packed or not).

Logit transforms read from the config: see :func:`fastpref.integrations._hf_utils.head_transform` (Cohere's
``logit_scale``, Granite's ``logits_scaling``, Gemma 2/3's ``final_logit_softcapping``, RecurrentGemma's
``logits_soft_cap``, xLSTM's ``output_logit_soft_cap``, Inkling's ``logits_mup_width_multiplier`` and
``unpadded_vocab_size``, HyperCLOVA X's multiplying ``logits_scaling``, MuseSpark's ``output_multiplier``).
At patch time the transform is checked against the model's own forward on three synthetic hidden states
(``verify=True``), so an architecture whose head does something else fails loudly instead of silently.

The patch lives on the instance (its ``forward`` and settings): ``copy.deepcopy``, ``copy.copy``, ``pickle`` and
``torch.save(model)`` give patched models; :func:`unpatch` removes it; :func:`is_patched` says whether the model
answers ``logps_only=True`` right now.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Optional, TypeVar

import torch
from torch import nn
try:
    from transformers.utils import ModelOutput
except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
    from .._hints import install_hint

    raise ImportError(f"fastpref.integrations.transformers needs transformers: {install_hint('hf')}") from exc

from .._rows import last_row_where, row_sequences
from .._validation import raise_failed_checks
from ..distributed.wrappers import plain_head_within, run_in_head_unit
from ..logprobs import BACKENDS, REDUCTIONS, SequenceLogProbs, sequence_logprobs
from ._hf_utils import (
    HeadTransform,
    find_backbone,
    find_causal_lm,
    head_parameters,
    head_transform,
    resolve_head,
    verify_head,
)

__all__ = ["LogProbsOutput", "is_patched", "patch", "unpatch"]

M = TypeVar("M", bound=nn.Module)

_STATE = "_fastpref_patch"
PROMPT, RESPONSE = 1, 2
# Keyword arguments the patched forward adds; without logps_only=True they are an error.
_OWN_KWARGS = ("completion_mask", "segment_ids", "cu_seqlens", "return_token_logps", "return_stats")
# Arguments of a causal LM's forward that belong to the head/loss and are not passed to the backbone.
_HEAD_ONLY = ("labels", "logits_to_keep", "num_logits_to_keep", "return_dict", "num_items_in_batch")


@dataclasses.dataclass
class LogProbsOutput(ModelOutput):
    """Output of a patched model called with ``logps_only=True``.

    Attributes:
        logps: :class:`fastpref.SequenceLogProbs`, one entry per sequence (``B`` rows of a padded batch, or
            the ``S`` packed sequences). Its ``token_logps`` (only with ``return_token_logps=True``) is aligned
            with ``input_ids``: position ``t`` holds ``log p(x_t | x_<t)``, 0 where ``t`` is not scored. Its
            ``stats`` (only with ``return_stats=True``): :class:`fastpref.logprobs.SequenceStats`, per segment and
            per token (the distribution that predicts ``x_t`` at position ``t``, like ``token_logps``).
        last_hidden: ``[S, D]`` backbone hidden state (before the head) **of** the sequence's last response
            token: position ``t_last``, the last token with segment 2 (``completion_mask == 1``), whose input is
            that token, as a reward model reads it (DRDO's student and oracle reward heads; the row ``t_last - 1``
            only predicts the token and cannot tell two responses differing in it apart). When a sequence has no
            scored response token, its last scored (prompt) token, else its first position. Differentiable.
        cu_seqlens: ``[S + 1]`` sequence offsets (packed inputs only).
        hidden_states, attentions, router_logits: the backbone's, when asked for (``output_hidden_states=True``
            etc.); None otherwise, so the full hidden states are not kept by the output.
    """

    logps: Optional[SequenceLogProbs] = None
    last_hidden: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    router_logits: Optional[tuple[torch.Tensor, ...]] = None


@dataclasses.dataclass
class _PatchState:
    backend: str
    reduction: str
    validate: bool
    transform: HeadTransform
    previous_forward: Any  # the instance-level `forward` there before patching (e.g. accelerate's), or None


# --------------------------------------------------------------------------------------------- public API


def patch(model: M, *, backend: str = "auto", reduction: str = "sum", validate: bool = True,
          verify: bool = True) -> M:
    """Make ``model`` (any ``*ForCausalLM``, or a PEFT ``PeftModel`` around one) accept ``logps_only=True``.

    Args:
        model: the causal LM, or a PEFT model (the causal LM inside it is patched; calling the PEFT model
            with ``logps_only=True`` works, and a frozen head takes fastpref's no-``dW`` path).
        backend: :func:`fastpref.sequence_logprobs` backend: ``"auto"`` (triton on CUDA, else torch),
            ``"triton"`` or ``"torch"``.
        reduction: ``"sum"`` (default, as DPO) or ``"mean"`` (per-segment average, as SimPO/IPO-style losses).
        validate: run fastpref's data checks (one device synchronization per call).
        verify: check the logit transform read from the config against the model's own forward now (one head
            product on three rows; see :func:`fastpref.integrations._hf_utils.verify_head`).

    Returns:
        ``model`` itself, patched in place. Patching again replaces the settings.

    The patched model, called as
    ``model(input_ids, attention_mask=..., completion_mask=... | segment_ids=..., logps_only=True, ...)``,
    returns a :class:`LogProbsOutput`. Other keyword arguments (``position_ids``, ``use_cache``,
    ``output_hidden_states``, ...) go to the backbone; ``use_cache`` defaults to False. Packed inputs:
    one row with ``position_ids`` restarting per sequence (``DataCollatorWithFlattening``), or explicit
    ``cu_seqlens`` (``[S + 1]`` offsets; ``cu_seq_lens_q`` from the collator's flash-attention kwargs is
    used too). Without ``logps_only=True`` the model's own ``forward`` runs unchanged.

    Raises:
        TypeError: ``model`` is not a module, or its head is not a plain ``nn.Linear``/``nn.Embedding``.
        ValueError: a bad ``backend``/``reduction``, no output embeddings or backbone, or (``verify=True``)
            a head whose output does not match the transform read from the config.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(validate, bool) or not isinstance(verify, bool):
        raise TypeError("`validate` and `verify` must be bools")
    lm = find_causal_lm(model)
    if _STATE in lm.__dict__:
        unpatch(lm)
    get_output_embeddings = getattr(lm, "get_output_embeddings", None)
    if not callable(get_output_embeddings):
        raise ValueError(f"`model` ({type(lm).__name__}) has no `get_output_embeddings()`; patch a *ForCausalLM")
    resolve_head(get_output_embeddings())  # raises when there is no usable head
    backbone = find_backbone(lm)
    transform = head_transform(lm)
    previous = lm.__dict__.get("forward")
    if verify:
        # Against the architecture's own forward with autocast off: the instance's forward may be wrapped
        # (accelerate's mixed-precision wrapper, as TRL's reference model is), which would compare bf16 logits.
        # A sharded or wrapped head (patched after FSDP / ZeRO-3 / tensor parallelism) is checked on a plain
        # stand-in holding the gathered whole head: the same collectives and the same check on every rank.
        module = get_output_embeddings()
        head = resolve_head(module)
        with plain_head_within(lm, module, head, root=model) as plain:
            with torch.autocast(plain.weight.device.type, enabled=False):
                verify_head(lm, backbone, type(lm).forward.__get__(lm, type(lm)), transform)

    setattr(lm, _STATE, _PatchState(backend, reduction, validate, transform, previous))
    _install_forward(lm, inspect.signature(lm.forward))  # bound: no `self`
    return model


def unpatch(model: M) -> M:
    """Undo :func:`patch`: restore the model's previous ``forward`` (no-op when not patched). Returns ``model``."""
    lm = find_causal_lm(model)
    state = lm.__dict__.pop(_STATE, None)
    if state is None:
        return model
    lm.__dict__.pop("__reduce_ex__", None)
    if state.previous_forward is None:
        lm.__dict__.pop("forward", None)
    else:
        lm.forward = state.previous_forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the causal LM inside a PEFT model) answers ``logps_only=True`` now: :func:`patch`'s
    settings are there and its ``forward`` is the patched one, possibly inside wrappers that call it (accelerate's
    mixed-precision wrapper). False after :func:`unpatch`, or when something replaced ``forward`` since."""
    lm = find_causal_lm(model)
    return _STATE in lm.__dict__ and _calls_patched_forward(lm.__dict__.get("forward"), lm)


# --------------------------------------------------------------------------------------------- installing


_MARK = "__fastpref_patched_forward__"


def _install_forward(lm: nn.Module, original: inspect.Signature) -> None:
    """Put the patched ``forward`` (a method of a function made for ``lm``, with ``original``'s parameters plus
    ours as its signature, which ``transformers.Trainer`` reads to keep dataset columns) and the pickling hook
    (:func:`_reduce_patched`) on the instance."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [p for p in original.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    kw = inspect.Parameter.KEYWORD_ONLY
    extra = [("logps_only", bool, False), ("completion_mask", Optional[torch.Tensor], None),
             ("segment_ids", Optional[torch.Tensor], None), ("cu_seqlens", Optional[torch.Tensor], None),
             ("return_token_logps", bool, False), ("return_stats", bool, False)]
    params += [inspect.Parameter(n, kw, default=d, annotation=a) for n, a, d in extra if n not in names]
    params += [p for p in original.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    params.sort(key=lambda p: p.kind)  # keyword-only after *args, before **kwargs
    function = types.FunctionType(_patched_forward.__code__, _patched_forward.__globals__, "forward",
                                  _patched_forward.__defaults__, _patched_forward.__closure__)
    function.__doc__ = _patched_forward.__doc__
    function.__signature__ = inspect.Signature(params)
    function.__qualname__ = f"{type(lm).__name__}.forward"
    setattr(function, _MARK, True)  # functools.wraps copies it to wrappers, which call the function
    lm.__dict__["forward"] = types.MethodType(function, lm)
    lm.__dict__["__reduce_ex__"] = functools.partial(_reduce_patched, lm)


def _calls_patched_forward(forward, lm: nn.Module) -> bool:
    """``forward`` is the patched forward of ``lm``, or a wrapper around it (``__wrapped__`` / ``__func__``)."""
    seen = set()
    while forward is not None and id(forward) not in seen:
        seen.add(id(forward))
        if getattr(forward, "__self__", lm) is not lm:  # a method of another module
            return False
        if getattr(forward, _MARK, False):
            return True
        forward = getattr(forward, "__wrapped__", None) or getattr(forward, "__func__", None)
    return False


def _reduce_patched(lm: nn.Module, protocol: int):
    """``lm.__reduce_ex__`` while patched: ``pickle``, ``torch.save(model)``, ``copy.copy`` and ``copy.deepcopy``
    rebuild a patched model (:func:`_new_patched`), since the patched forward, a method, would pickle by name and
    come back as the class's own ``forward``. The patch's settings travel in the state; the forward that was there
    before patching does not (a bound method cannot travel either: :func:`unpatch` of the copy restores the class's
    forward). A model whose ``forward`` was replaced since patching is no longer patched and travels without the
    settings (its ``forward`` as pickle handles it)."""
    state = type(lm).__getstate__(lm) if hasattr(type(lm), "__getstate__") else dict(lm.__dict__)
    state = dict(state)
    state.pop("__reduce_ex__", None)
    if is_patched(lm):
        state.pop("forward", None)
        state[_STATE] = dataclasses.replace(state[_STATE], previous_forward=None)
        return _new_patched, (type(lm),), state
    state.pop(_STATE, None)
    return _new_module, (type(lm),), state


def _new_module(cls):
    """An empty instance of ``cls``; the unpickler then sets its state (``nn.Module.__setstate__``)."""
    return cls.__new__(cls)


def _new_patched(cls):
    """An empty instance of ``cls`` with the patched forward and the pickling hook (the state, set next, holds the
    patch's settings and no ``forward``)."""
    lm = cls.__new__(cls)
    signature = inspect.signature(cls.forward)
    _install_forward(lm, signature.replace(parameters=list(signature.parameters.values())[1:]))
    return lm


# --------------------------------------------------------------------------------------------- the forward


def _original_forward(self: nn.Module):
    state = self.__dict__[_STATE]
    if state.previous_forward is not None:
        return state.previous_forward
    return type(self).forward.__get__(self, type(self))


def _patched_forward(self, *args, **kwargs):
    """The model's ``forward``, plus ``logps_only=True`` for fastpref's fused per-sequence log-probs.

    With ``logps_only=True``: ``completion_mask`` (token ``t`` is response when 1) or ``segment_ids``
    (0 = not scored, 1 = prompt, 2 = response), both aligned with ``input_ids``; optional ``cu_seqlens`` for
    packed inputs, ``return_token_logps`` and ``return_stats`` (:func:`fastpref.sequence_logprobs`'s per-token
    statistics). Returns :class:`fastpref.integrations.transformers.LogProbsOutput`.
    """
    logps_only = kwargs.pop("logps_only", False)
    if not isinstance(logps_only, bool):
        raise TypeError(f"`logps_only` must be a bool, got {type(logps_only).__name__}")
    if not logps_only:
        given = [name for name in _OWN_KWARGS if kwargs.get(name) is not None and kwargs.get(name) is not False]
        if given:
            raise TypeError(f"`{given[0]}` is only used with `logps_only=True`")
        for name in _OWN_KWARGS:
            kwargs.pop(name, None)
        return _original_forward(self)(*args, **kwargs)
    return _logps_forward(self, args, kwargs)


def _logps_forward(self: nn.Module, args: tuple, kwargs: dict) -> LogProbsOutput:
    state: _PatchState = self.__dict__[_STATE]
    completion_mask = kwargs.pop("completion_mask", None)
    segment_ids = kwargs.pop("segment_ids", None)
    cu_seqlens = kwargs.pop("cu_seqlens", None)
    return_token_logps = kwargs.pop("return_token_logps", False)
    return_stats = kwargs.pop("return_stats", False)
    for name, flag in (("return_token_logps", return_token_logps), ("return_stats", return_stats)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}")

    # Name the positional arguments with the original forward's signature, then split off what is ours.
    signature = inspect.signature(_original_forward(self))
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"bad arguments for {type(self).__name__}.forward: {exc}") from None
    call = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(self).__name__}.forward: pass extra arguments by keyword with logps_only=True")
        else:
            call[name] = value
    input_ids = call.pop("input_ids", None)
    attention_mask = call.pop("attention_mask", None)
    position_ids = call.pop("position_ids", None)
    if call.get("labels") is not None:
        raise ValueError("`labels` is not used with `logps_only=True`; mark the scored tokens with "
                         "`completion_mask` or `segment_ids` (the targets are `input_ids` shifted by one)")
    keep = call.get("logits_to_keep", call.get("num_logits_to_keep"))
    if keep is not None and not (isinstance(keep, int) and keep == 0):
        raise ValueError("`logits_to_keep` is not used with `logps_only=True` (no logits are built)")
    if call.get("past_key_values") is not None:
        raise ValueError("`past_key_values` is not supported with `logps_only=True`; pass the whole sequences")
    for name in _HEAD_ONLY + ("past_key_values",):
        call.pop(name, None)

    labels, segments, packed_cu, backbone_position_ids, backbone_attention_mask = _targets(
        input_ids, attention_mask, position_ids, completion_mask, segment_ids, cu_seqlens, call, state.validate)

    backbone = find_backbone(self)
    if "use_cache" not in call and _accepts(backbone, "use_cache"):
        call["use_cache"] = False
    backbone_kwargs = dict(call)
    backbone_kwargs["input_ids"] = input_ids
    if backbone_attention_mask is not None:
        backbone_kwargs["attention_mask"] = backbone_attention_mask
    if backbone_position_ids is not None:
        backbone_kwargs["position_ids"] = backbone_position_ids
    outputs = backbone(**backbone_kwargs)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs[0]

    module = self.get_output_embeddings()
    head = resolve_head(module)
    if packed_cu is not None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels, segments = labels.reshape(-1), segments.reshape(-1)
    # Decided at each call from the head module and its weight: read directly, or inside its FSDP unit /
    # ZeRO-3 module when it is sharded there (fastpref.distributed.wrappers). The tensors travel as arguments.
    fused = functools.partial(_head_logps, head, state, return_token_logps, return_stats)
    logps = run_in_head_unit(module, head, fused, hidden, labels, segments, packed_cu)
    if return_token_logps:
        logps = logps._replace(token_logps=_align(logps.token_logps, input_ids.shape))
    if return_stats:
        tokens = type(logps.stats.tokens)(*(_align(x, input_ids.shape) for x in logps.stats.tokens))
        logps = logps._replace(stats=logps.stats._replace(tokens=tokens))
    last_hidden = _last_hidden(hidden, segments, packed_cu)
    return LogProbsOutput(
        logps=logps,
        last_hidden=last_hidden,
        cu_seqlens=packed_cu,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        router_logits=getattr(outputs, "router_logits", None),
    )


def _align(rows: torch.Tensor, shape) -> torch.Tensor:
    """Per-row values (row ``t`` is about token ``t + 1``) moved to the token's own position, 0 at position 0."""
    rows = rows.reshape(shape)
    aligned = torch.zeros(rows.shape, dtype=rows.dtype, device=rows.device)
    aligned[..., 1:] = rows[..., :-1]
    return aligned


def _head_logps(head: nn.Module, state: _PatchState, return_token_logps: bool, return_stats: bool,
                hidden: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor,
                packed_cu: Optional[torch.Tensor]) -> SequenceLogProbs:
    """The fused head on the backbone's hidden states; reads ``head``'s parameters when it runs."""
    weight, bias = head_parameters(head, state.transform)
    hidden = hidden.to(weight.device)
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # the head would run in the autocast dtype; so does the fused head
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    labels, segments = labels.to(hidden.device), segments.to(hidden.device)
    if packed_cu is not None:
        packed_cu = packed_cu.to(hidden.device)

    with torch.autocast(device_type, enabled=False) if autocast else _nullcontext():
        return sequence_logprobs(
            hidden, weight, labels, segments, bias=bias, reduction=state.reduction,
            logit_scale=state.transform.logit_scale, softcap=state.transform.softcap, cu_seqlens=packed_cu,
            backend=state.backend, return_token_logps=return_token_logps, return_stats=return_stats,
            validate=state.validate)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _int_tensor(name: str, x, shape) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"`{name}` must be an integer or bool tensor, got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {tuple(x.shape)} but `input_ids` has {tuple(shape)}; they must match")
    return x


def _targets(input_ids, attention_mask, position_ids, completion_mask, segment_ids, cu_seqlens, call, validate):
    """Shifted labels and per-row segments (row t predicts token t+1), and the packing layout.

    Returns ``(labels, segments, cu_seqlens or None, position_ids for the backbone, attention_mask for it)``.
    """
    if input_ids is None:
        raise ValueError("`input_ids` is required with `logps_only=True`: the scored tokens are its entries")
    input_ids = _int_tensor("input_ids", input_ids, None)
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if call.get("inputs_embeds") is not None:
        raise ValueError("pass `input_ids` or `inputs_embeds`, not both")
    if completion_mask is None and segment_ids is None:
        raise ValueError("`logps_only=True` needs `completion_mask` (1 = scored completion token) or `segment_ids` "
                         "(0 = not scored, 1 = prompt, 2 = response), aligned with `input_ids`")
    if completion_mask is not None and segment_ids is not None:
        raise ValueError("pass either `completion_mask` or `segment_ids`, not both")
    shape = input_ids.shape
    B, T = shape
    device = input_ids.device
    checks = []
    if completion_mask is not None:
        completion_mask = _int_tensor("completion_mask", completion_mask, shape).to(device)
        if validate and completion_mask.dtype is not torch.bool:
            checks.append(("`completion_mask` holds values other than 0 and 1",
                           ((completion_mask != 0) & (completion_mask != 1)).any()))
        token_segments = (completion_mask != 0).long() * RESPONSE
    else:
        segment_ids = _int_tensor("segment_ids", segment_ids, shape).to(device)
        if validate:
            checks.append(("`segment_ids` holds values outside {0, 1, 2} (0 = not scored, 1 = prompt, 2 = response)",
                           ((segment_ids < 0) | (segment_ids > 2)).any()))
        token_segments = segment_ids.long().clamp(0, 2)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has "
                             f"{tuple(shape)}; logps_only takes a 2-D padding mask")
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"`position_ids` must be a torch.Tensor, got {type(position_ids).__name__}")
        if position_ids.shape[-1] != T or position_ids.dim() not in (1, 2) or position_ids.numel() not in (T, B * T):
            raise ValueError(f"`position_ids` has shape {tuple(position_ids.shape)} but `input_ids` has {tuple(shape)}")

    # Packed layout: explicit cu_seqlens, the collator's cu_seq_lens_q, or one row with position_ids.
    flash_cu = call.get("cu_seq_lens_q")
    packed = cu_seqlens is not None or flash_cu is not None or (B == 1 and position_ids is not None)
    if packed and B != 1:
        raise ValueError(f"packed inputs (`cu_seqlens`) must be one row, `input_ids` [1, N]; got {tuple(shape)}")
    if packed and attention_mask is not None:
        am = attention_mask.to(device)
        if cu_seqlens is None and flash_cu is None and not bool(am.bool().all()):
            packed = False  # one padded row that merely carries position_ids
        elif not bool(am.bool().all()):
            raise ValueError("packed inputs (`cu_seqlens`) carry no padding: `attention_mask` must be all ones or None")
    backbone_position_ids, backbone_attention_mask = position_ids, attention_mask
    cu = None
    if packed:
        backbone_attention_mask = None  # lets transformers build the block-diagonal mask from position_ids
        if cu_seqlens is None:
            cu_seqlens = flash_cu
        if cu_seqlens is not None:
            cu = _int_tensor("cu_seqlens", cu_seqlens, None).to(device).long().reshape(-1)
            if cu.numel() < 2:
                raise ValueError(f"`cu_seqlens` must hold S+1 >= 2 offsets, got {cu.numel()}")
            if validate:
                checks.append((f"`cu_seqlens` must start at 0, be strictly increasing and end at N={T}",
                               (cu[0] != 0) | (cu[-1] != T) | (cu[1:] <= cu[:-1]).any()))
        derived = None
        if position_ids is not None:
            pos = position_ids.reshape(-1)[-T:].to(device)
            starts = torch.ones(T, dtype=torch.bool, device=device)
            starts[1:] = pos[1:] != pos[:-1] + 1
            derived = torch.cat([torch.nonzero(starts).reshape(-1), torch.tensor([T], device=device)])
        if cu is None:
            cu = derived
        elif derived is not None:
            if validate and (derived.numel() != cu.numel() or not bool((derived == cu).all())):
                raise ValueError("`cu_seqlens` and `position_ids` disagree on the sequence boundaries")
        else:  # explicit cu_seqlens only: give the backbone positions restarting at each sequence
            raise_failed_checks(checks)  # a bad cu_seqlens would break the positions below
            checks = []
            lengths = cu[1:] - cu[:-1]
            starts = torch.repeat_interleave(cu[:-1], lengths)
            backbone_position_ids = (torch.arange(T, device=device) - starts)[None]

    # Row t predicts token t+1: shift, and never score across a padding or sequence boundary.
    row_segments = torch.zeros((B, T), dtype=torch.long, device=device)
    row_segments[:, :-1] = token_segments[:, 1:]
    if attention_mask is not None:
        attended = attention_mask.to(device).bool()
        row_segments[:, :-1] *= (attended[:, 1:] & attended[:, :-1]).long()
    if cu is not None:
        row_segments[0, (cu[1:] - 1).clamp(0, T - 1)] = 0  # the last row of a sequence predicts the next one's first
    labels = torch.full((B, T), -100, dtype=torch.long, device=device)
    labels[:, :-1] = input_ids[:, 1:].long()
    labels = torch.where(row_segments > 0, labels, -100)
    raise_failed_checks(checks)
    return labels, row_segments, cu, backbone_position_ids, backbone_attention_mask


def _last_hidden(hidden: torch.Tensor, segments: torch.Tensor, cu: Optional[torch.Tensor]) -> torch.Tensor:
    """Per sequence, the hidden row OF the last response token (else of the last scored token, else the sequence's
    first row). ``segments`` are row segments (row ``t`` scores token ``t + 1``), so the token scored by row ``t`` is
    read at row ``t + 1``, which is in the same sequence: a sequence's last row never scores."""
    seg = segments.reshape(-1)
    sequences, S = row_sequences(seg.numel(), seg.device, row_len=segments.shape[-1], cu_seqlens=cu)
    last_response = last_row_where(seg == RESPONSE, sequences, S)
    last_scored = last_row_where(seg > 0, sequences, S)
    first = (torch.arange(S, device=seg.device) * segments.shape[-1]) if cu is None else cu[:-1].long()
    index = torch.where(last_response >= 0, last_response + 1,
                        torch.where(last_scored >= 0, last_scored + 1, first))
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
