"""Former home of the trainers' collators: re-exports :mod:`fastpref.trainers.collators`."""

from .trainers.collators import *  # noqa: F401,F403
from .trainers.collators import __all__  # noqa: F401
