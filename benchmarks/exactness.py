"""DESIGN.md's exactness case on the CPU: one DPO loss from fp32 inputs, against float64.

    python -m benchmarks.exactness --out benchmarks/results/DATE-exactness      # ~30 s on 2 cores
    python -m benchmarks.exactness --smoke --out /tmp/exactness                  # tiny, what CI runs

The case (DESIGN.md, "Exactness"; issue 8): fp32, D 1024, V 32000, 2 pairs x 1024 tokens, half prompt, Gaussian
logits of std ~2.5, the reference's hidden states a 10% perturbation of the policy's, beta 0.1. Inputs are drawn
from ``torch.manual_seed(seed)`` (seed 0 by default). Rows:

- ``float64``: naive PyTorch in float64 (materialized logits, ``log_softmax``): the reference;
- ``naive fp32``: the same in fp32, as TRL computes it (and Liger / ``linear_cross_entropy``, which the issue
  measured at the same error);
- ``fastpref fp32 totals``: ``sequence_logprobs`` with its default fp32 per-sequence results;
- ``fastpref float64 totals``: ``totals_dtype=torch.float64``, what the loss modules use.

Each row gives the loss and its absolute error against float64. Backend: torch (the CPU), or ``--backend triton``
on CUDA.
"""

from __future__ import annotations

import argparse

import torch

import fastpref

from .common import dpo_from_logps, markdown_table, versions, write_results


def make_case(seed: int, D: int, V: int, pairs: int, T: int):
    torch.manual_seed(seed)
    B = 2 * pairs
    W = torch.randn(V, D) * 0.02
    scale = 2.5 / (0.02 * D**0.5)
    H = torch.randn(B, T, D) * scale
    Href = H + 0.1 * scale * torch.randn(B, T, D)
    labels = torch.randint(0, V, (B, T))
    labels[:, : T // 2] = -100
    return W, H, Href, labels


def naive(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed log-probs from materialized logits, one sequence at a time (in ``H``'s dtype)."""
    out = []
    for h, y in zip(H, labels):
        lp = torch.log_softmax(h @ W.t(), -1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1)
        out.append((lp * (y != -100)).sum())
    return torch.stack(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="torch", choices=("torch", "triton"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CI)")
    a = ap.parse_args(argv)
    D, V, pairs, T = (48, 301, 2, 24) if a.smoke else (1024, 32000, 2, 1024)
    device = torch.device("cuda" if a.backend == "triton" and torch.cuda.is_available() else "cpu")
    W, H, Href, labels = make_case(a.seed, D, V, pairs, T)
    with torch.no_grad():
        exact = float(dpo_from_logps(naive(H.double(), W.double(), labels), naive(Href.double(), W.double(), labels)))
        losses = {"float64": exact, "naive fp32": float(dpo_from_logps(naive(H, W, labels), naive(Href, W, labels)))}
        W, H, Href, labels = (x.to(device) for x in (W, H, Href, labels))
        for name, totals in (("fastpref fp32 totals", None), ("fastpref float64 totals", torch.float64)):
            pol, ref = (fastpref.sequence_logprobs(x, W, labels, backend=a.backend, totals_dtype=totals).response
                        for x in (H, Href))
            losses[name] = float(dpo_from_logps(pol, ref))
    rows = [{"impl": name, "loss": loss, "abs_err": abs(loss - exact)} for name, loss in losses.items()]
    meta = versions()
    meta.update(seed=a.seed, D=D, V=V, pairs=pairs, T=T, prompt_frac=0.5, beta=0.1, backend=a.backend)
    table = (f"# DPO loss against float64 ({meta['device']}, torch {meta['torch']}, {meta['date']})\n\n"
             f"fp32 inputs, D {D}, V {V}, {pairs} pairs x {T} tokens, half prompt, seed {a.seed}, "
             f"backend {a.backend}.\n\n")
    table += markdown_table(rows, [("impl", "computation", ""), ("loss", "loss", ".10f"),
                                   ("abs_err", "error vs float64", ".2e")])
    write_results(a.out, "exactness", meta, rows, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
