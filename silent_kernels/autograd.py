"""Fake (meta) kernels, autograd registration and public ``torch.autograd.Function``s
for the fused loss ops, shared by every kernel backend.

Each backend provides pairs of registered ops with these schemas (namespace
``silent_kernels``; the triton ops carry a ``triton_`` prefix):

    fixed_nll(x, mean, var, weight, bias?, sigma2) -> loss (B,)
    fixed_nll_backward(grad (B,), <the 6 inputs>, bool[6] needs) -> 6 tensors
    precision_nll(x, mean, var, k3?, k4?, weight, bias?, precision_weight, precision_bias?,
                  int head) -> loss (B,)
    precision_nll_backward(grad (B,), <the 9 tensor inputs>, bool[9] needs, int head) -> 9 tensors
    bernoulli_logvar_nll(x, logits, weight, bias?, logvar_weight, logvar_bias?) -> loss (B,)
    bernoulli_logvar_nll_backward(grad (B,), <the 6 inputs>, bool[6] needs) -> 6 tensors
    categorical_nll(x, logits (B, G, K), weight, bias?, second_weight?, second_bias?, sigma2?,
                    int head) -> loss (B,)      (head: 3 fixed, 0 Taylor precision, 2 log-variance)
    categorical_nll_backward(grad (B,), <the 7 tensor inputs>, bool[7] needs, int head) -> 7 tensors

``head`` picks the per-pixel epilogue after the mean-field contraction stage (see HEADS):
0 the paper's Taylor log term, 1 the exact log term, 2 the log-variance head (then
precision_weight / precision_bias hold the log-variance weights H, h0). Shapes: x (B, k);
moments and logits (B, d); weights (k, d); biases and sigma2 (k,). A backward op returns,
for each tensor input, its gradient where ``needs`` is true and an empty (0,) tensor
otherwise, so a frozen decoder or detached moments cost nothing. ``grad`` is the upstream
gradient of each sample's loss.

Double backward: the backward ops are not themselves differentiable. When autograd asks for
a differentiable gradient (``create_graph=True``, i.e. grad mode is on inside backward), the
registered backward instead differentiates the pure-torch reference of the same loss with
``create_graph=True``: same first derivatives (to rounding), and correct second ones.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import reference

__all__ = [
    "HEADS",
    "FIXED_INPUTS",
    "PRECISION_INPUTS",
    "BERNOULLI_LOGVAR_INPUTS",
    "register_loss_ops",
    "register_saved_coefficient_ops",
    "reference_loss",
    "FixedNLLFunction",
    "PrecisionNLLFunction",
]

# The ``head`` argument of the precision and categorical ops (csrc/epilogue.h: enum Head).
HEADS = {"taylor": 0, "exact": 1, "logvar": 2, "fixed": 3}

FIXED_INPUTS = ("x", "mean", "var", "weight", "bias", "sigma2")
PRECISION_INPUTS = ("x", "mean", "var", "k3", "k4", "weight", "bias", "precision_weight", "precision_bias")
BERNOULLI_LOGVAR_INPUTS = ("x", "logits", "weight", "bias", "logvar_weight", "logvar_bias")
CATEGORICAL_INPUTS = ("x", "logits", "weight", "bias", "second_weight", "second_bias", "sigma2")
_TENSOR_INPUTS = {"fixed": len(FIXED_INPUTS), "precision": len(PRECISION_INPUTS),
                  "bernoulli_logvar": len(BERNOULLI_LOGVAR_INPUTS), "categorical": len(CATEGORICAL_INPUTS)}

# (kind, backend) -> (forward op, backward op)
OPS: dict[tuple[str, str], tuple[Callable, Callable]] = {}


def _reference_precision(x, mean, var, k3, k4, weight, bias, second_weight, second_bias, head):
    if head == HEADS["logvar"]:
        t = reference.gaussian_logvar_terms(mean, var, weight, bias, second_weight, second_bias)
        return reference.logvar_pixel_nll(x, t).sum(-1)
    log_term = "exact" if head == HEADS["exact"] else "taylor"
    return reference.precision_nll(x, mean, var, k3, k4, weight, bias, second_weight, second_bias, log_term)


def _reference_bernoulli_logvar(x, logits, weight, bias, logvar_weight, logvar_bias):
    from .moments import LatentMoments  # the op layer sees tensors; the reference wants a family
    q = LatentMoments.bernoulli(logits=logits)
    return reference.logvar_nll(x, q, weight, bias, logvar_weight, logvar_bias)


def _reference_categorical(x, logits, weight, bias, second_weight, second_bias, sigma2, head):
    from . import categorical
    if head == HEADS["fixed"]:
        return categorical.categorical_fixed_nll(x, logits, weight, bias, sigma2)
    if head == HEADS["logvar"]:
        return categorical.categorical_logvar_nll(x, logits, weight, bias, second_weight, second_bias)
    return categorical.categorical_precision_nll(x, logits, weight, bias, second_weight, second_bias)


# kind -> the reference loss (B,) of the same arguments as the op (tensors, then extras)
_REFERENCE = {"fixed": reference.fixed_nll, "precision": _reference_precision,
              "bernoulli_logvar": _reference_bernoulli_logvar, "categorical": _reference_categorical}


def reference_loss(kind: str) -> Callable:
    """The pure-torch loss with the same arguments as the ``kind`` op (for tests and tools)."""
    return _REFERENCE[kind]


def _differentiable_grads(kind: str, inputs, extra, grad: Tensor, needs) -> list:
    """Gradients of the reference loss with create_graph=True (double backward)."""
    with torch.enable_grad():
        loss = _REFERENCE[kind](*inputs, *extra)
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(loss, wanted, grad, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(inputs, needs):
        g = next(grads) if need else None
        out.append(torch.zeros_like(t) if (need and g is None) else g)
    return out


def _fake_forward(x: Tensor, *rest) -> Tensor:
    return x.new_empty(x.shape[0])


def _fake_backward(grad: Tensor, *args) -> tuple[Tensor, ...]:
    needs_at = next(i for i, a in enumerate(args) if isinstance(a, (list, tuple)))
    inputs, needs = args[:needs_at], args[needs_at]
    return tuple(t.new_empty(t.shape) if (need and t is not None) else grad.new_empty(0)
                 for t, need in zip(inputs, needs))


def _make_autograd(kind: str, backward_op: Callable) -> tuple[Callable, Callable]:
    """(setup_context, backward) for a (forward, backward) op pair of ``kind``."""
    n = _TENSOR_INPUTS[kind]

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:n])
        ctx.extra = tuple(inputs[n:])

    def backward(ctx, grad: Tensor):
        inputs = ctx.saved_tensors
        needs = [bool(need) and t is not None for need, t in zip(ctx.needs_input_grad, inputs)]
        nones = (None,) * len(ctx.extra)
        if not any(needs):
            return (None,) * len(inputs) + nones
        if torch.is_grad_enabled():
            grads = _differentiable_grads(kind, inputs, ctx.extra, grad, needs)
        else:
            grads = backward_op(grad.contiguous(), *inputs, needs, *ctx.extra)
        return tuple(g if need else None for g, need in zip(grads, needs)) + nones

    return setup_context, backward


def register_loss_ops(kind: str, backend: str, forward_op, backward_op) -> None:
    """Register fake kernels and autograd for one backend's (forward, backward) op pair.

    ``forward_op`` / ``backward_op`` are ``torch.ops.silent_kernels.*`` overloads (or
    ``custom_op`` objects); kind is "fixed", "precision" or "bernoulli_logvar".
    """
    torch.library.register_fake(_qualname(forward_op), _fake_forward)
    torch.library.register_fake(_qualname(backward_op), _fake_backward)
    setup_context, backward = _make_autograd(kind, backward_op)
    torch.library.register_autograd(_qualname(forward_op), backward, setup_context=setup_context)
    OPS[(kind, backend)] = (forward_op, backward_op)


# ----------------------------------------------- training ops that save their coefficients
# A backend may also provide a training pair (the cpp backend's precision ops):
#
#     <name>(<the forward op's inputs>) -> (loss (B,), coefficients)
#     <name>_backward(grad (B,), coefficients, <saved_inputs>, bool[n] needs) -> n tensors
#
# ``coefficients`` is an opaque plain tensor (its shape a function of the input shapes, given
# by ``fake_coefficients``) that the forward computes anyway and the backward uses instead of
# recomputing the forward; it carries no gradient. ``saved_inputs`` are the indices of the
# forward's inputs that the backward op takes after ``coefficients``; it returns one gradient
# per forward tensor input in the forward's order (empty (0,) tensors where not needed).


def register_saved_coefficient_ops(kind: str, forward_op, backward_op, saved_inputs: tuple[int, ...],
                                   fake_coefficients: Callable, fake_backward: Callable) -> None:
    """Register fake kernels and autograd for a (training forward, saved backward) op pair.

    ``fake_coefficients(*inputs)`` returns the coefficients' fake tensor; ``fake_backward`` is
    the backward op's fake kernel (same arguments as the op).
    """
    n = _TENSOR_INPUTS[kind]

    def fake_forward(x: Tensor, *rest) -> tuple[Tensor, Tensor]:
        return x.new_empty(x.shape[0]), fake_coefficients(x, *rest)

    def setup_context(ctx, inputs, output) -> None:
        _, coefficients = output
        ctx.mark_non_differentiable(coefficients)
        # No (B * n * k) zero gradient for the coefficients: they are only read by the backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(coefficients, *inputs[:n])
        ctx.extra = tuple(inputs[n:])

    def backward(ctx, grad, _grad_coefficients):
        coefficients, *inputs = ctx.saved_tensors
        needs = [bool(need) and t is not None for need, t in zip(ctx.needs_input_grad, inputs)]
        nones = (None,) * len(ctx.extra)
        if grad is None or not any(needs):  # grad None: the loss was not used (zero gradient)
            return (None,) * len(needs) + nones
        if torch.is_grad_enabled():
            grads = _differentiable_grads(kind, inputs, ctx.extra, grad, needs)
        else:
            grads = backward_op(grad.contiguous(), coefficients, *(inputs[i] for i in saved_inputs), needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + nones

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
        return OPS[(head, backend)]
    except KeyError:
        known = sorted({b for h, b in OPS if h == head})
        raise RuntimeError(f"no {head} ops registered for backend {backend!r}; registered: {known}") from None


class _LossFunction(torch.autograd.Function):
    """forward(*inputs, backend) -> per-sample loss (B,); backward calls the backend's backward
    op, or differentiates the reference when a differentiable gradient is asked for."""

    kind: str = ""

    @classmethod
    def forward(cls, ctx, *args):
        *inputs, backend = args
        n = _TENSOR_INPUTS[cls.kind]
        forward_op, backward_op = registered_ops(cls.kind, backend)
        ctx.setup, ctx.run_backward = _make_autograd(cls.kind, backward_op)
        ctx.save_for_backward(*inputs[:n])
        ctx.extra = tuple(inputs[n:])
        return forward_op(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return (*ctx.run_backward(ctx, grad), None)


class FixedNLLFunction(_LossFunction):
    """``FixedNLLFunction.apply(x, mean, var, weight, bias, sigma2, backend)`` -> (B,).

    The fixed-variance loss as an autograd Function over a backend's fused ops
    (backend: "cpp", "cuda" or "triton"); sigma2 must be a (k,) tensor, bias may be None.
    """

    kind = "fixed"


class PrecisionNLLFunction(_LossFunction):
    """``PrecisionNLLFunction.apply(x, mean, var, k3, k4, weight, bias, precision_weight,
    precision_bias, head, backend)`` -> (B,); k3, k4 and the biases may be None; head is
    ``HEADS[...]`` (0 Taylor log term, 1 exact log term, 2 log-variance head)."""

    kind = "precision"
