"""Per-sample, per-latent cumulants of a mean-field posterior q(z|x) (MATH.md §1).

The analytic loss needs only the first four cumulants of each latent:
``mean`` (m), ``var`` (k2), ``k3`` (third central moment) and ``k4`` (fourth
*cumulant* = fourth central moment - 3 k2^2). ``None`` for k3 / k4 means zero,
which is the Gaussian case and lets the kernels skip those contractions.

Every constructor here is written with differentiable torch ops, so gradients
flow from the loss back into whatever produced the distribution parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch import distributions as D

__all__ = ["LatentMoments", "as_latent_moments", "SUPPORTED_DISTRIBUTIONS", "FAMILIES", "LOG_2PI"]

# The latent families the package knows, and the natural parameters each carries in
# ``LatentMoments.params`` (all (B, d)). "cumulants" is a mean-field law given only by its
# four cumulants (no moment generating function known).
FAMILIES = {
    "gaussian": (),
    "bernoulli": ("logits",),
    "uniform": ("low", "high"),
    "laplace": ("loc", "scale"),
    "poisson": ("rate",),
    "gamma": ("concentration", "rate"),
    "categorical": ("logits",),   # (B, G, K): G independent one-hot groups of K categories
    "cumulants": (),
}

SUPPORTED_DISTRIBUTIONS = (
    "OneHotCategorical (batch (B, G), event (K,))",
    "Normal",
    "Independent(Normal)",
    "Bernoulli",
    "Uniform",
    "Laplace",
    "Poisson",
    "Gamma",
)


@dataclass(frozen=True)
class LatentMoments:
    """Cumulants of q(z|x), each of shape (B, d) (batch, latent dimension).

    Attributes:
        mean: E[z_i].
        var: Var(z_i) >= 0.
        k3: E[(z_i - m_i)^3], or None for zero.
        k4: E[(z_i - m_i)^4] - 3 Var(z_i)^2, or None for zero.
        family: which law the cumulants belong to (a key of ``FAMILIES``). Heads that need
            more than four cumulants (the log-variance head needs the moment generating
            function; the exact log term needs Gaussian latents) read it. Default: "gaussian"
            when k3 and k4 are None, else "cumulants".
        params: the family's natural parameters, in the order ``FAMILIES[family]`` names them.
    """

    mean: Tensor
    var: Tensor
    k3: Optional[Tensor] = None
    k4: Optional[Tensor] = None
    family: Optional[str] = None
    params: Tuple[Tensor, ...] = ()

    def __post_init__(self) -> None:
        if self.family is None:
            object.__setattr__(self, "family",
                               "gaussian" if self.k3 is None and self.k4 is None else "cumulants")
        if self.family not in FAMILIES:
            raise ValueError(f"LatentMoments.family: expected one of {', '.join(map(repr, FAMILIES))}, "
                             f"got {self.family!r}")
        names = FAMILIES[self.family]
        if len(self.params) != len(names):
            raise ValueError(f"LatentMoments.params: family {self.family!r} needs {len(names)} "
                             f"parameter(s) {names}, got {len(self.params)}")
        if self.family == "gaussian" and not (self.k3 is None and self.k4 is None):
            raise ValueError("LatentMoments: family 'gaussian' has k3 = k4 = 0; pass k3=None, k4=None")
        if self.family == "categorical":
            logits = self.params[0]
            B, d = self.mean.shape
            if not (isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[0] == B
                    and logits.shape[1] * logits.shape[2] == d):
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"LatentMoments.params (logits): expected shape (B={B}, G, K) with "
                                 f"G * K = d = {d} (the width of mean), got {shape}")
            return
        for name, value in zip(names, self.params):
            if not isinstance(value, Tensor) or value.shape != self.mean.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"LatentMoments.params ({name}): expected a tensor of shape "
                                 f"{tuple(self.mean.shape)} (the shape of mean), got {shape}")
        for name in ("mean", "var", "k3", "k4"):
            value = getattr(self, name)
            if value is None and name in ("k3", "k4"):
                continue
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"LatentMoments.{name}: expected a torch.Tensor, got {type(value).__name__}"
                )
            if value.dim() != 2:
                raise ValueError(
                    f"LatentMoments.{name}: expected shape (B, d), got {tuple(value.shape)}"
                )
            if name != "mean" and value.shape != self.mean.shape:
                raise ValueError(
                    f"LatentMoments.{name}: expected shape {tuple(self.mean.shape)} "
                    f"(the shape of mean), got {tuple(value.shape)}"
                )

    # ------------------------------------------------------------------ helpers
    @property
    def batch_size(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.mean.shape[1]

    @property
    def is_gaussian(self) -> bool:
        """True for the Gaussian family (k3 = k4 = 0). Not the same as "no k3, k4 given": a
        categorical law carries its higher moments in its logits, not in k3 / k4."""
        return self.family == "gaussian"

    def param(self, name: str) -> Tensor:
        """The natural parameter ``name`` of this family (e.g. "logits" of a Bernoulli)."""
        return self.params[FAMILIES[self.family].index(name)]

    def tensors(self) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        return self.mean, self.var, self.k3, self.k4

    # ------------------------------------------------------------- constructors
    @classmethod
    def gaussian(cls, mu: Tensor, *positional, logvar: Optional[Tensor] = None) -> "LatentMoments":
        """Gaussian latents from an encoder's mean and log-variance, both (B, d):
        ``LatentMoments.gaussian(mu, logvar=logvar)``, Var = exp(logvar).

        The log-variance is keyword-only so that a standard deviation or a variance cannot be
        passed by mistake: use ``from_std(mu, std)`` for a standard deviation."""
        if positional:
            raise TypeError("LatentMoments.gaussian: pass the log-variance by name, "
                            "LatentMoments.gaussian(mu, logvar=logvar); for a standard deviation use "
                            "LatentMoments.from_std(mu, std)")
        if logvar is None:
            raise TypeError("LatentMoments.gaussian: missing logvar= (the log-variance, shape (B, d))")
        return cls(mu, torch.exp(logvar), family="gaussian")

    @classmethod
    def from_std(cls, mu: Tensor, std: Tensor) -> "LatentMoments":
        """Gaussian latents from a mean and a standard deviation (B, d): Var = std^2."""
        return cls(mu, std.square(), family="gaussian")

    @classmethod
    def bernoulli(cls, logits: Optional[Tensor] = None, probs: Optional[Tensor] = None) -> "LatentMoments":
        """Bernoulli latents from logits (preferred: stable p(1-p)) or probs, (B, d)."""
        if (logits is None) == (probs is None):
            raise ValueError("LatentMoments.bernoulli: give exactly one of logits or probs")
        if logits is not None:
            p = torch.sigmoid(logits)
            pq = p * torch.sigmoid(-logits)  # p(1-p) without cancellation at saturated logits
        else:
            _check_probs(probs)
            p = probs
            pq = probs * (1 - probs)
            logits = torch.logit(probs)  # +-inf at 0 / 1: the log-variance head still works
        return cls(p, pq, pq * (1 - 2 * p), pq * (1 - 6 * pq), "bernoulli", (logits,))

    @classmethod
    def categorical(cls, logits: Optional[Tensor] = None, probs: Optional[Tensor] = None) -> "LatentMoments":
        """G independent one-hot groups of K categories from logits (preferred) or probs, (B, G, K).

        The latent vector is z.flatten(1) (group-major: column g*K + j is group g, category j).
        Coordinates of one group are dependent, so ``var`` holds only the marginal variances; the
        losses use the per-group contraction stage (docs/math.md), never per-coordinate cumulants."""
        if (logits is None) == (probs is None):
            raise ValueError("LatentMoments.categorical: give exactly one of logits or probs")
        if logits is None:
            _check_categorical_probs(probs)
            logits = torch.log(probs)
        if not isinstance(logits, Tensor) or logits.dim() != 3:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"LatentMoments.categorical: expected logits of shape (B, G, K), got {shape}")
        logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        p = torch.softmax(logits, dim=-1) if probs is None else probs
        return cls(p.flatten(1), (p * (1 - p)).flatten(1), family="categorical", params=(logits,))

    @classmethod
    def from_distribution(cls, dist: D.Distribution) -> "LatentMoments":
        """Cumulants of a supported ``torch.distributions`` object with batch shape (B, d)."""
        if isinstance(dist, D.Independent):
            base = dist.base_dist
            if not isinstance(base, D.Normal):
                raise TypeError(
                    "Independent distributions are supported only around Normal; got "
                    f"Independent({type(base).__name__}). Supported: {', '.join(SUPPORTED_DISTRIBUTIONS)}"
                )
            return cls.from_distribution(base)
        if isinstance(dist, D.Normal):
            loc, scale = torch.broadcast_tensors(dist.loc, dist.scale)
            return cls(loc, scale.square(), family="gaussian")
        if isinstance(dist, (D.OneHotCategorical, D.OneHotCategoricalStraightThrough)):
            if len(dist.batch_shape) != 2:
                raise ValueError(f"q: OneHotCategorical needs batch shape (B, G) and event shape (K,), "
                                 f"got batch shape {tuple(dist.batch_shape)}")
            base = dist._categorical
            if "logits" in base.__dict__ and (getattr(base, "_param", None) is base.__dict__["logits"]
                                              or "probs" not in base.__dict__):
                return cls.categorical(logits=base.logits)
            return cls.categorical(probs=base.probs)
        if isinstance(dist, D.Bernoulli):
            # Use the parameter the distribution was built with (torch keeps it as `_param`);
            # both may be cached (e.g. .sample() caches probs), and going through probs
            # loses p(1-p) at saturated logits.
            logits = dist.__dict__.get("logits")
            if logits is not None and (getattr(dist, "_param", None) is logits
                                       or "probs" not in dist.__dict__):
                return cls.bernoulli(logits=logits)
            return cls.bernoulli(probs=dist.probs)
        if isinstance(dist, D.Uniform):
            low, high = torch.broadcast_tensors(dist.low, dist.high)
            width = high - low
            return cls((low + high) / 2, width.square() / 12, None, -width.pow(4) / 120,
                       "uniform", (low, high))
        if isinstance(dist, D.Laplace):
            loc, scale = torch.broadcast_tensors(dist.loc, dist.scale)
            return cls(loc, 2 * scale.square(), None, 12 * scale.pow(4), "laplace", (loc, scale))
        if isinstance(dist, D.Poisson):
            rate = dist.rate
            return cls(rate, rate, rate, rate, "poisson", (rate,))
        if isinstance(dist, D.Gamma):
            shape, rate = torch.broadcast_tensors(dist.concentration, dist.rate)
            mean = shape / rate
            var = mean / rate
            k3 = 2 * var / rate
            return cls(mean, var, k3, 3 * k3 / rate, "gamma", (shape, rate))
        raise TypeError(
            f"q: unsupported distribution {type(dist).__name__}; supported families are "
            f"{', '.join(SUPPORTED_DISTRIBUTIONS)} (or pass LatentMoments directly)"
        )


def _check_probs(probs: Tensor) -> None:
    if values_checkable(probs) and not bool(((probs >= 0) & (probs <= 1)).all()):
        lo, hi = float(probs.min()), float(probs.max())
        raise ValueError(f"Bernoulli probs: expected values in [0, 1], got range [{lo:g}, {hi:g}]")


def _check_categorical_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 3:
        raise ValueError("LatentMoments.categorical: expected probs of shape (B, G, K)")
    if values_checkable(probs):
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise ValueError(f"categorical probs: expected values in [0, 1], got range "
                             f"[{float(probs.min()):g}, {float(probs.max()):g}]")
        worst = float((probs.sum(-1) - 1).abs().max())
        tol = 1e-3 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if worst > tol:
            raise ValueError(f"categorical probs: each group must sum to 1 over its K categories; "
                             f"the largest deviation is {worst:g}")


def values_checkable(t: Tensor) -> bool:
    """Value checks read data (a host sync); skip them while tracing for torch.compile."""
    return not torch.compiler.is_compiling() and t.device.type != "meta" and t.numel() > 0


def as_latent_moments(q) -> LatentMoments:
    """Accept LatentMoments or a supported torch.distributions object."""
    if isinstance(q, LatentMoments):
        return q
    if isinstance(q, D.Distribution):
        return LatentMoments.from_distribution(q)
    raise TypeError(
        f"q: expected LatentMoments or a torch.distributions object "
        f"({', '.join(SUPPORTED_DISTRIBUTIONS)}), got {type(q).__name__}"
    )


LOG_2PI = math.log(2 * math.pi)
