"""Data sets read from standard files on disk (nothing is downloaded at run time).

MNIST / Fashion-MNIST come as IDX files (gzip or raw, or torchvision's ``MNIST/raw/``
layout). Every reader checks magic numbers, sizes and shapes before allocating.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

__all__ = ["read_idx", "find_idx_file", "load_mnist", "dequantize"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open(path: str):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array of its stored shape."""
    with _open(path) as fh:
        header = fh.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0:
            raise ValueError(f"{path}: not an IDX file (bad magic number {header.hex()})")
        dtype_code, ndim = header[2], header[3]
        if dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
            raise ValueError(f"{path}: unsupported IDX type 0x{dtype_code:02x} / {ndim} dimensions")
        dims_raw = fh.read(4 * ndim)
        if len(dims_raw) != 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header")
        shape = struct.unpack(f">{ndim}I", dims_raw)
        dtype = np.dtype(_IDX_DTYPES[dtype_code])
        expected = int(np.prod(shape)) * dtype.itemsize
        if expected > 2**33:
            raise ValueError(f"{path}: IDX header claims shape {shape}, implausibly large")
        payload = fh.read(expected + 1)
    if len(payload) != expected:
        raise ValueError(f"{path}: IDX payload has {len(payload)} bytes, header shape {shape} "
                         f"needs exactly {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def find_idx_file(root: str, split: str, kind: str) -> str:
    """Locate ``{train,t10k}-{images,labels}-idx?-ubyte[.gz]`` under root or root/MNIST/raw."""
    prefix = "train" if split == "train" else "t10k"
    ndim = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for folder in (root, os.path.join(root, "raw"), os.path.join(root, "MNIST", "raw")):
        for name in names:
            for candidate in (name + ".gz", name):
                path = os.path.join(folder, candidate)
                if os.path.isfile(path):
                    return path
    raise FileNotFoundError(f"no {prefix} {kind} IDX file ({names[0]}[.gz]) under {root} "
                            "(also looked in raw/ and MNIST/raw/)")


def load_mnist(root: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-format images as uint8 (N, 28, 28) and labels as int64 (N,)."""
    images = read_idx(find_idx_file(root, split, "images"))
    labels = read_idx(find_idx_file(root, split, "labels"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def dequantize(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Paper Appendix B.1: x/255 * 255/256 + U[0, 1/256) = (x + U[0,1)) / 256, float32 in [0, 1)."""
    noise = torch.rand(images_uint8.shape, generator=generator)
    return (images_uint8.float() + noise) / 256.0
