"""Figures (matplotlib, Agg canvas: no display needed, no global backend switch).

- ``reconstruction_figure``: the original row, then one row of reconstructed means per model
  (decoder mean at z = E_q[z]; the nonlinear decoder for dual models, as in Appendix C)
  and, for models with a learned variance, a row of the per-pixel standard deviation,
  normalised to [0, 1] per image as in Appendix C.2.
- ``curves_figure``: validation BPD / MSE / KLD (and training loss) against the epoch, one
  line per run.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .evaluate import eval_images

__all__ = ["reconstruction_figure", "curves_figure", "image_grid_rows", "save_figure"]


def _to_display(img: torch.Tensor):
    """(C, H, W) float -> (H, W) or (H, W, 3) numpy in [0, 1]."""
    img = img.detach().float().cpu().clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _normalise(img: torch.Tensor) -> torch.Tensor:
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)


def image_grid_rows(models: Mapping[str, torch.nn.Module], images_u8: torch.Tensor, *, device="cpu",
                    seed: int = 0) -> list:
    """[(label, images (n, C, H, W) in [0, 1])] rows: original, then means (and stds)."""
    x = eval_images(images_u8, "noise", seed)
    rows = [("original", x)]
    for label, model in models.items():
        was = model.training
        model.eval()
        try:
            mean, std = model.reconstruct(x.to(device))
        finally:
            model.train(was)
        rows.append((label, mean.cpu()))
        dec = model.inference_decoder
        if getattr(dec, "variance", "fixed") == "learned":
            rows.append((f"{label} std", torch.stack([_normalise(s) for s in std.cpu()])))
    return rows


def reconstruction_figure(models: Mapping[str, torch.nn.Module], images_u8: torch.Tensor, path: str,
                          *, device="cpu", seed: int = 0, title: str | None = None) -> str:
    rows = image_grid_rows(models, images_u8, device=device, seed=seed)
    n = images_u8.shape[0]
    fig = Figure(figsize=(1.1 * n + 1.6, 1.15 * len(rows) + (0.4 if title else 0.1)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(_to_display(imgs[c]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    h = fig.get_figheight()
    fig.subplots_adjust(left=1.5 / fig.get_figwidth(), right=0.99, bottom=0.05 / h,
                        top=1 - (0.45 if title else 0.05) / h, wspace=0.05, hspace=0.08)
    return save_figure(fig, path)


def curves_figure(runs: Mapping[str, Sequence[dict]], path: str,
                  keys: Sequence[str] = ("val_bpd", "val_mse", "val_kld", "train_loss"),
                  title: str | None = None) -> str:
    keys = [k for k in keys if any(k in rec for recs in runs.values() for rec in recs)]
    if not keys:
        keys = ["train_loss"]
    fig = Figure(figsize=(4.0 * len(keys), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for label, recs in runs.items():
            pts = [(r["epoch"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Figure, path: str) -> str:
    """Write ``fig`` as a PNG at ``path`` (a temp file, then a rename); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
