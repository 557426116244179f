"""Companion result 2: the analytic M1 score-matching objective
(``variational-score-matching-failure.txt``, Proposition 3.1 and Appendix A.2).

For a semi-Gaussian VAE, p(x|z) = N(x; g(z), gamma I) with any prior and any q, the M1
objective of the decoder (its eq. 8 without the q-only term) is

    M1(x) = E_q[ 0.5 ||s(x|z)||^2 + div_x s(x|z) ],   s(x|z) = grad_x log p(x|z) = -(x - g(z)) / gamma
          = E_q||x - g(z)||^2 / (2 gamma^2) - k / gamma,

and minimising it over gamma leaves h_F(L) = -k^2 / (2 L) of the batch mean
L = mean_n E_q||x_n - g(z)||^2 (Prop. 3.1): the same autoencoding quantity the ELBO uses,
through a different increasing function (the ELBO gives (k/2) log(L/k)). For the linear
decoder g(z) = W z + b this expectation is *exactly* the fixed-variance analytic quantity of
``analytic_nll`` (MATH.md §3): E_q||x - g||^2 = sum_p (x_p - ubar_p)^2 + Saa_p, obtained as
``analytic_nll(..., sigma2=1/2) - (k/2) log(pi)``; no sampling.

Training (``TrainConfig(objective="m1")``, Algorithm 1 of that paper with D_KL inference):
the decoder (W, b and gamma = the head's sigma^2, learned when ``variance="scalar"``) is
trained on M1 with q held fixed (detached moments), and the encoder by KL-based inference,
i.e. the gradient of KL(q || p(z|x)) = -ELBO + const, here the exact negative ELBO of the
linear head with the decoder held fixed (detached W, b, gamma). Both updates come from one
surrogate and one backward pass per batch; that paper instead ran J = 5 encoder updates per
decoder update with S = 5 samples (we update both once per batch, exactly). Scalar gamma
only (``variance`` fixed or scalar), linear decoder only (``decoder="linear"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from silent_kernels import LatentMoments, analytic_nll

from .estimators import ReconTerms

__all__ = ["OBJECTIVES", "check_objective", "expected_sq_error", "m1_loss", "m1_profiled",
           "M1Terms", "m1_reconstruction"]

OBJECTIVES = ("elbo", "m1")


def check_objective(cfg) -> None:
    """Raise ValueError when ``cfg.objective`` does not fit the rest of the config."""
    objective = getattr(cfg, "objective", "elbo")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective != "m1":
        return
    if cfg.decoder != "linear":
        raise ValueError("objective 'm1' uses the analytic E_q||x - g(z)||^2 of the linear head: "
                         "use decoder='linear'")
    if cfg.variance not in ("fixed", "scalar"):
        raise ValueError("objective 'm1' needs a scalar decoder variance gamma: use variance='scalar' "
                         "(learned) or 'fixed'")
    if cfg.estimator != "silent":
        raise ValueError("objective 'm1' is analytic (no sampling): use estimator='silent'")


def _flat_k(x: Tensor) -> int:
    return math.prod(x.shape[1:])


def expected_sq_error(x: Tensor, q: LatentMoments, weight: Tensor, bias=None,
                      backend: str = "auto") -> Tensor:
    """E_q||x - (W z + b)||^2 per sample (B,), exactly, from ``analytic_nll``:
    with sigma2 = 1/2 its value is E||x - g||^2 + (k/2) log(pi)."""
    nll = analytic_nll(x, q, weight, bias, sigma2=0.5, reduction="none", backend=backend)
    return nll - 0.5 * _flat_k(x) * math.log(math.pi)


def m1_loss(sq_err: Tensor, gamma: Tensor, k: int) -> Tensor:
    """M1 per sample from E_q||x - g||^2 (``sq_err``): sq_err / (2 gamma^2) - k / gamma."""
    return sq_err / (2 * gamma.square()) - k / gamma


def m1_profiled(mean_sq_err: Tensor, k: int) -> Tensor:
    """min over gamma of mean M1 = h_F(L) = -k^2 / (2 L), L the batch mean of E_q||x - g||^2
    (attained at gamma = L / k)."""
    return -(k ** 2) / (2 * mean_sq_err)


@dataclass
class M1Terms(ReconTerms):
    """``ReconTerms`` plus the per-image M1 value (detached, for logging)."""

    m1: Tensor = None


def _detached(q: LatentMoments) -> LatentMoments:
    d = lambda t: None if t is None else t.detach()  # noqa: E731
    return LatentMoments(q.mean.detach(), q.var.detach(), d(q.k3), d(q.k4))


def m1_reconstruction(x: Tensor, post, head, *, scale: float) -> M1Terms:
    """The surrogate of one M1 training step for an ``AnalyticLinearDecoder`` ``head``.

    loss = scale * sum_n [ NLL_n(encoder; decoder detached) + M1_n(decoder; q detached) ],
    so the encoder receives the exact negative-ELBO gradient (plus the trainer's KL) and the
    decoder (W, b, gamma) the M1 gradient. ``nll`` is the exact NLL (for the logged ELBO).
    """
    if getattr(head, "learned_precision", False):
        raise ValueError("objective 'm1' needs a scalar decoder variance (variance fixed or scalar)")
    q = post.moments()
    W, b = head.mu.weight, head.mu.bias
    gamma = head._sigma2()
    nll = analytic_nll(x, q, W.detach(), None if b is None else b.detach(), sigma2=gamma.detach(),
                       reduction="none", backend=head.backend)
    sq = expected_sq_error(x, _detached(q), W, b, backend=head.backend)
    m1 = m1_loss(sq, gamma, _flat_k(x))
    return M1Terms(loss=(nll.sum() + m1.sum()) * scale, nll=nll.detach(), m1=m1.detach())
