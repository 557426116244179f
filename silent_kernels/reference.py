r"""The executable specification: the analytic loss in plain PyTorch.

Every kernel in this package is tested against these functions, and these
functions are tested against the exact oracles of MATH.md §7 (enumeration,
Monte Carlo, closed-form pPCA). They favour clarity over speed: they build the
stacked weight products and the (B, k) contractions explicitly and let autograd
produce the gradients.

Shapes: x (B, k); mean, var, k3, k4 (B, d); weight, precision_weight, logvar_weight
(k, d); bias, precision_bias, logvar_bias (k,); sigma2 broadcastable to (k,). Every
``*_nll`` function returns the per-sample negative expected log-likelihood in nats,
shape (B,), including the 0.5 log(2 pi) constants.

A loss is a contraction stage (the latent family's moments against weight products)
followed by a per-pixel epilogue (the head):

    family \ head   fixed        precision (Taylor / exact log)    log-variance
    mean field      ubar, Saa    the ten of MATH.md §2             Gaussian: five GEMMs;
                                                                    others: tilted (O(Bkd))
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.utils.checkpoint import checkpoint

from . import families
from .moments import LOG_2PI, LatentMoments
from .special import expected_log_square

__all__ = [
    "PRECISION_SQ_FLOOR",
    "LOG_TERMS",
    "fixed_nll",
    "fixed_pixel_nll",
    "precision_nll",
    "Contractions",
    "precision_contractions",
    "precision_pixel_moments",
    "precision_pixel_nll",
    "LogvarTerms",
    "gaussian_logvar_terms",
    "tilted_logvar_terms",
    "logvar_pixel_nll",
    "logvar_nll",
]

# How the precision head takes E[log v^2]: the paper's second-order Taylor expansion around
# M = E[v^2] (an approximation, any family) or the exact value (Gaussian latents only).
LOG_TERMS = ("taylor", "exact")

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
    return fixed_pixel_nll(x, ubar, saa, sigma2).sum(dim=-1)


def fixed_pixel_nll(x: Tensor, ubar: Tensor, saa: Tensor, sigma2: Tensor) -> Tensor:
    """Per-pixel fixed-variance epilogue (B, k): ((x - ubar)^2 + Saa) / (2 sigma2) + log(2 pi sigma2)/2."""
    expected_sq_err = (x - ubar).square() + saa         # residual first (MATH.md §4)
    return expected_sq_err / (2 * sigma2) + 0.5 * (LOG_2PI + torch.log(sigma2))


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


def precision_pixel_nll(x: Tensor, c: Contractions, log_term: str = "taylor") -> Tensor:
    """Per-pixel analytic NLL (B, k), paper Eq. 5-7 with MATH.md §4's corrections.

    l = 0.5 E[(x-u)^2 v^2] - 0.5 E[log v^2] + 0.5 log 2pi. log_term "taylor": the
    second-order delta method E[log v^2] ~ log M - V / (2 M^2) (an approximation, M floored
    at PRECISION_SQ_FLOOR); "exact": v ~ N(vbar, Scc) (Gaussian latents), special.py.
    """
    expected_sq_err_prec, M, V = precision_pixel_moments(x, c)
    if log_term == "exact":
        return 0.5 * expected_sq_err_prec - 0.5 * expected_log_square(c.vbar, c.Scc) + 0.5 * LOG_2PI
    M = M.clamp_min(PRECISION_SQ_FLOOR)
    return 0.5 * expected_sq_err_prec - 0.5 * torch.log(M) + V / (4 * M.square()) + 0.5 * LOG_2PI


def precision_nll(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                  weight: Tensor, bias: Optional[Tensor],
                  precision_weight: Tensor, precision_bias: Optional[Tensor],
                  log_term: str = "taylor") -> Tensor:
    """Learnable-precision head (paper Eq. 5-7): u = A z + b, v = C z + b', x ~ N(u, 1/v^2).

    log_term "exact" is E[log v^2] for Gaussian latents (k3 = k4 = None required)."""
    if log_term == "exact" and (k3 is not None or k4 is not None):
        raise ValueError("log_term='exact' needs Gaussian latents (k3 = k4 = None)")
    c = precision_contractions(mean, var, k3, k4, weight, bias, precision_weight, precision_bias)
    return precision_pixel_nll(x, c, log_term).sum(dim=-1)


# ------------------------------------------------------------------ log-variance head
class LogvarTerms(NamedTuple):
    """What the log-variance epilogue needs per (sample, pixel), each (B, k) (MATH.md §11).

    With s(z) = h.z + h0 the log decoder variance and u(z) = a.z + b the mean:
    mean_logvar = E[s]; log_scale = log E[exp(-s)]; tilted_mean, tilted_var = mean and
    variance of u under q tilted by exp(-s), so E[(x-u)^2 e^-s] =
    exp(log_scale) ((x - tilted_mean)^2 + tilted_var).
    """

    mean_logvar: Tensor
    log_scale: Tensor
    tilted_mean: Tensor
    tilted_var: Tensor


def gaussian_logvar_terms(mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                          logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> LogvarTerms:
    """Gaussian latents: five GEMM-shaped contractions (A.m, H.m, H^2.k2, AH.k2, A^2.k2)."""
    A, H = weight, logvar_weight
    mean_logvar = F.linear(mean, H, logvar_bias)
    log_scale = -mean_logvar + 0.5 * F.linear(var, H.square())
    tilted_mean = F.linear(mean, A, bias) - F.linear(var, A * H)
    return LogvarTerms(mean_logvar, log_scale, tilted_mean, F.linear(var, A.square()))


class _TiltedLatents(NamedTuple):
    """The fields of LatentMoments that ``families.tilt`` reads (checkpoint passes tensors)."""

    family: str
    params: tuple
    mean: Tensor
    var: Tensor


def _tilted_chunk(mean, var, weight, bias, logvar_weight, logvar_bias, family, *params):
    q = _TiltedLatents(family, params, mean, var)
    K, tilted_mean, tilted_var = families.tilt(q, -logvar_weight)        # (B, kc, d) each
    mean_logvar = F.linear(mean, logvar_weight, logvar_bias)
    h0 = 0 if logvar_bias is None else logvar_bias
    b = 0 if bias is None else bias
    return LogvarTerms(mean_logvar, K.sum(-1) - h0, (weight * tilted_mean).sum(-1) + b,
                       (weight.square() * tilted_var).sum(-1))


def tilted_logvar_terms(q: LatentMoments, weight: Tensor, bias: Optional[Tensor],
                        logvar_weight: Tensor, logvar_bias: Optional[Tensor],
                        max_elements: int = 1 << 22) -> LogvarTerms:
    """Any family with a moment generating function, by tilting each latent (MATH.md §11).

    O(B k d) transcendental work. The (B, k, d) intermediates are built for at most
    ``max_elements`` (sample, pixel, latent) triples at a time (pixel chunks, recomputed in
    backward by activation checkpointing), so memory stays bounded.
    """
    B, d = q.mean.shape
    k = weight.shape[0]
    rows = max(1, max_elements // max(1, B * d))
    parts = []
    for p0 in range(0, k, rows):
        sl = slice(p0, p0 + rows)
        args = (q.mean, q.var, weight[sl], None if bias is None else bias[sl], logvar_weight[sl],
                None if logvar_bias is None else logvar_bias[sl], q.family, *q.params)
        if rows < k and torch.is_grad_enabled():
            parts.append(checkpoint(_tilted_chunk, *args, use_reentrant=False))
        else:
            parts.append(_tilted_chunk(*args))
    return LogvarTerms(*(torch.cat(field, dim=-1) for field in zip(*parts)))


def logvar_pixel_nll(x: Tensor, t: LogvarTerms) -> Tensor:
    """Per-pixel exact NLL (B, k) of the log-variance head:
    0.5 [log 2pi + E[s] + E[(x - u)^2 exp(-s)]]."""
    weighted_sq_err = torch.exp(t.log_scale) * ((x - t.tilted_mean).square() + t.tilted_var)
    return 0.5 * (LOG_2PI + t.mean_logvar + weighted_sq_err)


def logvar_nll(x: Tensor, q: LatentMoments, weight: Tensor, bias: Optional[Tensor],
               logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> Tensor:
    """Log-variance head: u = A z + b, log sigma^2 = H z + h0, x ~ N(u, sigma^2). Exact for
    every family with a moment generating function (families.TILTABLE_FAMILIES)."""
    if q.family == "gaussian":
        t = gaussian_logvar_terms(q.mean, q.var, weight, bias, logvar_weight, logvar_bias)
    else:
        families.check_domain(q, -logvar_weight)
        t = tilted_logvar_terms(q, weight, bias, logvar_weight, logvar_bias)
    return logvar_pixel_nll(x, t).sum(dim=-1)
