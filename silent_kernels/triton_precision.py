"""Triton kernels of the learnable-precision and Gaussian log-variance heads on the mean-field
contraction stage (MATH.md §2, §4-5, §10-11) and their launchers.

Forward, one launch: grid (batch tiles, pixel tiles). A program owns a BLOCK_B x BLOCK_K tile
of (sample, pixel) pairs and loops over the latents in BLOCK_D steps: it loads a tile of each
moment (B x d) and of the weights A, C (as transposed d x k tiles), forms the weight products
(A^2, C^2, AC, AC^2, A^2C, C^3, A^2C^2, C^4) in registers and accumulates the contractions
with ``tl.dot(..., input_precision="ieee")``. The k3 / k4 contractions are compiled out when
those cumulants are absent (Gaussian latents). Then the per-pixel epilogue of the ``HEAD``
(triton_heads: 0 Taylor log term, 1 exact log term, 2 log-variance head with C = H), ragged
edges zeroed, one partial sum per sample into a (num_pixel_tiles, B) buffer that torch sums
(deterministic, no atomics). No B x k x (#contractions) tensor and no k x d weight product is
materialised.

Backward, coefficients recomputed. g_j = grad[n] dl/d(contraction_j) needs every contraction
at (n, p); saving them in forward would cost memory in every forward (also evaluation), so the
"coef" launch of the same kernel (GRAD=True) recomputes them and writes them once into a
(5, 7 or 10, B, k) buffer in the accumulation dtype (backward only); x and the bias gradients
come straight out of it (biases as per-batch-tile partial column sums). Then

* moment kernel, grid (batch tiles, latent tiles), loop over pixels:
  dm = g_u A + g_v C, dk2 = g_Saa A^2 + g_Scc C^2 + g_Sac AC, dk3 ..., dk4 ...
* weight kernel, grid (pixel tiles, latent tiles), loop over the batch:
  X_j = g_j^T (moment of j), then dA, dC from the X_j and the weight tile (MATH.md §5).

Every head shares these two kernels: heads 1 and 2 only change the epilogue. Gradients whose
``needs`` flag is false are compiled out; with nothing needed from the moment or weight kernels
the coefficient buffer is not allocated.
"""

from __future__ import annotations

from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (acc_dtypes, backward_outputs, block_config, block_range, cdiv, check_shapes,
                            contraction_zeros, launch, load_plane, load_tile, load_vec, mat_strides,
                            offsets, opt, partial_row, plane, plane_dot, program_tile, reduce_partials,
                            store_out, store_x_and_bias_grads, tile_grid, vec_stride, workspace)
from .triton_heads import head_pixel_grad, head_pixel_loss

__all__ = ["precision_forward", "precision_backward", "HEADS", "GPU_CONFIGS"]

# The op's ``head`` argument (autograd.HEADS): 0 Taylor, 1 exact log term, 2 log-variance.
HEADS = (0, 1, 2)

# GPU blocks (BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages) per kernel and accumulator width:
# the largest tiles whose sm_90 build needs no local memory (`cuobjdump -res-usage`); the fp32
# "ieee" dots run on FMA units and hold operand slices in registers. "prec" = forward /
# coefficient kernel with k3/k4, "prec_g" without (Gaussian: Taylor or log-variance head),
# "prec_exact" the exact log term (float64 series in the epilogue), "mom" / "w" = moment /
# weight gradients.
GPU_CONFIGS = {
    4: {"prec_g": (64, 32, 16, 8, 1), "prec": (32, 32, 16, 8, 1), "prec_exact": (32, 32, 16, 8, 1),
        "mom": (32, 16, 32, 8, 1), "w": (32, 32, 32, 8, 2)},
    8: {"prec_g": (16, 32, 16, 8, 1), "prec": (16, 32, 16, 8, 1), "prec_exact": (16, 32, 16, 8, 1),
        "mom": (32, 16, 32, 8, 1), "w": (32, 32, 16, 8, 2)},
}


