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


# name -> (Backend or None, reason it is missing). A plain dict rather than functools.lru_cache:
# torch.compile reads it while tracing ``resolve`` (see ``_choose``).
_LOADED: dict[str, tuple[Optional[Backend], str]] = {}


def _load(name: str) -> tuple[Optional[Backend], str]:
    """Load a backend once (this may import modules); later calls return the cached result."""
    if name not in _LOADED:
        try:
            _LOADED[name] = (_LOADERS[name](), "")
        except Exception as exc:  # any import or build problem makes the backend unavailable
            _LOADED[name] = (None, f"{type(exc).__name__}: {exc}")
    return _LOADED[name]


_load.cache_clear = _LOADED.clear  # type: ignore[attr-defined]  # forget what was loaded (tests)


def available(name: str) -> bool:
    return _load(name)[0] is not None


_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


def _auto(device_type: str) -> Backend:
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        backend, _ = _load(name)
        if backend is not None and device_type in backend.devices:
            return backend
    return _load("torch")[0]


_ERROR = "!"  # prefix of an error returned by _choose (no backend name starts with it)


@torch.compiler.assume_constant_result
def _choose(name: str, device_type: str) -> str:
    """The name of the backend that runs a call on `device_type`, or _ERROR + kind + message.

    Returns a string so that torch.compile can run it eagerly while tracing (it may import
    the backend's module) and treat the result as a constant: ``analytic_nll`` then traces
    into the chosen backend's registered op with no graph break."""
    if name == "auto":
        return _auto(device_type).name
    backend, reason = _load(name)
    if backend is None:
        return (f"{_ERROR}RuntimeError:backend={name!r} is not available: {reason}. "
                "See silent_kernels.info(); backend='torch' always works.")
    if device_type not in backend.devices:
        return (f"{_ERROR}ValueError:backend={name!r} runs on {', '.join(backend.devices)} tensors, "
                f"got tensors on {device_type}")
    return name


def resolve(name: str, device: torch.device) -> Backend:
    """The backend that runs a call on `device`; a clear error if it cannot."""
    choice = _choose(name, device.type)
    if choice.startswith(_ERROR):
        kind, message = choice[len(_ERROR):].split(":", 1)
        raise (ValueError if kind == "ValueError" else RuntimeError)(message)
    return _LOADED[choice][0]


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
