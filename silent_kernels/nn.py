"""``nn.Module`` heads: a linear Gaussian decoder whose expected NLL is one call.

    decoder = silent_kernels.nn.LinearGaussianDecoder(d, k, variance="logvar")
    loss = decoder.nll(x, LatentMoments.gaussian(mu, logvar=logvar)).mean() + kl
    x_mean = decoder(z)                      # the mean image of a latent code

Variances:
    "fixed"      p(x|z) = N(A z + b, sigma2): exact.
    "scalar"     one learnable sigma2 (stored as its log): exact.
    "precision"  precision v(z) = C z + c (paper Eq. 5): the data term is exact, E[log v^2] is
                 exact for Gaussian latents and the paper's Taylor term otherwise (``log_term``).
    "logvar"     log sigma^2(z) = H z + h: exact for every latent family with a moment
                 generating function.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import check_choice
from .functional import analytic_nll

__all__ = ["LinearGaussianDecoder", "VARIANCES"]

VARIANCES = ("fixed", "scalar", "precision", "logvar")
# Initial spread of the precision / log-variance weights: small, but not zero. (A precision
# head at exactly zero has E[v^2] = 0, where the floor makes every gradient vanish.)
_HEAD_INIT_STD = 1e-3


class LinearGaussianDecoder(nn.Module):
    """Linear decoder p(x|z) = N(A z + b, sigma^2(z)) with the exact expected NLL as ``nll``.

    Args:
        latent_dim: d.
        data_dim: k, the number of pixels (x is flattened to (B, k)).
        variance: one of VARIANCES (see the module docstring).
        sigma2: the fixed variance, or the initial variance of the learnable heads.
        log_term: for variance="precision": "auto", "exact" or "taylor" (see ``analytic_nll``).
        backend: passed to ``analytic_nll``.
    """

    def __init__(self, latent_dim: int, data_dim: int, variance: str = "fixed", sigma2: float = 0.01,
                 log_term: str = "auto", backend: str = "auto"):
        super().__init__()
        check_choice("variance", variance, VARIANCES)
        if not sigma2 > 0:
            raise ValueError(f"sigma2: expected a positive variance, got {sigma2!r}")
        self.variance, self.log_term, self.backend = variance, log_term, backend
        self.mean = nn.Linear(latent_dim, data_dim)
        self.head: Optional[nn.Linear] = None
        if variance == "fixed":
            self.register_buffer("sigma2", torch.tensor(float(sigma2)))
        elif variance == "scalar":
            self.log_sigma2 = nn.Parameter(torch.tensor(math.log(sigma2)))
        else:
            self.head = nn.Linear(latent_dim, data_dim)
            nn.init.normal_(self.head.weight, std=_HEAD_INIT_STD)
            start = 1 / math.sqrt(sigma2) if variance == "precision" else math.log(sigma2)
            nn.init.constant_(self.head.bias, start)

    def forward(self, z: Tensor) -> Tensor:
        """The mean A z + b, (..., k), of latent codes z (..., d)."""
        return self.mean(z)

    def std(self, z: Tensor) -> Tensor:
        """The decoder's standard deviation at z, (..., k)."""
        if self.variance == "fixed":
            return self.sigma2.sqrt().expand(*z.shape[:-1], self.mean.out_features)
        if self.variance == "scalar":
            return (0.5 * self.log_sigma2).exp().expand(*z.shape[:-1], self.mean.out_features)
        if self.variance == "precision":
            return 1 / self.head(z).abs()
        return (0.5 * self.head(z)).exp()

    def nll(self, x: Tensor, q, reduction: str = "none") -> Tensor:
        """-E_q[log p(x|z)] in nats (summed over pixels), per sample (B,) by default."""
        common = dict(reduction=reduction, backend=self.backend)
        if self.variance == "fixed":
            return analytic_nll(x, q, self.mean.weight, self.mean.bias, sigma2=self.sigma2, **common)
        if self.variance == "scalar":
            return analytic_nll(x, q, self.mean.weight, self.mean.bias, sigma2=self.log_sigma2.exp(), **common)
        if self.variance == "precision":
            return analytic_nll(x, q, self.mean.weight, self.mean.bias, precision_weight=self.head.weight,
                                precision_bias=self.head.bias, log_term=self.log_term, **common)
        return analytic_nll(x, q, self.mean.weight, self.mean.bias, logvar_weight=self.head.weight,
                            logvar_bias=self.head.bias, **common)
