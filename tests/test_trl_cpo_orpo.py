"""FastPrefCPOTrainer / FastPrefORPOTrainer against TRL 1.16's own CPOTrainer / ORPOTrainer (``trl.experimental``)
on the same tiny model and data: two SGD steps with the same losses, gradients, parameters and logged metrics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from fastpref.integrations._hf_utils import find_causal_lm  # noqa: E402
from fastpref.integrations.transformers import is_patched  # noqa: E402
from fastpref.trainers import FastPrefCPOTrainer, FastPrefORPOTrainer  # noqa: E402
from test_integration_trl import (  # noqa: E402,F401
    CHECKPOINTING,
    GradRecorder,
    _dataset,
    _model,
    _Snapshots,
    assert_overflowing_second_step_is_skipped,
    assert_same_logged_training,
    tokenizer,
)


def _config(cls, tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                max_steps=2, report_to=[], save_strategy="no", logging_steps=1, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                bf16=False, max_length=64)
    base[CHECKPOINTING] = False
    base.update(kwargs)
    return cls(**base)


def _run(trainer_cls, config_cls, tokenizer, tmp_path, trainer_kwargs=None, **config):
    recorder = GradRecorder()
    trainer = trainer_cls(model=_model(0), args=_config(config_cls, tmp_path, **config), train_dataset=_dataset(),
                          processing_class=tokenizer, callbacks=[recorder], **(trainer_kwargs or {}))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, logs, recorder.steps, params


@pytest.mark.parametrize("config", [
    {"loss_type": "sigmoid"},
    {"loss_type": "sigmoid", "label_smoothing": 0.1, "cpo_alpha": 0.5},
    {"loss_type": "hinge"},
    {"loss_type": "ipo"},
    {"loss_type": "simpo", "simpo_gamma": 0.3},
    {"loss_type": "alphapo", "alpha": 0.2},  # TRL: simpo with cpo_alpha = 0
], ids=["sigmoid", "smoothed", "hinge", "ipo", "simpo", "alphapo"])
def test_cpo_trainer_matches_stock(config, tokenizer, tmp_path):
    stock = _run(CPOTrainer, CPOConfig, tokenizer, tmp_path / "stock", beta=0.5, **config)
    fast = _run(FastPrefCPOTrainer, CPOConfig, tokenizer, tmp_path / "fast", beta=0.5, **config)
    assert_same_logged_training(fast, stock)
    assert is_patched(find_causal_lm(fast[0].model))
    assert {"logits/chosen", "nll_loss", "rewards/margins"} <= set(fast[1][0])


def test_orpo_trainer_matches_stock(tokenizer, tmp_path):
    stock = _run(ORPOTrainer, ORPOConfig, tokenizer, tmp_path / "stock", beta=0.3)
    fast = _run(FastPrefORPOTrainer, ORPOConfig, tokenizer, tmp_path / "fast", beta=0.3)
    assert_same_logged_training(fast, stock)
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss", "logits/rejected"} <= set(fast[1][0])


@pytest.mark.parametrize("trainer_cls, config_cls", [(FastPrefCPOTrainer, CPOConfig),
                                                     (FastPrefORPOTrainer, ORPOConfig)])
def test_evaluation_matches_stock(trainer_cls, config_cls, tokenizer, tmp_path):
    stock_cls = CPOTrainer if trainer_cls is FastPrefCPOTrainer else ORPOTrainer
    results = []
    for cls in (stock_cls, trainer_cls):
        trainer = cls(model=_model(0), args=_config(config_cls, tmp_path / cls.__name__), train_dataset=_dataset(),
                      eval_dataset=_dataset(6, seed=1), processing_class=tokenizer)
        results.append(trainer.evaluate())
    stock, fast = results
    for key, value in stock.items():
        if key.startswith("eval_") and not key.endswith(("_time", "_runtime", "_per_second")):
            assert math.isclose(fast[key], value, rel_tol=2e-5, abs_tol=2e-6), (key, fast[key], value)


def test_softcapped_head_logits_metric_matches_stock(tokenizer, tmp_path):
    """A softcap makes the mean logit nonlinear in the hidden states: one no-grad fused pass gives it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma():
        torch.manual_seed(0)
        config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0,
                              attn_implementation="eager", pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model = Gemma2ForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.5)  # logits near the cap
        return model

    results = []
    for cls in (CPOTrainer, FastPrefCPOTrainer):
        trainer = cls(model=gemma(), args=_config(CPOConfig, tmp_path / cls.__name__), train_dataset=_dataset(),
                      eval_dataset=_dataset(4, seed=2), processing_class=tokenizer)
        results.append(trainer.evaluate())
    stock, fast = results
    for key in ("eval_logits/chosen", "eval_logits/rejected", "eval_loss", "eval_nll_loss"):
        assert math.isclose(fast[key], stock[key], rel_tol=1e-5, abs_tol=1e-6), (key, fast[key], stock[key])


@pytest.mark.parametrize("trainer_cls, config_cls", [(FastPrefCPOTrainer, CPOConfig),
                                                     (FastPrefORPOTrainer, ORPOConfig)])
def test_pure_fp16_overflowing_forward_skips_the_step(trainer_cls, config_cls, tokenizer, tmp_path, caplog):
    """Where stock applies the NaN update, the overflowing step is skipped and counted, and training goes on."""
    snapshots = _Snapshots()
    trainer = trainer_cls(model=_model(0).half(), args=_config(config_cls, tmp_path, max_steps=3),
                          train_dataset=_dataset(), processing_class=tokenizer, callbacks=[snapshots])
    assert_overflowing_second_step_is_skipped(trainer, snapshots, caplog)
