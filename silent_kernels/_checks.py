"""Argument validation for the public API: every error names the argument and
the expected and actual shape, dtype or device, and runs before any kernel."""

from __future__ import annotations

from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from .moments import LatentMoments, values_checkable

REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
LOG_TERM_CHOICES = ("auto", "exact", "taylor")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def check_tensor(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`t` must be a tensor of exactly `shape`, `dtype` and `device`."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of x), got {t.device}")
    return t


def check_x(x) -> Tensor:
    """x: (B, k) or (B, *data_shape), floating point; returns the (B, k) view/copy."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"x: expected a floating-point dtype (float16, bfloat16, float32, float64), got {x.dtype}; "
            "convert integer images first, e.g. x.float() / 255"
        )
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (B, k) or (B, *data_shape), got {tuple(x.shape)}")
    # flatten(1), not reshape(B, -1): the latter is ambiguous (an error) for an empty batch
    return x.flatten(1)


def check_moments(q: LatentMoments, batch: int, latent_dim: int, dtype, device) -> None:
    for name, t in zip(("mean", "var", "k3", "k4"), q.tensors()):
        if t is not None:
            check_tensor(f"q.{name}", t, (batch, latent_dim), dtype, device)
    if values_checkable(q.var):
        lowest = float(q.var.detach().min())   # min propagates NaN, which the comparison then rejects
        if not lowest >= 0:
            raise ValueError(f"q.var: variances must be >= 0, got minimum {lowest:g}")


def check_sigma2(sigma2, k: int, dtype, device) -> Tensor:
    """sigma2: a positive number, a 0-dim tensor or a (k,) tensor; returns a (k,) tensor
    (an expanded view of a scalar, so a learnable scalar keeps its gradient)."""
    if isinstance(sigma2, Real) and not isinstance(sigma2, bool):
        if not 0 < sigma2 < float("inf"):
            raise ValueError(f"sigma2: expected a positive finite variance, got {sigma2!r}")
        return torch.full((k,), float(sigma2), dtype=dtype, device=device)
    if not isinstance(sigma2, Tensor):
        raise TypeError(f"sigma2: expected a float or a torch.Tensor, got {type(sigma2).__name__}")
    if sigma2.dim() == 0:
        check_tensor("sigma2", sigma2, (), dtype, device)
        sigma2 = sigma2.expand(k)
    else:
        check_tensor("sigma2", sigma2, (k,), dtype, device)
    if values_checkable(sigma2):
        lowest, highest = (float(v) for v in torch.aminmax(sigma2.detach()))   # NaN propagates into both
        if not 0 < lowest <= highest < float("inf"):
            raise ValueError(f"sigma2: variances must be positive and finite, got range [{lowest:g}, {highest:g}]")
    return sigma2


def check_optional_bias(name: str, bias: Optional[Tensor], k: int, dtype, device) -> None:
    if bias is not None:
        check_tensor(name, bias, (k,), dtype, device)


def check_second_head(name: str, head_weight, bias_name: str, head_bias: Optional[Tensor],
                      weight: Tensor, dtype, device) -> None:
    """The precision / log-variance weights: (k, d) like ``weight``, optional (k,) bias."""
    if not isinstance(head_weight, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(head_weight).__name__}")
    if tuple(head_weight.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: expected shape {tuple(weight.shape)} (the shape of weight), "
                         f"got {tuple(head_weight.shape)}")
    check_tensor(name, head_weight, tuple(weight.shape), dtype, device)
    check_optional_bias(bias_name, head_bias, weight.shape[0], dtype, device)
