"""FastPrefDPOTrainer on 2 CPU processes under accelerate: DDP, FSDP2 and DeepSpeed ZeRO-3, for dpo, auxdpo and
drdo (and a feedback trainer, AuxDPOTrainer, under DDP), against the same two steps in one process accumulating
gradients over the two ranks' micro-batches (tests/dist_workers/trl_step.py).

Compared: the logged loss and log-probs, and every parameter after the steps, the model's and the trainer's own
(AuxDPO's ``delta_raw``, DRDO's reward head: replicated, their gradients averaged over the ranks). Each run also
reports what proves its mode is on: 2 processes, FSDP2 units in the trained model, a ZeRO-3 head partitioned to a
``[0]`` placeholder (accelerate turns neither FSDP nor multi-process DeepSpeed on for a CPU run by itself; the
worker does).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from tests.dist_workers.launch import launch  # noqa: E402

METHODS = ("dpo", "auxdpo", "drdo")
LOG_TOL = 1e-6  # relative: logged loss and log-probs (fp32)
PARAM_TOL = 1e-5  # relative per parameter tensor after two SGD steps (fp32)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trl-distributed")


@pytest.fixture(scope="module")
def reference(out_dir):
    return launch("trl_step", "reference", nproc=1, timeout=240, env={"FASTPREF_OUT": str(out_dir)})[0]


def _run(out_dir, mode):
    return launch("trl_step", mode, nproc=2, timeout=300, env={"FASTPREF_OUT": str(out_dir)})


@pytest.fixture(scope="module")
def ddp(out_dir):
    return _run(out_dir, "ddp")


@pytest.fixture(scope="module")
def fsdp2(out_dir):
    return _run(out_dir, "fsdp2")


@pytest.fixture(scope="module")
def zero3(out_dir):
    return _run(out_dir, "zero3")


def _compare(out_dir, mode, method, ranks, reference):
    ref = reference[method]
    assert "error" not in ref, ref["error"]
    ref_params = torch.load(out_dir / f"reference-{method}-rank0.pt")
    for rank, res in enumerate(ranks):
        r = res[method]
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        assert r["world"] == 2.0
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert abs(r[key] - ref[key]) <= LOG_TOL * max(1.0, abs(ref[key])), (key, r[key], ref[key])
        params = torch.load(out_dir / f"{mode}-{method}-rank{rank}.pt")
        assert set(params) == set(ref_params)
        errors = {n: float((params[n] - p).norm() / p.norm().clamp(min=1e-30)) for n, p in ref_params.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] < PARAM_TOL, (worst, errors[worst])
        owned = [n for n in ref_params if n.startswith("fastpref_modules.")]
        assert (method == "dpo") == (not owned)  # auxdpo / drdo / feedback: their own parameters are compared too
    return [res[method] for res in ranks]


@pytest.mark.parametrize("method", METHODS)
def test_ddp(out_dir, ddp, reference, method):
    """Different pairs on each rank; the parameters end equal to one process on all pairs (DDP reduced the model's
    gradients, fastpref the trainer-owned ones; trl#7245: a fused head that skips DDP's sync would not)."""
    _compare(out_dir, "ddp", method, ddp, reference)


def test_ddp_feedback_trainer(out_dir, ddp, reference):
    """A feedback trainer (``AuxDPOTrainer``) under DDP: its ``delta_raw``, started from different values on each
    rank, is rank 0's before the first step, and its gradient is averaged like the model's: every parameter ends
    equal to one process."""
    _compare(out_dir, "ddp", "feedback", ddp, reference)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2(out_dir, fsdp2, reference, method):
    for r in _compare(out_dir, "fsdp2", method, fsdp2, reference):
        assert r["fsdp_enabled"] == 1.0 and r["fsdp2_units"] > 0


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("method", METHODS)
def test_deepspeed_zero3(out_dir, zero3, reference, method):
    for r in _compare(out_dir, "zero3", method, zero3, reference):
        assert r["zero_stage"] == 3.0 and r["head_partitioned"] == 1.0
