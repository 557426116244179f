"""Fused Triton kernels of the log-variance head on Bernoulli latents (MATH.md §11) and their
launchers.

The tilted contraction is not GEMM-shaped: every (sample n, pixel p, latent i) triple needs
one exp and one log (s = l_i - h_pi, softplus(s), sigmoid(s)), reduced over i to

    hm = sum_i h_pi p_i, S = sum_i [softplus(s) - softplus(l_i)],
    T1 = sum_i a_pi sigmoid(s), T2 = sum_i a_pi^2 sigmoid(s) sigmoid(-s)

and l_np = 0.5 (log 2pi + hm + h0 + exp(S - h0) ((x - b - T1)^2 + T2)) (triton_heads).
Every kernel works on (BLOCK_B, BLOCK_K, BLOCK_D) register tiles of those triples and reduces
one axis in registers: no (B, k, d) tensor is ever stored.

* forward, grid (batch tiles, pixel tiles), loop over latents: the four sums, the epilogue,
  one partial loss per sample and pixel tile ((num_pixel_tiles, B), summed by torch).
* backward 1, the same kernel with GRAD=True: per (n, p) coefficients
  cS = 0.5 E R, c1 = -E r, c2 = 0.5 E (E = exp(S - h0), r = x - b - T1, R = r^2 + T2) times
  grad[n], stored once as (3, B, k) in the accumulation dtype; dx = -c1, and per-batch-tile
  partial column sums for the biases (dbias = c1, dh0 = grad/2 - cS).
* backward 2, grid (batch tiles, latent tiles), loop over pixels: with mu' = sigmoid(s),
  v' = mu'(1 - mu') and w = cS mu' + c1 a v' + c2 a^2 v' (1 - 2 mu'),
  dlogits_i = sum_p [w - cS p_i + grad/2 h p_i (1 - p_i)] (cS (mu' - p_i) formed per triple).
* backward 3, grid (pixel tiles, latent tiles), loop over the batch:
  dH_pi = sum_n [-w + grad/2 p_i], dA_pi = sum_n [c1 mu' + 2 c2 a v'].

Cost: the forward is one pass of O(B k d) transcendental work; a full backward three (the
coefficients need a complete pass over d before any gradient can be formed, and the two
gradient kernels reduce over different axes; each is skipped when its gradients are not
needed). A Gaussian log-variance head is five GEMMs instead: this head is bounded by the
exp/log throughput, not by memory or FMA.

Stability: everything is formed from exp(-|s|) and exp(-|l|) (no overflow at saturated or
infinite logits), log(1 + e) by Goldberg's formula, and softplus(l - h) - softplus(l) without
rounding l - h where both are positive (triton_heads.bernoulli_tilt).
"""

from __future__ import annotations

from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (acc_dtypes, backward_outputs, block_config, block_range, cdiv, check_shapes,
                            launch, load_plane, load_tile, load_vec, offsets, opt, partial_row, plane,
                            program_tile, reduce_partials, store_out, store_x_and_bias_grads, tile_grid,
                            vec_stride, workspace)
from .triton_heads import (bernoulli_tilt, log1p_unit, tilted_mean_var, tilted_pixel_coef,
                           tilted_pixel_loss)

__all__ = ["bernoulli_logvar_forward", "bernoulli_logvar_backward", "GPU_CONFIGS", "MIN_BLOCK"]

# GPU blocks (BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages) per kernel and accumulator
# width; a program holds several BLOCK_B x BLOCK_K x BLOCK_D register tiles, so they are
# small. Chosen so that the sm_90 build needs no local memory; not timed (no GPU here).
GPU_CONFIGS = {
    4: {"fwd": (16, 16, 16, 4, 1), "logits": (16, 16, 16, 4, 1), "w": (16, 16, 16, 4, 1)},
    8: {"fwd": (8, 16, 8, 4, 1), "logits": (8, 16, 16, 8, 1), "w": (8, 16, 16, 8, 1)},
}
# No tl.dot here, so blocks may be smaller than 16 (the table's fp64 BLOCK_B is 8).
MIN_BLOCK = 4
# Interpreter: blocks sized to the problem, capped so that a 3-D tile stays ~16k elements.
_INTERP_MAX = (16, 64, 16)


@triton.jit
def _sigmoid_and_log1p(logit):
    """sigmoid(l) and log(1 + exp(-|l|)) of the (untilted) logits."""
    el = tl.exp(-tl.abs(logit))
    inv = 1.0 / (1.0 + el)
    return tl.where(logit >= 0.0, inv, el * inv), log1p_unit(el)


