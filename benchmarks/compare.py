"""fastpref against naive PyTorch, Liger and Cut Cross-Entropy, side by side in one process.

One DPO step of the LM head (policy forward + backward, reference forward, bf16), the anchors' protocol
(``shared/anchors/anchor_bench.py``; ``benchmarks/common.py``): same input generator, two warm-up steps, the
median of CUDA-event timings over ``--iters`` warm steps, peak memory above what is allocated after warm-up
(the last warm-up's gradients included in that base, as the anchors count it). Per shape one bf16 ``N x D x V``
matmul is timed too: ``units`` = a row's median / that matmul's median.

Cases (``--cases``): ``llama3-8b`` (D 4096, V 128256, 4 pairs x 2048 tokens), ``qwen2.5-7b`` (D 3584,
V 152064), ``gemma2-2b`` (D 2304, V 256000, final-logit softcap 30), ``long`` (the Llama-3-8B head, one pair
of 32,768-token sequences). Each case runs for prompt fractions (``--prompt-fracs``), modes (``--modes``:
``full`` fine-tuning, ``frozen`` head as with LoRA: ``W.requires_grad = False``) and data (``--data``:
``gaussian`` logits, or ``peaked`` ones where most softmax mass sits on the label, ``make_inputs(peaked=17)``).
Without those flags the Llama-3-8B head gets the whole prompt x mode x data cross and the other cases prompt
0.5 / full / gaussian. ``--sweep`` adds the Llama-3-8B head at 1, 2, 4, 8 pairs (tokens on the plots' x axis).

Every row holds the median ms, units, peak extra GiB, the loss and its relative error against a float64
reference computed chunk by chunk from the same inputs (no ``N x V`` buffer). An out-of-memory error, a missing
package or an unsupported option (Liger has no softcap) is recorded as a row and the run goes on. Exit status 1
only when a fastpref row failed. Results are written after every configuration (``compare.json``,
``compare.md``), plots at the end (``compare_time.png`` and ``compare_memory.png`` from the sweep,
``compare_units.png`` from the matrix) when matplotlib is installed.

    python -m benchmarks.compare --out benchmarks/results/DATE-compare              # on the GPU
    python -m benchmarks.compare --sweep --cases none --out benchmarks/results/DATE-sweep
    python -m benchmarks.compare --smoke --sweep --out /tmp/cmp                     # tiny, CPU, what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from typing import Optional

import torch

import fastpref

from . import head_check
from .common import (bench, dpo_from_logps, dpo_step, float64_logps, free_memory, make_inputs, markdown_table,
                     naive_logps, optional_import, versions, write_results)

PEAKED = 17.0
IMPLS = ("fastpref", "naive", "liger", "cce", "trl", "torch_lce")
COLORS = {"matmul": "0.45", "fastpref": "C0", "naive": "C1", "liger": "C2", "cce": "C3", "trl": "C4",
          "torch_lce": "C5"}
ANCHORS = ("liger", "cce", "trl", "torch_lce")  # optional packages: their failures never fail the run


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    D: int
    V: int
    pairs: int
    T: int
    softcap: Optional[float] = None
    full_cross: bool = False  # the default selection: every prompt fraction x mode x data, else the first of each


CASES = {
    "llama3-8b": Case("llama3-8b", 4096, 128256, 4, 2048, full_cross=True),
    "qwen2.5-7b": Case("qwen2.5-7b", 3584, 152064, 4, 2048),
    "gemma2-2b": Case("gemma2-2b", 2304, 256000, 4, 2048, softcap=30.0),
    "long": Case("long", 4096, 128256, 1, 32768),
}
SMOKE = {  # tiny stand-ins with the same structure (odd sizes), for the CPU
    "llama3-8b": dict(D=40, V=301, pairs=2, T=24),
    "qwen2.5-7b": dict(D=36, V=347, pairs=2, T=24),
    "gemma2-2b": dict(D=24, V=517, pairs=2, T=24),
    "long": dict(D=40, V=301, pairs=1, T=160),
}
DEFAULT_SELECTION = {"prompt_fracs": (0.5,), "modes": ("full",), "data": ("gaussian",)}
FULL_SELECTION = {"prompt_fracs": (0.0, 0.5), "modes": ("full", "frozen"), "data": ("gaussian", "peaked")}


# ----------------------------------------------------------------------------------------------- steps
class Skip(Exception):
    """A row that is not run: ``status`` is 'missing' (package not installed) or 'unsupported'."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _cce_logps(mod, softcap):
    def logps(H, W, lab):
        B, T, D = H.shape
        nll = mod.linear_cross_entropy(H.reshape(-1, D), W, lab.reshape(-1), reduction="none", softcap=softcap)
        return -nll.view(B, T).sum(-1)
    return logps


