"""Argument checks shared by the public API: every check runs before any kernel is launched.

Shape, dtype and device checks are free; the data-dependent ones (label range, segment ids, finite values,
``cu_seqlens`` order, sequences with no scored token) are reduced on the device and read back with one
synchronization.
"""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def require_tensor(name: str, x, *, dims: Optional[tuple[int, ...]] = None, dtypes=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"`{name}` must be {want}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"`{name}` has dtype {x.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")
    return x


def require_same_device(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"`{name}` is on {x.device} but `{reference_name}` is on {reference.device}")


def require_finite_number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if not torch.isfinite(torch.tensor(value)) or (positive and value <= 0):
        raise ValueError(f"`{name}` must be a finite{' positive' if positive else ''} number, got {value}")
    return value


def raise_failed_checks(checks: list[tuple[str, torch.Tensor]]) -> None:
    """``checks`` pairs an error message with a 0-d bool tensor that is True when the check FAILS."""
    if not checks:
        return
    failed = torch.stack([flag.reshape(()) for _, flag in checks]).tolist()  # the one synchronization
    for (message, _), bad in zip(checks, failed):
        if bad:
            raise ValueError(message)