@triton.jit
def _fwd_kernel(x_ptr, l_ptr, a_ptr, b_ptr, h_ptr, h0_ptr, go_ptr,
                part_ptr, g_ptr, dx_ptr, db_ptr, dh0_ptr,
                B, K, D, sxb, sxk, slb, sld, sak, sad, sb, shk, shd, sh0, sgo, plane_stride,
                HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, GRAD: tl.constexpr,
                STORE_G: tl.constexpr, NEED_X: tl.constexpr, NEED_B: tl.constexpr,
                NEED_H0: tl.constexpr, ACC: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward (GRAD=False: per-tile partial losses) or backward coefficients (GRAD=True:
    (cS, c1, c2) times grad[n] into the (3, B, k) buffer, dx, bias partial sums)."""
    pid_b, pid_k, rows, pix, rmask, pmask = program_tile(B, K, BLOCK_B, BLOCK_K)
    hm = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    S = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    T1 = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    T2 = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        lat, dmask = block_range(d0, D, BLOCK_D)
        w_mask = pmask[:, None] & dmask[None, :]
        logit = load_tile(l_ptr, rows, lat, slb, sld, rmask[:, None] & dmask[None, :], ACC)
        h = load_tile(h_ptr, pix, lat, shk, shd, w_mask, ACC)
        a = load_tile(a_ptr, pix, lat, sak, sad, w_mask, ACC)
        p, lp = _sigmoid_and_log1p(logit)
        a3 = a[None, :, :]
        # padded latents (l = h = a = 0) add exactly 0; padded pixels / rows are masked below
        kt, mean, var = bernoulli_tilt(logit[:, None, :], h[None, :, :], lp[:, None, :])
        S += tl.sum(kt, axis=2)
        T1 += tl.sum(a3 * mean, axis=2)
        T2 += tl.sum(a3 * a3 * var, axis=2)
        if not GRAD:
            hm += tl.sum(h[None, :, :] * p[:, None, :], axis=2)

    tile_mask = rmask[:, None] & pmask[None, :]
    S = tl.where(tile_mask, S, 0.0)     # padded rows (l = 0) may have a large S: keep exp finite
    x = load_tile(x_ptr, rows, pix, sxb, sxk, tile_mask, ACC)
    if HAS_BIAS:
        x -= load_vec(b_ptr, pix, sb, pmask, 0.0, ACC)[None, :]
    resid = x - T1
    h0 = tl.zeros((BLOCK_K,), dtype=ACC)
    if HAS_H0:
        h0 = load_vec(h0_ptr, pix, sh0, pmask, 0.0, ACC)
    h0 = h0[None, :]
    if not GRAD:
        pixel = tl.where(tile_mask, tilted_pixel_loss(resid, h0, hm, S, T2), 0.0)
        tl.store(partial_row(part_ptr, pid_k, B, rows), tl.sum(pixel, axis=1), mask=rmask)
    else:
        go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)[:, None]
        c_s, c_1, c_2 = tilted_pixel_coef(resid, h0, S, T2)
        c_s = tl.where(tile_mask, go * c_s, 0.0)
        c_1 = tl.where(tile_mask, go * c_1, 0.0)
        store_x_and_bias_grads(dx_ptr, db_ptr, c_1, pid_b, rows, pix, K, tile_mask, pmask, NEED_X, NEED_B)
        if NEED_H0:
            dh0 = tl.where(tile_mask, 0.5 * go - c_s, 0.0)
            tl.store(partial_row(dh0_ptr, pid_b, K, pix), tl.sum(dh0, axis=0), mask=pmask)
        if STORE_G:
            g_offs = g_ptr + offsets(rows, pix, K, 1)
            tl.store(g_offs + plane(0, plane_stride), c_s, mask=tile_mask)
            tl.store(g_offs + plane(1, plane_stride), c_1, mask=tile_mask)
            tl.store(g_offs + plane(2, plane_stride), go * c_2, mask=tile_mask)


@triton.jit
def _tilted_w(c_s, c_1, c_2, a3, mean, var, one_m2):
    """w = d l / d s of one triple: cS mu' + c1 a v' + c2 a^2 v' (1 - 2 mu')."""
    return c_s * mean + (c_1 + c_2 * a3 * one_m2) * a3 * var


@triton.jit
def _logits_grad_kernel(g_ptr, l_ptr, a_ptr, h_ptr, go_ptr, dl_ptr,
                        B, K, D, slb, sld, sak, sad, shk, shd, sgo, plane_stride, ACC: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dlogits_i = sum_p [cS (mu' - p_i) + c1 a v' + c2 a^2 v' (1 - 2 mu')]
    + grad/2 p_i (1 - p_i) sum_p h_pi. cS (mu' - p_i) is formed per triple: summing cS mu' and
    p_i sum_p cS separately would cancel two sums much larger than their difference."""
    _pid_b, _pid_d, rows, lat, rmask, dmask = program_tile(B, D, BLOCK_B, BLOCK_D)
    out_mask = rmask[:, None] & dmask[None, :]
    logit = load_tile(l_ptr, rows, lat, slb, sld, out_mask, ACC)
    p, _log1p_el = _sigmoid_and_log1p(logit)
    l3 = logit[:, None, :]
    p3 = p[:, None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    h_sum = tl.zeros((BLOCK_D,), dtype=ACC)
    for p0 in range(0, K, BLOCK_K):
        pix, pmask = block_range(p0, K, BLOCK_K)
        w_mask = pmask[:, None] & dmask[None, :]
        g_mask = rmask[:, None] & pmask[None, :]
        h = load_tile(h_ptr, pix, lat, shk, shd, w_mask, ACC)
        a = load_tile(a_ptr, pix, lat, sak, sad, w_mask, ACC)
        g_offs = g_ptr + offsets(rows, pix, K, 1)
        c_s = load_plane(g_offs, 0, plane_stride, g_mask)
        c_1 = load_plane(g_offs, 1, plane_stride, g_mask)
        c_2 = load_plane(g_offs, 2, plane_stride, g_mask)
        mean, var, one_m2, _es = tilted_mean_var(l3 - h[None, :, :])
        w = _tilted_w(c_s[:, :, None], c_1[:, :, None], c_2[:, :, None], a[None, :, :], mean - p3, var,
                      one_m2)
        acc += tl.sum(w, axis=1)
        h_sum += tl.sum(h, axis=0)
    go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)
    acc += 0.5 * go[:, None] * p * (1.0 - p) * h_sum[None, :]
    store_out(dl_ptr + offsets(rows, lat, D, 1), acc, out_mask)


