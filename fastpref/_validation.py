"""Argument checks shared by the public API: every check runs before any kernel is launched.

Shape, dtype and device checks are free; the data-dependent ones (label range, segment ids, finite values, the
float32 range of the logits, ``cu_seqlens`` order, sequences with no scored token) are reduced on the device and
read back with one synchronization.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.4e38
# Largest |logit| the fused head accepts: it forms z - max(z) (up to 2 |z|) in float32; 2**126 leaves a factor 4.
LOGIT_LIMIT = 2.0**126  # 8.5e37
# Largest softcap: z / c must stay a normal float32 for ordinary logits (1/c is subnormal beyond 2**126, which
# GPUs flush to zero); a cap this large changes no logit anyway.
SOFTCAP_LIMIT = 2.0**126

Message = Union[str, Callable[[], str]]


class NonFiniteError(ValueError):
    """A tensor holds non-finite values, or values so large that the float32 logits would overflow.

    A ``ValueError`` (what every other bad input raises), distinguishable so that a trainer can treat an overflow
    of the model (e.g. pure fp16 training that diverges) as a step to skip rather than as a programming error.
    """


def require_tensor(name: str, x, *, dims: Optional[tuple[int, ...]] = None, dtypes=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError(f"`{name}` is on the meta device, which holds no data (a model built under "
                         "`init_empty_weights` / `device='meta'`, or offloaded); load or materialize it first")
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
    """``value`` as a Python float: any real number (``int``, ``float``, numpy scalars such as ``np.float32``),
    not a bool, finite in float32 (the kernels' precision), and ``> 0`` with ``positive=True``."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number (int, float or a numpy scalar), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX or (positive and value <= 0):
        what = "a finite positive" if positive else "a finite"
        raise ValueError(f"`{name}` must be {what} number within float32's range (|x| <= {FLOAT32_MAX:.3g}), "
                         f"got {value}")
    return value


def require_softcap(value) -> Optional[float]:
    """``softcap``: None, or a positive number up to :data:`SOFTCAP_LIMIT` (``c * tanh(z / c)`` needs ``z / c``
    to be an ordinary float32; a larger cap leaves every logit unchanged, so pass None instead)."""
    if value is None:
        return None
    value = require_finite_number("softcap", value, positive=True)
    if value > SOFTCAP_LIMIT:
        raise ValueError(f"`softcap`={value:g} is too large: softcap * tanh(z / softcap) divides the logits by it "
                         f"and float32 cannot represent z / {value:g} (limit {SOFTCAP_LIMIT:.3g}); a cap this large "
                         "changes no logit, pass softcap=None")
    return value


def value_checks(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 logit_scale: float) -> list[tuple[Message, torch.Tensor, type]]:
    """Finite ``hidden`` / ``weight`` / ``bias``, and logits that cannot overflow float32, as lazy checks.

    One ``aminmax`` pass per tensor (no copy) gives both its finiteness (NaN propagates) and its largest magnitude,
    from which ``|z| = |logit_scale * (w . h + b)| <= logit_scale * (D max|h| max|w| + max|b|)`` bounds every
    logit; the bound must stay below :data:`LOGIT_LIMIT`. It is loose by about ``sqrt(D)`` for random data, so it
    only rejects inputs whose logits could actually reach ~1e37, never the logits of a working model.
    """
    checks: list[tuple[Message, torch.Tensor, type]] = []
    magnitudes = {}
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is None:
            continue
        if x.numel() == 0:  # an empty packed batch: the layout checks report it
            magnitudes[name] = torch.zeros((), device=x.device)
            continue
        lo, hi = torch.aminmax(x)
        lo, hi = lo.float(), hi.float()
        checks.append((f"`{name}` holds non-finite values", ~(torch.isfinite(lo) & torch.isfinite(hi)), NonFiniteError))
        magnitudes[name] = torch.maximum(lo.abs(), hi.abs())
    D = hidden.shape[-1]
    bound = magnitudes["hidden"] * magnitudes["weight"] * float(D)
    if "bias" in magnitudes:
        bound = bound + magnitudes["bias"]
    bound = bound * logit_scale  # float32: an overflow gives inf, which fails the check as it should

    def overflow_message() -> str:
        h, w = float(magnitudes["hidden"]), float(magnitudes["weight"])
        b = float(magnitudes["bias"]) if "bias" in magnitudes else 0.0
        reach = logit_scale * (D * h * w + b)  # float64, for the message
        return (f"the logits can overflow float32: |logit_scale * (W h + b)| may reach {reach:.3g} > "
                f"{LOGIT_LIMIT:.3g} (`logit_scale`={logit_scale:g}, max |`hidden`| {h:.3g}, max |`weight`| {w:.3g}, "
                f"hidden size {D}); the fused head computes the logits in float32, so reduce `logit_scale` or the "
                "magnitude of `hidden` / `weight`")

    checks.append((overflow_message, bound > LOGIT_LIMIT, NonFiniteError))
    return checks


def empty_sequences_check(scored_per_sequence: torch.Tensor) -> tuple[Message, torch.Tensor]:
    """Every sequence must have a scored token; the message names the ones that have none."""
    empty = scored_per_sequence == 0

    def message() -> str:
        index = torch.nonzero(empty).reshape(-1).tolist()
        shown = ", ".join(str(i) for i in index[:10]) + (", ..." if len(index) > 10 else "")
        one = len(index) == 1
        which = f"sequence {index[0]}" if one else f"{len(index)} sequences ({shown})"
        return (f"{which} of {empty.numel()} (0-based) {'has' if one else 'have'} no scored token (every label is "
                f"ignore_index or its segment id is 0); drop {'it' if one else 'them'} from the batch or mark "
                f"{'its' if one else 'their'} response tokens")

    return message, empty.any()


def raise_failed_checks(checks: Sequence[tuple]) -> None:
    """``checks`` holds ``(message, flag)`` or ``(message, flag, exception class)``: ``flag`` is a 0-d bool tensor
    that is True when the check FAILS, ``message`` a string or a callable building it (called only on failure).
    The first failed check raises (``ValueError`` unless it names another class); one synchronization in all."""
    if not checks:
        return
    failed = torch.stack([check[1].reshape(()) for check in checks]).tolist()  # the one synchronization
    for check, bad in zip(checks, failed):
        if bad:
            message = check[0]() if callable(check[0]) else check[0]
            error = check[2] if len(check) > 2 else ValueError
            raise error(message)
