"""Evaluation: BPD, MSE, KLD (MATH.md §9) and the gradient variance of Table 1.

Conventions:
- Data y in [0, 1): pixels (x + u) / 256 with u ~ U[0, 1) from a fixed-seed generator
  (``eval_dequant="noise"``, the same numbers at every evaluation) or u = 1/2
  (``"center"``).
- NLL_y: -E_q[log p(y|z)] in nats per image. For a linear head ``analytic_nll``, exact (so the
  BPD is a true bound) for the fixed, scalar and log-variance heads and for the precision head
  with Gaussian latents (evaluated with the exact log term whatever term it was trained with;
  ``nll_taylor`` / ``bpd_taylor`` then give the Taylor value it was trained on). A precision
  head on non-Gaussian latents has no closed form: ``nll`` is the Taylor approximation (not a
  bound) and ``nll_sampled`` / ``bpd_sampled`` a Monte Carlo estimate of the bound from
  ``eval_samples`` hard draws. For a nonlinear decoder a Monte Carlo average over
  ``eval_samples`` draws z ~ q (hard {0, 1} samples for Bernoulli latents: the relaxation is a
  training device only). ``bpd_kind`` says which: "exact", "taylor-approximation" or
  "monte-carlo".
- KLD: KL(q(z|x) || p(z)) in nats per image (``torch.distributions.kl_divergence``).
- entropy_sum / entropy_gap (linear head, Gaussian latents): the three-entropies sum of
  MATH.md §8 (``entropies.py``) and ELBO - sum, a sampling-free convergence diagnostic (zero
  at a stationary point of a learned-variance model; evaluated on these images).
- BPD = (NLL_y + KLD) / (k ln 2) + 8, k = C*H*W (MATH.md §6/§9: the corrected sign of the
  log 256 term: data in [0, 1) at 1/256 resolution adds 8 bits per dimension).
- MSE: per-image *sum* over pixels of (y - mean)^2, the decoder mean taken at z = E_q[z]
  (for a linear head exactly the posterior-predictive mean E_q[W z + b]). ``mse_expected``:
  the expected squared error E_q ||y - mean(z)||^2 (linear head: exact, from the fixed-variance
  loss at sigma2 = 1; nonlinear: over the ``eval_samples`` draws). The paper does not say which
  one its MSE is; the two differ by the posterior variance pushed through the decoder.
- floor_fraction (nonlinear decoder with learned variance): the fraction of pixels whose
  log-variance at z = E_q[z] is within 0.1 nats of the decoder's floor.
- Gradient variance (Table 1, Appendix B.3): a fixed batch (the first ``gradvar_batch``
  validation images with fixed dequantisation noise), one encoder forward pass, then
  ``draws`` (100) independent latent draws; for each, the gradient of the estimator's
  surrogate (batch-mean reconstruction loss) w.r.t. every encoder parameter. The per-parameter
  variance across draws (unbiased, n - 1) is summed over all encoder parameters. Deviations
  are taken from the first draw (shifted two-pass), so identical draws give exactly 0;
  ``bit_identical`` reports whether every draw's gradient equalled the first bit for bit.
  The encoder runs in eval mode (BatchNorm uses running statistics) and the model is not
  changed.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from .data import dequantize, dequantize_center
from .entropies import head_entropy_sum
from .estimators import VALID_ESTIMATORS, Noise, ReinforceBaseline, reconstruction
from .models import VAE

__all__ = ["evaluate", "importance_weighted_bound", "bits_per_dim", "eval_images", "encoder_gradients", "gradient_variance",
           "gradient_variance_table", "applicable_estimators", "EVAL_SEED_OFFSET"]

EVAL_SEED_OFFSET = 1_000_003


def bits_per_dim(nll_nats: Tensor | float, kl_nats: Tensor | float, k: int):
    """(NLL_y + KL) / (k ln 2) + 8 for data in [0, 1) at 1/256 resolution."""
    return (nll_nats + kl_nats) / (k * math.log(2)) + 8.0


def eval_images(images_u8: Tensor, dequant: str = "noise", seed: int = 0) -> Tensor:
    """Dequantised evaluation data: fixed-seed noise or bin centres."""
    if dequant == "center":
        return dequantize_center(images_u8)
    if dequant != "noise":
        raise ValueError(f"dequant: expected 'noise' or 'center', got {dequant!r}")
    return dequantize(images_u8, torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET))


class _Eval:
    """Restores the module's train/eval mode on exit."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [m.training for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.model.modules(), self.modes):
            m.training = mode


