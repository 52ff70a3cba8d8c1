"""Input validation shared by the functional losses.

Every public loss validates before it computes and raises ``TypeError`` (wrong kind of object or dtype) or
``ValueError`` (wrong shape, length, range, non-finite value) with a message that starts with the function's name
and names the offending argument.  The checks read tensor values (finiteness, label sets, signs), which costs one
host sync per call on an accelerator: this layer is the reference and the fallback, the kernels skip it.

Under ``torch.compile`` a value check cannot branch in Python (it would break the graph): it becomes the custom op
``torch.ops.fastpref.require(x, failed, message)``, which raises the same ``ValueError`` when the compiled step
runs and otherwise passes ``x`` on (a copy of a per-sequence vector: free), so the check stays in the graph.
"""

from __future__ import annotations

import math
import numbers

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@torch.library.custom_op("fastpref::require", mutates_args=())
def require(x: torch.Tensor, failed: torch.Tensor, message: str) -> torch.Tensor:
    """``x`` (a copy) when ``failed`` is False, else ``ValueError(message)``: a value check inside a compiled graph."""
    if bool(failed):
        raise ValueError(message)
    return x.clone()


@require.register_fake
def _require_fake(x, failed, message):
    return torch.empty_like(x)


torch.library.register_autograd("fastpref::require", lambda ctx, grad: (grad, None, None),
                                setup_context=lambda ctx, inputs, output: None)


