"""The Triton backend as ``torch.library`` custom ops (namespace ``silent_kernels``).

    triton_fixed_nll(x, mean, var, weight, bias?, sigma2) -> (B,)
    triton_fixed_nll_backward(grad, x, mean, var, weight, bias?, sigma2, bool[6] needs)
    triton_precision_nll(x, mean, var, k3?, k4?, weight, bias?, precision_weight, precision_bias?,
                         int head=0) -> (B,)
    triton_precision_nll_backward(grad, <those 9 tensors>, bool[9] needs, int head=0)
    triton_bernoulli_logvar_nll(x, logits, weight, bias?, logvar_weight, logvar_bias?) -> (B,)
    triton_bernoulli_logvar_nll_backward(grad, <those 6>, bool[6] needs)
    triton_categorical_nll(x, logits (B, G, K), weight, bias?, second_weight?, second_bias?, sigma2?,
                           int head) -> (B,)
    triton_categorical_nll_backward(grad, <those 7 tensors>, bool[7] needs, int head)

``head`` (autograd.HEADS): 0 the paper's Taylor log term, 1 the exact log term (Gaussian
latents: k3 = k4 = None), 2 the log-variance head on Gaussian latents (precision_weight /
precision_bias then hold the log-variance weights H, h0; k3 = k4 = None). The categorical op
(one-hot groups, weights (k, G K) group-major) takes head 3 (fixed: sigma2, no second head),
0 (precision, Taylor log term: second_weight = C) or 2 (log-variance: second_weight = H).

Fake kernels and autograd come from ``autograd.register_loss_ops`` (the contract shared by
every backend). The kernels live in ``triton_fixed``, ``triton_precision`` and
``triton_logvar`` and ``triton_categorical``. They run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was
set before this module was imported (the Triton interpreter: slow, for tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .autograd import HEADS, register_loss_ops
from .triton_categorical_launch import categorical_backward, categorical_forward
from .triton_fixed import fixed_backward, fixed_forward
from .triton_logvar import bernoulli_logvar_backward, bernoulli_logvar_forward
from .triton_precision import precision_backward, precision_forward

__all__ = ["triton_fixed_nll", "triton_precision_nll", "triton_bernoulli_logvar_nll",
           "triton_categorical_fixed_nll", "triton_categorical_precision_nll", "triton_categorical_logvar_nll"]

Tensors6 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
Tensors7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
Tensors9 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("silent_kernels::triton_fixed_nll", mutates_args=())
def _fixed_nll_op(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                  sigma2: Tensor) -> Tensor:
    return fixed_forward(x, mean, var, weight, bias, sigma2)


@torch.library.custom_op("silent_kernels::triton_fixed_nll_backward", mutates_args=())
def _fixed_nll_backward_op(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor,
                           bias: Optional[Tensor], sigma2: Tensor, needs: list[bool]) -> Tensors6:
    return fixed_backward(grad, x, mean, var, weight, bias, sigma2, needs)


@torch.library.custom_op("silent_kernels::triton_precision_nll", mutates_args=())
def _precision_nll_op(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                      weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                      precision_bias: Optional[Tensor], head: int = 0) -> Tensor:
    return precision_forward(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias, head)


@torch.library.custom_op("silent_kernels::triton_precision_nll_backward", mutates_args=())
def _precision_nll_backward_op(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor],
                               k4: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                               precision_weight: Tensor, precision_bias: Optional[Tensor],
                               needs: list[bool], head: int = 0) -> Tensors9:
    return precision_backward(grad, x, mean, var, k3, k4, weight, bias, precision_weight,
                              precision_bias, needs, head)


@torch.library.custom_op("silent_kernels::triton_bernoulli_logvar_nll", mutates_args=())
def _bernoulli_logvar_nll_op(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                             logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> Tensor:
    return bernoulli_logvar_forward(x, logits, weight, bias, logvar_weight, logvar_bias)


@torch.library.custom_op("silent_kernels::triton_bernoulli_logvar_nll_backward", mutates_args=())
def _bernoulli_logvar_nll_backward_op(grad: Tensor, x: Tensor, logits: Tensor, weight: Tensor,
                                      bias: Optional[Tensor], logvar_weight: Tensor,
                                      logvar_bias: Optional[Tensor], needs: list[bool]) -> Tensors6:
    return bernoulli_logvar_backward(grad, x, logits, weight, bias, logvar_weight, logvar_bias, needs)


@torch.library.custom_op("silent_kernels::triton_categorical_nll", mutates_args=())
def _categorical_nll_op(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                        second_weight: Optional[Tensor], second_bias: Optional[Tensor],
                        sigma2: Optional[Tensor], head: int) -> Tensor:
    return categorical_forward(x, logits, weight, bias, second_weight, second_bias, sigma2, head)


@torch.library.custom_op("silent_kernels::triton_categorical_nll_backward", mutates_args=())
def _categorical_nll_backward_op(grad: Tensor, x: Tensor, logits: Tensor, weight: Tensor,
                                 bias: Optional[Tensor], second_weight: Optional[Tensor],
                                 second_bias: Optional[Tensor], sigma2: Optional[Tensor],
                                 needs: list[bool], head: int) -> Tensors7:
    return categorical_backward(grad, x, logits, weight, bias, second_weight, second_bias, sigma2, needs, head)


register_loss_ops("fixed", "triton", _fixed_nll_op, _fixed_nll_backward_op)
register_loss_ops("precision", "triton", _precision_nll_op, _precision_nll_backward_op)
register_loss_ops("bernoulli_logvar", "triton", _bernoulli_logvar_nll_op, _bernoulli_logvar_nll_backward_op)
register_loss_ops("categorical", "triton", _categorical_nll_op, _categorical_nll_backward_op)


def triton_fixed_nll(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                     sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance loss (B,) through the registered op (differentiable)."""
    return torch.ops.silent_kernels.triton_fixed_nll(x, mean, var, weight, bias, sigma2)


