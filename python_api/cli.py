"""``silent-vae``: train, evaluate, measure gradient variance and plot.

    silent-vae train --preset cpu --estimator reparam --run-dir runs/reparam
    silent-vae train --run-dir runs/reparam --resume            # continue a killed run
    silent-vae eval runs/reparam [--split test]
    silent-vae gradvar runs/reparam [--estimators silent reparam] [--draws 100]
    silent-vae plot runs/silent runs/reparam --out runs/figures
    silent-vae reproduce run table2 --scale cpu ; silent-vae reproduce report   # reproduce/ package
    torchrun --nproc_per_node 2 -m silent_kernels.api.cli train --preset cpu ...   # data parallel

Every ``TrainConfig`` field is a ``train`` flag (``--latent-dim 200``, ``--enc-channels 8,16,16``,
``--cutoff-epoch none``, ``--straight-through``); precedence: defaults < ``--preset`` <
``--config FILE.json`` < flags. Exit codes: 0 ok, 2 bad arguments or data (SILENT_VAE_DEBUG=1 shows the traceback), 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import torch

from .reproduce.command import add_parser as add_reproduce_parser
from .reproduce.command import run_command as run_reproduce
from .runs import load_run

__all__ = ["main", "build_parser", "load_run"]

EXIT_USAGE = 2
EXIT_NONFINITE = 3


# ----------------------------------------------------------------- config flags

def _parse_list(text: str):
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.startswith("["):
        return json.loads(text)
    if not text:
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(int(part))
        except ValueError:
            out.append(float(part))
    return out


def _scalar_parser(kind: str, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        return text
    parse.__name__ = kind
    return parse


def _field_help() -> dict:
    """The trailing comments of TrainConfig's fields, used as flag help."""
    import inspect
    import re

    from .train import TrainConfig

    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?=\s*(.*?)\s*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(3)
    return out


