"""``TYPOLoss``: the reference-free TYPO objective (seed 002, "New Desiderata for DPO")."""

from __future__ import annotations

from typing import Optional

import torch

from fastpref.losses.typo import typo_loss

from .base import FusedHeadLoss, split_pairs


class TYPOLoss(FusedHeadLoss):
    r"""TYPO (docs/methods.md section 4), one policy pass over pairs and reference samples::

        loss = mean_pairs softplus(logp_l - logp_w)  +  lam * mean_unsup(-logp_u)

    ``unsup [S]`` (bool) marks the extra rows that are responses sampled from the reference model; the other
    rows are pairs in TRL's layout (chosen rows, then rejected), in their order. With no row marked (or
    ``unsup=None``) the unsupervised term is omitted. ``lam = 0.05``: the seed's default. Reference samples (the
    seed: one per prompt, temperature 1, top_k 60, top_p 0.8, at most 256 new tokens, repetition penalty 1.1):
    :func:`fastpref.sampling.sample_reference_responses`.
    """

    def __init__(self, lam: float = 0.05, **head_kwargs):
        super().__init__(**head_kwargs)
        self.lam = lam
        one = torch.tensor([-3.0], dtype=torch.float64)
        self._check_settings(lambda: typo_loss(one, one - 1, one, lam=lam, backend="torch"))

    def forward(self, hidden, weight, labels, segment_ids=None, *, unsup: Optional[torch.Tensor] = None, bias=None,
                cu_seqlens=None):
        pol = self.logps(hidden, weight, labels, segment_ids, bias=bias, cu_seqlens=cu_seqlens)
        S = pol.response.shape[0]
        if unsup is None:
            unsup = torch.zeros(S, dtype=torch.bool, device=pol.response.device)
        if not isinstance(unsup, torch.Tensor) or unsup.dtype != torch.bool or unsup.shape != (S,):
            raise ValueError(f"`unsup` must be a bool tensor of shape ({S},), one flag per sequence")
        if unsup.device != pol.response.device:
            raise ValueError(f"`unsup` is on {unsup.device} but the batch is on {pol.response.device}")
        cw, cl = split_pairs(pol.response[~unsup], "hidden (rows not marked `unsup`)")
        return typo_loss(cw, cl, pol.response[unsup] if bool(unsup.any()) else None, lam=self.lam,
                         backend=self.backend)
