"""The fused head on the GPU: correctness at the Llama-3-8B head size, then timing against the anchors.

1. Correctness: ``fastpref.sequence_logprobs`` (bf16, 4 pairs x 2048 tokens, half prompt, D 4096, V 128256)
   against a float64 materialized-logits reference computed chunk by chunk from the same bf16 inputs:
   sequence log-probs (relative, bound 1e-3) and ``dH``, ``dW`` for random upstream weights
   (``||g - g_ref|| / ||g_ref||``, bound 1e-2); the same in fp32 at a smaller N (bounds 1e-6 / 1e-5); bias +
   softcap at the Gemma-2-2B head size; the frozen-head (no dW) path.
2. Timing, one process, the anchors' protocol (benchmarks/common.py): one DPO step of the head (policy
   forward + backward, reference forward) for fastpref (with its forward and backward timed apart), naive
   PyTorch, Liger's ``LigerFusedLinearDPOLoss``, Cut Cross-Entropy; one bf16 ``N x D x V`` matmul = 1 unit.
3. Memory against N: fastpref's peak extra memory for 1, 2, 4, 8 pairs.

    python -m benchmarks.head_check --out benchmarks/results/DATE-head      # on the GPU
    python -m benchmarks.head_check --smoke --out /tmp/head                 # tiny, CPU, what CI runs
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import fastpref
from fastpref.reference import token_logprobs_reference

from .common import (Timer, add_shape_args, bench, dpo_from_logps, dpo_step, guarded, make_inputs, markdown_table,
                     naive_logps, optional_import, resolve_device, versions, write_results)


# ----------------------------------------------------------------------------------------------- correctness
def float64_reference(H, W, lab, upstream, *, bias=None, softcap=None, chunk=512, need_dw=True):
    """Sequence log-probs and gradients of ``sum_i upstream_i * logp_i`` in float64, row chunk by row chunk."""
    W64 = W.detach().double().requires_grad_(need_dw)
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    B, T, D = H.shape
    logp = torch.zeros(B, dtype=torch.float64, device=H.device)
    dH = torch.zeros(B, T, D, dtype=torch.float64, device=H.device)
    for i in range(B):
        scored = torch.nonzero(lab[i] != -100).squeeze(1)
        for s in range(0, scored.numel(), chunk):
            idx = scored[s:s + chunk]
            h64 = H[i, idx].detach().double().requires_grad_()
            lp = token_logprobs_reference(h64, W64, lab[i, idx], b64, softcap=softcap).sum()
            (lp * upstream[i].double()).backward()
            logp[i] += lp.detach()
            dH[i, idx] = h64.grad
    return logp, dH, (W64.grad if need_dw else None), (None if b64 is None else b64.grad)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def check_case(name, H, W, lab, *, bias=None, softcap=None, freeze_head=False, backend="auto", tol=(1e-3, 1e-2)):
    g = torch.Generator(device="cpu").manual_seed(123)
    upstream = torch.randn(H.shape[0], generator=g).to(H.device)
    Hl = H.detach().clone().requires_grad_()
    Wl = W.detach().clone().requires_grad_(not freeze_head)
    bl = None if bias is None else bias.detach().clone().requires_grad_(not freeze_head)
    out = fastpref.sequence_logprobs(Hl, Wl, lab, bias=bl, softcap=softcap, backend=backend)
    (out.response * upstream).sum().backward()
    logp, dH, dW, db = float64_reference(H, W, lab, upstream, bias=bias, softcap=softcap, need_dw=not freeze_head)
    row = {
        "case": name, "dtype": str(H.dtype).replace("torch.", ""), "N": H.shape[0] * H.shape[1], "D": W.shape[1],
        "V": W.shape[0], "logp_max_rel_err": float(((out.response.detach().double() - logp).abs() / logp.abs()).max()),
        "dH_rel_err": rel(Hl.grad, dH),
        "dW_rel_err": None if freeze_head else rel(Wl.grad, dW),
        "db_rel_err": None if (bias is None or freeze_head) else rel(bl.grad, db),
        "frozen_head_dW_is_None": (Wl.grad is None) if freeze_head else None,
        "unwritten_or_nan": bool(torch.isnan(out.response).any() or torch.isnan(Hl.grad).any()),
    }
    grads = [row["dH_rel_err"]] + [row[k] for k in ("dW_rel_err", "db_rel_err") if row[k] is not None]
    row["pass"] = (row["logp_max_rel_err"] < tol[0] and max(grads) < tol[1] and not row["unwritten_or_nan"]
                   and row["frozen_head_dW_is_None"] in (None, True))
    print(json.dumps(row), flush=True)
    return row


def correctness(a, device):
    rows = []
    W, H, _, lab = make_inputs(a.pairs, a.T, a.D, a.V, a.prompt_frac, device, seed=1)
    rows.append(check_case("llama3-8b-head bf16", H, W, lab, backend=a.backend))
    rows.append(check_case("llama3-8b-head bf16, frozen head", H, W, lab, freeze_head=True, backend=a.backend))
    small_T = max(a.T // 4, 8)
    W, H, _, lab = make_inputs(1, small_T, a.D, a.V, a.prompt_frac, device, dtype=torch.float32, seed=2)
    rows.append(check_case("llama3-8b-head fp32", H, W, lab, backend=a.backend, tol=(1e-6, 1e-5)))
    gD, gV = (a.D, a.V) if a.smoke else (2304, 256000)
    W, H, _, lab = make_inputs(1, small_T, gD, gV, a.prompt_frac, device, seed=3)
    bias = (torch.randn(gV, device=device) * 0.5).to(W.dtype)
    rows.append(check_case("gemma2-2b-head bf16 bias+softcap30", H, W, lab, bias=bias, softcap=30.0, backend=a.backend))
    return rows


# ----------------------------------------------------------------------------------------------- timing
F64 = torch.float64  # the totals as fastpref's loss modules take them (no fp32 rounding of the four DPO totals)


def fastpref_step(backend):
    def step(W, H, Href, lab):
        dev = H.device
        with torch.no_grad():
            ref = fastpref.sequence_logprobs(Href, W, lab, backend=backend, validate=False, totals_dtype=F64).response
        with Timer(dev) as tf:
            pol = fastpref.sequence_logprobs(H, W, lab, backend=backend, validate=False, totals_dtype=F64).response
        loss = dpo_from_logps(pol, ref)
        with Timer(dev) as tb:
            loss.backward()
        return loss, {"policy_forward": tf.ms, "policy_backward": tb.ms}
    return step


def naive_step(W, H, Href, lab):
    with torch.no_grad():
        ref = naive_logps(Href, W, lab)
    loss = dpo_from_logps(naive_logps(H, W, lab), ref)
    loss.backward()
    return loss, {}


def liger_step(**liger_kwargs):
    """Liger's fused-linear DPO loss (extra constructor arguments, e.g. ``softcap``, where it takes them)."""
    mod = optional_import("liger_kernel.chunked_loss")
    if mod is None:
        return None
    fn = mod.LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=True, **liger_kwargs)

    def step(W, H, Href, lab):
        out = fn(W, H, lab, None, Href, W.detach(), None)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss, {}
    return step


