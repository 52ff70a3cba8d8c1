"""``C = alpha A B + beta C`` with the accumulation the fused head needs, whatever the device.

- ``C`` of the operands' dtype: ``addmm_`` (cuBLAS accumulates in fp32 and rounds once per call).
- fp32 ``C``, bf16/fp16 operands: ``torch.addmm(..., out_dtype=torch.float32)`` on CUDA where the installed
  torch has it, else ``fastpref.kernels.matmul_accumulate`` (Triton); on the CPU the operands are upcast
  (bf16/fp16 products are exact in fp32, so this is the same function).
- fp32 products never run in TF32 here (``torch.set_float32_matmul_precision`` is set to ``"highest"`` for the
  call): fp32 heads are promised 1e-6 agreement with float64.
"""

from __future__ import annotations

import contextlib
import functools

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_addmm() -> bool:
    """torch >= 2.8 has ``addmm(..., out_dtype=)``; probe it once on a tiny CUDA problem (some builds lack it)."""
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    try:
        a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        c = torch.zeros(16, 16, device="cuda", dtype=torch.float32)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool(c[0, 0] == 16)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@contextlib.contextmanager
def exact_fp32_matmul(dtype: torch.dtype):
    """No TF32 for fp32 (or float64) operands inside the block; a no-op for bf16/fp16."""
    if dtype in LOW_PRECISION:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


def accumulate_mm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0,
                  beta_zero: bool = False) -> torch.Tensor:
    """``c = alpha * a @ b + (0 if beta_zero else c)``, in place (``beta_zero`` ignores ``c``'s content, NaN
    included). ``a`` and ``b`` share a dtype; ``c`` has that dtype or is fp32 (float64 for float64 operands)."""
    beta = 0.0 if beta_zero else 1.0
    with exact_fp32_matmul(a.dtype):
        if c.dtype == a.dtype:
            return c.addmm_(a, b, beta=beta, alpha=alpha)
        if c.dtype == torch.float32 and a.dtype in LOW_PRECISION:
            if c.device.type == "meta" or (c.device.type == "cuda" and _cuda_out_dtype_addmm()):
                return torch.addmm(c, a, b, out_dtype=torch.float32, beta=beta, alpha=alpha, out=c)
            if c.device.type == "cuda":
                from fastpref.kernels.matmul_accumulate import matmul_accumulate

                return matmul_accumulate(c, a, b, alpha=alpha, beta_zero=beta_zero)
            with exact_fp32_matmul(torch.float32):
                return c.addmm_(a.float(), b.float(), beta=beta, alpha=alpha)
        # any other mix (a low-precision output from fp32 operands: the torch backend on a bf16 head)
        result = torch.addmm(c.to(a.dtype), a, b, beta=beta, alpha=alpha) if not beta_zero else alpha * (a @ b)
        return c.copy_(result)
