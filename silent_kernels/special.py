"""Dawson's integral and the exact E[log v^2] of a Gaussian v (docs/math.md, "exact log term").

torch has no Dawson function, so it is built here from two convergent pieces, always
evaluated in float64 and returned in the input dtype:

* ``x < SERIES_LIMIT``: the Poisson-weighted series (all terms positive, no cancellation)
      D(x)    = x * sum_n P_n / (2n + 1)
      4 F(x)  = sum_n P_n h_n,        P_n = exp(-x^2) x^(2n) / n!,  h_n = sum_{i<n} 2 / (2i + 1)
  where F(x) = int_0^x D(t) dt. The second sum is E[log chi'^2] of a noncentral chi-square
  with one degree of freedom written as a Poisson mixture of central ones (psi(n + 1/2) -
  psi(1/2) = h_n); the first is D(x) = exp(-x^2) sum x^(2n+1) / (n! (2n+1)).
* ``x >= SERIES_LIMIT``: the asymptotic series D(x) = (1/2x) sum_n (2n-1)!! / (2x^2)^n, whose
  smallest term there is below 1e-17.

Then for v ~ N(m, s2), with x = |m| / sqrt(2 s2):
      E[log v^2] = log s2 - gamma - log 2 + 4 F(x)                      (x small)
                 = log m^2 - sum_{n>=1} (2n-1)!!/n (s2/m^2)^n           (x large)
(Moser 2020, Entropy 22(9):1048). The large-x form avoids the cancellation of log s2 + 4F(x)
and stays finite as s2 -> 0. Derivatives: dD/dx = 1 - 2 x D(x), dF/dx = D(x); they are
autograd Functions whose backward is again written with these functions, so any order of
derivative is available (double backward included).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dawson", "dawson_integral", "expected_log_square", "SERIES_LIMIT",
           "EXACT_LOG_VAR_FLOOR"]

# Crossover between the convergent and the asymptotic series (x^2 = 36: the asymptotic
# series' smallest term is ~sqrt(2) e^-36 / 36 ~ 1e-17 there).
SERIES_LIMIT = 6.0
SERIES_TERMS = 110      # Poisson(36) mass beyond 110 terms is < 1e-20
ASYMPTOTIC_TERMS = 36   # terms of the asymptotic series used for x >= SERIES_LIMIT
EULER_GAMMA = 0.57721566490153286060651209008240243
# s2 = Var(v) is clamped at this floor: E[log v^2] is -inf when v = 0 with no spread.
EXACT_LOG_VAR_FLOOR = 1e-30


def _series(x: Tensor) -> tuple[Tensor, Tensor]:
    """D(x) and 4 F(x) by the Poisson-weighted series, for 0 <= x < SERIES_LIMIT (float64)."""
    x2 = x * x
    weight = torch.exp(-x2)                      # P_0
    d_sum = weight.clone()                       # sum P_n / (2n+1)
    f_sum = torch.zeros_like(x)                  # sum P_n h_n
    h = 0.0
    for n in range(1, SERIES_TERMS):
        weight = weight * x2 / n
        h += 2.0 / (2 * n - 1)
        d_sum = d_sum + weight / (2 * n + 1)
        f_sum = f_sum + weight * h
    return x * d_sum, f_sum


def _asymptotic_dawson(x: Tensor) -> Tensor:
    """D(x) for x >= SERIES_LIMIT: (1/2x) sum_n (2n-1)!! r^n with r = 1/(2x^2) (float64)."""
    r = 0.5 / (x * x)
    term = torch.ones_like(x)
    total = torch.ones_like(x)
    for n in range(1, ASYMPTOTIC_TERMS + 1):
        term = term * (2 * n - 1) * r
        total = total + term
    return total / (2 * x)


def _dawson_value(x: Tensor) -> Tensor:
    x64 = x.double()
    ax = x64.abs()
    small = ax < SERIES_LIMIT
    d_small, _ = _series(torch.where(small, ax, 0.0))
    d_large = _asymptotic_dawson(torch.where(small, SERIES_LIMIT, ax))
    return (torch.sign(x64) * torch.where(small, d_small, d_large)).to(x.dtype)


def _dawson_integral_value(x: Tensor) -> Tensor:
    """F(x) = int_0^x D; only needed for |x| < SERIES_LIMIT (the large-x E[log v^2] does not
    use it), but defined everywhere: F(x) = (log(4x^2) + gamma)/4 + O(1/x^2) asymptotically."""
    x64 = x.double()
    ax = x64.abs()
    small = ax < SERIES_LIMIT
    _, f4 = _series(torch.where(small, ax, 0.0))
    big = torch.where(small, SERIES_LIMIT, ax)
    r = 0.5 / (big * big)
    # 4F(x) = log(4 x^2) + gamma - sum_{n>=1} (2n-1)!!/n r^n  (from E[log v^2] at both ends)
    f4_large = torch.log(4 * big * big) + EULER_GAMMA - _asymptotic_log_tail(r)
    return (torch.where(small, f4, f4_large) / 4).to(x.dtype)


def _asymptotic_log_tail(r: Tensor) -> Tensor:
    """sum_{n>=1} (2n-1)!!/n r^n (differentiable torch ops; r = s2/m^2 <= 1/(2 SERIES_LIMIT^2))."""
    term = torch.ones_like(r)
    total = torch.zeros_like(r)
    for n in range(1, ASYMPTOTIC_TERMS + 1):
        term = term * (2 * n - 1) * r if n > 1 else r
        total = total + term / n
    return total


class _Dawson(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        value = _dawson_value(x)
        ctx.save_for_backward(x, value)
        return value

    @staticmethod
    def backward(ctx, grad):
        x, value = ctx.saved_tensors
        if torch.is_grad_enabled():            # differentiable again (create_graph=True)
            value = dawson(x)
        return grad * (1 - 2 * x * value)


class _DawsonIntegral(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _dawson_integral_value(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * dawson(x)


def dawson(x: Tensor) -> Tensor:
    """Dawson's integral D(x) = exp(-x^2) int_0^x exp(t^2) dt, elementwise, differentiable."""
    return _Dawson.apply(x)


