"""The reference trainer: Algorithm 1, the training loop, checkpoints, resume, data parallelism.

One ``TrainConfig`` (config.py) describes a run; ``Trainer(cfg, run_dir).fit()`` trains it and
leaves in ``run_dir``:

    config.json          the full config (every default resolved, channel widths included)
    run_info.json        image shape, split sizes, parameter counts, world size, versions
    metrics.jsonl        one JSON object per epoch (flat keys: val_bpd, val_mse, val_kld, ...)
    checkpoints/last.pt  written atomically every epoch (temp file + fsync + os.replace)
    checkpoints/epoch_NNNN.pt   extra snapshots at ``save_epochs``
    checkpoints/best.pt         with ``keep_best``: the checkpoint of the epoch with the lowest
                                validation BPD so far (plus its "val_bpd")
    figures/*.png        reconstructions and training curves
    .lock                the OS lock (fcntl.flock) of the process training into the folder

Decoders (``decoder``): ``linear`` (the analytic head alone), ``nonlinear`` (the "without SG"
baselines) and ``dual`` (Algorithm 1, in algorithm1.py: shared encoder, both decoders).

Divergence: the loss is checked before ``backward`` and every weight after the optimiser
step; a non-finite value stops training with ``NonFiniteLossError`` (exit code 3) naming the
epoch, the step and the last good checkpoint, which is never overwritten. ``--resume``
continues from it, optionally with lower learning rates (logged per epoch).

Determinism and resume: all randomness comes from the model init (global torch RNG seeded
with ``seed``), the epoch permutation (``DistributedSampler`` seeded ``seed + epoch``), the
``data`` generator (dequantisation noise) and the ``sample`` generator (latent draws).
Checkpoints hold the model, every optimiser, the generator states (and the global RNG), the
REINFORCE baseline and the step counter; on CPU a resumed run therefore ends bit-identical to
an uninterrupted one.

Data parallelism (``torchrun ... -m silent_kernels.api.cli train ...``): distributed.py. Every
random draw is made for the global batch and sliced per process, and each process's loss is its
rows' sum over the global batch size times the world size, so any number of processes that
divides the batch size gives the single-process result up to summation order. (BatchNorm of the
32x32 architecture uses per-process statistics; DDP broadcasts rank 0's running ones.)
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from typing import Optional

import torch
from torch import Tensor, nn

import silent_kernels

from . import distributed
from .allocator import keep_freed_memory
from .checkpoints import (CHECKPOINT_FORMAT, load_checkpoint, nonfinite_tensors, save_atomic,
                          write_json_atomic)
from .config import PRESETS, TrainConfig, make_config, paper_schedule
from .data import DataBundle, prepare_data
from .errors import DivergenceError, InputFileError, RunDirError, UsageError
from .algorithm1 import batch_loss, encoder_frozen_at, scale_grad, w_lin_at
from .estimators import Noise, ReinforceBaseline
from .models import VAE, build_model, default_channels, resolve_arch
from .rundir import MetricsLog, RunDirLock, epoch_line

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "DataBundle", "prepare_data",
           "make_config", "PRESETS", "paper_schedule", "w_lin_at", "encoder_frozen_at",
           "save_atomic", "load_checkpoint", "scale_grad", "read_metrics", "CHECKPOINT_FORMAT",
           "RESUMABLE_FIELDS"]

# Fields a resumed run may change; everything else is fixed by its checkpoint.
RESUMABLE_FIELDS = ("epochs", "progress", "figures", "lr", "lr_mu", "lr_alpha")


class NonFiniteLossError(DivergenceError):
    """The loss or the weights became NaN or Inf; the last good checkpoint is left untouched."""


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl file; an unreadable line raises ``InputFileError``."""
    return MetricsLog(path).read()


class _StepLoss(nn.Module):
    """One training step's loss as a module, so DistributedDataParallel can wrap it: its
    registered submodules are the parts of the model that train in this phase."""

    def __init__(self, trainer: "Trainer", parts: tuple[str, ...]):
        super().__init__()
        self.parts = nn.ModuleDict({name: getattr(trainer.model, name) for name in parts})
        self.compute = trainer.step_loss       # a bound method: not registered as a module

    def forward(self, x: Tensor, rows: slice, total: int, epoch: int):
        return self.compute(x, rows, total, epoch)


