"""The public functional API: ``analytic_nll``."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import backends
from ._checks import (BACKENDS, REDUCTIONS, check_choice, check_moments, check_optional_bias,
                      check_sigma2, check_tensor, check_x)
from .moments import LatentMoments, as_latent_moments

__all__ = ["analytic_nll"]


def analytic_nll(x: Tensor, q, weight: Tensor, bias: Optional[Tensor] = None, *,
                 sigma2: Union[float, Tensor, None] = None,
                 precision_weight: Optional[Tensor] = None,
                 precision_bias: Optional[Tensor] = None,
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Exact expected negative log-likelihood -E_q[log p(x|z)] of a linear Gaussian decoder.

    Args:
        x: data, (B, k) or (B, *data_shape) (flattened to k = prod(data_shape)).
        q: the mean-field posterior: ``LatentMoments`` or a supported
            ``torch.distributions`` object with batch shape (B, d).
        weight: decoder mean weight A, (k, d) like ``nn.Linear(d, k).weight``.
        bias: decoder mean bias b, (k,) or None.
        sigma2: fixed-variance head (paper Eq. 3-4): the decoder variance, a positive
            float, a 0-dim tensor or a per-pixel (k,) tensor; learnable if it requires grad.
        precision_weight: learnable-precision head (Eq. 5-7): C, (k, d); the decoder
            precision (1/std) is v = C z + precision_bias.
        precision_bias: b', (k,) or None.
        reduction: "none" -> (B,), "sum" -> (), "mean" -> () averaged over the batch.
        backend: "auto", "torch" (reference), "cpp", "triton" or "cuda".

    Returns:
        The loss in nats (summed over the k data dimensions, with the 0.5 log(2 pi)
        constants), reduced as asked. Exactly one of ``sigma2`` / ``precision_weight``
        must be given. For the precision head the E[log v^2] term is the paper's
        second-order Taylor expansion; everything else is exact.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    x = check_x(x)
    batch, k = x.shape
    q = as_latent_moments(q)
    dtype, device = x.dtype, x.device

    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor of shape (k, d), got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] != k:
        raise ValueError(
            f"weight: expected shape (k={k}, d) with k the number of data dimensions of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    latent_dim = weight.shape[1]
    if q.latent_dim != latent_dim:
        raise ValueError(
            f"q: latent dimension d={q.latent_dim} (q.mean shape {tuple(q.mean.shape)}) does not match "
            f"weight shape {tuple(weight.shape)} (d={latent_dim})"
        )
    if q.batch_size != batch:
        raise ValueError(
            f"q: batch size {q.batch_size} (q.mean shape {tuple(q.mean.shape)}) does not match "
            f"x batch size {batch} (x shape {tuple(x.shape)})"
        )
    check_tensor("weight", weight, (k, latent_dim), dtype, device)
    check_moments(q, batch, latent_dim, dtype, device)
    check_optional_bias("bias", bias, k, dtype, device)

    if (sigma2 is None) == (precision_weight is None):
        raise ValueError(
            "give exactly one of sigma2 (fixed-variance head) or precision_weight "
            f"(learnable-precision head); got sigma2={'None' if sigma2 is None else 'given'}, "
            f"precision_weight={'None' if precision_weight is None else 'given'}"
        )
    impl = backends.resolve(backend, device)
    if sigma2 is not None:
        if precision_bias is not None:
            raise ValueError("precision_bias: only valid together with precision_weight")
        sigma2 = check_sigma2(sigma2, k, dtype, device)
        per_sample = impl.fixed_nll(x, q.mean, q.var, weight, bias, sigma2)
    else:
        if not isinstance(precision_weight, Tensor):
            raise TypeError(f"precision_weight: expected a torch.Tensor, got {type(precision_weight).__name__}")
        if tuple(precision_weight.shape) != tuple(weight.shape):
            raise ValueError(
                f"precision_weight: expected shape {tuple(weight.shape)} (the shape of weight), "
                f"got {tuple(precision_weight.shape)}"
            )
        check_tensor("precision_weight", precision_weight, (k, latent_dim), dtype, device)
        check_optional_bias("precision_bias", precision_bias, k, dtype, device)
        per_sample = impl.precision_nll(x, q.mean, q.var, q.k3, q.k4, weight, bias,
                                        precision_weight, precision_bias)
    return _reduce(per_sample, reduction)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum" or per_sample.shape[0] == 0:
        return total  # an empty batch gives 0 rather than nan for "mean"
    return total / per_sample.shape[0]
