"""The compiled ops of ``silent_kernels._C`` (C++ CPU kernels, CUDA kernels when built).

Importing this module loads the extension (an ``ImportError`` says why it cannot; the
backend registry reports it in ``silent_kernels.info()``) and registers fake kernels and
autograd for its ops, once. The same four ops serve the ``cpp`` and ``cuda`` backends: the
dispatcher sends CPU tensors to the CPU kernels and CUDA tensors to the CUDA kernels.

    torch.ops.silent_kernels.fixed_nll(x, mean, var, weight, bias?, sigma2) -> (B,)
    torch.ops.silent_kernels.precision_nll(x, mean, var, k3?, k4?, weight, bias?,
                                           precision_weight, precision_bias?) -> (B,)
    (+ their ``*_backward`` ops, and the debug op ``_linear_offset(row, col, ld)``)

The entry points below call the registered ops directly, so ``torch.compile(fullgraph=True)``
sees them as single graph nodes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library; its static initialisers register the ops)
from .autograd import _OPS, register_loss_ops

__all__ = [
    "cpp_ops_registered",
    "cuda_ops_registered",
    "cpp_fixed_nll",
    "cpp_precision_nll",
    "cuda_fixed_nll",
    "cuda_precision_nll",
    "linear_offset",
]

_NS = torch.ops.silent_kernels
_OP_NAMES = ("fixed_nll", "fixed_nll_backward", "precision_nll", "precision_nll_backward")


def _register_once() -> None:
    # register_fake / register_autograd may be called only once per op; both backend names
    # share the ops, so the second one is only recorded.
    if ("fixed", "cpp") in _OPS:
        return
    for head in ("fixed", "precision"):
        # OpOverloads (``.default``): autograd's registration needs their qualified name.
        forward = getattr(_NS, f"{head}_nll").default
        backward = getattr(_NS, f"{head}_nll_backward").default
        register_loss_ops(head, "cpp", forward, backward)
        _OPS[(head, "cuda")] = (forward, backward)


_register_once()


def _has_kernel(dispatch_key: str) -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"silent_kernels::{name}", dispatch_key)
               for name in _OP_NAMES)


def cpp_ops_registered() -> bool:
    """True when the extension has CPU kernels for all four ops."""
    return _has_kernel("CPU")


def cuda_ops_registered() -> bool:
    """True when the extension was built with CUDA kernels for all four ops."""
    return _has_kernel("CUDA")


def cpp_fixed_nll(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                  sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance loss (B,) by the compiled op (sigma2: (k,), may be expanded)."""
    return _NS.fixed_nll.default(x, mean, var, weight, bias, sigma2)


def cpp_precision_nll(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                      weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                      precision_bias: Optional[Tensor]) -> Tensor:
    """Per-sample learnable-precision loss (B,) by the compiled op."""
    return _NS.precision_nll.default(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias)


# Same ops: the dispatcher picks the CUDA kernels for CUDA tensors.
cuda_fixed_nll = cpp_fixed_nll
cuda_precision_nll = cpp_precision_nll


def linear_offset(row: int, col: int, ld: int) -> int:
    """The kernels' int64 element offset row * ld + col (debug op, for tests)."""
    return _NS._linear_offset.default(row, col, ld)
