"""Every fastpref trainer, in one package.

============================  =====================================  ==============================================
module                        trainers                               for
============================  =====================================  ==============================================
:mod:`.dpo`                   ``FastPrefDPOTrainer``                 TRL's ``DPOTrainer``, drop-in (every
                                                                     ``loss_type``; fastpref's pair methods)
:mod:`.cpo`                   ``FastPrefCPOTrainer``,                TRL's ``CPOTrainer`` (CPO, CPO-SimPO, AlphaPO)
                              ``FastPrefORPOTrainer``                and ``ORPOTrainer``, drop-in
:mod:`.kto`                   ``FastPrefKTOTrainer``                 TRL's ``KTOTrainer``, drop-in
:mod:`.feedback`              ``BinaryFeedbackTrainer``,             ``transformers.Trainer`` classes for the data
                              ``ScalarFeedbackTrainer``,             layouts TRL's trainers cannot take (binary and
                              ``TYPOTrainer``, ``OracleRewardTrainer``,  scalar feedback, reference samples, oracle
                              ``DRDOOracleTrainer``, ``AuxDPOTrainer``   rewards, per-example offsets)
:mod:`.collators`             the feedback trainers' collators       padding, packing (``padding_free``), checks
============================  =====================================  ==============================================

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
