"""Loading a finished (or interrupted) run folder: its config, model and data."""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["load_run"]


def load_run(run_dir: str, checkpoint: Optional[str] = None, device="cpu", with_data: bool = True):
    """(cfg, model, data, checkpoint dict) of a run folder."""
    from .errors import InputFileError
    from .models import build_model
    from .train import TrainConfig, load_checkpoint, prepare_data

    path = checkpoint or os.path.join(run_dir, "checkpoints", "last.pt")
    ckpt = load_checkpoint(path, map_location=device)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"]).validate()
    except ValueError as exc:
        raise InputFileError(f"{path}: the checkpoint's config is not valid here ({exc})") from None
    try:
        model = build_model(cfg, tuple(ckpt["image_shape"]))
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InputFileError(f"{path}: the weights do not match the checkpoint's own config "
                             f"({' '.join(str(exc).split())[:300]})") from None
    model.to(device).eval()
    data = prepare_data(cfg) if with_data else None
    return cfg, model, data, ckpt
