"""The report section of Tables 3-4 (learned variance, Algorithm 1): the chosen arms' test metrics
(ELBO-based BPD and the importance-weighted bound), the SG-alone linear heads' own bounds, dead
runs, the power of the runs and the paper's claims."""

from __future__ import annotations

import itertools
import math
import os
import statistics

from .diagnosis import POWER_HEADER, POWER_RULE, power_row
from .markdown import Section, figure_link, format_mean_ci
from .ours import best_val_bpd, chosen_rows, dead_seeds, leave_out_dead, our_results
from .paper import LABELS, PAPER
from .plans import DATASETS, TABLE34_ARMS, TABLE34_EXTRA_ARMS
from .results import per_seed, run_health
from .statistics import format_value, mean_ci, pooled_sd, seeds_needed, verdict_better

__all__ = ["section_table34", "paired_spread"]


def _describe_protocol(s: Section, cells: list) -> None:
    """How the reported test metrics were measured, read from the result files."""
    best = [r for r in cells if r.get("test_epoch") is not None]
    draws = sorted({r.get("test_samples", r["config"].get("eval_samples", 1)) for r in cells})
    iwae = sorted({(r["iwae"]["samples"], r["iwae"]["n"]) for r in cells if r.get("iwae")})
    checkpoint = ("the best-validation checkpoint" if len(best) == len(cells) else
                  "the last epoch" if not best else f"the best-validation checkpoint for {len(best)} of {len(cells)} cells")
    s.add(f"Ours: test metrics of the chosen point at {checkpoint}; nonlinear decoder, test NLL averaged over "
          f"{' / '.join(map(str, draws))} latent draw(s) per image; IWAE BPD: the importance-weighted bound "
          + (", ".join(f"with S = {a} samples on the first {b} test images" for a, b in iwae) if iwae
             else "(not measured for these cells)")
          + ". 'val BPD, last / best epoch': validation BPD after the last epoch and the lowest over all "
          "epochs (where they differ a lot the learned-variance decoder jumped). A saturated epoch has every "
          "discrete code constant (validation KLD = d ln 2); a dead run is saturated or at the mean image's "
          "MSE at the reported checkpoint.", "")


def _table34_power(s: Section, live: dict) -> None:
    """What these runs' seed spread says about the seeds each Table 3 difference needs."""
    rows = []
    for label, value in (("test (reported checkpoint)", lambda r: r["test"]["bpd"]),
                         ("validation, best epoch", best_val_bpd)):
        sd, df = pooled_sd([[value(r) for r in rs] for rs in live.values()])
        if sd is not None:
            rows.append(power_row(label, sd, df))
    if rows:
        s.add(f"Power of these runs: their seed spread pooled over the arms (live runs only) and the seeds per "
              f"arm each Table 3 difference would need ({POWER_RULE}):", "")
        s.table(POWER_HEADER, rows)


PAIRED_EFFECT = 0.11   # bits: the paper's reparam vs reparam+SG and Gumbel vs Gumbel+SG differences


def paired_spread(s: Section, live: dict) -> None:
    """How much of the seed spread pairing by seed removes: the standard deviation of per-seed test
    BPD differences of every two arms with at least three common seeds, beside the unpaired
    sqrt(sd_a^2 + sd_b^2) of the same seeds."""
    bpd = {arm: per_seed(live[arm], lambda r: r["test"]["bpd"])
           for arm in TABLE34_ARMS + TABLE34_EXTRA_ARMS if arm in live}
    rows = []
    for a, b in itertools.combinations(bpd, 2):
        common = sorted(set(bpd[a]) & set(bpd[b]))
        if len(common) < 3:
            continue
        xa, xb = [bpd[a][i] for i in common], [bpd[b][i] for i in common]
        paired = statistics.stdev([u - v for u, v in zip(xa, xb)])
        unpaired = math.sqrt(statistics.variance(xa) + statistics.variance(xb))
        rows.append((LABELS[a], LABELS[b], len(common), f"{paired:.3g}", f"{unpaired:.3g}",
                     seeds_needed(paired, PAIRED_EFFECT), seeds_needed(unpaired, PAIRED_EFFECT)))
    if rows:
        s.add("Pairing: the claims compare arms seed by seed (same seed = same data order, and the same "
              "initialisation where the architectures agree). The spread of the per-seed test BPD differences "
              "of the arms that have run so far, against the spread the same seeds would have unpaired, and "
              f"the seeds a {PAIRED_EFFECT}-bit difference would need with each (two-sided 5% level, 80% power):", "")
        s.table(["arm A", "arm B", "common seeds", "sd of A - B (bits)", "unpaired sd (bits)",
                 f"seeds for {PAIRED_EFFECT} bits, paired", "unpaired"], rows)