@torch.no_grad()
def evaluate(model: VAE, images_u8: Tensor, cfg, *, device=None, batch_size: Optional[int] = None,
             samples: Optional[int] = None, dequant: Optional[str] = None,
             seed: Optional[int] = None) -> dict:
    """Mean per-image metrics on ``images_u8`` (uint8 (N, C, H, W)): bpd, nll, kld, elbo,
    mse (and for the linear head of a dual model nll_linear / bpd_linear, exact wherever a closed
    form exists, with bpd_linear_kind; nll_linear_taylor / bpd_linear_taylor: the Taylor value a
    Taylor-trained Gaussian precision head was trained on)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = batch_size or cfg.eval_batch_size
    samples = samples or cfg.eval_samples
    dequant = dequant or cfg.eval_dequant
    seed = cfg.seed if seed is None else seed
    y_all = eval_images(images_u8, dequant, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 2 * EVAL_SEED_OFFSET)
    k = math.prod(images_u8.shape[1:])
    dec = model.inference_decoder
    analytic = dec is model.linear
    sums = {"nll": 0.0, "kld": 0.0, "mse": 0.0}
    if model.linear is not None and not analytic:
        sums["nll_linear"] = 0.0
    kind = "monte-carlo"
    linear_kind = None
    n = y_all.shape[0]
    with _Eval(model):
        for start in range(0, n, batch_size):
            y = y_all[start:start + batch_size].to(device)
            b = y.shape[0]
            post = model.posterior(y)
            kl = post.kl()
            q = post.moments()
            noise = Noise(gen, b, device=device, dtype=y.dtype)
            d = post.latent_dim
            draws = (lambda: noise.normal(d, samples) if post.latent == "gaussian"  # noqa: E731
                     else noise.uniform(d, samples))
            if analytic:
                nll = dec.nll(y, q, log_term="auto")        # exact wherever a closed form exists
                sq_err = dec.expected_sq_error(y, q)
                kind = "exact" if dec.is_exact(q, "auto") else "taylor-approximation"
                if dec.learned_precision and dec.log_term == "taylor" and kind == "exact":
                    sums["nll_taylor"] = sums.get("nll_taylor", 0.0) + float(dec.nll(y, q).double().sum())
                if kind != "exact":
                    sampled = dec.sample_nll(y, post.hard_sample(draws())).mean(0)
                    sums["nll_sampled"] = sums.get("nll_sampled", 0.0) + float(sampled.double().sum())
                # companion (entropies.py): the three-entropies sum, logged as ELBO - sum
                ent = head_entropy_sum(dec, q)
                if ent is not None:
                    sums["entropy_sum"] = sums.get("entropy_sum", 0.0) + float(ent.double().sum())
            else:
                nll, sq_err = (t.mean(0) for t in dec.sample_nll_and_sq_error(y, post.hard_sample(draws())))
                if "nll_linear" in sums:
                    lin = model.linear
                    sums["nll_linear"] += float(lin.nll(y, q, log_term="auto").double().sum())
                    linear_kind = "exact" if lin.is_exact(q, "auto") else "taylor-approximation"
                    if lin.learned_precision and lin.log_term == "taylor" and linear_kind == "exact":
                        sums["nll_linear_taylor"] = (sums.get("nll_linear_taylor", 0.0)
                                                     + float(lin.nll(y, q).double().sum()))
            mean, spread = dec(post.mean)
            mse = (y - mean).square().flatten(1).sum(1)
            if not analytic and dec.variance == "learned":
                sums["floor_fraction"] = sums.get("floor_fraction", 0.0) + float(dec.at_floor(spread).double().sum()) / k
            sums["mse_expected"] = sums.get("mse_expected", 0.0) + float(sq_err.double().sum())
            sums["nll"] += float(nll.double().sum())
            sums["kld"] += float(kl.double().sum())
            sums["mse"] += float(mse.double().sum())
    out = {key: v / n for key, v in sums.items()}
    out["elbo"] = -(out["nll"] + out["kld"])
    if "entropy_sum" in out:   # companion: MATH.md §8 gap (0 at a stationary point)
        out["entropy_gap"] = out["elbo"] - out["entropy_sum"]
    out["bpd"] = bits_per_dim(out["nll"], out["kld"], k)
    out["bpd_kind"] = kind
    for extra in ("linear", "linear_taylor", "taylor", "sampled"):
        if f"nll_{extra}" in out:
            out[f"bpd_{extra}"] = bits_per_dim(out[f"nll_{extra}"], out["kld"], k)
    if linear_kind is not None:
        out["bpd_linear_kind"] = linear_kind
    out["n"] = n
    return out


@torch.no_grad()
def importance_weighted_bound(model: VAE, images_u8: Tensor, cfg, *, samples: int = 100, device=None,
                              dequant: Optional[str] = None, seed: Optional[int] = None,
                              max_decoded: int = 5000) -> dict:
    """The importance-weighted bound (Burda et al., 2016) on log p(y) with ``samples`` draws
    z_s ~ q(z|y) per image (hard samples for discrete latents), y dequantised as in ``evaluate``:
    log p(y) >= E[log (1/S) sum_s p(y|z_s) p(z_s) / q(z_s|y)], tighter than the ELBO as S grows.
    Returns the mean ``nll`` (minus the bound, nats per image), its ``bpd``, ``samples`` and ``n``.
    At most ``max_decoded`` decoder evaluations are held in memory at once."""
    if samples < 1:
        raise ValueError(f"samples: expected at least 1, got {samples}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seed = cfg.seed if seed is None else seed
    y_all = eval_images(images_u8, dequant or cfg.eval_dequant, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 3 * EVAL_SEED_OFFSET)
    k = math.prod(images_u8.shape[1:])
    dec = model.inference_decoder
    batch = max(1, max_decoded // samples)
    total, n = 0.0, y_all.shape[0]
    with _Eval(model):
        for start in range(0, n, batch):
            y = y_all[start:start + batch].to(device)
            post = model.posterior(y)
            noise = Noise(gen, y.shape[0], device=device, dtype=y.dtype)
            u = noise.normal(post.latent_dim, samples) if post.latent == "gaussian" \
                else noise.uniform(post.latent_dim, samples)
            z = post.hard_sample(u)                                     # (S, b, d)
            log_w = -dec.sample_nll(y, z) + post.prior_log_prob(z) - post.log_prob(z)
            log_p = torch.logsumexp(log_w.double(), 0) - math.log(samples)
            total += float(log_p.sum())
    nll = -total / n
    return {"nll": nll, "bpd": bits_per_dim(nll, 0.0, k), "samples": samples, "n": n}


# ------------------------------------------------------------------ gradient variance

def applicable_estimators(model: VAE) -> tuple:
    """Estimators that can drive this model's encoder (silent needs the linear head)."""
    names = VALID_ESTIMATORS[model.latent]
    if model.linear is None:
        names = tuple(n for n in names if n != "silent")
    return names


