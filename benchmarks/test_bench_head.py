"""pytest-benchmark suites for fastpref's fused head at the Llama-3-8B head size (GPU).

Shapes and inputs follow the anchors (``benchmarks/common.py``: D 4096, V 128256, 4 pairs x 2048 tokens, half
prompt, bf16, Gaussian logits). Suites: the policy forward (full fine-tuning and frozen head), the reference
forward (no grad), the policy backward (its forward runs in the untimed setup), one full DPO step of the head
(``head_check.fastpref_step``), and one training step of every loss module (``methods_step.method_steps``:
DPO, IPO, SimPO, PRO, DRO, TYPO, AuxDPO, DRDO). Every timed function synchronizes CUDA before it returns; two
warm-up rounds, then ``FASTPREF_BENCH_ROUNDS`` (default 5) rounds of one call each. ``extra_info`` holds the
shape and the peak memory above what was allocated before the benchmark (gradients included).

    pytest benchmarks --benchmark-only                          # CUDA; skipped without it
    pytest benchmarks --benchmark-only --smoke                  # tiny shapes, CPU too (or FASTPREF_BENCH_SMOKE=1)
    FASTPREF_BENCH_BACKEND=torch pytest benchmarks ...          # the chunked PyTorch backend instead of auto
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import fastpref
from benchmarks import head_check, methods_step
from benchmarks.common import dpo_from_logps, make_inputs

CUDA = torch.cuda.is_available()
METHODS = list(methods_step.method_steps(4, 8, 2, "torch", torch.device("cpu")))  # the names only


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def cfg(request):
    smoke = bool(request.config.getoption("--smoke", default=False)) or os.environ.get("FASTPREF_BENCH_SMOKE") == "1"
    if not CUDA and not smoke:
        pytest.skip("needs CUDA (Llama-3-8B head shapes); --smoke or FASTPREF_BENCH_SMOKE=1 runs tiny CPU shapes")
    device = torch.device("cuda" if CUDA else "cpu")
    shape = dict(pairs=2, T=24, D=40, V=301) if smoke else dict(pairs=4, T=2048, D=4096, V=128256)
    prompt_frac = 0.5
    W, H, Href, lab = make_inputs(shape["pairs"], shape["T"], shape["D"], shape["V"], prompt_frac, device)
    H.requires_grad_(True)
    backend = os.environ.get("FASTPREF_BENCH_BACKEND", "auto")
    with torch.no_grad():
        ref = fastpref.sequence_logprobs(Href, W, lab, backend=backend, validate=False).response
    rounds = int(os.environ.get("FASTPREF_BENCH_ROUNDS", "2" if smoke else "5"))
    return SimpleNamespace(device=device, W=W, H=H, Href=Href, lab=lab, ref=ref, backend=backend, rounds=rounds,
                           prompt_frac=prompt_frac, info=dict(shape, prompt_frac=prompt_frac, smoke=smoke,
                                                              device=str(device), backend=backend))


def _run(benchmark, cfg, target, *, mode="full", params=(), setup=None):
    """Two warm-up rounds, then ``cfg.rounds`` timed calls of ``target`` (one per round); gradients are
    cleared before each round, ``setup`` (untimed) may return ``(args, kwargs)`` for ``target``."""
    cfg.W.requires_grad_(mode == "full")
    params = [cfg.W, cfg.H, *params]

    def prepare():
        for p in params:
            p.grad = None
        out = setup() if setup is not None else None
        _sync(cfg.device)
        return out

    prepare()
    if cfg.device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    benchmark.extra_info.update(cfg.info, mode=mode)
    try:
        benchmark.pedantic(target, setup=prepare, rounds=cfg.rounds, warmup_rounds=2, iterations=1)
    finally:
        if cfg.device.type == "cuda":
            benchmark.extra_info["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        for p in params:
            p.grad = None
        cfg.W.requires_grad_(False)


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_policy_forward(benchmark, cfg, mode):
    def target():
        out = fastpref.sequence_logprobs(cfg.H, cfg.W, cfg.lab, backend=cfg.backend, validate=False).response
        _sync(cfg.device)
        return out
    _run(benchmark, cfg, target, mode=mode)


def test_reference_forward(benchmark, cfg):
    def target():
        with torch.no_grad():
            out = fastpref.sequence_logprobs(cfg.Href, cfg.W, cfg.lab, backend=cfg.backend, validate=False).response
        _sync(cfg.device)
        return out
    _run(benchmark, cfg, target, mode="frozen")


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_policy_backward(benchmark, cfg, mode):
    def setup():  # the policy forward and the DPO loss, untimed
        pol = fastpref.sequence_logprobs(cfg.H, cfg.W, cfg.lab, backend=cfg.backend, validate=False).response
        return (dpo_from_logps(pol, cfg.ref),), {}

    def target(loss):
        loss.backward()
        _sync(cfg.device)
    _run(benchmark, cfg, target, mode=mode, setup=setup)


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_dpo_step(benchmark, cfg, mode):
    """Policy forward + backward and the reference forward, as ``benchmarks.compare`` times it."""
    step = head_check.fastpref_step(cfg.backend)

    def target():
        loss, _ = step(cfg.W, cfg.H, cfg.Href, cfg.lab)
        _sync(cfg.device)
        return loss
    _run(benchmark, cfg, target, mode=mode)


@pytest.mark.parametrize("method", METHODS)
def test_module_step(benchmark, cfg, method):
    """One training step of a loss module (its reference pass and its own extra passes included)."""
    S, D, V = cfg.H.shape[0], cfg.W.shape[1], cfg.W.shape[0]
    mod, kw = methods_step.method_steps(S, D, S // 2, cfg.backend, cfg.device)[method]
    seg = methods_step._segments(cfg.lab, cfg.prompt_frac)
    g = torch.Generator(device=cfg.device).manual_seed(7)
    labels = torch.where(cfg.lab == -100, torch.randint(0, V, cfg.lab.shape, device=cfg.device, generator=g), cfg.lab)
    kw = dict(kw)
    needs_ref, prompt = kw.pop("needs_ref", False), kw.pop("prompt", False)
    seg = seg if prompt else torch.where(seg == 1, 0, seg)  # only DRO scores the prompt rows
    if needs_ref:
        kw.update(ref_hidden=cfg.Href, ref_weight=cfg.W)

    def target():
        loss, _ = mod(cfg.H, cfg.W, labels, seg, **kw)
        loss.backward()
        _sync(cfg.device)
        return loss
    _run(benchmark, cfg, target, params=list(mod.parameters()))
    benchmark.extra_info["method"] = method
