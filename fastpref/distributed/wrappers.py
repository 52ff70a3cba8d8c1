"""The fused head inside data-parallel and sharded wrappers: DDP, FSDP1, FSDP2 (``fully_shard``), DeepSpeed ZeRO-3.

The fused head is never called as a module: it reads the head's weight. Under sharding that read only sees the
whole weight inside the forward of the head's sharding unit. Three cases, decided at each call from the head module and
its weight (the same on every rank, so every rank takes the same path):

- **whole** (no wrapper, DDP, ZeRO-1/2, FSDP1/FSDP2 with the head in the root unit, whose forward is running): read
  it. The gradient reaches the parameter and the wrapper reduces it as usual.
- **FSDP2, the head in a unit of its own** (``fully_shard(lm_head)``: accelerate does this under LoRA; or
  ``fully_shard([norm, lm_head])``): the fused call is a method of the unit registered with
  ``register_fsdp_forward_method``, so FSDP all-gathers before it, reshards after, gathers again for the backward
  and reduce-scatters the gradient. The method reads ``self.weight``; the sharded parameter is never passed in as
  an argument.
- **FSDP1 unit around the head, or a ZeRO-3 head**: the fused call runs *as the forward* of the module the wrapper
  hooks (the FSDP1 wrapper's inner module; the ZeRO-3 head itself), through the module's ``__call__``, so the
  wrapper's own pre-/post-forward and backward hooks do the gathering and the reduction.

A ``Shard(0)`` DTensor head that no FSDP unit manages is a tensor-parallel head: :func:`fastpref.sequence_logprobs`
takes it as it is (:mod:`.plan`).

Reads **without a gradient** outside any forward (checking the head against the model's own forward, AuxDPO's
head penalty) use :func:`whole_parameters`: DTensor ``full_tensor()``, ZeRO-3 ``GatheredParameters`` over the
parameters that are not already gathered, FSDP1 ``summon_full_params`` of the unit that owns the head. Those are
collectives: every rank runs them. A trainable head is never gathered this way for the fused call (its gradient
would stay on each rank, unreduced).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .plan import is_dtensor

_FORWARD_METHOD = "_fastpref_fused_forward"


# ---------------------------------------------------------------------------------------------- wrapper types


def _fsdp_attr(name: str):
    """``torch.distributed.fsdp.<name>`` if that package is imported (no FSDP object can exist otherwise: checking
    costs nothing for users who never import it)."""
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, name, None)


def _fsdp1_class():
    return _fsdp_attr("FullyShardedDataParallel")


def _fsdp2_class():
    return _fsdp_attr("FSDPModule")


def is_fsdp1(module) -> bool:
    cls = _fsdp1_class()
    return cls is not None and isinstance(module, cls)


def is_fsdp2(module) -> bool:
    cls = _fsdp2_class()
    return cls is not None and isinstance(module, cls)


def _is_ddp(module) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _is_deepspeed_engine(module) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(module).__mro__) and isinstance(
        getattr(module, "module", None), nn.Module)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside DDP, FSDP1, DeepSpeed engine and ``torch.compile`` wrappers (FSDP2 wraps in place)."""
    while True:
        if _is_ddp(model) or is_fsdp1(model) or _is_deepspeed_engine(model):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def is_zero3_param(p) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


def _zero3_gathered(p) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status != ZeroParamStatus.NOT_AVAILABLE


def whole_shape(head: nn.Module) -> tuple[int, int]:
    """``(V, D)`` of a plain ``nn.Linear`` / ``nn.Embedding`` head from its attributes, whatever its weight holds
    now (a ZeRO-3 placeholder, an FSDP shard)."""
    if isinstance(head, nn.Linear):
        return head.out_features, head.in_features
    if isinstance(head, nn.Embedding):
        return head.num_embeddings, head.embedding_dim
    raise TypeError(f"expected an nn.Linear or nn.Embedding head, got {type(head).__name__}")


def _expected_shapes(head: nn.Module) -> dict[str, tuple[int, ...]]:
    V, D = whole_shape(head)
    return {"weight": (V, D), "bias": (V,)}


