"""The few collectives the distributed head uses, and the one differentiable one (a sum with an identity backward).

Every collective here is called by every rank of its group in the same order: the callers decide what to call from
values that are equal on every rank (shapes, settings, the result of an earlier collective), never from a rank's
own data.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = getattr(dist, "ProcessGroup", None)  # None on a torch built without distributed support


def require_group(name: str, group) -> ProcessGroup:
    """``group`` is a ``torch.distributed.ProcessGroup`` of an initialized default group, or a clear error."""
    if not dist.is_available() or ProcessGroup is None:
        raise RuntimeError(f"`{name}` needs torch.distributed, which this torch build does not have")
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"`{name}` must be a torch.distributed.ProcessGroup (e.g. `device_mesh.get_group('tp')`), "
                        f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"`{name}` was given but torch.distributed is not initialized (init_process_group first)")
    return group


def group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather_rows(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x`` (same shape on every rank), in group rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def all_reduce_(x: torch.Tensor, op, group: ProcessGroup) -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor (a copy is reduced and written back otherwise)."""
    if x.is_contiguous():
        dist.all_reduce(x, op=op, group=group)
        return x
    y = x.contiguous()
    dist.all_reduce(y, op=op, group=group)
    x.copy_(y)
    return x


class _SumAcrossGroup(torch.autograd.Function):
    """Forward: the sum of ``x`` over the group's ranks. Backward: the upstream gradient unchanged.

    The identity backward is exact when every rank computes the same loss from the summed value (the loss is
    replicated across the group): ``d loss / d x_r = d loss / d sum`` for every rank's own ``x_r``.
    """

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_across_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable sum over the ranks of ``group`` with an identity backward (see :class:`_SumAcrossGroup`)."""
    return _SumAcrossGroup.apply(x, group)