def cce_step():
    mod = optional_import("cut_cross_entropy")
    if mod is None:
        return None

    def logps(H, W, lab):
        B, T, D = H.shape
        nll = mod.linear_cross_entropy(H.reshape(-1, D), W, lab.reshape(-1), reduction="none")
        return -nll.view(B, T).sum(-1)

    def step(W, H, Href, lab):
        with torch.no_grad():
            ref = logps(Href, W, lab)
        loss = dpo_from_logps(logps(H, W, lab), ref)
        loss.backward()
        return loss, {}
    return step


def trl_step(softcap=None):
    """TRL 1.16's own fused head (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``): the scored rows
    compacted as TRL does on CUDA, per-token log-probs summed per sequence."""
    mod = optional_import("trl.kernels.chunked_logprob")
    if mod is None:
        return None

    def logps(H, W, lab):
        m = lab != -100
        lp = mod.ChunkedLogProbFunction.apply(H[m], W, None, lab[m], 1.0, 32768, softcap, 1.0, ())[0]
        return torch.zeros(m.shape, dtype=lp.dtype, device=lp.device).masked_scatter(m, lp).sum(-1)

    return dpo_step(logps)


def torch_lce_step():
    """PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (chunked; torch >= 2.13), per-token losses."""
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if fn is None:
        return None
    options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None

    def logps(H, W, lab):
        B, T, D = H.shape
        kw = {"options": options} if options is not None else {}
        ce = fn(H.reshape(-1, D), W, lab.reshape(-1), reduction="none", ignore_index=-100, **kw)
        return -ce.view(B, T).float().sum(-1)

    return dpo_step(logps)


