"""Fake (meta) kernels, autograd registration and public ``torch.autograd.Function``s
for the fused loss ops, shared by every kernel backend.

Each backend provides a pair of registered ops with these schemas (namespace
``silent_kernels``; the triton ops carry a ``triton_`` prefix):

    fixed_nll(x, mean, var, weight, bias?, sigma2) -> loss (B,)
    fixed_nll_backward(grad (B,), <the 6 inputs>, bool[6] needs) -> 6 tensors
    precision_nll(x, mean, var, k3?, k4?, weight, bias?, precision_weight, precision_bias?) -> loss (B,)
    precision_nll_backward(grad (B,), <the 9 inputs>, bool[9] needs) -> 9 tensors

Shapes: x (B, k); moments (B, d); weights (k, d); biases and sigma2 (k,). A backward
op returns, for each input, its gradient (the input's shape) where ``needs`` is true
and an empty (0,) tensor otherwise, so a frozen decoder or detached moments cost
nothing. ``grad`` is the upstream gradient of each sample's loss.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "FIXED_INPUTS",
    "PRECISION_INPUTS",
    "register_loss_ops",
    "register_saved_coefficient_ops",
    "FixedNLLFunction",
    "PrecisionNLLFunction",
]

FIXED_INPUTS = ("x", "mean", "var", "weight", "bias", "sigma2")
PRECISION_INPUTS = ("x", "mean", "var", "k3", "k4", "weight", "bias", "precision_weight", "precision_bias")

# (head, backend) -> (forward op, backward op)
_OPS: dict[tuple[str, str], tuple[Callable, Callable]] = {}


def _fake_forward(x: Tensor, *rest) -> Tensor:
    return x.new_empty(x.shape[0])


def _fake_backward(grad: Tensor, *args) -> tuple[Tensor, ...]:
    *inputs, needs = args
    return tuple(t.new_empty(t.shape) if (need and t is not None) else grad.new_empty(0)
                 for t, need in zip(inputs, needs))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _make_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad: Tensor):
        inputs = ctx.saved_tensors
        needs = [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad, inputs)]
        if not any(needs):
            return (None,) * len(inputs)
        grads = backward_op(grad.contiguous(), *inputs, needs)
        return tuple(g if need else None for g, need in zip(grads, needs))

    return backward


def register_loss_ops(head: str, backend: str, forward_op, backward_op) -> None:
    """Register fake kernels and autograd for one backend's (forward, backward) op pair.

    ``forward_op`` / ``backward_op`` are ``torch.ops.silent_kernels.*`` overload packets
    (or ``custom_op`` objects); head is "fixed" or "precision".
    """
    torch.library.register_fake(_qualname(forward_op), _fake_forward)
    torch.library.register_fake(_qualname(backward_op), _fake_backward)
    torch.library.register_autograd(_qualname(forward_op), _make_backward(backward_op),
                                    setup_context=_setup_context)
    _OPS[(head, backend)] = (forward_op, backward_op)


# ----------------------------------------------- training ops that save their coefficients
# A backend may also provide a training pair (the cpp backend's learnable-precision head):
#
#     <name>(<the forward op's inputs>) -> (loss (B,), coefficients)
#     <name>_backward(grad (B,), coefficients, <saved_inputs>, bool[n] needs) -> n tensors
#
# ``coefficients`` is an opaque plain tensor (its shape a function of the input shapes, given
# by ``fake_coefficients``) that the forward computes anyway and the backward uses instead of
# recomputing the forward; it carries no gradient. ``saved_inputs`` are the indices of the
# forward's inputs that the backward op takes after ``coefficients``; it returns one gradient
# per forward input in the forward's order (empty (0,) tensors where not needed), so its fake
# kernel can shape them from the forward's inputs. This does not touch register_loss_ops.


def register_saved_coefficient_ops(forward_op, backward_op, saved_inputs: tuple[int, ...],
                                   fake_coefficients: Callable, fake_backward: Callable) -> None:
    """Register fake kernels and autograd for a (training forward, saved backward) op pair.

    ``fake_coefficients(*inputs)`` returns the coefficients' fake tensor; ``fake_backward`` is
    the backward op's fake kernel (same arguments as the op).
    """

    def fake_forward(x: Tensor, *rest) -> tuple[Tensor, Tensor]:
        return x.new_empty(x.shape[0]), fake_coefficients(x, *rest)

    def setup_context(ctx, inputs, output) -> None:
        _, coefficients = output
        ctx.mark_non_differentiable(coefficients)
        # No (B * n * k) zero gradient for the coefficients: they are only read by the backward.
        ctx.set_materialize_grads(False)
        ctx.present = [t is not None for t in inputs]
        ctx.save_for_backward(coefficients, *(inputs[i] for i in saved_inputs))

    def backward(ctx, grad, _grad_coefficients):
        needs = [bool(n) and p for n, p in zip(ctx.needs_input_grad, ctx.present)]
        if grad is None or not any(needs):  # grad None: the loss was not used (zero gradient)
            return (None,) * len(needs)
        coefficients, *saved = ctx.saved_tensors
        grads = backward_op(grad.contiguous(), coefficients, *saved, needs)
        return tuple(g if need else None for g, need in zip(grads, needs))

    torch.library.register_fake(_qualname(forward_op), fake_forward)
    torch.library.register_fake(_qualname(backward_op), fake_backward)
    torch.library.register_autograd(_qualname(forward_op), backward, setup_context=setup_context)


def _qualname(op) -> str:
    name = (getattr(op, "_qualname", None) or getattr(op, "_name", None)        # custom_op / OpOverload
            or getattr(op, "_qualified_op_name", None))                          # OpOverloadPacket
    if name is None:
        raise TypeError(f"cannot find the qualified name of {op!r}")
    return name


def registered_ops(head: str, backend: str) -> tuple[Callable, Callable]:
    try:
        return _OPS[(head, backend)]
    except KeyError:
        known = sorted({b for h, b in _OPS if h == head})
        raise RuntimeError(f"no {head} ops registered for backend {backend!r}; registered: {known}") from None


class _LossFunction(torch.autograd.Function):
    """forward(*inputs, backend) -> per-sample loss (B,); backward calls the backend's backward op."""

    head: str = ""

    @classmethod
    def forward(cls, ctx, *args):
        *inputs, backend = args
        forward_op, backward_op = registered_ops(cls.head, backend)
        ctx.backward_op = backward_op
        ctx.save_for_backward(*inputs)
        return forward_op(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grads = _make_backward(ctx.backward_op)(ctx, grad)
        return (*grads, None)


class FixedNLLFunction(_LossFunction):
    """``FixedNLLFunction.apply(x, mean, var, weight, bias, sigma2, backend)`` -> (B,).

    The fixed-variance loss as an autograd Function over a backend's fused ops
    (backend: "cpp", "cuda" or "triton"); sigma2 must be a (k,) tensor, bias may be None.
    """

    head = "fixed"


class PrecisionNLLFunction(_LossFunction):
    """``PrecisionNLLFunction.apply(x, mean, var, k3, k4, weight, bias, precision_weight,
    precision_bias, backend)`` -> (B,); k3, k4 and the biases may be None."""

    head = "precision"
