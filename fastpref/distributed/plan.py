"""How :func:`fastpref.sequence_logprobs` runs over several ranks: which head rows this rank holds, which groups
reduce what, and the checks that make every rank of a group raise together.

A call is distributed when the head is a ``torch.distributed.tensor.DTensor`` or when one of the keywords is
given:

- ``weight`` as a DTensor sharded ``Shard(0)`` along one mesh dimension (tensor parallelism's ``ColwiseParallel``
  convention on ``lm_head``: vocabulary rows split across the ranks, ``torch.chunk`` sizes, uneven allowed),
  ``Replicate()`` along the others; ``bias`` likewise or None; ``hidden`` a plain tensor or a replicated DTensor.
  The local shards are read with ``to_local()`` (differentiable: each rank's ``dW`` rows become the DTensor's
  ``Shard(0)`` gradient). The whole head is never gathered.
- ``vocab_parallel_group`` + ``vocab_range=(start, stop)``: ``weight`` is this rank's plain shard, rows
  ``[start, stop)`` of the whole head; the ranges of the group's ranks must tile ``[0, V)``.
- ``context_parallel_group``: every rank holds a slice (along time) of the same sequences and the whole head;
  per-sequence totals and counts are summed across the group (identity backward), ``dW`` is summed in the
  backward (see :mod:`.sharded_head`).

Checks (with ``validate=True``): one ``all_gather`` of a few numbers per group makes every rank see every rank's
verdict, so a rank whose own input is rejected raises its error while the others raise "another rank rejected
its input" instead of waiting in the next collective; the same exchange checks that the ranks of a vocabulary
group hold the same batch (sizes, labels, segments and a checksum of the hidden states: a weight sharded by
FSDP over *data*-parallel ranks is not a vocabulary-parallel head), that the vocabulary ranges tile ``[0, V)``,
and that the ranks of a context group hold the same number of sequences. With ``validate=False`` nothing is
exchanged beyond the head's own reductions.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .._validation import NonFiniteError, empty_sequences_check
from ._collectives import ProcessGroup, all_gather_rows, require_group, sum_across_group
from .sharded_head import ShardedHead

# an error a rank raised while checking its input, as exchanged with the group (0: none; the largest code wins)
_ERROR_CODES = {TypeError: 1, ValueError: 2, NonFiniteError: 3}


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``, without importing that module (about 1 s): a DTensor
    can only exist once it is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(x, cls)


def requested(hidden, weight, bias, vocab_parallel_group, vocab_range, context_parallel_group) -> bool:
    """Whether a :func:`sequence_logprobs` call takes the distributed path (no import of anything else)."""
    return (vocab_parallel_group is not None or vocab_range is not None or context_parallel_group is not None
            or any(is_dtensor(t) for t in (hidden, weight, bias)))


@dataclasses.dataclass
class DistributedHead:
    """This rank's part of a distributed head call (local tensors, groups, the vocabulary rows it holds)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    vocab_group: Optional[ProcessGroup]
    vocab_start: int
    vocab_size: Optional[int]  # the whole head's V (None: a raw shard's, until the ranks' ranges are exchanged)
    context_group: Optional[ProcessGroup]

    @property
    def label_bound(self) -> int:
        """The bound the local label check uses: ``V``, or (a raw shard, ``V`` not known yet) no upper bound; the
        exchange then checks the largest scored label against the ranges' ``V``."""
        return self.vocab_size if self.vocab_size is not None else 2**62

    # ------------------------------------------------------------------------------------------ checks

    def checked_layout(self, layout_fn: Callable, validate: bool, *args, **kwargs):
        """``layout_fn(*args, **kwargs)`` (fastpref.logprobs._layout), with the verdict shared by every rank (module
        docstring). Returns the layout."""
        if not validate:
            return layout_fn(*args, **kwargs)
        try:
            layout = layout_fn(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            self._exchange(None, next(code for cls, code in reversed(_ERROR_CODES.items()) if isinstance(exc, cls)))
            raise
        self._exchange(layout, 0)
        return layout

    def _fingerprint(self, layout) -> list[float]:
        hidden2d, labels, segments, _, num_sequences = layout
        position = torch.arange(1, labels.numel() + 1, device=labels.device, dtype=torch.float64)
        checksum = hidden2d.new_zeros((), dtype=torch.float64)
        for r0 in range(0, hidden2d.shape[0], 1024):  # float64 checksum of the hidden states, 1,024 rows at a time
            checksum = checksum + hidden2d[r0:r0 + 1024].double().sum()
        scored = torch.where(segments > 0, labels, torch.full_like(labels, -1))
        sums = torch.stack([(labels.double() * position).sum(), (segments.double() * position).sum(),
                            checksum, scored.max().double() if scored.numel() else checksum.new_full((), -1.0)])
        return [float(hidden2d.shape[0]), float(num_sequences), *sums.tolist()]

    def _exchange(self, layout, code: int) -> None:
        failed = code != 0
        for name, group in (("vocabulary-parallel", self.vocab_group), ("context-parallel", self.context_group)):
            if group is None:
                continue
            device = self.hidden.device
            if name == "vocabulary-parallel":
                rows = self.weight.shape[0]
                facts = [float(self.vocab_start), float(self.vocab_start + rows)]
                facts += [0.0] * 6 if failed else self._fingerprint(layout)
            else:
                facts = [0.0 if failed else float(layout.num_sequences)]
            mine = torch.tensor([float(code), *facts], dtype=torch.float64, device=device)
            table = all_gather_rows(mine, group).cpu()
            if failed:
                continue  # this rank raises its own error
            if bool(table[:, 0].any()):
                bad = [int(r) for r in torch.nonzero(table[:, 0]).reshape(-1)]
                # the failing rank's kind of error: a trainer that skips a step on NonFiniteError skips it everywhere
                kind = max(_ERROR_CODES, key=lambda cls: _ERROR_CODES[cls] if _ERROR_CODES[cls] in table[:, 0] else -1)
                raise kind(f"another rank of the {name} group (group ranks {bad}) rejected its input to "
                           "sequence_logprobs; see that rank's error")
            if name == "vocabulary-parallel":
                self._check_vocab_table(table)
            elif not bool((table[:, 1] == table[0, 1]).all()):
                raise ValueError("the ranks of `context_parallel_group` hold different numbers of sequences "
                                 f"({table[:, 1].long().tolist()}); each rank must hold a slice of every sequence")

    def _check_vocab_table(self, table: torch.Tensor) -> None:
        starts, stops = table[:, 1].long(), table[:, 2].long()
        order = torch.argsort(starts)
        s, e = starts[order], stops[order]
        if int(s[0]) != 0 or not bool((s[1:] == e[:-1]).all()):
            ranges = [(int(a), int(b)) for a, b in zip(starts, stops)]
            raise ValueError(f"the vocabulary ranges of the group's ranks {ranges} do not tile [0, V) without gaps "
                             "or overlaps (`vocab_range` is each rank's [start, stop) of the whole head)")
        self.vocab_size = int(e[-1])
        if not bool((table[:, 3:] == table[0, 3:]).all()):  # N, S, labels, segments, hidden, largest label
            raise ValueError(
                "the ranks of the vocabulary-parallel group hold different batches (hidden states, labels or "
                "segments differ): a vocabulary-parallel head needs the same rows on every rank of its group. A "
                "weight sharded by FSDP across data-parallel ranks is not a vocabulary-parallel head: call the "
                "head inside its FSDP unit (fastpref.integrations.transformers.patch does)")
        if int(table[0, -1]) >= self.vocab_size:
            raise ValueError(f"`labels` holds values outside [0, {self.vocab_size}) (the whole head's vocabulary) "
                             "that are not ignore_index")

    # ------------------------------------------------------------------------------------------ the head

    def token_logprobs(self, hidden2d, weight, bias, rows, labels, backend, options, stats: bool = False):
        """``lp [M]`` of the scored rows (global labels), through :class:`.sharded_head.ShardedHead`; with
        ``stats``, ``(lp, entropy, log_sum_p2, mean_logit, argmax_is_label)``, each ``[M]``."""
        return ShardedHead.apply(hidden2d, weight, bias, rows, labels, backend, options, self.vocab_group,
                                 self.vocab_start, self.context_group, self.vocab_size, stats)

    def sum_over_context(self, x: torch.Tensor) -> torch.Tensor:
        """Context parallel: ``x`` summed across the group, identity backward (``x`` itself otherwise)."""
        return x if self.context_group is None else sum_across_group(x, self.context_group)

    def sequence_totals(self, totals: torch.Tensor, counts: torch.Tensor, validate: bool):
        """Context parallel: ``(totals, counts)`` summed across the group (identity backward for ``totals``);
        with ``validate``, a sequence with no scored token on any rank raises (on every rank)."""
        if self.context_group is None:
            return totals, counts
        totals = sum_across_group(totals, self.context_group)
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.context_group)
        if validate:
            message, empty = empty_sequences_check(counts.sum(dim=1))
            if bool(empty):
                raise ValueError(f"{message()} (counted over every rank of `context_parallel_group`)")
        return totals, counts