def _field_choices() -> dict:
    from . import data
    from .estimators import ESTIMATORS
    from .models import DECODERS, LATENTS, VARIANCES
    from .objectives import OBJECTIVES

    return {"dataset": data.DATASETS, "val_split": ("auto", "test", "holdout"),
            "eval_dequant": ("noise", "center"), "arch": ("auto", "mnist", "strided"),
            "latent": LATENTS, "decoder": DECODERS, "variance": VARIANCES, "estimator": ESTIMATORS,
            "backend": ("auto", "torch", "cpp", "triton", "cuda"),
            "objective": OBJECTIVES}   # companion objective (objectives.py)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    helps, choices = _field_help(), _field_choices()
    defaults = TrainConfig()
    group = parser.add_argument_group("config fields (TrainConfig; default values in brackets)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        optional = ann.startswith("Optional[")
        base = ann[len("Optional["):-1] if optional else ann
        default = getattr(defaults, f.name)
        text = f"{helps.get(f.name, '')} [{default}]".strip()
        if base == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        elif base == "list":
            group.add_argument(flag, dest=f.name, type=_parse_list, default=argparse.SUPPRESS,
                               metavar="A,B,..", help=text)
        else:
            group.add_argument(flag, dest=f.name, type=_scalar_parser(base, optional),
                               default=argparse.SUPPRESS, help=text, choices=choices.get(f.name),
                               metavar=base.upper() if f.name not in choices else None)


def _config_overrides(args) -> dict:
    from .train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


# ------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silent-vae", description="Train and evaluate VAEs with Silent Gradients "
        "(the exact expected reconstruction loss of a linear Gaussian decoder).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumable; data parallel under torchrun)")
    p.add_argument("--preset", choices=("cpu", "paper"), default=None,
                   help="cpu: digits, narrow convs, 20 epochs; paper: Appendix B settings (GPU)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<latent>-<decoder>-<estimator>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from checkpoints/last.pt")
    _add_config_flags(p)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint (BPD, MSE, KLD)")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None, help="default: RUN_DIR/checkpoints/last.pt")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--samples", type=int, default=None, help="latent draws per image (nonlinear decoders)")
    p.add_argument("--dequant", choices=("noise", "center"), default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--device", default=None)

    p = sub.add_parser("gradvar", help="Table 1: total variance of the encoder gradient")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--estimators", nargs="+", default=None, help="default: all that apply")
    p.add_argument("--draws", type=int, default=None, help="latent draws (default: config, 100)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (default: config, 64)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)

    p = sub.add_parser("plot", help="reconstructions and training curves of one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="output folder (default: the first run's figures/)")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--n", type=int, default=8, help="images per row")
    p.add_argument("--checkpoint-name", default="last.pt")

    add_reproduce_parser(sub)
    return parser


# ------------------------------------------------------------------------ helpers

def _default_run_dir(cfg) -> str:
    return os.path.join("runs", f"{cfg.latent}-{cfg.decoder}-{cfg.estimator}-s{cfg.seed}")


def _init_distributed(cfg) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def _device_for(cfg) -> str:
    if cfg.device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return cfg.device


# ----------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from .train import NonFiniteLossError, TrainConfig, Trainer, make_config

    overrides = _config_overrides(args)
    if args.resume:
        if not args.run_dir:
            print("silent-vae train --resume needs --run-dir", file=sys.stderr)
            return EXIT_USAGE
        with open(os.path.join(args.run_dir, "config.json")) as fh:
            saved = json.load(fh)
        allowed = {"epochs", "progress", "figures"}
        bad = {k for k, v in overrides.items() if k not in allowed and saved.get(k) != v}
        if bad or args.preset or args.config:
            print(f"silent-vae train --resume: the run's config is fixed; only {sorted(allowed)} may "
                  f"change (got {sorted(bad) or '--preset/--config'})", file=sys.stderr)
            return EXIT_USAGE
        cfg = TrainConfig.from_dict({**saved, **overrides}).validate()
    else:
        if args.config:
            with open(args.config) as fh:
                overrides = {**json.load(fh), **overrides}
        cfg = make_config(args.preset, overrides)
    cfg = cfg.replace(device=_device_for(cfg))
    run_dir = args.run_dir or _default_run_dir(cfg)
    _init_distributed(cfg)
    try:
        trainer = Trainer(cfg, run_dir, resume=args.resume)
        if trainer.is_main:
            print(f"run folder: {trainer.run_dir}  ({trainer.data.train.shape[0]} train / "
                  f"{trainer.data.val.shape[0]} val images, {cfg.dataset})", flush=True)
        metrics = trainer.fit()
    except NonFiniteLossError as exc:
        print(f"silent-vae: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if metrics:
        last = metrics[-1]
        keys = ("val_bpd", "val_mse", "val_kld")
        print("final: " + "  ".join(f"{k[4:]} {last[k]:.4f}" for k in keys if k in last))
    return 0


def cmd_eval(args) -> int:
    from . import data as data_mod
    from .evaluate import evaluate

    device = args.device or "cpu"
    cfg, model, data, _ = load_run(args.run_dir, args.checkpoint, device, with_data=args.split == "val")
    if args.split == "val":
        images = data.val
    else:
        if not data_mod.has_test_split(cfg.dataset):
            print(f"data set {cfg.dataset!r} has no test split", file=sys.stderr)
            return EXIT_USAGE
        images, _ = data_mod.load_dataset(cfg.dataset, cfg.data_root, "test")
        if images.dim() == 3:
            images = images.unsqueeze(1)
    if args.limit:
        images = images[:args.limit]
    res = evaluate(model, images, cfg, device=device, samples=args.samples, dequant=args.dequant)
    res.update(split=args.split, checkpoint=args.checkpoint or "last.pt")
    with open(os.path.join(args.run_dir, f"eval_{args.split}.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps(res, indent=2))
    return 0


def cmd_gradvar(args) -> int:
    from .evaluate import gradient_variance_table

    device = args.device or "cpu"
    cfg, model, data, ckpt = load_run(args.run_dir, args.checkpoint, device)
    baseline = None if ckpt.get("baseline") is None else float(ckpt["baseline"])
    res = gradient_variance_table(model, data.val, cfg, estimators=args.estimators, draws=args.draws,
                                  batch=args.batch, seed=args.seed, baseline=baseline, device=device)
    out = {"epoch": int(ckpt["epoch"]), "results": res}
    with open(os.path.join(args.run_dir, "gradvar.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"gradient variance of the encoder (epoch {ckpt['epoch']}, {cfg.latent} latents, "
          f"{next(iter(res.values()))['draws']} draws, batch {next(iter(res.values()))['batch']}):")
    for name, r in res.items():
        print(f"  {name:14s} {r['total']:.6g}{'   (bit-identical draws)' if r['bit_identical'] else ''}")
    return 0


def cmd_plot(args) -> int:
    from . import plots
    from .train import read_metrics

    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        print("--labels: give one label per run folder", file=sys.stderr)
        return EXIT_USAGE
    models, curves, images = {}, {}, None
    for label, run_dir in zip(labels, args.run_dirs):
        cfg, model, data, _ = load_run(run_dir, os.path.join(run_dir, "checkpoints", args.checkpoint_name))
        models[label] = model
        curves[label] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        if images is None:
            images = data.val[:args.n]
    out = args.out or os.path.join(args.run_dirs[0], "figures")
    paths = [plots.reconstruction_figure(models, images, os.path.join(out, "reconstructions.png")),
             plots.curves_figure(curves, os.path.join(out, "curves.png"))]
    for p in paths:
        print(p)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "gradvar": cmd_gradvar, "plot": cmd_plot,
               "reproduce": run_reproduce}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        if os.environ.get("SILENT_VAE_DEBUG"):
            raise
        print(f"silent-vae {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
