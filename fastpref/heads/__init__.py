"""Loss modules: hidden states and LM head in, ``(loss, metrics)`` out (one fused pass per model)."""

from .auxdpo import AuxDPOLoss
from .base import FusedHeadLoss
from .dpo import DPOLoss, SimPOLoss
from .drdo import DRDOLoss
from .dro import DROLoss
from .pro import PROLoss
from .typo import TYPOLoss

__all__ = ["AuxDPOLoss", "DPOLoss", "DRDOLoss", "DROLoss", "FusedHeadLoss", "PROLoss", "SimPOLoss", "TYPOLoss"]
