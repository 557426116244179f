"""Gradient estimators for the encoder's reconstruction term.

Each estimator returns a surrogate scalar whose gradient is
  - w.r.t. the encoder outputs: an estimate of the gradient of E_q[-log p(x|z)], and
  - w.r.t. the decoder parameters: the gradient of the decoder's own (sampled or exact)
    reconstruction loss,
so the trainer simply adds the analytic KL and calls ``backward()`` once.

- ``silent``: the exact expected NLL of a linear Gaussian head (``analytic_nll``); zero variance.
- ``reparam``: pathwise, z = mu + sigma * eps (Gaussian latents).
- ``gumbel``: binary Concrete / Gumbel-Softmax relaxation z = sigmoid((logits + L) / t),
  L logistic noise (categorical latents: softmax((logits + Gumbel) / t) per group); optional
  straight-through (hard forward, relaxed backward). Biased: it is the gradient of the
  relaxed objective, not of the discrete one.
- ``reinforce``: score function (L(z) - b) * grad log q(z|x) with z ~ q hard samples and
  b the running average of the reconstruction loss (paper Appendix B.3), kept by the
  caller (``ReinforceBaseline``) and saved in checkpoints.
- ``variance-loss``: the log-variance objective of vae-variance-loss.txt: S detached
  samples z_s ~ q, f_s = log p(x|z_s) + log p(z_s) - log q(z_s|x), objective
  0.5 * sample-variance_s(f_s) (unbiased, S - 1). Its encoder gradient equals a
  leave-one-out score-function estimate of the gradient of the negative ELBO
  (reconstruction + KL); we subtract the analytic KL (which the trainer adds back), so the
  encoder receives exactly the variance-objective gradient while the surrogate remains a
  "reconstruction" estimator like the others. The decoder is trained on its own mean NLL
  over the S samples (the 0.5 factor makes the encoder gradient unbiased for the ELBO's;
  the thesis's unscaled variance is twice that). Valid for Gaussian and Bernoulli latents.

All random numbers come from a ``Noise`` object: it draws for the *global* batch and keeps
this process's rows, so a data-parallel run consumes exactly the numbers a single-process
run does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .posterior import Posterior

__all__ = ["ESTIMATORS", "VALID_ESTIMATORS", "Noise", "ReconTerms", "ReinforceBaseline",
           "reconstruction", "check_estimator"]

ESTIMATORS = ("silent", "reparam", "gumbel", "reinforce", "variance-loss")
VALID_ESTIMATORS = {
    "gaussian": ("silent", "reparam", "variance-loss"),
    "bernoulli": ("silent", "gumbel", "reinforce", "variance-loss"),
    "categorical": ("silent", "gumbel", "reinforce", "variance-loss"),
}


def check_estimator(estimator: str, latent: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator not in VALID_ESTIMATORS[latent]:
        raise ValueError(f"estimator {estimator!r} does not apply to {latent} latents; use one of "
                         f"{', '.join(VALID_ESTIMATORS[latent])}")


class Noise:
    """Draws standard normal / uniform noise for a global batch of ``total`` rows from
    ``generator`` and returns the rows of this process (``rows``, a slice)."""

    def __init__(self, generator: torch.Generator, total: int, rows: slice = slice(None),
                 device=None, dtype=torch.float32):
        self.generator = generator
        self.total = total
        self.rows = rows
        self.device = device if device is not None else generator.device
        self.dtype = dtype

    def _draw(self, kind: str, dim: int, samples: Optional[int]) -> Tensor:
        shape = (self.total, dim) if samples is None else (samples, self.total, dim)
        fn = torch.randn if kind == "normal" else torch.rand
        t = fn(shape, generator=self.generator, device=self.generator.device, dtype=self.dtype)
        t = t[self.rows] if samples is None else t[:, self.rows]
        return t.to(self.device)

    def normal(self, dim: int, samples: Optional[int] = None) -> Tensor:
        return self._draw("normal", dim, samples)

    def uniform(self, dim: int, samples: Optional[int] = None) -> Tensor:
        return self._draw("uniform", dim, samples)


class ReinforceBaseline:
    """Running average b <- decay * b + (1 - decay) * mean batch reconstruction loss; the
    first batch initialises it. ``value`` is None until then."""

    def __init__(self, decay: float = 0.99, value: Optional[float] = None):
        if not 0 <= decay < 1:
            raise ValueError(f"reinforce baseline decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.value = value

    def get(self, batch_mean: float) -> float:
        return batch_mean if self.value is None else self.value

    def update(self, batch_mean: float) -> None:
        self.value = batch_mean if self.value is None else \
            self.decay * self.value + (1 - self.decay) * batch_mean


@dataclass
class ReconTerms:
    """loss: the surrogate scalar (sum over this process's rows times ``scale``);
    nll: the per-image reconstruction NLL (detached; for the sampled estimators the mean
    over their samples), used for logging and the REINFORCE baseline."""

    loss: Tensor
    nll: Tensor


def reconstruction(estimator: str, x: Tensor, post: Posterior, decoder, noise: Noise, *,
                   scale: float, baseline: Optional[ReinforceBaseline] = None,
                   temperature: float = 0.5, straight_through: bool = False,
                   samples: int = 4, batch_mean_nll=None) -> ReconTerms:
    """The surrogate reconstruction loss of ``estimator`` for images x (B, C, H, W).

    ``decoder`` must have ``sample_nll(x, z)``; ``silent`` also needs ``nll(x, q)`` (an
    AnalyticLinearDecoder). ``scale`` multiplies the sum over rows (1 / global batch size).
    For ``reinforce``, ``batch_mean_nll`` (optional) maps this process's per-image losses
    to the global-batch mean (an all-reduce in data-parallel runs); it initialises the
    baseline on the first batch.
    """
    check_estimator(estimator, post.latent)
    d = post.latent_dim
    if estimator == "silent":
        if not hasattr(decoder, "nll"):
            raise ValueError("the silent estimator needs a linear analytic head (decoder='linear' "
                             "or 'dual')")
        nll = decoder.nll(x, post.moments(), reduction="none")
        return ReconTerms(nll.sum() * scale, nll.detach())
    if estimator == "reparam":
        z = post.rsample(noise.normal(d))
        nll = decoder.sample_nll(x, z)
        return ReconTerms(nll.sum() * scale, nll.detach())
    if estimator == "gumbel":
        z = post.relaxed_sample(noise.uniform(d), temperature, straight_through)
        nll = decoder.sample_nll(x, z)
        return ReconTerms(nll.sum() * scale, nll.detach())
    if estimator == "reinforce":
        z = post.hard_sample(noise.uniform(d))
        nll = decoder.sample_nll(x, z)              # decoder gradient; z carries none
        values = nll.detach()
        if baseline is None:
            baseline = ReinforceBaseline()
        mean = batch_mean_nll(values) if batch_mean_nll is not None else float(values.mean())
        b = baseline.get(mean)
        score = post.log_prob(z)                    # gradient to the encoder only
        surrogate = nll.sum() + ((values - b) * score).sum()
        return ReconTerms(surrogate * scale, values)
    # variance-loss
    if samples < 2:
        raise ValueError(f"variance-loss needs at least 2 samples per image, got {samples}")
    u = noise.normal(d, samples) if post.latent == "gaussian" else noise.uniform(d, samples)
    z = post.hard_sample(u)                         # (S, B, d), detached
    nll = decoder.sample_nll(x, z)                  # (S, B)
    f = -nll.detach() + post.prior_log_prob(z) - post.log_prob(z)
    objective = 0.5 * f.var(dim=0, unbiased=True)   # (B,)
    surrogate = objective.sum() - post.kl().sum() + nll.mean(0).sum()
    return ReconTerms(surrogate * scale, nll.detach().mean(0))
