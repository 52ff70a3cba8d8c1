"""Load the shipped demo dataset and lay it out as padded tensors (see :mod:`fastpref.demo.make_dataset`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch

from ._layout import FILENAME, K, PAD, default_path

__all__ = ["DemoData", "Split", "dataset_path", "load_records", "load_data"]

PROMPT_SEGMENT, RESPONSE_SEGMENT = 1, 2
REF_SAMPLE = K  # column of the reference sample in Split.ids


def dataset_path() -> Path:
    """The shipped dataset file (``fastpref/data/demo_prefs.jsonl``)."""
    try:
        from importlib.resources import files

        path = Path(str(files("fastpref").joinpath("data").joinpath(FILENAME)))
        if path.exists():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    return default_path()


def load_records(path: Optional[Union[str, Path]] = None) -> tuple[dict, list[dict]]:
    """``(meta, records)`` from the JSON-lines file (default: the shipped one)."""
    path = Path(path) if path is not None else dataset_path()
    lines = path.read_text(encoding="utf-8").splitlines()
    meta = json.loads(lines[0])["meta"]
    records = [json.loads(line) for line in lines[1:] if line]
    return meta, records


@dataclasses.dataclass
class Split:
    """One split as tensors. Sequence ``[i, k]`` is prompt ``i`` followed by response ``k`` (``k < K``) or, for
    ``k == K``, by the prompt's reference sample. Right-padded with PAD to a common length ``T``.

    ids, segments, attention: ``[P, K+1, T]`` (segments: 0 pad, 1 prompt, 2 response).
    rewards ``[P, K]`` (float, the true R), labels ``[P, K]`` (binary), chosen / rejected ``[P]`` (column
    indices), index ``[P]`` (position of the prompt in this split, for per-example parameters).
    """

    ids: torch.Tensor
    segments: torch.Tensor
    attention: torch.Tensor
    rewards: torch.Tensor
    labels: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> "Split":
        return Split(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def sequences(self, prompts: torch.Tensor, columns: torch.Tensor):
        """``(ids, attention, segments)`` of the sequences ``[prompts[j], columns[j]]``, trimmed to their length."""
        ids = self.ids[prompts, columns]
        att = self.attention[prompts, columns]
        seg = self.segments[prompts, columns]
        T = int(att.sum(1).max())
        return ids[:, :T], att[:, :T], seg[:, :T]


@dataclasses.dataclass
class DemoData:
    meta: dict
    train: Split
    test: Split

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def to(self, device) -> "DemoData":
        return DemoData(self.meta, self.train.to(device), self.test.to(device))


def _split(records: list[dict]) -> Split:
    seqs = [[r["prompt"] + resp for resp in r["responses"] + [r["ref_sample"]]] for r in records]
    T = max(len(s) for group in seqs for s in group)
    P = len(records)
    ids = torch.full((P, K + 1, T), PAD, dtype=torch.long)
    seg = torch.zeros((P, K + 1, T), dtype=torch.long)
    for i, (r, group) in enumerate(zip(records, seqs)):
        n_prompt = len(r["prompt"])
        for k, s in enumerate(group):
            ids[i, k, : len(s)] = torch.tensor(s)
            seg[i, k, :n_prompt] = PROMPT_SEGMENT
            seg[i, k, n_prompt: len(s)] = RESPONSE_SEGMENT
    return Split(
        ids=ids,
        segments=seg,
        attention=(seg > 0).long(),
        rewards=torch.tensor([r["rewards"] for r in records], dtype=torch.float32),
        labels=torch.tensor([r["labels"] for r in records], dtype=torch.long),
        chosen=torch.tensor([r["chosen"] for r in records], dtype=torch.long),
        rejected=torch.tensor([r["rejected"] for r in records], dtype=torch.long),
    )


def load_data(path: Optional[Union[str, Path]] = None) -> DemoData:
    """The dataset as :class:`DemoData` (train / test splits as padded tensors, on the CPU)."""
    meta, records = load_records(path)
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    if not train or not test:
        raise ValueError(f"the demo dataset needs 'train' and 'test' records; got {len(train)} and {len(test)}")
    return DemoData(meta, _split(train), _split(test))
