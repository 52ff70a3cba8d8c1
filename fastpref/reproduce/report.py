"""The side-by-side table, the JSON record and the figure of ``fastpref reproduce``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from . import ClaimResult

WIDTH = 110


def format_table(results: Sequence[ClaimResult], seconds: Optional[float] = None) -> str:
    """One block per claim: status, title, the paper's statement and fastpref's numbers one above the other."""
    ok = sum(r.passed for r in results)
    head = f"fastpref reproduce: {ok} of {len(results)} paper claims reproduced"
    if seconds is not None:
        head += f" ({seconds:.1f} s, CPU, float64)"
    lines = [head, ""]
    for r in results:
        lines.append(f"[{'ok' if r.passed else 'FAILED'}] {r.title}  ({r.name}, {r.seconds:.1f} s)")
        for label, text in (("paper:   ", r.paper), ("fastpref:", r.fastpref)):
            wrapped = textwrap.wrap(text, WIDTH - 16) or [""]
            lines.append(f"    {label} {wrapped[0]}")
            lines.extend(f"              {w}" for w in wrapped[1:])
    return "\n".join(lines)


def write_json(path: Path, results: Sequence[ClaimResult]) -> None:
    rows = [{"name": r.name, "title": r.title, "paper": r.paper, "fastpref": r.fastpref, "passed": r.passed,
             "seconds": r.seconds, "details": r.details} for r in results]
    path.write_text(json.dumps(rows, indent=1, default=float) + "\n")


def write_plot(path: Path, results: Sequence[ClaimResult]) -> Optional[str]:
    """Draw one panel per claim into ``path`` (PNG). Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no figure (pip install matplotlib)"
    drawn = [r for r in results if r.plot is not None]
    cols = 4 if len(drawn) > 4 else max(1, len(drawn))
    rows = (len(drawn) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax, r in zip(axes.flat, drawn):
        r.plot(ax)
        ax.title.set_fontsize(8)
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_fontsize(7)
        ax.yaxis.label.set_fontsize(7)
        if not r.passed:
            ax.set_facecolor("#fde0e0")
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    ok = sum(r.passed for r in results)
    fig.suptitle(f"fastpref reproduce: {ok} of {len(results)} paper claims reproduced", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