class Checker:
    """Collects the validated tensors of one call and the dtype they are computed in.

    The compute dtype is float32, or float64 when any floating input is float64 (half / bfloat16 inputs are
    upcast to float32: every loss computes in at least fp32).
    """

    def __init__(self, fn: str):
        self.fn = fn
        self.device: torch.device | None = None
        self.dtype = torch.float32

    # -- errors -----------------------------------------------------------------------------------------------
    def value_error(self, msg: str) -> ValueError:
        return ValueError(f"{self.fn}: {msg}")

    def type_error(self, msg: str) -> TypeError:
        return TypeError(f"{self.fn}: {msg}")

    def fail_if(self, x: torch.Tensor, failed: torch.Tensor, msg, compiled_msg: str | None = None) -> torch.Tensor:
        """``x`` unless the 0-d bool ``failed`` holds, then ``ValueError`` (``msg``: a string, or a callable built
        only on failure). Under ``torch.compile``: the :func:`require` op with ``compiled_msg`` (default ``msg``)."""
        if torch.compiler.is_compiling():
            text = compiled_msg if compiled_msg is not None else msg
            return torch.ops.fastpref.require(x, failed, f"{self.fn}: {text}")
        if bool(failed):
            raise self.value_error(msg() if callable(msg) else msg)
        return x

    # -- tensors ----------------------------------------------------------------------------------------------
    def _tensor(self, name: str, x, n: int | None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise self.type_error(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise self.value_error(f"`{name}` must be 1-D (one value per sequence), got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise self.value_error(f"`{name}` is empty: the batch must hold at least one row")
        if n is not None and x.numel() != n:
            raise self.value_error(f"`{name}` has {x.numel()} rows, expected {n} (lengths of the inputs must match)")
        if self.device is None:
            self.device = x.device
        elif x.device != self.device:
            raise self.value_error(f"`{name}` is on {x.device}, the other inputs on {self.device}")
        return x

    def floats(self, name: str, x, n: int | None = None) -> torch.Tensor:
        """A 1-D, non-empty, finite floating tensor (returned uncast; call :meth:`cast` after all checks)."""
        x = self._tensor(name, x, n)
        if not x.is_floating_point():
            raise self.type_error(f"`{name}` must have a floating dtype, got {x.dtype}")
        x = self.fail_if(x, ~torch.isfinite(x).all(), f"`{name}` holds non-finite values (nan or inf)")
        if x.dtype == torch.float64:
            self.dtype = torch.float64
        return x

    def lengths(self, name: str, x, n: int) -> torch.Tensor:
        """Response lengths: integer or floating, positive, finite."""
        x = self._tensor(name, x, n)
        if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or _is_integer(x)):
            raise self.type_error(f"`{name}` must be an integer or floating tensor of token counts, got {x.dtype}")
        if x.is_floating_point():
            x = self.fail_if(x, ~torch.isfinite(x).all(), f"`{name}` holds non-finite values (nan or inf)")
        return self.fail_if(x, ~(x > 0).all(), f"`{name}` must be positive (a scored response has at least one token)")

    def pairs_with_lengths(self, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) -> tuple:
        """``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)`` of a length-aware pair loss (SimPO,
        CPO, ORPO): :meth:`floats` and :meth:`lengths`, all of the chosen log-probs' length."""
        cw = self.floats("chosen_logps", chosen_logps)
        n = cw.numel()
        return (cw, self.floats("rejected_logps", rejected_logps, n), self.lengths("chosen_lengths", chosen_lengths, n),
                self.lengths("rejected_lengths", rejected_lengths, n))

    def labels(self, name: str, x, n: int) -> torch.Tensor:
        """Binary labels in {0, 1} (bool, integer or floating tensor); returned as bool."""
        x = self._tensor(name, x, n)
        if x.is_complex():
            raise self.type_error(f"`{name}` must be a bool, integer or floating tensor, got {x.dtype}")
        if x.dtype != torch.bool:
            x = self.fail_if(x, ~((x == 0) | (x == 1)).all(), f"`{name}` must hold only 0 and 1 (1 = desirable)")
            x = x == 1
        return x

    def group_ids(self, name: str, x, n: int) -> torch.Tensor:
        x = self._tensor(name, x, n)
        if not _is_integer(x):
            raise self.type_error(f"`{name}` must be an integer tensor (one prompt id per row), got {x.dtype}")
        return x

    def scalar_tensor(self, name: str, x) -> torch.Tensor:
        """A floating tensor holding exactly one finite value (0-d or one element)."""
        if not isinstance(x, torch.Tensor):
            raise self.type_error(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise self.type_error(f"`{name}` must have a floating dtype, got {x.dtype}")
        if x.numel() != 1:
            raise self.value_error(f"`{name}` must hold a single value, got shape {tuple(x.shape)}")
        if self.device is not None and x.device != self.device:
            raise self.value_error(f"`{name}` is on {x.device}, the other inputs on {self.device}")
        x = self.fail_if(x, ~torch.isfinite(x).all(), f"`{name}` is not finite")
        if x.dtype == torch.float64:
            self.dtype = torch.float64
        return x.reshape(())

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Upcast a validated tensor to the compute dtype (differentiable)."""
        return x if x.dtype == self.dtype else x.to(self.dtype)

    # -- python scalars ---------------------------------------------------------------------------------------
    def number(
        self,
        name: str,
        v,
        *,
        gt: float | None = None,
        ge: float | None = None,
        lt: float | None = None,
        le: float | None = None,
    ) -> float:
        if torch.compiler.is_compiling():  # traced, a Python float may be symbolic: no Python branch on it
            return v
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise self.type_error(f"`{name}` must be a real number, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v):
            raise self.value_error(f"`{name}` must be finite, got {v}")
        if gt is not None and not v > gt:
            raise self.value_error(f"`{name}` must be > {gt}, got {v}")
        if ge is not None and not v >= ge:
            raise self.value_error(f"`{name}` must be >= {ge}, got {v}")
        if lt is not None and not v < lt:
            raise self.value_error(f"`{name}` must be < {lt}, got {v}")
        if le is not None and not v <= le:
            raise self.value_error(f"`{name}` must be <= {le}, got {v}")
        return v

    def choice(self, name: str, v, options) -> str:
        if not isinstance(v, str):
            raise self.type_error(f"`{name}` must be a string, got {type(v).__name__}")
        if v not in options:
            raise self.value_error(f"unknown {name} {v!r}; expected one of {list(options)}")
        return v

    def nonpositive(self, name: str, x: torch.Tensor, why: str) -> torch.Tensor:
        """Log-probs are <= 0 (0 is a valid, confident prediction; :func:`safe_log1mexp` handles it); returns
        ``x`` (use the result: under ``torch.compile`` the check lives in it)."""
        return self.fail_if(x, ~(x <= 0).all(), lambda: f"`{name}` must be <= 0 ({why}); got max {float(x.max())}",
                            f"`{name}` must be <= 0 ({why})")


def _is_integer(x: torch.Tensor) -> bool:
    return x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
