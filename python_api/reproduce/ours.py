"""Our results for a report section: the setup sentence, the check against the current plan,
the chosen grid point per arm as table rows, and the dead runs left out of comparisons."""

from __future__ import annotations

import json
import os

from .markdown import Section
from .paper import LABELS
from .plans import Plan, plan, point_slug
from .results import IGNORED_FIELDS, chosen_cells, load_results, run_health, stored_config

__all__ = ["describe_ours", "stale_fields", "our_results", "chosen_rows", "best_val_bpd", "leave_out_dead",
           "dead_seeds"]


def describe_ours(results: list, p: Plan) -> str:
    """One sentence on our setup, read from the result files."""
    if not results:
        return ""
    r0 = results[0]
    c = r0["config"]
    grids = sorted({json.dumps(r["point"], sort_keys=True) for r in results})
    seeds = sorted({r["seed"] for r in results})
    return (f"Ours ({p.scale} scale, from the result files): {c['dataset']}, {r0['n_train']:,} training / "
            f"{r0['n_val']:,} validation ({r0['val_source']}) images, test on {r0.get('test_source')}; "
            f"batch {c['batch_size']}, d = {c['latent_dim']}, encoder channels {c['enc_channels']}; "
            f"{len(results)} cells, seeds {seeds}, grid points {', '.join(grids)}; "
            f"{sum(r['wall_time_s'] for r in results) / 3600:.2f} core-hours in total")


def stale_fields(results: list, p: Plan) -> list:
    """The training fields in which result files differ from the current plan's arms (results
    made under an earlier plan): ["field: plan value vs result value (n files)", ...]."""
    arms = {a.key: a for a in p.arms}
    diffs: dict = {}
    for r in results:
        arm = arms.get(r["arm"])
        if arm is None:
            continue
        config = stored_config(r)
        for field, value in arm.overrides.items():
            if field in IGNORED_FIELDS or field in arm.grid or field in arm.inherit:
                continue
            have = config.get(field)
            if have != value and not (isinstance(value, (list, tuple)) and list(value) == have):
                diffs.setdefault((field, json.dumps(value), json.dumps(have)), []).append(r)
        for field, values in arm.grid.items():
            if config.get(field) not in values:
                diffs.setdefault((field, "grid " + json.dumps(values), json.dumps(config.get(field))), []).append(r)
        protocol = {"test checkpoint": (p.test_checkpoint, "best" if r.get("test_epoch") is not None else "last"),
                    "test draws per image": (p.test_samples, r.get("test_samples")),
                    "IWAE samples": ((p.iwae or {}).get("samples"), (r.get("iwae") or {}).get("samples"))}
        for field, (want, have) in protocol.items():
            if want is not None and have != want:
                diffs.setdefault((field, json.dumps(want), json.dumps(have)), []).append(r)
    return [f"{f}: plan {v}, result {h} ({len(rs)} files)" for (f, v, h), rs in sorted(diffs.items())]


def our_results(s: Section, results_dir: str, preset: str, scale: str) -> tuple:
    """(plan, result folder, results) of ``preset`` at ``scale``; adds to ``s`` the lines that
    state our scale and setup, and a warning when result files were made under an earlier plan."""
    p = plan(preset, scale, None)
    folder = os.path.join(results_dir, preset, scale)
    results = load_results(folder)
    s.add(f"Scale: {p.scale_note}. Budget, estimated before running: {p.budget}.", "",
          describe_ours(results, p) + ".", "")
    stale = stale_fields(results, p)
    if stale:
        s.add("**Results from an earlier plan.** The result files below were not made with the plan described "
              "above (the numbers are theirs, the scale line is the plan's); they differ in "
              + "; ".join(stale[:6]) + (f"; and {len(stale) - 6} more" if len(stale) > 6 else "") + ".", "")
    return p, folder, results


def chosen_rows(results: list, keys, seeds: list, n_columns: int, values) -> tuple:
    """One table row per arm in ``keys``: its label, its chosen grid point and ``values(choice,
    cells)``, or a "no complete result" row padded to ``n_columns``. Returns (rows, {arm: cells})
    for the arms that have a choice."""
    rows, per = [], {}
    for key in keys:
        c, rs = chosen_cells(results, key, seeds)
        if c is None:
            rows.append((LABELS[key], "no complete result", *[""] * (n_columns - 2)))
            continue
        per[key] = rs
        rows.append((LABELS[key], point_slug(c["point"]), *values(c, rs)))
    return rows, per


def best_val_bpd(r: dict) -> float:
    """The lowest validation BPD over a cell's epochs."""
    return min(rec["val_bpd"] for rec in r["curve"] if rec.get("val_bpd") is not None)


def leave_out_dead(s: Section, per: dict) -> dict:
    """``per`` without its dead runs (``run_health``), naming them in ``s``."""
    dead = [(k, r) for k, rs in per.items() for r in rs if run_health(r)["dead"]]
    if dead:
        s.add("Dead runs, left out of every comparison below (with their pair on the same seed): " + "; ".join(
            f"{LABELS[k]} seed {r['seed']} ({run_health(r)['why']})" for k, r in dead) + ".", "")
    live = {k: [r for r in rs if not run_health(r)["dead"]] for k, rs in per.items()}
    return {k: rs for k, rs in live.items() if rs}


def dead_seeds(rs: list) -> str:
    return ", ".join(f"seed {r['seed']}" for r in rs if run_health(r)["dead"]) or "none"