def _sg_alone_linear_heads(s: Section, per: dict) -> None:
    """SG alone trains its encoder through the linear learned-variance head: that head's own bound,
    exact where a closed form exists (Gaussian latents) and the Taylor value beside it."""
    rows = []
    for key in ("sg-gaussian", "sg-gaussian-exact", "sg-bernoulli"):
        rs = [r for r in per.get(key, []) if "bpd_linear" in r["test"]]
        if not rs:
            continue
        kinds = {r["test"].get("bpd_linear_kind", "exact" if r["config"]["latent"] == "gaussian"
                                else "taylor-approximation") for r in rs}
        taylor = [r["test"]["bpd_linear_taylor"] for r in rs if "bpd_linear_taylor" in r["test"]]
        rows.append((LABELS[key], rs[0]["config"].get("log_term", "taylor"),
                     format_mean_ci([r["test"]["bpd_linear"] for r in rs]),
                     " / ".join(sorted(kinds)), format_mean_ci(taylor) if taylor else "-",
                     format_mean_ci([r["test"]["bpd"] for r in rs])))
    if rows:
        s.add("SG alone, its linear learned-variance head (the decoder its encoder was trained through) on the "
              "test split: the bound with the exact log term where one exists (Gaussian latents; the precision "
              "head on Bernoulli latents has none, so its value is the Taylor approximation), the Taylor value "
              "the paper's arm was trained on, and the nonlinear decoder's BPD of the table above:", "")
        s.table(["arm", "trained with", "linear head BPD", "kind", "linear head BPD, Taylor", "nonlinear decoder BPD"],
                rows)
    _exact_vs_taylor_training(s, per)


def _exact_vs_taylor_training(s: Section, per: dict) -> None:
    """What training SG alone with the exact log term changes, paired by seed (no paper claim)."""
    parts = []
    for what, metric in (("the nonlinear decoder's test BPD", "bpd"), ("the linear head's exact bound", "bpd_linear")):
        exact = per_seed(per.get("sg-gaussian-exact", []), lambda r: r["test"][metric])
        taylor = per_seed(per.get("sg-gaussian", []), lambda r: r["test"][metric])
        ci = mean_ci([exact[i] - taylor[i] for i in sorted(set(exact) & set(taylor))])
        if ci["n"] >= 2:
            parts.append(f"{what} {format_value(ci['mean'])} [{format_value(ci['lo'])}, {format_value(ci['hi'])}] "
                         f"bits (n = {ci['n']})")
    if parts:
        s.add("SG alone (continuous) trained with the exact log term minus trained with the paper's Taylor term, "
              "paired by seed (mean [95% interval]; positive: the exact-trained arm is worse): " + "; ".join(parts)
              + ". An interval that contains 0 means no difference these seeds can detect.", "")


def _with_power(v: dict, a: dict, b: dict, effect: float, unit: str) -> dict:
    """An inconclusive verdict gets the power analysis that says why: the seeds the observed paired
    spread would need to detect the paper's difference ``effect`` (two-sided 5% level, 80% power)."""
    if v["verdict"] != "inconclusive":
        return v
    d = [a[i] - b[i] for i in sorted(set(a) & set(b))]
    if len(d) < 3:   # fewer than 2 already says "no interval"
        return v if len(d) < 2 else {**v, "reason": v["reason"] + "; 2 paired seeds are too few for a power analysis"}
    sd = statistics.stdev(d)
    return {**v, "reason": v["reason"] + (
        f"; power: the paired sd {sd:.3g} {unit} over {len(d)} seeds needs {seeds_needed(sd, effect)} paired "
        f"seeds to detect the paper's difference of {effect:.3g} {unit} (two-sided 5%, 80% power)")}


