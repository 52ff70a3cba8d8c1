"""The ``fastpref`` command (also ``python -m fastpref``).

``fastpref reproduce`` runs each method paper's own toy claim through fastpref's public API on the CPU (about half a
minute) and prints the paper's statement next to fastpref's numbers; it writes ``reproduce.png`` and
``reproduce.json`` to ``--out`` and exits 1 when a claim does not hold (:mod:`fastpref.reproduce`).

``fastpref demo`` trains a tiny Llama (built from a config, no download) on the preference dataset shipped in the
package, whose ground-truth reward is known, with each method in turn (or the ones named with ``--method``), and
prints a table (final loss, held-out reward accuracy before and after, the change of the held-out chosen and
rejected responses' log-probs, tokens/s and peak memory) followed by the definition of each column. It writes
``curves.png`` and ``results.json`` to ``--out``, which is checked (created, written to) before any training.

:func:`main` takes the argument list and returns the exit status (0 ok, 1 a missing dependency or a failed write,
2 a bad argument: one line on stderr, never a traceback); it does not call ``sys.exit``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ._hints import install_hint

__all__ = ["main"]

DEMO_EXTRA = install_hint("demo")


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    """Raises on a bad argument instead of printing the usage block and exiting (the caller prints one line)."""

    def error(self, message):  # noqa: D401 - argparse's hook
        raise _UsageError(self.prog, message)


def _number(cast, accept, wanted: str):
    """An argparse ``type``: ``cast`` the text, then require ``accept(value)``; errors say ``must be {wanted}``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")


def _methods(text: str) -> list[str]:
    from .demo.methods import DEFAULT_METHODS, METHODS

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one method")
    if names == ["all"]:
        return list(DEFAULT_METHODS)
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(
                f"unknown method {name!r} (choose from {', '.join(METHODS)}, or 'all')")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is named twice in {text!r}")
    return names


