"""Launch configuration shared by the launchers: tiles, vocabulary splits, chunk sizes, the launch itself.

Every launcher calls :func:`launch`, which

- runs the kernel under the tensors' CUDA device (``torch.cuda.device``), so tensors on ``cuda:1`` work while
  the current device is ``cuda:0``;
- reports the launch (kernel, grid, issued FLOPs, compulsory bytes, atomics) to an active :class:`LaunchRecorder`
  (``benchmarks.cost`` counts the work of a whole step this way on ``meta`` tensors, with no GPU), and skips the
  kernel itself for ``meta`` tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def poison_enabled() -> bool:
    """Tests set ``FASTPREF_POISON=1`` so every kernel output starts as NaN: an unwritten element shows."""
    return os.environ.get("FASTPREF_POISON", "0") not in ("", "0")


def output_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer a kernel fully overwrites: NaN-filled under ``FASTPREF_POISON=1``, uninitialized otherwise."""
    if poison_enabled() and torch.device(device).type != "meta":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# -- tiles --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """One kernel's tile: ``block_m`` rows x ``block_v`` vocabulary columns, reduced over ``block_d`` slices.

    ``group_m``: row blocks per swizzle group (the forward's grouped order); ``programs_per_sm``: how many programs
    of this tile are resident on one multiprocessor at once (registers and shared memory decide; 1 for the 8-warp
    128-row tiles), used to size vocabulary splits to whole waves.
    """

    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    programs_per_sm: int = 1


# The interpreter executes every program in numpy: small tiles keep CPU tests fast and make odd shapes
# exercise every mask. 16 is the smallest size tl.dot accepts.
_INTERPRETER = TileConfig(block_m=16, block_v=32, block_d=16, num_warps=1, num_stages=1, group_m=2)

# Hopper defaults. Forward: the label-free epilogue (target logit by its own indexed dot) lets 128 x 128 tiles at
# 8 warps run without spills (214-255 registers under triton 3.9 for sm_90); 128 x 256 at 8 warps and 128 x 128 at
# 4 warps spill (tests/compile_sm90.py). Candidates for the first GPU run to measure (benchmarks/tune_head.py).
FORWARD_CANDIDATES = {
    "low_precision": (
        TileConfig(128, 128, 64, num_warps=8, num_stages=4, group_m=8),
        TileConfig(64, 256, 64, num_warps=8, num_stages=3, group_m=16),
        TileConfig(128, 128, 64, num_warps=8, num_stages=3, group_m=16),
    ),
    "fp32": (
        TileConfig(64, 64, 32, num_warps=4, num_stages=2, group_m=8, programs_per_sm=2),
        TileConfig(64, 128, 32, num_warps=8, num_stages=2, group_m=8),
    ),
}
# The backward's logits-gradient tile and the frozen head's softmax-numerator tile: one [BLOCK_M, BLOCK_V] tile
# per program, written to memory, so a grid of (row blocks x vocabulary tiles of one chunk).
GRAD_TILE_CANDIDATES = {
    "low_precision": (
        TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        TileConfig(128, 64, 64, num_warps=4, num_stages=3, programs_per_sm=2),
    ),
    "fp32": (TileConfig(64, 64, 32, num_warps=4, num_stages=2, programs_per_sm=2),),
}
# The variants that carry per-token statistics (forward, frozen numerators) or the entropy's gradient (backward)
# hold more live tiles; at the tiles above they spill 8-208 B of stack on sm_90, so they take half the rows.
STATS_FORWARD_CANDIDATES = {
    "low_precision": (TileConfig(64, 128, 64, num_warps=8, num_stages=3, group_m=16),
                      TileConfig(64, 128, 64, num_warps=8, num_stages=4, group_m=8)),
    "fp32": (TileConfig(32, 64, 32, num_warps=4, num_stages=2, group_m=16, programs_per_sm=2),),
}
STATS_GRAD_TILE_CANDIDATES = {
    "low_precision": (TileConfig(64, 128, 64, num_warps=8, num_stages=3),
                      TileConfig(64, 64, 64, num_warps=4, num_stages=3, programs_per_sm=2)),
    "fp32": (TileConfig(32, 64, 32, num_warps=4, num_stages=2, programs_per_sm=2),),
}
# AuxDPO's head null-space pass holds two [BLOCK_M, BLOCK_V] accumulators (logits and G h): half the rows.
NULL_PASS_CANDIDATES = {
    "low_precision": (TileConfig(64, 128, 64, num_warps=8, num_stages=3),),
    "fp32": (TileConfig(32, 64, 32, num_warps=4, num_stages=2, programs_per_sm=2),),
}
# The indexed dot ``z_{t, y_t} = h_t . W[y_t]``: rows x the hidden size, no vocabulary.
TARGET_TILE = TileConfig(block_m=32, block_v=1, block_d=128, num_warps=4, num_stages=1)
_TARGET_INTERPRETER = TileConfig(block_m=16, block_v=1, block_d=16, num_warps=1, num_stages=1)


# Ampere (A100, sm_80): 164 KiB of shared memory and mma.sync: fewer stages for the plain variants (the lists
# above are Hopper's, sm_90: the compile check targets it). Untested on hardware, like the rest.
AMPERE_CANDIDATES = {
    "forward": {"low_precision": (TileConfig(128, 128, 32, num_warps=8, num_stages=4, group_m=8),
                                  TileConfig(128, 64, 64, num_warps=4, num_stages=3, group_m=8, programs_per_sm=2)),
                "fp32": FORWARD_CANDIDATES["fp32"]},
    "grad": {"low_precision": (TileConfig(128, 64, 64, num_warps=4, num_stages=3, programs_per_sm=2),),
             "fp32": GRAD_TILE_CANDIDATES["fp32"]},
}


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "low_precision"


def generation(device=None) -> str:
    """``"hopper"`` (sm_90 and newer; also what CPU/meta counting assumes) or ``"ampere"`` (sm_8x)."""
    if device is not None and torch.device(device).type == "cuda":
        return "hopper" if torch.cuda.get_device_capability(device)[0] >= 9 else "ampere"
    return "hopper"


def forward_config(dtype: torch.dtype, stats: bool = False, device=None) -> TileConfig:
    """The forward statistics kernel's tile for this dtype and GPU generation (the first candidate)."""
    if interpreter_active():
        return _INTERPRETER
    if not stats and generation(device) == "ampere":
        return AMPERE_CANDIDATES["forward"][_kind(dtype)][0]
    return (STATS_FORWARD_CANDIDATES if stats else FORWARD_CANDIDATES)[_kind(dtype)][0]


def grad_tile_config(dtype: torch.dtype, heavy: bool = False, device=None) -> TileConfig:
    """The backward's and the frozen forward's tile; ``heavy``: with statistics or the entropy's gradient."""
    if interpreter_active():
        return _INTERPRETER
    if not heavy and generation(device) == "ampere":
        return AMPERE_CANDIDATES["grad"][_kind(dtype)][0]
    return (STATS_GRAD_TILE_CANDIDATES if heavy else GRAD_TILE_CANDIDATES)[_kind(dtype)][0]


def null_pass_config(dtype: torch.dtype) -> TileConfig:
    return _INTERPRETER if interpreter_active() else NULL_PASS_CANDIDATES[_kind(dtype)][0]


def target_config() -> TileConfig:
    return _TARGET_INTERPRETER if interpreter_active() else TARGET_TILE


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently drop to tf32 (1e-6 agreement is required); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes ``tl.dot`` on bf16 operands wrongly (seen with triton 3.9); bf16 x bf16
    products are exact in fp32, so upcasting the operands there computes the same function."""
    return interpreter_active() and dtype == torch.bfloat16


# -- work division ------------------------------------------------------------------------------------------------
def multiprocessors(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132 if device.type == "meta" else 1  # meta: counted as an H100/H200 (benchmarks.cost)


def resident_programs(device: torch.device, cfg: TileConfig) -> int:
    """Programs of this tile running at once: one wave."""
    return multiprocessors(device) * cfg.programs_per_sm


def plan_vocab_splits(row_blocks: int, vocab_tiles: int, resident: int, overhead_tiles: float = 1.0) -> int:
    """Vocabulary splits ``s`` for a grid of ``row_blocks x s`` programs, each walking ``ceil(vocab_tiles / s)``
    tiles: the ``s`` that minimizes ``waves(s) * (tiles_per_program(s) + overhead_tiles)`` (whole waves of
    resident programs, no tail of half-empty waves; every program also pays about one tile for its prologue and
    for writing and merging its partial statistics), the smallest such ``s`` on ties."""
    row_blocks, vocab_tiles, resident = max(row_blocks, 1), max(vocab_tiles, 1), max(resident, 1)
    best, best_cost = 1, None
    for s in range(1, vocab_tiles + 1):
        cost = math.ceil(row_blocks * s / resident) * (math.ceil(vocab_tiles / s) + overhead_tiles)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def split_columns(V: int, block_v: int, splits: int) -> tuple[int, int]:
    """``(columns per split, number of splits)``: whole tiles per split, every split holding a real column."""
    vocab_tiles = -(-V // block_v)
    splits = max(1, min(splits, vocab_tiles))
    cols = -(-vocab_tiles // splits) * block_v
    return cols, -(-V // cols)


WORKSPACE_BYTES = 56 * 2**20  # the chunked backward's buffers: dz tile, scaled rows, fp32 dH rows


def backward_chunks(M: int, D: int, V: int, operand_bytes: int, accum_bytes: int = 4,
                    workspace: int = WORKSPACE_BYTES, vocab_chunk: int = 2048) -> tuple[int, int]:
    """``(row chunk Mc, vocabulary chunk Vc)`` of the chunked-GEMM backward.

    Per row chunk it holds ``dz [Mc, Vc]`` (operand dtype), the weighted rows ``[Mc, D]`` (operand dtype) and the
    ``dH`` rows ``[Mc, D]`` (fp32): ``Mc (Vc b + D b + 4 D)`` bytes, sized to ``workspace``; a multiple of 128
    rows (at least 128, at most ``M``). At the Llama-3-8B head (D 4096, bf16) that is ``Mc = 2048``: 56 MiB.
    """
    vc = max(1, min(V, vocab_chunk))
    per_row = vc * operand_bytes + D * (operand_bytes + accum_bytes)
    mc = max(128, (workspace // per_row) // 128 * 128)
    return max(1, min(M, mc)), vc


# -- launching ----------------------------------------------------------------------------------------------------
@dataclass
class LaunchRecord:
    kernel: str
    grid: tuple
    flops: float  # issued (whole tiles, padding included)
    bytes: float  # compulsory traffic: inputs read once, outputs written once
    atomics: float = 0.0


@dataclass
class LaunchRecorder:
    """Collects :class:`LaunchRecord` s while active (``with recorder:``)."""

    records: list = field(default_factory=list)
    _token: Optional[contextvars.Token] = None

    def __enter__(self):
        self._token = _RECORDER.set(self)
        return self

    def __exit__(self, *exc):
        _RECORDER.reset(self._token)


_RECORDER: contextvars.ContextVar[Optional[LaunchRecorder]] = contextvars.ContextVar("fastpref_launches", default=None)


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, *, device: torch.device, flops: float = 0.0,
           bytes: float = 0.0, atomics: float = 0.0, num_warps: int = 4, num_stages: int = 1) -> None:
    """Launch ``kernel[grid](*args, **constexprs)`` on ``device`` (its CUDA device guard), reporting it to an
    active :class:`LaunchRecorder`; on ``meta`` tensors (counting only) nothing runs."""
    recorder = _RECORDER.get()
    if recorder is not None:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        recorder.records.append(LaunchRecord(name, tuple(grid), float(flops), float(bytes), float(atomics)))
    device = torch.device(device)
    if device.type == "meta":
        if recorder is None:
            raise RuntimeError("fastpref kernels cannot run on meta tensors outside a LaunchRecorder")
        return
    if any(int(g) == 0 for g in grid):
        return
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[tuple(grid)](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
