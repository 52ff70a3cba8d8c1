"""Loss modules: hidden states and LM head in, ``(loss, metrics)`` out (one fused pass per model)."""

from .auxdpo import AuxDPOLoss
from .base import FusedHeadLoss
from .cpo import CPOLoss
from .dpo import DPOLoss, SimPOLoss
from .drdo import DRDOLoss
from .dro import DROLoss
from .orpo import ORPOLoss
from .pro import PROLoss
from .typo import TYPOLoss

__all__ = ["AuxDPOLoss", "CPOLoss", "DPOLoss", "DRDOLoss", "DROLoss", "FusedHeadLoss", "ORPOLoss", "PROLoss",
           "SimPOLoss", "TYPOLoss"]
