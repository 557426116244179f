"""Read MNIST-format IDX image files (plain or gzip) from a folder; nothing is downloaded."""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

SPLIT_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IMAGES_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions


def find_images_file(folder: str, split: str) -> str:
    """The path of `split`'s image file in `folder`, with or without .gz (either naming
    convention: train-images-idx3-ubyte or train-images.idx3-ubyte)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split: expected one of {', '.join(SPLIT_FILES)}, got {split!r}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data: {folder!r} is not a folder (give the folder holding the MNIST IDX files)")
    stem = SPLIT_FILES[split]
    candidates = [stem, stem.replace("-idx3", ".idx3")]
    for name in candidates:
        for suffix in ("", ".gz"):
            path = os.path.join(folder, name + suffix)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"--data: no {stem}[.gz] in {folder!r}")


def load_images(folder: str, split: str, limit: int | None = None) -> torch.Tensor:
    """uint8 images (N, 1, 28, 28) of `split` ('train' or 't10k' test), the first `limit` only."""
    path = find_images_file(folder, split)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        header = np.frombuffer(fh.read(16), dtype=">u4")
        if header.size != 4 or header[0] != IMAGES_MAGIC:
            raise ValueError(f"--data: {path} is not an IDX image file (magic {header[:1].tolist()}, "
                             f"expected {IMAGES_MAGIC})")
        count, rows, cols = (int(v) for v in header[1:])
        if limit is not None:
            count = min(count, limit)
        pixels = np.frombuffer(fh.read(count * rows * cols), dtype=np.uint8)
    if pixels.size != count * rows * cols:
        raise ValueError(f"--data: {path} is truncated ({pixels.size} of {count * rows * cols} bytes)")
    return torch.from_numpy(pixels.copy()).reshape(count, 1, rows, cols)
