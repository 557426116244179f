"""The report's sections, one per paper table or companion result: the paper's numbers,
ours from the result files (test metrics of the chosen grid point, mean and 95% interval over
seeds), the scale difference and a verdict per claim.

Each ``section_*`` returns a ``markdown.Section``; ``scale`` is None when the preset has no
results yet.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from .markdown import Section, figure_link, format_ci_log, format_mean_ci
from .ours import chosen_rows, dead_seeds, leave_out_dead, our_results
from .paper import LABELS, PAPER
from .plans import CATEGORICAL_ARMS, TABLE2_ARMS, plan, point_slug
from .results import load_results, per_seed
from .statistics import format_value, verdict_better, verdict_similar

__all__ = ["section_table1", "section_table2", "section_ppca", "section_m1",
           "section_categorical"]


def _first_epoch_at(r: dict, milestone: float) -> Optional[int]:
    """The first epoch whose validation BPD is at or below ``milestone`` (None: never)."""
    for rec in r["curve"]:
        if rec.get("val_bpd") is not None and rec["val_bpd"] <= milestone:
            return rec["epoch"]
    return None


def _convergence(s: Section, per: dict, paper: dict) -> None:
    """The convergence claim of Table 2: epochs until silent and reparam reach a BPD milestone."""
    finals = {k: sum(r["final_val"]["bpd"] for r in per[k]) / len(per[k]) for k in ("silent-gaussian", "reparam")}
    milestone = max(finals.values()) + 0.01
    epochs = {}
    for k in ("silent-gaussian", "reparam"):
        epochs[k] = {}
        for r in per[k]:
            e = _first_epoch_at(r, milestone)
            epochs[k][r["seed"]] = e if e is not None else r["epochs_done"] + 1
    s.add(f"Convergence milestone (rule: the worse of the two arms' mean final validation BPD plus "
          f"0.01 bits, as the paper's 6.73 lies 0.008 above its 6.722): **{milestone:.4f}** bits/dim. "
          f"First epoch at or below it (validation curve; not reached = epochs + 1): "
          f"silent {[epochs['silent-gaussian'][s_] for s_ in sorted(epochs['silent-gaussian'])]}, "
          f"reparam {[epochs['reparam'][s_] for s_ in sorted(epochs['reparam'])]} "
          f"(paper: {paper['silent-gaussian']} vs {paper['reparam']} at {paper['bpd']}).", "")
    s.claim("Silent Gradients (continuous) reaches the BPD milestone in fewer epochs than "
            "reparameterization (paper: 45 vs 90)",
            verdict_better(epochs["silent-gaussian"], epochs["reparam"], what="epochs"))


def _expected_mse(r: dict) -> float:
    """E_q||x - u(z)||^2 of a fixed-variance cell: logged, or recovered from its test NLL =
    E||x - u||^2 / (2 sigma^2) + k/2 log(2 pi sigma^2) (exact for a linear decoder, an estimate over
    the test draws for a nonlinear one)."""
    t = r["test"]
    if "mse_expected" in t:
        return t["mse_expected"]
    sigma2 = r["config"]["sigma2"]
    k = round((t["nll"] + t["kld"]) / ((t["bpd"] - 8.0) * math.log(2)))   # pixels, from the BPD definition
    return 2.0 * sigma2 * (t["nll"] - 0.5 * k * math.log(2 * math.pi * sigma2))


def _mse_definitions(s: Section, per: dict, paper: dict) -> None:
    """Which MSE definition the paper's Table 2 matches better: the arm order (pairs ordered as in
    the paper) and the mean |log(ours / paper)| over the arms."""
    keys = [k for k in TABLE2_ARMS if k in per]
    if len(keys) < 2:
        return
    lines = []
    for label, value in (("at E[z]", lambda r: r["test"]["mse"]), ("expected", _expected_mse)):
        ours = {k: sum(value(r) for r in per[k]) / len(per[k]) for k in keys}
        pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
        same = sum((ours[a] - ours[b]) * (paper[a]["mse"] - paper[b]["mse"]) > 0 for a, b in pairs)
        dist = sum(abs(math.log(ours[k] / paper[k]["mse"])) for k in keys) / len(keys)
        lines.append(f"{label}: {same} of {len(pairs)} arm pairs ordered as in the paper, mean |log(ours / "
                     f"paper)| = {dist:.3f}")
    s.add("Which MSE the paper reports (our means vs its Table 2; scales differ, so the order is the "
          "stronger evidence): " + "; ".join(lines) + ".", "")


def section_table2(results_dir, scale, out_path, figures: bool) -> tuple:
    paper = PAPER["table2"]
    s = Section("Paper (MNIST, linear decoder, sigma^2 = 0.01, d = 200, epoch 500; MSE = per-image sum):", "")
    s.table(["method", "BPD", "MSE"],
            [(LABELS[k], paper[k]["bpd"], paper[k]["mse"]) for k in
             TABLE2_ARMS])
    s.add(f"Convergence (paper, Section 3.2): Silent Gradients reaches BPD {paper['milestone']['bpd']} in "
          f"{paper['milestone']['silent-gaussian']} epochs, reparameterization in "
          f"{paper['milestone']['reparam']}.", "")
    if scale is None:
        return s.no_results("`silent-vae reproduce run table2 --scale cpu`"), {}
    p, folder, results = our_results(s, results_dir, "table2", scale)
    rows, per = chosen_rows(
        results, [a.key for a in p.arms], p.choice_seeds, 7,
        lambda c, rs: (format_mean_ci([r["test"]["bpd"] for r in rs]),
                       format_mean_ci([r["test"]["mse"] for r in rs]),
                       format_mean_ci([_expected_mse(r) for r in rs]),
                       format_mean_ci([r["test"]["kld"] for r in rs]),
                       ", ".join(f"{point_slug(t['point'])}: {format_value(t['val_bpd'])}" for t in c["table"])))
    s.add("Ours (test metrics of the chosen grid point, mean [95% interval] over seeds). The paper does "
          "not define its MSE; both readings are given: the squared error of the decoder mean at "
          "z = E[z] ('at E[z]') and the expected squared error E_q||x - (Wz + b)||^2 ('expected', exact: "
          "2 sigma^2 (NLL - k/2 log(2 pi sigma^2)) from the test NLL of the fixed-variance head):", "")
    s.table(["method", "chosen", "BPD", "MSE at E[z]", "MSE expected", "KLD", "validation BPD per grid point"],
            rows)
    _mse_definitions(s, per, paper)
    metrics = (("bpd", "BPD", lambda r: r["test"]["bpd"], "bpd"),
               ("mse", "MSE (at E[z])", lambda r: r["test"]["mse"], "mse"),
               ("mse_expected", "MSE (expected)", _expected_mse, "mse"))
    for _, label, value, paper_key in metrics:
        for a_key, b_key in (("silent-gaussian", "reparam"), ("silent-bernoulli", "gumbel"),
                             ("silent-bernoulli", "reinforce")):
            if a_key in per and b_key in per:
                v = verdict_better(per_seed(per[a_key], value), per_seed(per[b_key], value), what=label)
                s.claim(f"{LABELS[a_key]} has a lower {label} than {LABELS[b_key]} "
                        f"(paper: {paper[a_key][paper_key]} vs {paper[b_key][paper_key]})", v)
    if "silent-gaussian" in per and "reparam" in per:
        _convergence(s, per, paper["milestone"])
    if figures and per:
        s.curves(per, ("val_bpd", "val_mse", "val_kld"), folder, out_path, "Table 2 (seed means)",
                 "Table 2 validation curves")
        s.add(*figure_link(os.path.join(folder, "figures", "reconstructions.png"), out_path, "Table 2 reconstructions"))
    return s.finish(), per


def section_table1(scale, per2: dict) -> Section:
    """Table 1 from the Table 2 cells ``per2`` (arm -> chosen cells), which logged the variances."""
    paper = PAPER["table1"]
    s = Section(f"Paper (total encoder-gradient variance, epochs {paper['epochs']}; 100 latent draws on a "
                "fixed batch, batch size not stated):", "")
    s.table(["method", *[f"epoch {e}" for e in paper["epochs"]]],
            [(LABELS[k], *[f"{v:.2e}" if v else "0" for v in paper[k]]) for k in
             TABLE2_ARMS])
    if scale is None:
        return s.no_results("`silent-vae reproduce run table1 --scale cpu`, i.e. the cells of table2")
    cfg = next((rs[0]["config"] for rs in per2.values() if rs), {})
    s.add(f"Ours: measured on the Table 2 runs (as in the paper, Section 3.2, which uses the same model): "
          f"a fixed batch of {cfg.get('gradvar_batch', '?')} validation images, {cfg.get('gradvar_draws', '?')} "
          "latent draws, per-parameter variance of the encoder gradient summed over the encoder "
          "(MATH.md §9).", "")
    rows, vals, points = [], {}, None
    for key, (_, est) in TABLE2_ARMS.items():
        rs = per2.get(key, [])
        if not rs:
            continue
        pts = sorted({int(e) for r in rs for e in r["gradvar"]})
        points = points or pts
        vals[key] = {e: per_seed(rs, lambda r, e=e, est=est: r["gradvar"][str(e)][est]["total"]) for e in pts}
        ident = all(r["gradvar"][str(e)][est]["bit_identical"] for r in rs for e in pts if str(e) in r["gradvar"])
        rows.append((LABELS[key], *[format_ci_log(list(vals[key][e].values())) for e in pts],
                     "yes" if ident else "no"))
    if not rows:
        s.add("No Table 2 results with gradient variances yet.", "")
        return s
    s.add(f"Ours ({scale} scale; each estimator on its own run at the chosen learning rate; epochs {points}; "
          "geometric mean over seeds [95% interval computed on log10]):", "")
    s.table(["method", *[f"epoch {e}" for e in points], "all draws bit-identical"], rows)
    for key in ("silent-gaussian", "silent-bernoulli"):
        if key in vals:
            allzero = all(v == 0.0 for e in vals[key] for v in vals[key][e].values())
            ident = all(r["gradvar"][str(e)]["silent"]["bit_identical"] for r in per2[key]
                        for e in points if str(e) in r["gradvar"])
            s.claim(f"{LABELS[key]}: the encoder-gradient variance is exactly 0 at every point",
                    {"verdict": "reproduced" if allzero and ident else "not reproduced",
                     "reason": f"total variance 0 and every draw bit-identical on all seeds and points: "
                               f"{allzero and ident}"})
    stoch = [k for k in ("reparam", "gumbel", "reinforce") if k in vals]
    if stoch:
        pos = all(v > 0 for k in stoch for e in vals[k] for v in vals[k][e].values())
        s.claim("the stochastic estimators have a nonzero variance at every point",
                {"verdict": "reproduced" if pos else "not reproduced",
                 "reason": f"all totals > 0: {pos}"})
    if "reinforce" in vals and "gumbel" in vals:
        verdicts = []
        for e in points:
            a = {k: math.log10(v) for k, v in vals["gumbel"][e].items() if v > 0}
            b = {k: math.log10(v) for k, v in vals["reinforce"][e].items() if v > 0}
            verdicts.append((e, verdict_better(a, b, what="log10 variance")))
        worst = ("not reproduced" if any(v["verdict"] == "not reproduced" for _, v in verdicts) else
                 "reproduced" if all(v["verdict"] == "reproduced" for _, v in verdicts) else "inconclusive")
        s.claim("REINFORCE has a larger variance than Gumbel-Softmax at every point (paper: ~240-2,000x)",
                {"verdict": worst, "reason": "; ".join(f"epoch {e}: {v['verdict']} ({v['reason']})"
                                                       for e, v in verdicts)})
    if "reparam" in vals and len(points) >= 2:
        first = {k: math.log10(v) for k, v in vals["reparam"][points[0]].items() if v > 0}
        last = {k: math.log10(v) for k, v in vals["reparam"][points[-1]].items() if v > 0}
        s.claim("the reparameterization variance decreases from the first to the last point "
                "(paper: 1.08e5 to 1.37e4)", verdict_better(last, first, what="log10 variance, first - last"))
    return s.finish()


def section_ppca(results_dir, scale, out_path, figures: bool) -> Section:
    s = Section("Paper (Fig. 1(a), Appendix C): on pPCA data (H = 2, D = 10, 10,000 points, sigma_gen = 0.1) "
                "the linear VAE's ELBO and the three-entropies sum both converge to the pPCA maximum "
                "log-likelihood; with sigma^2 fixed at a suboptimal value a finite gap between ELBO and "
                "entropy sum remains. (A figure only: no table of numbers.)", "")
    if scale is None:
        return s.no_results("`silent-vae reproduce run ppca --scale cpu`")
    p = plan("ppca", scale)
    results = [r for r in load_results(os.path.join(results_dir, "ppca", scale)) if "learned" in r]
    if not results:
        return s.no_results()
    s.add(f"Scale: {p.scale_note}.", "")
    rows = []
    for r in sorted(results, key=lambda r: r["seed"]):
        L, F = r["learned"]["final"], r["fixed"]["final"]
        rows.append((r["seed"], f"{L['ppca_max_loglik']:.5f}", f"{L['elbo']:.5f}", format_value(L["elbo_minus_ppca"]),
                     format_value(L["gap"]), f"{F['gap']:.4f}", f"{F['predicted_gap']:.4f}",
                     f"{r['setting']['wrong_sigma2']:g}",
                     f"{r['wall_time_s']:.1f}"))
    s.table(["seed", "pPCA max log-lik", "ELBO (learned sigma^2)", "ELBO - pPCA", "ELBO - entropy sum",
             "gap, wrong fixed sigma^2", "predicted D/2 - E||x-g||^2/(2 sigma^2)", "wrong sigma^2", "s"], rows)
    tol = 1e-3
    ok1 = all(abs(r["learned"]["final"]["elbo_minus_ppca"]) <= tol for r in results)
    ok2 = all(abs(r["learned"]["final"]["gap"]) <= tol for r in results)
    gaps = [abs(r["fixed"]["final"]["gap"]) for r in results]
    ok3 = all(g >= 100 * tol for g in gaps)
    worst = lambda key: max(abs(r["learned"]["final"][key]) for r in results)  # noqa: E731
    s.claim("the ELBO converges to the pPCA maximum log-likelihood (test: |ELBO - pPCA| <= 1e-3 nats "
            "per sample on every seed)", {"verdict": "reproduced" if ok1 else "not reproduced",
                                          "reason": f"largest |ELBO - pPCA| = {format_value(worst('elbo_minus_ppca'))}"})
    s.claim("the ELBO converges to the three-entropies sum (test: |ELBO - sum| <= 1e-3 on every seed)",
            {"verdict": "reproduced" if ok2 else "not reproduced",
             "reason": f"largest |ELBO - sum| = {format_value(worst('gap'))}"})
    s.claim("with sigma^2 fixed at a wrong value a finite gap remains (test: |gap| >= 0.1 nats on every "
            "seed)", {"verdict": "reproduced" if ok3 else "not reproduced",
                      "reason": f"smallest |gap| = {min(gaps):.4f}"})
    if figures:
        from ..ppca import ppca_figure
        fig = ppca_figure(sorted(results, key=lambda r: r["seed"]),
                          os.path.join(results_dir, "ppca", scale, "figures", "ppca.png"),
                          title="Linear VAE on pPCA data (their Fig. 1(a))")
        s.add(*figure_link(fig, out_path, "pPCA curves"))
    return s.finish()


def section_m1(results_dir, scale, out_path, figures: bool) -> Section:
    s = Section("Paper (variational score matching, Section 5.2 and Fig. 4): D_KL-M1 'gave learning "
                "trajectories almost identical to the D_KL-ELBO on all metrics for all datasets' (negative "
                "ELBO, MSE, latent MMD, posterior FD; ConvNets on 32x32 MNIST / Fashion / CelebA). Figure only.",
                "")
    if scale is None:
        return s.no_results("`silent-vae reproduce run m1 --scale cpu`")
    p, folder, results = our_results(s, results_dir, "m1", scale)
    rows, per = chosen_rows(
        results, ("elbo", "m1"), p.choice_seeds, 6,
        lambda c, rs: (format_mean_ci([-r["test"]["elbo"] for r in rs]),
                       format_mean_ci([r["test"]["mse"] for r in rs]),
                       format_mean_ci([r["test"]["bpd"] for r in rs]),
                       format_mean_ci([r["test"].get("entropy_gap") for r in rs])))
    s.table(["objective", "chosen", "negative ELBO (nats)", "MSE", "BPD",
             "ELBO - entropy sum (companion 1 diagnostic)"], rows)
    if "elbo" in per and "m1" in per:
        for metric, fn, margin in (("negative ELBO", lambda r: -r["test"]["elbo"], 0.02),
                                   ("MSE", lambda r: r["test"]["mse"], 0.05)):
            s.claim(f"D_KL-M1 behaves like D_KL-ELBO in {metric}",
                    verdict_similar(per_seed(per["m1"], fn), per_seed(per["elbo"], fn), margin=margin,
                                    what=metric))
    if figures and per:
        s.curves(per, ("val_bpd", "val_mse", "val_kld"), folder, out_path, "M1 vs ELBO (seed means)",
                 "M1 vs ELBO curves")
    return s.finish()


def _own_gradvar(rs: list) -> dict:
    """epoch -> {seed: total encoder-gradient variance of the arm's own estimator}."""
    est = rs[0]["config"]["estimator"]
    epochs = sorted({int(e) for r in rs for e in r["gradvar"]})
    return {e: {r["seed"]: r["gradvar"][str(e)][est]["total"] for r in rs if str(e) in r["gradvar"]} for e in epochs}


def section_categorical(results_dir, scale, out_path, figures: bool) -> Section:
    s = Section("Not in the paper: one-hot categorical latents (MATH.md §12), where the linear decoder's "
                "loss is still exact and its encoder gradient has zero variance. The setting of categorical "
                "VAEs (Jang et al. 2017): G = 20 groups of K = 10 categories, a uniform prior; Silent "
                "Gradients against Gumbel-Softmax, its straight-through variant and REINFORCE, first with "
                "the linear decoder of Table 2, then with the nonlinear decoder alone and guided by "
                "Algorithm 1.", "")
    if scale is None:
        return s.no_results("`silent-vae reproduce run categorical --scale cpu`")
    p, folder, results = our_results(s, results_dir, "categorical", scale)
    linear = [k for k, (dec, *_) in CATEGORICAL_ARMS.items() if dec == "linear"]
    rows, per = chosen_rows(
        results, list(CATEGORICAL_ARMS), p.choice_seeds, 8,
        lambda c, rs: (format_mean_ci([r["test"]["bpd"] for r in rs]),
                       format_mean_ci([r["test"]["mse"] for r in rs]),
                       format_mean_ci([_expected_mse(r) for r in rs]),
                       format_mean_ci([r["test"]["kld"] for r in rs]), dead_seeds(rs),
                       ", ".join(f"{point_slug(t['point'])}: {format_value(t['val_bpd'])}" for t in c["table"])))
    s.add("Ours (test metrics of the chosen point after the last epoch, 1 latent draw per image for the "
          "nonlinear decoder; mean [95% interval] over seeds; MSE at E[z] and expected as in Table 2, the "
          "expected one exact for the linear decoder and a one-draw estimate for the nonlinear one; a dead run "
          "ends at the mean image's MSE or with every code constant):", "")
    s.table(["method", "chosen", "BPD", "MSE (at E[z])", "MSE (expected)", "KLD", "dead runs",
             "validation BPD per grid point"], rows)
    every = per
    per = leave_out_dead(s, per)
    var = {k: _own_gradvar(per[k]) for k in linear if k in per and per[k][0]["gradvar"]}
    if var:
        points = sorted({e for v in var.values() for e in v})
        s.add("Encoder-gradient variance of each arm's own estimator on its own run (Table 1's measure; "
              "geometric mean over seeds [95% interval on log10]):", "")
        s.table(["method", *[f"epoch {e}" for e in points]],
                [(LABELS[k], *[format_ci_log(list(v.get(e, {}).values())) for e in points]) for k, v in var.items()])
    if "cat-silent" in every and every["cat-silent"][0]["gradvar"]:   # the estimator's property: every run
        zero = all(t == 0.0 for v in _own_gradvar(every["cat-silent"]).values() for t in v.values())
        ident = all(r["gradvar"][e]["silent"]["bit_identical"] for r in every["cat-silent"] for e in r["gradvar"])
        s.claim("Silent Gradients (categorical): the encoder-gradient variance is exactly 0 at every point",
                {"verdict": "reproduced" if zero and ident else "not reproduced",
                 "reason": f"total variance 0 and every draw bit-identical on all seeds and points: {zero and ident}"})
    for other in ("cat-gumbel", "cat-gumbel-st", "cat-reinforce"):
        if "cat-silent" in per and other in per:
            for label, value in (("BPD", lambda r: r["test"]["bpd"]), ("MSE (at E[z])", lambda r: r["test"]["mse"]),
                                 ("MSE (expected)", _expected_mse)):
                s.claim(f"Silent Gradients (categorical) has a lower {label} than {LABELS[other]}",
                        verdict_better(per_seed(per["cat-silent"], value), per_seed(per[other], value), what=label))
    if "cat-silent" in per and "cat-gumbel" in per:
        finals = [sum(r["final_val"]["bpd"] for r in per[k]) / len(per[k]) for k in ("cat-silent", "cat-gumbel")]
        milestone = max(finals) + 0.01
        epochs = {k: {r["seed"]: (_first_epoch_at(r, milestone) or r["epochs_done"] + 1) for r in per[k]}
                  for k in linear if k in per}
        s.add(f"Milestone (the worse of Silent Gradients' and Gumbel-Softmax's mean final validation BPD plus "
              f"0.01, as for Table 2): **{milestone:.4f}** bits/dim; first epoch at or below it (not reached = "
              "epochs + 1): " + "; ".join(f"{LABELS[k]} {[e[s_] for s_ in sorted(e)]}" for k, e in epochs.items())
              + ".", "")
        s.claim("Silent Gradients (categorical) reaches the milestone in fewer epochs than Gumbel-Softmax",
                verdict_better(epochs["cat-silent"], epochs["cat-gumbel"], what="epochs"))
    for base in ("cat-gumbel-nl", "cat-reinforce-nl"):
        if base in per and base + "+sg" in per:
            s.claim(f"{LABELS[base]}: with SG (Algorithm 1) has a lower BPD than without",
                    verdict_better(per_seed(per[base + "+sg"], lambda r: r["test"]["bpd"]),
                                   per_seed(per[base], lambda r: r["test"]["bpd"]), what="BPD"))
    if "cat-sg" in per and "cat-reinforce-nl" in per:
        s.claim("SG alone (categorical, nonlinear decoder) has a lower BPD than REINFORCE",
                verdict_better(per_seed(per["cat-sg"], lambda r: r["test"]["bpd"]),
                               per_seed(per["cat-reinforce-nl"], lambda r: r["test"]["bpd"]), what="BPD"))
    if figures and per:
        s.curves(per, ("val_bpd", "val_mse", "val_kld"), folder, out_path, "Categorical latents (seed means)",
                 "categorical validation curves")
    return s.finish()
