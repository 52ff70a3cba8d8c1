"""Row bookkeeping shared by the public API, the loss modules and the integrations.

Rows are the flattened token positions of a batch: padded ``[B, T]`` (sequence ``i`` owns rows ``iT .. iT+T-1``)
or packed ``[N]`` with ``cu_seqlens [S+1]`` (sequence ``i`` owns rows ``cu[i] .. cu[i+1]-1``).
"""

from __future__ import annotations

from typing import Optional

import torch


def row_sequences(num_rows: int, device, *, row_len: Optional[int] = None,
                  cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """``(sequence index of every row [N], S)`` for a padded (``row_len`` = T) or packed (``cu_seqlens``) batch."""
    pos = torch.arange(num_rows, device=device)
    if cu_seqlens is None:
        return pos // row_len, num_rows // row_len
    S = cu_seqlens.numel() - 1
    return torch.searchsorted(cu_seqlens[1:].long().contiguous(), pos, right=True).clamp(max=S - 1), S


def last_row_where(mask: torch.Tensor, sequences: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per sequence, the flat index of its last row where ``mask`` holds; -1 for a sequence with none."""
    pos = torch.arange(mask.numel(), device=mask.device)
    none = torch.full((num_sequences,), -1, dtype=torch.long, device=mask.device)
    return none.scatter_reduce(0, sequences, torch.where(mask.reshape(-1), pos, -1), reduce="amax")
