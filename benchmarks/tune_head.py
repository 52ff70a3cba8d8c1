"""Time every tile candidate of the fused head's kernels on this GPU (``kernels/config.py``'s lists).

``python -m benchmarks.tune_head --out DIR`` times, at the Llama-3-8B head (D 4096, V 128256, M = 8,192 scored
rows, bf16), the forward statistics kernel (``vocab_logsumexp``) for each ``FORWARD_CANDIDATES`` entry and the
backward's logits-gradient tile (``logits_grad``, one 2,048 x 2,048 chunk) for each ``GRAD_TILE_CANDIDATES`` entry,
and one bf16 matmul of the same shape for scale (``fraction_of_matmul``: matmul time x work / kernel time).
Writes ``tune_head.json`` and ``tune_head.md``; the first entry of each list is the default, so a better candidate
measured here is moved to the front in a later commit. ``--smoke`` runs tiny shapes (the CPU interpreter in CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from fastpref.kernels import config
from fastpref.kernels.logits_grad import logits_grad_tile
from fastpref.kernels.vocab_logsumexp import vocab_logsumexp

from .common import Timer, versions


def _median_ms(fn, device, iters):
    fn()
    times = []
    for _ in range(iters):
        with Timer(device) as t:
            fn()
        times.append(t.ms)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    D, V, M, chunk = (40, 301, 64, 32) if a.smoke else (4096, 128256, 8192, 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(M, D, device=device, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(V, D, device=device, generator=g) * D**-0.5).to(dtype)
    rows = torch.arange(M, device=device)
    labels = torch.randint(0, V, (M,), device=device, generator=g)
    kind = "fp32" if dtype == torch.float32 else "low_precision"
    smoke_tile = [config.forward_config(dtype)] if a.smoke else None
    rows_out = []

    mm_ms = _median_ms(lambda: hidden @ weight.t()[:, :chunk], device, a.iters) if a.smoke else \
        _median_ms(lambda: hidden @ weight.t(), device, a.iters)
    gen = config.generation(device)
    forward_tiles = config.AMPERE_CANDIDATES["forward"][kind] if gen == "ampere" else config.FORWARD_CANDIDATES[kind]
    grad_tiles = config.AMPERE_CANDIDATES["grad"][kind] if gen == "ampere" else config.GRAD_TILE_CANDIDATES[kind]
    for tile in smoke_tile or forward_tiles:
        ms = _median_ms(lambda: vocab_logsumexp(hidden, weight, None, rows, labels, tile=tile), device, a.iters)
        rows_out.append({"kernel": "vocab_logsumexp", **dataclasses.asdict(tile), "median_ms": ms,
                         "fraction_of_matmul": mm_ms / ms})
    stats = torch.zeros(M, device=device), torch.zeros(M, device=device), torch.full((M,), -1.0, device=device)
    chunk_mm = _median_ms(lambda: hidden[:chunk] @ weight[:chunk].t(), device, a.iters)
    for tile in smoke_tile or grad_tiles:
        ms = _median_ms(lambda: logits_grad_tile(hidden, weight, None, rows[:chunk], labels[:chunk],
                                                 stats[0][:chunk], stats[1][:chunk], stats[2][:chunk], 0, chunk,
                                                 tile=tile), device, a.iters)
        rows_out.append({"kernel": "logits_grad", **dataclasses.asdict(tile), "median_ms": ms,
                         "fraction_of_matmul": chunk_mm / ms})
    md = "| kernel | tile | warps | stages | group | ms | fraction of cuBLAS |\n|---|---|---|---|---|---|---|\n"
    md += "\n".join(f"| {r['kernel']} | {r['block_m']}x{r['block_v']}x{r['block_d']} | {r['num_warps']} | "
                    f"{r['num_stages']} | {r['group_m']} | {r['median_ms']:.3f} | {r['fraction_of_matmul']:.2f} |"
                    for r in rows_out) + "\n"
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "tune_head.json"), "w") as f:
            json.dump({"versions": versions(), "device": str(device), "rows": rows_out,
                       "matmul_ms": mm_ms}, f, indent=1)
        with open(os.path.join(a.out, "tune_head.md"), "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
