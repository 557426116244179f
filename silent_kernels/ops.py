"""The compiled ops of ``silent_kernels._C`` (C++ CPU kernels, CUDA kernels when built).

Importing this module loads the extension (an ``ImportError`` says why it cannot; the
backend registry reports it in ``silent_kernels.info()``) and registers fake kernels and
autograd for its ops, once. The same four ops serve the ``cpp`` and ``cuda`` backends: the
dispatcher sends CPU tensors to the CPU kernels and CUDA tensors to the CUDA kernels.

    torch.ops.silent_kernels.fixed_nll(x, mean, var, weight, bias?, sigma2) -> (B,)
    torch.ops.silent_kernels.precision_nll(x, mean, var, k3?, k4?, weight, bias?,
                                           precision_weight, precision_bias?, head) -> (B,)
    torch.ops.silent_kernels.bernoulli_logvar_nll(x, logits, weight, bias?, logvar_weight,
                                                  logvar_bias?) -> (B,)
    (+ their ``*_backward`` ops; ``head`` as in ``autograd.HEADS``)

The entry points below call the registered ops directly, so ``torch.compile(fullgraph=True)``
sees them as single graph nodes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library; its static initialisers register the ops)
from .autograd import OPS, HEADS, register_loss_ops, register_saved_coefficient_ops

__all__ = [
    "cpp_ops_registered",
    "cuda_ops_registered",
    "cpp_fixed_nll",
    "cpp_precision_nll",
    "cpp_bernoulli_logvar_nll",
    "cpp_categorical_fixed_nll",
    "cpp_categorical_precision_nll",
    "cpp_categorical_logvar_nll",
    "cuda_fixed_nll",
    "cuda_precision_nll",
    "cuda_bernoulli_logvar_nll",
]

_NS = torch.ops.silent_kernels
_KINDS = ("fixed", "precision", "bernoulli_logvar", "categorical")


def _register_once() -> None:
    # register_fake / register_autograd may be called only once per op; both backend names
    # share the ops, so the second one is only recorded.
    if ("fixed", "cpp") in OPS:
        return
    for kind in _KINDS:
        # OpOverloads (``.default``): autograd's registration needs their qualified name.
        forward = getattr(_NS, f"{kind}_nll").default
        backward = getattr(_NS, f"{kind}_nll_backward").default
        register_loss_ops(kind, "cpp", forward, backward)
        OPS[(kind, "cuda")] = (forward, backward)


_register_once()


# ---------------------------------------------- cpp training pairs (fixed and precision heads)
#   fixed_nll_train(x, mean, var, weight, bias?, sigma2) -> (loss (B,), (x - ubar) / sigma2 (B, k))
#   fixed_nll_train_backward(grad, coefficients, mean, var, weight, sigma2, bool[6] needs) -> 6 tensors
#   precision_nll_train(<the 9 inputs>) -> (loss (B,), coefficients)
#   precision_nll_train_backward(grad, coefficients, mean, var, k3?, k4?, weight,
#                                precision_weight, bool[9] needs) -> 9 tensors
# The forward also returns the unscaled per-pixel coefficients d(pixel loss)/d(contraction)
# (a flat float32 tensor, float64 for float64 inputs, of B * n * k elements, n = 5 + 3 [k3]
# + 1 [k4]; layout in csrc/cpu_precision.cpp) so that the backward needs no recomputation.
# CPU kernels only: the CUDA and Triton backends keep the four ops above.

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_train_coefficients(x, mean, var, k3, k4, *rest) -> Tensor:  # rest ends with head
    n = 5 + (3 if k3 is not None else 0) + (1 if k4 is not None else 0)
    return x.new_empty(x.shape[0] * n * x.shape[1], dtype=_acc_dtype(x.dtype))


def _fake_train_backward(grad, coefficients, mean, var, k3, k4, weight, precision_weight, needs):
    B, (k, d) = grad.shape[0], weight.shape
    shapes = [(B, k), mean.shape, var.shape, None if k3 is None else k3.shape,
              None if k4 is None else k4.shape, (k, d), (k,), (k, d), (k,)]
    return tuple(weight.new_empty(s) if (need and s is not None) else weight.new_empty(0)
                 for s, need in zip(shapes, needs))


def _fake_fixed_coefficients(x, *rest) -> Tensor:
    return x.new_empty(x.shape, dtype=_acc_dtype(x.dtype))


def _fake_fixed_backward(grad, coefficients, mean, var, weight, sigma2, needs):
    B, (k, d) = grad.shape[0], weight.shape
    shapes = [(B, k), mean.shape, var.shape, (k, d), (k,), (k,)]
    return tuple(weight.new_empty(s) if need else weight.new_empty(0) for s, need in zip(shapes, needs))


def _register_train_once() -> None:
    if ("precision", "cpp-train") in OPS:
        return
    forward, backward = _NS.precision_nll_train.default, _NS.precision_nll_train_backward.default
    # The backward takes mean, var, k3, k4, weight, precision_weight after the coefficients.
    register_saved_coefficient_ops("precision", forward, backward, (1, 2, 3, 4, 5, 7),
                                   _fake_train_coefficients, _fake_train_backward)
    OPS[("precision", "cpp-train")] = (forward, backward)
    forward, backward = _NS.fixed_nll_train.default, _NS.fixed_nll_train_backward.default
    # The backward takes mean, var, weight, sigma2 after the coefficients (x - ubar) / sigma2.
    register_saved_coefficient_ops("fixed", forward, backward, (1, 2, 3, 5),
                                   _fake_fixed_coefficients, _fake_fixed_backward)
    OPS[("fixed", "cpp-train")] = (forward, backward)


_register_train_once()


def _has_kernel(dispatch_key: str, kinds) -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"silent_kernels::{kind}_nll{suffix}", dispatch_key)
               for kind in kinds for suffix in ("", "_backward"))


def cpp_ops_registered() -> bool:
    """True when the extension has CPU kernels for every op."""
    return _has_kernel("CPU", _KINDS)


def cuda_ops_registered(*kinds: str) -> bool:
    """True when the extension was built with CUDA kernels for the ops of ``kinds`` (default:
    the fixed and precision ops)."""
    return _has_kernel("CUDA", kinds or ("fixed", "precision"))


def _needs_grad_on_cpu(x: Tensor, args) -> bool:
    return (x.device.type == "cpu" and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in args))


def cpp_fixed_nll(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                  sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance loss (B,) by the compiled op (sigma2: (k,), may be expanded).

    When autograd will need a gradient on the CPU, the training op keeps the residual
    coefficients (B, k) so that the backward does not recompute the mean GEMM."""
    args = (x, mean, var, weight, bias, sigma2)
    if _needs_grad_on_cpu(x, args):
        return _NS.fixed_nll_train.default(*args)[0]
    return _NS.fixed_nll.default(*args)


