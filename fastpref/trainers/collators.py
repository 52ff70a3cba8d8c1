"""Collators for the feedback layouts TRL's DPO collator drops (binary, scalar, reference samples, oracle rewards).

Every collator takes **pre-tokenized** examples (lists of ints; :func:`tokenize_dataset` turns text columns into
them), concatenates each prompt with its completion, pads, and returns::

    input_ids       [N, T]  long   prompt + completion (+ padding)
    attention_mask  [N, T]  long   1 on real tokens
    segment_ids     [N, T]  long   1 = prompt token, 2 = completion token, 0 = padding (aligned with input_ids:
                                   the segment of token t), what a patched model takes with ``logps_only=True``

plus the layout's own columns as tensors. No tokenizer is called. Layouts (one example = one dict):

=======================  ==================================================  ===========================================
collator                 example fields                                      batch extras (rows ``N``)
=======================  ==================================================  ===========================================
BinaryFeedbackCollator   ``prompt_input_ids``, ``completion_input_ids``,     ``label`` bool ``[N]`` (N = examples);
                         ``label`` (bool or 0/1)                             with ``kl=True`` also ``KL_input_ids``,
                                                                             ``KL_attention_mask``, ``KL_segment_ids``
ScalarFeedbackCollator   ``prompt_input_ids``, ``completion_input_ids``      ``reward`` float ``[N]``, ``group_id`` long
                         (a list of K completions), ``reward`` (K floats)    ``[N]`` (N = sum of K; a group's rows are
                                                                             contiguous)
TYPOCollator             pair rows: ``prompt_input_ids``,                    ``unsup`` bool ``[N]``; rows: the chosen
                         ``chosen_input_ids``, ``rejected_input_ids``;       completions, then the rejected ones (TRL
                         reference-sample rows: ``prompt_input_ids``,        layout), then the unsup rows
                         ``completion_input_ids``, ``unsup=True``
PreferenceCollator       ``prompt_input_ids``, ``chosen_input_ids``,         rows: B chosen, then B rejected (N = 2B);
                         ``rejected_input_ids`` (+ ``index_column``, e.g.    ``example_index`` long ``[B]`` when asked
                         AuxDPO's ``example_index``)                          (AuxDPO, DRDO's oracle stage)
PairwiseRewardCollator   ``prompt_input_ids``, ``chosen_input_ids``,         the two reward columns, float ``[B]``;
                         ``rejected_input_ids``, two reward columns          rows: B chosen, then B rejected (N = 2B)
                         (``oracle_chosen``/``oracle_rejected`` for DRDO,
                         ``reward_chosen``/``reward_rejected`` for e-DPO)
=======================  ==================================================  ===========================================

**Groups (scalar feedback).** One example holds one prompt and all K of its completions, and the collator
flattens it into K contiguous rows with one ``group_id``. A batch of examples is therefore a batch of whole
groups by construction: no sampler can split a group (``per_device_train_batch_size`` counts prompts, the
model sees ``sum K`` sequences). Datasets stored one completion per row must be regrouped first
(:func:`group_rows`).

**KTO's KL rows.** ``BinaryFeedbackCollator(kl=True)`` also builds TRL's mismatched pairs for KTO's KL estimate:
row ``i`` pairs prompt ``i`` with the completion of row ``i - 1`` (cyclically), as TRL's ``KTOTrainer`` does within a
batch. Because it is done at collate time, any sampler (shuffled or not) works.

**Padding-free batches.** :class:`PackingCollator` wraps any of these collators (or TRL's) and packs each batch
into one row: the rows' real tokens concatenated (``[1, N]``, no padding), ``position_ids`` restarting at 0 for
every sequence, ``attention_mask`` all ones; a patched model called with them scores each sequence separately
(transformers 5 builds the block-diagonal attention mask from the restarting positions, with SDPA and eager
attention as with flash-attention) and the fused head takes the packed rows through its varlen path.

Bad data raises ``ValueError`` naming the example and the column (missing columns, empty completions, labels
outside {0, 1}, groups smaller than ``min_group_size``, mismatched lengths, non-finite rewards).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

__all__ = [
    "BinaryFeedbackCollator",
    "PackingCollator",
    "PairwiseRewardCollator",
    "PreferenceCollator",
    "ScalarFeedbackCollator",
    "TYPOCollator",
    "group_rows",
    "pack_batch",
    "pad_sequences",
    "tokenize_dataset",
    "tokenize_example",
]

PROMPT, COMPLETION = 1, 2


# --------------------------------------------------------------------------------------------- padding


def pad_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    padding_side: str = "right",
    max_length: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Concatenate ``prompts[i] + completions[i]`` and pad them into ``input_ids``, ``attention_mask`` and
    ``segment_ids`` (1 = prompt, 2 = completion, 0 = padding), each ``[N, T]`` long.

    ``max_length`` truncates each sequence to its first ``max_length`` tokens (the prompt is kept, the completion
    is cut at its end); a completion cut to nothing raises ``ValueError``.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    rows, segs = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p, c = list(p), list(c)
        ids = p + c
        seg = [PROMPT] * len(p) + [COMPLETION] * len(c)
        if max_length is not None and len(ids) > max_length:
            ids, seg = ids[:max_length], seg[:max_length]
            if COMPLETION not in seg:
                raise ValueError(
                    f"sequence {i}: the prompt has {len(p)} tokens, so `max_length={max_length}` leaves no completion "
                    "token; raise `max_length` or shorten the prompt"
                )
        rows.append(ids)
        segs.append(seg)
    T = max(len(r) for r in rows)
    if pad_to_multiple_of:
        T = int(math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of)
    N = len(rows)
    input_ids = torch.full((N, T), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    segment_ids = torch.zeros((N, T), dtype=torch.long)
    for i, (ids, seg) in enumerate(zip(rows, segs)):
        n = len(ids)
        span = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, span] = 1
        segment_ids[i, span] = torch.tensor(seg, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "segment_ids": segment_ids}


# --------------------------------------------------------------------------------------------- checks


def _field(example: Mapping, name: str, index: int, who: str, expected: Sequence[str]) -> Any:
    if not isinstance(example, Mapping):
        raise TypeError(f"{who}: example {index} must be a dict, got {type(example).__name__}")
    if name not in example or example[name] is None:
        raise ValueError(
            f"{who}: example {index} has no column {name!r} (has {sorted(example)}; this layout needs "
            f"{', '.join(map(repr, expected))}). Tokenize text columns with "
            "fastpref.trainers.collators.tokenize_dataset, and keep `remove_unused_columns=False`."
        )
    return example[name]


def _token_ids(value: Any, name: str, index: int, who: str, *, allow_empty: bool = False) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "__iter__"):
        raise ValueError(f"{who}: example {index}, column {name!r} must be a list of token ids, got "
                         f"{type(value).__name__} (tokenize text with fastpref.trainers.collators.tokenize_dataset)")
    ids = []
    for t in value:
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point():
            t = t.item()
        try:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))
        except TypeError:
            raise ValueError(f"{who}: example {index}, column {name!r} must hold ints (token ids), "
                             f"found {t!r}") from None
    if not ids and not allow_empty:
        raise ValueError(f"{who}: example {index}, column {name!r} is empty; every completion needs a token")
    if any(t < 0 for t in ids):
        raise ValueError(f"{who}: example {index}, column {name!r} holds a negative token id")
    return ids


def _label(value: Any, index: int, who: str) -> bool:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{who}: example {index}, `label` must be one value, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{who}: example {index}, `label` must be a bool or 0/1 (1 = desirable), got {value!r}")


def _reward(value: Any, name: str, index: int, who: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{who}: example {index}, {name!r} must be one number, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{who}: example {index}, {name!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{who}: example {index}, {name!r} is not finite ({value})")
    return float(value)


@dataclasses.dataclass
class _Collator:
    """Shared padding options: ``pad_token_id`` (the id written into padding slots; masked out anyway),
    ``padding_side`` ('right' or 'left'), ``max_length`` (per-sequence truncation, prompt kept),
    ``pad_to_multiple_of``."""

    pad_token_id: int = 0
    padding_side: str = "right"
    max_length: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None

    required: tuple[str, ...] = dataclasses.field(default=(), init=False, repr=False)

    def _pad(self, prompts, completions) -> dict[str, torch.Tensor]:
        return pad_sequences(prompts, completions, pad_token_id=self.pad_token_id, padding_side=self.padding_side,
                             max_length=self.max_length, pad_to_multiple_of=self.pad_to_multiple_of)

    def _get(self, example, name, index):
        return _field(example, name, index, type(self).__name__, self.required)

    def _ids(self, example, name, index, *, allow_empty=False) -> list[int]:
        """The token ids in column ``name`` of ``example`` (a completion must not be empty)."""
        return _token_ids(self._get(example, name, index), name, index, type(self).__name__, allow_empty=allow_empty)

    def validate_example(self, example: Mapping, index: int = 0) -> None:
        """Raise ``ValueError`` if ``example`` does not fit this layout (the trainers check their first example)."""
        self([example])

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- layouts


@dataclasses.dataclass
class BinaryFeedbackCollator(_Collator):
    """Binary feedback (PRO-B, KTO): one completion per example with ``label`` (True/1 = desirable).

    Returns ``input_ids``, ``attention_mask``, ``segment_ids``, ``label`` (bool ``[N]``); with ``kl=True`` also
    ``KL_input_ids``, ``KL_attention_mask``, ``KL_segment_ids``: prompt ``i`` with the completion of example ``i - 1``
    (cyclically; TRL ``KTOTrainer``'s mismatched pairs for the KL reference point). A batch of one example has no
    mismatched pair: its KL row is the example itself.
    """

    kl: bool = False

    def __post_init__(self):
        self.required = ("prompt_input_ids", "completion_input_ids", "label")

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        who = type(self).__name__
        prompts, completions, labels = [], [], []
        for i, ex in enumerate(examples):
            prompts.append(self._ids(ex, "prompt_input_ids", i, allow_empty=True))
            completions.append(self._ids(ex, "completion_input_ids", i))
            labels.append(_label(self._get(ex, "label", i), i, who))
        batch = self._pad(prompts, completions)
        batch["label"] = torch.tensor(labels, dtype=torch.bool)
        if self.kl:
            shifted = completions[-1:] + completions[:-1]
            kl = self._pad(prompts, shifted)
            batch.update({f"KL_{k}": v for k, v in kl.items()})
        return batch


@dataclasses.dataclass
class ScalarFeedbackCollator(_Collator):
    """Scalar feedback (PRO-S, DRO): one example per prompt holding its K completions and their rewards.

    Example: ``{"prompt_input_ids": [...], "completion_input_ids": [[...], ...K], "reward": [r_1, ..., r_K]}``.
    Returns ``input_ids``, ``attention_mask``, ``segment_ids`` with the K rows of each example contiguous,
    ``reward`` (float32 ``[N]``) and ``group_id`` (long ``[N]``: the example's position in the batch). Groups are
    never split (see the module docstring). ``min_group_size``: the least K accepted (PRO-S needs 2, DRO 1).
    """

    min_group_size: int = 1

    def __post_init__(self):
        self.required = ("prompt_input_ids", "completion_input_ids", "reward")
        if isinstance(self.min_group_size, bool) or not isinstance(self.min_group_size, int) or self.min_group_size < 1:
            raise ValueError(f"`min_group_size` must be an int >= 1, got {self.min_group_size!r}")

    def _rows(self, examples):
        who = type(self).__name__
        prompts, completions, rewards, groups = [], [], [], []
        for i, ex in enumerate(examples):
            prompt = self._ids(ex, "prompt_input_ids", i, allow_empty=True)
            comps = self._get(ex, "completion_input_ids", i)
            rs = self._get(ex, "reward", i)
            if isinstance(rs, torch.Tensor):
                rs = rs.reshape(-1).tolist()
            if isinstance(comps, torch.Tensor):
                comps = comps.tolist()
            if not isinstance(comps, Sequence) or (comps and not isinstance(comps[0], (Sequence, torch.Tensor))):
                raise ValueError(
                    f"{who}: example {i}, 'completion_input_ids' must be a list of K completions (lists of token ids): "
                    "one example per prompt holding all its completions (see fastpref.trainers.collators.group_rows)")
            if not isinstance(rs, Sequence) or isinstance(rs, (str, bytes)):
                raise ValueError(f"{who}: example {i}, 'reward' must be a list of K numbers, one per completion")
            if len(rs) != len(comps):
                raise ValueError(f"{who}: example {i} has {len(comps)} completions but {len(rs)} rewards")
            if len(comps) < self.min_group_size:
                raise ValueError(
                    f"{who}: example {i} (one prompt) has a group of {len(comps)} completion(s); this method needs at "
                    f"least {self.min_group_size} per prompt (PRO-S compares the completions of a prompt with each "
                    "other)")
            for k, (c, r) in enumerate(zip(comps, rs)):
                prompts.append(prompt)
                completions.append(_token_ids(c, f"completion_input_ids[{k}]", i, who))
                rewards.append(_reward(r, f"reward[{k}]", i, who))
                groups.append(i)
        return prompts, completions, rewards, groups

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        prompts, completions, rewards, groups = self._rows(examples)
        batch = self._pad(prompts, completions)
        batch["reward"] = torch.tensor(rewards, dtype=torch.float32)
        batch["group_id"] = torch.tensor(groups, dtype=torch.long)
        return batch


@dataclasses.dataclass
class TYPOCollator(_Collator):
    """TYPO: preference pairs plus reference-model samples (``unsup`` rows) for the unsupervised term.

    A pair example has ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (``unsup`` absent or False);
    a reference-sample example has ``prompt_input_ids``, ``completion_input_ids`` and ``unsup=True``. Rows of the
    batch: the B chosen completions, the B rejected ones (TRL layout: row ``b`` pairs with ``b + B``), then the U
    unsup rows. Returns ``input_ids``, ``attention_mask``, ``segment_ids`` and ``unsup`` (bool ``[2B + U]``).
    """

    def __post_init__(self):
        self.required = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                         "(or) completion_input_ids + unsup")

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        who = type(self).__name__
        pairs, unsup = [], []
        for i, ex in enumerate(examples):
            prompt = self._ids(ex, "prompt_input_ids", i, allow_empty=True)
            flag = ex.get("unsup") if isinstance(ex, Mapping) else None
            if flag is None:  # absent, or None in a datasets.Dataset mixing both kinds of rows
                flag = False
            if isinstance(flag, torch.Tensor):
                flag = flag.item()
            if flag not in (True, False, 0, 1):
                raise ValueError(f"{who}: example {i}, `unsup` must be a bool, got {flag!r}")
            if flag:
                unsup.append((prompt, self._ids(ex, "completion_input_ids", i)))
            else:
                chosen = self._ids(ex, "chosen_input_ids", i)
                rejected = self._ids(ex, "rejected_input_ids", i)
                pairs.append((prompt, chosen, rejected))
        prompts = [p for p, _, _ in pairs] * 2 + [p for p, _ in unsup]
        completions = [c for _, c, _ in pairs] + [r for _, _, r in pairs] + [c for _, c in unsup]
        batch = self._pad(prompts, completions)
        batch["unsup"] = torch.tensor([False] * (2 * len(pairs)) + [True] * len(unsup), dtype=torch.bool)
        return batch


def _index(value: Any, name: str, index: int, who: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise ValueError(f"{who}: example {index}, {name!r} must be one integer, got {value!r}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{who}: example {index}, {name!r} must be an integer >= 0 (a dataset index), got {value!r}")
    return value


@dataclasses.dataclass
class PreferenceCollator(_Collator):
    """Preference pairs: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` per example; rows are the B
    chosen completions, then the B rejected ones (TRL layout). Returns ``input_ids``, ``attention_mask``,
    ``segment_ids``, and with ``index_column`` (AuxDPO's ``example_index``) that column as long ``[B]``; when
    ``index_optional`` and no example of the batch has it (evaluation data), the column is left out."""

    index_column: Optional[str] = None
    index_optional: bool = False

    def __post_init__(self):
        self.required = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
        if self.index_column is not None:
            if not isinstance(self.index_column, str):
                raise ValueError(f"`index_column` must be a column name or None, got {self.index_column!r}")
            if not self.index_optional:
                self.required = self.required + (self.index_column,)

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        who = type(self).__name__
        prompts, chosen, rejected = [], [], []
        for i, ex in enumerate(examples):
            prompts.append(self._ids(ex, "prompt_input_ids", i, allow_empty=True))
            chosen.append(self._ids(ex, "chosen_input_ids", i))
            rejected.append(self._ids(ex, "rejected_input_ids", i))
        batch = self._pad(prompts * 2, chosen + rejected)
        col = self.index_column
        if col is not None:
            have = [isinstance(ex, Mapping) and ex.get(col) is not None for ex in examples]
            if any(have) or not self.index_optional:
                batch[col] = torch.tensor([_index(self._get(ex, col, i), col, i, who) for i, ex in enumerate(examples)],
                                          dtype=torch.long)
        return batch


@dataclasses.dataclass
class PairwiseRewardCollator(_Collator):
    """Pairs with explicit per-response rewards: DRDO's oracle rewards or e-DPO's reward-model rewards.

    ``reward_columns``: the chosen and rejected reward columns, ``("oracle_chosen", "oracle_rejected")`` (DRDO,
    default) or ``("reward_chosen", "reward_rejected")`` (e-DPO). Rows: the B chosen completions, then the B
    rejected ones (TRL layout). Returns ``input_ids``, ``attention_mask``, ``segment_ids`` and the two columns as
    float32 ``[B]`` tensors.
    """

    reward_columns: tuple[str, str] = ("oracle_chosen", "oracle_rejected")

    def __post_init__(self):
        if (not isinstance(self.reward_columns, (tuple, list)) or len(self.reward_columns) != 2
                or not all(isinstance(c, str) for c in self.reward_columns)):
            raise ValueError(f"`reward_columns` must be two column names (chosen, rejected), "
                             f"got {self.reward_columns!r}")
        self.reward_columns = tuple(self.reward_columns)
        self.required = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", *self.reward_columns)

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        who = type(self).__name__
        prompts, chosen, rejected = [], [], []
        rewards = {c: [] for c in self.reward_columns}
        for i, ex in enumerate(examples):
            prompts.append(self._ids(ex, "prompt_input_ids", i, allow_empty=True))
            chosen.append(self._ids(ex, "chosen_input_ids", i))
            rejected.append(self._ids(ex, "rejected_input_ids", i))
            for c in self.reward_columns:
                rewards[c].append(_reward(self._get(ex, c, i), c, i, who))
        batch = self._pad(prompts * 2, chosen + rejected)
        for c in self.reward_columns:
            batch[c] = torch.tensor(rewards[c], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------------------------- tokenization

_TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def tokenize_example(example: Mapping, tokenizer, *, add_eos: bool = True, add_special_tokens: bool = True) -> dict:
    """Tokenize one text example into the collators' format; other columns are kept as they are.

    ``prompt`` -> ``prompt_input_ids`` (``tokenizer(prompt, add_special_tokens=add_special_tokens)``: the BOS token
    for tokenizers that add one); ``completion`` (a string, or a list of K strings for scalar feedback), ``chosen``,
    ``rejected`` -> ``completion_input_ids`` / ``chosen_input_ids`` / ``rejected_input_ids`` (no special tokens, then
    the EOS token when ``add_eos`` and the tokenizer has one). Texts are plain strings: apply a chat template first.
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"tokenize_example: an example must be a dict, got {type(example).__name__}")
    if "prompt" not in example:
        raise ValueError(f"tokenize_example: the example has no 'prompt' column (has {sorted(example)})")
    eos = getattr(tokenizer, "eos_token_id", None)

    def completion(text: str, name: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"tokenize_example: column {name!r} must be a string, got {type(text).__name__}")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if add_eos and eos is not None:
            ids.append(int(eos))
        return ids

    prompt = example["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"tokenize_example: column 'prompt' must be a string, got {type(prompt).__name__}")
    out = {k: v for k, v in example.items() if k not in _TEXT_COLUMNS}
    out["prompt_input_ids"] = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    for name in ("completion", "chosen", "rejected"):
        if name in example:
            value = example[name]
            key = f"{name}_input_ids"
            if value is None:  # a row of a datasets.Dataset that mixes layouts (TYPO's pairs and unsup rows)
                out[key] = None
            elif name == "completion" and isinstance(value, (list, tuple)):
                out[key] = [completion(t, f"completion[{k}]") for k, t in enumerate(value)]
            else:
                out[key] = completion(value, name)
    return out


def tokenize_dataset(dataset, tokenizer, *, add_eos: bool = True, add_special_tokens: bool = True, **map_kwargs):
    """:func:`tokenize_example` over a ``datasets.Dataset`` (through ``.map``; ``map_kwargs`` such as ``num_proc`` go
    there) or any iterable of dicts (returns a list). The text columns are replaced by their ``*_input_ids``."""
    def fn(example):
        return tokenize_example(example, tokenizer, add_eos=add_eos, add_special_tokens=add_special_tokens)

    if hasattr(dataset, "map") and hasattr(dataset, "column_names"):
        remove = [c for c in _TEXT_COLUMNS if c in dataset.column_names]
        return dataset.map(fn, remove_columns=remove, **map_kwargs)
    if map_kwargs:
        raise TypeError(f"tokenize_dataset: {sorted(map_kwargs)} only apply to a datasets.Dataset")
    return [fn(ex) for ex in dataset]


def group_rows(rows, *, key: str = "prompt_input_ids",
               columns: Sequence[str] = ("completion_input_ids", "reward")) -> list[dict]:
    """Regroup a one-completion-per-row dataset (scalar feedback) into one example per prompt.

    Rows with the same ``key`` (the prompt; compared by value) are merged, in first-seen order, into one example
    whose ``columns`` are lists over the group; the other columns are taken from the group's first row.
    """
    groups: dict[Any, dict] = {}
    for i, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"group_rows: row {i} has no column {key!r}")
        k = row[key]
        k = tuple(k) if isinstance(k, list) else k
        if k not in groups:
            groups[k] = {c: v for c, v in row.items() if c not in columns}
            for c in columns:
                groups[k][c] = []
        for c in columns:
            if c not in row:
                raise ValueError(f"group_rows: row {i} has no column {c!r}")
            groups[k][c].append(row[c])
    return list(groups.values())


# --------------------------------------------------------------------------------------------- padding-free


def pack_batch(batch: Mapping[str, Any], prefixes: Sequence[str] = ("",)) -> dict[str, Any]:
    """One padded batch packed into one row per prefix (module docstring, "Padding-free batches").

    For each prefix ``p`` whose ``{p}input_ids [S, T]`` is in ``batch``: every 2-D tensor of the same shape whose
    name starts with ``p`` (and with no longer prefix of ``prefixes``), e.g. ``{p}input_ids``, ``{p}segment_ids``,
    ``{p}completion_mask``, becomes ``[1, N]``, the tokens where ``{p}attention_mask`` is 1, sequence after sequence;
    ``{p}position_ids [1, N]`` counts each sequence's tokens from 0 and ``{p}attention_mask`` becomes all ones.
    Everything else (per-sequence columns such as labels, rewards, reference log-probs) is passed through, so the
    sequences keep their order and their per-sequence columns stay aligned with them.

    Raises ``ValueError`` for a sequence with no token, or a batch that already has ``{p}position_ids``.
    """
    out = dict(batch)
    longer = sorted((p for p in prefixes if p), key=len, reverse=True)
    for prefix in prefixes:
        ids = batch.get(prefix + "input_ids")
        if ids is None:
            continue
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"pack_batch: `{prefix}input_ids` must be a [batch, seq_len] tensor")
        if prefix + "position_ids" in batch:
            raise ValueError(f"pack_batch: the batch already has `{prefix}position_ids` (packed, or positions of "
                             "its own); pack a padded batch")
        mask = batch.get(prefix + "attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError(f"pack_batch: sequence {int(torch.nonzero(lengths == 0)[0])} of `{prefix}input_ids` "
                             "has no token")
        owner = lambda key: next((p for p in longer if key.startswith(p)), "")  # noqa: E731
        for key, value in batch.items():
            if (isinstance(value, torch.Tensor) and value.shape == ids.shape and owner(key) == prefix
                    and key != prefix + "attention_mask"):
                out[key] = value[mask][None]
        out[prefix + "position_ids"] = (mask.long().cumsum(dim=1) - 1)[mask][None]
        out[prefix + "attention_mask"] = torch.ones((1, int(lengths.sum())), dtype=torch.long)
    return out


class PackingCollator:
    """``collator``'s batches, packed by :func:`pack_batch` (padding-free training).

    Args:
        collator: any collator returning padded ``[S, T]`` token tensors with an ``attention_mask`` (fastpref's,
            TRL's ``DataCollatorForPreference`` / ``DataCollatorForUnpairedPreference``, ...).
        prefixes: the groups of token tensors to pack, by name prefix (``("", "KL_")`` for KTO's KL rows).
    """

    def __init__(self, collator, prefixes: Sequence[str] = ("",)):
        if not callable(collator):
            raise TypeError(f"PackingCollator: `collator` must be callable, got {type(collator).__name__}")
        self.collator, self.prefixes = collator, tuple(prefixes)

    def __call__(self, examples):
        return pack_batch(self.collator(examples), self.prefixes)

    def validate_example(self, example: Mapping, index: int = 0) -> None:
        check = getattr(self.collator, "validate_example", None)
        if check is not None:
            check(example, index)