@triton.jit
def _precision_fwd_kernel(x_ptr, m_ptr, k2_ptr, k3_ptr, k4_ptr, a_ptr, b_ptr, c_ptr, bc_ptr,
                          go_ptr, part_ptr, g_ptr, dx_ptr, db_ptr, dbc_ptr,
                          B, K, D,
                          sxb, sxk, smb, smd, svb, svd, s3b, s3d, s4b, s4d,
                          sak, sad, sb, sck, scd, sbc, sgo, plane_stride,
                          HAS_K3: tl.constexpr, HAS_K4: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_PBIAS: tl.constexpr,
                          GRAD: tl.constexpr, STORE_G: tl.constexpr, NEED_X: tl.constexpr,
                          NEED_B: tl.constexpr, NEED_BC: tl.constexpr,
                          P_K3: tl.constexpr, P_K4: tl.constexpr, HEAD: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward (GRAD=False: per-tile partial losses) or backward coefficients (GRAD=True:
    g_j = grad[n] dl/dc_j into the (planes, B, k) buffer, dx, bias partial sums)."""
    pid_b, pid_k, rows, pix, rmask, pmask = program_tile(B, K, BLOCK_B, BLOCK_K)
    ubar, vbar, saa, scc, sac, tacc, taac, c3, q, c4 = contraction_zeros(BLOCK_B, BLOCK_K, ACC)
    for d0 in range(0, D, BLOCK_D):
        lat, dmask = block_range(d0, D, BLOCK_D)
        mom_mask = rmask[:, None] & dmask[None, :]
        w_mask = dmask[:, None] & pmask[None, :]
        at = load_tile(a_ptr, lat, pix, sad, sak, w_mask, ACC)
        ct = load_tile(c_ptr, lat, pix, scd, sck, w_mask, ACC)
        m = load_tile(m_ptr, rows, lat, smb, smd, mom_mask, ACC)
        ubar = tl.dot(m, at, ubar, input_precision="ieee")
        vbar = tl.dot(m, ct, vbar, input_precision="ieee")
        k2 = load_tile(k2_ptr, rows, lat, svb, svd, mom_mask, ACC)
        a2 = at * at
        c2 = ct * ct
        ac = at * ct
        saa = tl.dot(k2, a2, saa, input_precision="ieee")
        scc = tl.dot(k2, c2, scc, input_precision="ieee")
        sac = tl.dot(k2, ac, sac, input_precision="ieee")
        if HAS_K3:
            k3 = load_tile(k3_ptr, rows, lat, s3b, s3d, mom_mask, ACC)
            tacc = tl.dot(k3, ac * ct, tacc, input_precision="ieee")
            taac = tl.dot(k3, a2 * ct, taac, input_precision="ieee")
            c3 = tl.dot(k3, c2 * ct, c3, input_precision="ieee")
        if HAS_K4:
            k4 = load_tile(k4_ptr, rows, lat, s4b, s4d, mom_mask, ACC)
            q = tl.dot(k4, a2 * c2, q, input_precision="ieee")
            c4 = tl.dot(k4, c2 * c2, c4, input_precision="ieee")

    if HAS_BIAS:
        ubar += load_vec(b_ptr, pix, sb, pmask, 0.0, ACC)[None, :]
    if HAS_PBIAS:
        vbar += load_vec(bc_ptr, pix, sbc, pmask, 0.0, ACC)[None, :]
    tile_mask = rmask[:, None] & pmask[None, :]
    x = load_tile(x_ptr, rows, pix, sxb, sxk, tile_mask, ACC)
    e = x - ubar

    if not GRAD:
        pixel = head_pixel_loss(e, vbar, saa, scc, sac, tacc, taac, c3, q, c4, HEAD, HAS_K3, HAS_K4)
        pixel = tl.where(tile_mask, pixel, 0.0)
        tl.store(partial_row(part_ptr, pid_k, B, rows), tl.sum(pixel, axis=1), mask=rmask)
    else:
        # d(pixel loss)/d(contraction) times grad[n] (csrc/epilogue.h: head_pixel_grad).
        go = load_vec(go_ptr, rows, sgo, rmask, 0.0, ACC)[:, None]
        g_u, g_v, g_saa, g_scc, g_sac, g_tacc, g_taac, g_c3, g_c4 = head_pixel_grad(
            e, vbar, saa, scc, sac, tacc, taac, c3, c4, HEAD, HAS_K3, HAS_K4)
        g_u = tl.where(tile_mask, go * g_u, 0.0)
        g_v = tl.where(tile_mask, go * g_v, 0.0)
        store_x_and_bias_grads(dx_ptr, db_ptr, g_u, pid_b, rows, pix, K, tile_mask, pmask, NEED_X, NEED_B)
        if NEED_BC:
            tl.store(partial_row(dbc_ptr, pid_b, K, pix), tl.sum(g_v, axis=0), mask=pmask)
        if STORE_G:
            g_offs = g_ptr + offsets(rows, pix, K, 1)
            tl.store(g_offs + plane(0, plane_stride), g_u, mask=tile_mask)
            tl.store(g_offs + plane(1, plane_stride), g_v, mask=tile_mask)
            tl.store(g_offs + plane(2, plane_stride), go * g_saa, mask=tile_mask)
            tl.store(g_offs + plane(3, plane_stride), go * g_scc, mask=tile_mask)
            tl.store(g_offs + plane(4, plane_stride), go * g_sac, mask=tile_mask)
            if HAS_K3:
                tl.store(g_offs + plane(P_K3, plane_stride), go * g_tacc, mask=tile_mask)
                tl.store(g_offs + plane(P_K3 + 1, plane_stride), go * g_taac, mask=tile_mask)
                tl.store(g_offs + plane(P_K3 + 2, plane_stride), go * g_c3, mask=tile_mask)
            if HAS_K4:
                tl.store(g_offs + plane(P_K4, plane_stride), tl.broadcast_to(0.5 * go, (BLOCK_B, BLOCK_K)),
                         mask=tile_mask)
                tl.store(g_offs + plane(P_K4 + 1, plane_stride), go * g_c4, mask=tile_mask)


@triton.jit
def _precision_moment_grad_kernel(g_ptr, a_ptr, c_ptr, dm_ptr, dk2_ptr, dk3_ptr, dk4_ptr,
                                  B, K, D, sak, sad, sck, scd, plane_stride,
                                  NEED_M: tl.constexpr, NEED_K2: tl.constexpr,
                                  NEED_K3: tl.constexpr, NEED_K4: tl.constexpr,
                                  P_K3: tl.constexpr, P_K4: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dm = g_u A + g_v C; dk2 = g_Saa A^2 + g_Scc C^2 + g_Sac AC;
    dk3 = g_Tacc AC^2 + g_Taac A^2C + g_C3 C^3; dk4 = g_Q A^2C^2 + g_C4 C^4."""
    _pid_b, _pid_d, rows, lat, rmask, dmask = program_tile(B, D, BLOCK_B, BLOCK_D)
    dm = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    dk2 = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    dk3 = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    dk4 = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    for p0 in range(0, K, BLOCK_K):
        pix, pmask = block_range(p0, K, BLOCK_K)
        w_mask = pmask[:, None] & dmask[None, :]
        g_mask = rmask[:, None] & pmask[None, :]
        a = load_tile(a_ptr, pix, lat, sak, sad, w_mask, ACC)
        c = load_tile(c_ptr, pix, lat, sck, scd, w_mask, ACC)
        g_offs = g_ptr + offsets(rows, pix, K, 1)
        if NEED_M:
            dm = plane_dot(g_offs, 0, plane_stride, g_mask, a, dm)
            dm = plane_dot(g_offs, 1, plane_stride, g_mask, c, dm)
        if NEED_K2:
            g = load_plane(g_offs, 2, plane_stride, g_mask)
            dk2 = tl.dot(g, a * a, dk2, input_precision="ieee")
            g = load_plane(g_offs, 3, plane_stride, g_mask)
            dk2 = tl.dot(g, c * c, dk2, input_precision="ieee")
            g = load_plane(g_offs, 4, plane_stride, g_mask)
            dk2 = tl.dot(g, a * c, dk2, input_precision="ieee")
        if NEED_K3:
            g = load_plane(g_offs, P_K3, plane_stride, g_mask)
            dk3 = tl.dot(g, a * c * c, dk3, input_precision="ieee")
            g = load_plane(g_offs, P_K3 + 1, plane_stride, g_mask)
            dk3 = tl.dot(g, a * a * c, dk3, input_precision="ieee")
            g = load_plane(g_offs, P_K3 + 2, plane_stride, g_mask)
            dk3 = tl.dot(g, c * c * c, dk3, input_precision="ieee")
        if NEED_K4:
            g = load_plane(g_offs, P_K4, plane_stride, g_mask)
            dk4 = tl.dot(g, a * a * c * c, dk4, input_precision="ieee")
            g = load_plane(g_offs, P_K4 + 1, plane_stride, g_mask)
            c2 = c * c
            dk4 = tl.dot(g, c2 * c2, dk4, input_precision="ieee")
    out_mask = rmask[:, None] & dmask[None, :]
    out_offs = offsets(rows, lat, D, 1)
    if NEED_M:
        store_out(dm_ptr + out_offs, dm, out_mask)
    if NEED_K2:
        store_out(dk2_ptr + out_offs, dk2, out_mask)
    if NEED_K3:
        store_out(dk3_ptr + out_offs, dk3, out_mask)
    if NEED_K4:
        store_out(dk4_ptr + out_offs, dk4, out_mask)


@triton.jit
def _precision_weight_grad_kernel(g_ptr, m_ptr, k2_ptr, k3_ptr, k4_ptr, a_ptr, c_ptr, da_ptr, dc_ptr,
                                  B, K, D, smb, smd, svb, svd, s3b, s3d, s4b, s4d,
                                  sak, sad, sck, scd, plane_stride,
                                  HAS_K3: tl.constexpr, HAS_K4: tl.constexpr,
                                  NEED_A: tl.constexpr, NEED_C: tl.constexpr,
                                  P_K3: tl.constexpr, P_K4: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """X_j = g_j^T (moment of j) over the batch, then (MATH.md §5)
    dA = X_u + 2A X_Saa + C X_Sac + C^2 X_Tacc + 2AC X_Taac + 2AC^2 X_Q,
    dC = X_v + 2C X_Scc + A X_Sac + 2AC X_Tacc + A^2 X_Taac + 3C^2 X_C3 + 2A^2C X_Q + 4C^3 X_C4."""
    _pid_k, _pid_d, pix, lat, pmask, dmask = program_tile(K, D, BLOCK_K, BLOCK_D)
    x_u, x_v, x_saa, x_scc, x_sac, x_tacc, x_taac, x_c3, x_q, x_c4 = contraction_zeros(BLOCK_K, BLOCK_D, ACC)
    for n0 in range(0, B, BLOCK_B):
        rows, rmask = block_range(n0, B, BLOCK_B)
        mom_mask = rmask[:, None] & dmask[None, :]
        gt_mask = pmask[:, None] & rmask[None, :]
        gt_offs = g_ptr + offsets(pix, rows, 1, K)                      # g_j^T tiles (BLOCK_K, BLOCK_B)
        m = load_tile(m_ptr, rows, lat, smb, smd, mom_mask, ACC)
        k2 = load_tile(k2_ptr, rows, lat, svb, svd, mom_mask, ACC)
        if NEED_A:
            x_u = plane_dot(gt_offs, 0, plane_stride, gt_mask, m, x_u)
            x_saa = plane_dot(gt_offs, 2, plane_stride, gt_mask, k2, x_saa)
        if NEED_C:
            x_v = plane_dot(gt_offs, 1, plane_stride, gt_mask, m, x_v)
            x_scc = plane_dot(gt_offs, 3, plane_stride, gt_mask, k2, x_scc)
        x_sac = plane_dot(gt_offs, 4, plane_stride, gt_mask, k2, x_sac)
        if HAS_K3:
            k3 = load_tile(k3_ptr, rows, lat, s3b, s3d, mom_mask, ACC)
            x_tacc = plane_dot(gt_offs, P_K3, plane_stride, gt_mask, k3, x_tacc)
            x_taac = plane_dot(gt_offs, P_K3 + 1, plane_stride, gt_mask, k3, x_taac)
            if NEED_C:
                x_c3 = plane_dot(gt_offs, P_K3 + 2, plane_stride, gt_mask, k3, x_c3)
        if HAS_K4:
            k4 = load_tile(k4_ptr, rows, lat, s4b, s4d, mom_mask, ACC)
            x_q = plane_dot(gt_offs, P_K4, plane_stride, gt_mask, k4, x_q)
            if NEED_C:
                x_c4 = plane_dot(gt_offs, P_K4 + 1, plane_stride, gt_mask, k4, x_c4)

    w_mask = pmask[:, None] & dmask[None, :]
    a = load_tile(a_ptr, pix, lat, sak, sad, w_mask, ACC)
    c = load_tile(c_ptr, pix, lat, sck, scd, w_mask, ACC)
    out_offs = offsets(pix, lat, D, 1)
    if NEED_A:
        da = x_u + 2.0 * a * x_saa + c * x_sac
        if HAS_K3:
            da += c * c * x_tacc + 2.0 * a * c * x_taac
        if HAS_K4:
            da += 2.0 * a * c * c * x_q
        store_out(da_ptr + out_offs, da, w_mask)
    if NEED_C:
        dc = x_v + 2.0 * c * x_scc + a * x_sac
        if HAS_K3:
            dc += 2.0 * a * c * x_tacc + a * a * x_taac + 3.0 * c * c * x_c3
        if HAS_K4:
            dc += 2.0 * a * a * c * x_q + 4.0 * c * c * c * x_c4
        store_out(dc_ptr + out_offs, dc, w_mask)


def _planes(has_k3: bool, has_k4: bool) -> tuple[int, int, int]:
    """Plane layout of the coefficient buffer: [u, v, Saa, Scc, Sac, (Tacc, Taac, C3), (Q, C4)]."""
    p_k3 = 5
    p_k4 = 5 + 3 * has_k3
    return p_k3, p_k4, p_k4 + 2 * has_k4


def _check_head(head: int, k3: Optional[Tensor], k4: Optional[Tensor]) -> None:
    if head not in HEADS:
        raise ValueError(f"head: expected 0 (Taylor log term), 1 (exact log term) or 2 (log-variance), "
                         f"got {head!r}")
    if head != 0 and (k3 is not None or k4 is not None):
        raise ValueError(f"head={head} ({'exact log term' if head == 1 else 'log-variance'}) needs "
                         "Gaussian latents: k3 and k4 must be None")


def _coef_config(x: Tensor, D: int, k3, k4, head: int) -> dict:
    kind = "prec_exact" if head == 1 else "prec" if (k3 is not None or k4 is not None) else "prec_g"
    return block_config(GPU_CONFIGS, kind, x.shape[0], x.shape[1], D, x.dtype, x.device)


def _launch_coef(x, mean, var, k3, k4, weight, bias, pw, pb, head, *, grad=None, part=None,
                 g=None, dx=None, db=None, dbc=None, cfg, acc_tl):
    B, K = x.shape
    D = weight.shape[1]
    p_k3, p_k4, _ = _planes(k3 is not None, k4 is not None)
    launch(_precision_fwd_kernel, tile_grid(cfg, B=B, K=K), x.device,
           x, mean, var, opt(k3, x), opt(k4, x), weight, opt(bias, x), pw, opt(pb, x),
           opt(grad, x), opt(part, x), opt(g, x), opt(dx, x), opt(db, x), opt(dbc, x),
           B, K, D, *x.stride(), *mean.stride(), *var.stride(), *mat_strides(k3), *mat_strides(k4),
           *weight.stride(), vec_stride(bias), *pw.stride(), vec_stride(pb), vec_stride(grad), B * K,
           HAS_K3=k3 is not None, HAS_K4=k4 is not None, HAS_BIAS=bias is not None,
           HAS_PBIAS=pb is not None, GRAD=grad is not None, STORE_G=g is not None,
           NEED_X=dx is not None, NEED_B=db is not None, NEED_BC=dbc is not None,
           P_K3=p_k3, P_K4=p_k4, HEAD=head, ACC=acc_tl, **cfg)


def precision_forward(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                      weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                      precision_bias: Optional[Tensor], head: int = 0) -> Tensor:
    """Per-sample NLL (B,) of the head ``head`` on the mean-field contractions, in x's dtype.
    head 2: ``precision_weight`` / ``precision_bias`` are the log-variance weights H, h0."""
    _check_head(head, k3, k4)
    B, K, D = check_shapes(x, (mean, var, k3, k4), (weight, precision_weight), (bias, precision_bias))
    if B == 0 or K == 0:
        return x.new_zeros(B)
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    cfg = _coef_config(x, D, k3, k4, head)
    part = workspace((cdiv(K, cfg["BLOCK_K"]), B), acc_torch, x.device)
    _launch_coef(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias, head,
                 part=part, cfg=cfg, acc_tl=acc_tl)
    return part.sum(0).to(x.dtype)


def precision_backward(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor],
                       k4: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                       precision_weight: Tensor, precision_bias: Optional[Tensor],
                       needs: Sequence[bool], head: int = 0) -> tuple[Tensor, ...]:
    """Gradients w.r.t. the 9 tensor inputs of ``precision_forward``; (0,) tensors where not needed."""
    _check_head(head, k3, k4)
    B, K, D = check_shapes(x, (mean, var, k3, k4), (weight, precision_weight), (bias, precision_bias))
    inputs = (x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias)
    need, outs = backward_outputs(grad, inputs, needs, B, K)
    if need is None:
        return tuple(outs)
    need_x, need_m, need_v, need_k3, need_k4, need_a, need_b, need_c, need_bc = need
    dx, dm, dv, dk3, dk4, da, db, dc, dbc = outs
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    dev = x.device
    has_k3, has_k4 = k3 is not None, k4 is not None
    cfg = _coef_config(x, D, k3, k4, head)
    cfg_m = block_config(GPU_CONFIGS, "mom", B, K, D, x.dtype, dev)
    cfg_w = block_config(GPU_CONFIGS, "w", B, K, D, x.dtype, dev)
    n_b = cdiv(B, cfg["BLOCK_B"])
    p_k3, p_k4, n_planes = _planes(has_k3, has_k4)
    store_g = any((need_m, need_v, need_k3, need_k4, need_a, need_c)) and D > 0
    g = workspace((n_planes, B, K), acc_torch, dev, store_g)
    db_part = workspace((n_b, K), acc_torch, dev, need_b)
    dbc_part = workspace((n_b, K), acc_torch, dev, need_bc)
    _launch_coef(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias, head,
                 grad=grad, g=g, dx=dx if need_x else None, db=db_part, dbc=dbc_part,
                 cfg=cfg, acc_tl=acc_tl)
    dummy = x  # stands in for pointers a kernel does not dereference (its flag is off)
    if any((need_m, need_v, need_k3, need_k4)) and D > 0:
        launch(_precision_moment_grad_kernel, tile_grid(cfg_m, B=B, D=D), dev,
               g, weight, precision_weight, dm if need_m else dummy, dv if need_v else dummy,
               dk3 if need_k3 else dummy, dk4 if need_k4 else dummy,
               B, K, D, *weight.stride(), *precision_weight.stride(), B * K,
               NEED_M=need_m, NEED_K2=need_v, NEED_K3=need_k3, NEED_K4=need_k4,
               P_K3=p_k3, P_K4=p_k4, ACC=acc_tl, **cfg_m)
    if (need_a or need_c) and D > 0:
        launch(_precision_weight_grad_kernel, tile_grid(cfg_w, K=K, D=D), dev,
               g, mean, var, opt(k3, dummy), opt(k4, dummy),
               weight, precision_weight, da if need_a else dummy, dc if need_c else dummy,
               B, K, D, *mean.stride(), *var.stride(), *mat_strides(k3), *mat_strides(k4),
               *weight.stride(), *precision_weight.stride(), B * K,
               HAS_K3=has_k3, HAS_K4=has_k4, NEED_A=need_a, NEED_C=need_c,
               P_K3=p_k3, P_K4=p_k4, ACC=acc_tl, **cfg_w)
    reduce_partials(db, db_part)
    reduce_partials(dbc, dbc_part)
    return tuple(outs)
