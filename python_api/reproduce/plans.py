"""The presets: per paper table and scale, the arms (training configurations), their grids,
seeds, the stated compute budget and how our scale differs from the paper's.

Scales: ``smoke`` (the embedded digits, tiny networks, 2 seeds, seconds: CI), ``cpu`` (MNIST,
3 seeds, a stated budget for 2 cores) and ``paper`` (the paper's epochs, batch sizes and
learning-rate grid; for a GPU). ``plan(preset, scale)`` builds one preset; nothing here runs.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["SCALES", "PRESETS", "DATASETS", "BIN_LOGVAR_FLOOR", "TABLE2_ARMS", "TABLE34_ARMS", "TABLE34_EXTRA_ARMS", "CATEGORICAL_ARMS", "Arm", "Plan", "plan", "point_slug", "grid_points",
           "default_data_root", "CPU_SECONDS"]

SCALES = ("smoke", "cpu", "paper")
PRESETS = ("table1", "table2", "table34-diagnosis", "table34", "table34-cifar10", "table34-imagenet32", "ppca", "m1",
           "categorical")
# the data set each preset trains on
DATASETS = {"table1": "mnist", "table2": "mnist", "table34": "mnist", "table34-diagnosis": "mnist", "m1": "mnist",
            "categorical": "mnist",
            "table34-cifar10": "cifar10", "table34-imagenet32": "imagenet32"}
# the arms of Table 2 in the paper's row order: arm -> (latent, estimator)
TABLE2_ARMS = {"silent-gaussian": ("gaussian", "silent"), "reparam": ("gaussian", "reparam"),
               "silent-bernoulli": ("bernoulli", "silent"), "gumbel": ("bernoulli", "gumbel"),
               "reinforce": ("bernoulli", "reinforce")}
# the arms of Tables 3-4 in the paper's row order
TABLE34_ARMS = ("sg-gaussian", "reparam", "reparam+sg", "sg-bernoulli", "gumbel", "gumbel+sg", "reinforce",
                "reinforce+sg")
# ours only: SG alone (continuous) trained with the exact log term instead of the Taylor one
TABLE34_EXTRA_ARMS = ("sg-gaussian-exact",)
# the categorical-latent experiment (not in the paper): arm -> (decoder, estimator, straight-through)
CATEGORICAL_ARMS = {
    "cat-silent": ("linear", "silent", False), "cat-gumbel": ("linear", "gumbel", False),
    "cat-gumbel-st": ("linear", "gumbel", True), "cat-reinforce": ("linear", "reinforce", False),
    "cat-sg": ("dual", "silent", False), "cat-gumbel-nl": ("nonlinear", "gumbel", False),
    "cat-gumbel-nl+sg": ("dual", "gumbel", False), "cat-reinforce-nl": ("nonlinear", "reinforce", False),
    "cat-reinforce-nl+sg": ("dual", "reinforce", False),
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Arm:
    """One method of a table: its TrainConfig fields and the grid searched for it."""

    key: str
    overrides: dict                          # TrainConfig fields (the grid fields excluded)
    grid: dict = field(default_factory=dict)       # field -> candidate values (cartesian)
    inherit: dict = field(default_factory=dict)    # field -> arm key whose chosen value is used


@dataclass
class Plan:
    """A preset at one scale: its arms, seeds, budget and how it differs from the paper."""

    preset: str
    scale: str
    kind: str                                # "train" or "ppca"
    arms: list
    seeds: list
    budget: str                              # the stated compute budget
    scale_note: str                          # ours vs the paper, in words
    source: Optional[str] = None             # table1: its cells live in table2
    ppca: dict = field(default_factory=dict)  # settings of the ppca experiment
    test_split: bool = True                  # evaluate the chosen cells on the test split
    screen_seeds: Optional[list] = None      # seeds that run every grid point (None: all seeds)
    test_checkpoint: str = "last"            # "best": the lowest-validation-BPD epoch (arms keep_best)
    test_samples: Optional[int] = None       # latent draws per test image (None: the config's eval_samples)
    iwae: Optional[dict] = None              # {"samples": S, "images": N}: IWAE on the first N test images

    @property
    def cells_preset(self) -> str:
        """The preset whose cells this plan runs and reads (table1's are table2's)."""
        return self.source or self.preset

    @property
    def choice_seeds(self) -> list:
        """The seeds every grid point runs; the rest run at the chosen point only."""
        return list(self.screen_seeds) if self.screen_seeds else list(self.seeds)

    def n_cells(self) -> int:
        """How many cells (arm x grid point x seed) a full run trains; arms that share a key
        (two slices of one grid) count a shared point once."""
        n, seen = 0, set()
        for a in self.arms:
            fresh = [pt for pt in grid_points(a.grid) if (a.key, point_slug(pt)) not in seen]
            seen.update((a.key, point_slug(pt)) for pt in fresh)
            points = len(fresh)
            if not self.screen_seeds:
                n += points * len(self.seeds)
            else:
                screened = [s for s in self.seeds if s in self.screen_seeds]
                n += points * len(screened) + len(self.seeds) - len(screened)
        return n


_SHORT = {"lr": "lr", "anneal_rate": "ar", "cutoff_epoch": "co", "betas": "b", "logvar_floor": "fl"}


def _slug_value(key: str, v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "-".join(f"{x:g}" for x in v)
    if key == "logvar_floor":
        return f"{v:.2f}"
    return f"{v:.0e}" if isinstance(v, float) else str(v)


def point_slug(point: dict) -> str:
    """A grid point as a short name for folders and tables, e.g. ``lr1e-03``."""
    if not point:
        return "default"
    return "_".join(f"{_SHORT.get(k, k)}{_slug_value(k, point[k])}" for k in sorted(point))


def grid_points(grid: dict) -> list:
    """Every point of the cartesian ``grid`` (field -> candidates), keys sorted."""
    if not grid:
        return [{}]
    keys = sorted(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def default_data_root(dataset: str = "mnist") -> Optional[str]:
    """``../shared/data/<dataset>`` beside the working directory or the repository, if present."""
    name = {"mnist": "mnist", "fashion-mnist": "fashion-mnist"}.get(dataset, dataset)
    for base in (os.getcwd(), REPO_ROOT):
        path = os.path.normpath(os.path.join(base, "..", "shared", "data", name))
        if os.path.isdir(path):
            return path
    return None


# Seconds per cpu-scale epoch (10,000 training images, batch 64, plus the evaluation of the
# 2,000 holdout images), per gradient-variance point (100 draws, batch 64, every applicable
# estimator) and per final test evaluation (10,000 images): medians of the committed cpu-scale
# cells (docs/results/*/cpu, their "curve" time_s and wall_time_s), each cell single-threaded
# with two cells in parallel on this project's 2-core machine. Linear epochs took 6.6-7.4 s
# (Bernoulli) and 9.5-10.2 s (Gaussian). Nonlinear and dual epochs took 18 s in the first
# table34 cells and 45-50 s in the table34-diagnosis cells (same network, a trainer 1.7x faster
# per step in isolation): this VM's speed varies by that much between days, so the estimates
# use the slower figure. Used only for the budget estimates.
CPU_SECONDS = {"linear": 8.5, "nonlinear": 46.0, "dual": 46.0, "gradvar": 16.0,
               "test_linear": 2.5, "test_nonlinear": 6.5, "test_dual": 6.5}

_SMOKE = dict(dataset="digits", val_split="holdout", val_size=32, train_limit=64, latent_dim=8,
              enc_channels=[2, 3, 3], dec_channels=[2, 3, 3, 3, 3], batch_size=32,
              eval_batch_size=64, gradvar_draws=3, gradvar_batch=8, progress=False, figures=False,
              num_threads=1)
_CPU = dict(dataset="mnist", val_split="holdout", val_size=2000, train_limit=10_000, latent_dim=200,
            enc_channels=[8, 16, 16], dec_channels=[8, 16, 16, 16, 16], batch_size=64,
            eval_batch_size=500, gradvar_draws=100, gradvar_batch=64, progress=False, figures=False,
            num_threads=1)
_PAPER = dict(dataset="mnist", val_split="test", latent_dim=200, enc_channels=[32, 64, 64],
              dec_channels=[64, 64, 64, 64, 64], batch_size=64, eval_batch_size=1000,
              gradvar_draws=100, gradvar_batch=64, progress=False, figures=False)
_LR_GRID = {"smoke": [1e-3, 3e-3], "cpu": [5e-4, 1e-3], "paper": [1e-4, 5e-4, 1e-5, 5e-5]}
_SEEDS = {"smoke": [0, 1], "cpu": [0, 1, 2], "paper": [0, 1, 2]}
# Learning-rate screening: every grid point runs these seeds, the chosen point then runs the
# others (cpu: 4 cells per arm instead of 6; smoke: exercises the same path in CI).
_SCREEN = {"smoke": [0], "cpu": [0], "paper": None}


def _base(scale: str, data_root: Optional[str]) -> dict:
    if scale == "smoke":
        return dict(_SMOKE)
    base = dict(_CPU if scale == "cpu" else _PAPER)
    base["data_root"] = data_root
    return base


def _train_plan(preset: str, scale: str, arms: list, budget: str = "", notes: Optional[dict] = None,
                **fields) -> Plan:
    """A plan of training cells with the scale's seeds and screening; ``notes``: scale -> note."""
    return Plan(preset, scale, "train", arms, _SEEDS[scale], budget, notes[scale] if notes else "",
                screen_seeds=_SCREEN[scale], **fields)


