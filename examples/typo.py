"""TYPO (preference pairs + reference-model samples) with ``fastpref.trainer.TYPOTrainer``.

    python examples/typo.py

Data: pair rows (``prompt``, ``chosen``, ``rejected``) and reference-sample rows (``prompt``, ``completion``,
``unsup=True``: responses sampled from the reference model, here written by hand) in one dataset. The collator
(``TYPOCollator``) puts the chosen rows, then the rejected rows, then the unsup rows in each batch. TYPO is
reference-free: no reference model is loaded.
"""

import tempfile

from _tiny import tiny_model, tiny_tokenizer, training_args

from fastpref.collators import tokenize_dataset
from fastpref.trainer import TYPOTrainer

ROWS = [
    {"prompt": "what color is the sky ?", "chosen": "blue .", "rejected": "green ."},
    {"prompt": "name a fruit .", "chosen": "apple .", "rejected": "rock ."},
    {"prompt": "say hello .", "chosen": "hello !", "rejected": "bye ."},
    {"prompt": "what color is the sky ?", "completion": "maybe blue .", "unsup": True},
    {"prompt": "name a fruit .", "completion": "banana .", "unsup": True},
    {"prompt": "count to two .", "chosen": "one two .", "rejected": "two .", "unsup": False},
    {"prompt": "say hello .", "completion": "hi .", "unsup": True},
    {"prompt": "what color is the snow ?", "completion": "white .", "unsup": True},
]


def main() -> float:
    tokenizer = tiny_tokenizer()
    data = tokenize_dataset(ROWS, tokenizer)
    with tempfile.TemporaryDirectory() as out:
        trainer = TYPOTrainer(tiny_model(tokenizer), training_args(out), train_dataset=data,
                              processing_class=tokenizer, lam=0.05)
        result = trainer.train()
    print(f"[TYPO] mean training loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
