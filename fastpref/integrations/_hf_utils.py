"""Helpers for :mod:`fastpref.integrations.transformers`: finding the head and the backbone of a causal LM,
reading the head's logit transform from its config, and checking that transform against the model itself.

Nothing here copies an architecture's ``forward``: the head is ``model.get_output_embeddings()``, the backbone
is the module the causal LM calls to get its last hidden states, and the few post-head transforms that
architectures apply (scaling, soft-capping, vocabulary trimming) are read from config attributes.
"""

from __future__ import annotations

import contextlib

import dataclasses
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..distributed.wrappers import unwrap_parallel

__all__ = ["HeadTransform", "find_backbone", "find_causal_lm", "head_transform", "resolve_head", "verify_head"]


@dataclasses.dataclass(frozen=True)
class HeadTransform:
    """How an architecture turns the backbone's last hidden state ``h`` into logits, beyond ``W h + b``.

    ``logits = softcap(logit_scale * (W[:V'] h + bias_factor * b[:V']))`` with ``V' = vocab_limit`` (all rows when
    None) and ``softcap(z) = c * tanh(z / c)`` when ``softcap = c`` is set. ``sources`` names the config
    attributes it was read from (for error messages and the docs).
    """

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    bias_factor: float = 1.0
    vocab_limit: Optional[int] = None
    sources: tuple[str, ...] = ()


# `logits_scaling` divides the logits (Granite family) except in these model types, where it multiplies.
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)
# `output_multiplier` is also a router setting elsewhere; it scales the final logits only in these types.
_OUTPUT_MULTIPLIER_TYPES = ("muse_spark", "muse_glimmer")
# Soft-capping of the final logits, ``c * tanh(z / c)``, under these names (first one set wins).
_SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def _config_value(model: nn.Module, name: str):
    """``name`` from the text (decoder) config if set there, else from the top-level config; None if absent."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = []
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text())
        except Exception:  # pragma: no cover - exotic configs
            pass
    configs.append(config)
    for cfg in configs:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def _model_types(model: nn.Module) -> tuple[str, ...]:
    config = getattr(model, "config", None)
    types = [getattr(config, "model_type", "") or ""]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            types.append(getattr(get_text(), "model_type", "") or "")
        except Exception:  # pragma: no cover
            pass
    return tuple(t for t in types if t)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"config attribute `{name}` must be a number, got {value!r}")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"config attribute `{name}` must be a finite positive number, got {value}")
    return value


def head_transform(model: nn.Module) -> HeadTransform:
    """Read the post-head logit transform of ``model`` from its config (see :class:`HeadTransform`).

    Handled attributes (text config first, then the top-level config):

    - ``logit_scale``: multiplies the logits (Cohere, Cohere2, Cohere2-MoE, Cohere-Compass).
    - ``logits_scaling``: divides the logits (Granite, GraniteMoE, GraniteMoEShared, GraniteMoEHybrid,
      Granite-SWA, GraniteMoE-SWA); multiplies them in HyperCLOVA X (``model_type`` ``hyperclovax``).
    - ``output_multiplier``: multiplies the logits, only for ``model_type`` ``muse_spark`` / ``muse_glimmer``.
    - ``logits_mup_width_multiplier`` ``m``: the hidden state is divided by ``m`` before the head (Inkling), i.e.
      logit scale ``1/m`` with the bias multiplied by ``m``.
    - ``final_logit_softcapping`` (Gemma 2, Gemma 3, Gemma 3n, Gemma 4, VaultGemma, NanoChat, Beam, Inkling 2),
      ``logits_soft_cap`` (RecurrentGemma), ``output_logit_soft_cap`` (xLSTM): ``c * tanh(z / c)`` after scaling.
    - ``unpadded_vocab_size`` (Inkling, Inkling 2): only the first rows of the head are real tokens.
    """
    scale, bias_factor, softcap, vocab_limit, sources = 1.0, 1.0, None, None, []
    types = _model_types(model)
    value = _config_value(model, "logit_scale")
    if value is not None:
        scale *= _number("logit_scale", value)
        sources.append("logit_scale")
    value = _config_value(model, "logits_scaling")
    if value is not None:
        value = _number("logits_scaling", value)
        if any(t.startswith(_MULTIPLYING_LOGITS_SCALING) for t in types):
            scale *= value
        else:
            scale /= value
        sources.append("logits_scaling")
    if any(t.startswith(_OUTPUT_MULTIPLIER_TYPES) for t in types):
        value = _config_value(model, "output_multiplier")
        if value is not None:
            scale *= _number("output_multiplier", value)
            sources.append("output_multiplier")
    value = _config_value(model, "logits_mup_width_multiplier")
    if value is not None:
        value = _number("logits_mup_width_multiplier", value)
        scale /= value
        bias_factor *= value
        sources.append("logits_mup_width_multiplier")
    for name in _SOFTCAP_NAMES:
        value = _config_value(model, name)
        if value is not None:
            softcap = _number(name, value)
            sources.append(name)
            break
    value = _config_value(model, "unpadded_vocab_size")
    if value is not None:
        vocab_limit = int(value)
        sources.append("unpadded_vocab_size")
    return HeadTransform(scale, softcap, bias_factor, vocab_limit, tuple(sources))


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM to patch: ``model`` itself, or the model a PEFT ``PeftModel`` wraps (inside a DDP, FSDP1 or
    DeepSpeed wrapper: the model it wraps)."""
    if not isinstance(model, nn.Module):
        raise TypeError("`model` must be a torch.nn.Module (a *ForCausalLM or a PEFT PeftModel), "
                        f"got {type(model).__name__}")
    model = unwrap_parallel(model)  # DDP, FSDP1, a DeepSpeed engine: the model they wrap
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        inner = get_base()
        if isinstance(inner, nn.Module) and inner is not model:
            return inner
    return model


