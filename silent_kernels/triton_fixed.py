"""Triton kernels of the fixed-variance head (MATH.md §3, §5) and their launchers.

Forward: grid (batch tiles, pixel tiles); a program owns a BLOCK_B x BLOCK_K tile of
(sample, pixel) pairs and loops over the latents in BLOCK_D steps. Only ubar = m A^T + b is a
GEMM (``tl.dot``, ieee). The variance part is sum_p Saa_p / (2 sigma_p^2) = sum_i k2_i w_i with
w_i = sum_p A_pi^2 / (2 sigma_p^2): each program forms w over its own pixel tile
(O(BLOCK_K * BLOCK_D) per d step) and contracts it with its k2 rows: O(kd) per batch tile plus
O(Bd) per pixel tile in total, no second GEMM. Each program writes one partial sum per sample
into a (num_pixel_tiles, B) buffer that torch sums (deterministic, no atomics).

Backward: a coefficient kernel recomputes ubar and stores g_u = -grad[n] (x - ubar) / sigma2
(B, k) in the accumulation dtype (saving it in forward would cost memory in every forward,
also when no backward follows), writes dx and per-batch-tile partial column sums for the bias
and sigma2. g_Saa = grad[n] / (2 sigma_p^2) is rank one, so dk2 = grad[n] w_i and the Saa parts
of dA and dsigma2 use r_i = sum_n grad[n] k2_ni (O(kd) + O(Bd)); the GEMMs are dm = g_u A
(moment kernel, grid (batch tiles, latent tiles)) and dA = g_u^T m (weight kernel, grid (pixel
tiles, latent tiles)). Gradients whose ``needs`` flag is false are compiled out.
"""

from __future__ import annotations

from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (HALF_LOG_2PI, acc_dtypes, backward_outputs, block_config, block_range,
                            check_shapes, launch, load_tile, load_vec, offsets, opt, partial_row,
                            program_tile, reduce_partials, store_out, store_x_and_bias_grads, tile_grid,
                            vec_stride, workspace)

__all__ = ["fixed_forward", "fixed_backward", "GPU_CONFIGS"]

# GPU blocks (BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages) per accumulator width: the
# largest tiles whose sm_90 build needs no local memory (`cuobjdump -res-usage`).
GPU_CONFIGS = {4: {"fixed": (64, 64, 32, 8, 1)}, 8: {"fixed": (32, 64, 32, 8, 1)}}


def _config(B: int, K: int, D: int, x: Tensor) -> dict:
    return block_config(GPU_CONFIGS, "fixed", B, K, D, x.dtype, x.device)