@triton.jit
def _weight_grad_kernel(g_ptr, l_ptr, a_ptr, h_ptr, go_ptr, da_ptr, dh_ptr,
                        B, K, D, slb, sld, sak, sad, shk, shd, sgo, plane_stride,
                        NEED_A: tl.constexpr, NEED_H: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dH_pi = sum_n [-w + grad/2 p_i], dA_pi = sum_n [c1 mu' + 2 c2 a v']."""
    _pid_k, _pid_d, pix, lat, pmask, dmask = program_tile(K, D, BLOCK_K, BLOCK_D)
    w_mask = pmask[:, None] & dmask[None, :]
    h = load_tile(h_ptr, pix, lat, shk, shd, w_mask, ACC)
    a = load_tile(a_ptr, pix, lat, sak, sad, w_mask, ACC)
    h3 = h[None, :, :]
    a3 = a[None, :, :]
    d_a = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    d_h = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    gp = tl.zeros((BLOCK_D,), dtype=ACC)
    for n0 in range(0, B, BLOCK_B):
        rows, rmask = block_range(n0, B, BLOCK_B)
        g_mask = rmask[:, None] & pmask[None, :]
        logit = load_tile(l_ptr, rows, lat, slb, sld, rmask[:, None] & dmask[None, :], ACC)
        g_offs = g_ptr + offsets(rows, pix, K, 1)
        c_1 = load_plane(g_offs, 1, plane_stride, g_mask)[:, :, None]
        c_2 = load_plane(g_offs, 2, plane_stride, g_mask)[:, :, None]
        mean, var, one_m2, _es = tilted_mean_var(logit[:, None, :] - h3)
        if NEED_H:
            c_s = load_plane(g_offs, 0, plane_stride, g_mask)[:, :, None]
            d_h -= tl.sum(_tilted_w(c_s, c_1, c_2, a3, mean, var, one_m2), axis=0)
            p, _log1p_el = _sigmoid_and_log1p(logit)
            go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)
            gp += tl.sum(go[:, None] * p, axis=0)
        if NEED_A:
            d_a += tl.sum(c_1 * mean + 2.0 * c_2 * a3 * var, axis=0)
    out_offs = offsets(pix, lat, D, 1)
    if NEED_A:
        store_out(da_ptr + out_offs, d_a, w_mask)
    if NEED_H:
        store_out(dh_ptr + out_offs, d_h + 0.5 * gp[None, :], w_mask)


# ------------------------------------------------------------------- host side
def _config(kernel: str, x: Tensor, D: int) -> dict:
    return block_config(GPU_CONFIGS, kernel, x.shape[0], x.shape[1], D, x.dtype, x.device,
                        lo=MIN_BLOCK, interp_max=_INTERP_MAX)


def _shapes(x, logits, weight, bias, logvar_weight, logvar_bias) -> tuple[int, int, int]:
    return check_shapes(x, (logits,), (weight, logvar_weight), (bias, logvar_bias))


def _launch_fwd(x, logits, weight, bias, hw, hb, *, grad=None, part=None, g=None, dx=None,
                db=None, dh0=None, cfg, acc_tl):
    B, K = x.shape
    D = weight.shape[1]
    launch(_fwd_kernel, tile_grid(cfg, B=B, K=K), x.device,
           x, logits, weight, opt(bias, x), hw, opt(hb, x), opt(grad, x),
           opt(part, x), opt(g, x), opt(dx, x), opt(db, x), opt(dh0, x),
           B, K, D, *x.stride(), *logits.stride(), *weight.stride(), vec_stride(bias),
           *hw.stride(), vec_stride(hb), vec_stride(grad), B * K,
           HAS_BIAS=bias is not None, HAS_H0=hb is not None, GRAD=grad is not None,
           STORE_G=g is not None, NEED_X=dx is not None, NEED_B=db is not None,
           NEED_H0=dh0 is not None, ACC=acc_tl, **cfg)


def bernoulli_logvar_forward(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                             logvar_weight: Tensor, logvar_bias: Optional[Tensor]) -> Tensor:
    """Per-sample NLL (B,) of the log-variance head on Bernoulli latents, in x's dtype."""
    B, K, D = _shapes(x, logits, weight, bias, logvar_weight, logvar_bias)
    if B == 0 or K == 0:
        return x.new_zeros(B)
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    cfg = _config("fwd", x, D)
    part = workspace((cdiv(K, cfg["BLOCK_K"]), B), acc_torch, x.device)
    _launch_fwd(x, logits, weight, bias, logvar_weight, logvar_bias, part=part, cfg=cfg, acc_tl=acc_tl)
    return part.sum(0).to(x.dtype)


def bernoulli_logvar_backward(grad: Tensor, x: Tensor, logits: Tensor, weight: Tensor,
                              bias: Optional[Tensor], logvar_weight: Tensor, logvar_bias: Optional[Tensor],
                              needs: Sequence[bool]) -> tuple[Tensor, ...]:
    """Gradients w.r.t. (x, logits, weight, bias, logvar_weight, logvar_bias); (0,) tensors
    where not needed."""
    B, K, D = _shapes(x, logits, weight, bias, logvar_weight, logvar_bias)
    need, outs = backward_outputs(grad, (x, logits, weight, bias, logvar_weight, logvar_bias), needs, B, K)
    if need is None:
        return tuple(outs)
    need_x, need_l, need_a, need_b, need_h, need_h0 = need
    dx, dl, da, db, dh, dh0 = outs
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    dev = x.device
    cfg = _config("fwd", x, D)
    n_b = cdiv(B, cfg["BLOCK_B"])
    store_g = (need_l or need_a or need_h) and D > 0
    g = workspace((3, B, K), acc_torch, dev, store_g)
    db_part = workspace((n_b, K), acc_torch, dev, need_b)
    dh0_part = workspace((n_b, K), acc_torch, dev, need_h0)
    _launch_fwd(x, logits, weight, bias, logvar_weight, logvar_bias, grad=grad, g=g,
                dx=dx if need_x else None, db=db_part, dh0=dh0_part, cfg=cfg, acc_tl=acc_tl)
    strides = (*logits.stride(), *weight.stride(), *logvar_weight.stride(), grad.stride(0), B * K)
    if need_l and D > 0:
        cfg_l = _config("logits", x, D)
        launch(_logits_grad_kernel, tile_grid(cfg_l, B=B, D=D), dev,
               g, logits, weight, logvar_weight, grad, dl, B, K, D, *strides, ACC=acc_tl, **cfg_l)
    if (need_a or need_h) and D > 0:
        cfg_w = _config("w", x, D)
        launch(_weight_grad_kernel, tile_grid(cfg_w, K=K, D=D), dev,
               g, logits, weight, logvar_weight, grad, opt(da if need_a else None, x),
               opt(dh if need_h else None, x), B, K, D, *strides,
               NEED_A=need_a, NEED_H=need_h, ACC=acc_tl, **cfg_w)
    reduce_partials(db, db_part)
    reduce_partials(dh0, dh0_part)
    return tuple(outs)