def _parser() -> _Parser:
    from . import __version__
    from ._method_names import TRAINER_CALLS
    from .demo.methods import DEFAULT_METHODS, LR, METHODS
    from .demo.train import DEFAULT_SFT_STEPS, DEFAULT_STEPS

    parser = _Parser(prog="fastpref", description="fastpref: preference-optimization losses from hidden states "
                     "and the LM head, without materializing logits.")
    parser.add_argument("--version", action="version", version=f"fastpref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    method_lines = "; ".join(f"{name}: {spec.title} ({spec.note}; in training code: {TRAINER_CALLS[name]})"
                             for name, spec in METHODS.items())
    demo = sub.add_parser(
        "demo", help="train a tiny model with each method on a toy dataset with a known reward",
        description="Train a tiny Llama (built from a config, no download) with each preference method on the "
                    "dataset shipped in fastpref (prompts and responses over a 64-token vocabulary; true reward "
                    "= #good - #bad tokens), starting every method from the same SFT warm-up, and report held-out "
                    "reward accuracy before/after, the chosen log-prob change, tokens/s and peak memory. "
                    f"Methods: {method_lines}.")
    demo.add_argument("--method", type=_methods, default=list(DEFAULT_METHODS), metavar="NAME[,NAME...]",
                      help=f"method(s) to train, comma-separated, or 'all' (default: all = {','.join(DEFAULT_METHODS)})")
    demo.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                      help=f"training steps per method (default {DEFAULT_STEPS})")
    demo.add_argument("--sft-steps", type=_nonnegative_int, default=DEFAULT_SFT_STEPS,
                      help="SFT warm-up steps before the methods; the warmed-up model is the reference "
                           f"(default {DEFAULT_SFT_STEPS})")
    demo.add_argument("--batch-pairs", type=_positive_int, default=16,
                      help="preference pairs per step (group methods: as many response rows) (default 16)")
    demo.add_argument("--lr", type=_positive_float, default=None, help=f"AdamW learning rate (default {LR:g}, every method)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model init and batch order (default 0)")
    demo.add_argument("--out", type=Path, default=Path("fastpref-demo"),
                      help="output folder for curves.png and results.json (default ./fastpref-demo/)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="auto: cuda when available, else cpu (default auto)")
    demo.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                      help="fused-head backend: auto = triton on CUDA, torch on the CPU (default auto)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="CPU threads (default 1: faster than more for a model this small)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    demo.set_defaults(func=_demo)

    from .reproduce import CLAIMS

    rep = sub.add_parser(
        "reproduce", help="check each method paper's own toy claim through fastpref (CPU, about half a minute)",
        description="Run each paper's toy claim through fastpref's public API on the CPU, in float64, and print the "
                    "paper's statement next to fastpref's numbers: " + ", ".join(CLAIMS) + ". Writes "
                    "reproduce.png and reproduce.json to --out; exit status 1 when a claim does not hold.")
    rep.add_argument("--claim", type=_claims, default=list(CLAIMS), metavar="NAME[,NAME...]",
                     help=f"claim(s) to run, comma-separated (default: all = {','.join(CLAIMS)})")
    rep.add_argument("--out", type=Path, default=Path("fastpref-reproduce"),
                     help="output folder for reproduce.png and reproduce.json (default ./fastpref-reproduce/)")
    rep.add_argument("--no-plot", action="store_true", help="do not write reproduce.png")
    rep.add_argument("--threads", type=_positive_int, default=1, help="CPU threads (default 1)")
    rep.set_defaults(func=_reproduce)
    return parser


def _claims(text: str) -> list[str]:
    from .reproduce import CLAIMS

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one claim")
    if names == ["all"]:
        return list(CLAIMS)
    for name in names:
        if name not in CLAIMS:
            raise argparse.ArgumentTypeError(f"unknown claim {name!r} (choose from {', '.join(CLAIMS)}, or 'all')")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a claim is named twice in {text!r}")
    return names


def _writable_folder(prog: str, out: Path) -> None:
    """Fail before the run, not after it, when ``out`` cannot receive the files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fastpref-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise _UsageError(prog, f"argument --out: cannot write to {out}: {_one_line(exc)}") from None


def _reproduce(args: argparse.Namespace, parser: _Parser) -> int:
    prog = "fastpref reproduce"
    _writable_folder(prog, args.out)
    from .reproduce import run_claims
    from .reproduce.report import format_table, write_json, write_plot

    started = time.perf_counter()
    print(f"{prog}: {len(args.claim)} claim(s) on the CPU in float64 ...", flush=True)
    results = run_claims(args.claim, threads=args.threads)
    elapsed = time.perf_counter() - started
    print(format_table(results, elapsed))
    written = []
    try:
        write_json(args.out / "reproduce.json", results)
        written.append(str(args.out / "reproduce.json"))
        if not args.no_plot:
            note = write_plot(args.out / "reproduce.png", results)
            if note:
                print(note)
            else:
                written.insert(0, str(args.out / "reproduce.png"))
    except OSError as exc:
        print(f"{prog}: error: cannot write to {args.out}: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(written)}")
    failed = [r.name for r in results if not r.passed]
    if failed:
        print(f"{prog}: not reproduced: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _demo(args: argparse.Namespace, parser: _Parser) -> int:
    prog = "fastpref demo"
    if not _has_module("transformers"):
        print(f"{prog}: error: the demo needs transformers: {DEMO_EXTRA}", file=sys.stderr)
        return 1
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise _UsageError(prog, "argument --device: cuda was requested but CUDA is not available")
    if args.backend == "triton" and device != "cuda":
        raise _UsageError(prog, "argument --backend: triton needs a CUDA device (use --backend torch on the CPU)")

    from .demo.data import load_data
    from .demo.report import column_notes, format_table, write_json, write_plot
    from .demo.train import DemoConfig, check_config, run

    started = time.perf_counter()
    data = load_data()
    if args.batch_pairs > data.train.num_prompts:
        raise _UsageError(prog, f"argument --batch-pairs: must be at most {data.train.num_prompts} (the training "
                                f"prompts; a batch draws distinct prompts), got {args.batch_pairs}")
    out: Path = args.out
    targets = [out / "results.json"] + ([] if args.no_plot else [out / "curves.png"])
    _check_writable(prog, out, targets)  # before training, not after it
    cfg = DemoConfig(methods=args.method, steps=args.steps, sft_steps=args.sft_steps, batch_pairs=args.batch_pairs,
                     lr=args.lr, seed=args.seed, device=device, backend=args.backend,
                     progress=not args.no_progress, threads=args.threads)
    check_config(cfg, data)
    meta = data.meta
    print(f"fastpref demo: {len(cfg.methods)} method(s) x {cfg.steps} steps on {device} "
          f"(backend {_backend(args.backend, device)}); {data.train.num_prompts} training prompts, "
          f"{data.test.num_prompts} held-out pairs; true reward R = #good - #bad tokens "
          f"({len(meta['good_tokens'])} good, {len(meta['bad_tokens'])} bad of {meta['vocab_size']} ids)", flush=True)
    results, info = run(data, cfg)
    elapsed = time.perf_counter() - started
    info["wall_seconds"] = elapsed
    print(f"model: {info['model']}, {info['num_parameters']:,} parameters; SFT warm-up {cfg.sft_steps} steps "
          f"(response NLL/token {info['sft_final_nll']:.3f}; uniform over content tokens {info['uniform_nll']:.3f}) "
          f"= the reference")
    print(format_table(results))
    print("\n".join(f"  {line}" for line in column_notes()))
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", results, info)
        written = [str(out / "results.json")]
        if not args.no_plot:
            note = write_plot(out / "curves.png", results)
            if note:
                print(note)
            else:
                written.insert(0, str(out / "curves.png"))
    except OSError as exc:
        print(f"{prog}: error: cannot write to {out}: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(written)} in {elapsed:.1f} s")
    return 0


def _check_writable(prog: str, out: Path, targets: Sequence[Path]) -> None:
    """``out`` exists (created if needed) and takes new files: a usage error now, not after the training."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fastpref-write-check-"):
            pass
    except OSError as exc:
        raise _UsageError(prog, f"argument --out: cannot write to {out}: {_one_line(exc)}") from None
    for target in targets:
        if target.is_dir():
            raise _UsageError(prog, f"argument --out: {target} is a directory; cannot write the file there")


def _backend(backend: str, device: str) -> str:
    if backend != "auto":
        return backend
    return "triton" if device == "cuda" else "torch"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fastpref`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
        if args.command is None:
            raise _UsageError("fastpref", "missing command (try 'fastpref demo', 'fastpref reproduce' or "
                                          "'fastpref --help')")
        return args.func(args, parser)
    except _UsageError as exc:
        print(f"{exc.prog}: error: {_one_line(exc.message)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        print("fastpref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
