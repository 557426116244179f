"""What the exact learned-variance likelihoods buy, measured (issue "Exact learned-variance
likelihoods", item 5): linear learned-variance VAEs on MNIST at the cpu scale.

Arms (Gaussian latents, linear decoder, the cpu preset otherwise):
    precision-taylor   the paper's precision head trained on the Taylor log term
    precision-exact    the same head trained on the exact log term
    logvar             the log-variance head (exact)
Every model is evaluated on the MNIST test split with the exact bound (``evaluate``: the
precision heads with the exact log term whatever they were trained with); for each model the
Taylor value of the same model is also recorded, so (a) the Taylor error of trained models in
nats per image and (b) the arms against each other on the exact bound come from the same runs.

    python -m silent_kernels.api.exact_heads_study run --data-root ../shared/data/mnist
    python -m silent_kernels.api.exact_heads_study report

``run`` is resumable (one small JSON per (arm, seed) under docs/results/exact_heads/cpu/; an
existing file is skipped); ``report`` writes docs/exact_heads.md and its figure from those files.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import data as data_mod
from .checkpoints import read_json, write_json_atomic
from .evaluate import bits_per_dim, eval_images, evaluate
from .reproduce.statistics import format_value, mean_ci, verdict_better
from .train import Trainer, make_config

__all__ = ["ARMS", "run", "report"]

ARMS = {
    "precision-taylor": dict(variance="learned", log_term="taylor"),
    "precision-exact": dict(variance="learned", log_term="exact"),
    "logvar": dict(variance="logvar"),
}
SCALE = dict(dataset="mnist", train_limit=10_000, val_split="holdout", val_size=2_000, epochs=10,
             decoder="linear", latent="gaussian", estimator="silent", figures=False, progress=False)
SEEDS = (0, 1, 2)
RESULTS = os.path.join("docs", "results", "exact_heads", "cpu")
TEST_IMAGES = 5_000


def _taylor_nll(model, images, cfg) -> float:
    """The Taylor-term NLL (nats per image) of a precision-head model on the evaluation data."""
    y = eval_images(images, cfg.eval_dequant, cfg.seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, y.shape[0], cfg.eval_batch_size):
            yb = y[start:start + cfg.eval_batch_size]
            q = model.posterior(yb).moments()
            total += float(model.linear.nll(yb, q, log_term="taylor").double().sum())
    return total / y.shape[0]


def run_cell(arm: str, seed: int, data_root: str, out_dir: str, runs_dir: str) -> dict:
    path = os.path.join(out_dir, f"{arm}-seed{seed}.json")
    if os.path.isfile(path):
        return read_json(path)
    cfg = make_config("cpu", {**SCALE, **ARMS[arm], "seed": seed, "data_root": data_root})
    run_dir = os.path.join(runs_dir, f"{arm}-seed{seed}")
    resume = os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt"))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, resume=resume, log=lambda m: None)
    trainer.fit()
    images, _ = data_mod.load_dataset(cfg.dataset, cfg.data_root, "test")
    images = images[:TEST_IMAGES]
    test = evaluate(trainer.model, images, cfg)
    k = math.prod(images.shape[1:])
    out = {"arm": arm, "seed": seed, "config": cfg.to_dict(), "test_images": int(images.shape[0]),
           "train_seconds": round(time.perf_counter() - t0, 1),
           "test_bpd": test["bpd"], "test_bpd_kind": test["bpd_kind"], "test_nll": test["nll"],
           "test_kld": test["kld"], "test_mse": test["mse"]}
    if arm.startswith("precision"):
        taylor = _taylor_nll(trainer.model, images, cfg)
        out.update(test_nll_taylor=taylor, test_bpd_taylor=bits_per_dim(taylor, test["kld"], k),
                   taylor_error_nats=test["nll"] - taylor)
    write_json_atomic(out, path)
    return out


def run(data_root: str, out_dir: str = RESULTS, runs_dir: str = "runs/exact_heads", arms=None, seeds=SEEDS) -> None:
    for seed in seeds:
        for arm in arms or ARMS:
            res = run_cell(arm, seed, data_root, out_dir, runs_dir)
            print(f"{arm} seed {seed}: test bpd {res['test_bpd']:.4f} ({res['test_bpd_kind']})", flush=True)


def _load(out_dir: str) -> dict:
    cells: dict = {}
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if name.endswith(".json"):
            r = read_json(os.path.join(out_dir, name))
            cells.setdefault(r["arm"], {})[r["seed"]] = r
    return cells


def _ci_text(values) -> str:
    ci = mean_ci(values)
    if ci["mean"] is None:
        return "–"
    if ci["lo"] is None:
        return f"{format_value(ci['mean'])} (n = 1)"
    return f"{format_value(ci['mean'])} [{format_value(ci['lo'])}, {format_value(ci['hi'])}] (n = {ci['n']})"


def report(out_dir: str = RESULTS, doc: str = os.path.join("docs", "exact_heads.md")) -> str:
    """Write the Markdown report (and its figure) from the result files; returns its path."""
    cells = _load(out_dir)
    lines = ["# Exact learned-variance likelihoods, measured", "",
             "Generated by `python -m silent_kernels.api.exact_heads_study report` from "
             f"`{out_dir}/`. Linear decoder, Gaussian latents (d = 200), MNIST: "
             f"{SCALE['train_limit']:,} training images, {SCALE['epochs']} epochs, the `cpu` preset "
             f"otherwise; test metrics on the first {TEST_IMAGES:,} test images; 95% t-intervals over seeds.",
             "", "Every BPD below is the exact bound (the precision heads are evaluated with the exact "
             "log term whatever they were trained with), except the column *Taylor BPD*: the same "
             "model's value under the paper's Taylor log term, which is not a bound.", "",
             "| arm | seeds | test BPD (exact bound) | Taylor BPD of the same model | Taylor error (nats/image) | MSE |",
             "|---|---:|---|---|---|---|"]
    for arm in ARMS:
        runs = cells.get(arm, {})
        if not runs:
            continue
        rows = list(runs.values())
        tay = [r.get("test_bpd_taylor") for r in rows] if arm.startswith("precision") else []
        err = [r.get("taylor_error_nats") for r in rows] if arm.startswith("precision") else []
        lines.append(f"| {arm} | {len(rows)} | {_ci_text([r['test_bpd'] for r in rows])} | "
                     f"{_ci_text(tay) if tay else '–'} | {_ci_text(err) if err else '–'} | "
                     f"{_ci_text([r['test_mse'] for r in rows])} |")
    lines += ["", "Paired comparisons on the exact test BPD (lower is better; verdicts from the paired "
              "95% interval):", ""]
    per_seed = {arm: {s: r["test_bpd"] for s, r in runs.items()} for arm, runs in cells.items()}
    for a, b in (("precision-exact", "precision-taylor"), ("logvar", "precision-taylor"),
                 ("logvar", "precision-exact")):
        if a in per_seed and b in per_seed:
            v = verdict_better(per_seed[a], per_seed[b], what="test BPD")
            lines.append(f"- {a} better than {b}: **{v['verdict']}** — {v['reason']}.")
    figure = _figure(cells, os.path.join(out_dir, "figures", "exact_heads.png"))
    if figure:
        lines += ["", f"![test BPD per arm]({os.path.relpath(figure, os.path.dirname(doc))})"]
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    with open(doc, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return doc


def _figure(cells: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from .plots import save_figure
    arms = [a for a in ARMS if a in cells]
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, arm in enumerate(arms):
        exact = [r["test_bpd"] for r in cells[arm].values()]
        ax.scatter([i] * len(exact), exact, color="C0", label="exact bound" if i == 0 else None)
        if arm.startswith("precision"):
            taylor = [r["test_bpd_taylor"] for r in cells[arm].values()]
            ax.scatter([i + 0.15] * len(taylor), taylor, color="C3", marker="x",
                       label="Taylor value (not a bound)" if i == 0 else None)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("test bits/dim")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m silent_kernels.api.exact_heads_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="train and evaluate the missing cells (resumable)")
    r.add_argument("--data-root", required=True, help="folder with the MNIST IDX files")
    r.add_argument("--arms", type=lambda s: s.split(","), default=None, help=f"subset of {','.join(ARMS)}")
    r.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=list(SEEDS))
    sub.add_parser("report", help="write docs/exact_heads.md from the results")
    args = parser.parse_args(argv)
    if args.action == "run":
        unknown = set(args.arms or ()) - set(ARMS)
        if unknown:
            parser.error(f"--arms: unknown arm(s) {sorted(unknown)}; expected a subset of {list(ARMS)}")
        run(args.data_root, arms=args.arms, seeds=args.seeds)
    else:
        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
