"""``fastpref demo``: train a tiny model with each preference method on a shipped toy dataset with a known reward.

Pieces: :mod:`.make_dataset` (the generator of ``fastpref/data/demo_prefs.jsonl``), :mod:`.data` (loading),
:mod:`.methods` (one loss function per method over a patched model's per-sequence log-probs), :mod:`.train` (the
plain training loop) and :mod:`.report` (table, JSON, PNG). The command line is :func:`fastpref.cli.main`.
Importing this package does not import transformers (only :func:`.train.run` does).
"""

from .data import DemoData, load_data, load_records
from .methods import DEFAULT_METHODS, METHODS, MethodSpec
from .report import COLUMNS, format_table, write_json, write_plot
from .train import DemoConfig, MethodResult, run

__all__ = [
    "COLUMNS", "DEFAULT_METHODS", "DemoConfig", "DemoData", "METHODS", "MethodResult", "MethodSpec",
    "format_table", "load_data", "load_records", "run", "write_json", "write_plot",
]
