"""Triton device code and thin launchers for fastpref (installed as ``fastpref.kernels``).

No autograd and no chunk loops live here: ``fastpref.backends.triton_fused`` drives these launchers (and the
library GEMMs between them), ``fastpref`` wraps the drivers in ``torch.autograd.Function``s. No kernel uses an
atomic: every output element is written by one program.

- ``logits_tile``: device helpers shared by every kernel that rebuilds a tile of logits.
- ``target_logit``: the label's logit per scored row, by an indexed dot.
- ``vocab_logsumexp``: forward, online log-sum-exp statistics per row over vocabulary splits (label excluded).
- ``logits_grad``: backward, the ``(onehot - p)`` tile of one (row chunk, vocabulary chunk) for the GEMMs.
- ``softmax_numerator``: frozen-head forward, the softmax numerator tile for ``u = sum_v p_v W_v``.
- ``matmul_accumulate``: ``C += alpha A B`` into fp32 ``C`` (the fallback where torch has no fp32-output GEMM).
- ``head_null_penalty``: AuxDPO's second pass, ``G[y_t].h_t - p_t . (G h_t)`` per row (no ``N x V`` buffer).
- ``loss_pairwise``, ``loss_grouped``, ``scalar_math``: the loss heads' elementwise kernels.
- ``config``: tiles, split planning, chunk sizes, the launch (device guard, work recorder), poisoned buffers.
"""
