"""The ``reproduce`` command line: ``list``, ``run`` and ``report``.

``silent-vae reproduce ...`` gets it through ``add_parser`` and ``run_command`` (the console
script owns the error handling); ``python -m silent_kernels.api.reproduce ...`` through ``main``.
"""

from __future__ import annotations

import argparse
import os

from ..errors import InputFileError, UsageError
from .plans import PRESETS, SCALES, plan
from .report import build_report
from .runner import run_preset

__all__ = ["add_parser", "build_parser", "run_command", "main"]

_DESCRIPTION = "Reproduce the paper's tables and the companion results."
# 'run all' runs every preset that has its own cells and needs no extra data set
_ALL = [p for p in PRESETS if p not in ("table1", "table34-cifar10", "table34-imagenet32")]


def _parse_seeds(text: str) -> list:
    return [int(t) for t in text.split(",") if t.strip()]


def _add_actions(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("list", help="presets, arms, cells and budgets")
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p = sub.add_parser("run", help="run the missing cells of one preset (or 'all')")
    p.add_argument("preset", choices=PRESETS + ("all",))
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--data", default=None, help="data folder (default ../shared/data/mnist when it exists)")
    p.add_argument("--out", default="docs/results", help="result JSON folder [docs/results]")
    p.add_argument("--runs", default="runs/reproduce", help="run folders (checkpoints) [runs/reproduce]")
    p.add_argument("--jobs", type=int, default=1, help="cells in parallel (each single-threaded at cpu scale)")
    p.add_argument("--arms", nargs="+", default=None, help="only these arms")
    p.add_argument("--seeds", type=_parse_seeds, default=None, help="only these seeds, e.g. 0,1")
    p.add_argument("--device", default=None, help="cpu | cuda (paper scale on a GPU)")
    p.add_argument("--no-figures", action="store_true")
    p = sub.add_parser("report", help="write the Markdown report from the result files")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--out", default="docs/reproduction.md")
    p.add_argument("--scale", choices=SCALES, default=None, help="default: the largest scale present per preset")
    p.add_argument("--no-figures", action="store_true")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``reproduce`` command to another command's ``add_subparsers()`` result."""
    parser = subparsers.add_parser(
        "reproduce", description=_DESCRIPTION,
        help="reproduce the paper's tables and companion results (list | run | report)")
    _add_actions(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser (``python -m silent_kernels.api.reproduce``)."""
    parser = argparse.ArgumentParser(prog="silent-vae reproduce", description=_DESCRIPTION)
    _add_actions(parser)
    return parser


def _list(scale: str) -> None:
    for preset in PRESETS:
        try:
            pl = plan(preset, scale, None)
        except ValueError as exc:
            print(f"{preset:20s} ({exc})")
            continue
        if pl.kind == "ppca":
            print(f"{preset:20s} seeds {pl.seeds}: {pl.budget}")
            continue
        cells = pl.n_cells()
        screened = f", grid screened on seeds {pl.screen_seeds}" if pl.screen_seeds else ""
        print(f"{preset:20s} {len(pl.arms)} arms, {cells} cells, seeds {pl.seeds}{screened}"
              f"{' (cells of ' + pl.source + ')' if pl.source else ''}: {pl.budget}")
        for a in pl.arms:
            print(f"    {a.key:18s} grid {a.grid or '-'}"
                  f"{'  inherits ' + str(a.inherit) if a.inherit else ''}")


def run_command(args: argparse.Namespace) -> int:
    """Carry out parsed ``reproduce`` arguments; returns the exit code."""
    if args.action == "list":
        _list(args.scale)
        return 0
    if args.action == "report":
        if not os.path.isdir(args.results):
            raise InputFileError(f"--results: expected a folder of result files, {args.results!r} does not exist")
        print(build_report(args.results, args.out, scale=args.scale, figures=not args.no_figures))
        return 0
    presets = _ALL if args.preset == "all" else [args.preset]
    if args.arms:
        known = {a.key for preset in presets for a in plan(preset, args.scale or "cpu", None).arms}
        unknown = [a for a in args.arms if a not in known]
        if unknown:
            raise UsageError(f"--arms: unknown arm(s) {', '.join(unknown)} for {args.preset}; expected some of "
                             f"{', '.join(sorted(known))} (separated by spaces)")
    for preset in presets:
        res = run_preset(preset, args.scale, out_dir=args.out, runs_dir=args.runs, data_root=args.data,
                         jobs=args.jobs, arms=args.arms, seeds=args.seeds, device=args.device,
                         figures=not args.no_figures)
        print(f"[{preset} {args.scale}] ran {res['ran']} cells, skipped {res['skipped']} finished ones, "
              f"{res['seconds']:.1f} s")
    return 0


def main(argv=None) -> int:
    """``python -m silent_kernels.api.reproduce``: parse ``argv`` and run it."""
    return run_command(build_parser().parse_args(argv))
