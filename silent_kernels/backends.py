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
from typing import NamedTuple, Optional

import torch

from . import categorical, reference
from .autograd import reference_loss

__all__ = ["Backend", "KINDS", "info", "resolve", "available"]

# What a backend can implement; each entry point returns the per-sample loss (B,):
#   fixed             (x, mean, var, weight, bias, sigma2)
#   precision         (x, mean, var, k3, k4, weight, bias, second_weight, second_bias, head):
#                     the mean-field contraction stage, then the epilogue autograd.HEADS[head]
#   bernoulli_logvar  (x, logits, weight, bias, logvar_weight, logvar_bias): fused tilting
#   tilted_logvar     (x, q, weight, bias, logvar_weight, logvar_bias): any family (reference)
#   categorical_fixed / _precision / _logvar
#                     (x, logits (B, G, K), weight, bias, sigma2 | second_weight, second_bias)
KINDS = ("fixed", "precision", "bernoulli_logvar", "tilted_logvar", "categorical_fixed",
         "categorical_precision", "categorical_logvar")


class Backend(NamedTuple):
    """A backend: the device types it runs on and its entry point per kind of loss."""

    name: str
    devices: tuple
    kernels: dict

    def has(self, kind: str) -> bool:
        return kind in self.kernels


def _tilted_logvar(x, q, weight, bias, logvar_weight, logvar_bias):
    return reference.logvar_nll(x, q, weight, bias, logvar_weight, logvar_bias)


def _load_torch() -> Backend:
    return Backend("torch", ("cpu", "cuda"), {
        "fixed": reference.fixed_nll, "precision": reference_loss("precision"),
        "bernoulli_logvar": reference_loss("bernoulli_logvar"), "tilted_logvar": _tilted_logvar,
        "categorical_fixed": categorical.categorical_fixed_nll,
        "categorical_precision": categorical.categorical_precision_nll,
        "categorical_logvar": categorical.categorical_logvar_nll})


def _load_cpp() -> Backend:
    ops = importlib.import_module("silent_kernels.ops")
    if not ops.cpp_ops_registered():
        raise RuntimeError("the compiled extension silent_kernels._C has no CPU kernels")
    return Backend("cpp", ("cpu",), {"fixed": ops.cpp_fixed_nll, "precision": ops.cpp_precision_nll,
                                     "bernoulli_logvar": ops.cpp_bernoulli_logvar_nll,
                                     "categorical_fixed": ops.cpp_categorical_fixed_nll,
                                     "categorical_precision": ops.cpp_categorical_precision_nll,
                                     "categorical_logvar": ops.cpp_categorical_logvar_nll})


def _load_cuda() -> Backend:
    ops = importlib.import_module("silent_kernels.ops")
    if not ops.cuda_ops_registered():
        raise RuntimeError(
            "silent_kernels._C was built without CUDA (torch has no CUDA, or nvcc was not found "
            "at install time); reinstall with a CUDA build of torch to get it"
        )
    kernels = {"fixed": ops.cuda_fixed_nll, "precision": ops.cuda_precision_nll}
    if ops.cuda_ops_registered("bernoulli_logvar"):
        kernels["bernoulli_logvar"] = ops.cuda_bernoulli_logvar_nll
    if ops.cuda_ops_registered("categorical"):   # the same ops: the dispatcher picks CUDA kernels
        kernels.update(categorical_fixed=ops.cpp_categorical_fixed_nll,
                       categorical_precision=ops.cpp_categorical_precision_nll,
                       categorical_logvar=ops.cpp_categorical_logvar_nll)
    return Backend("cuda", ("cuda",), kernels)


def _load_triton() -> Backend:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"triton is not installed ({exc}); pip install triton") from exc
    mod = importlib.import_module("silent_kernels.triton_ops")
    devices = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    kernels = {"fixed": mod.triton_fixed_nll, "precision": mod.triton_precision_nll}
    if hasattr(mod, "triton_bernoulli_logvar_nll"):
        kernels["bernoulli_logvar"] = mod.triton_bernoulli_logvar_nll
    for kind in ("categorical_fixed", "categorical_precision", "categorical_logvar"):
        if hasattr(mod, f"triton_{kind}_nll"):
            kernels[kind] = getattr(mod, f"triton_{kind}_nll")
    return Backend("triton", devices, kernels)


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


def _auto(device_type: str, kind: str = "fixed") -> Backend:
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        backend, _ = _load(name)
        if backend is not None and device_type in backend.devices and backend.has(kind):
            return backend
    return _load("torch")[0]


_ERROR = "!"  # prefix of an error returned by _choose (no backend name starts with it)


@torch.compiler.assume_constant_result
def _choose(name: str, device_type: str, kind: str, what: str) -> str:
    """The name of the backend that runs a call on `device_type`, or _ERROR + error + message.

    Returns a string so that torch.compile can run it eagerly while tracing (it may import
    the backend's module) and treat the result as a constant: ``analytic_nll`` then traces
    into the chosen backend's registered op with no graph break. ``what`` names the loss
    (head and latent family) for the error message."""
    if name == "auto":
        return _auto(device_type, kind).name
    backend, reason = _load(name)
    if backend is None:
        return (f"{_ERROR}RuntimeError:backend={name!r} is not available: {reason}. "
                "See silent_kernels.info(); backend='torch' always works.")
    if device_type not in backend.devices:
        return (f"{_ERROR}ValueError:backend={name!r} runs on {', '.join(backend.devices)} tensors, "
                f"got tensors on {device_type}")
    if not backend.has(kind):
        return (f"{_ERROR}ValueError:backend={name!r} has no kernel for {what}; use backend='auto' "
                "or backend='torch' (the reference computes it exactly)")
    return name


def resolve(name: str, device: torch.device, kind: str = "fixed", what: str = "") -> Backend:
    """The backend that runs a ``kind`` loss (see KINDS) on `device`; a clear error if it cannot."""
    choice = _choose(name, device.type, kind, what or kind)
    if choice.startswith(_ERROR):
        error, message = choice[len(_ERROR):].split(":", 1)
        raise (ValueError if error == "ValueError" else RuntimeError)(message)
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
            entry["kinds"] = sorted(backend.kernels)
        report["backends"][name] = entry
    report["auto"] = {dev: _auto(dev).name for dev in ("cpu", "cuda")}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    return report
