"""Fused Triton kernels of one-hot categorical latents (MATH.md §12), the Triton twin of
csrc/categorical.h + csrc/cpu_categorical.cpp (host launchers: ``triton_categorical_launch``).

z is G independent one-hot groups of NCAT categories, flattened group-major (column
g * NCAT + j of the weights is group g, category j). Per (sample n, pixel p, group g) the pair
(a_p.z_g, c_p.z_g) takes (A[p, gj], C[p, gj]) with probability pi_gj; its central moments,
summed over the groups, are the ten contractions of the mean-field stage (fixed head: only
ubar and Saa), and the per-pixel epilogues of ``triton_heads`` follow unchanged. The
log-variance head tilts each group instead: pi' = softmax(l_g - h_pg), K_g = log E[e^-h.z_g],
and the tilted mean and variance of a_p.z_g (``TiltedSums`` hm, S, T1, T2).

Kernels work on (BLOCK_B, BLOCK_P, BLOCK_C) register tiles of (sample, pixel, category) with
the categories of one group in a single masked constexpr block, and loop over the G groups:
no (B, k, G) or (B, k, G K) tensor is ever stored.

* forward, grid (batch tiles, pixel tiles): the sums over groups, the head's epilogue, one
  partial loss per sample and pixel tile ((num_pixel_tiles, B), summed by torch).
* backward, the same grid, one kernel: a first pass over the groups gives the sums and the
  head's coefficients d loss / d(contraction) times grad[n] (kept in registers); a second pass
  forms each group's gradient (``_group_grad``: the gradient of sum_j g_j contraction_j through
  one group, the logits' through the softmax projection; for the log-variance head the
  gradient of tilt_group, inline) and reduces it over the tile's pixels into per-pixel-tile partials of dlogits
  ((num_pixel_tiles, B, G K)) and over the tile's samples into per-batch-tile partials of
  dA / dsecond ((num_batch_tiles, k, G K)); torch sums the partials (deterministic, no
  atomics). dx is stored directly; dbias, dsecond_bias, dsigma2 as per-batch-tile column sums.
  The partials hold B k d (1 / BLOCK_P + 1 / BLOCK_B) elements (accumulation dtype), hence
  samples and pixels of about equal block size.

Heads (``HEAD``, autograd.HEADS): 3 fixed variance (sigma2), 0 learnable precision with the
paper's Taylor log term (second weight C), 2 log-variance (second weight H).

Numerics: the logits are normalised per group on the host (log_softmax in the accumulation
dtype: fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64); central moments are formed from
deviations from the group mean (no raw-moment cancellation), taken through the weight of the
group's mode where one category holds more than half the mass; the logits' gradient
pi_j (d f/d pi_j - E[d f/d pi]) is formed in centred form, (phi_j - E phi) + a'_j (g_u - E phi_a)
+ c'_j (g_v - E phi_c), and the tilt's pi' - pi at the mode as minus the other categories' sum.
So at saturated logits (+-40) every element of the logits' gradient (down to ~1e-35) keeps its
relative accuracy (measured against a 60-digit enumeration; the pure-torch reference loses it
there). The tilt uses the shifted logsumexp. Logits -inf (probability 0) give a zero gradient.
int64 offsets throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (HALF_LOG_2PI, contraction_zeros, load_tile, load_vec, offsets, partial_row,
                            store_x_and_bias_grads, tile_index)
from .triton_heads import head_pixel_grad, head_pixel_loss, tilted_pixel_coef, tilted_pixel_loss

__all__ = ["HEAD_FIXED", "HEAD_TAYLOR", "HEAD_LOGVAR"]

HEAD_TAYLOR, HEAD_LOGVAR, HEAD_FIXED = 0, 2, 3


# ---------------------------------------------------------------------- per-group math
@triton.jit
def _mode_centred(p3, mode, w3):
    """Mean and deviations of a weight over one group's law: p3 the probabilities, w3 the
    weights (3-D, categories on axis 2), ``mode`` where one category holds more than half the
    mass. Returns E[w] (2-D) and w - E[w] (3-D), both formed from w - w_mode, so that at
    saturated logits the mode's deviation (~ the other categories' tiny mass) keeps its
    relative accuracy."""
    ref = tl.sum(tl.where(mode, w3, 0.0), axis=2)
    dev = w3 - ref[:, :, None]
    shift = tl.sum(p3 * dev, axis=2)
    return ref + shift, dev - shift[:, :, None]


@triton.jit
def _central(p3, a3, c3, HAS_C: tl.constexpr, HIGHER: tl.constexpr):
    """Moments of one group per (sample, pixel): p3 (BB, 1, BC) the probabilities (0 on padded
    categories), a3 / c3 (1, BP, BC) the weights. Returns the means m10, m01, the deviations
    x = a - m10, y = c - m01 (3-D) and k20, k02, k11, k21, k12, k03, e22 = E[x^2 y^2],
    e04 = E[y^4] (zeros where HAS_C / HIGHER are off).

    The deviations go through the weight of the group's mode (``_mode_centred``):
    x_j = (a_j - a_mode) - E[a - a_mode], so that at saturated logits the logits' gradient built
    from them keeps its relative accuracy."""
    mode = p3 > 0.5                     # at most one category per group
    m10, xd = _mode_centred(p3, mode, a3)
    px = p3 * xd
    k20 = tl.sum(px * xd, axis=2)
    zero = tl.zeros_like(k20)
    m01 = zero
    k02 = zero
    k11 = zero
    k21 = zero
    k12 = zero
    k03 = zero
    e22 = zero
    e04 = zero
    yd = tl.zeros_like(xd)
    if HAS_C:
        m01, yd = _mode_centred(p3, mode, c3)
        py = p3 * yd
        k02 = tl.sum(py * yd, axis=2)
        k11 = tl.sum(px * yd, axis=2)
        if HIGHER:
            k21 = tl.sum(px * xd * yd, axis=2)
            k12 = tl.sum(px * yd * yd, axis=2)
            k03 = tl.sum(py * yd * yd, axis=2)
            e22 = tl.sum(px * xd * yd * yd, axis=2)
            e04 = tl.sum(py * yd * yd * yd, axis=2)
    return m10, m01, xd, yd, k20, k02, k11, k21, k12, k03, e22, e04


@triton.jit
def _group_grad(p3, xd, yd, k20, k02, k11, gu, gv, gsaa, gscc, gsac, gtacc, gtaac, gc3, gq, gc4,
                HAS_C: tl.constexpr):
    """Gradient of sum_j g_j contraction_j through one group (categorical.h: group_grad), the
    coefficients g (BB, BP) already scaled by grad[n]. With Phi the central part (the products
    k20 k02, k11^2, k02^2 of Q and C4 linearised into g20, g02, g11), returns per (n, p, j):
    d f / d logit_j = pi_j [(Phi_j - E Phi) + x_j (g_u - E Phi_a) + y_j (g_v - E Phi_c)],
    d f / d a_j = pi_j (g_u + Phi_a(j) - E Phi_a), d f / d c_j likewise."""
    g20 = gsaa[:, :, None]
    x2 = xd * xd
    phi = g20 * x2
    phi_a = 2.0 * g20 * xd
    phi_c = tl.zeros_like(xd)
    if HAS_C:
        g20 = (gsaa - gq * k02)[:, :, None]
        g02 = (gscc - gq * k20 - 6.0 * gc4 * k02)[:, :, None]
        g11 = (gsac - 4.0 * gq * k11)[:, :, None]
        gtacc3 = gtacc[:, :, None]
        gtaac3 = gtaac[:, :, None]
        gc33 = gc3[:, :, None]
        gq3 = gq[:, :, None]
        gc43 = gc4[:, :, None]
        y2 = yd * yd
        xy = xd * yd
        phi = (g20 * x2 + g02 * y2 + g11 * xy + gtacc3 * xd * y2 + gtaac3 * x2 * yd + gc33 * y2 * yd
               + gq3 * x2 * y2 + gc43 * y2 * y2)
        phi_a = 2.0 * g20 * xd + g11 * yd + gtacc3 * y2 + 2.0 * gtaac3 * xy + 2.0 * gq3 * xd * y2
        phi_c = (2.0 * g02 * yd + g11 * xd + 2.0 * gtacc3 * xy + gtaac3 * x2 + 3.0 * gc33 * y2
                 + 2.0 * gq3 * x2 * yd + 4.0 * gc43 * y2 * yd)
    e_phi = tl.sum(p3 * phi, axis=2)[:, :, None]
    e_pa = tl.sum(p3 * phi_a, axis=2)[:, :, None]
    e_pc = tl.sum(p3 * phi_c, axis=2)[:, :, None]
    gu3 = gu[:, :, None]
    gv3 = gv[:, :, None]
    dlogit = p3 * ((phi - e_phi) + xd * (gu3 - e_pa) + yd * (gv3 - e_pc))
    da = p3 * (gu3 + phi_a - e_pa)
    dc = p3 * (gv3 + phi_c - e_pc)
    return dlogit, da, dc


@triton.jit
def _tilt(lp3, p3, a3, h3, cmask3):
    """One group tilted by exp(-h.z_g) (categorical.h: tilt_group): lp3 (BB, 1, BC) the
    normalised log-probabilities, p3 = exp(lp3) (0 on padded categories), a3 / h3 (1, BP, BC).
    Returns hm = E[h.z_g], log_mgf = log E[exp(-h.z_g)], mean / var of a.z_g under the tilted
    law, the tilted probabilities pt, the deviations a - mean, h - hm and pt - p (3-D). Like
    ``_central``, deviations go through the mode's weights (tilted mode for a, untilted for h)
    and pt - p through the other categories at the untilted mode, so the logits' gradient keeps
    its relative accuracy at saturated logits."""
    v = tl.where(cmask3, lp3 - h3, float("-inf"))
    shift = tl.max(v, axis=2)
    w = tl.exp(v - shift[:, :, None])
    norm = tl.sum(w, axis=2)
    pt = w / norm[:, :, None]
    a_ref = tl.sum(tl.where(pt > 0.5, a3, 0.0), axis=2)
    ad = a3 - a_ref[:, :, None]
    shift_a = tl.sum(pt * ad, axis=2)
    dev = ad - shift_a[:, :, None]
    mode = p3 > 0.5
    h_ref = tl.sum(tl.where(mode, h3, 0.0), axis=2)
    hd = h3 - h_ref[:, :, None]
    shift_h = tl.sum(p3 * hd, axis=2)
    # pt - p, with the untilted mode's entry as minus the sum of the others (they sum to 0)
    diff = pt - p3
    diff = tl.where(mode, -tl.sum(tl.where(mode, 0.0, diff), axis=2)[:, :, None], diff)
    var = tl.sum(pt * dev * dev, axis=2)
    return (h_ref + shift_h, shift + tl.log(norm), a_ref + shift_a, var, pt, dev,
            hd - shift_h[:, :, None], diff)


@triton.jit
def _load_group(lp_ptr, a_ptr, c_ptr, g, rows, pix, cat, NCAT, D, l_mask, w_mask, sak, sad, sck, scd,
                HAS_C: tl.constexpr, ACC: tl.constexpr):
    """Group g of a (sample, pixel) tile: its weight columns g * NCAT + cat, (BC,); the
    normalised log-probabilities lp (BB, BC) and probabilities p3 (BB, 1, BC), 0 on padded
    categories; the weights a3 and c3 (1, BP, BC) (c3 = a3 when HAS_C is off)."""
    cols = g * NCAT + cat
    lp = tl.load(lp_ptr + offsets(rows, cols, D, 1), mask=l_mask, other=0.0)
    p3 = tl.where(l_mask, tl.exp(lp), 0.0)[:, None, :]
    a3 = load_tile(a_ptr, pix, cols, sak, sad, w_mask, ACC)[None, :, :]
    c3 = a3
    if HAS_C:
        c3 = load_tile(c_ptr, pix, cols, sck, scd, w_mask, ACC)[None, :, :]
    return cols, lp, p3, a3, c3


# ---------------------------------------------------------------------------- kernel
@triton.jit
def categorical_kernel(x_ptr, lp_ptr, a_ptr, b_ptr, c_ptr, c0_ptr, s2_ptr, go_ptr,
                        loss_ptr, dx_ptr, dl_ptr, da_ptr, dc_ptr, dv_ptr,
                        B, P, G, NCAT, sxb, sxp, sak, sad, sb, sck, scd, sc0, ss2, sgo, vec_plane,
                        HEAD: tl.constexpr, HAS_C: tl.constexpr, TAYLOR: tl.constexpr,
                        LOGVAR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C0: tl.constexpr,
                        GRAD: tl.constexpr, NEED_X: tl.constexpr, NEED_L: tl.constexpr,
                        NEED_A: tl.constexpr, NEED_C: tl.constexpr, NEED_B: tl.constexpr,
                        NEED_C0: tl.constexpr, NEED_S2: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward (GRAD=False: partial losses (num_pixel_tiles, B)) or the whole backward
    (GRAD=True); see the module docstring. lp: (B, G NCAT) contiguous, accumulation dtype.
    HAS_C / TAYLOR / LOGVAR follow from HEAD (given by the launcher); vec_plane: the plane
    stride of the (3, num_batch_tiles, k) bias-gradient partials."""
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = tile_index(pid_b, BLOCK_B)
    pix = tile_index(pid_p, BLOCK_P)
    cat = tl.arange(0, BLOCK_C)
    rmask = rows < B
    pmask = pix < P
    cmask = cat < NCAT
    tile_mask = rmask[:, None] & pmask[None, :]
    l_mask = rmask[:, None] & cmask[None, :]
    w_mask = pmask[:, None] & cmask[None, :]
    cmask3 = cmask[None, None, :]
    D = G * NCAT

    # ------------------------------------------------ pass 1: the sums over the groups
    ubar, vbar, saa, scc, sac, tacc, taac, c3s, qs, c4s = contraction_zeros(BLOCK_B, BLOCK_P, ACC)
    for g in range(0, G):
        _cols, lp, p3, a3, c3 = _load_group(lp_ptr, a_ptr, c_ptr, g, rows, pix, cat, NCAT, D, l_mask, w_mask,
                                            sak, sad, sck, scd, HAS_C, ACC)
        if LOGVAR:
            hm, log_mgf, mean, var, _pt, _dev, _hd, _diff = _tilt(lp[:, None, :], p3, a3, c3, cmask3)
            vbar += hm        # hm = sum_g E[h.z_g]
            scc += log_mgf    # S = sum_g K_g
            ubar += mean      # T1 = sum_g tilted mean
            saa += var        # T2 = sum_g tilted variance
        else:
            m10, m01, _x, _y, k20, k02, k11, k21, k12, k03, e22, e04 = _central(p3, a3, c3, HAS_C, TAYLOR)
            ubar += m10
            saa += k20
            if HAS_C:
                vbar += m01
                scc += k02
                sac += k11
                if TAYLOR:
                    taac += k21
                    tacc += k12
                    c3s += k03
                    qs += e22 - k20 * k02 - 2.0 * k11 * k11
                    c4s += e04 - 3.0 * k02 * k02

    # ------------------------------------------------ epilogue
    x = load_tile(x_ptr, rows, pix, sxb, sxp, tile_mask, ACC)
    if HAS_BIAS:
        x -= load_vec(b_ptr, pix, sb, pmask, 0.0, ACC)[None, :]
    c0 = tl.zeros((BLOCK_P,), dtype=ACC)[None, :]
    if HAS_C0:
        c0 = load_vec(c0_ptr, pix, sc0, pmask, 0.0, ACC)[None, :]
    e = x - ubar            # x - b - ubar (fixed, Taylor); x - b - T1 (log-variance)
    s2 = tl.zeros((BLOCK_P,), dtype=ACC)[None, :] + 1.0
    if HEAD == 3:
        s2 = load_vec(s2_ptr, pix, ss2, pmask, 1.0, ACC)[None, :]
    if LOGVAR:
        scc = tl.where(tile_mask, scc, 0.0)    # keep exp(S - h0) finite on padded entries
    if not GRAD:
        if HEAD == 3:
            loss = 0.5 * (e * e + saa) / s2 + 0.5 * tl.log(s2) + HALF_LOG_2PI
        elif LOGVAR:
            loss = tilted_pixel_loss(e, c0, vbar, scc, saa)
        else:
            loss = head_pixel_loss(e, vbar + c0, saa, scc, sac, tacc, taac, c3s, qs, c4s, 0, True, True)
        loss = tl.where(tile_mask, loss, 0.0)
        tl.store(partial_row(loss_ptr, pid_p, B, rows), tl.sum(loss, axis=1), mask=rmask)
    else:
        go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)[:, None]
        zero = tl.zeros((BLOCK_B, BLOCK_P), dtype=ACC)
        gu, gv, gsaa, gscc, gsac, gtacc, gtaac, gc3, gq, gc4 = contraction_zeros(BLOCK_B, BLOCK_P, ACC)
        gs2 = zero
        if HEAD == 3:
            inv = 1.0 / s2
            gu = -e * inv
            gsaa = 0.5 * inv + zero
            gs2 = 0.5 * inv * (1.0 - (e * e + saa) * inv)
        elif LOGVAR:
            # (hm, S, T1, T2) coefficients in (gv, gscc, gu, gsaa)
            gscc, gu, gsaa = tilted_pixel_coef(e, c0, scc, saa)
            gv = zero + 0.5
        else:
            gu, gv, gsaa, gscc, gsac, gtacc, gtaac, gc3, gc4 = head_pixel_grad(
                e, vbar + c0, saa, scc, sac, tacc, taac, c3s, c4s, 0, True, True)
            gq = zero + 0.5
        gu = tl.where(tile_mask, go * gu, 0.0)
        gv = tl.where(tile_mask, go * gv, 0.0)
        gsaa = tl.where(tile_mask, go * gsaa, 0.0)
        gscc = tl.where(tile_mask, go * gscc, 0.0)
        gsac = tl.where(tile_mask, go * gsac, 0.0)
        gtacc = tl.where(tile_mask, go * gtacc, 0.0)
        gtaac = tl.where(tile_mask, go * gtaac, 0.0)
        gc3 = tl.where(tile_mask, go * gc3, 0.0)
        gq = tl.where(tile_mask, go * gq, 0.0)
        gc4 = tl.where(tile_mask, go * gc4, 0.0)
        # bias, second bias, sigma2: planes 0, 1, 2 of the (3, num_batch_tiles, P) partials
        store_x_and_bias_grads(dx_ptr, dv_ptr, gu, pid_b, rows, pix, P, tile_mask, pmask, NEED_X, NEED_B)
        vec_base = dv_ptr + pid_b.to(tl.int64) * P + pix
        if NEED_C0:
            if LOGVAR:
                tl.store(vec_base + vec_plane, tl.sum(gv - gscc, axis=0), mask=pmask)
            else:
                tl.store(vec_base + vec_plane, tl.sum(gv, axis=0), mask=pmask)
        if NEED_S2:
            gs2 = tl.where(tile_mask, go * gs2, 0.0)
            tl.store(vec_base + 2 * vec_plane, tl.sum(gs2, axis=0), mask=pmask)

        # -------------------------------------------- pass 2: the gradient of each group
        if NEED_L or NEED_A or NEED_C:
            dl_base = dl_ptr + pid_p.to(tl.int64) * B * D
            dw_base = pid_b.to(tl.int64) * P * D
            for g in range(0, G):
                cols, lp, p3, a3, c3 = _load_group(lp_ptr, a_ptr, c_ptr, g, rows, pix, cat, NCAT, D, l_mask,
                                                   w_mask, sak, sad, sck, scd, HAS_C, ACC)
                if LOGVAR:
                    _hm, _lm, _mean, var, pt, dev, hd, diff = _tilt(lp[:, None, :], p3, a3, c3, cmask3)
                    g_s = gscc[:, :, None]
                    g_1 = gu[:, :, None]
                    g_2 = gsaa[:, :, None]
                    g_hm = gv[:, :, None]
                    central = pt * (g_1 * dev + g_2 * (dev * dev - var[:, :, None]))
                    dlogit = g_hm * p3 * hd + g_s * diff + central
                    da = pt * (g_1 + 2.0 * g_2 * dev)
                    dc = g_hm * p3 - g_s * pt - central
                else:
                    m10, m01, xd, yd, k20, k02, k11, _k21, _k12, _k03, _e22, _e04 = _central(
                        p3, a3, c3, HAS_C, False)
                    dlogit, da, dc = _group_grad(p3, xd, yd, k20, k02, k11, gu, gv, gsaa, gscc, gsac,
                                                 gtacc, gtaac, gc3, gq, gc4, HAS_C)
                if NEED_L:
                    tl.store(dl_base + offsets(rows, cols, D, 1), tl.sum(dlogit, axis=1), mask=l_mask)
                if NEED_A:
                    tl.store(da_ptr + dw_base + offsets(pix, cols, D, 1), tl.sum(da, axis=0), mask=w_mask)
                if NEED_C:
                    tl.store(dc_ptr + dw_base + offsets(pix, cols, D, 1), tl.sum(dc, axis=0), mask=w_mask)
