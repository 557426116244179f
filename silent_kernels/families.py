"""Cumulant generating functions of the mean-field latent families (docs/math.md, "tilting").

The log-variance head needs, per latent i and tilt t, the log moment generating function
K_i(t) = log E[exp(t z_i)] and the mean K_i'(t) and variance K_i''(t) of z_i under the law
tilted by exp(t z_i). ``tilt(q, t)`` returns those three for every (sample, pixel, latent)
triple by broadcasting the family's natural parameters (B, 1, d) against tilts (1, k, d).
Written with differentiable torch ops: the reference's gradients come from autograd.

Families without a moment generating function at the tilt asked for (Laplace with
|t| >= 1/scale, Gamma with t >= rate) are refused by ``check_domain`` with a clear error.
"""

from __future__ import annotations

from fractions import Fraction
from math import factorial

import torch
import torch.nn.functional as F
from torch import Tensor

from .moments import LatentMoments, values_checkable

__all__ = ["TILTABLE_FAMILIES", "tilt", "check_domain"]

TILTABLE_FAMILIES = ("gaussian", "bernoulli", "uniform", "laplace", "poisson", "gamma")


def _bernoulli_numbers(n: int) -> list[Fraction]:
    """B_0 .. B_n (B_1 = -1/2), by the standard recurrence sum_j C(m+1, j) B_j = 0."""
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum(Fraction(factorial(m + 1), factorial(j) * factorial(m + 1 - j)) * b[j]
                      for j in range(m)) / (m + 1))
    return b


# log(sinh y / y) = sum_{n>=1} c_n y^(2n), c_n = 2^(2n) B_2n / (2n (2n)!); radius pi, so at
# |y| < 1/2 fifteen terms leave < 1e-20.
_B = _bernoulli_numbers(30)
_LOG_SINHC = [float(Fraction(2 ** (2 * n)) * _B[2 * n] / (2 * n * factorial(2 * n))) for n in range(1, 16)]
_SINHC_SERIES_LIMIT = 0.5


def _log_sinhc(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """f(y) = log(sinh y / y) and f', f'' (f' = coth y - 1/y, f'' = 1/y^2 - 1/sinh^2 y)."""
    small = y.abs() < _SINHC_SERIES_LIMIT
    ys = torch.where(small, y, 0.0)
    y2 = ys * ys
    f = torch.zeros_like(y)
    f1 = torch.zeros_like(y)
    f2 = torch.zeros_like(y)
    power = torch.ones_like(y)                     # ys^(2n-2)
    for n, c in enumerate(_LOG_SINHC, start=1):
        f2 = f2 + (2 * n) * (2 * n - 1) * c * power
        f1 = f1 + (2 * n) * c * power * ys
        power = power * y2
        f = f + c * power
    yl = torch.where(small, 1.0, y).abs()
    sign = torch.sign(y)
    f_large = yl + torch.log1p(-torch.exp(-2 * yl)) - torch.log(2 * yl)
    f1_large = sign * (1 / torch.tanh(yl) - 1 / yl)
    f2_large = 1 / yl.square() - 1 / torch.sinh(yl).square()
    return (torch.where(small, f, f_large), torch.where(small, f1, f1_large),
            torch.where(small, f2, f2_large))


def tilt(q: LatentMoments, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """K(t), K'(t), K''(t) of every latent: params (B, d) broadcast to (B, 1, d), t (k, d) to
    (1, k, d); each result is (B, k, d) (or the broadcast of whatever shapes are given)."""
    p = [v.unsqueeze(-2) for v in q.params]
    if q.family == "gaussian":
        m, v = q.mean.unsqueeze(-2), q.var.unsqueeze(-2)
        tilted_mean = m + v * t
        return m * t + 0.5 * v * t * t, tilted_mean, v.expand_as(tilted_mean)
    if q.family == "bernoulli":
        (logits,) = p
        shifted = logits + t
        mean = torch.sigmoid(shifted)
        # log(q + p e^t), exact also at infinite logits (probabilities 0 or 1)
        log_mgf = torch.logaddexp(F.logsigmoid(-logits), F.logsigmoid(logits) + t)
        return log_mgf, mean, mean * torch.sigmoid(-shifted)
    if q.family == "poisson":
        (rate,) = p
        scaled = rate * torch.exp(t)
        return rate * torch.expm1(t), scaled, scaled
    if q.family == "gamma":
        shape, rate = p
        gap = rate - t                             # > 0 inside the domain
        return -shape * torch.log1p(-t / rate), shape / gap, shape / gap.square()
    if q.family == "laplace":
        loc, scale = p
        bt2 = (scale * t).square()
        one_minus = 1 - bt2                        # > 0 inside the domain
        return (loc * t - torch.log1p(-bt2), loc + 2 * scale.square() * t / one_minus,
                2 * scale.square() * (1 + bt2) / one_minus.square())
    if q.family == "uniform":
        low, high = p
        half_width = 0.5 * (high - low)
        f, f1, f2 = _log_sinhc(t * half_width)
        centre = 0.5 * (low + high)
        return centre * t + f, centre + half_width * f1, half_width.square() * f2
    raise ValueError(f"q: the log-variance head needs the moment generating function of the latents; "
                     f"family {q.family!r} has none here (supported: {', '.join(TILTABLE_FAMILIES)})")


def check_domain(q: LatentMoments, t: Tensor) -> None:
    """Refuse tilts where the family's moment generating function does not exist.

    ``t`` is (k, d), the tilts -H of the log-variance head. Reads data (skipped while tracing)."""
    if q.family not in TILTABLE_FAMILIES:
        raise ValueError(
            f"q: the log-variance head needs the moment generating function of the latents, and "
            f"family {q.family!r} (given only by cumulants) has none; supported families: "
            f"{', '.join(TILTABLE_FAMILIES)}")
    if not values_checkable(t) or q.mean.numel() == 0:
        return
    if q.family == "gamma":
        shape, rate = q.params
        worst = float((t.max(dim=0).values - rate).max())   # needs t < rate for every pixel
        if worst >= 0:
            raise ValueError(
                "logvar_weight: the Gamma latents' moment generating function E[exp(t z)] exists only for "
                f"t < rate, and the tilt t = -logvar_weight reaches rate + {worst:g}; the expected "
                "likelihood is infinite. Use latents with a moment generating function there.")
    if q.family == "laplace":
        loc, scale = q.params
        worst = float((t.abs().max(dim=0).values * scale).max())  # needs |t| scale < 1
        if worst >= 1:
            raise ValueError(
                "logvar_weight: the Laplace latents' moment generating function exists only for "
                f"|t| < 1/scale, and |logvar_weight| * scale reaches {worst:g}; the expected "
                "likelihood is infinite.")
