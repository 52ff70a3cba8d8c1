"""Binary feedback (thumbs up / down per completion): PRO-B and KTO with ``fastpref.trainers.BinaryFeedbackTrainer``.

    python examples/binary_feedback.py                 # both methods
    python examples/binary_feedback.py --method kto

Data: one row per completion with a boolean ``label`` (True = desirable). ``tokenize_dataset`` turns the text
columns into ``prompt_input_ids`` / ``completion_input_ids``; the trainer's default collator
(``BinaryFeedbackCollator``) pads them and, for KTO, builds the mismatched prompt/completion rows of TRL's KL
estimate. The reference model is a frozen copy of the initial policy (pass ``ref_model=`` to use another).
"""

import argparse
import tempfile

from _tiny import tiny_model, tiny_tokenizer, training_args

from fastpref.trainers.collators import tokenize_dataset
from fastpref.trainers import BinaryFeedbackTrainer

ROWS = [
    {"prompt": "what color is the sky ?", "completion": "blue .", "label": True},
    {"prompt": "what color is the sky ?", "completion": "green .", "label": False},
    {"prompt": "what color is the grass ?", "completion": "green .", "label": True},
    {"prompt": "what color is the snow ?", "completion": "black .", "label": False},
    {"prompt": "name a fruit .", "completion": "banana .", "label": True},
    {"prompt": "name a fruit .", "completion": "rock .", "label": False},
    {"prompt": "count to three .", "completion": "one two three .", "label": True},
    {"prompt": "say hello .", "completion": "bye .", "label": False},
]


def main(methods=("pro", "kto")) -> dict:
    tokenizer = tiny_tokenizer()
    data = tokenize_dataset(ROWS, tokenizer)
    losses = {}
    for method in methods:
        with tempfile.TemporaryDirectory() as out:
            trainer = BinaryFeedbackTrainer(
                tiny_model(tokenizer), training_args(out), method=method, train_dataset=data,
                processing_class=tokenizer,
                beta=0.1,            # both: implicit reward r = beta (logp - ref_logp)
                lam=2.0,             # PRO-B: regularizer weight, must be > 1
                desirable_weight=1.0, undesirable_weight=1.0,
            )
            result = trainer.train()
            losses[method] = result.training_loss
            print(f"[{trainer.method_name}] mean training loss {result.training_loss:.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["pro", "kto"], help="one method (default: both)")
    method = parser.parse_args().method
    main((method,) if method else ("pro", "kto"))