def cuda_fixed_nll(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                   sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance loss (B,) (CUDA kernels)."""
    return _NS.fixed_nll.default(x, mean, var, weight, bias, sigma2)


def cpp_precision_nll(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                      weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                      precision_bias: Optional[Tensor], head: int = 0) -> Tensor:
    """Per-sample loss (B,) of a head on the mean-field contractions by the compiled op
    (``head`` as in ``autograd.HEADS``: Taylor or exact log term, or the log-variance head).

    When autograd will need a gradient (grad mode on and some input requires grad) and the
    tensors are on the CPU, the training op is used: its forward saves the per-pixel
    coefficients so that the backward does not recompute the contractions. Otherwise (e.g.
    inference) the plain op, which saves nothing.
    """
    args = (x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias)
    if _needs_grad_on_cpu(x, args):
        return _NS.precision_nll_train.default(*args, head)[0]
    return _NS.precision_nll.default(*args, head)


def cpp_bernoulli_logvar_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                             logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> Tensor:
    """Per-sample log-variance-head loss (B,) with Bernoulli latents (fused tilted kernel)."""
    return _NS.bernoulli_logvar_nll.default(x, logits, weight, bias, logvar_weight, logvar_bias)


def _categorical(head: str):
    def loss(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor], *rest) -> Tensor:
        """Per-sample loss (B,) with one-hot categorical latents (logits (B, G, K)): rest is
        (sigma2,) for the fixed head, else (second_weight, second_bias)."""
        second, second_bias, sigma2 = (None, None, rest[0]) if head == "fixed" else (*rest, None)
        return _NS.categorical_nll.default(x, logits, weight, bias, second, second_bias, sigma2, HEADS[head])
    return loss


cpp_categorical_fixed_nll = _categorical("fixed")
cpp_categorical_precision_nll = _categorical("taylor")
cpp_categorical_logvar_nll = _categorical("logvar")

# Same op: the dispatcher picks the CUDA kernels for CUDA tensors.
cuda_bernoulli_logvar_nll = cpp_bernoulli_logvar_nll


def cuda_precision_nll(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                       weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                       precision_bias: Optional[Tensor], head: int = 0) -> Tensor:
    """Per-sample loss (B,) of a head on the mean-field contractions (CUDA kernels)."""
    return _NS.precision_nll.default(x, mean, var, k3, k4, weight, bias, precision_weight,
                                     precision_bias, head)
