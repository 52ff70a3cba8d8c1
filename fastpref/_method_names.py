"""One table of method names: which trainer call runs each method that ``fastpref demo`` trains (and the few
others the trainers know), so that the demo, the trainers' errors and the README use the same names.

The demo names a method by what it trains (``ipo``, ``pro-binary``, ``dro``); a trainer's ``method=`` selects among
the methods that share its data layout, so the same method has a different spelling there: ``pro-binary`` is
``BinaryFeedbackTrainer(method="pro")``, and IPO is not a fastpref method but one of TRL's ``loss_type`` values
of DPO. :func:`where` turns any of these names into the call that runs it.
"""

from __future__ import annotations

from typing import Optional

#: name -> the trainer call that trains it (every trainer is in :mod:`fastpref.trainers`;
#: ``FastPrefKTOTrainer`` is TRL's KTO drop-in). Keys: every ``fastpref demo`` method, plus ``kto``, ``cpo``,
#: ``orpo`` and ``edpo``.
TRAINER_CALLS: dict[str, str] = {
    "dpo": "FastPrefDPOTrainer(method='dpo') with DPOConfig(loss_type='sigmoid')",
    "ipo": "FastPrefDPOTrainer(method='dpo') with DPOConfig(loss_type='ipo')",
    "simpo": "FastPrefDPOTrainer(method='simpo')",
    "pro": "FastPrefDPOTrainer(method='pro')",
    "pro-binary": "BinaryFeedbackTrainer(method='pro')",
    "pro-scalar": "ScalarFeedbackTrainer(method='pro')",
    "dro": "ScalarFeedbackTrainer(method='dro')",
    "typo": "TYPOTrainer (pairs and reference samples); FastPrefDPOTrainer(method='typo', "
            "method_kwargs={'lam': 0.0}) for pairs alone",
    "auxdpo": "FastPrefDPOTrainer(method='auxdpo')",
    "drdo": "FastPrefDPOTrainer(method='drdo') or OracleRewardTrainer(method='drdo')",
    "kto": "FastPrefKTOTrainer (TRL's KTOTrainer) or BinaryFeedbackTrainer(method='kto')",
    "cpo": "FastPrefCPOTrainer (TRL's CPOTrainer)",
    "orpo": "FastPrefORPOTrainer (TRL's ORPOTrainer)",
    "edpo": "OracleRewardTrainer(method='edpo')",
}


def where(name: object) -> Optional[str]:
    """Where a method called ``name`` runs, as a sentence fragment ("use ..."), or None for an unknown name.

    Knows :data:`TRAINER_CALLS` and TRL's DPO ``loss_type`` values (``ipo``, ``hinge``, ``robust``, ...), which run
    in ``FastPrefDPOTrainer(method='dpo')`` with ``DPOConfig(loss_type=...)``.
    """
    if not isinstance(name, str):
        return None
    key = name.strip().lower().replace("_", "-")
    from .losses.dpo import DPO_LOSS_TYPES

    loss_types = {t.replace("_", "-"): t for t in DPO_LOSS_TYPES}
    if key in loss_types and key not in TRAINER_CALLS:
        return (f"{name!r} is a TRL loss type of DPO: use FastPrefDPOTrainer(method='dpo') (the default) with "
                f"DPOConfig(loss_type={loss_types[key]!r})")
    if key in TRAINER_CALLS:
        return f"{name!r} runs in {TRAINER_CALLS[key]}"
    return None
