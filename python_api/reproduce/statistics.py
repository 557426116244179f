"""Intervals over seeds and the verdict rules the report applies to every claim.

Per-seed values are dicts ``seed -> value``; comparisons pair them by seed.
"""

from __future__ import annotations

import math

__all__ = ["VERDICT_RULES", "t975", "mean_ci", "verdict_better", "verdict_similar", "format_value", "seeds_needed", "pooled_sd"]

VERDICT_RULES = """\
Verdicts are computed, not written by hand. Every interval is a two-sided 95% Student-t
interval over seeds (t quantile for n - 1 degrees of freedom). Comparisons are paired by seed
(same seed = same data order; the same initialisation where the architectures agree).

- "A is better than B" (the paper's direction): d_s = B_s - A_s for lower-is-better metrics
  (BPD, MSE, variance on a log10 scale, epochs to a milestone), A_s - B_s for higher-is-better
  ones (KLD). **reproduced** if the 95% interval of mean(d) lies above 0; **not reproduced** if
  it lies below 0 (the opposite direction is significant); **inconclusive** if it contains 0 or
  fewer than 2 paired seeds exist.
- "A behaves like B" (companion M1): r_s = (A_s - B_s) / |B_s|. **reproduced** if the 95%
  interval of mean(r) lies inside [-m, m]; **not reproduced** if it lies entirely outside;
  **inconclusive** otherwise (m is stated per claim).
- Thresholds (zero variance, pPCA convergence): **reproduced** if every seed passes the stated
  test, **not reproduced** otherwise.
"""

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 60: 2.000}


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile (table; conservative between entries)."""
    if df < 1:
        return float("nan")
    keys = [k for k in sorted(_T975) if k <= df]
    return _T975[keys[-1]] if df <= 60 else 1.96


def mean_ci(values) -> dict:
    """``{n, mean, lo, hi}`` of the finite values (None and non-finite ones dropped); the
    interval is None below two values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    m = sum(vals) / n
    if n < 2:
        return {"n": 1, "mean": m, "lo": None, "hi": None}
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    h = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "lo": m - h, "hi": m + h}


def pooled_sd(groups) -> tuple:
    """(pooled within-group standard deviation, degrees of freedom) over ``groups`` of values
    (groups with fewer than two values add nothing); (None, 0) without any df."""
    ss, df = 0.0, 0
    for vals in groups:
        vals = [float(v) for v in vals if v is not None]
        if len(vals) >= 2:
            m = sum(vals) / len(vals)
            ss += sum((v - m) ** 2 for v in vals)
            df += len(vals) - 1
    return (math.sqrt(ss / df), df) if df else (None, 0)


_Z_POWER = {0.8: 0.8416, 0.9: 1.2816}   # one-sided normal quantiles of the power


def seeds_needed(sd_diff: float, effect: float, power: float = 0.8, most: int = 1000) -> str:
    """Seeds per arm for a paired t-test (two-sided 5%) to detect a true mean difference ``effect``
    with probability ``power`` when the per-seed differences have standard deviation ``sd_diff``:
    the smallest n >= 2 with (t975(n - 1) + z_power) sd_diff / sqrt(n) <= effect; ">most" beyond."""
    z = _Z_POWER[power]
    for n in range(2, most + 1):
        if (t975(n - 1) + z) * sd_diff / math.sqrt(n) <= abs(effect):
            return str(n)
    return f">{most}"


def _paired(a: dict, b: dict, fn) -> list:
    return [fn(a[s], b[s]) for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None]


def verdict_better(a: dict, b: dict, *, lower_is_better: bool = True, what: str = "") -> dict:
    """Claim "A better than B" on per-seed values (dicts seed -> value)."""
    d = _paired(a, b, (lambda x, y: y - x) if lower_is_better else (lambda x, y: x - y))
    ci = mean_ci(d)
    sign = "B - A" if lower_is_better else "A - B"
    if ci["n"] < 2:
        return {"verdict": "inconclusive", "reason": f"{ci['n']} paired seed(s): no interval", "ci": ci}
    desc = (f"paired {sign}{(' ' + what) if what else ''} = {format_value(ci['mean'])} "
            f"[{format_value(ci['lo'])}, {format_value(ci['hi'])}] (n = {ci['n']})")
    if ci["lo"] > 0:
        return {"verdict": "reproduced", "reason": desc + ": the interval lies above 0", "ci": ci}
    if ci["hi"] < 0:
        return {"verdict": "not reproduced", "reason": desc + ": the interval lies below 0 (the opposite "
                "holds at our scale)", "ci": ci}
    return {"verdict": "inconclusive", "reason": desc + ": the interval contains 0", "ci": ci}


def verdict_similar(a: dict, b: dict, *, margin: float, what: str = "") -> dict:
    """Claim "A behaves like B": relative paired difference within +-margin."""
    r = _paired(a, b, lambda x, y: (x - y) / abs(y) if y else float("nan"))
    ci = mean_ci(r)
    if ci["n"] < 2:
        return {"verdict": "inconclusive", "reason": f"{ci['n']} paired seed(s): no interval", "ci": ci}
    desc = (f"relative paired difference{(' of ' + what) if what else ''} (A - B)/|B| = "
            f"{ci['mean']:+.2%} [{ci['lo']:+.2%}, {ci['hi']:+.2%}] (n = {ci['n']}), margin +-{margin:.0%}")
    if -margin <= ci["lo"] and ci["hi"] <= margin:
        return {"verdict": "reproduced", "reason": desc + ": inside the margin", "ci": ci}
    if ci["lo"] > margin or ci["hi"] < -margin:
        return {"verdict": "not reproduced", "reason": desc + ": entirely outside the margin", "ci": ci}
    return {"verdict": "inconclusive", "reason": desc + ": overlaps the margin's edge", "ci": ci}


def format_value(v, digits: int = 4) -> str:
    """A number for the report and the logs: '-' for None, ``digits`` significant digits,
    scientific notation outside [1e-3, 1e5)."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.3g}" if a >= 1e5 else f"{v:.2e}"
    return f"{v:.{digits}g}" if a >= 1 else f"{v:.{digits - 1}f}"
