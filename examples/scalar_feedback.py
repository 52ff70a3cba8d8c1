"""Scalar feedback (K scored completions per prompt): PRO-S and DRO with ``fastpref.trainers.ScalarFeedbackTrainer``.

    python examples/scalar_feedback.py                 # both methods
    python examples/scalar_feedback.py --method dro

Data: one row **per prompt** holding its K completions and their K rewards. The collator
(``ScalarFeedbackCollator``) flattens each row into K sequences sharing a ``group_id``, so a batch always holds whole
groups; ``per_device_train_batch_size`` counts prompts. (Data stored one completion per row: regroup it with
``fastpref.trainers.collators.group_rows`` after tokenizing.) DRO also uses the prompt's log-prob, which the same
fused pass returns (the collator marks prompt tokens with segment 1).
"""

import argparse
import tempfile

from _tiny import tiny_model, tiny_tokenizer, training_args

from fastpref.trainers.collators import tokenize_dataset
from fastpref.trainers import ScalarFeedbackTrainer

ROWS = [
    {"prompt": "what color is the sky ?", "completion": ["blue .", "white .", "green ."], "reward": [1.0, 0.4, -1.0]},
    {"prompt": "what color is the sun ?", "completion": ["yellow .", "i do not know ."], "reward": [0.9, 0.0]},
    {"prompt": "name a animal .", "completion": ["cat .", "dog .", "car .", "apple ."],
     "reward": [1.0, 1.0, -0.5, -1.0]},
    {"prompt": "count to two .", "completion": ["one two .", "one .", "two one ."], "reward": [1.0, 0.2, -0.3]},
]


def main(methods=("pro", "dro")) -> dict:
    tokenizer = tiny_tokenizer()
    data = tokenize_dataset(ROWS, tokenizer)
    losses = {}
    for method in methods:
        with tempfile.TemporaryDirectory() as out:
            trainer = ScalarFeedbackTrainer(
                tiny_model(tokenizer), training_args(out, per_device_train_batch_size=2), method=method,
                train_dataset=data, processing_class=tokenizer,
                beta=0.1,
                tau=1.0,             # PRO-S: reward-score temperature; eta = 1/(K+1) per prompt, alpha from lam = 2
                log_z0=50.0,         # DRO: offset of log Z (the seed's setting, with beta = 0.1)
            )
            result = trainer.train()
            losses[method] = result.training_loss
            print(f"[{trainer.method_name}] mean training loss {result.training_loss:.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["pro", "dro"], help="one method (default: both)")
    method = parser.parse_args().method
    main((method,) if method else ("pro", "dro"))
