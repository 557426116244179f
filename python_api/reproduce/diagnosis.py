"""The report section on the instability of the learned-variance runs (preset
``table34-diagnosis``): per grid point of learning rate x AdamW beta2 x log-variance floor, the
epoch-to-epoch jumps of the validation BPD, the gap between the last and the best epoch, the
pixels at the floor, and from the seeds' spread the number of seeds the Tables 3-4 effects need.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from ..models import LOGVAR_FLOOR
from .markdown import Section, format_mean_ci
from .plans import T34_BETAS, T34_LOGVAR_FLOOR, plan
from .results import load_results
from .statistics import format_value, mean_ci, pooled_sd, seeds_needed

__all__ = ["section_diagnosis", "cell_stability", "power_row", "JUMP_BITS", "TABLE34_EFFECTS", "POWER_HEADER",
           "POWER_RULE"]

JUMP_BITS = 0.5   # an epoch-to-epoch rise of the validation BPD above this counts as a jump
# the paper's MNIST Table 3 differences the protocol must resolve (bits/dim): pair -> |difference|
TABLE34_EFFECTS = {"reparam vs reparam+SG": 0.11, "Gumbel vs Gumbel+SG": 0.11, "REINFORCE vs REINFORCE+SG": 0.02,
                   "SG alone (discrete) vs REINFORCE": 0.19}
_FACTORS = (("lr", "learning rate"), ("beta2", "AdamW beta2"), ("floor", "log-variance floor"))


def cell_stability(r: dict) -> dict:
    """Stability numbers of one cell from its validation curve."""
    curve = [rec for rec in r["curve"] if rec.get("val_bpd") is not None]
    bpd = [rec["val_bpd"] for rec in curve]
    rises = [b - a for a, b in zip(bpd, bpd[1:])]
    best = min(range(len(bpd)), key=bpd.__getitem__) if bpd else None
    floor = [rec["val_floor_fraction"] for rec in curve if rec.get("val_floor_fraction") is not None]
    cfg = r["config"]
    return {"lr": cfg["lr"], "beta2": cfg["betas"][1],
            "floor": LOGVAR_FLOOR if cfg.get("logvar_floor") is None else cfg["logvar_floor"],
            "seed": r["seed"], "ok": r["status"] == "ok",
            "last": bpd[-1] if bpd else None, "best": bpd[best] if bpd else None,
            "best_epoch": curve[best]["epoch"] if bpd else None,
            "jumps": sum(d > JUMP_BITS for d in rises), "largest_rise": max(rises, default=0.0),
            "floor_last": floor[-1] if floor else None, "floor_max": max(floor) if floor else None}


def _key(c: dict) -> tuple:
    return c["lr"], c["beta2"], c["floor"]


def _point_rows(cells: list) -> list:
    rows = []
    for point in sorted({_key(c) for c in cells}):
        cs = sorted((c for c in cells if _key(c) == point), key=lambda c: c["seed"])
        rows.append((f"{point[0]:g}", f"{point[1]:g}", _floor_label(point[2]),
                     ", ".join(format_value(c["last"]) for c in cs),
                     ", ".join(f"{format_value(c['best'])} (ep {c['best_epoch']})" for c in cs),
                     sum(c["jumps"] for c in cs), format_value(max(c["largest_rise"] for c in cs)),
                     ", ".join(f"{c['floor_last']:.1%}" if c["floor_last"] is not None else "-" for c in cs),
                     sum(not c["ok"] for c in cs)))
    return rows


def _factor_rows(cells: list) -> list:
    rows = []
    for field, label in _FACTORS:
        for level in sorted({c[field] for c in cells}):
            cs = [c for c in cells if c[field] == level]
            rows.append((label, _floor_label(level) if field == "floor" else f"{level:g}", len(cs),
                         sum(c["jumps"] for c in cs), sum(c["jumps"] > 0 for c in cs),
                         format_mean_ci([c["last"] - c["best"] for c in cs]),
                         format_mean_ci([c["best"] for c in cs]),
                         format_mean_ci([c["floor_last"] for c in cs])))
    return rows


def _pooled_sd(cells: list, metric: str) -> tuple:
    """(pooled seed standard deviation of ``metric`` within grid points, degrees of freedom)."""
    return pooled_sd([[c[metric] for c in cells if _key(c) == point] for point in {_key(c) for c in cells}])


POWER_RULE = ("two-sided 5% level, 80% power; the difference of two arms' seeds has standard deviation "
              "sqrt(2) sd, i.e. no credit for pairing; t quantile for the significance, normal for the power")


def power_row(label: str, sd: float, df: int) -> tuple:
    """A row of the power table: the pooled sd and the seeds each Table 3 difference needs."""
    return (label, f"{sd:.3g} (df {df})", *[seeds_needed(math.sqrt(2) * sd, e) for e in TABLE34_EFFECTS.values()])


POWER_HEADER = ["BPD", "pooled seed sd (bits)", *[f"seeds for {k} ({v} bits)" for k, v in TABLE34_EFFECTS.items()]]


def _power(s: Section, cells: list) -> None:
    s.add("**Power.** The seed-to-seed spread of the validation BPD within a grid point, pooled over the "
          f"points, and the seeds per arm that a paired comparison needs to detect each Table 3 difference "
          f"({POWER_RULE}); an sd on 1 degree of freedom is a rough estimate:", "")
    rows = []
    chosen = [c for c in cells if c["beta2"] == T34_BETAS[1] and c["floor"] == _protocol_floor()]
    for subset, where in ((cells, "all points"), (chosen, "the protocol's beta2 and floor")):
        for metric, label in (("last", "last epoch"), ("best", "best epoch")):
            sd, df = _pooled_sd(subset, metric)
            if sd is not None:
                rows.append(power_row(f"validation, {label} ({where})", sd, df))
    if not rows:
        s.add("(no grid point has two seeds yet)", "")
        return
    s.table(POWER_HEADER, rows)


def _protocol_floor() -> float:
    return LOGVAR_FLOOR if T34_LOGVAR_FLOOR is None else T34_LOGVAR_FLOOR


def _paired_factor(cells: list, field: str, a, b, metric) -> dict:
    """mean_ci over matched cells (same other factors and seed) of metric(level b) - metric(level a)."""
    others = [f for f, _ in _FACTORS if f != field]
    idx = {(tuple(c[f] for f in others), c["seed"], c[field]): c for c in cells}
    diffs = []
    for (rest, seed, level), c in idx.items():
        if level == a and (rest, seed, b) in idx:
            diffs.append(metric(idx[(rest, seed, b)]) - metric(c))
    return mean_ci(diffs)


def _findings(s: Section, cells: list) -> None:
    lines = []
    for field, label in _FACTORS:
        levels = sorted({c[field] for c in cells})
        if len(levels) != 2:
            continue
        a, b = levels
        if field == "floor":
            a, b = LOGVAR_FLOOR, next(v for v in levels if v != LOGVAR_FLOOR)
        jumps = _paired_factor(cells, field, a, b, lambda c: c["jumps"])
        gap = _paired_factor(cells, field, a, b, lambda c: c["last"] - c["best"])
        best = _paired_factor(cells, field, a, b, lambda c: c["best"])
        if jumps["n"]:
            name = _floor_label if field == "floor" else (lambda v: f"{v:g}")
            lines.append(f"- {label} {name(b)} instead of {name(a)} ({jumps['n']} matched cells): jumps per run "
                         f"{_fmt(jumps)}, last - best epoch {_fmt(gap)} bits, best validation BPD {_fmt(best)} bits")
    if lines:
        s.add("Paired effects of each two-level factor (same learning rate / other factor and seed; "
              "mean [95% interval] of level 2 - level 1):", "", *lines, "")


def _floor_label(value: float) -> str:
    return f"{value:.2f}" + (" (default)" if value == LOGVAR_FLOOR else "")


def _fmt(ci: dict) -> str:
    if ci["mean"] is None:
        return "-"
    if ci["lo"] is None:
        return f"{ci['mean']:+.3f}"
    return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"


def section_diagnosis(results_dir: str, scale: Optional[str], out_path: str, figures: bool) -> Section:
    s = Section("Not in the paper. Our first Tables 3-4 runs (29 cells scored at their last epoch, lr {5e-4, 1e-3}; "
                "in the history of docs/results/table34/cpu up to commit 6425325) were unstable: the validation "
                "BPD of learned-variance decoders jumped by 1-4 bits between epochs, and every Table 3 claim was "
                "inconclusive. This grid searches the cause on the reparameterisation arm; the Tables 3-4 "
                "protocol below uses what it found.", "")
    if scale is None:
        return s.no_results("`silent-vae reproduce run table34-diagnosis --scale cpu`")
    p = plan("table34-diagnosis", scale, None)
    results = load_results(os.path.join(results_dir, "table34-diagnosis", scale))
    s.add(f"Scale: {p.scale_note}. Budget, estimated before running: {p.budget}; spent: {len(results)} cells, "
          f"{sum(r['wall_time_s'] for r in results) / 3600:.2f} core-hours.", "")
    cells = [cell_stability(r) for r in results if r.get("curve")]
    if not cells:
        return s.no_results()
    s.add(f"Per grid point (seeds in order; a jump is an epoch-to-epoch rise of the validation BPD above "
          f"{JUMP_BITS} bits; 'at the floor': pixels whose log-variance at z = E[z] is within 0.1 nats of "
          "the floor, after the last epoch):", "")
    s.table(["lr", "beta2", "floor", "val BPD, last epoch", "val BPD, best epoch", "jumps", "largest rise",
             "at the floor", "failed runs"], _point_rows(cells))
    s.add("Per factor level (over the other factors and seeds; mean [95% interval]):", "")
    s.table(["factor", "level", "runs", "jumps", "runs with a jump", "last - best epoch (bits)",
             "best val BPD", "at the floor"], _factor_rows(cells))
    _findings(s, cells)
    s.add(f"The Tables 3-4 protocol below uses AdamW beta2 {T34_BETAS[1]:g} and the log-variance floor "
          f"{_floor_label(_protocol_floor())} for every arm (plans.T34_BETAS, plans.T34_LOGVAR_FLOOR).", "")
    _power(s, cells)
    return s.finish()