def find_backbone(model: nn.Module) -> nn.Module:
    """The module ``model`` calls to get its last hidden states: ``getattr(model, model.base_model_prefix)``
    (``model.base_model``), else ``model.get_decoder()``."""
    prefix = getattr(type(model), "base_model_prefix", "") or ""
    candidates = []
    if prefix:
        candidates.append(getattr(model, prefix, None))
    try:
        candidates.append(getattr(model, "base_model", None))
    except Exception:  # pragma: no cover
        pass
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:
            pass
    for module in candidates:
        if isinstance(module, nn.Module) and module is not model:
            return module
    raise ValueError(
        f"cannot find the backbone of {type(model).__name__}: neither `model.{prefix or '<base_model_prefix>'}`, "
        "`model.base_model` nor `model.get_decoder()` gives a submodule")


def resolve_head(module: Optional[nn.Module]) -> nn.Module:
    """The plain ``nn.Linear`` (or tied ``nn.Embedding``) behind ``get_output_embeddings()``.

    PEFT's ``modules_to_save`` wrapper resolves to its active copy; a PEFT tuner layer (LoRA on the head)
    resolves to its base layer only when merged or disabled, else TypeError (the fused head reads one matrix).
    """
    if module is None:
        raise ValueError("the model has no output embeddings (`model.get_output_embeddings()` is None); "
                         "fastpref needs a language-model head")
    module = unwrap_parallel(module)  # an FSDP1 unit around the head
    if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):  # peft ModulesToSaveWrapper
        active = list(getattr(module, "active_adapters", []) or [])
        if getattr(module, "disable_adapters", False) or not active or active[0] not in module.modules_to_save:
            module = module.original_module
        else:
            module = module.modules_to_save[active[0]]
        module = unwrap_parallel(module)
    if hasattr(module, "base_layer") and callable(getattr(module, "get_base_layer", None)):  # peft tuner layer
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            module = module.get_base_layer()
        else:
            raise TypeError(
                f"the LM head is a PEFT adapter layer ({type(module).__name__}); fastpref reads the head as one "
                "weight matrix, so leave the head out of `target_modules` (or use `modules_to_save`)")
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return module
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return module
    raise TypeError(
        f"the LM head `get_output_embeddings()` is a {type(module).__name__}; fastpref supports a plain "
        "torch.nn.Linear head (optionally tied to an nn.Embedding), not quantized or custom heads")


def head_parameters(head: nn.Module, transform: HeadTransform):
    """``(weight [V, D], bias [V] or None)`` of a resolved head, trimmed to ``transform.vocab_limit``."""
    weight = head.weight
    bias = getattr(head, "bias", None) if isinstance(head, nn.Linear) else None
    if weight.device.type == "meta":
        raise ValueError("the LM head's weight is on the meta device (offloaded or not loaded); load it first")
    if transform.vocab_limit is not None and transform.vocab_limit < weight.shape[0]:
        weight = weight[: transform.vocab_limit]
        bias = None if bias is None else bias[: transform.vocab_limit]
    if bias is not None and transform.bias_factor != 1.0:
        bias = bias * transform.bias_factor
    return weight, bias