def _cell_count(preset: str, scale: str, arms: list) -> int:
    return _train_plan(preset, scale, arms).n_cells()


def _budget(scale: str, cells: list, paper_detail: str) -> str:
    """The budget line of ``cells`` = [(kind, epochs, gradvar_points, images)], one per cell:
    at cpu scale estimated from CPU_SECONDS; at paper scale "<n> cells" + ``paper_detail``."""
    if scale == "smoke":
        return f"{len(cells)} tiny cells, seconds"
    if scale == "paper":
        return f"{len(cells)} cells{paper_detail}"
    total = 0.0
    for kind, epochs, points, images in cells:
        total += epochs * CPU_SECONDS[kind] * images / 10_000 + points * CPU_SECONDS["gradvar"] \
            + CPU_SECONDS["test_" + kind]
    return (f"{len(cells)} cells, estimated {total / 3600:.1f} core-hours single-threaded "
            f"(~{total / 7200:.1f} h wall with --jobs 2 on 2 cores)")


def _plan_table2(scale: str, data_root, source: Optional[str] = None) -> Plan:
    base = _base(scale, data_root)
    epochs = {"smoke": 3, "cpu": 30, "paper": 500}[scale]
    points = {"smoke": [1, 2, 3], "cpu": [1, 12, 30], "paper": [10, 200, 500]}[scale]
    base.update(decoder="linear", variance="fixed", sigma2=0.01, epochs=epochs, gradvar_epochs=points)
    arms = []
    for key, (latent, est) in TABLE2_ARMS.items():
        arms.append(Arm(key, {**base, "latent": latent, "estimator": est}, {"lr": _LR_GRID[scale]}))
    budget = _budget(scale, [("linear", epochs, 3, 10_000)] * _cell_count("table2", scale, arms),
                     " of 500 MNIST epochs (GPU)")
    notes = {
        "smoke": "embedded 5,000 digits (64 training images), d = 8, 3 epochs: plumbing only",
        "cpu": ("MNIST: 10,000 training images (2,000 more held out for the learning-rate choice), "
                "30 epochs (paper: 60,000 images, 500 epochs, i.e. ~100x fewer updates), encoder "
                "channels 8,16,16, lr grid {5e-4, 1e-3} (paper: {1e-4, 5e-4, 1e-5, 5e-5}) screened on "
                "seed 0 (the continuous arms ran every seed at both points), gradient "
                "variance at epochs 1 / 12 / 30 standing for the paper's 10 / 200 / 500; Bernoulli "
                "arms initialise the linear decoder's W at 0.01x nn.Linear's default (with the "
                "default every code saturated to one constant code within ~20 steps and the "
                "silent-bernoulli arm stayed at the data variance, MSE 52; the paper does not "
                "state its initialisation)"),
        "paper": "the paper's schedule (Appendix B.3): 500 epochs, batch 64, lr grid {1e-4, 5e-4, 1e-5, 5e-5}",
    }
    return _train_plan(source or "table2", scale, arms, budget, notes, source="table2" if source else None)


