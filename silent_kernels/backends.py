"""Which implementations exist on this install, and which one a call uses.

Backends:
    torch  - the pure-PyTorch reference (always available; CPU and CUDA).
    cpp    - the C++ CPU kernels in the compiled extension ``silent_kernels._C``.
    cuda   - the CUDA kernels in the same extension, when it was built with CUDA.
    triton - the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).

``auto`` picks cpp for CPU tensors and triton (then cuda) for CUDA tensors and falls
back to the reference; ``info()`` says why a backend is missing. Nothing here imports
the compiled extension at package import time, so a failed build never breaks
``import silent_kernels``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, NamedTuple, Optional

import torch

from . import reference

__all__ = ["Backend", "info", "resolve", "available"]


class Backend(NamedTuple):
    """A backend's two entry points; both return the per-sample loss (B,)."""

    name: str
    devices: tuple  # device types it runs on
    fixed_nll: Callable
    precision_nll: Callable


def _load_torch() -> Backend:
    return Backend("torch", ("cpu", "cuda"), reference.fixed_nll, reference.precision_nll)


def _load_cpp() -> Backend:
    ops = importlib.import_module("silent_kernels.ops")
    if not ops.cpp_ops_registered():
        raise RuntimeError("the compiled extension silent_kernels._C has no CPU kernels")
    return Backend("cpp", ("cpu",), ops.cpp_fixed_nll, ops.cpp_precision_nll)


def _load_cuda() -> Backend:
    ops = importlib.import_module("silent_kernels.ops")
    if not ops.cuda_ops_registered():
        raise RuntimeError(
            "silent_kernels._C was built without CUDA (torch has no CUDA, or nvcc was not found "
            "at install time); reinstall with a CUDA build of torch to get it"
        )
    return Backend("cuda", ("cuda",), ops.cuda_fixed_nll, ops.cuda_precision_nll)


def _load_triton() -> Backend:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"triton is not installed ({exc}); pip install triton") from exc
    mod = importlib.import_module("silent_kernels.triton_ops")
    devices = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    return Backend("triton", devices, mod.triton_fixed_nll, mod.triton_precision_nll)


_LOADERS = {"torch": _load_torch, "cpp": _load_cpp, "cuda": _load_cuda, "triton": _load_triton}


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[Optional[Backend], str]:
    try:
        return _LOADERS[name](), ""
    except Exception as exc:  # any import or build problem makes the backend unavailable
        return None, f"{type(exc).__name__}: {exc}"


def available(name: str) -> bool:
    return _load(name)[0] is not None


_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


def _auto(device_type: str) -> Backend:
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        backend, _ = _load(name)
        if backend is not None and device_type in backend.devices:
            return backend
    return _load("torch")[0]


def resolve(name: str, device: torch.device) -> Backend:
    """The backend that runs a call on `device`; a clear error if it cannot."""
    if name == "auto":
        return _auto(device.type)
    backend, reason = _load(name)
    if backend is None:
        raise RuntimeError(f"backend={name!r} is not available: {reason}. "
                           "See silent_kernels.info(); backend='torch' always works.")
    if device.type not in backend.devices:
        raise ValueError(f"backend={name!r} runs on {', '.join(backend.devices)} tensors, "
                         f"got tensors on {device}")
    return backend


def info() -> dict:
    """Versions, each backend's availability (with the reason when missing) and auto's choice."""
    report = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "backends": {}}
    for name in _LOADERS:
        backend, reason = _load(name)
        entry = {"available": backend is not None}
        if backend is None:
            entry["reason"] = reason
        else:
            entry["devices"] = list(backend.devices)
        report["backends"][name] = entry
    report["auto"] = {dev: _auto(dev).name for dev in ("cpu", "cuda")}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    return report
