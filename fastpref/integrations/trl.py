"""Former home of :class:`FastPrefDPOTrainer`: re-exports :mod:`fastpref.trainers.dpo` (every trainer now lives in
:mod:`fastpref.trainers`)."""

from ..trainers.dpo import *  # noqa: F401,F403
from ..trainers.dpo import __all__  # noqa: F401
