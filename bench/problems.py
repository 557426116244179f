"""Benchmark problems: shapes, heads, latent families, and the tensors they need."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# precision: the paper's Taylor log term; precision-exact: the exact log term (Gaussian only);
# logvar: the log-variance head (exact).
HEADS = ("fixed", "precision", "precision-exact", "logvar")
LATENTS = ("gaussian", "bernoulli", "categorical")
SIGMA2 = 0.01  # the paper's fixed variance
CATEGORIES = 10  # categorical latents: K per one-hot group (G = d / K)


@dataclass(frozen=True)
class Problem:
    """One benchmark case. B batch, d latents, k pixels."""

    B: int
    d: int
    k: int
    head: str = "precision"
    latent: str = "bernoulli"
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        return f"B={self.B} d={self.d} k={self.k} {self.latent}/{self.head} {self.dtype}"

    @property
    def valid(self) -> bool:
        """The exact log term exists only for Gaussian latents."""
        return self.head != "precision-exact" or self.latent == "gaussian"

    @property
    def gemm_shaped(self) -> bool:
        """Whether the work is GEMMs of moments against weight products (MATH.md §2). The
        log-variance head on Bernoulli latents (tilting: an exp and a log per (sample, pixel,
        latent)) and categorical latents with a second head (per-group moments) are not; the
        fixed head on categorical latents is (its mean GEMM, and K x K matrices per group)."""
        if self.latent == "categorical":
            return self.head == "fixed"
        return not (self.head == "logvar" and self.latent == "bernoulli")

    @property
    def num_contractions(self) -> int:
        """GEMM-shaped contractions (B x d x k each) the forward pass needs (MATH.md §2-3); for
        the other cases the same count of B x d x k multiply-adds, as a yardstick."""
        if self.head == "fixed":
            return 1  # ubar only; the variance part is O(kd) + O(Bd)
        return 5 if self.latent == "gaussian" or self.head == "logvar" else 10

    def flops(self, mode: str) -> float:
        """Counted FLOPs: 2 B d k per contraction forward; backward does one moment-gradient
        and one weight-gradient GEMM per contraction."""
        gemm = 2.0 * self.B * self.d * self.k * self.num_contractions
        return {"forward": gemm, "backward": 2 * gemm, "forward+backward": 3 * gemm}[mode]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Inputs:
    """Leaf tensors: data x, encoder outputs (the 'encoder' is the identity on these leaves),
    and the decoder heads. Gradients are taken with respect to every leaf."""

    x: torch.Tensor
    encoder_out: tuple  # (mu, logvar) for Gaussian, (logits,) for Bernoulli, (logits (B, d),) for categorical
    weight: torch.Tensor
    bias: torch.Tensor
    precision_weight: torch.Tensor
    precision_bias: torch.Tensor

    def leaves(self, head: str) -> list:
        heads = [self.weight, self.bias]
        if head != "fixed":   # the second head's map: precision or log-variance
            heads += [self.precision_weight, self.precision_bias]
        return [*self.encoder_out, *heads]


def make_inputs(p: Problem, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=p.torch_dtype)

    def leaf(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g) * scale + shift).to(p.device, **kw)
        return t.requires_grad_(True)

    x = torch.rand(p.B, p.k, generator=g).to(p.device, **kw)
    if p.latent == "gaussian":
        encoder_out = (leaf(p.B, p.d), leaf(p.B, p.d, scale=0.3, shift=-1.0))
    else:
        encoder_out = (leaf(p.B, p.d, scale=2.0),)
    return Inputs(
        x=x,
        encoder_out=encoder_out,
        weight=leaf(p.k, p.d, scale=p.d ** -0.5),
        bias=leaf(p.k, scale=0.1),
        precision_weight=leaf(p.k, p.d, scale=0.1 * p.d ** -0.5),
        precision_bias=leaf(p.k, scale=0.1, shift=3.0),
    )
