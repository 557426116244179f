"""Building blocks of the report: a section with its verdicts, Markdown table rows, numbers
with their intervals, figure links and the seed-mean curves figure."""

from __future__ import annotations

import math
import os
from typing import Optional

from .paper import LABELS
from .statistics import format_value, mean_ci

__all__ = ["Section", "row", "format_ci", "format_mean_ci", "format_ci_log", "figure_link"]


def _cell(c) -> str:
    return str(c).replace("|", "\\|")


def row(cells) -> str:
    """One Markdown table row; a '|' inside a cell is escaped."""
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def format_ci(ci: dict, digits: int = 4) -> str:
    """``mean_ci``'s answer as 'mean [lo, hi]' ('mean (n=1)' for one value, '-' for none)."""
    if not ci or ci["n"] == 0:
        return "-"
    if ci["lo"] is None:
        return f"{format_value(ci['mean'], digits)} (n=1)"
    return f"{format_value(ci['mean'], digits)} [{format_value(ci['lo'], digits)}, {format_value(ci['hi'], digits)}]"


def format_mean_ci(values) -> str:
    """The mean of ``values`` with its 95% interval, as ``format_ci`` writes it."""
    return format_ci(mean_ci(values))


def format_ci_log(values: list) -> str:
    """Geometric mean [95% interval on the log10 scale] of positive values; '0' when all are 0."""
    if values and all(v == 0 for v in values):
        return "0"
    if not values or any(v <= 0 for v in values):
        return format_ci(mean_ci(values), 3)
    ci = mean_ci([math.log10(v) for v in values])
    if ci["lo"] is None:
        return f"{10 ** ci['mean']:.3g} (n=1)"
    return f"{10 ** ci['mean']:.3g} [{10 ** ci['lo']:.3g}, {10 ** ci['hi']:.3g}]"


def figure_link(path: Optional[str], out_path: str, alt: str) -> list:
    """Markdown lines embedding the image ``path`` relative to the report at ``out_path``;
    none when the image does not exist."""
    if not path or not os.path.isfile(path):
        return []
    rel = os.path.relpath(path, os.path.dirname(os.path.abspath(out_path)))
    return [f"![{alt}]({rel.replace(os.sep, '/')})", ""]


def _curve_mean(rs: list, key: str) -> list:
    by_epoch: dict = {}
    for r in rs:
        for rec in r["curve"]:
            if rec.get(key) is not None:
                by_epoch.setdefault(rec["epoch"], []).append(rec[key])
    return [{"epoch": e, key: sum(v) / len(v)} for e, v in sorted(by_epoch.items())]


def _curves_figure(groups: dict, keys: tuple, path: str, title: str) -> Optional[str]:
    """Seed-mean validation curves (one line per arm) via plots.curves_figure."""
    from .. import plots
    runs = {}
    for label, rs in groups.items():
        merged: dict = {}
        for key in keys:
            for rec in _curve_mean(rs, key):
                merged.setdefault(rec["epoch"], {"epoch": rec["epoch"]}).update(rec)
        if merged:
            runs[label] = [merged[e] for e in sorted(merged)]
    if not runs:
        return None
    return plots.curves_figure(runs, path, keys=keys, title=title)


class Section:
    """The Markdown lines of one report section and the claims it judged."""

    def __init__(self, *lines):
        self.lines: list = list(lines)
        self.claims: list = []

    def add(self, *lines):
        self.lines.extend(lines)

    def claim(self, text: str, v: dict):
        """Record a verdict (``statistics.verdict_*`` or a threshold test) on the claim ``text``."""
        self.claims.append((text, v))

    def table(self, header: list, rows: list):
        self.add(row(header), "|" + "---|" * len(header))
        for r in rows:
            self.add(row(r))
        self.add("")

    def curves(self, per: dict, keys: tuple, folder: str, out_path: str, title: str, alt: str):
        """Draw the seed-mean curves of the arms ``per`` (arm -> results) into
        ``<folder>/figures/curves.png`` and link it."""
        fig = _curves_figure({LABELS[k]: v for k, v in per.items()}, keys,
                             os.path.join(folder, "figures", "curves.png"), title)
        self.add(*figure_link(fig, out_path, alt))

    def no_results(self, how: str = "") -> "Section":
        """Say that there is nothing to report yet (``how``: the command that makes it); returns self."""
        self.add(f"No results yet ({how})." if how else "No results yet.", "")
        return self

    def finish(self) -> "Section":
        """Append the table of this section's verdicts (nothing when there are none); returns self."""
        if self.claims:
            self.add("**Verdicts**", "")
            rows = [(t, f"**{v['verdict']}**", v["reason"]) for t, v in self.claims]
            self.table(["claim (paper)", "verdict", "reason"], rows)
        return self
