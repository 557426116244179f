"""The reference trainer: config, data, Algorithm 1, checkpoints, resume, data parallelism.

One ``TrainConfig`` describes a run; ``Trainer(cfg, run_dir).fit()`` trains it and leaves
in ``run_dir``:

    config.json          the full config (every default resolved, channel widths included)
    run_info.json        image shape, split sizes, parameter counts, world size, versions
    metrics.jsonl        one JSON object per epoch (flat keys: val_bpd, val_mse, val_kld, ...)
    checkpoints/last.pt  written atomically every epoch (temp file + os.replace)
    checkpoints/epoch_NNNN.pt   extra snapshots at ``save_epochs``
    figures/*.png        reconstructions and training curves

Decoders (``decoder``): ``linear`` (the analytic head alone, Section 3 / 4.1), ``nonlinear``
(Table 6/8 decoder alone: the "without SG" baselines) and ``dual`` (Algorithm 1: shared
encoder, linear analytic head and nonlinear decoder).

Algorithm 1 as implemented (Section 4.2, Eq. 8). With ``epoch`` counted from 0,
``w_lin = max(0, 1 - epoch * anneal_rate)`` (so training starts at w_lin = 1.0 as the text
says) and ``w_nl = 1 - w_lin``. The encoder receives
``w_lin * grad(silent, linear head) + w_nl * grad(estimator, nonlinear decoder) + grad(KL)``,
while the linear head and the nonlinear decoder each receive the full gradient of their own
loss. This is Eq. 8 and the text ("each decoder trained"); the pseudo-code's weighted total
``w_lin L_lin + w_nl L_nl`` would also scale the decoders' own gradients and starve the
nonlinear decoder early, so it is not used. The weighting is applied with a gradient-scaling
identity on the encoder output. From the cut-off epoch on (1-based epoch ``cutoff_epoch``,
i.e. ``epoch + 1 >= cutoff_epoch``) the encoder is frozen (no gradient, eval mode) and only
the nonlinear decoder trains. With ``estimator="silent"`` in dual mode ("SG alone") the
encoder is driven by the linear head only (w_lin = 1 throughout) and the nonlinear decoder is
fitted on detached samples z ~ q (hard samples for Bernoulli latents). Separate AdamW
optimisers (betas 0.9, 0.95) for the encoder, the nonlinear decoder, the mu head and the
alpha head.

Determinism and resume: all randomness comes from three generators: the model init (global
torch RNG seeded with ``seed``), ``data`` (epoch permutations and dequantisation noise) and
``sample`` (latent draws). Checkpoints hold the model, every optimiser, all generator states
(and the global RNG), the REINFORCE baseline and the step counter; on CPU a resumed run
therefore ends bit-identical to an uninterrupted one.

Data parallelism (``torchrun --nproc_per_node N -m silent_kernels.api.cli train ...``): each
process takes a contiguous slice of every global batch; every random draw is made for the
global batch from identically seeded generators and sliced, each process's loss is its rows'
sum divided by the global batch size, and gradients are summed with ``all_reduce`` (gloo on
CPU, nccl on CUDA). The result equals the single-process run on the same global batch up to
floating-point summation order. (BatchNorm layers of the 32x32 architecture use per-process
batch statistics.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

import silent_kernels

from . import data as data_mod
from .estimators import Noise, ReinforceBaseline, check_estimator, reconstruction
from .models import (DECODERS, LATENTS, VARIANCES, VAE, Posterior, build_model, default_channels,
                     resolve_arch)
from .objectives import check_objective, m1_reconstruction

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "DataBundle", "prepare_data",
           "make_config", "PRESETS", "w_lin_at", "encoder_frozen_at", "save_atomic",
           "load_checkpoint", "scale_grad"]

CHECKPOINT_FORMAT = 1


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
    latent_dim: int = 200               # d (the paper: 200)
    decoder: str = "linear"             # linear | nonlinear | dual
    variance: str = "fixed"             # fixed | scalar | learned (precision head / log-var map)
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
    figures: bool = True                # write figures/*.png at the end
    progress: bool = True               # tqdm progress bars

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> "TrainConfig":
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        choice("dataset", data_mod.DATASETS)
        choice("val_split", ("auto", "test", "holdout"))
        choice("eval_dequant", ("noise", "center"))
        choice("arch", ("auto", "mnist", "strided"))
        choice("latent", LATENTS)
        choice("decoder", DECODERS)
        choice("variance", VARIANCES)
        check_estimator(self.estimator, self.latent)
        check_objective(self)                                   # companion: objective m1
        if self.decoder == "nonlinear" and self.estimator == "silent":
            raise ValueError("estimator 'silent' needs the linear analytic head: use decoder='linear' "
                             "or decoder='dual' (Algorithm 1)")
        for name in ("latent_dim", "epochs", "batch_size", "eval_batch_size", "eval_samples",
                     "gradvar_draws", "gradvar_batch", "eval_every", "val_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gradvar_draws < 2:
            raise ValueError("gradvar_draws must be >= 2 (a variance needs two draws)")
        for name in ("sigma2", "temperature"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "lr_mu", "lr_alpha", "weight_decay", "linear_init_scale"):
            if getattr(self, name) is not None and not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.anneal_rate < 0:
            raise ValueError(f"anneal_rate must be >= 0, got {self.anneal_rate}")
        if self.cutoff_epoch is not None and self.cutoff_epoch < 1:
            raise ValueError(f"cutoff_epoch is 1-based and must be >= 1, got {self.cutoff_epoch}")
        if self.estimator == "variance-loss" and self.vl_samples < 2:
            raise ValueError("vl_samples must be >= 2 for the variance loss")
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected two numbers, got {self.betas}")
        return self


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
            raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        values.update(PRESETS[preset])
        if preset == "paper":
            values.update(paper_schedule({**values, **overrides}))
    values.update(overrides)
    return TrainConfig.from_dict(values).validate()


# ---------------------------------------------------------------------------- data

@dataclass
class DataBundle:
    train: Tensor          # uint8 (N, C, H, W)
    val: Tensor            # uint8 (M, C, H, W)
    image_shape: tuple
    val_source: str        # "test" or "holdout"


_SPLIT_SEED = 20240607   # fixed: every seed of an experiment sees the same split


def prepare_data(cfg: TrainConfig) -> DataBundle:
    """Load the data set, split off validation and apply the limits (a fixed shuffle first,
    so limited subsets stay class-balanced even for the class-sorted digits)."""
    images, _ = data_mod.load_dataset(cfg.dataset, cfg.data_root, "train")
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    images = images[torch.randperm(images.shape[0], generator=gen)]
    source = cfg.val_split
    if source == "auto":
        source = "test" if data_mod.has_test_split(cfg.dataset) else "holdout"
    if source == "test":
        val, _ = data_mod.load_dataset(cfg.dataset, cfg.data_root, "test")
        val = val[torch.randperm(val.shape[0], generator=gen)]
        train = images
    else:
        if cfg.val_size >= images.shape[0]:
            raise ValueError(f"val_size={cfg.val_size} leaves no training images out of {images.shape[0]}")
        train, val = images[:-cfg.val_size], images[-cfg.val_size:]
    if cfg.train_limit is not None:
        train = train[:cfg.train_limit]
    if cfg.val_limit is not None:
        val = val[:cfg.val_limit]
    if train.shape[0] == 0 or val.shape[0] == 0:
        raise ValueError(f"empty split: {train.shape[0]} training and {val.shape[0]} validation images")
    return DataBundle(train.contiguous(), val.contiguous(), tuple(train.shape[1:]), source)


# ------------------------------------------------------------------ Algorithm 1 parts

def w_lin_at(cfg: TrainConfig, epoch: int) -> float:
    """Eq. 8 weight of the silent gradient at 0-based ``epoch`` (1.0 outside dual mode)."""
    if cfg.decoder != "dual":
        return 1.0
    if cfg.estimator == "silent":
        return 1.0
    return max(0.0, 1.0 - epoch * cfg.anneal_rate)


def encoder_frozen_at(cfg: TrainConfig, epoch: int) -> bool:
    return cfg.cutoff_epoch is not None and epoch + 1 >= cfg.cutoff_epoch


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None


def scale_grad(x: Tensor, weight: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``weight`` (0 detaches, 1 is a no-op)."""
    if weight == 1.0:
        return x
    if weight == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, weight)


