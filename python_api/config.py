"""``TrainConfig``: every knob of a training run, its validation, and the presets.

``TrainConfig.validate`` checks types (a JSON config cannot smuggle a string into a number),
ranges, and options that do not apply to the rest of the config; every failure is a
``UsageError`` naming the field (``--flag`` form: ``lr`` is ``--lr``) with the expected and the
actual value. Checks that need the file system or the machine (data paths, devices,
backends) live in ``data.py`` and ``distributed.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from . import data as data_mod
from .errors import UsageError
from .estimators import check_estimator
from .models import DECODERS, LATENTS, LOG_TERMS, VARIANCES
from .objectives import check_objective

__all__ = ["TrainConfig", "PRESETS", "paper_schedule", "make_config", "flag"]


def flag(name: str) -> str:
    """The command-line spelling of a config field (``train_limit`` -> ``--train-limit``)."""
    return "--" + name.replace("_", "-")


_CHOICES = {
    "dataset": data_mod.DATASETS, "val_split": ("auto", "test", "holdout"),
    "eval_dequant": ("noise", "center"), "arch": ("auto", "mnist", "strided"), "latent": LATENTS,
    "decoder": DECODERS, "variance": VARIANCES, "log_term": LOG_TERMS,
    "backend": ("auto", "torch", "cpp", "triton", "cuda"),
}
_POSITIVE_INTS = ("latent_dim", "categories", "epochs", "batch_size", "eval_batch_size", "eval_samples",
                  "gradvar_batch", "eval_every", "val_size", "vl_samples")
_OPTIONAL_POSITIVE_INTS = ("groups", "train_limit", "val_limit", "num_threads", "cutoff_epoch")
_NONNEGATIVE_FLOATS = ("lr", "lr_mu", "lr_alpha", "weight_decay", "linear_init_scale", "anneal_rate")
_CHANNEL_COUNTS = {"mnist": (3, 5), "strided": (4, 4)}   # (encoder, decoder) layers per arch


def _bad(name: str, expected: str, value) -> UsageError:
    return UsageError(f"{flag(name)}: expected {expected}, got {value!r}")


def _type_ok(value, annotation: str) -> bool:
    if annotation.startswith("Optional["):
        return value is None or _type_ok(value, annotation[len("Optional["):-1])
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "list":
        return isinstance(value, list)
    return True


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the ``cpu`` scale; see ``PRESETS``."""

    # data
    dataset: str = "digits"             # digits | mnist | fashion-mnist | cifar10 | imagenet32
    data_root: Optional[str] = None     # folder of the files (not needed for digits)
    val_split: str = "auto"             # test | holdout | auto (test split when the set has one)
    val_size: int = 500                 # images held out of train when val_split = holdout
    train_limit: Optional[int] = None   # use only the first N training images (fixed shuffle)
    val_limit: Optional[int] = None     # use only the first N validation images
    eval_dequant: str = "noise"         # noise (fixed-seed U[0,1/256)) | center (bin centre)
    # model
    arch: str = "auto"                  # auto | mnist (Tables 5/6) | strided (Tables 7/8)
    latent: str = "gaussian"            # gaussian | bernoulli
    latent_dim: int = 200               # d (the paper: 200); categorical: G * K, set by --groups
    groups: Optional[int] = None        # categorical latents: G one-hot groups (latent_dim = G * categories)
    categories: int = 2                 # categorical latents: K categories per group
    decoder: str = "linear"             # linear | nonlinear | dual
    variance: str = "fixed"             # fixed | scalar | learned (precision head / log-var map) | logvar (linear log-variance head)
    log_term: str = "taylor"            # precision head's E[log v^2] in training: taylor (paper, approximate) | exact (Gaussian latents) | auto
    sigma2: float = 0.01                # fixed variance, or initial variance when learned
    logvar_floor: Optional[float] = None  # nonlinear log-variance floor (None: log 1/(12*256^2))
    enc_channels: Optional[list] = None   # None: (8, 16, 16) mnist / (64, 128, 256, 512) strided
    dec_channels: Optional[list] = None   # None: (8, 16, 16, 16, 16) / (512, 256, 128, 64)
    backend: str = "auto"               # analytic_nll backend
    linear_init_scale: Optional[float] = None  # linear head W init x this (None: 1 Gaussian, 0.01 Bernoulli)
    # estimator
    estimator: str = "silent"           # silent | reparam | gumbel | reinforce | variance-loss
    temperature: float = 0.5            # gumbel
    straight_through: bool = False      # gumbel
    reinforce_decay: float = 0.99       # running-average baseline
    vl_samples: int = 4                 # variance-loss samples per image
    # companion objective (objectives.py): elbo, or m1 = analytic M1 score matching for the
    # linear decoder with KL-based inference for the encoder (variational-score-matching Prop. 3.1)
    objective: str = "elbo"             # elbo | m1 (m1: decoder linear, variance fixed/scalar)
    # Algorithm 1 (decoder = dual)
    anneal_rate: float = 0.01           # lambda in w_lin = max(0, 1 - epoch * lambda)
    cutoff_epoch: Optional[int] = None  # 1-based epoch from which the encoder is frozen
    # optimisation
    epochs: int = 20                    # total epochs (may be raised on --resume)
    batch_size: int = 64                # global batch size
    lr: float = 5e-4                    # encoder and nonlinear decoder (and a linear-only head)
    lr_mu: Optional[float] = None       # dual mode: mu head (None: lr)
    lr_alpha: Optional[float] = None    # dual mode: alpha head (None: lr)
    betas: list = field(default_factory=lambda: [0.9, 0.95])   # AdamW betas (the paper)
    weight_decay: float = 0.01          # AdamW (PyTorch's default; the paper does not say)
    seed: int = 0                       # init, data order and latent draws
    device: str = "cpu"                 # cpu | cuda (cuda:LOCAL_RANK under torchrun)
    num_threads: Optional[int] = None   # torch.set_num_threads (None: torch default)
    # evaluation and logging
    eval_every: int = 1                 # validate every N epochs (and after the last)
    eval_batch_size: int = 500          # images per evaluation batch
    eval_samples: int = 1               # latent draws per image for a nonlinear decoder's NLL
    gradvar_epochs: list = field(default_factory=list)   # 1-based epochs to log Table 1 variance
    gradvar_draws: int = 100            # latent draws for the gradient variance
    gradvar_batch: int = 64             # size of its fixed validation batch
    save_epochs: list = field(default_factory=list)      # extra checkpoint snapshots
    keep_best: bool = False             # also keep the weights of the lowest validation BPD (checkpoints/best.pt)
    figures: bool = True                # write figures/*.png at the end
    progress: bool = True               # tqdm progress bars

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        if not isinstance(values, dict):
            raise UsageError(f"a config must be a JSON object of TrainConfig fields, got a "
                             f"{type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> "TrainConfig":
        """Raise ``UsageError`` naming the first invalid field; returns ``self``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, str(f.type)):
                raise _bad(f.name, f"a value of type {f.type}", value)
            if isinstance(value, float) and not math.isfinite(value):
                raise _bad(f.name, "a finite number", value)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise _bad(name, f"one of {', '.join(allowed)}", getattr(self, name))
        try:
            check_estimator(self.estimator, self.latent)
            check_objective(self)                                   # companion: objective m1
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.latent == "categorical" and self.latent_dim % self.categories:
            raise _bad("latent_dim", f"a multiple of --categories {self.categories} (G groups of K)",
                       self.latent_dim)
        if self.decoder == "nonlinear" and self.estimator == "silent":
            raise UsageError("--estimator silent needs the linear analytic head: use --decoder linear "
                             "or --decoder dual (Algorithm 1), got --decoder nonlinear")
        for name in _POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise _bad(name, "an integer >= 1", getattr(self, name))
        for name in _OPTIONAL_POSITIVE_INTS:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise _bad(name, "an integer >= 1 (or none)", getattr(self, name))
        if not 0 <= self.seed < 2**63:
            raise _bad("seed", "an integer in [0, 2^63)", self.seed)
        if self.gradvar_draws < 2:
            raise _bad("gradvar_draws", "an integer >= 2 (a variance needs two draws)", self.gradvar_draws)
        for name in ("sigma2", "temperature"):
            if not getattr(self, name) > 0:
                raise _bad(name, "a number > 0", getattr(self, name))
        for name in _NONNEGATIVE_FLOATS:
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise _bad(name, "a number >= 0", getattr(self, name))
        if not 0 <= self.reinforce_decay < 1:
            raise _bad("reinforce_decay", "a number in [0, 1)", self.reinforce_decay)
        if self.estimator == "variance-loss" and self.vl_samples < 2:
            raise _bad("vl_samples", "an integer >= 2 for the variance loss", self.vl_samples)
        if len(self.betas) != 2 or not all(_type_ok(b, "float") and 0 <= b < 1 for b in self.betas):
            raise _bad("betas", "two numbers in [0, 1) (AdamW's beta1,beta2)", self.betas)
        for name in ("enc_channels", "dec_channels"):
            self._check_channels(name)
        for name in ("save_epochs", "gradvar_epochs"):
            epochs = getattr(self, name)
            if not all(_type_ok(e, "int") and 1 <= e <= self.epochs for e in epochs):
                raise _bad(name, f"1-based epochs within 1..{self.epochs} (--epochs)", epochs)
        if self.decoder != "dual":
            for name in ("cutoff_epoch", "lr_mu", "lr_alpha"):
                if getattr(self, name) is not None:
                    raise UsageError(f"{flag(name)} applies to --decoder dual (Algorithm 1) only, got "
                                     f"--decoder {self.decoder}")
        if self.val_split == "test" and not data_mod.has_test_split(self.dataset):
            raise UsageError(f"--val-split test: data set {self.dataset!r} has no test split; use "
                             "--val-split holdout (or auto)")
        return self

    def _check_channels(self, name: str) -> None:
        widths = getattr(self, name)
        if widths is None:
            return
        if not widths or not all(_type_ok(w, "int") and w >= 1 for w in widths):
            raise _bad(name, "a comma-separated list of integer widths >= 1 (or none for the defaults)",
                       widths)
        if self.arch != "auto":
            self.check_channel_count(self.arch)

    def check_channel_count(self, arch: str) -> None:
        """The channel lists must have one width per layer of ``arch``'s encoder / decoder."""
        for name, count in zip(("enc_channels", "dec_channels"), _CHANNEL_COUNTS[arch]):
            widths = getattr(self, name)
            if widths is not None and len(widths) != count:
                raise _bad(name, f"{count} widths for the {arch!r} architecture", widths)


# ------------------------------------------------------------------------- presets

PRESETS = {
    # Finishes on a 2-core CPU: the embedded digits, narrow convolutions, 20 epochs.
    "cpu": dict(dataset="digits", epochs=20, batch_size=64, lr=5e-4, latent_dim=200,
                enc_channels=[8, 16, 16], dec_channels=[8, 16, 16, 16, 16], eval_batch_size=500),
    # The paper's settings (Appendix B.3), for a GPU. Epochs and batch sizes depend on the
    # data set and experiment; see paper_schedule. Learning rate: the middle of the paper's
    # grid {1e-4, 5e-4, 1e-5, 5e-5}; search it per method as the paper did.
    "paper": dict(dataset="mnist", latent_dim=200, lr=1e-4, sigma2=0.01,
                  eval_batch_size=1000),
}


def paper_schedule(values: dict) -> dict:
    """The paper's epochs, batch size and channel widths (Appendix B.3) for the data set,
    decoder, variance and estimator in ``values``."""
    dataset = values.get("dataset", "mnist")
    decoder = values.get("decoder", "linear")
    estimator = values.get("estimator", "silent")
    if dataset == "cifar10":
        return dict(epochs=2000, batch_size=256, enc_channels=[64, 128, 256, 512],
                    dec_channels=[512, 256, 128, 64])
    if dataset == "imagenet32":
        return dict(epochs=100, batch_size=128, enc_channels=[64, 128, 256, 512],
                    dec_channels=[512, 256, 128, 64])
    if decoder == "linear" and values.get("variance", "fixed") == "fixed":
        epochs = 500                                    # Section 3.2: converged by epoch 500
    else:
        epochs = 300 if estimator == "reinforce" else 200   # B.3, learnable variance on MNIST
    return dict(epochs=epochs, batch_size=64, enc_channels=[32, 64, 64],
                dec_channels=[64, 64, 64, 64, 64])


def make_config(preset: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """Defaults, then the preset, then ``overrides`` (explicit values always win)."""
    overrides = dict(overrides or {})
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        values.update(PRESETS[preset])
        if preset == "paper":
            values.update(paper_schedule({**values, **overrides}))
    values.update(overrides)
    if values.get("groups") is not None:       # categorical: --groups G sets d = G * K
        values["latent_dim"] = values["groups"] * values.get("categories", TrainConfig.categories)
    return TrainConfig.from_dict(values).validate()
