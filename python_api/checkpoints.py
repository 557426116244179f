"""Checkpoint and JSON files of a run: atomic writes, weights-only reads, finiteness checks.

A checkpoint is a ``dict`` of tensors and plain containers (``format``, ``config``,
``image_shape``, ``epoch``, ``step``, ``model``, ``optimizers``, ``rng``, ``baseline``) saved
with ``torch.save`` and read back with ``torch.load(weights_only=True)``, so a crafted file
cannot run code. Writes go to a temp file in the same folder, are fsynced and then renamed
over the target: a reader, a crash or a full disk leaves either the old complete file or the
new complete file, never a mix.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch

from .errors import InputFileError, WriteError

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEYS", "save_atomic", "load_checkpoint",
           "nonfinite_tensors", "write_json_atomic", "read_json", "fsync_folder"]

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("config", "image_shape", "epoch", "step", "model", "optimizers", "rng")


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: str, write) -> None:
    """Call ``write(binary file)`` on a temp file next to ``path``, fsync, rename over ``path``.
    An OSError (disk full, permissions) becomes a ``WriteError`` naming ``path``; the temp
    file is removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(folder)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to ``path`` atomically (see the module docstring)."""
    _replace_atomically(path, lambda fh: torch.save(obj, fh))


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    _replace_atomically(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def read_json(path: str, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; a missing, unreadable or non-object file raises
    ``InputFileError`` naming the path."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: expected a {what}, found a folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: not a readable {what} ({exc})") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not isinstance(value, dict):
        raise InputFileError(f"{path}: expected a JSON object (a {what}), got a {type(value).__name__}")
    return value


def _tensors(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def nonfinite_tensors(obj) -> list[str]:
    """Names (dotted paths) of the floating-point tensors in ``obj`` holding NaN or Inf."""
    return [name for name, t in _tensors(obj)
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint read with ``weights_only=True`` and checked: a missing, truncated or
    foreign file, missing keys or non-finite weights raise ``InputFileError`` naming ``path``."""
    if not os.path.exists(path):
        raise InputFileError(f"{path}: no checkpoint there (train first, or pass --checkpoint)")
    if not os.path.isfile(path):
        raise InputFileError(f"{path}: expected a checkpoint file, found a folder")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    except Exception as exc:    # noqa: BLE001 - whatever a corrupt file makes torch.load raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path}: not a readable checkpoint (truncated or corrupt: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputFileError(f"{path}: not a silent-vae checkpoint (expected format "
                             f"{CHECKPOINT_FORMAT}, found {found!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise InputFileError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    if not isinstance(ckpt["config"], dict):
        raise InputFileError(f"{path}: the checkpoint's config is a {type(ckpt['config']).__name__}, "
                             "expected a dict")
    bad = nonfinite_tensors({"model": ckpt["model"], "optimizers": ckpt["optimizers"]})
    if bad:
        raise InputFileError(f"{path}: checkpoint holds non-finite values in {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}; it was not written by silent-vae, "
                             "which never saves non-finite weights")
    return ckpt
