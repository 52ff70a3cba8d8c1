"""FastPrefKTOTrainer against TRL 1.16's own KTOTrainer on the same tiny model and data: two SGD steps with the same
losses, gradients, parameters and logged metrics (``kl``, ``entropy``, ``logits/*``, ``rewards/*``, ``logps/*``,
``num_tokens``), and the same in evaluation."""

from __future__ import annotations

import copy
import math
import uuid

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import KTOConfig, KTOTrainer  # noqa: E402

from fastpref.integrations._hf_utils import find_causal_lm  # noqa: E402
from fastpref.integrations.transformers import is_patched  # noqa: E402
from fastpref.trainers import FastPrefKTOTrainer  # noqa: E402
from test_integration_trl import (  # noqa: E402,F401
    CHECKPOINTING,
    GradRecorder,
    _model,
    _rows,
    _Snapshots,
    assert_overflowing_second_step_is_skipped,
    assert_same_logged_training,
    tokenizer,
)


def _unpaired(n=6, seed=0):
    rows = []
    for i, row in enumerate(_rows(n, seed)):  # desirable and undesirable, interleaved unevenly
        rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        if i % 3 != 2:
            rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    tag = uuid.uuid4().hex  # a fingerprint of its own: no shared cache between runs
    return datasets.Dataset.from_list([{**r, "tag": tag} for r in rows])


def _config(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=2, report_to=[], save_strategy="no", logging_steps=1, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                bf16=False)
    base[CHECKPOINTING] = False
    base.update(kwargs)
    return KTOConfig(**base)


def _run(cls, tokenizer, tmp_path, *, ref=True, peft=False, trainer_kwargs=None, **config):
    model = _model(0)
    kwargs = dict(trainer_kwargs or {})
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    recorder = GradRecorder()
    trainer = cls(model=model, ref_model=copy.deepcopy(model) if ref and not peft else None,
                  args=_config(tmp_path, **config), train_dataset=_unpaired(), processing_class=tokenizer,
                  callbacks=[recorder], **kwargs)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, logs, recorder.steps, params


@pytest.mark.parametrize("config", [
    {"loss_type": "kto"},
    {"loss_type": "kto", "desirable_weight": 1.3, "undesirable_weight": 0.7, "beta": 0.5},
    {"loss_type": "apo_zero_unpaired"},
    {"loss_type": "kto", "precompute_ref_log_probs": True, "ref": False},
    {"loss_type": "kto", "peft": True},
], ids=["kto", "weights", "apo_zero_unpaired", "precompute", "lora"])
def test_kto_trainer_matches_stock(config, tokenizer, tmp_path):
    if config.get("peft"):
        pytest.importorskip("peft")
    stock = _run(KTOTrainer, tokenizer, tmp_path / "stock", **config)
    fast = _run(FastPrefKTOTrainer, tokenizer, tmp_path / "fast", **config)
    assert_same_logged_training(fast, stock)
    assert is_patched(find_causal_lm(fast[0].model))
    assert {"kl", "entropy", "logits/chosen", "rewards/margins"} <= set(fast[1][0])


def test_kto_padding_free_matches_stock_padded(tokenizer, tmp_path):
    stock = _run(KTOTrainer, tokenizer, tmp_path / "stock")
    fast = _run(FastPrefKTOTrainer, tokenizer, tmp_path / "fast", trainer_kwargs={"padding_free": True})
    assert_same_logged_training(fast, stock)
    batch = next(iter(fast[0].get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["KL_input_ids"].shape[0] == 1


def test_kto_evaluation_matches_stock(tokenizer, tmp_path):
    results = []
    for cls in (KTOTrainer, FastPrefKTOTrainer):
        model = _model(0)
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path / cls.__name__),
                      train_dataset=_unpaired(), eval_dataset=_unpaired(4, seed=1), processing_class=tokenizer)
        results.append(trainer.evaluate())
    stock, fast = results
    for key, value in stock.items():
        if not key.endswith(("_time", "_runtime", "_per_second")) and key != "epoch":
            assert math.isclose(fast[key], value, rel_tol=2e-5, abs_tol=2e-6), (key, fast[key], value)


def test_kto_without_ref_model_copies_the_policy(tokenizer, tmp_path):
    """TRL 1.16 would reload the policy by name (impossible for a model built from a config)."""
    model = _model(0)
    trainer = FastPrefKTOTrainer(model=model, args=_config(tmp_path), train_dataset=_unpaired(),
                                 processing_class=tokenizer)
    assert trainer.ref_model is not None and trainer.ref_model is not model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    with pytest.raises(ValueError, match="fastpref_backend"):
        FastPrefKTOTrainer(model=model, args=_config(tmp_path), train_dataset=_unpaired(),
                           processing_class=tokenizer, fastpref_backend="cuda")


def test_pure_fp16_overflowing_forward_skips_the_step(tokenizer, tmp_path, caplog):
    """Where stock KTOTrainer applies the NaN update, the overflowing step is skipped and counted."""
    snapshots = _Snapshots()
    model = _model(0).half()
    trainer = FastPrefKTOTrainer(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path, max_steps=3),
                                 train_dataset=_unpaired(), processing_class=tokenizer, callbacks=[snapshots])
    assert_overflowing_second_step_is_skipped(trainer, snapshots, caplog)
