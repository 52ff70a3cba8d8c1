"""The Hugging Face patch under FSDP2, FSDP1, DDP, a tensor-parallel head and DeepSpeed ZeRO-3, on 2 CPU processes
(gloo), against one process: log-probs, loss and every trainable parameter after one SGD step.

Each sharded layout is set up explicitly (``fully_shard`` / ``FullyShardedDataParallel`` / ``deepspeed.initialize``)
so that sharding is really on; each case also reports a fact that proves it (the head is its own unit, the ZeRO-3
head is a ``[0]`` placeholder outside the forward). Patching after wrapping is what TRL does with its reference
model: the check of the head must then run the same way on every rank (FSDP1 used to leave one rank unpatched and
hang the job).
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.dist_workers.launch import launch

TOL = 1e-6  # fp32: relative error of log-probs, loss and parameters after one step against one process
BF16_TOL = 2e-2


@pytest.fixture(scope="module")
def wrapped():
    return launch("wrappers", timeout=300)


def _case(results, name):
    for rank, res in enumerate(results):
        assert name in res, f"rank {rank} did not run {name}"
        assert "error" not in res[name], f"rank {rank}:\n{res[name]['error']}"
    return [res[name] for res in results]


def _check_step(r, tol=TOL):
    assert r["missing_params"] == 0 and r["params_compared"] > 0, r
    assert max(r["logps"], r["loss"], r["params"]) < tol, r


@pytest.mark.parametrize("case,head_unit", [
    ("fsdp2_root", False),
    ("fsdp2_head_unit", True),
    ("fsdp2_norm_head_unit", True),  # accelerate's layout: the head shares a unit with the final norm
    ("fsdp2_lora_head_unit", True),  # accelerate's layout under LoRA: the frozen head alone
    ("fsdp2_tied", False),
    ("fsdp2_patch_after_wrap_root", False),
    ("fsdp2_patch_after_wrap_head_unit", True),
])
def test_fsdp2(wrapped, case, head_unit):
    for r in _case(wrapped, case):
        _check_step(r)
        assert r["head_is_unit"] == float(head_unit)


def test_fsdp2_bf16_mixed_precision(wrapped):
    for r in _case(wrapped, "fsdp2_bf16_head_unit"):
        _check_step(r, BF16_TOL)


@pytest.mark.parametrize("case,head_unit", [
    ("fsdp1_root", False),
    ("fsdp1_root_orig_params", False),
    ("fsdp1_head_unit", True),
    ("fsdp1_lora_head_unit", True),
    ("fsdp1_tied", False),
    ("fsdp1_patch_after_wrap_root", False),
    ("fsdp1_patch_after_wrap_head_unit", True),
])
def test_fsdp1(wrapped, case, head_unit):
    for r in _case(wrapped, case):
        _check_step(r)
        assert r["head_is_unit"] == float(head_unit)


def test_ddp_synchronizes_gradients(wrapped):
    """Different halves of the batch per rank: the same parameters on both ranks after one step, equal to one
    process on the whole batch (trl#7245: TRL with Liger's fused head skips DDP's gradient reduction)."""
    for r in _case(wrapped, "ddp"):
        _check_step(r)
        assert r["ranks_differ"] == 0.0


@pytest.mark.parametrize("case", ["tp_head", "tp_head_patch_after"])
def test_tensor_parallel_head_through_the_patch(wrapped, case):
    for r in _case(wrapped, case):
        assert max(r["logps"], r["loss"], r["params"]) < TOL, r


@pytest.mark.parametrize("case", ["wrong_config_fsdp2", "wrong_config_fsdp1"])
def test_head_check_after_wrapping_runs_on_every_rank(wrapped, case):
    for r in _case(wrapped, case):
        assert r["raised"] == "ValueError" and "does not compute its logits" in r["message"], r


# ---------------------------------------------------------------------------------------------- ZeRO-3

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install 'fastpref[test]')")


@pytest.fixture(scope="module")
def zero3():
    return launch("zero3", timeout=300)


@needs_deepspeed
@pytest.mark.parametrize("case", ["zero3", "zero3_tied", "zero3_patch_after_wrap"])
def test_deepspeed_zero3(zero3, case):
    """Every parameter partitioned (the head is a [0] placeholder outside the forward)."""
    for r in _case(zero3, case):
        assert r["head_partitioned"] == 1.0
        assert max(r["logps"], r["loss"], r["params"]) < TOL, r


@needs_deepspeed
def test_deepspeed_zero3_head_check_runs(zero3):
    """ZeRO-3 used to skip the check silently (the placeholder has no rows); now it runs on the gathered head."""
    for r in _case(zero3, "zero3_wrong_config"):
        assert r["raised"] == "ValueError" and "does not compute its logits" in r["message"], r