def triton_precision_nll(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                         weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                         precision_bias: Optional[Tensor], head: int = 0) -> Tensor:
    """Per-sample loss (B,) of a head on the mean-field contractions through the registered op
    (differentiable); head 0 Taylor log term, 1 exact log term, 2 log-variance (see above)."""
    return torch.ops.silent_kernels.triton_precision_nll(x, mean, var, k3, k4, weight, bias,
                                                         precision_weight, precision_bias, head)


def triton_bernoulli_logvar_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                                logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> Tensor:
    """Per-sample log-variance loss (B,) for Bernoulli latents given by their logits (B, d),
    through the registered op (differentiable)."""
    return torch.ops.silent_kernels.triton_bernoulli_logvar_nll(x, logits, weight, bias,
                                                                logvar_weight, logvar_bias)


def triton_categorical_fixed_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                                 sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance loss (B,) with one-hot categorical latents (logits (B, G, K),
    weight (k, G K) group-major, sigma2 (k,)) through the registered op (differentiable)."""
    return torch.ops.silent_kernels.triton_categorical_nll(x, logits, weight, bias, None, None, sigma2,
                                                           HEADS["fixed"])


def triton_categorical_precision_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                                     precision_weight: Tensor, precision_bias: Optional[Tensor]) -> Tensor:
    """Per-sample learnable-precision loss (B,) with categorical latents: exact data term, the
    paper's Taylor log term (an approximation), through the registered op (differentiable)."""
    return torch.ops.silent_kernels.triton_categorical_nll(x, logits, weight, bias, precision_weight,
                                                           precision_bias, None, HEADS["taylor"])


def triton_categorical_logvar_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> Tensor:
    """Per-sample log-variance loss (B,) with categorical latents, exact by per-group tilting,
    through the registered op (differentiable)."""
    return torch.ops.silent_kernels.triton_categorical_nll(x, logits, weight, bias, logvar_weight,
                                                           logvar_bias, None, HEADS["logvar"])