# ---------------------------------------------------------------------------------------------- resolving


def resolve(hidden, weight, bias, *, vocab_parallel_group=None, vocab_range=None,
            context_parallel_group=None) -> DistributedHead:
    """This rank's :class:`DistributedHead` (module docstring); raises ``TypeError``/``ValueError`` naming the
    argument. Runs no collective."""
    if context_parallel_group is not None:
        require_group("context_parallel_group", context_parallel_group)
    if is_dtensor(weight):
        if vocab_parallel_group is not None or vocab_range is not None:
            raise ValueError("`weight` is a DTensor, whose mesh already says how it is sharded; do not pass "
                             "`vocab_parallel_group` / `vocab_range` (they are for a plain local shard)")
        return _resolve_dtensor(hidden, weight, bias, context_parallel_group)
    if is_dtensor(bias):
        raise TypeError("`bias` is a DTensor but `weight` is not; pass both as DTensors or both as local tensors")
    hidden = _local_hidden(hidden)
    if vocab_parallel_group is None and vocab_range is None:
        return DistributedHead(hidden, weight, bias, None, 0, _rows(weight), context_parallel_group)
    if vocab_parallel_group is None or vocab_range is None:
        raise ValueError("a plain local shard of the head needs both `vocab_parallel_group` (its process group) and "
                         "`vocab_range=(start, stop)` (the rows of the whole head it holds)")
    group = require_group("vocab_parallel_group", vocab_parallel_group)
    if context_parallel_group is not None and context_parallel_group is group:
        raise ValueError("`vocab_parallel_group` and `context_parallel_group` must be different groups")
    if (not isinstance(vocab_range, (tuple, list)) or len(vocab_range) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in vocab_range)):
        raise TypeError(f"`vocab_range` must be a pair of ints (start, stop), got {vocab_range!r}")
    start, stop = vocab_range
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("`weight` must be this rank's 2-D shard [stop - start, D] of the head")
    if start < 0 or stop - start != weight.shape[0]:
        raise ValueError(f"`vocab_range` {tuple(vocab_range)} does not match the local `weight` of "
                         f"{weight.shape[0]} rows: expected 0 <= start and stop - start == {weight.shape[0]}")
    return DistributedHead(hidden, weight, bias, group, start, None, context_parallel_group)


