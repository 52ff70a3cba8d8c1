"""fastpref: preference-optimization losses straight from hidden states and the LM head, no logits tensor.

Layer 1 is :func:`sequence_logprobs` (fused Triton kernels, or chunked PyTorch); layer 2 are the loss
heads in :mod:`fastpref.losses`. See ``README.md``.
"""

from . import losses
from .heads import AuxDPOLoss, DPOLoss, DRDOLoss, DROLoss, PROLoss, SimPOLoss, TYPOLoss
from ._validation import NonFiniteError
from .logprobs import SequenceLogProbs, sequence_logprobs

__version__ = "0.1.0"
__all__ = [
    "AuxDPOLoss", "DPOLoss", "DRDOLoss", "DROLoss", "NonFiniteError", "PROLoss", "SequenceLogProbs", "SimPOLoss",
    "TYPOLoss",
    "losses", "sequence_logprobs", "__version__",
]