# The higher log-variance floor of the diagnosis: sigma = one bin width, 1/256 (the default floor,
# models.LOGVAR_FLOOR, is the variance of the U[0, 1/256) dequantisation noise, sigma ~ 0.0011).
BIN_LOGVAR_FLOOR = math.log(1.0 / 256 ** 2)


# Tables 3-4 at cpu scale, the protocol fixed by the diagnosis (docs/reproduction.md, "Tables 3-4
# diagnosis"), the same for every arm: the paper's AdamW betas, and the bin-width floor, with
# which the validation BPD stopped jumping (0 jumps > 0.5 bits in 2 seeds x 15 epochs, against
# 5 jumps of up to 2.7 bits with the default floor at the same lr 5e-4).
T34_BETAS = [0.9, 0.95]
T34_LOGVAR_FLOOR = BIN_LOGVAR_FLOOR


def _alg1_grids(scale: str, epochs: int) -> tuple:
    """Algorithm 1's grids: (anneal rate x cut-off for the 'with SG' arms, cut-off for 'SG alone')."""
    if scale == "paper":
        cut = [50, 80, 100, 150, 200]
        return {"anneal_rate": [1e-2, 5e-2, 1e-3, 5e-3], "cutoff_epoch": cut}, {"cutoff_epoch": cut}
    if scale == "smoke":
        return {"anneal_rate": [0.5, 1.0], "cutoff_epoch": [None]}, {"cutoff_epoch": [2]}
    # w_lin reaches 0 at the last epoch or at mid-training, the encoder never frozen; SG alone
    # frozen for the last fifth (the budget allows one grid dimension per arm)
    return ({"anneal_rate": [1.0 / epochs, 2.0 / epochs], "cutoff_epoch": [None]},
            {"cutoff_epoch": [round(0.8 * epochs)]})