def _rows(weight) -> Optional[int]:
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else None


def _local_hidden(hidden):
    if not is_dtensor(hidden):
        return hidden
    from torch.distributed.tensor import Replicate

    if not all(isinstance(p, Replicate) for p in hidden.placements):
        raise ValueError(f"`hidden` is a DTensor with placements {hidden.placements}; the head needs the hidden "
                         "states replicated on the ranks that share the head (redistribute to Replicate(), or "
                         "pass a sequence split along time with `context_parallel_group`)")
    return hidden.to_local()


def _resolve_dtensor(hidden, weight, bias, context_group) -> DistributedHead:
    from torch.distributed.tensor import Replicate, Shard

    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D [V, D], got shape {tuple(weight.shape)}")
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and type(p) is Shard and p.dim == 0]
    others = [p for i, p in enumerate(placements) if i not in sharded]
    if len(sharded) > 1 or not all(isinstance(p, Replicate) for p in others):
        raise ValueError(
            f"`weight` is a DTensor with placements {placements}; the fused head takes a head sharded by vocabulary "
            "rows (Shard(0), ColwiseParallel) along one mesh dimension and replicated along the others. A head "
            "sharded by FSDP is read inside its FSDP unit (fastpref.integrations.transformers.patch does that)")
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != mesh or tuple(bias.placements) != placements:
            raise ValueError("`bias` must be a DTensor on `weight`'s mesh with the same placements "
                             f"({placements}), got {getattr(bias, 'placements', type(bias).__name__)}")
    hidden = _local_hidden(hidden)
    local_w = weight.to_local()
    local_b = None if bias is None else bias.to_local()
    V = weight.shape[0]
    if not sharded:
        return DistributedHead(hidden, local_w, local_b, None, 0, V, context_group)
    dim = sharded[0]
    n, r = mesh.size(dim), mesh.get_local_rank(dim)
    chunk = -(-V // n)  # Shard(0) splits like torch.chunk: ceil(V / n) rows per rank, the last ones shorter
    start = min(r * chunk, V)
    if local_w.shape[0] != max(min(chunk, V - start), 0):
        expected = max(min(chunk, V - start), 0)
        raise ValueError(f"`weight`'s local shard has {local_w.shape[0]} rows, expected {expected} "
                         f"for rank {r} of {n} under torch.chunk's split of {V} rows")
    group = mesh.get_group(dim)
    if context_group is not None and context_group is group:
        raise ValueError("`context_parallel_group` must differ from the head's vocabulary-parallel mesh dimension")
    return DistributedHead(hidden, local_w, local_b, group, start, V, context_group)