class _ProbeOutput(dict):
    """What the stubbed backbone returns in :func:`verify_head`: a hidden state and None for anything else."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__(last_hidden_state=hidden)
        self.last_hidden_state = hidden

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key):
        if isinstance(key, int):
            return (self.last_hidden_state,)[key]
        if isinstance(key, slice):
            return (self.last_hidden_state,)[key]
        return super().get(key)

    def to_tuple(self):
        return (self.last_hidden_state,)


_MISSING = object()


def verify_head(model: nn.Module, backbone: nn.Module, original_forward: Callable[..., Any],
                transform: HeadTransform) -> bool:
    """Check ``transform`` against the model's own forward on a few synthetic hidden states.

    The backbone is replaced for one call by a stub that returns hidden states of three magnitudes (raw logits
    up to about 0.5, 5 and 60, so scaling and soft-capping both show); the model's forward then applies its
    head and whatever follows it, and the result must match ``softcap(s * (W h + b))``. Costs one head product
    on three rows. Returns False (with a warning) when the check cannot run (e.g. the forward needs other
    inputs); raises ValueError when it runs and disagrees.
    """
    head = resolve_head(model.get_output_embeddings())
    weight, bias = head_parameters(head, transform)
    if weight.numel() == 0:  # e.g. a sharded (ZeRO-3) parameter
        return False
    D = weight.shape[1]
    gen = torch.Generator().manual_seed(1234)
    base = torch.randn(3, D, generator=gen, dtype=torch.float32)
    training = [(m, m.training) for m in model.modules()]
    # Stub the backbone and its direct children: some causal LMs call a child (OPT: `self.model.decoder`).
    stubbed = [backbone] + [child for child in backbone.children() if child is not model]
    previous = [(module, module.__dict__.get("forward", _MISSING)) for module in stubbed]
    calls = []
    try:
        with torch.no_grad():
            raw = nn.functional.linear(base.to(weight.device, weight.dtype), weight).float().abs().amax(-1)
            target = torch.tensor([0.5, 5.0, 60.0], device=raw.device)
            h = (base.to(raw.device) * (target / raw.clamp(min=1e-12))[:, None]).to(weight.dtype)[None]
            def stub(*args, **kwargs):
                calls.append(1)
                return _ProbeOutput(h)

            for module in stubbed:
                module.forward = stub
            model.eval()
            try:
                out = original_forward(input_ids=torch.zeros(1, 3, dtype=torch.long, device=weight.device))
            except Exception as exc:  # the forward wants something the probe does not provide
                warnings.warn(
                    f"fastpref could not check the head of {type(model).__name__} against its forward ({exc!r}); "
                    f"relying on the config ({', '.join(transform.sources) or 'no logit transform'})",
                    RuntimeWarning, stacklevel=3)
                return False
            logits = getattr(out, "logits", None)
            if logits is None and isinstance(out, (tuple, list)):
                logits = next((x for x in out if isinstance(x, torch.Tensor) and x.dim() == 3), None)
            if not isinstance(logits, torch.Tensor):
                warnings.warn(f"fastpref could not find logits in the output of {type(model).__name__}; "
                              "head not checked", RuntimeWarning, stacklevel=3)
                return False
            z = nn.functional.linear(h.to(weight.device), weight, bias).float() * transform.logit_scale
            if transform.softcap is not None:
                z = transform.softcap * torch.tanh(z / transform.softcap)
            logits = logits.float().to(z.device)
    finally:
        for module, forward in previous:
            if forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        for module, mode in training:
            module.training = mode
    if not calls:
        warnings.warn(f"fastpref could not check the head of {type(model).__name__}: its forward does not call "
                      f"{type(backbone).__name__}; relying on the config", RuntimeWarning, stacklevel=3)
        return False
    if logits.shape != z.shape:
        raise ValueError(
            f"{type(model).__name__} produces logits of shape {tuple(logits.shape)} from its head, expected "
            f"{tuple(z.shape)} from `get_output_embeddings()` (config: {', '.join(transform.sources) or 'none'}); "
            "this architecture's head is not supported")
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    err = (logits - z).abs().amax(-1)
    bound = tol * (1 + z.abs().amax(-1))
    if not bool((err <= bound).all()):
        raise ValueError(
            f"{type(model).__name__} does not compute its logits as softcap(scale * (W h + b)) with the settings "
            f"read from its config (scale={transform.logit_scale}, softcap={transform.softcap}, from "
            f"{', '.join(transform.sources) or 'no config attribute'}): max error {float(err.max()):.3g}. "
            "Its head has a transform fastpref does not know; pass verify=False only if you are sure.")
    return True


def is_peft_model(model: nn.Module) -> bool:
    """A PEFT ``PeftModel`` (duck-typed: ``peft_config`` and ``get_base_model``)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


@contextlib.contextmanager
def reference_adapter(model: nn.Module):
    """TRL's reference for a PEFT policy: the ``"ref"`` adapter when the model has one (a pretrained adapter
    that TRL copied at construction), else every adapter disabled (the base model)."""
    if "ref" in getattr(model, "peft_config", {}):
        previous = model.active_adapter
        model.set_adapter("ref")
        try:
            yield
        finally:
            model.set_adapter(previous)
    else:
        with model.disable_adapter():
            yield
