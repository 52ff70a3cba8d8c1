"""The demo's outputs: the results table, ``results.json`` and the training-curves PNG."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from .train import MethodResult

__all__ = ["COLUMNS", "column_notes", "format_table", "write_json", "write_plot"]

#: The table's columns, in order (``format_table``'s header).
COLUMNS = ("method", "final loss", "acc before", "acc after", "d logp(chosen)", "d logp(rejected)", "tokens/s",
           "peak mem MB")

#: What each column means (printed under the table, and in the README).
COLUMN_NOTES = {
    "final loss": "the method's training loss averaged over its last 5 steps (all, when fewer; each step "
                  "one batch of --batch-pairs pairs); each method has its own loss, so compare it along training, not across methods",
    "acc before": "held-out pairs whose chosen response the method's own reward ranks first (ties count 1/2), "
                  "with the SFT model = the reference. The reward is the implicit beta * log(pi / pi_ref) for "
                  "the methods with a reference: there every reward is 0 before training, every pair a tie, "
                  "hence exactly 0.500. SimPO ranks by the mean log-prob, TYPO and DRDO by the log-prob, which "
                  "already rank some pairs",
    "acc after": "the same accuracy after training",
    "d logp(chosen)": "mean change of the held-out chosen responses' log-prob, after minus before (nats). A "
                      "preference loss raises the margin over the rejected response, not the chosen log-prob "
                      "itself: both usually fall, the rejected faster (likelihood displacement: Razin et al. "
                      "2024, Pal et al. 2024)",
    "d logp(rejected)": "the same for the held-out rejected responses",
    "tokens/s": "non-padding tokens through the policy per second of training steps (forward, backward, "
                "optimizer; evaluation excluded)",
    "peak mem MB": "on CUDA, per method: the method's own peak of allocated tensor memory (reset before each "
                   "method). On the CPU, for the whole process: its peak resident memory so far (Python, torch, the "
                   "data and every method run before), which never decreases, so it does not compare methods",
}


def column_notes() -> list[str]:
    """One line per column (after the method name): ``name: meaning``."""
    return [f"{name}: {COLUMN_NOTES[name]}" for name in COLUMNS[1:]]


def _row(r: MethodResult) -> list[str]:
    return [r.method, f"{r.final_loss:.4f}", f"{r.acc_before:.3f}", f"{r.acc_after:.3f}",
            f"{r.chosen_logp_change:+.2f}", f"{r.rejected_logp_change:+.2f}", f"{r.tokens_per_s:,.0f}",
            f"{r.peak_memory_mb:,.0f}"]


def format_table(results: Sequence[MethodResult]) -> str:
    """A plain-text table, one row per method (numbers right-aligned)."""
    rows = [list(COLUMNS)] + [_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule] + [line(r) for r in rows[1:]])


def write_json(path: Path, results: Sequence[MethodResult], info: dict) -> None:
    payload = {"info": info, "columns": list(COLUMNS), "results": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n", encoding="utf-8")


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_plot(path: Path, results: Sequence[MethodResult], title: str = "") -> Optional[str]:
    """Write the curves PNG; returns None, or a one-line note when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        from .._hints import install_hint

        return f"matplotlib is not installed: skipping the PNG ({install_hint('demo')})"
    fig = make_figure(results, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def make_figure(results: Sequence[MethodResult], title: str = ""):
    """The curves figure (matplotlib, Agg): held-out accuracy of every method on top, one loss panel each below."""
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(5, max(1, n))
    loss_rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(3.2 * cols + 0.8, 3.4 + 2.4 * loss_rows), constrained_layout=True)
    grid = fig.add_gridspec(1 + loss_rows, cols, height_ratios=[1.4] + [1.0] * loss_rows)
    colors = plt.get_cmap("tab10")

    ax = fig.add_subplot(grid[0, :])
    for i, r in enumerate(results):
        ax.plot(r.eval_steps, r.eval_accs, marker="o", ms=3, color=colors(i % 10), label=r.method)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out reward accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(ncol=min(5, n), fontsize=8, loc="lower right")
    # Two short lines: a single-method figure is 4 inches wide and clipped a one-line title on both sides.
    ax.set_title(title or "fastpref demo: held-out reward accuracy\n(ranking by each method's own reward)",
                 fontsize=10)

    window = max(1, max((len(r.losses) for r in results), default=1) // 30)
    for i, r in enumerate(results):
        a = fig.add_subplot(grid[1 + i // cols, i % cols])
        steps = list(range(1, len(r.losses) + 1))
        a.plot(steps, r.losses, color=colors(i % 10), alpha=0.3, lw=0.8)
        a.plot(steps, _smooth(r.losses, window), color=colors(i % 10), lw=1.5)
        a.set_title(f"{r.method}: training loss", fontsize=9)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
        if i % cols == 0:
            a.set_ylabel("loss", fontsize=8)
        if i // cols == loss_rows - 1:
            a.set_xlabel("step", fontsize=8)
    return fig
