"""``fastpref.sampling.sample_reference_responses``: TYPO's reference samples with HF ``generate`` on a tiny Llama."""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpref.collators import TYPOCollator  # noqa: E402
from fastpref.sampling import SEED_SETTINGS, sample_reference_responses  # noqa: E402
from fastpref.trainer import TYPOTrainer  # noqa: E402

V, EOS, PAD = 40, 1, 0


def _model(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                                      eos_token_id=EOS, bos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config)


PROMPTS = [[2, 5, 6, 7], [2, 9], [2, 11, 12], [2, 5, 6, 7]]  # the last one repeats the first


def test_defaults_are_the_seeds_settings():
    params = inspect.signature(sample_reference_responses).parameters
    for name, value in SEED_SETTINGS.items():
        assert params[name].default == value, name
    assert SEED_SETTINGS == {"num_samples": 1, "temperature": 1.0, "top_k": 60, "top_p": 0.8, "max_new_tokens": 256,
                             "repetition_penalty": 1.1}


def test_generate_receives_the_settings_and_rows_are_typo_unsup_examples(monkeypatch):
    model = _model()
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    model.train()
    rows = sample_reference_responses(model, PROMPTS, seed=0, max_new_tokens=12, batch_size=2)
    assert model.training  # restored
    assert {k: seen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")} == {
        "do_sample": True, "temperature": 1.0, "top_k": 60, "top_p": 0.8, "repetition_penalty": 1.1}
    assert seen["max_new_tokens"] == 12 and seen["num_return_sequences"] == 1
    assert [r["prompt_input_ids"] for r in rows] == PROMPTS[:3]  # one response per distinct prompt, in order
    for r in rows:
        c = r["completion_input_ids"]
        assert r["unsup"] is True and 1 <= len(c) <= 12
        assert EOS not in c[:-1]  # cut after the first EOS
        assert all(0 <= t < V for t in c)
    batch = TYPOCollator(pad_token_id=PAD)(rows)
    assert batch["unsup"].all() and batch["input_ids"].shape[0] == 3


def test_seeded_sampling_is_reproducible_and_batching_does_not_change_the_prompts():
    model = _model()
    a = sample_reference_responses(model, PROMPTS, seed=3, max_new_tokens=6)
    b = sample_reference_responses(model, PROMPTS, seed=3, max_new_tokens=6)
    assert a == b
    c = sample_reference_responses(model, PROMPTS, seed=3, max_new_tokens=6, num_samples=2, batch_size=1)
    assert len(c) == 6 and [r["prompt_input_ids"] for r in c] == [p for p in PROMPTS[:3] for _ in range(2)]


def test_left_padded_batches_sample_the_same_as_single_prompts():
    """With top_k = 1 sampling is greedy: a prompt's continuation must not depend on its batch-mates (padding)."""
    model = _model()
    together = sample_reference_responses(model, PROMPTS[:3], top_k=1, max_new_tokens=5, batch_size=3)
    alone = [sample_reference_responses(model, [p], top_k=1, max_new_tokens=5)[0] for p in PROMPTS[:3]]
    assert together == alone


def test_text_prompts_and_pair_examples():
    model = _model()

    class Tok:
        eos_token_id, pad_token_id = EOS, PAD

        def __call__(self, text):
            return {"input_ids": [2] + [3 + len(w) for w in text.split()]}

    rows = sample_reference_responses(model, ["a bb ccc"], tokenizer=Tok(), seed=0, max_new_tokens=3)
    assert rows[0]["prompt_input_ids"] == [2, 4, 5, 6]
    pairs = [{"prompt_input_ids": [2, 7], "chosen_input_ids": [8], "rejected_input_ids": [9]}] * 2
    assert len(sample_reference_responses(model, pairs, seed=0, max_new_tokens=3)) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[]), "empty"),
    (dict(prompts=["text"]), "tokenizer"),
    (dict(prompts=[[2, -1]]), "token ids"),
    (dict(prompts=[[2]], top_p=0.0), "top_p"),
    (dict(prompts=[[2]], temperature=0.0), "temperature"),
    (dict(prompts=[[2]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[2]], num_samples=0), "num_samples"),
    (dict(prompts="abc"), "list of prompts"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sample_reference_responses(_model(), **kwargs)


def test_samples_train_typo(tmp_path):
    model = _model()
    pairs = [{"prompt_input_ids": p, "chosen_input_ids": [5, 6, EOS], "rejected_input_ids": [7, EOS]}
             for p in PROMPTS[:3]]
    unsup = sample_reference_responses(model, pairs, seed=0, max_new_tokens=4)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=6,
                                          report_to="none", disable_tqdm=True, save_strategy="no",
                                          logging_steps=1, dataloader_pin_memory=False)
    trainer = TYPOTrainer(model, args, train_dataset=pairs + unsup)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"typo/supervised", "typo/unsupervised"} <= set(logged)  # both terms: the batch held pairs and samples
