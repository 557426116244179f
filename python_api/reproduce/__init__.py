"""Reproduce the paper's tables and the two companion results: presets, runner, report.

    silent-vae reproduce list [--scale cpu]                      # presets, cells, budgets
    silent-vae reproduce run table2 --scale cpu [--data ../shared/data/mnist] [--jobs 2]
    silent-vae reproduce run all --scale smoke --out /tmp/results --runs /tmp/runs
    silent-vae reproduce report [--results docs/results] [--out docs/reproduction.md]
    python -m silent_kernels.api.reproduce report                # the same

Presets (one per table; ``PRESETS``):

- ``table1``: Table 1, total encoder-gradient variance at three points of training. The paper
  measures it on the model of its Section 3.2 ("the same simple VAE ... as our gradient
  variance analysis"), so ``table1`` runs the cells of ``table2``, which log the variance of
  every applicable estimator at the three points (``gradvar_epochs``); its section of the
  report is computed from ``results/table2``.
- ``table2``: Table 2, linear decoder, sigma^2 = 0.01, d = 200; silent vs reparam (Gaussian),
  silent vs Gumbel-Softmax vs REINFORCE (Bernoulli): BPD and MSE, and the convergence claim
  (the epoch at which a BPD milestone is first reached).
- ``table34``: Tables 3-4 on MNIST: learnable variance, nonlinear decoder "without SG", dual
  decoder with Algorithm 1 "with SG", and "SG alone" (dual decoder, encoder driven by the
  analytic head only): BPD and KLD. ``table34-cifar10`` / ``table34-imagenet32``: the same at
  ``paper`` scale only, for users who have the files (``--data``).
- ``table34-diagnosis``: the reparameterisation arm of ``table34`` over learning rate x AdamW
  beta2 x log-variance floor, two seeds, validation only: why the learned-variance runs jump.
- ``ppca``: companion 1, the linear VAE on pPCA data (``ppca.py``), learned and wrong fixed sigma^2.
- ``m1``: companion 2, the linear decoder trained by the analytic M1 objective with KL-based
  inference (``objectives.py``) against the same model trained on the ELBO.

Modules, each importing only those above it:

    paper       the paper's numbers and the arms' display names
    statistics  t-intervals over seeds, the verdict rules, number formatting
    plans       scales, presets, arms, grids, seeds, budgets (``plan``)
    results     result JSON files and the grid point each arm chose (``choose``)
    runner      trains and evaluates the missing cells (``run_preset``, ``run_cell``)
    markdown    report building blocks (sections, table rows, intervals, figure links)
    diagnosis   the section on the learned-variance instability (``table34-diagnosis``) and the
                power rule (seeds needed for the paper's Tables 3-4 differences)
    ours        our results for a section: setup sentence, check against the plan, chosen rows
    table34     the Tables 3-4 section
    sections    the other sections, one per table, with their claims and verdicts
    report      ``build_report``: docs/reproduction.md from the result files alone
    command     the ``list`` / ``run`` / ``report`` command line
"""

from .command import add_parser, build_parser, main, run_command
from .paper import LABELS, PAPER
from .plans import PRESETS, SCALES, Arm, Plan, grid_points, plan, point_slug
from .report import build_report
from .results import choose, load_results
from .runner import run_cell, run_preset
from .statistics import VERDICT_RULES, mean_ci, verdict_better, verdict_similar

__all__ = ["PRESETS", "SCALES", "PAPER", "LABELS", "VERDICT_RULES", "Arm", "Plan", "plan", "grid_points",
           "point_slug", "run_preset", "run_cell", "load_results", "choose", "build_report", "mean_ci",
           "verdict_better", "verdict_similar", "add_parser", "build_parser", "run_command", "main"]
