"""Result files: one small JSON per cell (``<out>/<preset>/<scale>/<cell>.json``), written
by the runner and read by the report, and the grid point each arm chose from them.

The rule of ``choose`` is the paper's: the grid point with the lowest mean *validation* BPD of
the reported checkpoint (the last epoch, or the best one where the cell was tested on its best
checkpoint); screened grids (``Plan.screen_seeds``) are compared on the seeds every point ran.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

# config fields that do not change a cell's result (machine-specific)
IGNORED_FIELDS = ("data_root", "num_threads", "progress", "figures", "device")


def cell_identity(config: dict) -> dict:
    """The fields that define a cell's result (machine-specific ones dropped)."""
    return {k: v for k, v in config.items() if k not in IGNORED_FIELDS}


def stored_config(r: dict) -> dict:
    """A result file's config with every field it predates at its default (the default is the
    old behaviour whenever a field is added)."""
    from ..config import TrainConfig
    return {**cell_identity(TrainConfig().to_dict()), **r.get("config", {})}

__all__ = ["RESULT_FORMAT", "IGNORED_FIELDS", "cell_identity", "stored_config", "write_json", "read_json", "load_results", "choose", "chosen_cells",
           "per_seed", "reported_val_bpd", "run_health", "DEAD_MSE_FRACTION"]

RESULT_FORMAT = 1


def write_json(path: str, obj) -> None:
    """Write ``obj`` to ``path`` atomically (temp file + rename), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


def load_results(folder: str) -> list:
    """Every cell JSON in ``folder`` (sorted by name)."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            try:
                out.append(read_json(os.path.join(folder, name)))
            except (OSError, json.JSONDecodeError):
                continue
    return out


DEAD_MSE_FRACTION = 0.98   # a run whose MSE is within 2% of the mean image's learned nothing from z


def reported_val_bpd(r: dict) -> Optional[float]:
    """The validation BPD of the checkpoint a cell reports: the epoch named by ``test_epoch``
    (best-checkpoint protocol) or the last epoch."""
    if r.get("test_epoch") is not None:
        return next((c["val_bpd"] for c in r["curve"] if c["epoch"] == r["test_epoch"]), None)
    return r["final_val"].get("bpd")


def _saturation_level(cfg: dict) -> Optional[float]:
    """KL(q || uniform prior) when every discrete latent is deterministic: d ln 2 for Bernoulli,
    G ln K for categorical groups; None for continuous latents."""
    if cfg.get("latent") == "bernoulli":
        return cfg["latent_dim"] * math.log(2)
    if cfg.get("latent") == "categorical":
        return cfg["groups"] * math.log(cfg["categories"])
    return None


def run_health(r: dict) -> dict:
    """Whether a finished cell is usable: ``saturated_epochs`` (validation KLD at the deterministic
    level, every discrete latent a constant code), ``dead`` and ``why``: saturated at the
    reported checkpoint, or its test MSE within 2% of the mean image's (``mean_image_mse``)."""
    level = _saturation_level(r["config"])
    sat = 0 if level is None else sum(abs(c.get("val_kld", 0.0) - level) < 1e-2 for c in r["curve"])
    why = []
    test = r.get("test") or {}
    if level is not None and test.get("kld") is not None and abs(test["kld"] - level) < 1e-2:
        why.append(f"KLD {test['kld']:.2f} = the deterministic level {level:.2f}")
    base = (r.get("mean_image_mse") or {}).get("test")
    if base and test.get("mse") is not None and test["mse"] >= DEAD_MSE_FRACTION * base:
        why.append(f"MSE {test['mse']:.1f} vs the mean image's {base:.1f}")
    return {"saturated_epochs": sat, "dead": bool(why), "why": "; ".join(why)}


def choose(results: list, arm: str, seeds: Optional[list] = None) -> Optional[dict]:
    """The chosen grid point of ``arm``. Eligible: every one of its cells finished with finite
    values and ``seeds`` (all seeds when None) are among them. Eligible points are compared on
    the seeds they all share (the screening seeds, or every seed where every point ran them):
    the lowest mean validation BPD of the reported checkpoints wins. Returns {point, score,
    seeds, table} or None."""
    by_point: dict = {}
    for r in results:
        if r.get("arm") != arm:
            continue
        by_point.setdefault(json.dumps(r["point"], sort_keys=True), {})[r["seed"]] = r
    eligible = {}
    for key, rs in by_point.items():
        ok = all(r["status"] == "ok" and reported_val_bpd(r) is not None for r in rs.values())
        if ok and (seeds is None or set(seeds) <= set(rs)):
            eligible[key] = rs
    shared = set.intersection(*(set(rs) for rs in eligible.values())) if eligible else set()
    table, best = [], None
    for key, rs in sorted(by_point.items()):
        on = sorted(shared) if key in eligible else sorted(s for s in rs if reported_val_bpd(rs[s]) is not None)
        score = sum(reported_val_bpd(rs[s]) for s in on) / len(on) if on else None
        table.append({"point": json.loads(key), "n": len(rs), "val_bpd": score, "eligible": key in eligible})
        if key in eligible and (best is None or score < best["score"]):
            best = {"point": json.loads(key), "score": score, "seeds": sorted(shared)}
    if best is None:
        return None
    best["table"] = table
    return best


def chosen_cells(results: list, arm: str, seeds: list):
    """(``choose``'s answer, the finished cells of the chosen point sorted by seed), or
    (None, []) when ``arm`` has no eligible point."""
    c = choose(results, arm, seeds)
    if c is None:
        return None, []
    rs = [r for r in results if r["arm"] == arm and r["point"] == c["point"] and r["status"] == "ok"]
    return c, sorted(rs, key=lambda r: r["seed"])


def per_seed(rs: list, fn) -> dict:
    """``{seed: float(fn(result))}`` over the results ``rs``, skipping those where ``fn`` finds
    no value (None, a missing key)."""
    out = {}
    for r in rs:
        try:
            v = fn(r)
        except (KeyError, TypeError):
            v = None
        if v is not None:
            out[r["seed"]] = float(v)
    return out