def _plan_table34(scale: str, data_root, dataset: str = "mnist") -> Plan:
    base = _base(scale, data_root)
    if dataset != "mnist":
        if scale != "paper":
            raise ValueError(f"table34-{dataset} exists at paper scale only (it needs the {dataset} "
                             "files and a GPU); use table34 for MNIST")
        from ..train import paper_schedule
        base.update(dataset=dataset, val_split="test", **paper_schedule({"dataset": dataset}))
    epochs = {"smoke": 3, "cpu": 15, "paper": base.get("epochs", 200)}[scale]
    # REINFORCE: the paper trains 300 instead of 200 epochs on MNIST (1.5x)
    epochs_rf = {"smoke": 3, "cpu": 22, "paper": 300 if dataset == "mnist" else epochs}[scale]
    base.update(variance="learned", sigma2=0.01, epochs=epochs)
    if scale == "cpu":
        base.update(betas=list(T34_BETAS), logvar_floor=T34_LOGVAR_FLOOR, keep_best=True)
    lr = {"lr": {"smoke": _LR_GRID["smoke"], "cpu": [1e-4, 5e-4], "paper": _LR_GRID["paper"]}[scale]}
    arms = []
    for latent, est in (("gaussian", "reparam"), ("bernoulli", "gumbel"), ("bernoulli", "reinforce")):
        ep = epochs_rf if est == "reinforce" else epochs
        with_sg, _ = _alg1_grids(scale, ep)
        arms.append(Arm(est, {**base, "latent": latent, "decoder": "nonlinear", "estimator": est,
                              "epochs": ep}, dict(lr)))
        arms.append(Arm(est + "+sg", {**base, "latent": latent, "decoder": "dual", "estimator": est,
                                      "epochs": ep}, with_sg, inherit={"lr": est}))
    _, sg_cut = _alg1_grids(scale, epochs)
    for key, latent in (("sg-gaussian", "gaussian"), ("sg-bernoulli", "bernoulli")):
        arms.append(Arm(key, {**base, "latent": latent, "decoder": "dual", "estimator": "silent",
                              "log_term": "taylor"}, {**lr, **sg_cut}))
    # the same arm trained with the exact log term, at the point chosen for the Taylor one
    arms.append(Arm("sg-gaussian-exact", {**base, "latent": "gaussian", "decoder": "dual", "estimator": "silent",
                                          "log_term": "exact"}, {}, inherit={f: "sg-gaussian" for f in {**lr, **sg_cut}}))
    order = TABLE34_ARMS + TABLE34_EXTRA_ARMS
    arms.sort(key=lambda a: order.index(a.key))
    notes = {
        "smoke": "embedded digits, 64 training images, d = 8, 3 epochs: plumbing only",
        "cpu": ("MNIST: 10,000 training images (+2,000 holdout for every choice), 15 epochs (REINFORCE 22; "
                "paper: 60,000 images, 200 / 300 epochs), channels enc 8,16,16 / dec 8,16,16,16,16 "
                "(paper: not stated; our paper scale uses 32,64,64 / 64x5), 5 seeds; lr from the paper's grid "
                "{1e-4, 5e-4} (its 1e-5 and 5e-5 cannot converge in 15 epochs) screened on seed 0; "
                f"AdamW betas {T34_BETAS[0]}, {T34_BETAS[1]} and the log-variance floor "
                f"{'log 1/(12*256^2)' if T34_LOGVAR_FLOOR is None else f'log 1/256^2 = {T34_LOGVAR_FLOOR:.2f} (sigma = one bin)'} "
                "for every arm (from the diagnosis); the reported model of every cell is its best-validation checkpoint; "
                "Algorithm 1's anneal rate searched on seed 0 for the 'with SG' arms: w_lin reaching 0 at the "
                "last epoch or at mid-training (lambda in {1/E, 2/E}), the encoder never frozen; SG alone frozen "
                "at 0.8 E (paper: lambda in {1e-2, 5e-2, 1e-3, 5e-3} x cut-off in {50, 80, 100, 150, 200}; "
                "our budget allows one searched dimension per arm); Bernoulli arms' linear heads initialised at "
                "0.01x (as in table2); SG alone (continuous) also trained with the exact log term at the "
                "Taylor arm's chosen point (not in the paper)"),
        "paper": "the paper's schedule and grids (Appendix B.3)",
    }
    protocol = {"smoke": dict(test_checkpoint="best", test_samples=2, iwae={"samples": 4, "images": 16}),
                "cpu": dict(test_checkpoint="best", test_samples=10, iwae={"samples": 100, "images": 1000}),
                "paper": dict(test_samples=10, iwae={"samples": 100, "images": 1000})}[scale]
    if scale == "smoke":
        for a in arms:
            a.overrides["keep_best"] = True
    seeds = {"smoke": [0, 1], "cpu": [0, 1, 2, 3, 4], "paper": [0, 1, 2]}[scale]
    name = "table34" if dataset == "mnist" else f"table34-{dataset}"
    p = Plan(name, scale, "train", arms, seeds, "", notes[scale], screen_seeds=_SCREEN[scale], **protocol)
    cells = []
    for a in arms:
        kind = "nonlinear" if a.overrides["decoder"] == "nonlinear" else "dual"
        # 10 draws per test image and IWAE (100 draws on 1,000 images): about 2 epochs' time
        extra = 2 if scale == "cpu" else 0
        cells += [(kind, a.overrides["epochs"] + extra, 0, 10_000)] * Plan(
            name, scale, "train", [a], seeds, "", "", screen_seeds=_SCREEN[scale]).n_cells()
    p.budget = _budget(scale, cells, f" ({dataset}, GPU)")
    return p


