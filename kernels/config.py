"""Launch configuration shared by the launchers: block sizes, interpreter detection, buffer allocation."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def poison_enabled() -> bool:
    """Tests set ``FASTPREF_POISON=1`` so every kernel output starts as NaN: an unwritten element shows."""
    return os.environ.get("FASTPREF_POISON", "0") not in ("", "0")


def output_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer a kernel fully overwrites: NaN-filled under ``FASTPREF_POISON=1``, uninitialized otherwise."""
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# The interpreter executes every program in numpy: small tiles keep CPU tests fast and make odd shapes
# exercise every mask. 16 is the smallest size tl.dot accepts.
_INTERPRETER = TileConfig(block_m=16, block_v=32, block_d=16, num_warps=1, num_stages=1)

# Hopper-class defaults (untuned starting points; tuning is the speed issue's work).
_FORWARD_LOW_PRECISION = TileConfig(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
_FORWARD_FP32 = TileConfig(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=2)
_BACKWARD_LOW_PRECISION = TileConfig(block_m=64, block_v=128, block_d=64, num_warps=8, num_stages=2)
_BACKWARD_FP32 = TileConfig(block_m=32, block_v=64, block_d=32, num_warps=4, num_stages=2)


def forward_config(dtype: torch.dtype) -> TileConfig:
    if interpreter_active():
        return _INTERPRETER
    return _FORWARD_FP32 if dtype == torch.float32 else _FORWARD_LOW_PRECISION


def backward_config(dtype: torch.dtype) -> TileConfig:
    if interpreter_active():
        return _INTERPRETER
    return _BACKWARD_FP32 if dtype == torch.float32 else _BACKWARD_LOW_PRECISION


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently drop to tf32 (1e-6 agreement is required); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes ``tl.dot`` on bf16 operands wrongly (seen with triton 3.9); bf16 x bf16
    products are exact in fp32, so upcasting the operands there computes the same function."""
    return interpreter_active() and dtype == torch.bfloat16


def num_programs_target(device: torch.device) -> int:
    """How many programs fill the device: two waves of streaming multiprocessors on CUDA."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def num_vocab_splits(num_row_blocks: int, vocab_tiles: int, device: torch.device) -> int:
    """Enough vocabulary splits that row blocks x splits fills the device, never more than vocabulary tiles."""
    want = -(-num_programs_target(device) // max(num_row_blocks, 1))
    return max(1, min(want, vocab_tiles))
