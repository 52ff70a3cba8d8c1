"""AuxDPO (DPO with per-example offsets delta and the null-space penalty) with ``fastpref.trainers.AuxDPOTrainer``.

    python examples/auxdpo.py

Data: preference pairs; the trainer adds ``example_index`` (each pair's row number, its index into ``delta``).
``delta = cap * tanh(delta_raw)`` is trained in its own optimizer group at learning rate 5e-3 without weight decay
(the authors' setting), the policy at ``TrainingArguments.learning_rate``. ``null_penalty="head"`` constrains
``delta`` with the reference LM head's gradients (one extra fused pass); ``"params"`` uses every parameter the
policy trains (the authors' form, double backward: small models only).
"""

import tempfile

from _tiny import tiny_model, tiny_tokenizer, training_args

from fastpref.trainers.collators import tokenize_dataset
from fastpref.trainers import AuxDPOTrainer

PAIRS = [
    {"prompt": "what color is the sky ?", "chosen": "blue .", "rejected": "green ."},
    {"prompt": "name a fruit .", "chosen": "apple .", "rejected": "rock ."},
    {"prompt": "say hello .", "chosen": "hello !", "rejected": "bye ."},
    {"prompt": "count to two .", "chosen": "one two .", "rejected": "two ."},
]


def main() -> float:
    tokenizer = tiny_tokenizer()
    data = tokenize_dataset(PAIRS, tokenizer)
    with tempfile.TemporaryDirectory() as out:
        trainer = AuxDPOTrainer(tiny_model(tokenizer), training_args(out, learning_rate=1e-3), train_dataset=data,
                                processing_class=tokenizer, beta=0.1,
                                lambda_null=1.0, lambda_amp=0.01,   # null-space penalty, anti-collapse term
                                delta_learning_rate=5e-3, null_penalty="head")
        result = trainer.train()
    print(f"[{trainer.method_name}] mean training loss {result.training_loss:.4f}; "
          f"|delta| max {float(trainer.delta.detach().abs().max()):.2e}")
    return result.training_loss


if __name__ == "__main__":
    main()
