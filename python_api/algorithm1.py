"""Algorithm 1 of the paper and the loss of one training batch for every decoder.

Algorithm 1 as implemented (Section 4.2, Eq. 8). With ``epoch`` counted from 0,
``w_lin = max(0, 1 - epoch * anneal_rate)`` (so training starts at w_lin = 1.0 as the text
says) and ``w_nl = 1 - w_lin``. The encoder receives
``w_lin * grad(silent, linear head) + w_nl * grad(estimator, nonlinear decoder) + grad(KL)``,
while the linear head and the nonlinear decoder each receive the full gradient of their own
loss. This is Eq. 8 and the text ("each decoder trained"); the pseudo-code's weighted total
``w_lin L_lin + w_nl L_nl`` would also scale the decoders' own gradients and starve the
nonlinear decoder early, so it is not used. The weighting is applied with a gradient-scaling
identity on the encoder output. From the cut-off epoch on (1-based epoch ``cutoff_epoch``,
i.e. ``epoch + 1 >= cutoff_epoch``) the encoder is frozen (no gradient, eval mode) and only
the nonlinear decoder trains. With ``estimator="silent"`` in dual mode ("SG alone") the
encoder is driven by the linear head only (w_lin = 1 throughout) and the nonlinear decoder is
fitted on detached samples z ~ q (hard samples for Bernoulli latents). Separate AdamW
optimisers (betas 0.9, 0.95) for the encoder, the nonlinear decoder, the mu head and the
alpha head.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .config import TrainConfig
from .estimators import Noise, ReinforceBaseline, reconstruction
from .models import VAE
from .objectives import m1_reconstruction

__all__ = ["w_lin_at", "encoder_frozen_at", "scale_grad", "batch_loss"]


def w_lin_at(cfg: TrainConfig, epoch: int) -> float:
    """Eq. 8 weight of the silent gradient at 0-based ``epoch`` (1.0 outside dual mode)."""
    if cfg.decoder != "dual":
        return 1.0
    if cfg.estimator == "silent":
        return 1.0
    return max(0.0, 1.0 - epoch * cfg.anneal_rate)


def encoder_frozen_at(cfg: TrainConfig, epoch: int) -> bool:
    return cfg.cutoff_epoch is not None and epoch + 1 >= cfg.cutoff_epoch


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None


def scale_grad(x: Tensor, weight: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``weight`` (0 detaches, 1 is a no-op)."""
    if weight == 1.0:
        return x
    if weight == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, weight)


def batch_loss(cfg: TrainConfig, model: VAE, x: Tensor, noise: Noise, epoch: int, total: int,
               baseline: ReinforceBaseline, batch_mean_nll: Callable[[Tensor], float],
               check_encoder_output: Callable[[Tensor], None]) -> tuple[Tensor, dict]:
    """The surrogate loss of the rows ``x`` of a global batch of ``total`` images at 0-based
    ``epoch`` (their summed loss divided by ``total``) and per-image statistics (kl, nll, ...).

    ``noise`` draws the latent noise for the global batch; ``batch_mean_nll`` averages a
    per-image tensor over the global batch (the REINFORCE baseline needs it);
    ``check_encoder_output`` may raise on the encoder's outputs before they are used."""
    scale = 1.0 / total
    frozen = encoder_frozen_at(cfg, epoch)
    est_kw = dict(scale=scale, baseline=baseline, temperature=cfg.temperature,
                  straight_through=cfg.straight_through, samples=cfg.vl_samples,
                  batch_mean_nll=batch_mean_nll)
    if frozen:
        with torch.no_grad():
            params = model.encoder(x)
    else:
        params = model.encoder(x)
    check_encoder_output(params)
    post = model.posterior_of(params)
    kl = post.kl()
    loss = kl.sum() * scale if not frozen else torch.zeros((), device=x.device)
    stats = {"kl": kl.detach()}
    if cfg.decoder in ("linear", "nonlinear"):
        decoder = model.linear if cfg.decoder == "linear" else model.nonlinear
        if cfg.objective == "m1":   # companion objective (objectives.py): M1 decoder, KL encoder
            terms = m1_reconstruction(x, post, decoder, scale=scale)
            stats["m1"] = terms.m1
        else:
            terms = reconstruction(cfg.estimator, x, post, decoder, noise, **est_kw)
        return loss + terms.loss, {**stats, "nll": terms.nll}
    w_lin = w_lin_at(cfg, epoch)
    if not frozen:
        lin_post = model.posterior_of(scale_grad(params, w_lin))
        lin_nll = model.linear.nll(x, lin_post.moments(), reduction="none")
        loss = loss + lin_nll.sum() * scale
        stats["nll_linear"] = lin_nll.detach()
    nl_params = params if not frozen else params.detach()
    if cfg.estimator == "silent":
        nl_post = model.posterior_of(nl_params.detach())
        z = nl_post.hard_sample(noise.normal(nl_post.latent_dim) if cfg.latent == "gaussian"
                                else noise.uniform(nl_post.latent_dim))
        nll = model.nonlinear.sample_nll(x, z)
        return loss + nll.sum() * scale, {**stats, "nll": nll.detach()}
    nl_post = model.posterior_of(scale_grad(nl_params, 1.0 - w_lin))
    terms = reconstruction(cfg.estimator, x, nl_post, model.nonlinear, noise, **est_kw)
    return loss + terms.loss, {**stats, "nll": terms.nll}
