"""Pairs with explicit rewards: DRDO (oracle rewards, trainable reward head) and e-DPO (reward distillation) with
``fastpref.trainers.OracleRewardTrainer``.

    python examples/oracle_rewards.py                  # both methods
    python examples/oracle_rewards.py --method drdo

Data: preference pairs with the rewards an oracle / reward model gave each response: ``oracle_chosen`` and
``oracle_rejected`` for DRDO, ``reward_chosen`` and ``reward_rejected`` for e-DPO (the collator,
``PairwiseRewardCollator``, keeps them; TRL's DPO collator would drop them). DRDO first trains the oracle (``DRDOOracleTrainer``: a reward head on the hidden state of the
last response token plus a language-model term, ``a = 0.01``) and lets it annotate the pairs with ``oracle_chosen`` /
``oracle_rejected``; then the student run (``OracleRewardTrainer(method="drdo")``) trains the policy and a student
reward head (``trainer.reward_head``) together and saves the head as ``reward_head.pt`` next to the model. e-DPO
reads the rewards given here.
"""

import argparse
import os
import tempfile

from _tiny import tiny_model, tiny_tokenizer, training_args

from fastpref.trainers.collators import tokenize_dataset
from fastpref.trainers import DRDOOracleTrainer, OracleRewardTrainer
from fastpref.trainers.feedback import REWARD_HEAD_NAME

PAIRS = [
    ("what color is the sky ?", "blue .", "green .", 2.0, -1.0),
    ("what color is the grass ?", "green .", "red .", 1.5, -0.5),
    ("name a fruit .", "apple .", "car .", 1.8, -1.2),
    ("name a animal .", "dog .", "rock .", 1.2, -0.8),
    ("count to three .", "one two three .", "one three .", 1.0, 0.2),
    ("say hello .", "hello !", "bye .", 0.9, 0.1),
    ("what color is the snow ?", "white .", "black .", 1.7, -1.5),
    ("what color is the sun ?", "yellow .", "blue .", 1.1, -0.2),
]


def main(methods=("drdo", "edpo")) -> dict:
    tokenizer = tiny_tokenizer()
    losses = {}
    for method in methods:
        if method == "drdo":  # stage 1: the oracle, trained on the pairs, annotates R*
            pairs = tokenize_dataset([{"prompt": p, "chosen": c, "rejected": r} for p, c, r, _, _ in PAIRS], tokenizer)
            with tempfile.TemporaryDirectory() as out:
                oracle = DRDOOracleTrainer(tiny_model(tokenizer, seed=1), training_args(out), train_dataset=pairs,
                                           processing_class=tokenizer, a=0.01)
                print(f"[{oracle.method_name}] mean training loss {oracle.train().training_loss:.4f}")
                data = oracle.annotate(pairs)  # adds oracle_chosen / oracle_rejected
        else:
            rows = [{"prompt": p, "chosen": c, "rejected": r, "reward_chosen": rc, "reward_rejected": rr}
                    for p, c, r, rc, rr in PAIRS]
            data = tokenize_dataset(rows, tokenizer)
        with tempfile.TemporaryDirectory() as out:
            trainer = OracleRewardTrainer(
                tiny_model(tokenizer), training_args(out), method=method, train_dataset=data,
                processing_class=tokenizer,
                alpha=0.1, gamma=2.0,   # DRDO: focal-term weight and exponent
                beta=0.1,               # e-DPO: implicit-reward scale
            )
            result = trainer.train()
            trainer.save_model(out)
            if method == "drdo":
                assert os.path.isfile(os.path.join(out, REWARD_HEAD_NAME))
                trainer.load_reward_head(out)  # e.g. in a later session
        losses[method] = result.training_loss
        print(f"[{trainer.method_name}] mean training loss {result.training_loss:.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["drdo", "edpo"], help="one method (default: both)")
    method = parser.parse_args().method
    main((method,) if method else ("drdo", "edpo"))
