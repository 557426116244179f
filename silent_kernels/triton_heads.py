"""Per-pixel epilogues of the Triton kernels: the loss of one (sample, pixel) and its
derivatives with respect to what the contraction stage produced. The Triton twin of
csrc/epilogue.h (the same formulas and branch structure); the spec is
silent_kernels/reference.py.

Heads on the mean-field contractions (ubar, vbar, Saa, Scc, Sac and, for non-Gaussian
latents, Tacc, Taac, C3, Q, C4; MATH.md §2), chosen by the ``HEAD`` constexpr:

    0  learnable precision, the paper's Taylor log term (MATH.md §4)
    1  learnable precision, the exact E[log v^2] of a Gaussian v ~ N(vbar, Scc) (§10)
    2  log-variance head on Gaussian latents (§11), with C = H: vbar = H m + h0,
       Scc = H^2 k2, Sac = (A H) k2

and the tilted log-variance head of Bernoulli latents (§11: ``bernoulli_tilt``,
``tilted_pixel_*``), whose sums the fused kernel in ``triton_logvar`` accumulates.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .reference import PRECISION_SQ_FLOOR
from .special import ASYMPTOTIC_TERMS, SERIES_TERMS, EULER_GAMMA, EXACT_LOG_VAR_FLOOR, SERIES_LIMIT
from .triton_common import HALF_LOG_2PI

__all__ = ["expected_log_square", "head_pixel_loss", "head_pixel_grad", "log1p_unit",
           "bernoulli_tilt", "tilted_mean_var", "tilted_pixel_loss", "tilted_pixel_coef"]

_FLOOR = tl.constexpr(PRECISION_SQ_FLOOR)
_VAR_FLOOR = tl.constexpr(EXACT_LOG_VAR_FLOOR)
_SERIES_X2 = tl.constexpr(2.0 * SERIES_LIMIT * SERIES_LIMIT)   # x < limit  <=>  m^2 < this * s2
_N_SERIES = tl.constexpr(SERIES_TERMS)
_N_ASYMPTOTIC = tl.constexpr(ASYMPTOTIC_TERMS)
_LOG_CONST = tl.constexpr(EULER_GAMMA + 0.69314718055994530941723212145817657)  # gamma + log 2
_TWO_SQRT2 = tl.constexpr(2.0 * 1.41421356237309504880)


# ------------------------------------------------------------- exact log term (§10)
@triton.jit
def expected_log_square(m, s2):
    """E[log v^2] for v ~ N(m, s2) and its derivatives in m and s2, elementwise in float64.

    x = |m| / sqrt(2 s2) < 6: the Poisson-weighted series (positive terms)
        value = log s2 - gamma - log 2 + sum_n P_n h_n,  D(x) = x sum_n P_n / (2n+1),
        d/dm = 2 sqrt(2) sign(m) D(x) / sqrt(s2),  d/ds2 = (1 - 2 x D(x)) / s2;
    otherwise the asymptotic series, with r = s2 / m^2
        value = log m^2 - sum_{n>=1} (2n-1)!!/n r^n.
    Fixed term counts; both branches run on safe inputs and the result is selected, so no
    inf or nan of the branch not taken leaks out. s2 is floored at EXACT_LOG_VAR_FLOOR in the
    series (its derivative is then 0, like clamp_min's).
    """
    m = m.to(tl.float64)
    s2 = s2.to(tl.float64)
    floored = tl.maximum(s2, _VAR_FLOOR)
    m2 = m * m
    small = m2 < _SERIES_X2 * floored

    s2s = tl.where(small, floored, 1.0)
    x = tl.where(small, tl.abs(m), 0.0) / tl.sqrt(2.0 * s2s)
    x2 = x * x
    w = tl.exp(-x2)                      # P_0
    dsum = w                             # sum P_n / (2n+1)
    fsum = tl.zeros_like(w)              # sum P_n h_n
    h = tl.cast(0.0, tl.float64)         # h_n: one scalar per program (it does not depend on x)
    for n in range(1, _N_SERIES):
        nf = tl.cast(n, tl.float64)      # per-iteration scalars: no per-element division
        h += 2.0 / (2.0 * nf - 1.0)
        w = w * x2 * (1.0 / nf)
        dsum += w * (1.0 / (2.0 * nf + 1.0))
        fsum += w * h
    dawson = x * dsum
    near = tl.log(s2s) - _LOG_CONST + fsum
    near_dm = _TWO_SQRT2 * tl.where(m < 0.0, -dawson, dawson) / tl.sqrt(s2s)  # fp64 constant
    near_ds = tl.where(s2 < _VAR_FLOOR, 0.0, (1.0 - 2.0 * x * dawson) / s2s)

    m2l = tl.where(small, 1.0, m2)
    r = tl.where(small, 0.0, s2) / m2l
    term = tl.zeros_like(r) + 1.0        # (2n-1)!! r^(n-1)
    tail = r                             # sum (2n-1)!!/n r^n
    dtail = term                         # sum (2n-1)!! r^(n-1) = d tail / dr
    for n in range(2, _N_ASYMPTOTIC + 1):
        nf = tl.cast(n, tl.float64)
        term = term * r * (2.0 * nf - 1.0)
        tail += term * r * (1.0 / nf)
        dtail += term
    ml = tl.where(small, 1.0, m)
    far = tl.log(m2l) - tail
    far_dm = 2.0 / ml * (1.0 + r * dtail)
    far_ds = -dtail / m2l
    return (tl.where(small, near, far), tl.where(small, near_dm, far_dm),
            tl.where(small, near_ds, far_ds))


# ------------------------------------------------------ heads on the mean-field contractions
@triton.jit
def head_pixel_loss(e, vb, saa, scc, sac, tacc, taac, c3, q, c4, HEAD: tl.constexpr,
                    HAS_K3: tl.constexpr, HAS_K4: tl.constexpr):
    """Loss of each (sample, pixel); e = x - ubar. HEAD 1 and 2 need Gaussian latents
    (HAS_K3 = HAS_K4 = False)."""
    vb2 = vb * vb
    if HEAD == 2:
        r = e + sac
        loss = 0.5 * (vb + tl.exp(0.5 * scc - vb) * (r * r + saa)) + HALF_LOG_2PI
    else:
        e2v2 = e * e * (vb2 + scc) - 4.0 * e * vb * sac + vb2 * saa + saa * scc + 2.0 * sac * sac
        if HEAD == 1:
            log_sq, _, _ = expected_log_square(vb, scc)
            loss = 0.5 * e2v2 - 0.5 * log_sq.to(vb.dtype) + HALF_LOG_2PI
        else:
            # Taylor: l = 0.5 E[(x-u)^2 v^2] - 0.5 log M + V / (4 M^2) + 0.5 log 2pi
            v = 4.0 * vb2 * scc + 2.0 * scc * scc
            if HAS_K3:
                e2v2 += 2.0 * vb * taac - 2.0 * e * tacc
                v += 4.0 * vb * c3
            if HAS_K4:
                e2v2 += q
                v += c4
            mm = tl.maximum(vb2 + scc, _FLOOR)
            loss = 0.5 * e2v2 - 0.5 * tl.log(mm) + v / (4.0 * mm * mm) + HALF_LOG_2PI
    return loss


@triton.jit
def head_pixel_grad(e, vb, saa, scc, sac, tacc, taac, c3, c4, HEAD: tl.constexpr,
                    HAS_K3: tl.constexpr, HAS_K4: tl.constexpr):
    """d(pixel loss)/d(ubar, vbar, Saa, Scc, Sac, Tacc, Taac, C3, C4); d/dQ is 0.5 (Taylor
    head) and the last four are only meaningful with HAS_K3 / HAS_K4."""
    vb2 = vb * vb
    zero = tl.zeros_like(e)
    g_tacc = zero
    g_taac = zero
    g_c3 = zero
    g_c4 = zero
    if HEAD == 2:
        r = e + sac
        scale = tl.exp(0.5 * scc - vb)
        weighted = scale * (r * r + saa)
        g_u = -scale * r
        g_v = 0.5 - 0.5 * weighted
        g_saa = 0.5 * scale
        g_scc = 0.25 * weighted
        g_sac = scale * r
    else:
        m_raw = vb2 + scc
        g_u = -(e * m_raw - 2.0 * vb * sac)
        g_v = e * e * vb - 2.0 * e * sac + vb * saa
        g_saa = 0.5 * m_raw
        g_scc = 0.5 * (e * e + saa)
        g_sac = 2.0 * (sac - e * vb)
        if HEAD == 1:
            _, d_mean, d_var = expected_log_square(vb, scc)
            g_v -= 0.5 * d_mean.to(vb.dtype)
            g_scc -= 0.5 * d_var.to(vb.dtype)
        else:
            # Below the floor M is a constant: its partial derivatives are dropped (clamp_min).
            mm = tl.maximum(m_raw, _FLOOR)
            v = 4.0 * vb2 * scc + 2.0 * scc * scc
            if HAS_K3:
                v += 4.0 * vb * c3
            if HAS_K4:
                v += c4
            inv_m = 1.0 / mm
            dl_dv = 0.25 * inv_m * inv_m
            dl_dm = tl.where(m_raw < _FLOOR, 0.0, -0.5 * inv_m - 0.5 * v * inv_m * inv_m * inv_m)
            g_v += 2.0 * vb * dl_dm + dl_dv * (8.0 * vb * scc)
            g_scc += dl_dm + dl_dv * (4.0 * vb2 + 4.0 * scc)
            if HAS_K3:
                g_u += tacc
                g_v += taac + dl_dv * (4.0 * c3)
                g_tacc = -e
                g_taac = vb
                g_c3 = 4.0 * vb * dl_dv
            g_c4 = zero + dl_dv
    return g_u, g_v, g_saa, g_scc, g_sac, g_tacc, g_taac, g_c3, g_c4


# ---------------------------------------------- tilted log-variance head (Bernoulli latents)
@triton.jit
def log1p_unit(e):
    """log(1 + e) for 0 <= e <= 1, accurate to a few ulps also where 1 + e rounds to 1
    (Goldberg: log(u) e / (u - 1) with u = 1 + e)."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def tilted_mean_var(s):
    """sigmoid(s), sigmoid(s) sigmoid(-s) and 1 - 2 sigmoid(s), from exp(-|s|) only (no
    overflow at saturated or infinite s); also returns exp(-|s|)."""
    es = tl.exp(-tl.abs(s))
    inv = 1.0 / (1.0 + es)
    pos = s >= 0.0
    mean = tl.where(pos, inv, es * inv)
    one_m2 = (1.0 - es) * inv
    return mean, es * inv * inv, tl.where(pos, -one_m2, one_m2), es


@triton.jit
def bernoulli_tilt(logit, h, log1p_el):
    """Latent with logit l tilted by t = -h: K = softplus(l - h) - softplus(l), the tilted
    mean and variance. ``log1p_el`` = log(1 + exp(-|l|)). max(s, 0) - max(l, 0) is formed
    without the rounding of s = l - h where both are positive (it is -h exactly), so K keeps
    full relative accuracy at saturated logits."""
    s = logit - h
    mean, var, _, es = tilted_mean_var(s)
    relu = tl.where(s > 0.0, tl.where(logit > 0.0, -h, s), tl.where(logit > 0.0, -logit, 0.0))
    return relu + log1p_unit(es) - log1p_el, mean, var


@triton.jit
def tilted_pixel_loss(resid, h0, hm, S, T2):
    """l = 0.5 (log 2pi + hm + h0 + exp(S - h0) (r^2 + T2)), r = x - b - T1."""
    return 0.5 * (hm + h0 + tl.exp(S - h0) * (resid * resid + T2)) + HALF_LOG_2PI


@triton.jit
def tilted_pixel_coef(resid, h0, S, T2):
    """d l / d(S, T1, T2) = (0.5 E R, -E r, 0.5 E), E = exp(S - h0), R = r^2 + T2;
    d l/d hm = 1/2, d l/d b = d l/d T1, d l/d x = -d l/d T1, d l/d h0 = 1/2 - d l/d S."""
    scale = tl.exp(S - h0)
    return 0.5 * scale * (resid * resid + T2), -scale * resid, 0.5 * scale
