"""Former home of the feedback trainers: re-exports :mod:`fastpref.trainers.feedback` (every trainer now lives in
:mod:`fastpref.trainers`)."""

from .trainers.feedback import *  # noqa: F401,F403
from .trainers.feedback import __all__  # noqa: F401
