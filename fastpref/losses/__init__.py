"""Loss heads over per-sequence scalars (docs/methods.md): functional API and AuxDPO's null-space penalties."""

from . import functional
from .auxdpo_penalty import head_null_penalty, null_space_basis, param_null_penalty
from .functional import *  # noqa: F401,F403
from .functional import __all__ as _functional_all

__all__ = ["functional", "head_null_penalty", "null_space_basis", "param_null_penalty", *_functional_all]
