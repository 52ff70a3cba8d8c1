"""FastPrefDPOTrainer with ``padding_free=True`` (TRL 1.16's own DPOTrainer turns it off with a warning): packed
rows with restarting ``position_ids``, the same losses, gradients and SGD-trained parameters as stock's padded
batches (and as fastpref's padded batches for the methods stock lacks)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from trl import DPOTrainer  # noqa: E402

from fastpref.trainers import FastPrefDPOTrainer  # noqa: E402
from test_integration_trl import _assert_same_training, _dataset, _train, tokenizer  # noqa: E402,F401


@pytest.mark.parametrize("extra", [
    {"loss_type": ["sigmoid"]},
    {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.3]},  # completion counts per packed sequence
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},  # LD-DPO's segments per packed pair
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["sigmoid"], "precompute_ref_log_probs": True, "ref": False},
    {"loss_type": ["sigmoid"], "peft": True},
], ids=["sigmoid", "ipo-sft", "ld_alpha", "wpo", "precompute", "lora"])
def test_padding_free_matches_stock_padded(extra, tokenizer, tmp_path):
    if extra.get("peft"):
        pytest.importorskip("peft")
    stock = _train(DPOTrainer, tokenizer, tmp_path / "stock", beta=0.5, **extra)
    fast = _train(FastPrefDPOTrainer, tokenizer, tmp_path / "fast", beta=0.5, padding_free=True, **extra)
    _assert_same_training(fast, stock)
    batch = next(iter(fast[0].get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["position_ids"].shape == batch["input_ids"].shape
    assert fast[0].args.padding_free


@pytest.mark.parametrize("method, method_kwargs", [("drdo", {}), ("auxdpo", {"null_penalty": "head"}),
                                                   ("auxdpo", {"null_penalty": "params"}), ("pro", {}),
                                                   ("simpo", {})])
def test_methods_padding_free_equal_padded(method, method_kwargs, tokenizer, tmp_path):
    columns = {"oracle_chosen": [1.0 + 0.1 * i for i in range(8)], "oracle_rejected": [0.2 * i for i in range(8)]}
    runs = []
    for padding_free in (False, True):
        torch.manual_seed(0)  # AuxDPO's offsets are drawn at construction
        runs.append(_train(FastPrefDPOTrainer, tokenizer, tmp_path / str(padding_free), beta=0.5,
                           padding_free=padding_free, dataset=_dataset(**(columns if method == "drdo" else {})),
                           trainer_kwargs={"method": method, "method_kwargs": dict(method_kwargs)}))
    _assert_same_training(runs[1], runs[0])