def is_whole(head: nn.Module) -> bool:
    """Whether every parameter of ``head`` holds its whole value now, as a plain tensor."""
    shapes = _expected_shapes(head)
    for name, p in head.named_parameters(recurse=False):
        if is_dtensor(p):
            return False
        if is_zero3_param(p) and not _zero3_gathered(p):
            return False
        if tuple(p.shape) != shapes.get(name, tuple(p.shape)):  # FSDP1 use_orig_params=True: a flat shard
            return False
    for name in ("weight", "bias"):
        t = getattr(head, name, None)
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() and t.untyped_storage().nbytes() == 0:
            return False  # FSDP1 use_orig_params=False outside its forward: a view of a freed flat parameter
    return True


# ---------------------------------------------------------------------------------------------- the call


def run_in_head_unit(module: nn.Module, head: nn.Module, fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` where ``fn`` reads ``head``'s parameters, run where they are whole (module docstring).

    ``module`` is what the model's ``get_output_embeddings()`` returns (an FSDP1 wrapper, a PEFT wrapper, or the
    head itself); ``head`` the plain ``nn.Linear``/``nn.Embedding`` inside it. ``fn`` must read the parameters
    when it runs (not before): under FSDP1 and ZeRO-3 it runs as a module's forward.
    """
    fsdp1 = next((m for m in module.modules() if is_fsdp1(m)), None)
    if fsdp1 is not None:  # FSDP1 wraps the head (or the PEFT wrapper around it): through the wrapper's forward
        return _as_forward(fsdp1, fsdp1.module, fn, args)
    unit = next((m for m in module.modules() if is_fsdp2(m)), None)
    if unit is not None:  # the head is (in) an FSDP2 unit of its own: always through the unit, even when a
        return _fsdp2_method(unit, fn, args)  # prefetch has gathered it (its gradient must be reduce-scattered)
    if any(is_zero3_param(p) for p in head.parameters(recurse=False)):
        # ZeRO-3 gathers a module's own parameters around its forward and again for its backward; a weight that
        # looks gathered now (prefetched) is released before the backward when read outside
        return _as_forward(head, head, fn, args)
    return fn(*args)  # whole (root unit, DDP, no wrapper), or a tensor-parallel DTensor head (sequence_logprobs)


def _as_forward(caller: nn.Module, target: nn.Module, fn, args):
    """Call ``caller(*args)`` with ``target.forward`` (``caller`` or the module it wraps) replaced by ``fn``."""
    previous = target.__dict__.get("forward", None)
    target.forward = lambda *a: fn(*a)
    try:
        return caller(*args)
    finally:
        if previous is None:
            del target.forward
        else:
            target.forward = previous


def _fsdp2_method(unit: nn.Module, fn, args):
    from torch.distributed.fsdp import register_fsdp_forward_method

    if _FORWARD_METHOD not in unit.__dict__:  # once per unit: a method that runs what it is given
        setattr(unit, _FORWARD_METHOD, types.MethodType(_run, unit))
        register_fsdp_forward_method(unit, _FORWARD_METHOD)
    return getattr(unit, _FORWARD_METHOD)(fn, *args)


def _run(self, fn, *args):
    return fn(*args)


# ---------------------------------------------------------------------------------------------- reads, no gradient


@contextlib.contextmanager
def whole_parameters(module: nn.Module, head: nn.Module, root: Optional[nn.Module] = None
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """``{"weight": ..., "bias": ...}``: ``head``'s parameters whole, detached, for a read without gradient
    outside any forward (module docstring). A collective under FSDP/ZeRO-3/DTensor: call it on every rank.

    ``module``: the model's ``get_output_embeddings()``; ``root``: the outermost model (an FSDP1 root wrapper
    may own the head).
    """
    with torch.no_grad():
        if is_whole(head):
            yield {n: p.detach() for n, p in _head_tensors(head)}
            return
        fsdp1 = next((m for m in module.modules() if is_fsdp1(m)), None) or _fsdp1_owner(root, head)
        if fsdp1 is not None:
            with _fsdp1_summoned(fsdp1, root):
                yield {n: p.detach().clone() for n, p in _head_tensors(head)}
            return
        tensors = dict(_head_tensors(head))
        ds = [p for p in tensors.values() if is_zero3_param(p) and not _zero3_gathered(p)]
        if ds:
            import deepspeed

            with deepspeed.zero.GatheredParameters(ds, modifier_rank=None):
                yield {n: p.detach().clone() for n, p in tensors.items()}
            return
        if any(is_dtensor(p) for p in tensors.values()):
            yield {n: (p.full_tensor() if is_dtensor(p) else p).detach() for n, p in tensors.items()}
            return
        raise ValueError(
            f"the LM head's parameters are sharded by a wrapper fastpref cannot see from here (shapes "
            f"{[tuple(p.shape) for p in tensors.values()]}, expected {whole_shape(head)}): patch the model before "
            "wrapping it, or pass the wrapped model itself (e.g. the FSDP root) rather than the module inside it")


def _head_tensors(head: nn.Module):
    for name in ("weight", "bias"):
        t = getattr(head, name, None)
        if isinstance(t, torch.Tensor):
            yield name, t


@contextlib.contextmanager
def _fsdp1_summoned(unit: nn.Module, root: Optional[nn.Module]):
    """``summon_full_params(unit, recurse=False)``. FSDP1 makes the first instance it initializes the root, so a
    nested unit is summoned only after the real root has initialized (a summon of the root's own parameters)."""
    cls = _fsdp1_class()
    outer = root if is_fsdp1(root) else None
    if outer is not None and outer is not unit:
        with cls.summon_full_params(outer, recurse=False, writeback=False):
            pass
    elif outer is None and getattr(unit, "_is_root", None) is None:  # FSDP has not initialized any root yet
        raise ValueError("the LM head is an FSDP1 unit nested in an FSDP1 model fastpref cannot see from here, and "
                         "FSDP has not run yet: patch the model before wrapping it, or pass the FSDP root itself")
    with cls.summon_full_params(unit, recurse=False, writeback=False):
        yield


def _fsdp1_owner(root: Optional[nn.Module], head: nn.Module) -> Optional[nn.Module]:
    """The innermost FSDP1 unit under ``root`` whose module tree holds ``head``."""
    if root is None:
        return None
    owner = None
    for m in root.modules():
        if is_fsdp1(m) and any(sub is head for sub in m.module.modules()):
            owner = m  # modules() is pre-order: a later match is nested deeper
    return owner


@contextlib.contextmanager
def swapped_module(root: nn.Module, old: nn.Module, new: nn.Module):
    """Within the block, every attribute of a module under ``root`` that holds ``old`` holds ``new``."""
    places = [(parent, name) for parent in root.modules() for name, child in parent.named_children() if child is old]
    for parent, name in places:
        setattr(parent, name, new)
    try:
        yield
    finally:
        for parent, name in places:
            setattr(parent, name, old)


def probe_head(head: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module of ``head``'s type holding the given whole tensors (no gradient): a stand-in for reading."""
    V, D = whole_shape(head)
    weight = tensors["weight"]
    if isinstance(head, nn.Linear):
        probe = nn.Linear(D, V, bias="bias" in tensors, device="meta")
    else:
        probe = nn.Embedding(V, D, device="meta")
    probe.weight = nn.Parameter(weight, requires_grad=False)
    if "bias" in tensors:
        probe.bias = nn.Parameter(tensors["bias"], requires_grad=False)
    return probe.train(head.training)


@contextlib.contextmanager
def plain_head_within(model: nn.Module, module: nn.Module, head: nn.Module, root: Optional[nn.Module] = None):
    """Within the block, ``model``'s head ``module`` is a plain stand-in holding ``head``'s whole parameters when
    it is wrapped or sharded (nothing changes otherwise): for running the model's own forward on the head without
    gradient and without the wrapper (checking the head). A collective when a gather is needed: every rank."""
    if is_whole(head) and not any(is_fsdp1(m) or is_fsdp2(m) for m in module.modules()):
        yield head  # no wrapper to keep out of the way, nothing to gather
        return
    with whole_parameters(module, head, root) as tensors:
        probe = probe_head(head, tensors)
    with swapped_module(model, module, probe):
        yield probe