def _decoder_for(model: VAE, estimator: str):
    if estimator == "silent":
        if model.linear is None:
            raise ValueError("the silent estimator needs a linear analytic head (decoder linear or dual)")
        return model.linear
    return model.nonlinear if model.nonlinear is not None else model.linear


def encoder_gradients(model: VAE, x: Tensor, estimator: str, cfg, *, draws: int = 100,
                      seed: int = 0, baseline: Optional[float] = None) -> Iterable[Tensor]:
    """Yield ``draws`` flattened encoder gradients (float32, in parameter order) of the
    estimator's surrogate on the fixed batch x, with a single encoder forward pass."""
    params = [p for p in model.encoder.parameters()]
    decoder = _decoder_for(model, estimator)
    device = x.device
    b = x.shape[0]
    kw = dict(scale=1.0 / b, temperature=cfg.temperature, straight_through=cfg.straight_through,
              samples=cfg.vl_samples)
    with _Eval(model), torch.enable_grad():
        out = model.encoder(x)
        if estimator == "reinforce":
            if baseline is None:   # no running average yet: one separate draw sets it
                pre = Noise(torch.Generator(device=device).manual_seed(seed + 1), b, device=device,
                            dtype=x.dtype)
                with torch.no_grad():
                    t = reconstruction("reinforce", x, model.posterior_of(out), decoder, pre,
                                       baseline=ReinforceBaseline(), **kw)
                baseline = float(t.nll.mean())
            kw["baseline"] = ReinforceBaseline(value=baseline)
        noise = Noise(torch.Generator(device=device).manual_seed(seed), b, device=device, dtype=x.dtype)
        for _ in range(draws):
            post = model.posterior_of(out)
            terms = reconstruction(estimator, x, post, decoder, noise, **kw)
            grads = torch.autograd.grad(terms.loss, params, retain_graph=True, allow_unused=True)
            yield torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                             for g, p in zip(grads, params)])


def gradient_variance(model: VAE, x: Tensor, estimator: str, cfg, *, draws: int = 100,
                      seed: int = 0, baseline: Optional[float] = None) -> dict:
    """Total (summed per-parameter) variance of the encoder gradient across ``draws``."""
    if draws < 2:
        raise ValueError("draws must be >= 2")
    ref = sum_d = sum_d2 = None
    identical = True
    n = 0
    for g in encoder_gradients(model, x, estimator, cfg, draws=draws, seed=seed, baseline=baseline):
        if ref is None:
            ref = g.clone()
            sum_d = torch.zeros_like(g, dtype=torch.float64)
            sum_d2 = torch.zeros_like(g, dtype=torch.float64)
        else:
            identical = identical and torch.equal(g, ref)
            d = g.double() - ref.double()
            sum_d += d
            sum_d2 += d * d
        n += 1
    var = ((sum_d2 - sum_d * sum_d / n) / (n - 1)).clamp_min(0.0)
    return {"total": float(var.sum()), "bit_identical": bool(identical), "draws": n,
            "n_params": int(ref.numel()), "batch": int(x.shape[0]),
            "grad_norm_first": float(ref.double().norm())}


def gradient_variance_table(model: VAE, images_u8: Tensor, cfg, *, estimators=None,
                            draws: Optional[int] = None, batch: Optional[int] = None,
                            seed: Optional[int] = None, baseline: Optional[float] = None,
                            device=None) -> dict:
    """``gradient_variance`` on the fixed evaluation batch for each estimator (default: all
    that apply to the model)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seed = cfg.seed if seed is None else seed
    batch = batch or cfg.gradvar_batch
    x = eval_images(images_u8[:batch], cfg.eval_dequant, seed).to(device)
    names = tuple(estimators) if estimators else applicable_estimators(model)
    return {name: gradient_variance(model, x, name, cfg, draws=draws or cfg.gradvar_draws,
                                    seed=seed + 7, baseline=baseline)
            for name in names}
