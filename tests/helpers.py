"""Random inputs for the fused-head tests: odd sizes, never zeros, logits of realistic spread."""

from __future__ import annotations

import torch

TOLERANCES = {  # (sequence log-probs, relative;  gradients, ||g - g_ref|| / ||g_ref||)
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-3, 1e-2),
    torch.float16: (1e-3, 1e-2),
}


def make_batch(B=3, T=37, D=48, V=301, *, dtype=torch.float32, device="cpu", seed=0, bias=False,
               prompt=True, logit_std=2.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * (logit_std / D**0.5)
    labels = torch.randint(0, V, (B, T), generator=g)
    if prompt:  # a prompt of random length, then the response, then padding
        seg = torch.zeros(B, T, dtype=torch.long)
        for i in range(B):
            p = int(torch.randint(1, T // 2, (1,), generator=g))
            e = int(torch.randint(p + 1, T + 1, (1,), generator=g))
            seg[i, :p], seg[i, p:e] = 1, 2
            labels[i, e:] = -100
    else:
        seg = None
    b = torch.randn(V, generator=g) if bias else None
    cast = lambda x: None if x is None else x.to(dtype=dtype, device=device)  # noqa: E731
    return cast(h), cast(w), labels.to(device), None if seg is None else seg.to(device), cast(b)


def leaf(x, requires_grad=True):
    return None if x is None else x.detach().clone().requires_grad_(requires_grad)


def float64_leaves(*xs):
    return [None if x is None else x.detach().double().requires_grad_() for x in xs]
