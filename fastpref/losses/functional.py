"""Functional losses: one function per method over per-sequence tensors (pure PyTorch, differentiable by autograd).

Each returns ``(loss, metrics)``: a scalar loss (a batch mean, as TRL) and a dict of detached scalar tensors named
as TRL names them (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, plus method-specific ones).  Inputs are computed in at least fp32 (half and
bfloat16 are upcast; float64 stays float64).  The formulas are ``docs/methods.md``; each docstring quotes its own and
names its source.  This layer is the reference the loss-head kernels are tested against, and their fallback.

=====================  ===================================================  ==========================================
function               method                                               source
=====================  ===================================================  ==========================================
``dpo_loss``           every TRL ``DPOTrainer`` ``loss_type``               TRL 1.16 ``trl/trainer/dpo_trainer.py``
``simpo_loss``         SimPO                                                TRL ``CPOTrainer`` (``simpo``)
``distill_loss``       e-DPO / reward distillation                          Fisch et al. 2024
``kto_loss``           KTO (binary feedback)                                TRL 1.16 ``trl/trainer/kto_trainer.py``
``nca_loss``           NCA / InfoNCA (scalar rewards, or pairs)             Chen et al. 2024
``pro_loss``           PRO-P / PRO-B / PRO-S                                seed 000 (section 2)
``dro_loss``           DRO                                                  seed 001 (section 3)
``typo_loss``          TYPO                                                 seed 002 (section 4)
``auxdpo_loss``        AuxDPO                                               seed 003 (section 5)
``drdo_loss``,         DRDO policy / oracle objectives                      seed 004 (section 6)
``drdo_oracle_loss``
=====================  ===================================================  ==========================================
"""

from ._ops import log1mexp, pro_f, safe_log1mexp
from .auxdpo import auxdpo_loss
from .dpo import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, distill_loss, dpo_loss, simpo_loss
from .drdo import drdo_loss, drdo_oracle_loss
from .dro import dro_loss
from .kto import KTO_LOSS_TYPES, kto_loss
from .nca import NCA_LOSS_TYPES, nca_loss
from .pro import PRO_FEEDBACK, PRO_HYPER_RESPONSE, pro_loss
from .typo import typo_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSS_TYPES",
    "NCA_LOSS_TYPES",
    "PRO_FEEDBACK",
    "PRO_HYPER_RESPONSE",
    "auxdpo_loss",
    "distill_loss",
    "dpo_loss",
    "drdo_loss",
    "drdo_oracle_loss",
    "dro_loss",
    "kto_loss",
    "log1mexp",
    "nca_loss",
    "pro_f",
    "pro_loss",
    "safe_log1mexp",
    "simpo_loss",
    "typo_loss",
]
