"""Responses sampled from the reference model, for TYPO's unsupervised term (docs/methods.md section 4).

TYPO ("New Desiderata for Direct Preference Optimization", seed 002) adds ``lam * E[-log pi(y_u)]`` over responses
``y_u`` sampled from the reference (SFT) model. The seed samples **one response per prompt** with temperature 1,
``top_k = 60``, ``top_p = 0.8``, at most 256 new tokens and repetition penalty 1.1: :data:`SEED_SETTINGS`, the
defaults of :func:`sample_reference_responses`. Its output rows are TYPO's ``unsup`` examples, ready for
:class:`fastpref.trainers.collators.TYPOCollator` / :class:`fastpref.trainers.TYPOTrainer` next to the preference
pairs::

    from fastpref.sampling import sample_reference_responses

    unsup = sample_reference_responses(ref_model, [ex["prompt_input_ids"] for ex in pairs], seed=0)
    trainer = TYPOTrainer(policy, args, train_dataset=pairs + unsup)
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["SEED_SETTINGS", "sample_reference_responses"]

# The seed's sampling settings (TYPO, seed 002): one response per prompt.
SEED_SETTINGS = {"num_samples": 1, "temperature": 1.0, "top_k": 60, "top_p": 0.8, "max_new_tokens": 256,
                 "repetition_penalty": 1.1}


def _token_id(value) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _prompt_ids(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not hasattr(prompts, "__iter__"):
        raise TypeError("sample_reference_responses: `prompts` must be a list of prompts (token-id lists, strings, "
                        "or dicts with 'prompt_input_ids')")
    out, seen = [], set()
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            if "prompt_input_ids" not in p:
                raise ValueError(f"sample_reference_responses: prompt {i} is a dict without 'prompt_input_ids'")
            p = p["prompt_input_ids"]
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("sample_reference_responses: text prompts need `tokenizer`")
            p = tokenizer(p)["input_ids"]
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, Sequence) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in p):
            raise ValueError(f"sample_reference_responses: prompt {i} must be a list of token ids (ints >= 0)")
        if not p:
            raise ValueError(f"sample_reference_responses: prompt {i} is empty (generation needs a context token)")
        key = tuple(p)
        if key not in seen:  # one response per (distinct) prompt, as the seed
            seen.add(key)
            out.append(list(p))
    if not out:
        raise ValueError("sample_reference_responses: `prompts` is empty")
    return out


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sample_reference_responses: `{name}` must be a positive int, got {value!r}")
    return value


@torch.no_grad()
def sample_reference_responses(
    model: nn.Module,
    prompts,
    *,
    tokenizer=None,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 60,
    top_p: float = 0.8,
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.1,
    batch_size: int = 8,
    seed: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    **generate_kwargs: Any,
) -> list[dict]:
    """Sample responses from the reference model with Hugging Face ``generate``: TYPO's ``unsup`` rows.

    Args:
        model: the reference (SFT) causal LM, e.g. ``AutoModelForCausalLM`` (a patched model works: its normal
            forward is unchanged). Put in eval mode for the call (restored afterwards).
        prompts: token-id lists, strings (with ``tokenizer``), or dicts with ``prompt_input_ids`` (e.g. the pair
            examples themselves). Each distinct prompt is sampled once (``num_samples`` times), in first-seen order.
        num_samples, temperature, top_k, top_p, max_new_tokens, repetition_penalty: the seed's settings by
            default (:data:`SEED_SETTINGS`: 1, 1.0, 60, 0.8, 256, 1.1).
        batch_size: prompts per ``generate`` call (left-padded).
        seed: seeds the sampling (the global RNG state is restored afterwards); None uses the current RNG.
        pad_token_id, eos_token_id: default: the tokenizer's, else the model's generation config / config. The
            completion stops after the first EOS (kept, as :func:`fastpref.trainers.collators.tokenize_example`
            appends it).
        **generate_kwargs: passed to ``model.generate``.

    Returns:
        One dict per sample: ``{"prompt_input_ids", "completion_input_ids", "unsup": True}``.
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError("sample_reference_responses: `model` must be a Hugging Face causal LM (with `generate`)")
    ids = _prompt_ids(prompts, tokenizer)
    num_samples = _positive_int("num_samples", num_samples)
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    batch_size = _positive_int("batch_size", batch_size)
    top_k = _positive_int("top_k", top_k)
    for name, value, ok in (("temperature", temperature, lambda v: v > 0), ("top_p", top_p, lambda v: 0 < v <= 1),
                            ("repetition_penalty", repetition_penalty, lambda v: v > 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
            raise ValueError(f"sample_reference_responses: `{name}` out of range: {value!r}")
    gen_config = getattr(model, "generation_config", None)
    config = getattr(model, "config", None)
    if eos_token_id is None:
        for source in (tokenizer, gen_config, config):
            eos_token_id = _token_id(getattr(source, "eos_token_id", None)) if source is not None else None
            if eos_token_id is not None:
                break
    if pad_token_id is None:
        for source in (tokenizer, gen_config, config):
            pad_token_id = _token_id(getattr(source, "pad_token_id", None)) if source is not None else None
            if pad_token_id is not None:
                break
        if pad_token_id is None:
            pad_token_id = eos_token_id if eos_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
        else contextlib.nullcontext()
    out: list[dict] = []
    try:
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                width = max(len(p) for p in chunk)
                input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):  # left padding: the continuation starts at the same column
                    input_ids[i, width - len(p):] = torch.tensor(p)
                    attention[i, width - len(p):] = 1
                generated = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=True,
                    temperature=float(temperature), top_k=top_k, top_p=float(top_p), max_new_tokens=max_new_tokens,
                    repetition_penalty=float(repetition_penalty), num_return_sequences=num_samples,
                    pad_token_id=pad_token_id, eos_token_id=eos_token_id, **generate_kwargs)
                new = generated[:, width:].tolist()
                for j, tokens in enumerate(new):
                    if eos_token_id is not None and eos_token_id in tokens:  # generate pads only after an EOS
                        tokens = tokens[: tokens.index(eos_token_id) + 1]
                    out.append({"prompt_input_ids": list(chunk[j // num_samples]), "completion_input_ids": tokens,
                                "unsup": True})
    finally:
        model.train(was_training)
    return out