class Trainer:
    """Train one configuration in ``run_dir`` (see the module docstring). The main process
    holds the run folder's lock from construction until ``fit`` returns (``close()`` releases
    it earlier)."""

    def __init__(self, cfg: TrainConfig, run_dir: str, *, resume: bool = False,
                 data: Optional[DataBundle] = None, log=None):
        keep_freed_memory()
        self.run_dir = os.path.abspath(run_dir)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.ckpt_path = os.path.join(self.ckpt_dir, "last.pt")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.metrics = MetricsLog(self.metrics_path)
        self.rank, self.world = distributed.dist_info()
        self.is_main = self.rank == 0
        self._log = log
        self.lock = RunDirLock(self.run_dir)
        try:
            # the main process's checks (lock, existing run) must stop every process
            distributed.run_together(lambda: self.lock.acquire() if self.is_main else None)
            distributed.run_together(lambda: self._setup(cfg, resume, data))
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: TrainConfig, resume: bool, data: Optional[DataBundle]) -> None:
        ckpt = None
        if resume:
            if not os.path.exists(self.ckpt_path):
                raise RunDirError(f"--resume: {self.run_dir} holds no checkpoint to resume "
                                  "(checkpoints/last.pt); start the run without --resume")
            ckpt = load_checkpoint(self.ckpt_path)
            cfg = self._resumed_config(cfg, ckpt)
        self.cfg = cfg.validate()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(cfg.device)
        self.data = data if data is not None else prepare_data(cfg)
        self.image_shape = self.data.image_shape
        arch = resolve_arch(cfg.arch, self.image_shape)
        cfg.check_channel_count(arch)
        if cfg.enc_channels is None or cfg.dec_channels is None:
            enc, dec = default_channels(arch)
            cfg = self.cfg = cfg.replace(enc_channels=cfg.enc_channels or enc,
                                         dec_channels=cfg.dec_channels or dec)
        if cfg.gradvar_epochs and cfg.gradvar_batch > self.data.val.shape[0]:
            raise UsageError(f"--gradvar-batch: expected at most the {self.data.val.shape[0]} validation "
                             f"images, got {cfg.gradvar_batch}")
        if cfg.batch_size % self.world:
            raise UsageError(f"--batch-size: expected a multiple of the {self.world} processes, "
                             f"got {cfg.batch_size}")

        torch.manual_seed(cfg.seed)
        self.model: VAE = build_model(cfg, self.image_shape).to(self.device)
        self.optimizers = self._make_optimizers()
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.baseline = ReinforceBaseline(cfg.reinforce_decay)
        self.epoch = 0            # completed epochs
        self.step = 0
        self.gradient_sync = distributed.GradientSync(lambda parts: _StepLoss(self, parts), self.device)
        if ckpt is not None:
            self._restore(ckpt)
            if self.is_main:
                write_json_atomic(cfg.to_dict(), os.path.join(self.run_dir, "config.json"))
        elif self.is_main:
            if os.path.exists(self.ckpt_path):
                raise RunDirError(f"--run-dir {self.run_dir}: already holds a run (checkpoints/last.pt); "
                                  "use --resume to continue it or choose another --run-dir")
            write_json_atomic(cfg.to_dict(), os.path.join(self.run_dir, "config.json"))
            write_json_atomic(self._run_info(), os.path.join(self.run_dir, "run_info.json"))
            self.metrics.create(warn=lambda msg: print(msg, file=sys.stderr))

    @staticmethod
    def _resumed_config(cfg: TrainConfig, ckpt: dict) -> TrainConfig:
        """The checkpoint's config with the fields a resume may change taken from ``cfg``."""
        try:
            saved = TrainConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"the checkpoint's config is not a valid TrainConfig ({exc})") from None
        given, old = cfg.to_dict(), saved.to_dict()
        diff = {k: (old[k], v) for k, v in given.items()
                if old[k] != v and k not in RESUMABLE_FIELDS
                and not (k in ("enc_channels", "dec_channels") and v is None)}
        if diff:
            raise UsageError(f"--resume: the config differs from the checkpoint's in {diff} "
                             f"(only {', '.join(RESUMABLE_FIELDS)} may change on resume)")
        return saved.replace(**{k: given[k] for k in RESUMABLE_FIELDS})

    def close(self) -> None:
        """Release the run folder (also done when ``fit`` returns or raises)."""
        self.lock.release()

    # -------------------------------------------------------------- construction
    def _make_optimizers(self) -> dict:
        cfg, m = self.cfg, self.model
        betas = tuple(cfg.betas)

        def adamw(params, lr):
            params = list(params)   # the fused kernel: one pass per tensor (6x the loop's speed on CPU)
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
            return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay, fused=fused)

        opts = {"encoder": adamw(m.encoder.parameters(), cfg.lr)}
        if m.nonlinear is not None:
            opts["nonlinear"] = adamw(m.nonlinear.parameters(), cfg.lr)
        if m.linear is not None:
            lr_mu, lr_alpha = self._head_lrs()
            opts["mu"] = adamw(m.linear.mu.parameters(), lr_mu)
            rest = [p for n, p in m.linear.named_parameters() if not n.startswith("mu.")]
            if rest:
                opts["alpha"] = adamw(rest, lr_alpha)
        return opts

    def _head_lrs(self) -> tuple[float, float]:
        cfg = self.cfg
        dual = cfg.decoder == "dual"
        lr_mu = cfg.lr_mu if (dual and cfg.lr_mu is not None) else cfg.lr
        lr_alpha = cfg.lr_alpha if (dual and cfg.lr_alpha is not None) else cfg.lr
        return lr_mu, lr_alpha

    def _set_learning_rates(self) -> None:
        """Apply the config's learning rates (a resume may have lowered them)."""
        lr_mu, lr_alpha = self._head_lrs()
        lrs = {"encoder": self.cfg.lr, "nonlinear": self.cfg.lr, "mu": lr_mu, "alpha": lr_alpha}
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = lrs[name]

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
            "world_size": self.world, "data_parallel": distributed.describe(), "torch": torch.__version__,
            "silent_kernels": silent_kernels.__version__, "python": platform.python_version(),
        }

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
        try:
            self.model.load_state_dict(ckpt["model"])
            for k, o in self.optimizers.items():
                o.load_state_dict(ckpt["optimizers"][k])
            self.data_gen.set_state(ckpt["rng"]["data"])
            self.sample_gen.set_state(ckpt["rng"]["sample"])
            torch.set_rng_state(ckpt["rng"]["torch"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise InputFileError(f"{self.ckpt_path}: the weights do not match the checkpoint's own "
                                 f"config ({' '.join(str(exc).split())[:300]})") from None
        self._set_learning_rates()
        b = ckpt["baseline"]
        self.baseline.value = None if b is None else float(b)
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        if self.cfg.epochs < self.epoch:
            raise UsageError(f"--epochs: the run has already trained {self.epoch} epochs; expected "
                             f"--epochs >= {self.epoch} on --resume, got {self.cfg.epochs}")
        if self.is_main:
            # records of epochs after the checkpoint belong to an epoch cut short by a kill
            self.metrics.truncate_after(self.epoch, warn=lambda msg: print(msg, file=sys.stderr))
            for name in os.listdir(self.ckpt_dir):   # temp files of a write cut short
                if name.endswith(".tmp"):
                    os.remove(os.path.join(self.ckpt_dir, name))

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        state = self.state_dict()
        bad = nonfinite_tensors({"model": state["model"], "optimizers": state["optimizers"]})
        if bad:
            raise NonFiniteLossError(self._divergence_message(f"non-finite values in {', '.join(bad[:3])}",
                                                              self.epoch - 1))
        save_atomic(state, self.ckpt_path)
        if self.epoch in set(self.cfg.save_epochs):
            save_atomic(state, os.path.join(self.ckpt_dir, f"epoch_{self.epoch:04d}.pt"))

    @property
    def best_path(self) -> str:
        return os.path.join(self.ckpt_dir, "best.pt")

    def save_best(self, rec: dict) -> None:
        """With ``keep_best``: write the checkpoint when this epoch's validation BPD is the lowest
        so far (compared with the value stored in best.pt)."""
        bpd = rec.get("val_bpd")
        if not (self.is_main and self.cfg.keep_best and isinstance(bpd, float)):
            return
        if os.path.exists(self.best_path) and load_checkpoint(self.best_path)["val_bpd"] <= bpd:
            return
        save_atomic({**self.state_dict(), "val_bpd": bpd}, self.best_path)

    # ------------------------------------------------------------------ one step
    def _global_mean(self, per_image: Tensor, total: int) -> float:
        return float(distributed.all_reduce_sum(per_image.detach().sum().double().reshape(1))) / total

    def trained_parts(self, epoch: int) -> tuple[str, ...]:
        """The model parts whose optimisers step at 0-based ``epoch`` (Algorithm 1's cut-off
        freezes the encoder and, in dual mode, the linear head)."""
        frozen = encoder_frozen_at(self.cfg, epoch)
        parts = [] if frozen else ["encoder"]
        if self.model.linear is not None and not (frozen and self.cfg.decoder == "dual"):
            parts.append("linear")
        if self.model.nonlinear is not None:
            parts.append("nonlinear")
        return tuple(parts)

    def step_loss(self, x: Tensor, rows: slice, total: int, epoch: int) -> tuple[Tensor, dict]:
        """The surrogate loss of this process's rows ``x`` of a global batch of ``total``
        (their sum divided by ``total``) and per-image statistics (algorithm1.batch_loss)."""
        def check_encoder_output(params: Tensor) -> None:
            # finite weights can still overflow in the forward pass; every process must agree
            nonfinite = (~torch.isfinite(params.detach()).all()).double().reshape(1)
            if float(distributed.all_reduce_sum(nonfinite)) > 0:
                raise NonFiniteLossError(self._divergence_message("the encoder's outputs became non-finite",
                                                                  epoch))

        noise = Noise(self.sample_gen, total, rows, device=self.device, dtype=x.dtype)
        return batch_loss(self.cfg, self.model, x, noise, epoch, total, self.baseline,
                          batch_mean_nll=lambda v: self._global_mean(v, total),
                          check_encoder_output=check_encoder_output)

    def train_step(self, x: Tensor, rows: slice, total: int, epoch: int) -> dict:
        """One optimisation step on this process's rows x of a global batch of ``total``."""
        parts = self.trained_parts(epoch)
        loss, stats = self.gradient_sync(parts)(x, rows, total, epoch)
        loss_value = float(distributed.all_reduce_sum(loss.detach().double().reshape(1)))
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self._divergence_message(f"the training loss became {loss_value}", epoch))
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        # DDP averages the gradients over the processes; each loss is a share of the global
        # batch's, so scaling by the world size turns that average into the sum.
        (loss * self.world if self.world > 1 else loss).backward()
        for name, opt in self.optimizers.items():
            if (name in ("mu", "alpha") and "linear" in parts) or name in parts:
                opt.step()
        bad = self._nonfinite_parameters()
        if bad:
            raise NonFiniteLossError(self._divergence_message(
                f"the optimizer step made {', '.join(bad[:3])} non-finite", epoch))
        self.step += 1
        out = {"surrogate": loss_value}
        for key, per_image in stats.items():
            out[key] = self._global_mean(per_image, total)
        out["loss"] = out["nll"] + out["kl"]   # the (estimated) negative ELBO per image
        if self.cfg.estimator == "reinforce":
            self.baseline.update(out["nll"])
        return out

    def _nonfinite_parameters(self) -> list[str]:
        # a float64 sum is non-finite exactly when an element is: one pass instead of isfinite's four
        with torch.no_grad():
            if bool(torch.stack([p.sum(dtype=torch.float64) for p in self.model.parameters()]).sum().isfinite()):
                return []
        return [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]

    def _divergence_message(self, what: str, epoch: int) -> str:
        where = f"epoch {epoch + 1}, step {self.step + 1}"
        if os.path.exists(self.ckpt_path):
            kept = (f"the last good checkpoint {self.ckpt_path} (epoch {self.epoch}) is kept; resume "
                    f"from it with a lower learning rate: silent-vae train --resume --run-dir "
                    f"{self.run_dir} --lr {self.cfg.lr / 10:g}")
        else:
            kept = (f"no checkpoint had been written yet; start again with a lower learning rate "
                    f"(--lr {self.cfg.lr / 10:g}) or another --seed")
        return f"training diverged at {where}: {what}; {kept}"

    # --------------------------------------------------------------------- epochs
    def train_epoch(self) -> dict:
        from tqdm.auto import tqdm

        cfg, epoch = self.cfg, self.epoch
        frozen = encoder_frozen_at(cfg, epoch)
        self.model.train()
        if frozen:
            self.model.encoder.eval()
        sums: dict = {}
        count = 0
        batches = distributed.epoch_batches(self.data.train.shape[0], cfg.batch_size, epoch, cfg.seed)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        rows = slice(self.rank, None, self.world)
        for idx in bar:
            total = int(idx.numel()) * self.world
            images = self.data.train[idx]
            noise = torch.rand((total,) + tuple(images.shape[1:]), generator=self.data_gen)[rows]
            x = ((images.float() + noise) / 256.0).to(self.device)
            out = self.train_step(x, rows, total, epoch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v * total
            count += total
            bar.set_postfix(loss=f"{out['loss']:.4g}", refresh=False)
        bar.close()
        rec = {f"train_{k}": v / count for k, v in sums.items()}
        rec["w_lin"] = w_lin_at(cfg, epoch) if cfg.decoder == "dual" else None
        rec["encoder_frozen"] = frozen
        rec["lr"] = cfg.lr
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
        """Train up to ``cfg.epochs`` (from the checkpoint when resumed); returns the metrics.
        Holds the run folder's lock while it runs and releases it on return."""
        if self.is_main:
            self.lock.acquire()
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> list:
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
            # a failure of the main process's writes must stop every process
            distributed.run_together(lambda: self._finish_epoch(rec, t0) if self.is_main else None)
        if self.is_main and cfg.figures:
            self.make_figures()
        return read_metrics(self.metrics_path) if self.is_main else []

    def _finish_epoch(self, rec: dict, t0: float) -> None:
        """The main process's end of an epoch: validation, gradient variance, the metrics
        record and the checkpoint."""
        cfg = self.cfg
        if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
            rec.update({f"val_{k}": v for k, v in self.evaluate().items()})
            bad = [k for k, v in rec.items() if k.startswith("val_") and isinstance(v, float)
                   and not math.isfinite(v)]
            if bad:
                raise NonFiniteLossError(self._divergence_message(
                    f"validation gave non-finite {', '.join(bad)}", self.epoch - 1))
        if self.epoch in set(cfg.gradvar_epochs):
            rec["gradvar"] = self.gradient_variance()
        rec["time_s"] = time.perf_counter() - t0
        # metrics first: a kill between the two writes leaves a record that --resume
        # drops and recomputes identically, never a checkpoint without its record
        self.metrics.append(rec)
        # the best weights before the resumable state: a kill between the two writes makes
        # --resume redo this epoch identically, which finds best.pt already holding it
        self.save_best(rec)
        self.save_checkpoint()
        self.log(epoch_line(rec, cfg.epochs))

    def make_figures(self) -> None:
        from . import plots
        fig_dir = os.path.join(self.run_dir, "figures")
        label = f"{self.cfg.estimator} ({self.cfg.decoder})"
        plots.reconstruction_figure(
            {label: self.model}, self.data.val[:8], os.path.join(fig_dir, "reconstructions.png"),
            device=self.device)
        plots.curves_figure({label: read_metrics(self.metrics_path)},
                            os.path.join(fig_dir, "curves.png"))