def make_step(impl: str, softcap: Optional[float], backend: str, device):
    """The step of one implementation: ``head_check``'s steps where they apply, their softcap variants
    (built on ``common.dpo_step``) for the Gemma-2 head. Raises :class:`Skip` for rows that cannot run."""
    if impl == "matmul":
        return head_check.matmul_step
    if impl == "fastpref":
        if softcap is None:
            return head_check.fastpref_step(backend)
        return dpo_step(lambda H, W, lab: fastpref.sequence_logprobs(
            H, W, lab, softcap=softcap, backend=backend, validate=False, totals_dtype=torch.float64).response,
            timed=True)
    if impl == "naive":
        return head_check.naive_step if softcap is None else dpo_step(lambda H, W, lab: naive_logps(H, W, lab, softcap))
    if impl == "trl":
        step = head_check.trl_step(softcap)
        if step is None:
            raise Skip("missing", "package not installed: trl (trl.kernels.chunked_logprob, TRL >= 1.16)")
        return step
    if impl == "torch_lce":
        if softcap is not None:
            raise Skip("unsupported", "softcap unsupported: torch.nn.functional.linear_cross_entropy takes none")
        step = head_check.torch_lce_step()
        if step is None:
            raise Skip("missing", f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        return step
    if impl in ANCHORS:
        package = {"liger": "liger_kernel.chunked_loss", "cce": "cut_cross_entropy"}[impl]
        mod = optional_import(package)
        if mod is None:
            raise Skip("missing", f"package not installed: {package}")
        if device.type != "cuda":
            raise Skip("unsupported", f"{impl} runs on CUDA only here (device {device.type})")
        if impl == "liger":
            if softcap is not None:
                if "softcap" not in inspect.signature(mod.LigerFusedLinearDPOLoss).parameters:
                    raise Skip("unsupported", "softcap unsupported: LigerFusedLinearDPOLoss takes no softcap")
                return head_check.liger_step(softcap=softcap)
            return head_check.liger_step()
        if softcap is None:
            return head_check.cce_step()
        if "softcap" not in inspect.signature(mod.linear_cross_entropy).parameters:
            raise Skip("unsupported", "softcap unsupported: linear_cross_entropy takes no softcap")
        return dpo_step(_cce_logps(mod, softcap))
    raise ValueError(f"unknown implementation {impl!r}; choose from matmul,{','.join(IMPLS)}")


def _error_status(ex: BaseException) -> str:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return "oom" if (oom is not None and isinstance(ex, oom)) or "out of memory" in str(ex).lower() else "error"


def run_one(impl, case, W, H, Href, lab, device, a, loss64=None) -> dict:
    try:
        step = make_step(impl, case.softcap, a.backend, device)
        r = bench(impl, lambda: step(W, H, Href, lab), [W, H], device, a.iters, warmup=1 if a.smoke else 2)
        r["status"] = "ok"
    except Skip as ex:
        r = {"impl": impl, "status": ex.status, "error": str(ex)}
    except Exception as ex:  # OOM or a broken implementation: record it and go on
        r = {"impl": impl, "status": _error_status(ex), "error": f"{type(ex).__name__}: {str(ex)[:300]}"}
    W.grad = H.grad = None
    free_memory(device)
    if impl != "matmul" and loss64 is not None and r.get("loss") is not None:
        r["loss_rel_err"] = abs(r["loss"] - loss64) / max(abs(loss64), 1e-300)
    return r


# ----------------------------------------------------------------------------------------------- the matrix
def shape_of(a, name: str) -> Case:
    case = CASES[name]
    return dataclasses.replace(case, **SMOKE[name]) if a.smoke else case


def selection(a, case: Case) -> dict:
    base = FULL_SELECTION if case.full_cross else DEFAULT_SELECTION
    return {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in base.items()}


def plan(a) -> list[dict]:
    """Every configuration the run will measure, in order (the matrix, then the sweep)."""
    out = []
    for name in a.cases:
        case, sel = shape_of(a, name), selection(a, shape_of(a, name))
        for data in sel["data"]:
            for pf in sel["prompt_fracs"]:
                for mode in sel["modes"]:
                    out.append(dict(section="matrix", case=case, prompt_frac=pf, mode=mode, data=data))
    if a.sweep:
        base = shape_of(a, "llama3-8b")
        for pairs in a.sweep_pairs:
            out.append(dict(section="sweep", case=dataclasses.replace(base, name=f"llama3-8b x{pairs}", pairs=pairs),
                            prompt_frac=0.5, mode="full", data="gaussian"))
    return out


def _describe(cfg) -> dict:
    c = cfg["case"]
    N = 2 * c.pairs * c.T
    return {"section": cfg["section"], "case": c.name, "pairs": c.pairs, "T": c.T, "tokens": N, "D": c.D, "V": c.V,
            "softcap": c.softcap, "prompt_frac": cfg["prompt_frac"], "mode": cfg["mode"], "data": cfg["data"],
            "unit_tflop": 2 * N * c.D * c.V / 1e12}


def run(a, device, on_row) -> list[dict]:
    rows: list[dict] = []
    units: dict = {}  # (section, D, V, tokens) -> the matmul's median ms
    t0 = time.monotonic()
    groups: dict = {}  # same inputs (case, prompt, data) -> the modes, so inputs and the reference are made once
    for cfg in plan(a):
        key = (cfg["section"], cfg["case"], cfg["prompt_frac"], cfg["data"])
        groups.setdefault(key, []).append(cfg)
    for (section, case, pf, data), cfgs in groups.items():
        desc = _describe(cfgs[0])
        if a.time_budget_s and time.monotonic() - t0 > a.time_budget_s:
            for cfg in cfgs:
                for impl in a.impls:
                    row = {**_describe(cfg), "impl": impl, "status": "skipped", "error": "time budget spent"}
                    rows.append(row)
                    on_row(rows, row)
            continue
        W, H, Href, lab = make_inputs(case.pairs, case.T, case.D, case.V, pf, device,
                                      peaked=a.peaked if data == "peaked" else 0.0)
        shape = (section, case.D, case.V, desc["tokens"])
        if shape not in units:
            r = run_one("matmul", case, W, H, Href, lab, device, a)
            r.pop("loss", None)  # one logit, not a loss
            r.update({**desc, "prompt_frac": None, "mode": None, "data": None})
            units[shape] = r.get("median_ms")
            rows.append(r)
            on_row(rows, r)
        scored = int((lab != -100).sum())
        extra = {"scored_rows": scored}
        try:  # the float64 reference of the loss (and the data's mean token NLL), from the same inputs
            pol64, _ = float64_logps(H, W, lab, softcap=case.softcap)
            ref64, _ = float64_logps(Href, W, lab, softcap=case.softcap)
            loss64 = float(dpo_from_logps(pol64, ref64))
            extra.update(loss_f64=loss64, data_nll=float(-pol64.sum() / max(scored, 1)))
            del pol64, ref64
        except Exception as ex:  # rows keep their times; only the loss error is missing
            loss64 = None
            extra["reference_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
        free_memory(device)
        for cfg in cfgs:
            W.requires_grad_(cfg["mode"] == "full")
            H.requires_grad_(True)
            for impl in a.impls:
                r = run_one(impl, case, W, H, Href, lab, device, a, loss64)
                r.update(_describe(cfg))
                r.update(extra)
                if units[shape] and r.get("median_ms") is not None:
                    r["units"] = r["median_ms"] / units[shape]
                rows.append(r)
                on_row(rows, r)
        del W, H, Href, lab
        free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------- output
COLUMNS = [("case", "case", ""), ("tokens", "tokens", "d"), ("prompt_frac", "prompt", ".1f"), ("mode", "mode", ""),
           ("data", "data", ""), ("impl", "impl", ""), ("median_ms", "median ms", ".1f"), ("units", "units", ".2f"),
           ("policy_forward_ms", "policy fwd ms", ".1f"), ("policy_backward_ms", "policy bwd ms", ".1f"),
           ("peak_extra_gib", "peak extra GiB", ".3f"), ("loss", "loss", ".5f"),
           ("loss_rel_err", "loss rel err", ".1e"), ("status", "status", ""), ("error", "error", "")]


def render(meta, rows) -> str:
    title = (f"# fastpref vs naive / Liger / Cut Cross-Entropy: one DPO step of the head ({meta['device']}, "
             f"torch {meta['torch']}, triton {meta['triton']}, liger-kernel {meta['liger-kernel']}, "
             f"cut-cross-entropy {meta['cut-cross-entropy']}, {meta['date']})\n\n")
    note = ("Median of warm timings (CUDA events on a GPU); units = median / one bf16 N x D x V matmul of the same shape; peak "
            "extra memory above the allocation after warm-up (its gradients included, as the anchors count it); "
            "loss rel err against float64 from the same bf16 inputs. `mode` frozen = the head does not require "
            "grad (LoRA); `data` peaked = most softmax mass on the label.\n\n")
    out = title + note
    for section, heading in (("matrix", "## Cases"), ("sweep", "## Llama-3-8B head against tokens (prompt 0.5)")):
        part = [r for r in rows if r.get("section") == section]
        if part:
            out += heading + "\n\n" + markdown_table(part, COLUMNS) + "\n"
    return out


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def plots(out_dir, rows) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    order = ["matmul", *IMPLS]
    sweep = [r for r in rows if r.get("section") == "sweep" and r.get("status") == "ok"]
    if sweep:
        for key, ylabel, fname in (("median_ms", "ms per DPO step of the head", "compare_time.png"),
                                   ("peak_extra_gib", "peak extra memory (GiB)", "compare_memory.png")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            drawn = False
            for impl in order:
                pts = sorted((r["tokens"], r[key]) for r in sweep if r["impl"] == impl and _finite(r.get(key)))
                if pts and not (key == "peak_extra_gib" and impl == "matmul"):
                    ax.plot(*zip(*pts), marker="o", label="matmul (1 unit)" if impl == "matmul" else impl,
                            color=COLORS[impl], linestyle="--" if impl == "matmul" else "-")
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.legend()
            ticks = sorted({r["tokens"] for r in sweep})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
            ax.set_xlabel("tokens (2 x pairs x T; half of them prompt)")
            if drawn and key == "peak_extra_gib":
                ax.set_yscale("symlog", linthresh=0.01)  # fused kernels sit near 0, materialized logits near 50 GiB
            ax.set_ylabel(ylabel)
            ax.set_title(f"Llama-3-8B head (D {sweep[0]['D']}, V {sweep[0]['V']}), bf16, full fine-tuning")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, fname), dpi=120)
            plt.close(fig)
            written.append(fname)
    matrix = [r for r in rows if r.get("section") == "matrix" and r["impl"] != "matmul"]
    if matrix:
        labels = []
        for r in matrix:
            lab = f"{r['case']}\np{r['prompt_frac']:g} {r['mode']} {r['data']}"
            if lab not in labels:
                labels.append(lab)
        impls = [i for i in IMPLS if any(r["impl"] == i and _finite(r.get("units")) for r in matrix)]
        fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(labels) + 2), 4.6))
        width = 0.8 / max(len(impls), 1)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for r in matrix:
                if r["impl"] == impl and _finite(r.get("units")):
                    xs.append(labels.index(f"{r['case']}\np{r['prompt_frac']:g} {r['mode']} {r['data']}") + k * width)
                    ys.append(r["units"])
            ax.bar(xs, ys, width=width, label=impl, color=COLORS[impl])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("matmul units (one bf16 N x D x V matmul = 1)")
        ax.set_title("One DPO step of the head (missing bar: error, OOM or unsupported)")
        ax.grid(axis="y", alpha=0.3)
        if impls:
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "compare_units.png"), dpi=120)
        plt.close(fig)
        written.append("compare_units.png")
    return written


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x)