def dawson_integral(x: Tensor) -> Tensor:
    """F(x) = int_0^x D(t) dt, elementwise (even in x), differentiable (F' = D)."""
    return _DawsonIntegral.apply(x)


def expected_log_square(mean: Tensor, var: Tensor) -> Tensor:
    """E[log v^2] for v ~ N(mean, var), elementwise; exact up to float64 rounding.

    Where |mean| < 12 sqrt(var) (the convergent series), ``var`` is clamped at
    EXACT_LOG_VAR_FLOOR (the value is -inf at mean = var = 0). Finite,
    continuous first and higher derivatives everywhere else; computed in float64 and returned
    in the promoted dtype of the inputs.
    """
    out_dtype = torch.promote_types(mean.dtype, var.dtype)
    m = mean.double()
    s2_raw = var.double()
    s2 = s2_raw.clamp_min(EXACT_LOG_VAR_FLOOR)
    m2 = m * m
    small = m2 < 2 * SERIES_LIMIT ** 2 * s2       # x = |m|/sqrt(2 s2) < SERIES_LIMIT
    # Each branch sees safe inputs where it is not selected, so no inf/nan leaks into gradients.
    s2_small = torch.where(small, s2, 1.0)
    x = torch.where(small, m, 0.0) / torch.sqrt(2 * s2_small)
    near = torch.log(s2_small) - (EULER_GAMMA + math.log(2)) + 4 * dawson_integral(x)
    m2_large = torch.where(small, 1.0, m2)
    far = torch.log(m2_large) - _asymptotic_log_tail(torch.where(small, 0.0, s2_raw) / m2_large)
    return torch.where(small, near, far).to(out_dtype)
