"""FastPrefDPOTrainer logs everything stock ``DPOTrainer`` (TRL 1.16) logs, under TRL's names and with stock's values
on the same batches (``entropy``, ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy`` from the fused
forward's statistics, next to the reward and log-prob metrics), and trains WPO (``use_weighting=True``) as stock does.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")

from trl import DPOTrainer  # noqa: E402

from fastpref.trainers import FastPrefDPOTrainer  # noqa: E402
from test_integration_trl import (  # noqa: E402,F401
    _assert_same_training,
    _both,
    _config,
    _dataset,
    _model,
    assert_same_logs,
    tokenizer,
)

TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def _logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("extra", [
    {"loss_type": ["sigmoid"]},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5},  # completion over 2 segments
    {"loss_type": ["ipo"], "use_weighting": True},
    {"loss_type": ["sigmoid", "bco_pair"], "use_weighting": True},
], ids=["sigmoid", "ld_alpha", "wpo-ipo", "wpo-multi"])
def test_logs_everything_stock_logs(extra, tokenizer, tmp_path):
    fast, stock = _both(tokenizer, tmp_path, beta=0.5, **extra)
    _assert_same_training(fast, stock)
    assert_same_logs(_logs(fast[0]), _logs(stock[0]), rel_tol=1e-4, abs_tol=1e-5)
    for key in TOKEN_METRICS:
        assert key in _logs(fast[0])[0]


def test_token_metrics_are_not_trivial(tokenizer, tmp_path):
    """The metrics compared above carry information: entropy near log V for a fresh model, logits differ between
    chosen and rejected, token accuracy strictly between 0 and 1 once the model has been trained on the data."""
    fast, _ = _both(tokenizer, tmp_path, beta=0.5, loss_type=["sft"], learning_rate=1.0, max_steps=6)
    first, last = _logs(fast[0])[0], _logs(fast[0])[-1]
    assert 0.5 * math.log(128) < first["entropy"] <= math.log(128)
    assert first["logits/chosen"] != first["logits/rejected"]
    assert last["entropy"] < first["entropy"]
    assert 0.0 < last["mean_token_accuracy"] <= 1.0


def test_evaluation_logs_the_same_metrics(tokenizer, tmp_path):
    results = []
    for cls in (DPOTrainer, FastPrefDPOTrainer):
        model = _model()
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path / cls.__name__),
                      train_dataset=_dataset(), eval_dataset=_dataset(6, seed=1), processing_class=tokenizer)
        results.append(trainer.evaluate())
    stock, fast = results
    for key in TOKEN_METRICS:
        key = f"eval_{key}"
        assert math.isclose(fast[key], stock[key], rel_tol=1e-4, abs_tol=1e-5), (key, fast[key], stock[key])


@pytest.mark.parametrize("method", ["pro", "simpo"])
def test_fastpref_methods_log_the_token_metrics(method, tokenizer, tmp_path):
    model = _model()
    trainer = FastPrefDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path),
                                 train_dataset=_dataset(), processing_class=tokenizer, method=method)
    trainer.train()
    assert all(key in _logs(trainer)[0] for key in TOKEN_METRICS)


def test_use_weighting_is_a_dpo_setting(tokenizer, tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="use_weighting"):
        FastPrefDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path, use_weighting=True),
                           train_dataset=_dataset(), processing_class=tokenizer, method="pro")
