"""FastPrefDPOTrainer's refusal list is down to what cannot be computed: options of other TRL releases that can be
(``rpo_alpha``, ``reference_free``) are computed; what cannot (``use_liger_loss``: another library's loss in place
of this one; vision datasets, not verified) is refused at construction with its reason."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastpref.trainers import FastPrefDPOTrainer  # noqa: E402
from test_integration_trl import (  # noqa: E402,F401
    CHECKPOINTING,
    _config,
    _dataset,
    _model,
    _train,
    tokenizer,
)


@dataclasses.dataclass
class OlderDPOConfig(DPOConfig):
    """A DPOConfig with the fields other TRL releases have (RPO's weight, reference-free DPO, Liger's loss)."""

    rpo_alpha: float | None = None
    reference_free: bool = False
    use_liger_loss: bool = False


def _older_config(tmp_path, **kwargs):
    """``test_integration_trl._config``'s settings in an :class:`OlderDPOConfig`."""
    reference = _config(tmp_path)
    names = ("output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "max_steps", "report_to",
             "save_strategy", "logging_steps", "learning_rate", "optim", "lr_scheduler_type", "use_cpu", "seed",
             "disable_tqdm", "dataloader_num_workers", "bf16", CHECKPOINTING)
    base = {name: getattr(reference, name) for name in names}
    base.update(kwargs)
    return OlderDPOConfig(**base)


def test_rpo_alpha_is_dpo_plus_the_chosen_nll(tokenizer, tmp_path):
    """RPO (rpo_alpha) = TRL 1.16's loss_type=['sigmoid', 'sft'] with loss_weights=[1, rpo_alpha]."""
    stock = _train(DPOTrainer, tokenizer, tmp_path / "stock", beta=0.5, loss_type=["sigmoid", "sft"],
                   loss_weights=[1.0, 0.4])
    model = _model()
    fast = FastPrefDPOTrainer(model=model, ref_model=copy.deepcopy(model),
                              args=_older_config(tmp_path / "fast", beta=0.5, rpo_alpha=0.4), train_dataset=_dataset(),
                              processing_class=tokenizer)
    fast.train()
    fast_losses = [e["loss"] for e in fast.state.log_history if "loss" in e]
    assert all(math.isclose(f, s, rel_tol=2e-5) for f, s in zip(fast_losses, stock[1])), (fast_losses, stock[1])
    assert "nll_loss" in fast.state.log_history[0]


def test_reference_free_uses_zero_reference_logps(tokenizer, tmp_path):
    model = _model()
    trainer = FastPrefDPOTrainer(model=model, args=_older_config(tmp_path, beta=0.5, reference_free=True),
                                 train_dataset=_dataset(), processing_class=tokenizer)
    assert trainer.ref_model is None and not trainer.uses_reference
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():  # the sequences' log-probs from the model's own logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        token = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        logps = (token * batch["completion_mask"][:, 1:]).sum(-1)
        chosen, rejected = logps.chunk(2)
        expected = -F.logsigmoid(0.5 * (chosen - rejected)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields, match", [
    ({"use_liger_loss": True}, "Liger's fused loss"),
    ({"rpo_alpha": -1.0}, "rpo_alpha"),
    ({"reference_free": True, "precompute_ref_log_probs": True}, "reference-free"),
])
def test_what_cannot_be_computed_is_refused(fields, match, tokenizer, tmp_path):
    model = _model()
    with pytest.raises((ValueError, NotImplementedError), match=match):
        FastPrefDPOTrainer(model=model, args=_older_config(tmp_path, **fields), train_dataset=_dataset(),
                           processing_class=tokenizer)
