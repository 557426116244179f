"""Command-line arguments of ``silent-vae``: the parser class, value types, the
``TrainConfig`` flags, and the checks that need the whole command line.

Every failure here is a ``UsageError`` whose message names the flag, what it expects and
what it got; ``cli.main`` prints it as one ``silent-vae: error: ...`` line (exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re

import silent_kernels

from . import data as data_mod
from .config import TrainConfig, flag
from .errors import UsageError
from .estimators import ESTIMATORS
from .models import DECODERS, LATENTS, LOG_TERMS, VARIANCES
from .objectives import OBJECTIVES

__all__ = ["Parser", "int_at_least", "add_config_flags", "config_overrides", "check_flags_apply",
           "check_backend"]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ``UsageError`` instead of printing usage and exiting,
    so every error leaves the program as one line."""

    def error(self, message: str):
        if message.endswith("expected one argument"):
            message += " (attach a value that starts with '-' with '=', e.g. --train-limit=-1)"
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UsageError(f"{command}{message} (see {self.prog} --help)")


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


# ----------------------------------------------------------------- config flags

def _parse_list(text: str):
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"expected a JSON list or comma-separated numbers, got {text!r}") from None
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError(f"expected a list, got {text!r}")
        return value
    if not text:
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(int(part))
        except ValueError:
            try:
                out.append(float(part))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated numbers (or none), got {text!r}") from None
    return out


def _scalar_parser(kind: str, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind == 'int' else 'a number'}"
                f"{' or none' if optional else ''}, got {text!r}") from None
        return text
    return parse


def _field_help() -> dict:
    """The trailing comments of TrainConfig's fields, used as flag help."""
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?=\s*(.*?)\s*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(3)
    return out


_FIELD_CHOICES = {
    "dataset": data_mod.DATASETS, "val_split": ("auto", "test", "holdout"),
    "eval_dequant": ("noise", "center"), "arch": ("auto", "mnist", "strided"),
    "latent": LATENTS, "decoder": DECODERS, "variance": VARIANCES, "log_term": LOG_TERMS,
    "estimator": ESTIMATORS,
    "backend": ("auto", "torch", "cpp", "triton", "cuda"),
    "objective": OBJECTIVES,   # companion objective (objectives.py)
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field; unset flags stay out of the namespace."""
    helps = _field_help()
    defaults = TrainConfig()
    group = parser.add_argument_group("config fields (TrainConfig; default values in brackets)")
    for f in dataclasses.fields(TrainConfig):
        ann = str(f.type)
        optional = ann.startswith("Optional[")
        base = ann[len("Optional["):-1] if optional else ann
        text = f"{helps.get(f.name, '')} [{getattr(defaults, f.name)}]".strip()
        if base == "bool":
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        elif base == "list":
            group.add_argument(flag(f.name), dest=f.name, type=_parse_list, default=argparse.SUPPRESS,
                               metavar="A,B,..", help=text)
        else:
            choices = _FIELD_CHOICES.get(f.name)
            group.add_argument(flag(f.name), dest=f.name, type=_scalar_parser(base, optional),
                               default=argparse.SUPPRESS, help=text, choices=choices,
                               metavar=base.upper() if choices is None else None)


def config_overrides(args: argparse.Namespace) -> dict:
    """The ``TrainConfig`` fields given explicitly on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def check_flags_apply(cfg: TrainConfig, explicit: set) -> None:
    """Refuse a flag given explicitly that the rest of the config would silently ignore."""
    def refuse(name: str, needs: str) -> None:
        if name in explicit:
            raise UsageError(f"{flag(name)} has no effect {needs}")

    if cfg.estimator != "gumbel":
        refuse("temperature", f"without --estimator gumbel (got --estimator {cfg.estimator})")
        refuse("straight_through", f"without --estimator gumbel (got --estimator {cfg.estimator})")
    if cfg.estimator != "reinforce":
        refuse("reinforce_decay", f"without --estimator reinforce (got --estimator {cfg.estimator})")
    if cfg.estimator != "variance-loss":
        refuse("vl_samples", f"without --estimator variance-loss (got --estimator {cfg.estimator})")
    if cfg.latent != "categorical":
        refuse("groups", f"without --latent categorical (got --latent {cfg.latent})")
        refuse("categories", f"without --latent categorical (got --latent {cfg.latent})")
    if cfg.decoder != "dual":
        refuse("anneal_rate", f"without --decoder dual (got --decoder {cfg.decoder})")
    elif cfg.estimator == "silent":
        refuse("anneal_rate", "with --estimator silent in dual mode (w_lin stays 1: the encoder "
                              "follows the linear head only)")
    if cfg.decoder == "nonlinear" or cfg.variance != "learned":
        refuse("log_term", "without the linear precision head (--variance learned, --decoder linear or dual)")
    if cfg.decoder == "linear" and not (cfg.variance == "learned" and cfg.latent != "gaussian"):
        refuse("eval_samples", "with --decoder linear (its NLL is exact, nothing is sampled; only a "
                               "precision head on non-Gaussian latents also reports a sampled bound)")
        refuse("logvar_floor", "with --decoder linear (it bounds the nonlinear decoder's log-variance)")
    if cfg.decoder == "nonlinear":
        refuse("linear_init_scale", "with --decoder nonlinear (there is no linear head)")
    uses_test = cfg.val_split == "test" or (cfg.val_split == "auto" and data_mod.has_test_split(cfg.dataset))
    if uses_test:
        refuse("val_size", f"when validating on the test split of {cfg.dataset} (use --val-split "
                           "holdout to hold out training images)")


def check_backend(backend: str, device: str, option: str = "--backend") -> None:
    """``UsageError`` when ``backend`` cannot run on ``device`` here (see silent_kernels.info())."""
    if backend == "auto":
        return
    kind = device.split(":")[0]
    entry = silent_kernels.info()["backends"].get(backend, {})
    if not entry.get("available", False):
        raise UsageError(f"{option} {backend}: not available here ({entry.get('reason', 'unknown')}); "
                         "--backend torch always works")
    if kind not in entry.get("devices", ()):
        raise UsageError(f"{option} {backend}: runs on {', '.join(entry.get('devices', ()))} tensors, "
                         f"got --device {device}")