def _plan_diagnosis(scale: str, data_root) -> Plan:
    """Why are the learned-variance runs of Tables 3-4 unstable? The reparameterisation arm of
    table34 over learning rate x AdamW beta2 x log-variance floor, two seeds per point, judged on
    validation only (no test evaluation)."""
    base = _base(scale, data_root)
    epochs = {"smoke": 3, "cpu": 15, "paper": 200}[scale]
    base.update(variance="learned", sigma2=0.01, epochs=epochs, latent="gaussian", decoder="nonlinear",
                estimator="reparam")
    factors = {"betas": [[0.9, 0.95], [0.9, 0.999]], "logvar_floor": [None, BIN_LOGVAR_FLOOR]}
    if scale == "cpu":
        # the learning rates of the protocol at the paper's beta2 and our floor, and the
        # beta2 x floor square at 5e-4 (where our first runs jumped most)
        arms = [Arm("reparam", base, {"lr": [1e-4, 5e-4], "betas": [[0.9, 0.95]], "logvar_floor": [None]}),
                Arm("reparam", base, {"lr": [5e-4], **factors})]
    else:
        arms = [Arm("reparam", base, {"lr": [1e-3] if scale == "smoke" else [1e-4, 5e-4, 1e-3], **factors})]
    seeds = {"smoke": [0], "cpu": [0, 1], "paper": [0, 1]}[scale]
    p = Plan("table34-diagnosis", scale, "train", arms, seeds, "", "", test_split=False)
    budget = _budget(scale, [("nonlinear", epochs, 0, 10_000)] * p.n_cells(), " (GPU)")
    notes = {
        "smoke": "embedded digits, 64 training images, 3 epochs: plumbing only",
        "cpu": ("the table34 reparameterisation arm at cpu scale (MNIST 10,000 training / 2,000 holdout "
                "images, 15 epochs, channels enc 8,16,16 / dec 8,16,16,16,16): lr {1e-4, 5e-4} at the paper's "
                "AdamW beta2 0.95 and our log-variance floor log 1/(12*256^2) = -13.58, and at lr 5e-4 "
                "beta2 {0.95, 0.999 (PyTorch's default)} x floor {-13.58, log 1/256^2 = -11.09 (sigma = one "
                "bin)}; seeds 0 and 1, every point on every seed, validation only (lr 1e-3, our first "
                "grid's upper end, dropped: the jumps appear at the paper's rates too)"),
        "paper": "the same grid at the paper's schedule",
    }
    return Plan("table34-diagnosis", scale, "train", arms, seeds, budget, notes[scale], test_split=False)