@triton.jit
def _fixed_ubar(m_ptr, k2_ptr, a_ptr, b_ptr, rows, pix, rmask, pmask, half_inv_s2,
                D, smb, smd, svb, svd, sak, sad, sb,
                HAS_BIAS: tl.constexpr, VAR: tl.constexpr, ACC: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """ubar = m A^T + b over a (rows, pix) tile, (BLOCK_B, BLOCK_K); with VAR also the variance
    part sum_i k2_i w_i, w_i = sum_{p in tile} A_pi^2 / (2 sigma_p^2), (BLOCK_B,) (else 0;
    k2_ptr, svb, svd and half_inv_s2 are then not used)."""
    ubar = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    var_part = tl.zeros((BLOCK_B,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        lat, dmask = block_range(d0, D, BLOCK_D)
        mom_mask = rmask[:, None] & dmask[None, :]
        # A^T tile (BLOCK_D, BLOCK_K)
        at = load_tile(a_ptr, lat, pix, sad, sak, dmask[:, None] & pmask[None, :], ACC)
        m = load_tile(m_ptr, rows, lat, smb, smd, mom_mask, ACC)
        ubar = tl.dot(m, at, ubar, input_precision="ieee")
        if VAR:
            # O(kd) + O(Bd) in total: w over the pixel tile, then k2 . w
            w = tl.sum(at * at * half_inv_s2[None, :], axis=1)
            k2 = load_tile(k2_ptr, rows, lat, svb, svd, mom_mask, ACC)
            var_part += tl.sum(k2 * w[None, :], axis=1)
    if HAS_BIAS:
        ubar += load_vec(b_ptr, pix, sb, pmask, 0.0, ACC)[None, :]
    return ubar, var_part


@triton.jit
def _fixed_fwd_kernel(x_ptr, m_ptr, k2_ptr, a_ptr, b_ptr, s2_ptr, part_ptr,
                      B, K, D,
                      sxb, sxk, smb, smd, svb, svd, sak, sad, sb, ss,
                      HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    _pid_b, pid_k, rows, pix, rmask, pmask = program_tile(B, K, BLOCK_B, BLOCK_K)
    s2 = load_vec(s2_ptr, pix, ss, pmask, 1.0, ACC)
    half_inv_s2 = 0.5 / s2
    ubar, var_part = _fixed_ubar(m_ptr, k2_ptr, a_ptr, b_ptr, rows, pix, rmask, pmask, half_inv_s2,
                                 D, smb, smd, svb, svd, sak, sad, sb,
                                 HAS_BIAS, True, ACC, BLOCK_B, BLOCK_K, BLOCK_D)
    tile_mask = rmask[:, None] & pmask[None, :]
    x = load_tile(x_ptr, rows, pix, sxb, sxk, tile_mask, ACC)
    e = x - ubar
    pixel = e * e * half_inv_s2[None, :] + (0.5 * tl.log(s2) + HALF_LOG_2PI)[None, :]
    pixel = tl.where(tile_mask, pixel, 0.0)
    part = tl.sum(pixel, axis=1) + var_part
    tl.store(partial_row(part_ptr, pid_k, B, rows), part, mask=rmask)


@triton.jit
def _fixed_coef_kernel(x_ptr, m_ptr, a_ptr, b_ptr, s2_ptr, go_ptr,
                       g_ptr, dx_ptr, db_ptr, ds_ptr,
                       B, K, D, sxb, sxk, smb, smd, sak, sad, sb, ss, sgo,
                       HAS_BIAS: tl.constexpr, STORE_G: tl.constexpr, NEED_X: tl.constexpr,
                       NEED_B: tl.constexpr, NEED_S: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """g_u = -grad[n] (x - ubar) / sigma2 (stored), dx = -g_u, per-batch-tile partial
    column sums of g_u (bias) and of grad[n] (1/(2 sigma2) - e^2 / (2 sigma2^2)) (sigma2)."""
    pid_b, _pid_k, rows, pix, rmask, pmask = program_tile(B, K, BLOCK_B, BLOCK_K)
    ubar, _var_part = _fixed_ubar(m_ptr, m_ptr, a_ptr, b_ptr, rows, pix, rmask, pmask, 0.0,
                                  D, smb, smd, smb, smd, sak, sad, sb,
                                  HAS_BIAS, False, ACC, BLOCK_B, BLOCK_K, BLOCK_D)
    tile_mask = rmask[:, None] & pmask[None, :]
    x = load_tile(x_ptr, rows, pix, sxb, sxk, tile_mask, ACC)
    inv_s2 = 1.0 / load_vec(s2_ptr, pix, ss, pmask, 1.0, ACC)
    go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)[:, None]
    e = x - ubar
    g_u = tl.where(tile_mask, -go * e * inv_s2[None, :], 0.0)
    if STORE_G:
        tl.store(g_ptr + offsets(rows, pix, K, 1), g_u, mask=tile_mask)
    store_x_and_bias_grads(dx_ptr, db_ptr, g_u, pid_b, rows, pix, K, tile_mask, pmask, NEED_X, NEED_B)
    if NEED_S:
        half_inv = 0.5 * inv_s2[None, :]
        ds = tl.where(tile_mask, go * half_inv * (1.0 - e * e * inv_s2[None, :]), 0.0)
        tl.store(partial_row(ds_ptr, pid_b, K, pix), tl.sum(ds, axis=0), mask=pmask)


@triton.jit
def _fixed_moment_grad_kernel(g_ptr, a_ptr, s2_ptr, go_ptr, dm_ptr, dv_ptr,
                              B, K, D, sak, sad, ss, sgo,
                              NEED_M: tl.constexpr, NEED_V: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dm = g_u A (GEMM); dk2[n, i] = grad[n] w_i, w_i = sum_p A_pi^2 / (2 sigma_p^2) (O(kd))."""
    _pid_b, _pid_d, rows, lat, rmask, dmask = program_tile(B, D, BLOCK_B, BLOCK_D)
    dm = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    w = tl.zeros((BLOCK_D,), dtype=ACC)
    for p0 in range(0, K, BLOCK_K):
        pix, pmask = block_range(p0, K, BLOCK_K)
        a = load_tile(a_ptr, pix, lat, sak, sad, pmask[:, None] & dmask[None, :], ACC)
        if NEED_M:
            g = load_tile(g_ptr, rows, pix, K, 1, rmask[:, None] & pmask[None, :], ACC)
            dm = tl.dot(g, a, dm, input_precision="ieee")
        if NEED_V:
            half_inv = 0.5 / load_vec(s2_ptr, pix, ss, pmask, 1.0, ACC)
            w += tl.sum(a * a * half_inv[:, None], axis=0)
    out_mask = rmask[:, None] & dmask[None, :]
    out_offs = offsets(rows, lat, D, 1)
    if NEED_M:
        store_out(dm_ptr + out_offs, dm, out_mask)
    if NEED_V:
        go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)
        store_out(dv_ptr + out_offs, go[:, None] * w[None, :], out_mask)


@triton.jit
def _fixed_weight_grad_kernel(g_ptr, m_ptr, k2_ptr, a_ptr, s2_ptr, go_ptr, da_ptr, ds_ptr,
                              B, K, D, smb, smd, svb, svd, sak, sad, ss, sgo,
                              NEED_A: tl.constexpr, NEED_S: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dA = g_u^T m + A r / sigma2 with r_i = sum_n grad[n] k2_ni; the Saa part of dsigma2,
    -sum_i A_pi^2 r_i / (2 sigma_p^4), as per-latent-tile partial sums."""
    _pid_k, pid_d, pix, lat, pmask, dmask = program_tile(K, D, BLOCK_K, BLOCK_D)
    xu = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    r = tl.zeros((BLOCK_D,), dtype=ACC)
    for n0 in range(0, B, BLOCK_B):
        rows, rmask = block_range(n0, B, BLOCK_B)
        mom_mask = rmask[:, None] & dmask[None, :]
        if NEED_A:
            gt = load_tile(g_ptr, pix, rows, 1, K, pmask[:, None] & rmask[None, :], ACC)
            m = load_tile(m_ptr, rows, lat, smb, smd, mom_mask, ACC)
            xu = tl.dot(gt, m, xu, input_precision="ieee")
        go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)
        k2 = load_tile(k2_ptr, rows, lat, svb, svd, mom_mask, ACC)
        r += tl.sum(go[:, None] * k2, axis=0)
    w_mask = pmask[:, None] & dmask[None, :]
    a = load_tile(a_ptr, pix, lat, sak, sad, w_mask, ACC)
    inv_s2 = 1.0 / load_vec(s2_ptr, pix, ss, pmask, 1.0, ACC)
    if NEED_A:
        store_out(da_ptr + offsets(pix, lat, D, 1), xu + a * r[None, :] * inv_s2[:, None], w_mask)
    if NEED_S:
        part = -0.5 * inv_s2 * inv_s2 * tl.sum(a * a * r[None, :], axis=1)
        tl.store(partial_row(ds_ptr, pid_d, K, pix), part, mask=pmask)


def fixed_forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                  sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance NLL (B,), in x's dtype."""
    B, K, D = check_shapes(x, (mean, var), (weight,), (bias, sigma2))
    if B == 0 or K == 0:
        return x.new_zeros(B)
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    cfg = _config(B, K, D, x)
    n_b, n_k = tile_grid(cfg, B=B, K=K)
    part = workspace((n_k, B), acc_torch, x.device)
    launch(_fixed_fwd_kernel, (n_b, n_k), x.device,
           x, mean, var, weight, opt(bias, x), sigma2, part,
           B, K, D, *x.stride(), *mean.stride(), *var.stride(), *weight.stride(),
           vec_stride(bias), sigma2.stride(0),
           HAS_BIAS=bias is not None, ACC=acc_tl, **cfg)
    return part.sum(0).to(x.dtype)


def fixed_backward(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor,
                   bias: Optional[Tensor], sigma2: Tensor, needs: Sequence[bool]) -> tuple[Tensor, ...]:
    """Gradients w.r.t. (x, mean, var, weight, bias, sigma2); (0,) tensors where not needed."""
    B, K, D = check_shapes(x, (mean, var), (weight,), (bias, sigma2))
    need, outs = backward_outputs(grad, (x, mean, var, weight, bias, sigma2), needs, B, K)
    if need is None:
        return tuple(outs)
    need_x, need_m, need_v, need_a, need_b, need_s = need
    dx, dm, dv, da, db, ds = outs
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    dev = x.device
    cfg = _config(B, K, D, x)
    n_b, n_d = tile_grid(cfg, B=B, D=D)
    dummy = x  # stands in for pointers a kernel does not dereference (its flag is off)
    store_g = (need_m or need_a) and D > 0
    g = opt(workspace((B, K), acc_torch, dev, store_g), dummy)
    db_part = workspace((n_b, K), acc_torch, dev, need_b)
    ds_part = workspace((n_b, K), acc_torch, dev, need_s)
    if need_x or need_b or need_s or store_g:
        launch(_fixed_coef_kernel, tile_grid(cfg, B=B, K=K), dev,
               x, mean, weight, opt(bias, x), sigma2, grad,
               g, dx if need_x else dummy, opt(db_part, dummy), opt(ds_part, dummy),
               B, K, D, *x.stride(), *mean.stride(), *weight.stride(), vec_stride(bias),
               sigma2.stride(0), grad.stride(0),
               HAS_BIAS=bias is not None, STORE_G=store_g, NEED_X=need_x, NEED_B=need_b,
               NEED_S=need_s, ACC=acc_tl, **cfg)
    if (need_m or need_v) and D > 0:
        launch(_fixed_moment_grad_kernel, tile_grid(cfg, B=B, D=D), dev,
               g, weight, sigma2, grad, dm if need_m else dummy, dv if need_v else dummy,
               B, K, D, *weight.stride(), sigma2.stride(0), grad.stride(0),
               NEED_M=need_m, NEED_V=need_v, ACC=acc_tl, **cfg)
    ds2_part = None
    if (need_a or need_s) and D > 0:
        ds2_part = workspace((n_d, K), acc_torch, dev, need_s)
        launch(_fixed_weight_grad_kernel, tile_grid(cfg, K=K, D=D), dev,
               g, mean, var, weight, sigma2, grad, da if need_a else dummy, opt(ds2_part, dummy),
               B, K, D, *mean.stride(), *var.stride(), *weight.stride(), sigma2.stride(0),
               grad.stride(0), NEED_A=need_a, NEED_S=need_s, ACC=acc_tl, **cfg)
    reduce_partials(db, db_part)
    if need_s:
        total = ds_part.sum(0)
        if ds2_part is not None:
            total = total + ds2_part.sum(0)
        ds.copy_(total)
    return tuple(outs)
