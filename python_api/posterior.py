"""The encoder's posterior q(z|x) for the three latent families of the trainer: its moments
for the exact loss, its KL to the prior, and reproducible draws (exact, relaxed, straight-through)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import distributions as D

from silent_kernels import LatentMoments

__all__ = ["LATENTS", "Posterior", "params_per_latent"]

LATENTS = ("gaussian", "bernoulli", "categorical")


def params_per_latent(latent: str) -> int:
    """Encoder outputs per latent coordinate: (mean, log-variance) or one logit."""
    if latent not in LATENTS:
        raise ValueError(f"latent: expected one of {', '.join(LATENTS)}, got {latent!r}")
    return 2 if latent == "gaussian" else 1


class Posterior:
    """q(z|x) from the encoder's output: mean-field Gaussian (mean, log-variance), Bernoulli
    (logits), or G independent one-hot groups of ``categories`` K categories (logits (B, G K),
    group-major). Sampling takes the noise as an argument (see estimators.Noise) so that draws
    are reproducible and identical across data-parallel processes; categorical draws use the
    Gumbel-max trick on uniform noise of the logits' shape."""

    def __init__(self, latent: str, params: Tensor, categories: Optional[int] = None):
        params_per_latent(latent)
        if latent == "categorical" and categories is None:
            raise ValueError("categories: categorical latents need K, the number of categories per group")
        self.latent = latent
        self.params = params
        if latent == "gaussian":
            self.mu, self.logvar = params.chunk(2, dim=-1)
        else:
            self.logits = params
        if latent == "categorical":
            if params.shape[-1] % categories:
                raise ValueError(f"categories: {categories} does not divide the latent width {params.shape[-1]}")
            self.group_logits = params.unflatten(-1, (params.shape[-1] // categories, categories))

    @property
    def latent_dim(self) -> int:
        return self.params.shape[-1] // params_per_latent(self.latent)

    def moments(self) -> LatentMoments:
        if self.latent == "gaussian":
            return LatentMoments.gaussian(self.mu, logvar=self.logvar)
        if self.latent == "categorical":
            return LatentMoments.categorical(logits=self.group_logits)
        return LatentMoments.bernoulli(logits=self.logits)

    @property
    def mean(self) -> Tensor:
        if self.latent == "categorical":
            return torch.softmax(self.group_logits, -1).flatten(-2)
        return self.mu if self.latent == "gaussian" else torch.sigmoid(self.logits)

    def distribution(self) -> D.Distribution:
        """Per latent (Gaussian, Bernoulli: batch (B, d)) or per group (categorical: batch
        (B, G), event (K,))."""
        if self.latent == "gaussian":
            return D.Normal(self.mu, torch.exp(0.5 * self.logvar))
        if self.latent == "categorical":
            return D.OneHotCategorical(logits=self.group_logits)
        return D.Bernoulli(logits=self.logits)

    def prior(self) -> D.Distribution:
        ref = self.params
        if self.latent == "gaussian":
            zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
            return D.Normal(zero, torch.ones_like(zero))
        if self.latent == "categorical":
            return D.OneHotCategorical(logits=torch.zeros_like(self.group_logits[(0,) * (self.group_logits.dim() - 1)]))
        return D.Bernoulli(probs=torch.full((), 0.5, dtype=ref.dtype, device=ref.device))

    def kl(self) -> Tensor:
        """KL(q || p) per sample (B,), p = N(0, I), Bernoulli(0.5)^d or uniform categoricals."""
        q = self.distribution()
        p = self.prior()
        p = p.expand(q.batch_shape)
        return D.kl_divergence(q, p).sum(-1)

    def _grouped(self, z: Tensor) -> Tensor:
        return z.unflatten(-1, self.group_logits.shape[-2:]) if self.latent == "categorical" else z

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z|x) summed over latents; z (..., B, d) -> (..., B)."""
        return self.distribution().log_prob(self._grouped(z)).sum(-1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return self.prior().log_prob(self._grouped(z)).sum(-1)

    def _gumbel_logits(self, u: Tensor) -> Tensor:
        """Logits plus Gumbel noise -log(-log u), grouped (..., B, G, K)."""
        tiny = torch.finfo(u.dtype).tiny
        u = u.clamp(tiny, 1 - torch.finfo(u.dtype).eps)
        return self.group_logits - torch.log(-torch.log(self._grouped(u)))

    def rsample(self, eps: Tensor) -> Tensor:
        """Gaussian reparameterised sample mu + sigma * eps (eps standard normal)."""
        return self.mu + torch.exp(0.5 * self.logvar) * eps

    def hard_sample(self, u: Tensor) -> Tensor:
        """A sample from q without a gradient path: Bernoulli via u < p (u uniform), Gaussian
        via mu + sigma * u (u standard normal)."""
        with torch.no_grad():
            if self.latent == "gaussian":
                return self.rsample(u)
            if self.latent == "categorical":   # Gumbel-max: an exact draw from each group
                g = self._gumbel_logits(u)
                return F.one_hot(g.argmax(-1), g.shape[-1]).to(u.dtype).flatten(-2)
            return (u < torch.sigmoid(self.logits)).to(self.logits.dtype)

    def relaxed_sample(self, u: Tensor, temperature: float, straight_through: bool = False) -> Tensor:
        """Binary Concrete / Gumbel-Softmax: sigmoid((logits + log u - log(1-u)) / t) in (0, 1)
        (categorical: softmax((logits + Gumbel) / t) per group); straight-through returns the
        hard one-hot / {0, 1} value forward and the relaxed gradient."""
        if self.latent == "categorical":   # Gumbel-Softmax per group
            y = torch.softmax(self._gumbel_logits(u) / temperature, dim=-1)
            if straight_through:
                hard = F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype).detach()
                y = hard + (y - y.detach())
            return y.flatten(-2)
        eps = torch.finfo(u.dtype).tiny
        u = u.clamp(eps, 1 - torch.finfo(u.dtype).eps)
        y = torch.sigmoid((self.logits + torch.log(u) - torch.log1p(-u)) / temperature)
        if straight_through:
            hard = (y > 0.5).to(y.dtype).detach()
            return hard + (y - y.detach())
        return y