def matmul_step(W, H, Href, lab):
    with torch.no_grad():
        out = H.reshape(-1, H.shape[-1]) @ W.t()
    return out[0, 0].float(), {}


def timing(a, device):
    W, H, Href, lab = make_inputs(a.pairs, a.T, a.D, a.V, a.prompt_frac, device, peaked=a.peaked)
    W.requires_grad_(True)
    H.requires_grad_(True)
    impls = {"matmul": matmul_step, "fastpref": fastpref_step(a.backend), "naive": naive_step,
             "trl": trl_step(), "torch_lce": torch_lce_step()}
    if not a.smoke:
        impls["liger"], impls["cce"] = liger_step(), cce_step()
    rows = []
    for name, step in impls.items():
        if step is None:
            rows.append({"impl": name, "error": "package not installed"})
            continue
        r = guarded(name, lambda: bench(name, lambda: step(W, H, Href, lab), [W, H], device, a.iters,
                                        warmup=1 if a.smoke else 2), device)
        r.update(N=H.shape[0] * H.shape[1], D=a.D, V=a.V, prompt_frac=a.prompt_frac, peaked=a.peaked)
        rows.append(r)
        print(json.dumps(r), flush=True)
    unit = next((r["median_ms"] for r in rows if r["impl"] == "matmul" and "median_ms" in r), None)
    for r in rows:
        if unit and "median_ms" in r:
            r["units"] = r["median_ms"] / unit
    return rows


def memory_scaling(a, device):
    def one(pairs):
        W, H, Href, lab = make_inputs(pairs, a.T, a.D, a.V, a.prompt_frac, device)
        W.requires_grad_(True)
        H.requires_grad_(True)
        step = fastpref_step(a.backend)
        r = bench("fastpref", lambda: step(W, H, Href, lab), [W, H], device, min(a.iters, 3),
                  warmup=1 if a.smoke else 2)
        r.update(pairs=pairs, N=H.shape[0] * H.shape[1], scored_rows=int((lab != -100).sum()))
        print(json.dumps(r), flush=True)
        return r  # the inputs go out of scope here, before the next size is allocated

    return [one(pairs) for pairs in ([1, 2] if a.smoke else [1, 2, 4, 8])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--peaked", type=float, default=0.0)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: correctness,timing,memory")
    a = ap.parse_args(argv)
    device = resolve_device(a, "head_check")
    meta = versions()
    meta.update({k: v for k, v in vars(a).items() if k != "out"})
    print(json.dumps(meta), flush=True)
    skip = set(filter(None, a.skip.split(",")))
    checks = [] if "correctness" in skip else correctness(a, device)
    times = [] if "timing" in skip else timing(a, device)
    mem = [] if "memory" in skip else memory_scaling(a, device)
    table = f"# Fused head check ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']})\n\n"
    table += "## Correctness against float64\n\n" + markdown_table(checks, [
        ("case", "case", ""), ("dtype", "dtype", ""), ("N", "N", "d"), ("logp_max_rel_err", "logp rel err", ".2e"),
        ("dH_rel_err", "dH rel err", ".2e"), ("dW_rel_err", "dW rel err", ".2e"), ("db_rel_err", "db rel err", ".2e"),
        ("pass", "pass", "")])
    table += "\n## One DPO step of the head (policy fwd+bwd, reference fwd)\n\n" + markdown_table(times, [
        ("impl", "impl", ""), ("median_ms", "median ms", ".1f"), ("units", "units", ".2f"),
        ("policy_forward_ms", "policy fwd ms", ".1f"), ("policy_backward_ms", "policy bwd ms", ".1f"),
        ("peak_extra_gib", "peak extra GiB", ".3f"), ("loss", "loss", ".5f"), ("error", "error", "")])
    table += "\n## fastpref peak extra memory against tokens\n\n" + markdown_table(mem, [
        ("pairs", "pairs", "d"), ("N", "N", "d"), ("scored_rows", "scored rows", "d"),
        ("median_ms", "median ms", ".1f"), ("peak_extra_gib", "peak extra GiB", ".3f")])
    write_results(a.out, "head_check", meta, checks + times + mem, table)
    print(table)
    return 0 if all(r["pass"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
