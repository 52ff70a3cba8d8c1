"""The work of one DPO step of the fused head, counted on the CPU in seconds at real shapes (no GPU, no timing).

``python -m benchmarks.cost [--out DIR]`` runs fastpref's real code path (the triton backend's drivers, the autograd
function, the segment sums, a DPO loss, ``loss.backward()``) on ``meta`` tensors, so nothing is computed and
nothing is allocated, and counts what a GPU would be asked to do:

- **units**: matrix work in units of one ``N x D x V`` matmul of the whole batch (``N`` = every token, prompt
  included; DESIGN.md: 23.7 ms on an H100 at the Llama-3-8B head). Library GEMMs are counted exactly from their
  shapes (``mm``/``addmm``/``bmm``); Triton launches report the FLOPs their grids issue (whole tiles, padding
  included). Per phase: reference forward, policy forward, backward.
- **elementwise bytes**: bytes read and written by every other torch op (gathers, casts, scaling, sums) and the
  compulsory traffic of the Triton kernels.
- **launches**: Triton launches plus torch ops that launch a kernel (views and allocations do not).
- **atomics**: atomic adds (Triton kernels declare theirs; torch ``index_add``/``scatter_add``/``bincount``/
  ``index_put(accumulate=True)`` count one per source element). The head's backward must issue none.
- **peak extra memory**: the largest live set of tensors created during the step, minus the gradients it leaves
  behind (the anchors' accounting: ``shared/anchors/anchor_bench.py`` reads its base with the previous step's
  gradients allocated).

Cases (DESIGN.md): the Llama-3-8B head (D 4096, V 128256, 4 pairs x 2048 tokens) at half prompt, no prompt,
frozen head (LoRA); Qwen2.5-7B; Gemma-2-2B (softcap 30); one pair of 32k-token sequences. ``naive`` rows count
TRL-style materialized logits on the same inputs, for scale. Writes ``cost.json`` and ``cost.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class CostCase:
    name: str
    D: int
    V: int
    pairs: int
    T: int
    prompt_frac: float = 0.5
    frozen: bool = False
    softcap: Optional[float] = None


CASES = (
    CostCase("llama3-8b", 4096, 128256, 4, 2048),
    CostCase("llama3-8b no prompt", 4096, 128256, 4, 2048, prompt_frac=0.0),
    CostCase("llama3-8b frozen head", 4096, 128256, 4, 2048, frozen=True),
    CostCase("qwen2.5-7b", 3584, 152064, 4, 2048),
    CostCase("gemma2-2b", 2304, 256000, 4, 2048, softcap=30.0),
    CostCase("32k pair", 4096, 128256, 1, 32768),
)
SMOKE = (CostCase("smoke", 40, 301, 2, 24), CostCase("smoke frozen", 40, 301, 2, 24, frozen=True))

# DESIGN.md / issue 8 targets at the 8B head, in units of its whole batch (4 pairs x 2048 tokens)
TARGETS = {"units_full_half_prompt": 2.6, "units_frozen_half_prompt": 1.6, "extra_mib": 64.0}

_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "_scaled_mm"}
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_to_copy_noop"}


def _atomic_adds(name: str, args, kwargs) -> int:
    """Atomic adds a torch op issues on CUDA: one per accumulated source element."""
    def numel(i):
        x = args[i] if len(args) > i else None
        return x.numel() if isinstance(x, torch.Tensor) else 0

    if name in ("index_add", "index_add_", "scatter_add", "scatter_add_", "index_reduce", "index_reduce_"):
        return numel(3) if "src" not in kwargs and "source" not in kwargs else next(
            v.numel() for k, v in kwargs.items() if k in ("src", "source"))
    if name == "bincount":
        return numel(0)
    if name in ("index_put", "index_put_", "_index_put_impl_") and (kwargs.get("accumulate") or
                                                                       (len(args) > 3 and args[3] is True)):
        return numel(2)
    if name == "put_" and (kwargs.get("accumulate") or (len(args) > 3 and args[3] is True)):
        return numel(2)
    return 0


class StepCounter(TorchDispatchMode):
    """Counts FLOPs, bytes, launches and atomics of torch ops, and the live bytes of tensors created inside."""

    def __init__(self):
        super().__init__()
        self.phase = "setup"
        self.per_phase: dict[str, dict[str, float]] = {}
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def _bucket(self):
        return self.per_phase.setdefault(self.phase, {"gemm_flops": 0.0, "triton_flops": 0.0, "bytes": 0.0,
                                                      "launches": 0, "atomics": 0.0})

    def live_bytes(self) -> int:
        dead = [k for k, (ref, _) in self._storages.items() if ref.expired()]
        for k in dead:
            del self._storages[k]
        return sum(n for _, n in self._storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        bucket = self._bucket()
        tensors_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        is_view = any(getattr(r, "alias_info", None) is not None and not r.alias_info.is_write
                      for r in func._schema.returns)
        if name in _GEMMS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            bucket["gemm_flops"] += 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        elif not is_view and name not in _NO_KERNEL:
            bucket["bytes"] += sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
        if not is_view and name not in _NO_KERNEL and name not in ("zeros_like",) and tensors_out:
            bucket["launches"] += 1
        bucket["atomics"] += _atomic_adds(name, args, kwargs)
        for t in tensors_out:
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self._storages and not any(x.untyped_storage()._cdata == key for x in tensors_in):
                self._storages[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.live_bytes())
        return out


def _meta_inputs(case: CostCase, *, requires_grad_head: bool, dtype=torch.bfloat16):
    B, T, D, V = 2 * case.pairs, case.T, case.D, case.V
    W = torch.empty(V, D, dtype=dtype, device="meta", requires_grad=requires_grad_head)
    H = torch.empty(B, T, D, dtype=dtype, device="meta", requires_grad=True)
    Href = torch.empty(B, T, D, dtype=dtype, device="meta")
    P = int(T * case.prompt_frac)
    M = B * (T - P)  # scored (response) rows
    rows = torch.empty(M, dtype=torch.long, device="meta")
    labels = torch.empty(M, dtype=torch.long, device="meta")
    slot = torch.empty(M, dtype=torch.long, device="meta")
    return W, H, Href, rows, labels, slot, M


def _dpo(pol, ref, beta=0.1):
    c, r = pol.chunk(2)
    rc, rr = ref.chunk(2)
    return -torch.nn.functional.logsigmoid(beta * ((c - rc) - (r - rr))).mean()


def _segment_sums(lp, slot, S):
    """The totals as ``fastpref.sequence_logprobs`` forms them (float64 accumulation over every row, fp32 out)."""
    from fastpref.logprobs import _segment_sums as sums

    return sums(lp, slot, S, torch.float32)[0]


def fastpref_step(case: CostCase, counter: StepCounter):
    """One DPO step through the fused-head op's own internals (``_autograd.forward_rows``, the backend's
    backward, ``_frozen_backward``), called with the scored rows known: on meta tensors the op itself would run its
    fake (shape-only) implementation and count nothing."""
    from fastpref._autograd import _frozen_backward, forward_rows
    from fastpref.backends import triton_fused
    from fastpref.backends._stats import RowStats
    from fastpref.kernels.config import LaunchRecorder

    W, H, Href, rows, labels, slot, M = _meta_inputs(case, requires_grad_head=not case.frozen)
    S, D = 2 * case.pairs, case.D
    H2, Href2 = H.detach().reshape(-1, D), Href.reshape(-1, D)
    N = H2.shape[0]
    options = {"logit_scale": 1.0, "softcap": case.softcap}
    recorder = LaunchRecorder()
    seen = 0

    def flush():
        nonlocal seen
        bucket = counter._bucket()
        for r in recorder.records[seen:]:
            bucket["triton_flops"] += r.flops
            bucket["bytes"] += r.bytes
            bucket["launches"] += 1
            bucket["atomics"] += r.atomics
        seen = len(recorder.records)

    grads = []
    with counter, recorder, torch.no_grad():
        counter.phase = "reference forward"
        ref_lp = forward_rows(triton_fused, Href2, W.detach(), None, rows, labels, frozen=False, stats=False,
                              **options)[0]
        ref = _segment_sums(ref_lp, torch.empty(N, dtype=torch.long, device="meta"), S)
        flush()
        counter.phase = "policy forward"
        lp, row_max, row_logsum, mean_shift, *_, unit, flagged = forward_rows(
            triton_fused, H2, W.detach(), None, rows, labels, frozen=case.frozen, stats=False, **options)
        pol = _segment_sums(lp, torch.empty(N, dtype=torch.long, device="meta"), S)
        _dpo(pol, ref)
        flush()
        counter.phase = "backward"
        grad = torch.empty(N, dtype=lp.dtype, device="meta")  # d loss / d lp: the segment sums' backward
        if case.frozen:
            grads.append(_frozen_backward(unit, flagged, H2, W, None, labels, None, -100, row_max, row_logsum,
                                          mean_shift, lp, grad, None, 1.0, case.softcap, "triton", inplace=True))
        else:
            take = lambda x: x.index_select(0, rows)  # noqa: E731 - the active rows (all, at the default weights)
            grads += triton_fused.backward(H2, W.detach(), None, rows, labels, RowStats(take(row_max),
                                           take(row_logsum)), take(lp), take(grad), compute_dh=True,
                                           compute_dw=True, compute_db=False, **options)[:2]
        flush()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
    return grad_bytes, [r.kernel for r in recorder.records]


def naive_step(case: CostCase, counter: StepCounter):
    """TRL-style: materialized logits (bf16 GEMM, fp32 log-softmax) over every row, prompt included."""
    W, H, Href, *_ = _meta_inputs(case, requires_grad_head=not case.frozen)
    lab = torch.empty(H.shape[:2], dtype=torch.long, device="meta")

    def logps(h):
        z = (h @ W.t()).float()
        if case.softcap is not None:
            z = case.softcap * torch.tanh(z / case.softcap)
        lp = torch.log_softmax(z, -1)
        return torch.gather(lp, -1, lab[..., None]).squeeze(-1).sum(-1)

    with counter:
        counter.phase = "reference forward"
        with torch.no_grad():
            ref = logps(Href)
        counter.phase = "policy forward"
        loss = _dpo(logps(H), ref)
        counter.phase = "backward"
        loss.backward()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (H, W) if t.grad is not None)
    return grads, []


def count(case: CostCase, impl: str = "fastpref") -> dict:
    counter = StepCounter()
    t0 = time.perf_counter()
    grads, kernels = (fastpref_step if impl == "fastpref" else naive_step)(case, counter)
    N = 2 * case.pairs * case.T
    unit = 2.0 * N * case.D * case.V
    phases = {}
    for phase, b in counter.per_phase.items():
        if phase == "setup":
            continue
        phases[phase] = {"units": (b["gemm_flops"] + b["triton_flops"]) / unit,
                         "gemm_units": b["gemm_flops"] / unit, "triton_units": b["triton_flops"] / unit,
                         "elementwise_gib": b["bytes"] / 2**30, "launches": int(b["launches"]),
                         "atomics": int(b["atomics"])}
    total = lambda k: sum(p[k] for p in phases.values())  # noqa: E731
    return {
        "case": case.name, "impl": impl, "D": case.D, "V": case.V, "pairs": case.pairs, "T": case.T,
        "prompt_frac": case.prompt_frac, "frozen_head": case.frozen, "softcap": case.softcap,
        "scored_rows": int(2 * case.pairs * (case.T - int(case.T * case.prompt_frac))),
        "units": total("units"), "elementwise_gib": total("elementwise_gib"), "launches": total("launches"),
        "atomics": total("atomics"), "backward_atomics": phases.get("backward", {}).get("atomics", 0),
        "peak_extra_mib": (counter.peak - grads) / MIB, "phases": phases,
        "triton_kernels": sorted(set(kernels)), "count_seconds": round(time.perf_counter() - t0, 2),
    }


def markdown(rows: list[dict]) -> str:
    head = ("| case | impl | scored rows | units (ref fwd / fwd / bwd) | elementwise GiB | launches | atomics "
            "(bwd) | peak extra MiB |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        p = r["phases"]
        split = " / ".join(f"{p.get(k, {}).get('units', 0.0):.2f}" for k in ("reference forward", "policy forward",
                                                                              "backward"))
        lines.append(f"| {r['case']} | {r['impl']} | {r['scored_rows']} | **{r['units']:.2f}** ({split}) | "
                     f"{r['elementwise_gib']:.2f} | {r['launches']} | {r['atomics']} ({r['backward_atomics']}) | "
                     f"{r['peak_extra_mib']:.1f} |")
    return head + "\n".join(lines) + "\n"


def check_targets(rows: list[dict]) -> list[str]:
    """Issue 8's targets at the Llama-3-8B head; returns the failures (empty when every target holds)."""
    by = {(r["case"], r["impl"]): r for r in rows}
    fails = []
    full, frozen = by.get(("llama3-8b", "fastpref")), by.get(("llama3-8b frozen head", "fastpref"))
    if full and full["units"] > TARGETS["units_full_half_prompt"]:
        fails.append(f"full head, half prompt: {full['units']:.3f} units > {TARGETS['units_full_half_prompt']}")
    if frozen and frozen["units"] > TARGETS["units_frozen_half_prompt"]:
        fails.append(f"frozen head: {frozen['units']:.3f} units > {TARGETS['units_frozen_half_prompt']}")
    for r in rows:
        if r["impl"] != "fastpref":
            continue
        if r["backward_atomics"]:
            fails.append(f"{r['case']}: {r['backward_atomics']} atomics in the backward")
        if r["peak_extra_mib"] >= TARGETS["extra_mib"]:
            fails.append(f"{r['case']}: peak extra {r['peak_extra_mib']:.1f} MiB >= {TARGETS['extra_mib']}")
    return fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for cost.json and cost.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (what CI runs besides the real ones)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive rows")
    a = ap.parse_args(argv)
    rows = []
    for case in SMOKE if a.smoke else CASES:
        rows.append(count(case))
        if not a.no_naive:
            rows.append(count(case, "naive"))
    md = markdown(rows)
    print(md)
    fails = [] if a.smoke else check_targets(rows)
    for f in fails:
        print("TARGET MISSED:", f)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "cost.json"), "w") as f:
            json.dump({"rows": rows, "targets": TARGETS, "missed": fails}, f, indent=1)
        with open(os.path.join(a.out, "cost.md"), "w") as f:
            f.write(md)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
