"""Triton device code and thin launchers for fastpref (installed as ``fastpref.kernels``).

No autograd lives here: ``fastpref`` wraps these launchers in ``torch.autograd.Function``s.

- ``logits_tile``: device helpers shared by every kernel that rebuilds a tile of logits.
- ``linear_logprob_forward``: online log-sum-exp + target logit per scored row (split vocabulary).
- ``linear_logprob_backward``: ``dH``, ``dW``, ``db`` from one gradient weight per scored row.
- ``head_null_penalty``: AuxDPO's second pass, ``G[y_t].h_t - p_t . (G h_t)`` per row (no ``N x V`` buffer).
- ``config``: block sizes, interpreter detection, output-buffer allocation (poisoned in tests).
"""
