"""The public functional API: ``analytic_nll``."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from . import backends
from ._checks import (BACKENDS, LOG_TERM_CHOICES, REDUCTIONS, check_choice, check_moments,
                      check_optional_bias, check_second_head, check_sigma2, check_tensor, check_x)
from .autograd import HEADS
from .families import check_domain
from .moments import LatentMoments, as_latent_moments

__all__ = ["analytic_nll"]


def analytic_nll(x: Tensor, q, weight: Tensor, bias: Optional[Tensor] = None, *,
                 sigma2: Union[float, Tensor, None] = None,
                 precision_weight: Optional[Tensor] = None,
                 precision_bias: Optional[Tensor] = None,
                 logvar_weight: Optional[Tensor] = None,
                 logvar_bias: Optional[Tensor] = None,
                 log_term: str = "auto",
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Expected negative log-likelihood -E_q[log p(x|z)] of a linear Gaussian decoder.

    Args:
        x: data, (B, k) or (B, *data_shape) (flattened to k = prod(data_shape)).
        q: the mean-field posterior: ``LatentMoments`` or a supported
            ``torch.distributions`` object with batch shape (B, d).
        weight: decoder mean weight A, (k, d) like ``nn.Linear(d, k).weight``.
        bias: decoder mean bias b, (k,) or None.
        sigma2: fixed-variance head (paper Eq. 3-4): the decoder variance, a positive
            float, a 0-dim tensor or a per-pixel (k,) tensor; learnable if it requires grad.
            Exact.
        precision_weight: learnable-precision head (Eq. 5-7): C, (k, d); the decoder
            precision (1/std) is v = C z + precision_bias.
        precision_bias: b', (k,) or None.
        logvar_weight: log-variance head: H, (k, d); the decoder variance is
            exp(H z + logvar_bias). Exact for every family with a moment generating function
            (Gaussian, Bernoulli, Uniform, Poisson; Laplace and Gamma where it exists).
        logvar_bias: h0, (k,) or None.
        log_term: how the precision head takes E[log v^2]: "exact" (Gaussian latents only),
            "taylor" (the paper's second-order expansion: an approximation, any family), or
            "auto" (exact for Gaussian latents, Taylor otherwise).
        reduction: "none" -> (B,), "sum" -> (), "mean" -> () averaged over the batch.
        backend: "auto", "torch" (reference), "cpp", "triton" or "cuda".

    Returns:
        The loss in nats (summed over the k data dimensions, with the 0.5 log(2 pi)
        constants), reduced as asked. Exactly one of ``sigma2`` / ``precision_weight`` /
        ``logvar_weight`` must be given.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    check_choice("log_term", log_term, LOG_TERM_CHOICES)
    x = check_x(x)
    batch, k = x.shape
    q = as_latent_moments(q)
    dtype, device = x.dtype, x.device

    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor of shape (k, d), got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] != k:
        raise ValueError(
            f"weight: expected shape (k={k}, d) with k the number of data dimensions of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    latent_dim = weight.shape[1]
    if q.latent_dim != latent_dim:
        raise ValueError(
            f"q: latent dimension d={q.latent_dim} (q.mean shape {tuple(q.mean.shape)}) does not match "
            f"weight shape {tuple(weight.shape)} (d={latent_dim})"
        )
    if q.batch_size != batch:
        raise ValueError(
            f"q: batch size {q.batch_size} (q.mean shape {tuple(q.mean.shape)}) does not match "
            f"x batch size {batch} (x shape {tuple(x.shape)})"
        )
    check_tensor("weight", weight, (k, latent_dim), dtype, device)
    check_moments(q, batch, latent_dim, dtype, device)
    check_optional_bias("bias", bias, k, dtype, device)

    heads = {"sigma2": sigma2, "precision_weight": precision_weight, "logvar_weight": logvar_weight}
    given = [name for name, value in heads.items() if value is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one head: sigma2 (fixed variance), precision_weight (learnable precision) "
            f"or logvar_weight (log-variance); got {', '.join(given) if given else 'none'}"
        )
    for name, bias_of_head, head in (("precision_bias", precision_bias, "precision_weight"),
                                     ("logvar_bias", logvar_bias, "logvar_weight")):
        if bias_of_head is not None and heads[head] is None:
            raise ValueError(f"{name}: only valid together with {head}")
    if log_term != "auto" and precision_weight is None:
        raise ValueError(f"log_term: only the precision head (precision_weight) has a log term; "
                         f"got log_term={log_term!r} with {given[0]}")

    if q.family == "categorical":
        per_sample = _categorical(x, q, weight, bias, sigma2, precision_weight, precision_bias,
                                  logvar_weight, logvar_bias, log_term, backend, device)
    elif sigma2 is not None:
        sigma2 = check_sigma2(sigma2, k, dtype, device)
        impl = backends.resolve(backend, device, "fixed", "the fixed-variance head")
        per_sample = impl.kernels["fixed"](x, q.mean, q.var, weight, bias, sigma2)
    elif precision_weight is not None:
        check_second_head("precision_weight", precision_weight, "precision_bias", precision_bias,
                          weight, dtype, device)
        log_term = resolve_log_term(log_term, q)
        impl = backends.resolve(backend, device, "precision",
                                f"the precision head with the {log_term} log term")
        per_sample = impl.kernels["precision"](x, q.mean, q.var, q.k3, q.k4, weight, bias,
                                               precision_weight, precision_bias, HEADS[log_term])
    else:
        check_second_head("logvar_weight", logvar_weight, "logvar_bias", logvar_bias,
                          weight, dtype, device)
        per_sample = _logvar(x, q, weight, bias, logvar_weight, logvar_bias, backend, device)
    return _reduce(per_sample, reduction)


def _categorical(x, q: LatentMoments, weight, bias, sigma2, precision_weight, precision_bias,
                 logvar_weight, logvar_bias, log_term, backend, device) -> Tensor:
    """One-hot categorical latents: the per-group contraction stage, then the usual epilogues."""
    logits = q.param("logits")
    G, K = logits.shape[1:]
    if sigma2 is not None:
        sigma2 = check_sigma2(sigma2, x.shape[1], x.dtype, device)
        impl = backends.resolve(backend, device, "categorical_fixed", "the fixed-variance head with categorical latents")
        return impl.kernels["categorical_fixed"](x, logits, weight, bias, sigma2)
    if precision_weight is not None:
        check_second_head("precision_weight", precision_weight, "precision_bias", precision_bias,
                          weight, x.dtype, device)
        resolve_log_term(log_term, q)     # "exact" is refused: the precision is not Gaussian
        impl = backends.resolve(backend, device, "categorical_precision",
                                "the precision head with categorical latents")
        return impl.kernels["categorical_precision"](x, logits, weight, bias, precision_weight, precision_bias)
    check_second_head("logvar_weight", logvar_weight, "logvar_bias", logvar_bias, weight, x.dtype, device)
    impl = backends.resolve(backend, device, "categorical_logvar", "the log-variance head with categorical latents")
    return impl.kernels["categorical_logvar"](x, logits, weight, bias, logvar_weight, logvar_bias)


def resolve_log_term(log_term: str, q: LatentMoments) -> str:
    """"auto" -> "exact" for Gaussian latents, else "taylor"; "exact" needs Gaussian latents."""
    if log_term == "auto":
        return "exact" if q.family == "gaussian" else "taylor"
    if log_term == "exact" and q.family != "gaussian":
        raise ValueError(
            f"log_term: 'exact' needs Gaussian latents (then the precision v = C z + b' is Gaussian "
            f"and E[log v^2] has a closed form); q is of family {q.family!r}. Use log_term='taylor' "
            "(the paper's approximation) or the log-variance head (logvar_weight), exact for it")
    return log_term


def _logvar(x, q: LatentMoments, weight, bias, logvar_weight, logvar_bias, backend, device) -> Tensor:
    what = f"the log-variance head with {q.family} latents"
    if q.family == "gaussian":   # tilting a Gaussian is GEMM-shaped: the mean-field stage
        impl = backends.resolve(backend, device, "precision", what)
        return impl.kernels["precision"](x, q.mean, q.var, None, None, weight, bias, logvar_weight,
                                         logvar_bias, HEADS["logvar"])
    check_domain(q, -logvar_weight)
    if q.family == "bernoulli":
        impl = backends.resolve(backend, device, "bernoulli_logvar", what)
        return impl.kernels["bernoulli_logvar"](x, q.param("logits"), weight, bias, logvar_weight,
                                                logvar_bias)
    impl = backends.resolve(backend, device, "tilted_logvar", what)
    return impl.kernels["tilted_logvar"](x, q, weight, bias, logvar_weight, logvar_bias)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean" and per_sample.shape[0] > 0:
        return per_sample.mean()   # one autograd node, not a sum and a division
    return per_sample.sum()   # an empty batch gives 0 rather than nan for "mean"
