"""Every fastpref trainer, in one package.

* :mod:`.dpo`: ``FastPrefDPOTrainer``, TRL's ``DPOTrainer`` drop-in (every ``loss_type``; fastpref's pair methods);
* :mod:`.cpo`: ``FastPrefCPOTrainer`` and ``FastPrefORPOTrainer``, drop-ins for TRL's ``CPOTrainer`` (CPO,
  CPO-SimPO, AlphaPO) and ``ORPOTrainer``;
* :mod:`.kto`: ``FastPrefKTOTrainer``, TRL's ``KTOTrainer`` drop-in;
* :mod:`.feedback`: ``BinaryFeedbackTrainer``, ``ScalarFeedbackTrainer``, ``TYPOTrainer``, ``OracleRewardTrainer``,
  ``DRDOOracleTrainer``, ``AuxDPOTrainer``: ``transformers.Trainer`` classes for the data layouts TRL's trainers
  cannot take (binary and scalar feedback, reference samples, oracle rewards, per-example offsets);
* :mod:`.collators`: their collators, and :class:`~.collators.PackingCollator` (padding-free batches).

Names are resolved on first use (``from fastpref.trainers import FastPrefDPOTrainer``), so the feedback trainers
and collators need only ``transformers`` and the TRL drop-ins ``trl`` as well. The former paths
(``fastpref.integrations.trl``, ``fastpref.trainer``, ``fastpref.collators``) re-export the same objects.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "dpo": ("FastPrefDPOTrainer",),
    "cpo": ("FastPrefCPOTrainer", "FastPrefORPOTrainer"),
    "kto": ("FastPrefKTOTrainer",),
    "feedback": ("AuxDPOTrainer", "BinaryFeedbackTrainer", "DRDOOracleTrainer", "FastPrefTrainer",
                 "OracleRewardTrainer", "ScalarFeedbackTrainer", "TYPOTrainer"),
    "collators": ("BinaryFeedbackCollator", "PackingCollator", "PairwiseRewardCollator", "PreferenceCollator",
                  "ScalarFeedbackCollator", "TYPOCollator", "pack_batch", "tokenize_dataset"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fastpref.trainers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