def _plan_m1(scale: str, data_root) -> Plan:
    base = _base(scale, data_root)
    epochs = {"smoke": 3, "cpu": 30, "paper": 500}[scale]
    base.update(decoder="linear", variance="scalar", sigma2=0.01, latent="gaussian", estimator="silent",
                epochs=epochs)
    arms = [Arm("elbo", {**base, "objective": "elbo"}, {"lr": _LR_GRID[scale]}),
            Arm("m1", {**base, "objective": "m1"}, {"lr": _LR_GRID[scale]})]
    budget = _budget(scale, [("linear", epochs, 0, 10_000)] * _cell_count("m1", scale, arms),
                     " of 500 MNIST epochs")
    notes = {
        "smoke": "embedded digits, 64 images, 3 epochs: plumbing only",
        "cpu": ("MNIST 28x28 (10,000 training images, 30 epochs), the paper's linear-decoder VAE with a "
                "learned scalar variance; that paper used 32x32 MNIST/Fashion/CelebA, DCGAN/ResNet "
                "decoders, S = 5 samples, J = 5 encoder updates per decoder update and 1,000 epochs "
                "(ours: analytic, one joint update per batch); lr grid {5e-4, 1e-3} screened on seed 0"),
        "paper": "500 epochs, batch 64, lr grid of the main paper, linear decoder",
    }
    return _train_plan("m1", scale, arms, budget, notes)


def _plan_ppca(scale: str) -> Plan:
    settings = {
        "smoke": dict(n=500, dim=6, latent=2, optimizer="lbfgs", steps=150),
        "cpu": dict(n=10_000, dim=10, latent=2, optimizer="lbfgs", steps=500, n_test=10_000),
        "paper": dict(n=10_000, dim=10, latent=2, optimizer="adam", lr=1e-3, batch_size=2000,
                      steps=20_000, n_test=10_000),
    }[scale]
    seeds = {"smoke": [0, 1], "cpu": list(range(10)), "paper": list(range(10))}[scale]
    budget = {"smoke": "2 runs, ~1 s", "cpu": "10 seeds x 2 runs, ~10 s each (float64, 1 thread)",
              "paper": "10 seeds x 2 runs of 20,000 Adam steps (minutes)"}[scale]
    note = {
        "smoke": "N = 500, D = 6, q = 2, L-BFGS 150 steps",
        "cpu": ("the paper's data (N = 10,000, D = 10, q = 2, sigma_gen = 0.1, W and mu ~ U(0, 1)), "
                "10 seeds; exact ELBO (analytic_nll) with full-batch L-BFGS, 500 steps (paper: "
                "100-sample ELBO, Adam lr 1e-3, batch 2,000)"),
        "paper": "the paper's optimiser (Adam lr 1e-3, batch 2,000), exact ELBO instead of 100 samples",
    }[scale]
    return Plan("ppca", scale, "ppca", [], seeds, budget, note, ppca=settings)


