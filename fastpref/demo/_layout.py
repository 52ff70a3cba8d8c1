"""Constants of the demo dataset shared by its generator (:mod:`.make_dataset`) and its loader (:mod:`.data`).

Kept apart so that ``python -m fastpref.demo.make_dataset`` does not import its own module through the package.
"""

from pathlib import Path

VOCAB_SIZE = 64
PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_CONTENT = 4
K = 4  # responses per prompt
FILENAME = "demo_prefs.jsonl"


def default_path() -> Path:
    """Where the shipped dataset lives in the source tree (``fastpref/data/demo_prefs.jsonl``)."""
    return Path(__file__).resolve().parent.parent / "data" / FILENAME