def _names(choices):
    def parse(s):
        names = tuple(x for x in s.split(",") if x and x != "none")
        bad = [x for x in names if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return names
    return parse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (JSON + markdown + PNG)")
    ap.add_argument("--cases", type=_names(tuple(CASES)), default=tuple(CASES),
                    help=f"comma list of {','.join(CASES)} ('none': only the sweep)")
    ap.add_argument("--prompt-fracs", dest="prompt_fracs", type=_floats, default=None,
                    help="e.g. 0,0.5 (default: 0,0.5 for llama3-8b, 0.5 for the others)")
    ap.add_argument("--modes", type=_names(("full", "frozen")), default=None,
                    help="full,frozen (default: both for llama3-8b, full for the others)")
    ap.add_argument("--data", type=_names(("gaussian", "peaked")), default=None,
                    help="gaussian,peaked (default: both for llama3-8b, gaussian for the others)")
    ap.add_argument("--impls", type=_names(IMPLS), default=IMPLS, help="comma list; one matmul per shape always runs")
    ap.add_argument("--sweep", action="store_true", help="also the Llama-3-8B head at --sweep-pairs pairs x 2048")
    ap.add_argument("--sweep-pairs", dest="sweep_pairs", type=lambda s: tuple(int(x) for x in s.split(",")),
                    default=(1, 2, 4, 8))
    ap.add_argument("--peaked", type=float, default=PEAKED, help="target-logit boost of the peaked data")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="auto", help="fastpref backend: auto, triton, torch")
    ap.add_argument("--time-budget-s", dest="time_budget_s", type=float, default=0.0,
                    help="start no new input configuration after this many seconds (0: no limit); the rest "
                         "are recorded as skipped")
    ap.add_argument("--plan", action="store_true", help="print the configurations and their matmul TFLOP, run nothing")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is (CI)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        a.iters = min(a.iters, 2)
        if a.sweep_pairs == (1, 2, 4, 8):
            a.sweep_pairs = (1, 2)
    if a.plan:
        for cfg in plan(a):
            print(json.dumps(_describe(cfg)))
        return 0
    if device.type != "cuda" and not a.smoke:
        raise SystemExit("compare: no CUDA device; run with --smoke on a CPU")
    meta = versions()
    meta.update({k: v for k, v in vars(a).items() if k != "out"}, argv=list(sys.argv[1:] if argv is None else argv))
    print(json.dumps(meta), flush=True)

    def on_row(rows, row):  # results on disk after every row: a run cut short keeps what it measured
        print(json.dumps(row), flush=True)
        write_results(a.out, "compare", meta, rows, render(meta, rows))

    rows = run(a, device, on_row)
    table = render(meta, rows)
    write_results(a.out, "compare", meta, rows, table)
    written = plots(a.out, rows)
    print(table)
    print("plots:", ", ".join(written) if written else "none (matplotlib not installed)")
    failed = [r for r in rows if r["impl"] == "fastpref" and r.get("status") not in ("ok", "skipped")]
    for r in failed:
        print(f"FAILED fastpref {r['case']} prompt {r['prompt_frac']} {r['mode']} {r['data']}: {r.get('error')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