def _plan_categorical(scale: str, data_root) -> Plan:
    """Categorical latents (G groups of K), fixed variance: the linear decoder with every estimator,
    then the nonlinear decoder with and without Algorithm 1."""
    base = _base(scale, data_root)
    groups, categories = (2, 4) if scale == "smoke" else (20, 10)
    epochs = {"smoke": 3, "cpu": 20, "paper": 500}[scale]
    epochs_nl = {"smoke": 3, "cpu": 15, "paper": 200}[scale]
    points = {"smoke": [1, 3], "cpu": [1, 10, 20], "paper": [10, 200, 500]}[scale]
    base.update(latent="categorical", groups=groups, categories=categories, latent_dim=groups * categories,
                variance="fixed", sigma2=0.01)
    # the nonlinear arms: one learning rate from the paper's grid, Algorithm 1 as in table34 at cpu scale
    lr_nl = {"smoke": 1e-3, "cpu": 5e-4, "paper": 5e-4}[scale]
    anneal = {"anneal_rate": 0.5 if scale == "smoke" else 2.0 / epochs_nl, "cutoff_epoch": None}
    arms = []
    for key, (decoder, est, st) in CATEGORICAL_ARMS.items():
        fields = {**base, "decoder": decoder, "estimator": est, "straight_through": st}
        if decoder == "linear":
            arms.append(Arm(key, {**fields, "epochs": epochs, "gradvar_epochs": points}, {"lr": _LR_GRID[scale]}))
        elif key == "cat-sg":
            arms.append(Arm(key, {**fields, "epochs": epochs_nl, "lr": lr_nl,
                                  "cutoff_epoch": 3 if scale == "smoke" else 12}))
        else:
            arms.append(Arm(key, {**fields, "epochs": epochs_nl, "lr": lr_nl,
                                  **(anneal if decoder == "dual" else {})}))
    cells = []
    for a in arms:
        kind = a.overrides["decoder"]
        n_points = len(a.overrides.get("gradvar_epochs", []))
        cells += [(kind, a.overrides["epochs"], n_points, 10_000)] * _cell_count("categorical", scale, [a])
    notes = {
        "smoke": "embedded digits, 64 training images, G = 2 groups of K = 4, 3 epochs: plumbing only",
        "cpu": ("MNIST: 10,000 training images (+2,000 holdout), G = 20 groups of K = 10 one-hot categories "
                "(d = 200), fixed sigma^2 = 0.01, uniform categorical prior; linear decoder 20 epochs with "
                "lr grid {5e-4, 1e-3} screened on seed 0, gradient variance at epochs 1 / 10 / 20; nonlinear "
                "decoder (channels 8,16,16,16,16, fixed variance) 15 epochs at lr 5e-4 without a grid; "
                "Algorithm 1 as in table34 at cpu scale (w_lin annealed to 0 by mid-training, no encoder "
                "cut-off with an estimator; SG alone cut off at epoch 12); Gumbel temperature 0.5; REINFORCE "
                "with a moving-average baseline"),
        "paper": "the paper's schedule (500 epochs linear, 200 nonlinear), one learning rate for the nonlinear arms",
    }
    return _train_plan("categorical", scale, arms, _budget(scale, cells, " (GPU)"), notes)


def plan(preset: str, scale: str, data_root: Optional[str] = None) -> Plan:
    """The arms, seeds and budget of ``preset`` at ``scale``."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    if preset == "ppca":
        return _plan_ppca(scale)
    if preset in ("table1", "table2"):
        return _plan_table2(scale, data_root, source="table1" if preset == "table1" else None)
    if preset == "m1":
        return _plan_m1(scale, data_root)
    if preset == "categorical":
        return _plan_categorical(scale, data_root)
    if preset == "table34-diagnosis":
        return _plan_diagnosis(scale, data_root)
    return _plan_table34(scale, data_root, DATASETS[preset])


