"""fastpref beyond one GPU: the one place that knows about DTensor, FSDP, DeepSpeed ZeRO and process groups.

- :mod:`.plan` and :mod:`.sharded_head`: :func:`fastpref.sequence_logprobs` over a head sharded by vocabulary rows
  (a ``Shard(0)`` DTensor, or a plain shard with ``vocab_parallel_group`` / ``vocab_range``) and over sequences
  split along time (``context_parallel_group``). Exact: the same log-probs and gradients as one process.
- :mod:`.wrappers`: the Hugging Face patch under DDP, FSDP1, FSDP2 and ZeRO-3: which module wraps the head, how to
  call the fused head inside its sharding unit, and how to read the whole head without a gradient.
- :mod:`.replicated`: gradients of trainer-owned parameters (AuxDPO's offsets, DRDO's reward head) averaged over
  the data-parallel ranks, as DDP does for the model.

The kernels and backends know nothing of any of this: they compute one vocabulary shard's statistics
(``shard_forward``) and a backward from given statistics; everything here is collectives around them.
"""

from .plan import DistributedHead, is_dtensor, resolve

__all__ = ["DistributedHead", "is_dtensor", "resolve"]