# --------------------------------------------------------------------- checkpoints

def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: a reader (or a
    crash at any instant) sees either the old complete file or the new complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a silent-vae checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is left untouched."""


# --------------------------------------------------------------------------- trainer

def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Train one configuration in ``run_dir`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, run_dir: str, *, resume: bool = False,
                 data: Optional[DataBundle] = None, log=None):
        self.run_dir = os.path.abspath(run_dir)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.ckpt_path = os.path.join(self.ckpt_dir, "last.pt")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.rank, self.world = _dist_info()
        self.is_main = self.rank == 0
        self._log = log
        ckpt = None
        if resume:
            ckpt = load_checkpoint(self.ckpt_path)
            saved = TrainConfig.from_dict(ckpt["config"])
            if cfg.to_dict() != saved.to_dict():
                given, old = cfg.to_dict(), saved.to_dict()
                free = ("epochs", "progress", "figures")
                diff = {k: (old[k], v) for k, v in given.items()
                        if old[k] != v and k not in free
                        and not (k in ("enc_channels", "dec_channels") and v is None)}
                if diff:
                    raise ValueError(f"--resume: the config differs from the checkpoint's in {diff} "
                                     "(only epochs, progress and figures may change on resume)")
                saved = saved.replace(epochs=cfg.epochs, progress=cfg.progress, figures=cfg.figures)
            cfg = saved
        self.cfg = cfg.validate()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(cfg.device)
        self.data = data if data is not None else prepare_data(cfg)
        self.image_shape = self.data.image_shape
        if cfg.enc_channels is None or cfg.dec_channels is None:
            enc, dec = default_channels(resolve_arch(cfg.arch, self.image_shape))
            cfg = self.cfg = cfg.replace(enc_channels=cfg.enc_channels or enc,
                                         dec_channels=cfg.dec_channels or dec)

        torch.manual_seed(cfg.seed)
        self.model: VAE = build_model(cfg, self.image_shape).to(self.device)
        self.optimizers = self._make_optimizers()
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.baseline = ReinforceBaseline(cfg.reinforce_decay)
        self.epoch = 0            # completed epochs
        self.step = 0
        if self.world > 1:
            for p in self.model.state_dict().values():
                dist.broadcast(p, 0)
        if ckpt is not None:
            self._restore(ckpt)
            if self.is_main:
                self._write_json("config.json", cfg.to_dict())   # epochs may have been raised
        elif self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            if os.path.exists(self.ckpt_path):
                raise FileExistsError(f"{self.run_dir} already holds a run (checkpoints/last.pt); "
                                      "use --resume to continue it or choose another --run-dir")
            self._write_json("config.json", cfg.to_dict())
            self._write_json("run_info.json", self._run_info())
            with open(self.metrics_path, "w"):
                pass

    # -------------------------------------------------------------- construction
    def _make_optimizers(self) -> dict:
        cfg, m = self.cfg, self.model
        betas = tuple(cfg.betas)

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)

        opts = {"encoder": adamw(m.encoder.parameters(), cfg.lr)}
        if m.nonlinear is not None:
            opts["nonlinear"] = adamw(m.nonlinear.parameters(), cfg.lr)
        if m.linear is not None:
            dual = cfg.decoder == "dual"
            lr_mu = cfg.lr_mu if (dual and cfg.lr_mu is not None) else cfg.lr
            lr_alpha = cfg.lr_alpha if (dual and cfg.lr_alpha is not None) else cfg.lr
            opts["mu"] = adamw(m.linear.mu.parameters(), lr_mu)
            rest = [p for n, p in m.linear.named_parameters() if not n.startswith("mu.")]
            if rest:
                opts["alpha"] = adamw(rest, lr_alpha)
        return opts

    def _run_info(self) -> dict:
        count = lambda mod: sum(p.numel() for p in mod.parameters()) if mod is not None else 0  # noqa: E731
        return {
            "image_shape": list(self.image_shape), "n_train": int(self.data.train.shape[0]),
            "n_val": int(self.data.val.shape[0]), "val_source": self.data.val_source,
            "arch": resolve_arch(self.cfg.arch, self.image_shape),
            "params": {"encoder": count(self.model.encoder), "linear": count(self.model.linear),
                       "nonlinear": count(self.model.nonlinear)},
            "analytic_nll_backend": (self.cfg.backend if self.cfg.backend != "auto"
                                     else silent_kernels.info()["auto"].get(self.device.type)),
            "world_size": self.world, "torch": torch.__version__,
            "silent_kernels": silent_kernels.__version__, "python": platform.python_version(),
        }

    def _write_json(self, name: str, obj) -> None:
        path = os.path.join(self.run_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ state I/O
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "image_shape": list(self.image_shape),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "rng": {"data": self.data_gen.get_state(), "sample": self.sample_gen.get_state(),
                    "torch": torch.get_rng_state()},
            "baseline": None if self.baseline.value is None
            else torch.tensor(self.baseline.value, dtype=torch.float64),
        }

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
        self.data_gen.set_state(ckpt["rng"]["data"])
        self.sample_gen.set_state(ckpt["rng"]["sample"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        b = ckpt["baseline"]
        self.baseline.value = None if b is None else float(b)
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        if self.is_main:
            # drop metrics of epochs after the checkpoint (a kill between the two writes)
            kept = []
            if os.path.exists(self.metrics_path):
                with open(self.metrics_path) as fh:
                    for line in fh:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:     # a line cut short by the kill
                            continue
                        if rec.get("epoch", 0) <= self.epoch:
                            kept.append(line if line.endswith("\n") else line + "\n")
            tmp = self.metrics_path + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(kept)
            os.replace(tmp, self.metrics_path)
            for name in os.listdir(self.ckpt_dir):   # temp files of a write cut short
                if name.endswith(".tmp"):
                    os.remove(os.path.join(self.ckpt_dir, name))

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        state = self.state_dict()
        save_atomic(state, self.ckpt_path)
        if self.epoch in set(self.cfg.save_epochs):
            save_atomic(state, os.path.join(self.ckpt_dir, f"epoch_{self.epoch:04d}.pt"))

    # ------------------------------------------------------------------ one step
    def _all_reduce(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def _global_mean(self, per_image: Tensor, total: int) -> float:
        return float(self._all_reduce(per_image.detach().sum().double().reshape(1))) / total

    def _sync_grads(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def train_step(self, x: Tensor, rows: slice, total: int, epoch: int) -> dict:
        """One optimisation step on this process's rows x of a global batch of ``total``."""
        cfg, model = self.cfg, self.model
        scale = 1.0 / total
        frozen = encoder_frozen_at(cfg, epoch)
        noise = Noise(self.sample_gen, total, rows, device=self.device, dtype=x.dtype)
        est_kw = dict(scale=scale, baseline=self.baseline, temperature=cfg.temperature,
                      straight_through=cfg.straight_through, samples=cfg.vl_samples,
                      batch_mean_nll=lambda v: self._global_mean(v, total))
        if frozen:
            with torch.no_grad():
                params = model.encoder(x)
        else:
            params = model.encoder(x)
        post = Posterior(cfg.latent, params)
        kl = post.kl()
        loss = kl.sum() * scale if not frozen else torch.zeros((), device=self.device)
        stats = {"kl": kl.detach()}
        if cfg.decoder in ("linear", "nonlinear"):
            decoder = model.linear if cfg.decoder == "linear" else model.nonlinear
            if cfg.objective == "m1":   # companion objective (objectives.py): M1 decoder, KL encoder
                terms = m1_reconstruction(x, post, decoder, scale=scale)
                stats["m1"] = terms.m1
            else:
                terms = reconstruction(cfg.estimator, x, post, decoder, noise, **est_kw)
            loss = loss + terms.loss
            stats["nll"] = terms.nll
        else:
            w_lin = w_lin_at(cfg, epoch)
            if not frozen:
                lin_post = Posterior(cfg.latent, scale_grad(params, w_lin))
                lin_nll = model.linear.nll(x, lin_post.moments(), reduction="none")
                loss = loss + lin_nll.sum() * scale
                stats["nll_linear"] = lin_nll.detach()
            w_nl = 1.0 - w_lin
            nl_params = params if not frozen else params.detach()
            if cfg.estimator == "silent":
                nl_post = Posterior(cfg.latent, nl_params.detach())
                z = nl_post.hard_sample(noise.normal(nl_post.latent_dim) if cfg.latent == "gaussian"
                                        else noise.uniform(nl_post.latent_dim))
                nll = model.nonlinear.sample_nll(x, z)
                loss = loss + nll.sum() * scale
                stats["nll"] = nll.detach()
            else:
                nl_post = Posterior(cfg.latent, scale_grad(nl_params, w_nl))
                terms = reconstruction(cfg.estimator, x, nl_post, model.nonlinear, noise, **est_kw)
                loss = loss + terms.loss
                stats["nll"] = terms.nll

        loss_value = float(self._all_reduce(loss.detach().double().reshape(1)))
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self._nan_message(loss_value, epoch))
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_grads()
        for name, opt in self.optimizers.items():
            if name == "encoder" and frozen:
                continue
            if name in ("mu", "alpha") and cfg.decoder == "dual" and frozen:
                continue
            opt.step()
        self.step += 1
        out = {"surrogate": loss_value}
        for key, per_image in stats.items():
            out[key] = self._global_mean(per_image, total)
        out["loss"] = out["nll"] + out["kl"]   # the (estimated) negative ELBO per image
        if cfg.estimator == "reinforce":
            self.baseline.update(out["nll"])
        return out

    def _nan_message(self, value: float, epoch: int) -> str:
        where = f"epoch {epoch + 1}, step {self.step + 1}"
        if os.path.exists(self.ckpt_path):
            kept = f"the last good checkpoint (after epoch {self.epoch}) is kept at {self.ckpt_path}"
        else:
            kept = "no checkpoint had been written yet"
        return (f"training loss became {value} at {where}: stopping. {kept}. Try a smaller learning "
                f"rate (lr={self.cfg.lr}) or a different seed; `silent-vae train --resume "
                f"--run-dir {self.run_dir}` continues from the checkpoint.")

    # --------------------------------------------------------------------- epochs
    def _batches(self) -> list:
        n = self.data.train.shape[0]
        perm = torch.randperm(n, generator=self.data_gen)
        return [perm[i:i + self.cfg.batch_size] for i in range(0, n, self.cfg.batch_size)]

    def _rows(self, total: int) -> slice:
        return slice(self.rank * total // self.world, (self.rank + 1) * total // self.world)

    def train_epoch(self) -> dict:
        from tqdm.auto import tqdm

        cfg, epoch = self.cfg, self.epoch
        frozen = encoder_frozen_at(cfg, epoch)
        self.model.train()
        if frozen:
            self.model.encoder.eval()
        sums: dict = {}
        count = 0
        batches = self._batches()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        for idx in bar:
            total = int(idx.numel())
            images = self.data.train[idx]
            noise = torch.rand(images.shape, generator=self.data_gen)
            rows = self._rows(total)
            x = ((images[rows].float() + noise[rows]) / 256.0).to(self.device)
            out = self.train_step(x, rows, total, epoch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v * total
            count += total
            bar.set_postfix(loss=f"{out['loss']:.4g}", refresh=False)
        bar.close()
        rec = {f"train_{k}": v / count for k, v in sums.items()}
        rec["w_lin"] = w_lin_at(cfg, epoch) if cfg.decoder == "dual" else None
        rec["encoder_frozen"] = frozen
        return rec

    def evaluate(self, images: Optional[Tensor] = None) -> dict:
        from .evaluate import evaluate
        return evaluate(self.model, self.data.val if images is None else images, self.cfg,
                        device=self.device)

    def gradient_variance(self, estimators=None) -> dict:
        from .evaluate import gradient_variance_table
        return gradient_variance_table(self.model, self.data.val, self.cfg, estimators=estimators,
                                       baseline=self.baseline.value, device=self.device)

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            from tqdm.auto import tqdm
            tqdm.write(msg)

    def fit(self) -> list:
        """Train up to ``cfg.epochs`` (from the checkpoint when resumed); returns the metrics."""
        cfg = self.cfg
        if self.epoch >= cfg.epochs:
            self.log(f"{self.run_dir}: already trained for {self.epoch} epochs (epochs={cfg.epochs})")
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            rec = {"epoch": self.epoch + 1}
            rec.update(self.train_epoch())
            self.epoch += 1
            rec["step"] = self.step
            rec["train_time_s"] = time.perf_counter() - t0
            if self.is_main:
                if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                    rec.update({f"val_{k}": v for k, v in self.evaluate().items()})
                if self.epoch in set(cfg.gradvar_epochs):
                    rec["gradvar"] = self.gradient_variance()
                rec["time_s"] = time.perf_counter() - t0
                with open(self.metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                self.save_checkpoint()
                self.log(_epoch_line(rec, cfg.epochs))
            if self.world > 1:
                dist.barrier()
        if self.is_main and cfg.figures:
            self.make_figures()
        return read_metrics(self.metrics_path) if self.is_main else []

    def make_figures(self) -> None:
        from . import plots
        fig_dir = os.path.join(self.run_dir, "figures")
        label = f"{self.cfg.estimator} ({self.cfg.decoder})"
        plots.reconstruction_figure(
            {label: self.model}, self.data.val[:8], os.path.join(fig_dir, "reconstructions.png"),
            device=self.device)
        plots.curves_figure({label: read_metrics(self.metrics_path)},
                            os.path.join(fig_dir, "curves.png"))


def _epoch_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec.get('train_loss', float('nan')):.4f}"]
    for key in ("val_bpd", "val_mse", "val_kld"):
        if key in rec:
            parts.append(f"{key[4:]} {rec[key]:.4f}")
    if "gradvar" in rec:
        parts.append("gradvar " + ", ".join(f"{k} {v['total']:.3g}" for k, v in rec["gradvar"].items()))
    parts.append(f"{rec.get('time_s', rec.get('train_time_s', 0)):.1f}s")
    return "  ".join(parts)


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl file (a trailing line cut short by a kill is skipped)."""
    records = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records
