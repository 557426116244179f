"""``silent-vae``: train, evaluate, measure gradient variance and plot.

    silent-vae train --preset cpu --estimator reparam --run-dir runs/reparam
    silent-vae train --run-dir runs/reparam --resume            # continue a killed run
    silent-vae eval --run-dir runs/reparam [--split test]       # (the run folder may also be positional)
    silent-vae gradvar --run-dir runs/reparam [--estimators silent reparam] [--draws 100]
    silent-vae plot runs/silent runs/reparam --out runs/figures
    silent-vae reproduce run table2 --scale cpu ; silent-vae reproduce report   # reproduce/ package
    torchrun --nproc_per_node 2 -m silent_kernels.api.cli train --preset cpu ...   # data parallel

Every ``TrainConfig`` field is a ``train`` flag (``--latent-dim 200``, ``--enc-channels 8,16,16``,
``--cutoff-epoch none``, ``--straight-through``); precedence: defaults < ``--preset`` <
``--config FILE.json`` < flags.

Every failure a user can cause ends with exactly one line ``silent-vae: error: ...`` on stderr
and an exit code from ``errors.EXIT_CODES`` (the README's table); ``--debug`` (or
``SILENT_VAE_DEBUG=1``) lets the exception and its traceback through instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from . import distributed
from .arguments import (Parser, add_config_flags, check_backend, check_flags_apply, config_overrides,
                        int_at_least)
from .checkpoints import load_checkpoint, read_json, write_json_atomic
from .errors import (EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, EXIT_WRITE,
                     InputFileError, RunDirError, SilentVAEError, UsageError)
from .reproduce.command import add_parser as add_reproduce_parser
from .reproduce.command import run_command as run_reproduce
from .runs import load_run

__all__ = ["main", "build_parser", "load_run", "EXIT_USAGE", "EXIT_NONFINITE"]

EXIT_NONFINITE = 3       # kept name: errors.EXIT_DIVERGED


# ------------------------------------------------------------------------ parser

def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir_pos", nargs="?", metavar="RUN_DIR", help="the run folder")
    p.add_argument("--run-dir", dest="run_dir_opt", default=None, help="the run folder (same as RUN_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="silent-vae", description="Train and evaluate VAEs with Silent Gradients "
                    "(the exact expected reconstruction loss of a linear Gaussian decoder).")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)

    p = sub.add_parser("train", help="train a model (resumable; data parallel under torchrun)")
    p.add_argument("--preset", choices=("cpu", "paper"), default=None,
                   help="cpu: digits, narrow convs, 20 epochs; paper: Appendix B settings (GPU)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<latent>-<decoder>-<estimator>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from checkpoints/last.pt")
    add_config_flags(p)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint (BPD, MSE, KLD)")
    _add_run_dir(p)
    p.add_argument("--checkpoint", default=None, help="default: RUN_DIR/checkpoints/last.pt")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--samples", type=int_at_least(1), default=None,
                   help="latent draws per image (nonlinear decoders)")
    p.add_argument("--dequant", choices=("noise", "center"), default=None)
    p.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate the first N images only")
    p.add_argument("--iwae", type=int_at_least(1), default=None, metavar="S",
                   help="also the importance-weighted bound on log p(x) with S samples per image")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("gradvar", help="Table 1: total variance of the encoder gradient")
    _add_run_dir(p)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--estimators", nargs="+", default=None, help="default: all that apply")
    p.add_argument("--draws", type=int_at_least(2), default=None, help="latent draws (default: config, 100)")
    p.add_argument("--batch", type=int_at_least(1), default=None, help="fixed batch size (default: config, 64)")
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("plot", help="reconstructions and training curves of one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="output folder (default: the first run's figures/)")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--n", type=int_at_least(1), default=8, help="images per row")
    p.add_argument("--checkpoint-name", default="last.pt")

    add_reproduce_parser(sub)
    for action in sub.choices.values():
        action.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the traceback of a failure")
    return parser


# ------------------------------------------------------------------------ helpers

def _default_run_dir(cfg) -> str:
    return os.path.join("runs", f"{cfg.latent}-{cfg.decoder}-{cfg.estimator}-s{cfg.seed}")


def _run_dir(args) -> str:
    pos, opt = args.run_dir_pos, args.run_dir_opt
    if pos and opt and os.path.abspath(pos) != os.path.abspath(opt):
        raise UsageError(f"{args.command}: two run folders given ({pos} and --run-dir {opt}); give one")
    if not (pos or opt):
        raise UsageError(f"{args.command}: expected a run folder (RUN_DIR or --run-dir RUN_DIR)")
    return pos or opt


def _train_config(args):
    """The config of ``train``: a new run's from preset/--config/flags, or a resumed run's
    from its checkpoint with the flags a resume may change."""
    from .config import flag, make_config
    from .train import RESUMABLE_FIELDS, TrainConfig

    overrides = config_overrides(args)
    if not args.resume:
        if args.config:
            overrides = {**read_json(args.config, "config file (--config)"), **overrides}
        cfg = make_config(args.preset, overrides)
        check_flags_apply(cfg, set(config_overrides(args)))
        return cfg
    if not args.run_dir:
        raise UsageError("--resume: expected --run-dir (the folder of the run to continue)")
    if args.preset or args.config:
        raise UsageError("--resume: the run's config comes from its checkpoint; drop --preset/--config")
    path = os.path.join(args.run_dir, "checkpoints", "last.pt")
    if not os.path.isdir(args.run_dir):
        raise RunDirError(f"--run-dir {args.run_dir}: no such folder, nothing to resume")
    if not os.path.exists(path):
        raise RunDirError(f"--resume: {args.run_dir} holds no checkpoint to resume (checkpoints/last.pt); "
                          "start the run without --resume")
    saved = load_checkpoint(path)["config"]
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE_FIELDS and saved.get(k) != v)
    if changed:
        raise UsageError(f"--resume: only {', '.join(map(flag, RESUMABLE_FIELDS))} may change on resume, got "
                         + ", ".join(f"{flag(k)} {overrides[k]!r} (the run has {saved.get(k)!r})" for k in changed))
    try:
        TrainConfig.from_dict(saved).validate()
    except ValueError as exc:
        raise InputFileError(f"{path}: the checkpoint's config is not valid here ({exc})") from None
    return TrainConfig.from_dict({**saved, **overrides}).validate()


# ----------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from .train import Trainer

    cfg = _train_config(args)
    cfg = cfg.replace(device=distributed.local_device(cfg.device))
    distributed.check_device(cfg.device)
    check_backend(cfg.backend, cfg.device)
    if args.run_dir is not None and not args.run_dir.strip():
        raise UsageError("--run-dir: expected a folder name, got ''")
    run_dir = args.run_dir or _default_run_dir(cfg)
    distributed.init_from_env(cfg.device)
    try:
        trainer = Trainer(cfg, run_dir, resume=args.resume)
        if trainer.is_main:
            print(f"run folder: {trainer.run_dir}  ({trainer.data.train.shape[0]} train / "
                  f"{trainer.data.val.shape[0]} val images, {cfg.dataset})", flush=True)
        metrics = trainer.fit()
    finally:
        distributed.shutdown()
    if metrics:
        last = metrics[-1]
        keys = ("val_bpd", "val_mse", "val_kld")
        print("final: " + "  ".join(f"{k[4:]} {last[k]:.4f}" for k in keys if k in last))
    return 0


def cmd_eval(args) -> int:
    from . import data as data_mod
    from .evaluate import evaluate, importance_weighted_bound

    run_dir = _run_dir(args)
    device = str(distributed.check_device(args.device))
    cfg, model, data, _ = load_run(run_dir, args.checkpoint, device, with_data=args.split == "val")
    if args.samples is not None and cfg.decoder == "linear":
        raise UsageError("--samples has no effect on a linear decoder (its NLL is exact, nothing is sampled)")
    if args.split == "val":
        images = data.val
    else:
        if not data_mod.has_test_split(cfg.dataset):
            raise UsageError(f"--split test: data set {cfg.dataset!r} has no test split; use --split val")
        images, _ = data_mod.load_dataset(cfg.dataset, cfg.data_root, "test")
    if args.limit:
        images = images[:args.limit]
    res = evaluate(model, images, cfg, device=device, samples=args.samples, dequant=args.dequant)
    if args.iwae:
        iw = importance_weighted_bound(model, images, cfg, samples=args.iwae, device=device, dequant=args.dequant)
        res.update(iwae_nll=iw["nll"], iwae_bpd=iw["bpd"], iwae_samples=iw["samples"])
    res.update(split=args.split, checkpoint=args.checkpoint or "last.pt")
    write_json_atomic(res, os.path.join(run_dir, f"eval_{args.split}.json"))
    print(json.dumps(res, indent=2))
    return 0


def cmd_gradvar(args) -> int:
    from .evaluate import gradient_variance_table

    run_dir = _run_dir(args)
    device = str(distributed.check_device(args.device))
    cfg, model, data, ckpt = load_run(run_dir, args.checkpoint, device)
    if args.batch is not None and args.batch > data.val.shape[0]:
        raise UsageError(f"--batch: expected at most the {data.val.shape[0]} validation images of the run, "
                         f"got {args.batch}")
    baseline = None if ckpt.get("baseline") is None else float(ckpt["baseline"])
    res = gradient_variance_table(model, data.val, cfg, estimators=args.estimators, draws=args.draws,
                                  batch=args.batch, seed=args.seed, baseline=baseline, device=device)
    write_json_atomic({"epoch": int(ckpt["epoch"]), "results": res}, os.path.join(run_dir, "gradvar.json"))
    first = next(iter(res.values()))
    print(f"gradient variance of the encoder (epoch {ckpt['epoch']}, {cfg.latent} latents, "
          f"{first['draws']} draws, batch {first['batch']}):")
    for name, r in res.items():
        print(f"  {name:14s} {r['total']:.6g}{'   (bit-identical draws)' if r['bit_identical'] else ''}")
    return 0


def cmd_plot(args) -> int:
    from . import plots
    from .train import read_metrics

    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        raise UsageError(f"--labels: expected one label per run folder ({len(args.run_dirs)}), "
                         f"got {len(labels)}")
    out = args.out or os.path.join(args.run_dirs[0], "figures")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: is a file, expected a folder for the figures")
    models, curves, images, shapes = {}, {}, None, {}
    for label, run_dir in zip(labels, args.run_dirs):
        cfg, model, data, ckpt = load_run(run_dir, os.path.join(run_dir, "checkpoints", args.checkpoint_name),
                                          with_data=images is None)
        shapes[run_dir] = tuple(ckpt["image_shape"])
        if len(set(shapes.values())) > 1:
            raise UsageError("plot: the runs have different image shapes ("
                             + ", ".join(f"{d} {s}" for d, s in shapes.items()) + "); plot them separately")
        models[label] = model
        curves[label] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        if images is None:
            images = data.val[:args.n]
    try:
        paths = [plots.reconstruction_figure(models, images, os.path.join(out, "reconstructions.png")),
                 plots.curves_figure(curves, os.path.join(out, "curves.png"))]
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the figures to {out}: {exc.strerror or exc}") from None
    for p in paths:
        print(p)
    return 0


# ------------------------------------------------------------------- error reporting

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command."""
    if isinstance(exc, SilentVAEError):
        code, text = exc.exit_code, (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
    elif isinstance(exc, KeyboardInterrupt):
        code, text = EXIT_INTERRUPTED, "interrupted; checkpoints written so far are intact (--resume continues)"
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        if exc.errno in _WRITE_ERRNOS:
            code = EXIT_WRITE
        elif isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
            code = EXIT_INPUT
        else:
            code = EXIT_WRITE
        text = where + reason
    elif isinstance(exc, (ValueError, TypeError, LookupError)):
        code, text = EXIT_USAGE, str(exc)
    else:
        code = EXIT_INTERNAL
        text = (f"internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                "(please report it; --debug shows the traceback)")
    text = " ".join(text.split())
    return code, text if len(text) <= 600 else text[:600] + " ..."


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(os.environ.get("SILENT_VAE_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
        debug = debug or args.debug
        handler = {"train": cmd_train, "eval": cmd_eval, "gradvar": cmd_gradvar, "plot": cmd_plot,
                   "reproduce": run_reproduce}[args.command]
        return handler(args)
    except SystemExit as exc:        # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except BaseException as exc:     # noqa: BLE001 - every failure becomes one line and an exit code
        if debug or "--debug" in argv:
            raise
        code, text = describe_failure(exc)
        print(f"silent-vae: error: {text}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
