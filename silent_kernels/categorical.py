"""The contraction stage of one-hot categorical latents (MATH.md §12; docs/math.md §4-5).

z is G independent one-hot groups of K categories, flattened group-major (column g*K + j of
the weights is group g, category j). Within a group the coordinates are dependent, but groups are
independent, so the joint cumulants of (a.z, c.z) are sums over groups of the cumulants of the
per-group pair (a_p.z_g, c_p.z_g), a discrete 2-D variable taking (A[p,g,j], C[p,g,j]) with
probability pi_gj. The sums are exactly the ten contractions of the mean-field stage, so every
head's epilogue is reused unchanged.

The reference computes central moments directly (deviations from the group mean, then
probability-weighted sums): no cancellation of raw moments. Work and memory are O(B k G K) per
pixel chunk; chunks bound the memory.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import Contractions, LogvarTerms, fixed_pixel_nll, logvar_pixel_nll, precision_pixel_nll

__all__ = ["categorical_contractions", "categorical_logvar_terms", "categorical_fixed_nll",
           "categorical_precision_nll", "categorical_logvar_nll"]

_MAX_ELEMENTS = 1 << 22   # (sample, pixel, group, category) elements built at a time


def _chunks(k: int, per_pixel: int):
    rows = max(1, _MAX_ELEMENTS // max(1, per_pixel))
    for p0 in range(0, k, rows):
        yield slice(p0, p0 + rows)


def _bias(bias: Optional[Tensor], sl: slice):
    return 0 if bias is None else bias[sl]


def categorical_contractions(probs: Tensor, weight: Tensor, bias: Optional[Tensor],
                             second_weight: Optional[Tensor] = None, second_bias: Optional[Tensor] = None,
                             higher: bool = True) -> Contractions:
    """The ten contractions (each (B, k)) for probabilities ``probs`` (B, G, K) and weights
    (k, G*K). ``second_weight`` None: only ubar and Saa (the fixed head); ``higher`` False: no
    third- and fourth-order terms."""
    B, G, K = probs.shape
    k = weight.shape[0]
    pi = probs.unsqueeze(1)                                            # (B, 1, G, K)
    fields = {name: [] for name in Contractions._fields}
    for sl in _chunks(k, B * G * K):
        A = weight[sl].reshape(1, -1, G, K)
        ma = (pi * A).sum(-1, keepdim=True)                            # (B, kc, G, 1)
        da = A - ma                                                    # deviations a'
        fields["ubar"].append(ma.squeeze(-1).sum(-1) + _bias(bias, sl))
        fields["Saa"].append((pi * da * da).sum((-1, -2)))
        if second_weight is None:
            continue
        C = second_weight[sl].reshape(1, -1, G, K)
        mc = (pi * C).sum(-1, keepdim=True)
        dc = C - mc
        k20, k02, k11 = (pi * da * da).sum(-1), (pi * dc * dc).sum(-1), (pi * da * dc).sum(-1)
        fields["vbar"].append(mc.squeeze(-1).sum(-1) + _bias(second_bias, sl))
        fields["Scc"].append(k02.sum(-1))
        fields["Sac"].append(k11.sum(-1))
        if higher:
            fields["Tacc"].append((pi * da * dc * dc).sum((-1, -2)))
            fields["Taac"].append((pi * da * da * dc).sum((-1, -2)))
            fields["C3"].append((pi * dc ** 3).sum((-1, -2)))
            fields["Q"].append(((pi * da * da * dc * dc).sum(-1) - k20 * k02 - 2 * k11 * k11).sum(-1))
            fields["C4"].append(((pi * dc ** 4).sum(-1) - 3 * k02 * k02).sum(-1))
    out = {name: torch.cat(parts, dim=-1) for name, parts in fields.items() if parts}
    zero = torch.zeros_like(out["ubar"])
    return Contractions(**{name: out.get(name, zero) for name in Contractions._fields})


def categorical_logvar_terms(logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                             logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> LogvarTerms:
    """What the log-variance epilogue needs, exactly, by tilting each group (MATH.md §12):
    K_g = logsumexp(l_g - h_pg) - logsumexp(l_g), pi' = softmax(l_g - h_pg), then the tilted
    mean and variance of a_p.z_g under pi'."""
    B, G, K = logits.shape
    k = weight.shape[0]
    log_pi = torch.log_softmax(logits, dim=-1).unsqueeze(1)           # (B, 1, G, K)
    pi = log_pi.exp()
    fields = {name: [] for name in LogvarTerms._fields}
    for sl in _chunks(k, B * G * K):
        A = weight[sl].reshape(1, -1, G, K)
        H = logvar_weight[sl].reshape(1, -1, G, K)
        tilted = log_pi - H
        log_mgf = torch.logsumexp(tilted, dim=-1)                       # (B, kc, G)
        pi_t = torch.softmax(tilted, dim=-1)
        mean_a = (pi_t * A).sum(-1, keepdim=True)
        h0 = _bias(logvar_bias, sl)
        fields["mean_logvar"].append((pi * H).sum((-1, -2)) + h0)
        fields["log_scale"].append(log_mgf.sum(-1) - h0)
        fields["tilted_mean"].append(mean_a.squeeze(-1).sum(-1) + _bias(bias, sl))
        fields["tilted_var"].append((pi_t * (A - mean_a).square()).sum((-1, -2)))
    return LogvarTerms(**{name: torch.cat(parts, dim=-1) for name, parts in fields.items()})


def categorical_fixed_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                          sigma2: Tensor) -> Tensor:
    """Fixed-variance head (B,), exact: logits (B, G, K), weight (k, G*K), sigma2 (k,)."""
    c = categorical_contractions(torch.softmax(logits, -1), weight, bias)
    return fixed_pixel_nll(x, c.ubar, c.Saa, sigma2).sum(-1)


def categorical_precision_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                              precision_weight: Tensor, precision_bias: Optional[Tensor]) -> Tensor:
    """Learnable-precision head (B,): exact data term, the paper's Taylor log term (an
    approximation: the precision of categorical latents is not Gaussian)."""
    c = categorical_contractions(torch.softmax(logits, -1), weight, bias, precision_weight, precision_bias)
    return precision_pixel_nll(x, c, "taylor").sum(-1)


def categorical_logvar_nll(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                           logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> Tensor:
    """Log-variance head (B,), exact by per-group tilting."""
    t = categorical_logvar_terms(logits, weight, bias, logvar_weight, logvar_bias)
    return logvar_pixel_nll(x, t).sum(-1)