def _claim_better(s: Section, text: str, per: dict, live: dict, arm_a: str, arm_b: str, metric: str,
                  paper: dict, lower_is_better: bool = True) -> None:
    """Claim "arm_a is better than arm_b in ``metric``" on the live runs, paired by seed, with its
    power where inconclusive; an arm without a live result makes the claim inconclusive and says why."""
    missing = [f"{LABELS[arm]} has {'only dead runs' if arm in per else 'no complete result yet'}"
               for arm in (arm_a, arm_b) if arm not in live]
    if missing:
        s.claim(text, {"verdict": "inconclusive", "reason": "; ".join(missing)})
        return
    a = per_seed(live[arm_a], lambda r: r["test"][metric])
    b = per_seed(live[arm_b], lambda r: r["test"][metric])
    v = verdict_better(a, b, lower_is_better=lower_is_better, what=metric.upper())
    unit = "bits" if metric == "bpd" else "nats"
    s.claim(text, _with_power(v, a, b, abs(paper[arm_a] - paper[arm_b]), unit))


def _claims(s: Section, per: dict, live: dict, dataset: str) -> None:
    """The paper's Tables 3-4 claims, every one listed whether or not its arms have run."""
    bpd, kld = PAPER["table3"][dataset], PAPER["table4"][dataset]
    for est in ("reparam", "gumbel", "reinforce"):
        _claim_better(s, f"{LABELS[est]}: with SG has a lower BPD than without (paper: {bpd[est + '+sg']} vs "
                      f"{bpd[est]})", per, live, est + "+sg", est, "bpd", bpd)
        _claim_better(s, f"{LABELS[est]}: with SG has a higher KLD than without (paper: {kld[est + '+sg']} vs "
                      f"{kld[est]})", per, live, est + "+sg", est, "kld", kld, lower_is_better=False)
    _claim_better(s, f"SG alone (discrete) has a lower BPD than REINFORCE without SG (paper: {bpd['sg-bernoulli']} "
                  f"vs {bpd['reinforce']})", per, live, "sg-bernoulli", "reinforce", "bpd", bpd)


def section_table34(results_dir, preset, scale, out_path, figures: bool) -> Section:
    dataset = DATASETS[preset]
    s = Section(f"Paper ({dataset}, learnable variance; BPD = Table 3, KLD = Table 4):", "")
    s.table(["method", "BPD", "KLD"], [(LABELS[k], PAPER["table3"][dataset][k], PAPER["table4"][dataset][k])
                                       for k in TABLE34_ARMS])
    if scale is None:
        return s.no_results(f"`silent-vae reproduce run {preset} --scale "
                            f"{'cpu' if preset == 'table34' else 'paper --data PATH'}`")
    p, folder, results = our_results(s, results_dir, preset, scale)
    rows, per = chosen_rows(
        results, TABLE34_ARMS + TABLE34_EXTRA_ARMS, p.choice_seeds, 10,
        lambda c, rs: (format_mean_ci([r["test"]["bpd"] for r in rs]),
                       format_mean_ci([r["iwae"]["bpd"] for r in rs if r.get("iwae")]) if any(
                           r.get("iwae") for r in rs) else "-",
                       format_mean_ci([r["test"]["kld"] for r in rs]),
                       format_mean_ci([r["test"]["mse"] for r in rs]),
                       format_mean_ci([r["final_val"]["bpd"] for r in rs]),
                       format_mean_ci([best_val_bpd(r) for r in rs]),
                       sum(run_health(r)["saturated_epochs"] for r in rs), dead_seeds(rs)))
    _describe_protocol(s, [r for rs in per.values() for r in rs])
    s.table(["method", "chosen", "BPD", "IWAE BPD", "KLD", "MSE", "val BPD, last epoch", "val BPD, best epoch",
             "saturated epochs", "dead runs"], rows)
    _sg_alone_linear_heads(s, per)
    live = leave_out_dead(s, per)
    _table34_power(s, live)
    paired_spread(s, live)
    _claims(s, per, live, dataset)
    if figures and per:
        s.curves(per, ("val_bpd", "val_kld"), folder, out_path, "Tables 3-4 (seed means)",
                 "Tables 3-4 validation curves")
        figure = figure_link(os.path.join(folder, "figures", "reconstructions.png"), out_path,
                             "Tables 3-4 reconstructions and learned std")
        if figure:
            s.add("Eight validation images through each arm's chosen point, its first seed, at the checkpoint its "
                  "test metrics were measured on; the 'std' rows show the decoder's learned standard deviation.", "")
            s.add(*figure)
    return s.finish()
