"""Shared by the multi-process workers: process-group setup, per-case error capture, comparisons, tiny models."""

from __future__ import annotations

import os
import sys
import traceback

os.environ.setdefault("FASTPREF_POISON", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.dist_workers.launch import report  # noqa: E402,F401


def init(backend: str = "gloo") -> int:
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
    torch.manual_seed(0)
    return dist.get_rank()


def run_cases(cases: dict, selected=None) -> dict:
    """Run each case (a function returning a dict of numbers); an exception becomes ``{"error": traceback}``."""
    results = {}
    for name, fn in cases.items():
        if selected and name not in selected:
            continue
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = {"error": traceback.format_exc()[-4000:]}
            print(f"[rank {os.environ.get('RANK', 0)}] case {name} failed:\n{results[name]['error']}", file=sys.stderr)
    return results


def rel(actual, expected) -> float:
    """``||a - e|| / ||e||`` in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm().clamp(min=1e-30))


def max_abs(actual, expected) -> float:
    return float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max())


def expect_error(fn) -> dict:
    """Run ``fn`` expecting an exception; report its type and message (a hang is the launcher's timeout)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return {"raised": type(exc).__name__, "message": str(exc)[:500]}
    return {"raised": None, "message": ""}


def tiny_llama(*, tie: bool = False, seed: int = 0, vocab: int = 97, bias_free: bool = True):
    """A 2-layer Llama from a config (nothing downloaded), float32, the same weights on every rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # a head with real spread (the init is tiny)
        model.lm_head.weight.normal_(0.0, 0.3)
    return model


def preference_batch(B: int = 4, T: int = 12, vocab: int = 97, seed: int = 1):
    """``input_ids``, ``attention_mask`` and ``completion_mask`` of a padded batch (prompt, response, padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    comp = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        p = int(torch.randint(2, T // 2, (1,), generator=g))
        e = int(torch.randint(p + 2, T + 1, (1,), generator=g))
        comp[i, p:e] = 1
        attn[i, e:] = 0
    return ids, attn, comp
