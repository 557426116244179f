"""The Triton backend as ``torch.library`` custom ops (namespace ``silent_kernels``).

    silent_kernels::triton_fixed_nll(x, mean, var, weight, bias?, sigma2) -> (B,)
    silent_kernels::triton_fixed_nll_backward(grad, x, mean, var, weight, bias?, sigma2, bool[6] needs)
    silent_kernels::triton_precision_nll(x, mean, var, k3?, k4?, weight, bias?, precision_weight,
                                         precision_bias?) -> (B,)
    silent_kernels::triton_precision_nll_backward(grad, <those 9>, bool[9] needs)

Fake kernels and autograd come from ``autograd.register_loss_ops`` (the contract shared
by every backend). The kernels themselves live in ``triton_kernels``. They run on CUDA
tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before this module was
imported (the Triton interpreter: slow, for tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels as _k
from .autograd import register_loss_ops

__all__ = ["triton_fixed_nll", "triton_precision_nll"]

Tensors6 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
Tensors9 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("silent_kernels::triton_fixed_nll", mutates_args=())
def _fixed_nll_op(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                  sigma2: Tensor) -> Tensor:
    return _k.fixed_forward(x, mean, var, weight, bias, sigma2)


@torch.library.custom_op("silent_kernels::triton_fixed_nll_backward", mutates_args=())
def _fixed_nll_backward_op(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor,
                           bias: Optional[Tensor], sigma2: Tensor, needs: list[bool]) -> Tensors6:
    return _k.fixed_backward(grad, x, mean, var, weight, bias, sigma2, needs)


@torch.library.custom_op("silent_kernels::triton_precision_nll", mutates_args=())
def _precision_nll_op(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                      weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                      precision_bias: Optional[Tensor]) -> Tensor:
    return _k.precision_forward(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias)


@torch.library.custom_op("silent_kernels::triton_precision_nll_backward", mutates_args=())
def _precision_nll_backward_op(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor],
                               k4: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                               precision_weight: Tensor, precision_bias: Optional[Tensor],
                               needs: list[bool]) -> Tensors9:
    return _k.precision_backward(grad, x, mean, var, k3, k4, weight, bias, precision_weight,
                                 precision_bias, needs)


register_loss_ops("fixed", "triton", _fixed_nll_op, _fixed_nll_backward_op)
register_loss_ops("precision", "triton", _precision_nll_op, _precision_nll_backward_op)


def triton_fixed_nll(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                     sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance loss (B,) through the registered op (differentiable)."""
    return torch.ops.silent_kernels.triton_fixed_nll(x, mean, var, weight, bias, sigma2)


def triton_precision_nll(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                         weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                         precision_bias: Optional[Tensor]) -> Tensor:
    """Per-sample learnable-precision loss (B,) through the registered op (differentiable)."""
    return torch.ops.silent_kernels.triton_precision_nll(x, mean, var, k3, k4, weight, bias,
                                                         precision_weight, precision_bias)
