"""Shared pieces of the benchmark scripts: the anchors' input protocol, timing, memory, result files.

Inputs and timing follow ``shared/anchors/anchor_bench.py`` (the protocol the anchor numbers in DESIGN.md
were taken with): Gaussian logits of std ~2.5 (or 'peaked' ones), bf16, prompt rows labelled -100, two
warm-up steps, median of CUDA-event timings, peak memory above the allocation after warm-up.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def make_inputs(pairs, T, D, V, prompt_frac, device, *, dtype=torch.bfloat16, seed=0, peaked=0.0):
    """``W [V, D]``, policy ``H [2*pairs, T, D]``, reference ``Href``, labels with the prompt at -100."""
    g = torch.Generator(device=device).manual_seed(seed)
    B = 2 * pairs
    W = (torch.randn(V, D, device=device, generator=g) * 0.02).to(dtype)
    scale = 2.5 / (0.02 * D**0.5)
    labels = torch.randint(0, V, (B, T), device=device, generator=g)
    H = torch.randn(B, T, D, device=device, generator=g) * scale
    if peaked:
        Wl = W.float()[labels]
        H = H + peaked * Wl / Wl.pow(2).sum(-1, keepdim=True)
    H = H.to(dtype)
    Href = (H.float() + 0.1 * scale * torch.randn(B, T, D, device=device, generator=g)).to(dtype)
    lab = labels.clone()
    lab[:, : int(T * prompt_frac)] = -100
    return W, H, Href, lab


def dpo_from_logps(pol, ref, beta=0.1):
    c, r = pol.chunk(2)
    rc, rr = ref.chunk(2)
    return -F.logsigmoid(beta * ((c - rc) - (r - rr))).mean()


def naive_logps(H, W, lab, softcap=None):
    """TRL-style: materialize logits, log_softmax, gather, mask, sum (``softcap=c``: ``c * tanh(z / c)`` in fp32)."""
    logits = (H @ W.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits.div_(softcap))  # in place on the fp32 copy, which autograd does not save
    lp = torch.log_softmax(logits, -1)
    m = lab != -100
    tok = torch.gather(lp, -1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * m).sum(-1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """CUDA events on the GPU, perf_counter elsewhere; milliseconds."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        if self.device.type == "cuda":
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.s.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.e.record()
            torch.cuda.synchronize()
            self.ms = self.s.elapsed_time(self.e)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def bench(name: str, step: Callable, params: list, device, iters: int, warmup: int = 2) -> dict:
    """Median step time and peak extra memory (GiB above what is allocated after warm-up).

    ``step()`` runs one step and returns ``(loss, parts)`` where ``parts`` maps a phase name to its ms
    (measured inside the step, e.g. forward / backward); parts are reported as medians too.
    As ``shared/anchors/anchor_bench.py`` does, the base is read with the last warm-up's gradients still
    allocated, so the peak leaves out the ``.grad`` tensors themselves (which every implementation produces).
    """
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for _ in range(warmup):
        for p in params:
            p.grad = None
        step()
    _sync(device)
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, parts = [], {}
    loss = None
    for _ in range(iters):
        for p in params:
            p.grad = None
        with Timer(device) as t:
            loss, ph = step()
        times.append(t.ms)
        for k, v in ph.items():
            parts.setdefault(k, []).append(v)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    row = {"impl": name, "median_ms": med(times), "min_ms": min(times), "peak_extra_gib": peak, "loss": float(loss.detach())}
    row.update({f"{k}_ms": med(v) for k, v in parts.items()})
    return row


def dpo_step(logps: Callable, *, timed: bool = False) -> Callable:
    """A DPO step of the head from any ``logps(H, W, lab) -> [B]``: reference pass under ``no_grad``, policy
    pass, :func:`dpo_from_logps`, backward; ``step(W, H, Href, lab) -> (loss, parts)`` as :func:`bench`
    wants it. ``timed=True`` also times the policy forward and the backward apart (parts)."""
    def step(W, H, Href, lab):
        with torch.no_grad():
            ref = logps(Href, W, lab)
        if not timed:
            loss = dpo_from_logps(logps(H, W, lab), ref)
            loss.backward()
            return loss, {}
        with Timer(H.device) as tf:
            pol = logps(H, W, lab)
        loss = dpo_from_logps(pol, ref)
        with Timer(H.device) as tb:
            loss.backward()
        return loss, {"policy_forward": tf.ms, "policy_backward": tb.ms}
    return step


@torch.no_grad()
def float64_logps(H, W, lab, *, softcap=None, chunk_bytes: int = 2**30):
    """What :func:`naive_logps` computes, in float64 from the same (bf16) inputs, without an ``N x V`` buffer:
    the scored rows (label != -100) in chunks of at most ``chunk_bytes`` of float64 logits. No gradients.
    Returns ``(logp [B] float64, scored tokens)``."""
    from fastpref.reference import token_logprobs_reference

    B, T, D = H.shape
    h, y = H.detach().reshape(-1, D), lab.reshape(-1)
    idx = torch.nonzero(y != -100).squeeze(1)
    W64 = W.detach().double()
    rows = max(1, chunk_bytes // (8 * W.shape[0]))
    out = torch.zeros(B, dtype=torch.float64, device=H.device)
    for s in range(0, idx.numel(), rows):
        i = idx[s:s + rows]
        out.index_add_(0, i // T, token_logprobs_reference(h[i].double(), W64, y[i], softcap=softcap))
    return out, int(idx.numel())


def guarded(name: str, measure: Callable[[], dict], device) -> dict:
    """``measure()``'s row, or, when it raises (out of memory, a broken or missing anchor), an error row; the
    run goes on either way, with the allocator's cache released."""
    try:
        row = measure()
    except Exception as ex:  # noqa: BLE001 - recorded in the results, not hidden
        row = {"impl": name, "error": f"{type(ex).__name__}: {str(ex)[:300]}"}
    free_memory(device)
    return row


def free_memory(device) -> None:
    """Collect garbage and return cached blocks on CUDA (where memory is measured); nothing elsewhere."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for pkg in ("triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "fastpref"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return out


def write_results(out_dir: str, stem: str, meta: dict, rows: list[dict], table: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(table)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = ""
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (format(v, fmt) if isinstance(v, (int, float)) else str(v)))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def add_shape_args(ap) -> None:
    """The arguments both GPU scripts share: the anchors' shape (Llama-3-8B head, 4 pairs x 2048, half prompt)."""
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--D", type=int, default=4096)
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--prompt-frac", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is (CI)")
    ap.add_argument("--out", required=True, help="output folder (JSON + markdown)")


def resolve_device(a, script: str) -> torch.device:
    """CUDA if there is one; ``--smoke`` shrinks the shapes (CPU CI), otherwise a CPU is refused."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        a.pairs, a.T, a.D, a.V, a.iters = 2, 24, 40, 301, min(a.iters, 2)
    elif device.type != "cuda":
        raise SystemExit(f"{script}: no CUDA device; run with --smoke on a CPU")
    return device


def optional_import(name: str) -> Optional[object]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
