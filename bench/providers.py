"""What a user could run instead: each provider turns a Problem into forward/backward closures.

Providers:
    reference-eager     the pure-torch reference (backend="torch")
    reference-compiled  torch.compile of that reference
    cpp / triton / cuda the fused kernels, where this install and device have them
    mc-reparam-1        one reparameterised (Gaussian) or relaxed (binary Concrete) sample
                        through the same linear decoder, Gaussian log-likelihood
    gemm-limit          plain torch.matmul doing exactly the GEMM-shaped work of the
                        contractions (weight products stacked outside the timing)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from silent_kernels import LatentMoments, analytic_nll
from silent_kernels.backends import available

from .problems import CATEGORIES, SIGMA2, Inputs, Problem

PROVIDERS = ("reference-eager", "reference-compiled", "cpp", "triton", "cuda", "mc-reparam-1", "gemm-limit")
CONCRETE_TEMPERATURE = 0.5


@dataclass
class Runner:
    """forward() builds the loss (or the GEMM outputs); backward(out) differentiates it."""

    forward: Callable[[], object]
    backward: Callable[[object], None]


def _moments(p: Problem, inp: Inputs) -> LatentMoments:
    if p.latent == "gaussian":
        mu, logvar = inp.encoder_out
        return LatentMoments.gaussian(mu, logvar=logvar)
    if p.latent == "categorical":
        return LatentMoments.categorical(logits=inp.encoder_out[0].unflatten(-1, (-1, CATEGORIES)))
    return LatentMoments.bernoulli(logits=inp.encoder_out[0])


def _head_arguments(p: Problem, inp: Inputs) -> dict:
    if p.head == "fixed":
        return dict(sigma2=SIGMA2)
    if p.head == "logvar":   # the second head's leaves hold the log-variance map here
        return dict(logvar_weight=inp.precision_weight, logvar_bias=inp.precision_bias)
    return dict(precision_weight=inp.precision_weight, precision_bias=inp.precision_bias,
                log_term="exact" if p.head == "precision-exact" else "taylor")


def _analytic(p: Problem, inp: Inputs, backend: str) -> Callable[[], torch.Tensor]:
    def loss():
        return analytic_nll(inp.x, _moments(p, inp), inp.weight, inp.bias, backend=backend,
                            **_head_arguments(p, inp))

    return loss


def _autograd_runner(loss_fn: Callable[[], torch.Tensor]) -> Runner:
    return Runner(forward=loss_fn, backward=lambda out: out.backward())


def _mc_reparam_1(p: Problem, inp: Inputs) -> Callable[[], torch.Tensor]:
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def loss():
        if p.latent == "gaussian":
            mu, logvar = inp.encoder_out
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        elif p.latent == "categorical":   # Gumbel-Softmax per group of CATEGORIES
            logits = inp.encoder_out[0].unflatten(-1, (-1, CATEGORIES))
            u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
            z = torch.softmax((logits - torch.log(-torch.log(u))) / CONCRETE_TEMPERATURE, -1).flatten(-2)
        else:  # binary Concrete (Gumbel-Softmax for two classes)
            (logits,) = inp.encoder_out
            u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
            z = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / CONCRETE_TEMPERATURE)
        mean = F.linear(z, inp.weight, inp.bias)
        if p.head == "fixed":
            nll = 0.5 * (inp.x - mean).square() / SIGMA2 + 0.5 * math.log(SIGMA2) + half_log_2pi
        elif p.head == "logvar":
            s = F.linear(z, inp.precision_weight, inp.precision_bias)
            nll = 0.5 * ((inp.x - mean).square() * torch.exp(-s) + s) + half_log_2pi
        else:
            prec = F.linear(z, inp.precision_weight, inp.precision_bias)
            nll = 0.5 * (inp.x - mean).square() * prec.square() - 0.5 * torch.log(prec.square()) + half_log_2pi
        return nll.sum(-1).mean()

    return loss


def _gemm_limit(p: Problem, inp: Inputs) -> Runner:
    """The matmuls a perfect fusion still has to do: forward, one (B,d)x(d,n_j k) GEMM per
    moment group; backward, the moment-gradient (B,n_j k)x(n_j k,d) and weight-gradient
    (n_j k,B)x(B,d) GEMMs. Weight products and upstream coefficients are made outside."""
    with torch.no_grad():
        A, C = inp.weight.detach(), inp.precision_weight.detach()
        moments = [t.detach() for t in _moments(p, inp).tensors() if t is not None]
        if p.head == "logvar":         # Gaussian: the five contractions of the precision stage
            moments = moments[:2]
        if p.head == "fixed":
            groups = [(moments[0], A)]
        else:
            stacks = [torch.cat([A, C]), torch.cat([A * A, C * C, A * C])]
            if p.latent != "gaussian" and p.head != "logvar":
                stacks += [torch.cat([A * C * C, A * A * C, C ** 3]), torch.cat([(A * C) ** 2, C ** 4])]
            groups = list(zip(moments, stacks))
        coeffs = [torch.randn(p.B, w.shape[0], dtype=w.dtype, device=w.device) for _, w in groups]

    def forward():
        return [torch.matmul(m, w.t()) for m, w in groups]

    def backward(_):
        for (m, w), g in zip(groups, coeffs):
            torch.matmul(g, w)
            torch.matmul(g.t(), m)

    return Runner(forward, backward)


def prepare(name: str, p: Problem, inp: Inputs) -> tuple[Optional[Runner], str]:
    """A Runner for provider `name`, or (None, reason) when it cannot run here."""
    if name == "reference-eager":
        return _autograd_runner(_analytic(p, inp, "torch")), ""
    if name == "reference-compiled":
        fn = torch.compile(_analytic(p, inp, "torch"), dynamic=False)
        return _autograd_runner(fn), ""
    if name in ("cpp", "triton", "cuda"):
        if not available(name):
            return None, f"backend {name} not available"
        devices = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}[name]
        if p.device not in devices:
            return None, f"{name} does not run on {p.device}"
        return _autograd_runner(_analytic(p, inp, name)), ""
    if name == "mc-reparam-1":
        return _autograd_runner(_mc_reparam_1(p, inp)), ""
    if name == "gemm-limit":
        if not p.gemm_shaped:
            return None, "not GEMM-shaped (tilted or per-group contractions): no GEMM floor"
        return _gemm_limit(p, inp), ""
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
