"""``fastpref reproduce``: each method paper's own toy claim, run through fastpref's public API on the CPU.

Every claim is a small experiment in its own module; :func:`run_claims` runs them and returns one
:class:`ClaimResult` per claim (the paper's statement next to what fastpref computes, and whether it holds);
:mod:`fastpref.reproduce.report` prints the side-by-side table and draws the figure. ``tests/test_reproduce.py``
runs them in CI. Seeds are fixed: the numbers are the same on every run (up to float64 rounding across platforms).

========================  ==================================================================================
claim                     what is checked
========================  ==================================================================================
``typo-bandit``           TYPO (seed 002, Fig. 2): on a three-response bandit TYPO reaches pi* = (0.6, 0.3, 0.1),
                          DPO and IPO the mode; with strong regularization all three stay at pi_ref
``auxdpo-prop2``          AuxDPO (seed 003, Prop. 2): r* = (1, 2, 0), pi ∝ (e^θ, e^-θ, 1), n31 >> n12, n23: DPO
                          reverses the preference (θ = +0.91 > 0); AuxDPO's form (anti-collapse term, delta in its
                          own group at lr 5e-3) ends at θ < 0; delta at a policy learning rate, or the pre-fix
                          ``+lambda_amp sum delta^2`` penalty, stay at DPO's θ
``dro-offset``            DRO (seed 001, Fig. 2(b)): the chosen response's implicit reward falls with ``log_z0``
                          at slope ``-beta``
``pro-dpo-identity``      PRO (seed 000): 4 x PRO-P with eta = 0, alpha = 1 has exactly DPO's gradient
``pro-existence``         PRO: an optimum exists iff alpha (1 - eta^2) > 1 (slope of 4L as pi(y_l) -> 0 is
                          (alpha (1 - eta^2) - 1) / 2); (0.2, 1.1) and (1/3, 1.2) have one, (0, 1) none
``pro-binary-imbalance``  PRO-B at 1:100 desirable:undesirable: scaling the minority loss by the imbalance ratio
                          (the seed's recipe) recovers the balanced solution; without it the majority wins
``drdo-gradient``         DRDO (seed 004, eq. 48-50): fastpref's gradient is the closed form with the focal
                          factor differentiated; the term eq. 51-52 drop is not negligible at sequence level
========================  ==================================================================================
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

__all__ = ["CLAIMS", "ClaimResult", "run_claims"]


@dataclasses.dataclass
class ClaimResult:
    """One reproduced claim: the paper's statement, fastpref's numbers, whether the claim holds, and the data the
    figure draws (``plot(ax)`` draws the claim's panel on a matplotlib axes)."""

    name: str
    title: str
    paper: str
    fastpref: str
    passed: bool
    seconds: float = 0.0
    details: dict = dataclasses.field(default_factory=dict)
    plot: Optional[Callable[[Any], None]] = dataclasses.field(default=None, repr=False, compare=False)


def _registry() -> dict[str, Callable[[], ClaimResult]]:
    from . import auxdpo_prop2, drdo_gradient, dro_offset, pro_claims, typo_bandit

    return {
        "typo-bandit": typo_bandit.run,
        "auxdpo-prop2": auxdpo_prop2.run,
        "dro-offset": dro_offset.run,
        "pro-dpo-identity": pro_claims.run_identity,
        "pro-existence": pro_claims.run_existence,
        "pro-binary-imbalance": pro_claims.run_binary_imbalance,
        "drdo-gradient": drdo_gradient.run,
    }


CLAIMS = ("typo-bandit", "auxdpo-prop2", "dro-offset", "pro-dpo-identity", "pro-existence", "pro-binary-imbalance",
          "drdo-gradient")


def run_claims(names: Optional[Sequence[str]] = None, *, progress: Optional[Callable[[str], None]] = None,
               threads: int = 1) -> list[ClaimResult]:
    """Run the named claims (default: all, in :data:`CLAIMS` order) on the CPU in float64 and return their results.

    ``threads``: torch intra-op threads during the run (1 is fastest for these tiny problems; restored afterwards).
    """
    import torch

    registry = _registry()
    names = list(CLAIMS) if names is None else list(names)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; choose from {list(CLAIMS)}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = []
    try:
        for name in names:
            if progress is not None:
                progress(name)
            start = time.perf_counter()
            result = registry[name]()
            result.seconds = time.perf_counter() - start
            results.append(result)
    finally:
        torch.set_num_threads(previous)
    return results
