"""TYPO (preference pairs + reference-model samples) with ``fastpref.trainers.TYPOTrainer``.

    python examples/typo.py

Data: pair rows (``prompt``, ``chosen``, ``rejected``) and reference-sample rows (``prompt``, ``completion``,
``unsup=True``) in one dataset. The reference samples come from the reference (SFT) model through
``fastpref.sampling.sample_reference_responses``: one per prompt, the seed's settings (temperature 1, top_k 60,
top_p 0.8, repetition penalty 1.1; at most 256 new tokens, here 8 to keep the example quick). The collator
(``TYPOCollator``) puts the chosen rows, then the rejected rows, then the unsup rows in each batch. TYPO is
reference-free in training: the reference model only samples.
"""

import tempfile

from _tiny import tiny_model, tiny_tokenizer, training_args

from fastpref.trainers.collators import tokenize_dataset
from fastpref.sampling import sample_reference_responses
from fastpref.trainers import TYPOTrainer

PAIRS = [
    {"prompt": "what color is the sky ?", "chosen": "blue .", "rejected": "green ."},
    {"prompt": "name a fruit .", "chosen": "apple .", "rejected": "rock ."},
    {"prompt": "say hello .", "chosen": "hello !", "rejected": "bye ."},
    {"prompt": "count to two .", "chosen": "one two .", "rejected": "two ."},
]


def main() -> float:
    tokenizer = tiny_tokenizer()
    pairs = tokenize_dataset(PAIRS, tokenizer)
    reference = tiny_model(tokenizer)  # the SFT model: here the policy's initial weights
    unsup = sample_reference_responses(reference, pairs, seed=0, max_new_tokens=8)  # one response per prompt
    data = [row for pair in zip(pairs, unsup) for row in pair]  # interleaved: every batch holds both kinds
    with tempfile.TemporaryDirectory() as out:
        trainer = TYPOTrainer(tiny_model(tokenizer), training_args(out), train_dataset=data,
                              processing_class=tokenizer, lam=0.05)
        result = trainer.train()
    print(f"[TYPO] mean training loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
