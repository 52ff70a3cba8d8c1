"""Generate the demo's preference dataset (``fastpref/data/demo_prefs.jsonl``) with a known ground-truth reward.

``python -m fastpref.demo.make_dataset`` rewrites the shipped file byte-identically (``--check`` only compares,
``--out PATH`` writes elsewhere). Generation uses Python's ``random.Random`` (its ``random()`` / ``_randbelow``
streams are fixed across Python versions), never numpy or torch, so the bytes do not depend on library versions.

The toy language
----------------
Vocabulary of 64 ids: ``0`` pad, ``1`` BOS, ``2`` SEP (end of prompt), ``3`` EOS (end of response), and the 60
content tokens ``4..63``. A prompt is ``BOS, 3-6 content tokens, SEP``; a response is ``4-8 content tokens, EOS``.
Every response is drawn from the same **reference distribution**: length uniform in 4..8, tokens i.i.d. uniform
over the 60 content tokens (the model's SFT warm-up fits this distribution, so it is the reference policy).

Ground truth
------------
A fixed, seeded split of the content tokens into 10 *good* tokens, 10 *bad* tokens and 40 neutral ones. The true
reward of a response is::

    R(y) = #good tokens in y  -  #bad tokens in y          (an integer; EOS and the prompt do not count)

Each prompt has ``K = 4`` responses with distinct best and worst rewards (groups where all four tie are redrawn).
Derived feedback, all stored per record:

- pairwise: ``chosen`` = index of the first response with the highest reward, ``rejected`` = the first with the
  lowest (deterministic: the true-better response is always the chosen one, ``R_chosen > R_rejected``);
- scalar: ``rewards`` (the true ``R`` of each response; also the oracle rewards for DRDO / e-DPO);
- binary: ``labels`` = 1 where ``R > 0`` else 0 (KTO-style desirable / undesirable);
- reference samples: ``ref_sample``, one extra unlabeled response per prompt from the reference distribution
  (TYPO's unsupervised rows).

File layout (JSON lines, keys sorted, no spaces): line 1 is the metadata (``"meta"``: vocabulary, token roles,
seed, split sizes, reward definition); then one record per prompt, ``split`` ``"train"`` (384) then ``"test"``
(128, the held-out pairs).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ._layout import BOS, EOS, FILENAME, FIRST_CONTENT, K, PAD, SEP, VOCAB_SIZE, default_path

__all__ = ["SEED", "default_path", "generate", "main", "token_roles", "true_reward"]

SEED = 20250801
NUM_GOOD = NUM_BAD = 10
PROMPT_LEN = (3, 6)  # content tokens, inclusive
RESPONSE_LEN = (4, 8)  # content tokens, inclusive (plus EOS)
NUM_TRAIN, NUM_TEST = 384, 128
FORMAT_VERSION = 1


def token_roles(seed: int = SEED) -> tuple[list[int], list[int]]:
    """The seeded good / bad token sets (sorted ids)."""
    rng = random.Random(seed)
    content = list(range(FIRST_CONTENT, VOCAB_SIZE))
    rng.shuffle(content)
    return sorted(content[:NUM_GOOD]), sorted(content[NUM_GOOD:NUM_GOOD + NUM_BAD])


def true_reward(response: list[int], good: set[int], bad: set[int]) -> int:
    """``#good - #bad`` over a response's tokens (EOS counts as neither)."""
    return sum(1 for t in response if t in good) - sum(1 for t in response if t in bad)


def _sequence(rng: random.Random, lengths: tuple[int, int]) -> list[int]:
    n = rng.randint(*lengths)
    return [rng.randrange(FIRST_CONTENT, VOCAB_SIZE) for _ in range(n)]


def generate(seed: int = SEED) -> str:
    """The dataset file's full text (deterministic in ``seed``)."""
    good, bad = token_roles(seed)
    good_set, bad_set = set(good), set(bad)
    rng = random.Random(seed + 1)
    meta = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "vocab_size": VOCAB_SIZE,
        "special_tokens": {"pad": PAD, "bos": BOS, "sep": SEP, "eos": EOS},
        "content_tokens": [FIRST_CONTENT, VOCAB_SIZE - 1],
        "good_tokens": good,
        "bad_tokens": bad,
        "reward": "R(y) = #good tokens in y - #bad tokens in y",
        "responses_per_prompt": K,
        "prompt_content_len": list(PROMPT_LEN),
        "response_content_len": list(RESPONSE_LEN),
        "splits": {"train": NUM_TRAIN, "test": NUM_TEST},
        "binary_label": "1 if R > 0 else 0",
        "pairs": "chosen = argmax R, rejected = argmin R (first index on ties); R_chosen > R_rejected",
    }
    lines = [json.dumps({"meta": meta}, sort_keys=True, separators=(",", ":"))]
    index = 0
    for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        for _ in range(count):
            prompt = [BOS] + _sequence(rng, PROMPT_LEN) + [SEP]
            while True:
                bodies = [_sequence(rng, RESPONSE_LEN) for _ in range(K)]
                rewards = [true_reward(b, good_set, bad_set) for b in bodies]
                if max(rewards) > min(rewards):
                    break
            responses = [b + [EOS] for b in bodies]
            ref_sample = _sequence(rng, RESPONSE_LEN) + [EOS]
            record = {
                "id": index,
                "split": split,
                "prompt": prompt,
                "responses": responses,
                "rewards": rewards,
                "labels": [1 if r > 0 else 0 for r in rewards],
                "chosen": rewards.index(max(rewards)),
                "rejected": rewards.index(min(rewards)),
                "ref_sample": ref_sample,
            }
            lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
            index += 1
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpref.demo.make_dataset",
                                     description="Regenerate the fastpref demo's preference dataset.")
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default: the shipped {FILENAME})")
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    path = args.out or default_path()
    data = generate().encode("utf-8")
    if args.check:
        same = path.exists() and path.read_bytes() == data
        print(f"{path}: {'identical' if same else 'DIFFERS from the generator'}")
        return 0 if same else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
