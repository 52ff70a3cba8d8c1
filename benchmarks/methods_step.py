"""Every loss module's full step at the Llama-3-8B head size: time and peak extra memory against DPO's.

A step is what the module does in training: policy forward + backward, reference forward (methods that have
one), plus the method's own extra passes (AuxDPO: the head null-space penalty, about 5 more units; DRO: the
prompt rows in both passes). Same input protocol and timing as ``head_check`` (``benchmarks/common.py``).
The expectation (issue 3): a method costs no more than the DPO step plus its own extra passes.

    python -m benchmarks.methods_step --out benchmarks/results/DATE-methods      # on the GPU
    python -m benchmarks.methods_step --smoke --out /tmp/methods                 # tiny, CPU, what CI runs
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import fastpref

from .common import (add_shape_args, bench, guarded, make_inputs, markdown_table, resolve_device, versions,
                     write_results)


def _segments(lab, prompt_frac):
    """Prompt (1) / response (2) segment ids for the anchors' labels (prompt rows carry label -100 there). The last
    row scores nothing, as in a real shifted batch (row t predicts token t + 1): DRDO's reward head reads the hidden
    row of each sequence's last response token, the row after the last scored one."""
    seg = torch.full_like(lab, 2)
    P = int(lab.shape[1] * prompt_frac)
    seg[:, :P] = 1
    seg[:, -1] = 0
    return seg


def method_steps(S: int, D: int, num_examples: int, backend: str, device):
    """name -> (module, extra forward kwargs); every module sees the same hidden states and head."""
    g = torch.Generator(device="cpu").manual_seed(5)
    half = S // 2
    rewards = torch.randn(S, generator=g).to(device)
    common = dict(backend=backend, validate=False)
    pairs_ref = {"needs_ref": True}
    return {
        "dpo": (fastpref.DPOLoss(**common), pairs_ref),
        "ipo": (fastpref.DPOLoss(loss_type="ipo", **common), pairs_ref),
        "simpo": (fastpref.SimPOLoss(**common), {}),
        "pro-pairwise": (fastpref.PROLoss(**common), pairs_ref),
        "pro-binary": (fastpref.PROLoss(feedback="binary", **common),
                       {"needs_ref": True, "labels_desirable": (torch.arange(S) % 2 == 0).to(device)}),
        "pro-scalar": (fastpref.PROLoss(feedback="scalar", **common),
                       {"needs_ref": True, "rewards": rewards, "group_ids": (torch.arange(S) // 2).to(device)}),
        "dro": (fastpref.DROLoss(beta=0.1, log_z0=0.0, **common),
                {"needs_ref": True, "prompt": True, "rewards": rewards, "group_ids": (torch.arange(S) // 2).to(device)}),
        # TYPO: the last two rows are reference samples, the others stay an even number of pair rows
        "typo": (fastpref.TYPOLoss(**common), {"unsup": (torch.arange(S) >= S - 2).to(device)}),
        "auxdpo": (fastpref.AuxDPOLoss(num_examples, **common).to(device),
                   {"needs_ref": True, "example_index": torch.arange(half, device=device)}),
        "drdo": (fastpref.DRDOLoss(hidden_size=D, **common).to(device),
                 {"oracle_rewards": rewards}),
    }


def run(a, device):
    W, H, Href, lab = make_inputs(a.pairs, a.T, a.D, a.V, a.prompt_frac, device)
    seg = _segments(lab, a.prompt_frac)
    labels = torch.where(lab == -100, torch.randint_like(lab, a.V), lab)  # prompt rows get real tokens (DRO)
    W.requires_grad_(True)
    H.requires_grad_(True)
    S = H.shape[0]
    rows = []
    for name, (mod, kw) in method_steps(S, a.D, S // 2, a.backend, device).items():
        if a.only and name not in a.only.split(","):
            continue
        kw = dict(kw)
        needs_ref, prompt = kw.pop("needs_ref", False), kw.pop("prompt", False)
        s = seg if prompt else torch.where(seg == 1, 0, seg)
        if needs_ref:
            kw.update(ref_hidden=Href, ref_weight=W)
        params = [W, H] + list(mod.parameters())

        def step(mod=mod, kw=kw, s=s):
            loss, _ = mod(H, W, labels, s, **kw)
            loss.backward()
            return loss, {}
        r = guarded(name, lambda: bench(name, step, params, device, a.iters), device)
        r.update(N=H.shape[0] * H.shape[1], D=a.D, V=a.V, prompt_frac=a.prompt_frac)
        rows.append(r)
        print(json.dumps(r), flush=True)
    dpo = next((r["median_ms"] for r in rows if r["impl"] == "dpo" and "median_ms" in r), None)
    for r in rows:
        if dpo and "median_ms" in r:
            r["vs_dpo"] = r["median_ms"] / dpo
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--only", default="", help="comma list of methods")
    a = ap.parse_args(argv)
    device = resolve_device(a, "methods_step")
    meta = versions()
    meta.update({k: v for k, v in vars(a).items() if k != "out"})
    rows = run(a, device)
    table = f"# Loss modules, one training step ({meta['device']}, torch {meta['torch']}, {meta['date']})\n\n"
    table += markdown_table(rows, [("impl", "method", ""), ("median_ms", "median ms", ".1f"), ("vs_dpo", "x DPO", ".2f"),
                                   ("peak_extra_gib", "peak extra GiB", ".3f"), ("loss", "loss", ".5f"),
                                   ("error", "error", "")])
    write_results(a.out, "methods_step", meta, rows, table)
    print(table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
