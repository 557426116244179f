"""The three-entropies identity (``elbo-converges-to-three-entropies.txt``, MATH.md §8).

At every stationary point of a Gaussian VAE (prior N(0, I), mean-field Gaussian q) whose
decoder variance is a learned scalar sigma^2 (their VAE-1, linear VAEs included), the ELBO
equals a sum of three entropies, -H[p(z)] - H[p(x|z)] + mean_n H[q(z|x_n)], i.e. per sample

    S = (1/2N) sum_n sum_i log k2_i(x_n) - (k/2) log(2 pi e sigma^2)

and with a z-dependent decoder variance sigma_p^2(z) (their VAE-3)

    S = (1/2N) sum_n sum_i log k2_i(x_n) - (1/2N) sum_n sum_p E_q[log sigma_p^2(z)] - (k/2) log(2 pi e).

(The prior's entropy and the constant part of q's entropy cancel, which is why only log k2
appears.) Both sides are cheap; ``ELBO - S`` is a convergence diagnostic that needs no
sampling. It is exactly zero at the optimum of the linear VAE with learned sigma^2, and it
stays finite when sigma^2 is held at a value that is not stationary (their Fig. 1(a)).

Learnable precision head (paper Eq. 5-7, v_p(z) = c_p . z + b'_p, sigma_p^2 = 1 / v_p^2):
E_q[log sigma_p^2(z)] = -E_q[log v_p^2]. With Gaussian latents v_p is Gaussian and the term is
exact (``silent_kernels.expected_log_square``, docs/math.md §3), as in ``analytic_nll``'s
default; ``log_term="taylor"`` gives the paper's second-order expansion around M = E[v^2]
(an approximation, the only option for non-Gaussian latents):

    E[log v^2] ~ log M - V / (2 M^2),   M = vbar^2 + Scc,
    V = Var[v^2] = 4 vbar^2 Scc + 4 vbar C3 + C4 + 2 Scc^2,

with vbar = C m + b', Scc = (C*C) k2, C3 = C^3 k3, C4 = C^4 k4 (element-wise powers against
the cumulants of ``LatentMoments``), M clamped at ``PRECISION_SQ_FLOOR`` like the package.
Either way the ELBO and the entropy sum use the same log term, so the gap of a
learned-precision model is the gap of the objective it was trained on. Computed here with
plain torch (O(B k d)); ``tests/test_companion_ppca.py`` checks it against ``analytic_nll``.

The identity is derived for Gaussian latents; for other latent families these functions
still evaluate the formula, but ``head_entropy_sum`` returns None for non-Gaussian moments
(the trainer then logs no gap).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from silent_kernels import PRECISION_SQ_FLOOR, LatentMoments, expected_log_square

__all__ = ["encoder_log_var_term", "expected_log_precision_sq", "decoder_log_var_term",
           "entropy_sum", "head_entropy_sum", "entropy_gap", "LOG_2PI_E"]

LOG_2PI_E = math.log(2 * math.pi) + 1.0


def encoder_log_var_term(q: LatentMoments) -> Tensor:
    """0.5 * sum_i log Var_q(z_i) per sample, (B,)."""
    return 0.5 * torch.log(q.var).sum(-1)


def expected_log_precision_sq(q: LatentMoments, precision_weight: Tensor,
                              precision_bias: Optional[Tensor] = None, log_term: str = "auto") -> Tensor:
    """E_q[log v_p(z)^2], (B, k), for v = C z + b': exact for Gaussian latents ("exact", the
    "auto" choice for them), else the Taylor approximation ("taylor", MATH.md §4):
    log M - V / (2 M^2) with M = E[v^2] (clamped at PRECISION_SQ_FLOOR), V = Var[v^2].
    """
    if log_term == "auto":
        log_term = "exact" if q.family == "gaussian" else "taylor"
    if log_term not in ("exact", "taylor"):
        raise ValueError(f"log_term: expected 'auto', 'exact' or 'taylor', got {log_term!r}")
    C = precision_weight
    C2 = C.square()
    vbar = F.linear(q.mean, C, precision_bias)
    scc = F.linear(q.var, C2)
    if log_term == "exact":
        if q.family != "gaussian":
            raise ValueError(f"log_term: 'exact' needs Gaussian latents, got family {q.family!r}")
        return expected_log_square(vbar, scc)
    vb2 = vbar.square()
    M = vb2 + scc
    V = 4 * vb2 * scc + 2 * scc.square()
    if q.k3 is not None:
        V = V + 4 * vbar * F.linear(q.k3, C2 * C)
    if q.k4 is not None:
        V = V + F.linear(q.k4, C2.square())
    M = M.clamp_min(PRECISION_SQ_FLOOR)
    return torch.log(M) - V / (2 * M.square())


def decoder_log_var_term(q: LatentMoments, k: int, *, sigma2: Union[float, Tensor, None] = None,
                         precision_weight: Optional[Tensor] = None,
                         precision_bias: Optional[Tensor] = None) -> Tensor:
    """0.5 * sum_p E_q[log sigma_p^2(z)] per sample, (B,).

    ``sigma2``: a scalar (float or 0-dim tensor) or per-pixel (k,) variance; or the precision
    head (``precision_weight`` (k, d), ``precision_bias`` (k,)), sigma_p^2 = 1 / v_p^2.
    """
    if (sigma2 is None) == (precision_weight is None):
        raise ValueError("give exactly one of sigma2 or precision_weight")
    batch = q.mean.shape[0]
    if precision_weight is not None:
        return -0.5 * expected_log_precision_sq(q, precision_weight, precision_bias).sum(-1)
    s2 = torch.as_tensor(sigma2, dtype=q.mean.dtype, device=q.mean.device)
    if s2.dim() == 0:
        value = 0.5 * k * torch.log(s2)
    elif s2.shape == (k,):
        value = 0.5 * torch.log(s2).sum()
    else:
        raise ValueError(f"sigma2: expected a scalar or shape ({k},), got {tuple(s2.shape)}")
    return value.expand(batch)


def entropy_sum(q: LatentMoments, k: int, *, sigma2: Union[float, Tensor, None] = None,
                precision_weight: Optional[Tensor] = None, precision_bias: Optional[Tensor] = None,
                logvar_weight: Optional[Tensor] = None, logvar_bias: Optional[Tensor] = None,
                reduction: str = "none") -> Tensor:
    """The three-entropies sum of MATH.md §8 in nats, per sample (``reduction="none"``, (B,))
    or averaged (``"mean"``) / summed (``"sum"``) over the batch.

    Per sample: 0.5 sum_i log k2_i - 0.5 sum_p E_q[log sigma_p^2(z)] - (k/2) log(2 pi e).
    Its batch mean is the right-hand side of the identity for the data in the batch. With the
    log-variance head (``logvar_weight`` H, ``logvar_bias`` h) E_q[log sigma_p^2] = H_p m + h_p.
    """
    if logvar_weight is not None:
        decoder = 0.5 * F.linear(q.mean, logvar_weight, logvar_bias).sum(-1)
    else:
        decoder = decoder_log_var_term(q, k, sigma2=sigma2, precision_weight=precision_weight,
                                       precision_bias=precision_bias)
    per = encoder_log_var_term(q) - decoder - 0.5 * k * LOG_2PI_E
    if reduction == "none":
        return per
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    raise ValueError(f"reduction: expected 'none', 'mean' or 'sum', got {reduction!r}")


def head_entropy_sum(head, q: LatentMoments) -> Optional[Tensor]:
    """``entropy_sum`` (B,) for an ``AnalyticLinearDecoder`` head (fixed, scalar, learned
    precision or log-variance), or None when q is not Gaussian (the identity assumes Gaussian
    latents)."""
    if not q.is_gaussian:
        return None
    k = head.mu.weight.shape[0]
    if getattr(head, "learned_precision", False):
        return entropy_sum(q, k, precision_weight=head.alpha.weight, precision_bias=head.alpha.bias)
    if getattr(head, "variance", None) == "logvar":
        return entropy_sum(q, k, logvar_weight=head.alpha.weight, logvar_bias=head.alpha.bias)
    return entropy_sum(q, k, sigma2=head._sigma2())


@torch.no_grad()
def entropy_gap(model, x: Tensor) -> dict:
    """ELBO, entropy sum and their gap (nats per sample, batch means) of a VAE with a linear
    analytic head on data x: ``{"elbo", "entropy_sum", "entropy_gap"}``. The ELBO is the
    exact one of the head (``analytic_nll`` + analytic KL)."""
    head = model.linear
    if head is None:
        raise ValueError("entropy_gap needs the linear analytic head")
    post = model.posterior(x)
    q = post.moments()
    s = head_entropy_sum(head, q)
    if s is None:
        raise ValueError("the three-entropies identity needs Gaussian latents")
    elbo = -(head.nll(x, q) + post.kl())
    e, s = float(elbo.double().mean()), float(s.double().mean())
    return {"elbo": e, "entropy_sum": s, "entropy_gap": e - s}
