"""The executable specification: the analytic loss in plain PyTorch.

Every kernel in this package is tested against these functions, and these
functions are tested against the exact oracles of MATH.md §7 (enumeration,
Monte Carlo, closed-form pPCA). They favour clarity over speed: they build the
stacked weight products and the (B, k) contractions explicitly and let autograd
produce the gradients.

Shapes: x (B, k); mean, var, k3, k4 (B, d); weight, precision_weight (k, d);
bias, precision_bias (k,); sigma2 broadcastable to (k,). Every function returns
the per-sample negative expected log-likelihood in nats, shape (B,), including
the 0.5 log(2 pi) constants.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .moments import LOG_2PI

__all__ = [
    "PRECISION_SQ_FLOOR",
    "fixed_nll",
    "precision_nll",
    "Contractions",
    "precision_contractions",
    "precision_pixel_moments",
    "precision_pixel_nll",
]

# E[v^2] = vbar^2 + Scc is zero only when the precision head outputs exactly 0 with
# no spread; the Taylor log term divides by it, so it is clamped to this floor
# (same constant in csrc/epilogue.h and the Triton kernels).
PRECISION_SQ_FLOOR = 1e-12


def fixed_nll(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor,
              bias: Optional[Tensor], sigma2: Tensor) -> Tensor:
    """Fixed-variance head, paper Eq. 3-4: p(x|z) = N(x; A z + b, sigma2).

    E||x - u||^2 per pixel = (x - ubar)^2 + sum_i a_pi^2 Var(z_i).
    """
    ubar = F.linear(mean, weight, bias)                 # E[u_p]
    saa = F.linear(var, weight.square())                # sum_i a_pi^2 k2_i   (Eq. 4, 2nd term)
    expected_sq_err = (x - ubar).square() + saa         # residual first (MATH.md §4)
    per_pixel = expected_sq_err / (2 * sigma2) + 0.5 * (LOG_2PI + torch.log(sigma2))
    return per_pixel.sum(dim=-1)


class Contractions(NamedTuple):
    """The ten (B, k) contractions of MATH.md §2 (zero tensors where a cumulant is absent)."""

    ubar: Tensor
    vbar: Tensor
    Saa: Tensor
    Scc: Tensor
    Sac: Tensor
    Tacc: Tensor
    Taac: Tensor
    C3: Tensor
    Q: Tensor
    C4: Tensor


def precision_contractions(mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                           weight: Tensor, bias: Optional[Tensor],
                           precision_weight: Tensor, precision_bias: Optional[Tensor]) -> Contractions:
    """MATH.md §2: moments (B, d) against element-wise weight products (k, d)."""
    A, C = weight, precision_weight
    A2, C2 = A.square(), C.square()
    ubar = F.linear(mean, A, bias)
    vbar = F.linear(mean, C, precision_bias)
    Saa, Scc, Sac = F.linear(var, A2), F.linear(var, C2), F.linear(var, A * C)
    zero = torch.zeros_like(ubar)
    Tacc = Taac = C3 = Q = C4 = zero
    if k3 is not None:
        Tacc, Taac, C3 = F.linear(k3, A * C2), F.linear(k3, A2 * C), F.linear(k3, C2 * C)
    if k4 is not None:
        Q, C4 = F.linear(k4, A2 * C2), F.linear(k4, C2.square())
    return Contractions(ubar, vbar, Saa, Scc, Sac, Tacc, Taac, C3, Q, C4)


def precision_pixel_moments(x: Tensor, c: Contractions) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-pixel E[(x-u)^2 v^2], M = E[v^2] and V = Var[v^2] (MATH.md §4).

    Centred form with the residual e = x - ubar first; the paper's expansion
    x^2 E[v^2] - 2x E[u v^2] + E[u^2 v^2] cancels catastrophically in fp32.
    """
    e = x - c.ubar
    vb2 = c.vbar.square()
    expected_sq_err_prec = (e.square() * (vb2 + c.Scc) - 4 * e * c.vbar * c.Sac - 2 * e * c.Tacc
                            + vb2 * c.Saa + 2 * c.vbar * c.Taac + c.Q + c.Saa * c.Scc
                            + 2 * c.Sac.square())
    M = vb2 + c.Scc
    V = 4 * vb2 * c.Scc + 4 * c.vbar * c.C3 + c.C4 + 2 * c.Scc.square()
    return expected_sq_err_prec, M, V


def precision_pixel_nll(x: Tensor, c: Contractions) -> Tensor:
    """Per-pixel analytic NLL (B, k), paper Eq. 5-7 with MATH.md §4's corrections.

    l = 0.5 E[(x-u)^2 v^2] - 0.5 E[log v^2] + 0.5 log 2pi, where the log term uses
    the second-order delta method E[log v^2] ~ log M - V / (2 M^2).
    """
    expected_sq_err_prec, M, V = precision_pixel_moments(x, c)
    M = M.clamp_min(PRECISION_SQ_FLOOR)
    return 0.5 * expected_sq_err_prec - 0.5 * torch.log(M) + V / (4 * M.square()) + 0.5 * LOG_2PI


def precision_nll(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                  weight: Tensor, bias: Optional[Tensor],
                  precision_weight: Tensor, precision_bias: Optional[Tensor]) -> Tensor:
    """Learnable-precision head (paper Eq. 5-7): u = A z + b, v = C z + b', x ~ N(u, 1/v^2)."""
    c = precision_contractions(mean, var, k3, k4, weight, bias, precision_weight, precision_bias)
    return precision_pixel_nll(x, c).sum(dim=-1)
