"""Triton kernels for the analytic loss (MATH.md §2-5) and their host launchers.

Design (both heads)
-------------------
Forward, one launch per head. Grid = (batch tiles, pixel tiles). A program owns a
BLOCK_B x BLOCK_K tile of (sample, pixel) pairs and loops over the latent dimension in
BLOCK_D steps: it loads a tile of each moment (B x d) and of the weights A, C (as
transposed d x k tiles), forms the weight products (A^2, C^2, AC, AC^2, A^2C, C^3,
A^2C^2, C^4) in registers and accumulates the contractions of MATH.md §2 with
``tl.dot(..., input_precision="ieee")`` (never TF32). Then it applies the per-pixel
epilogue (the formulas of csrc/epilogue.h), zeroes ragged edges, reduces over its
pixels and writes one partial sum per sample into a (num_pixel_tiles, B) buffer that
torch sums (deterministic, no atomics). Nothing of size B x k x (#contractions) and no
k x d weight product is materialised. The k3 / k4 contractions are compiled out
(``tl.constexpr`` flags) when those cumulants are absent (Gaussian latents).

Fixed variance: only ``ubar = m A^T + b`` is a GEMM. The variance part is
sum_p Saa_p / (2 sigma_p^2) = sum_i k2_i w_i with w_i = sum_p A_pi^2 / (2 sigma_p^2):
each program forms w over its own pixel tile (O(BLOCK_K * BLOCK_D) per d step) and
contracts it with its k2 rows (O(BLOCK_B * BLOCK_D)): O(kd) per batch tile plus O(Bd)
per pixel tile in total, no second GEMM.

Backward, per-pixel coefficients recomputed. The coefficients
g_j = grad[n] * dl/d(contraction_j) need every contraction at (n, p), i.e. a full pass
over d. Saving them in forward would materialise a B x k x (#contractions) tensor in
every forward, also when no backward follows (evaluation, frozen models), which is
exactly what the forward must not do; saving the contractions costs the same memory.
So the backward recomputes them: a "coef" kernel (the forward's loop + the epilogue
derivatives) costs one forward-shaped pass (5 or 10 GEMM-shaped products) next to the
backward's own 2 x (5..10) (moments and weights), i.e. 3 passes instead of 2 (+50% of
the backward's arithmetic, nothing added to the forward), and writes the coefficients
once into a (#coefficients = 5, 7 or 10, B, k) buffer in the accumulation dtype (backward only, freed
when it returns); x and the bias gradients come straight out of this kernel (the biases
as per-batch-tile partial column sums). Then

* moment kernel, grid (batch tiles, latent tiles), loop over pixels:
  dm = g_ubar A + g_vbar C, dk2 = g_Saa A^2 + g_Scc C^2 + g_Sac AC, dk3 ..., dk4 ...
* weight kernel, grid (pixel tiles, latent tiles), loop over the batch:
  X_j = g_j^T (moment of j), then dA, dC from the X_j and the weight tile (MATH.md §5).

Fixed variance: g_Saa = grad[n] / (2 sigma_p^2) is rank one, so only g_ubar is stored;
dk2 = grad[n] w_i and the Saa parts of dA and dsigma2 use r_i = sum_n grad[n] k2_ni
(O(kd) + O(Bd)); the GEMMs are just dm = g_ubar A and dA = g_ubar^T m.

Gradients whose ``needs`` flag is false are not computed (their kernels or their
accumulators are compiled out); with nothing needed from the moment or weight kernels
the coefficient buffer is not even allocated.

Numerics: fp16 / bf16 / fp32 inputs are loaded and accumulated in fp32, fp64 inputs in
fp64 (``tl.dot`` on fp64 runs in the interpreter and compiles for sm_90); outputs are
written in the input dtype. All offsets are int64 (``_tile_index`` / ``_offsets``);
every load and store is masked on ragged edges; every tensor is addressed through both
of its strides, so non-contiguous and stride-0 (expanded) inputs are read correctly
without copies.

Block sizes: one configuration per launch. Under TRITON_INTERPRET=1 the blocks are sized
to the problem (fewer, larger programs run fastest in the interpreter); on a GPU a fixed
table per kernel and accumulator width, chosen so that no kernel spills registers on
sm_90 (``_GPU_CONFIGS``). No autotuning: nothing could be timed without a GPU.

bf16 outputs are rounded to nearest-even explicitly (``_store_out``): the interpreter's
fp32 -> bf16 cast truncates, which doubled the bf16 error before.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import PRECISION_SQ_FLOOR

__all__ = [
    "fixed_forward",
    "fixed_backward",
    "precision_forward",
    "precision_backward",
    "tile_offsets",
    "probe_offsets",
    "INTERPRET",
]

# Read once at import, like triton.jit itself does when it decorates the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_HALF_LOG_2PI = tl.constexpr(0.91893853320467274178032973640562)
_FLOOR = tl.constexpr(PRECISION_SQ_FLOOR)


# ----------------------------------------------------------------- index arithmetic
# Every address in this file is computed here, in int64: a program id or a loop index
# is widened *before* it is multiplied by a block size or a stride, so B * k, k * d or
# (#planes) * B * k beyond 2^31 elements never wraps.
@triton.jit
def _tile_index(pid, BLOCK: tl.constexpr):
    """Indices pid * BLOCK + [0, BLOCK) of a program's tile, as int64."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _offsets(rows, cols, stride_r, stride_c):
    """Element offsets rows[:, None] * stride_r + cols[None, :] * stride_c, in int64."""
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _plane(J: tl.constexpr, plane_stride):
    """Offset of plane J of a stacked (planes, B, k) buffer, in int64 (plane_stride may be
    specialised to a constexpr 1 by the launcher, so it is not ``.to()``-cast)."""
    return tl.full([], J, tl.int64) * plane_stride


def tile_offsets(pid: int, block: int, col: int, stride_r: int, stride_c: int,
                 plane: int = 0, plane_stride: int = 0) -> list[int]:
    """Plain-Python twin of ``_plane + _offsets(_tile_index(pid, block), col)``: the
    exact (unbounded) offsets the kernels compute, for the overflow unit test."""
    return [plane * plane_stride + (pid * block + i) * stride_r + col * stride_c for i in range(block)]


@triton.jit(do_not_specialize=["pid"])  # a pid of 1 must stay a tensor, as program_id is
def _offset_probe_kernel(out_ptr, pid, col, stride_r, stride_c, plane_stride,
                         PLANE: tl.constexpr, BLOCK: tl.constexpr):
    rows = _tile_index(pid, BLOCK)
    cols = tl.full([1], 0, tl.int32) + col
    offs = _offsets(rows, cols, stride_r, stride_c) + _plane(PLANE, plane_stride)  # (BLOCK, 1)
    tl.store(out_ptr + tl.arange(0, BLOCK)[:, None], offs)


def probe_offsets(pid: int, block: int, col: int, stride_r: int, stride_c: int,
                  plane: int = 0, plane_stride: int = 0, device="cpu") -> Tensor:
    """Run the kernels' index helpers for one tile with the given (int32-sized) program id
    and strides and return the int64 offsets they produce; no big tensor is needed."""
    out = torch.empty(block, dtype=torch.int64, device=device)
    _offset_probe_kernel[(1,)](out, pid, col, stride_r, stride_c, plane_stride,
                               PLANE=plane, BLOCK=block)
    return out


@triton.jit
def _store_out(ptrs, val, mask):
    """Store into an output in the input dtype. bf16 is rounded to nearest-even here, by bit
    arithmetic, because the interpreter's fp32 -> bf16 cast truncates; the result is then
    exactly representable, so the GPU's (round-to-nearest) cast gives the same bits."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        f = val.to(tl.float32)
        bits = f.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        val = tl.where(f != f, f, bits.to(tl.float32, bitcast=True))
    tl.store(ptrs, val, mask=mask)


# ------------------------------------------------------------------ per-pixel math
@triton.jit
def _precision_pixel_loss(e, vb, saa, scc, sac, tacc, taac, c3, q, c4,
                          HAS_K3: tl.constexpr, HAS_K4: tl.constexpr):
    """l = 0.5 E[(x-u)^2 v^2] - 0.5 log M + V / (4 M^2) + 0.5 log 2pi (MATH.md §4)."""
    vb2 = vb * vb
    e2v2 = e * e * (vb2 + scc) - 4.0 * e * vb * sac + vb2 * saa + saa * scc + 2.0 * sac * sac
    m_raw = vb2 + scc
    v = 4.0 * vb2 * scc + 2.0 * scc * scc
    if HAS_K3:
        e2v2 += 2.0 * vb * taac - 2.0 * e * tacc
        v += 4.0 * vb * c3
    if HAS_K4:
        e2v2 += q
        v += c4
    m = tl.maximum(m_raw, _FLOOR)
    return 0.5 * e2v2 - 0.5 * tl.log(m) + v / (4.0 * m * m) + _HALF_LOG_2PI


# ------------------------------------------------------------------ fixed forward
@triton.jit
def _fixed_fwd_kernel(x_ptr, m_ptr, k2_ptr, a_ptr, b_ptr, s2_ptr, part_ptr,
                      B, K, D,
                      sxb, sxk, smb, smd, svb, svd, sak, sad, sb, ss,
                      HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = _tile_index(pid_b, BLOCK_B)
    pix = _tile_index(pid_k, BLOCK_K)
    rmask = rows < B
    pmask = pix < K
    s2 = tl.load(s2_ptr + pix * ss, mask=pmask, other=1.0).to(ACC)
    half_inv_s2 = 0.5 / s2

    ubar = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    var_part = tl.zeros((BLOCK_B,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        lat = d0 + tl.arange(0, BLOCK_D)
        dmask = lat < D
        mom_mask = rmask[:, None] & dmask[None, :]
        at = tl.load(a_ptr + _offsets(lat, pix, sad, sak), mask=dmask[:, None] & pmask[None, :],
                     other=0.0).to(ACC)                                  # A^T tile (BLOCK_D, BLOCK_K)
        m = tl.load(m_ptr + _offsets(rows, lat, smb, smd), mask=mom_mask, other=0.0).to(ACC)
        ubar = tl.dot(m, at, ubar, input_precision="ieee")
        # variance part: w_i = sum_{p in tile} A_pi^2 / (2 sigma_p^2), then k2 . w (O(kd) + O(Bd))
        w = tl.sum(at * at * half_inv_s2[None, :], axis=1)
        k2 = tl.load(k2_ptr + _offsets(rows, lat, svb, svd), mask=mom_mask, other=0.0).to(ACC)
        var_part += tl.sum(k2 * w[None, :], axis=1)

    if HAS_BIAS:
        ubar += tl.load(b_ptr + pix * sb, mask=pmask, other=0.0).to(ACC)[None, :]
    tile_mask = rmask[:, None] & pmask[None, :]
    x = tl.load(x_ptr + _offsets(rows, pix, sxb, sxk), mask=tile_mask, other=0.0).to(ACC)
    e = x - ubar
    pixel = e * e * half_inv_s2[None, :] + (0.5 * tl.log(s2) + _HALF_LOG_2PI)[None, :]
    pixel = tl.where(tile_mask, pixel, 0.0)
    part = tl.sum(pixel, axis=1) + var_part
    tl.store(part_ptr + pid_k.to(tl.int64) * B + rows, part, mask=rmask)


# -------------------------------------------------------------- precision forward
@triton.jit
def _precision_fwd_kernel(x_ptr, m_ptr, k2_ptr, k3_ptr, k4_ptr, a_ptr, b_ptr, c_ptr, bc_ptr,
                          go_ptr, part_ptr, g_ptr, dx_ptr, db_ptr, dbc_ptr,
                          B, K, D,
                          sxb, sxk, smb, smd, svb, svd, s3b, s3d, s4b, s4d,
                          sak, sad, sb, sck, scd, sbc, sgo, plane,
                          HAS_K3: tl.constexpr, HAS_K4: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_PBIAS: tl.constexpr,
                          GRAD: tl.constexpr, STORE_G: tl.constexpr, NEED_X: tl.constexpr,
                          NEED_B: tl.constexpr, NEED_BC: tl.constexpr,
                          P_K3: tl.constexpr, P_K4: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward (GRAD=False: per-tile partial losses) or backward coefficients (GRAD=True:
    g_j = grad[n] dl/dc_j into the (planes, B, k) buffer, dx, bias partial sums)."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = _tile_index(pid_b, BLOCK_B)
    pix = _tile_index(pid_k, BLOCK_K)
    rmask = rows < B
    pmask = pix < K

    ubar = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    vbar = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    saa = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    scc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    sac = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    tacc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    taac = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    c3 = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    q = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    c4 = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        lat = d0 + tl.arange(0, BLOCK_D)
        dmask = lat < D
        mom_mask = rmask[:, None] & dmask[None, :]
        w_mask = dmask[:, None] & pmask[None, :]
        at = tl.load(a_ptr + _offsets(lat, pix, sad, sak), mask=w_mask, other=0.0).to(ACC)
        ct = tl.load(c_ptr + _offsets(lat, pix, scd, sck), mask=w_mask, other=0.0).to(ACC)
        m = tl.load(m_ptr + _offsets(rows, lat, smb, smd), mask=mom_mask, other=0.0).to(ACC)
        ubar = tl.dot(m, at, ubar, input_precision="ieee")
        vbar = tl.dot(m, ct, vbar, input_precision="ieee")
        k2 = tl.load(k2_ptr + _offsets(rows, lat, svb, svd), mask=mom_mask, other=0.0).to(ACC)
        a2 = at * at
        c2 = ct * ct
        ac = at * ct
        saa = tl.dot(k2, a2, saa, input_precision="ieee")
        scc = tl.dot(k2, c2, scc, input_precision="ieee")
        sac = tl.dot(k2, ac, sac, input_precision="ieee")
        if HAS_K3:
            k3 = tl.load(k3_ptr + _offsets(rows, lat, s3b, s3d), mask=mom_mask, other=0.0).to(ACC)
            tacc = tl.dot(k3, ac * ct, tacc, input_precision="ieee")
            taac = tl.dot(k3, a2 * ct, taac, input_precision="ieee")
            c3 = tl.dot(k3, c2 * ct, c3, input_precision="ieee")
        if HAS_K4:
            k4 = tl.load(k4_ptr + _offsets(rows, lat, s4b, s4d), mask=mom_mask, other=0.0).to(ACC)
            q = tl.dot(k4, a2 * c2, q, input_precision="ieee")
            c4 = tl.dot(k4, c2 * c2, c4, input_precision="ieee")

    if HAS_BIAS:
        ubar += tl.load(b_ptr + pix * sb, mask=pmask, other=0.0).to(ACC)[None, :]
    if HAS_PBIAS:
        vbar += tl.load(bc_ptr + pix * sbc, mask=pmask, other=0.0).to(ACC)[None, :]
    tile_mask = rmask[:, None] & pmask[None, :]
    x = tl.load(x_ptr + _offsets(rows, pix, sxb, sxk), mask=tile_mask, other=0.0).to(ACC)
    e = x - ubar

    if not GRAD:
        pixel = _precision_pixel_loss(e, vbar, saa, scc, sac, tacc, taac, c3, q, c4, HAS_K3, HAS_K4)
        pixel = tl.where(tile_mask, pixel, 0.0)
        tl.store(part_ptr + pid_k.to(tl.int64) * B + rows, tl.sum(pixel, axis=1), mask=rmask)
    else:
        # d(pixel loss)/d(contraction) (csrc/epilogue.h: precision_pixel_grad), times grad[n].
        # Below the floor M is a constant: its partial derivatives are dropped (clamp_min).
        go = tl.load(go_ptr + rows * sgo, mask=rmask, other=0.0).to(ACC)[:, None]
        vb = vbar
        vb2 = vb * vb
        m_raw = vb2 + scc
        floored = m_raw < _FLOOR
        mm = tl.maximum(m_raw, _FLOOR)
        v = 4.0 * vb2 * scc + 2.0 * scc * scc
        if HAS_K3:
            v += 4.0 * vb * c3
        if HAS_K4:
            v += c4
        inv_m = 1.0 / mm
        dl_dv = 0.25 * inv_m * inv_m
        dl_dm = tl.where(floored, 0.0, -0.5 * inv_m - 0.5 * v * inv_m * inv_m * inv_m)
        g_u = -(e * m_raw - 2.0 * vb * sac)
        g_v = e * e * vb - 2.0 * e * sac + vb * saa + 2.0 * vb * dl_dm + dl_dv * (8.0 * vb * scc)
        if HAS_K3:
            g_u += tacc
            g_v += taac + dl_dv * (4.0 * c3)
        g_u = tl.where(tile_mask, go * g_u, 0.0)
        g_v = tl.where(tile_mask, go * g_v, 0.0)
        if NEED_X:
            _store_out(dx_ptr + _offsets(rows, pix, K, 1), -g_u, tile_mask)
        if NEED_B:
            tl.store(db_ptr + pid_b.to(tl.int64) * K + pix, tl.sum(g_u, axis=0), mask=pmask)
        if NEED_BC:
            tl.store(dbc_ptr + pid_b.to(tl.int64) * K + pix, tl.sum(g_v, axis=0), mask=pmask)
        if STORE_G:
            g_offs = g_ptr + _offsets(rows, pix, K, 1)
            tl.store(g_offs + _plane(0, plane), g_u, mask=tile_mask)
            tl.store(g_offs + _plane(1, plane), g_v, mask=tile_mask)
            tl.store(g_offs + _plane(2, plane), go * (0.5 * m_raw), mask=tile_mask)
            tl.store(g_offs + _plane(3, plane),
                     go * (0.5 * (e * e + saa) + dl_dm + dl_dv * (4.0 * vb2 + 4.0 * scc)), mask=tile_mask)
            tl.store(g_offs + _plane(4, plane), go * (2.0 * (sac - e * vb)), mask=tile_mask)
            if HAS_K3:
                tl.store(g_offs + _plane(P_K3, plane), go * (-e), mask=tile_mask)
                tl.store(g_offs + _plane(P_K3 + 1, plane), go * vb, mask=tile_mask)
                tl.store(g_offs + _plane(P_K3 + 2, plane), go * (4.0 * vb * dl_dv), mask=tile_mask)
            if HAS_K4:
                tl.store(g_offs + _plane(P_K4, plane), tl.broadcast_to(0.5 * go, (BLOCK_B, BLOCK_K)),
                         mask=tile_mask)
                tl.store(g_offs + _plane(P_K4 + 1, plane), go * dl_dv, mask=tile_mask)


# ------------------------------------------------------------- precision backward
@triton.jit
def _precision_moment_grad_kernel(g_ptr, a_ptr, c_ptr, dm_ptr, dk2_ptr, dk3_ptr, dk4_ptr,
                                  B, K, D, sak, sad, sck, scd, plane,
                                  NEED_M: tl.constexpr, NEED_K2: tl.constexpr,
                                  NEED_K3: tl.constexpr, NEED_K4: tl.constexpr,
                                  P_K3: tl.constexpr, P_K4: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dm = g_u A + g_v C; dk2 = g_Saa A^2 + g_Scc C^2 + g_Sac AC;
    dk3 = g_Tacc AC^2 + g_Taac A^2C + g_C3 C^3; dk4 = g_Q A^2C^2 + g_C4 C^4."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = _tile_index(pid_b, BLOCK_B)
    lat = _tile_index(pid_d, BLOCK_D)
    rmask = rows < B
    dmask = lat < D
    dm = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    dk2 = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    dk3 = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    dk4 = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    for p0 in range(0, K, BLOCK_K):
        pix = p0 + tl.arange(0, BLOCK_K)
        pmask = pix < K
        w_mask = pmask[:, None] & dmask[None, :]
        g_mask = rmask[:, None] & pmask[None, :]
        a = tl.load(a_ptr + _offsets(pix, lat, sak, sad), mask=w_mask, other=0.0).to(ACC)
        c = tl.load(c_ptr + _offsets(pix, lat, sck, scd), mask=w_mask, other=0.0).to(ACC)
        g_offs = g_ptr + _offsets(rows, pix, K, 1)
        if NEED_M:
            g = tl.load(g_offs + _plane(0, plane), mask=g_mask, other=0.0)
            dm = tl.dot(g, a, dm, input_precision="ieee")
            g = tl.load(g_offs + _plane(1, plane), mask=g_mask, other=0.0)
            dm = tl.dot(g, c, dm, input_precision="ieee")
        if NEED_K2:
            g = tl.load(g_offs + _plane(2, plane), mask=g_mask, other=0.0)
            dk2 = tl.dot(g, a * a, dk2, input_precision="ieee")
            g = tl.load(g_offs + _plane(3, plane), mask=g_mask, other=0.0)
            dk2 = tl.dot(g, c * c, dk2, input_precision="ieee")
            g = tl.load(g_offs + _plane(4, plane), mask=g_mask, other=0.0)
            dk2 = tl.dot(g, a * c, dk2, input_precision="ieee")
        if NEED_K3:
            g = tl.load(g_offs + _plane(P_K3, plane), mask=g_mask, other=0.0)
            dk3 = tl.dot(g, a * c * c, dk3, input_precision="ieee")
            g = tl.load(g_offs + _plane(P_K3 + 1, plane), mask=g_mask, other=0.0)
            dk3 = tl.dot(g, a * a * c, dk3, input_precision="ieee")
            g = tl.load(g_offs + _plane(P_K3 + 2, plane), mask=g_mask, other=0.0)
            dk3 = tl.dot(g, c * c * c, dk3, input_precision="ieee")
        if NEED_K4:
            g = tl.load(g_offs + _plane(P_K4, plane), mask=g_mask, other=0.0)
            dk4 = tl.dot(g, a * a * c * c, dk4, input_precision="ieee")
            g = tl.load(g_offs + _plane(P_K4 + 1, plane), mask=g_mask, other=0.0)
            c2 = c * c
            dk4 = tl.dot(g, c2 * c2, dk4, input_precision="ieee")
    out_mask = rmask[:, None] & dmask[None, :]
    out_offs = _offsets(rows, lat, D, 1)
    if NEED_M:
        _store_out(dm_ptr + out_offs, dm, out_mask)
    if NEED_K2:
        _store_out(dk2_ptr + out_offs, dk2, out_mask)
    if NEED_K3:
        _store_out(dk3_ptr + out_offs, dk3, out_mask)
    if NEED_K4:
        _store_out(dk4_ptr + out_offs, dk4, out_mask)


@triton.jit
def _precision_weight_grad_kernel(g_ptr, m_ptr, k2_ptr, k3_ptr, k4_ptr, a_ptr, c_ptr, da_ptr, dc_ptr,
                                  B, K, D, smb, smd, svb, svd, s3b, s3d, s4b, s4d,
                                  sak, sad, sck, scd, plane,
                                  HAS_K3: tl.constexpr, HAS_K4: tl.constexpr,
                                  NEED_A: tl.constexpr, NEED_C: tl.constexpr,
                                  P_K3: tl.constexpr, P_K4: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """X_j = g_j^T (moment of j) over the batch, then (MATH.md §5)
    dA = X_u + 2A X_Saa + C X_Sac + C^2 X_Tacc + 2AC X_Taac + 2AC^2 X_Q,
    dC = X_v + 2C X_Scc + A X_Sac + 2AC X_Tacc + A^2 X_Taac + 3C^2 X_C3 + 2A^2C X_Q + 4C^3 X_C4."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    pix = _tile_index(pid_k, BLOCK_K)
    lat = _tile_index(pid_d, BLOCK_D)
    pmask = pix < K
    dmask = lat < D
    x_u = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_v = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_saa = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_scc = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_sac = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_tacc = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_taac = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_c3 = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_q = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    x_c4 = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    for n0 in range(0, B, BLOCK_B):
        rows = n0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        mom_mask = rmask[:, None] & dmask[None, :]
        gt_mask = pmask[:, None] & rmask[None, :]
        gt_offs = g_ptr + _offsets(pix, rows, 1, K)                      # g_j^T tiles (BLOCK_K, BLOCK_B)
        m = tl.load(m_ptr + _offsets(rows, lat, smb, smd), mask=mom_mask, other=0.0).to(ACC)
        k2 = tl.load(k2_ptr + _offsets(rows, lat, svb, svd), mask=mom_mask, other=0.0).to(ACC)
        if NEED_A:
            x_u = tl.dot(tl.load(gt_offs + _plane(0, plane), mask=gt_mask, other=0.0), m, x_u,
                         input_precision="ieee")
            x_saa = tl.dot(tl.load(gt_offs + _plane(2, plane), mask=gt_mask, other=0.0), k2, x_saa,
                           input_precision="ieee")
        if NEED_C:
            x_v = tl.dot(tl.load(gt_offs + _plane(1, plane), mask=gt_mask, other=0.0), m, x_v,
                         input_precision="ieee")
            x_scc = tl.dot(tl.load(gt_offs + _plane(3, plane), mask=gt_mask, other=0.0), k2, x_scc,
                           input_precision="ieee")
        x_sac = tl.dot(tl.load(gt_offs + _plane(4, plane), mask=gt_mask, other=0.0), k2, x_sac,
                       input_precision="ieee")
        if HAS_K3:
            k3 = tl.load(k3_ptr + _offsets(rows, lat, s3b, s3d), mask=mom_mask, other=0.0).to(ACC)
            x_tacc = tl.dot(tl.load(gt_offs + _plane(P_K3, plane), mask=gt_mask, other=0.0), k3, x_tacc,
                            input_precision="ieee")
            x_taac = tl.dot(tl.load(gt_offs + _plane(P_K3 + 1, plane), mask=gt_mask, other=0.0), k3,
                            x_taac, input_precision="ieee")
            if NEED_C:
                x_c3 = tl.dot(tl.load(gt_offs + _plane(P_K3 + 2, plane), mask=gt_mask, other=0.0), k3,
                              x_c3, input_precision="ieee")
        if HAS_K4:
            k4 = tl.load(k4_ptr + _offsets(rows, lat, s4b, s4d), mask=mom_mask, other=0.0).to(ACC)
            x_q = tl.dot(tl.load(gt_offs + _plane(P_K4, plane), mask=gt_mask, other=0.0), k4, x_q,
                         input_precision="ieee")
            if NEED_C:
                x_c4 = tl.dot(tl.load(gt_offs + _plane(P_K4 + 1, plane), mask=gt_mask, other=0.0), k4,
                              x_c4, input_precision="ieee")

    w_mask = pmask[:, None] & dmask[None, :]
    a = tl.load(a_ptr + _offsets(pix, lat, sak, sad), mask=w_mask, other=0.0).to(ACC)
    c = tl.load(c_ptr + _offsets(pix, lat, sck, scd), mask=w_mask, other=0.0).to(ACC)
    out_offs = _offsets(pix, lat, D, 1)
    if NEED_A:
        da = x_u + 2.0 * a * x_saa + c * x_sac
        if HAS_K3:
            da += c * c * x_tacc + 2.0 * a * c * x_taac
        if HAS_K4:
            da += 2.0 * a * c * c * x_q
        _store_out(da_ptr + out_offs, da, w_mask)
    if NEED_C:
        dc = x_v + 2.0 * c * x_scc + a * x_sac
        if HAS_K3:
            dc += 2.0 * a * c * x_tacc + a * a * x_taac + 3.0 * c * c * x_c3
        if HAS_K4:
            dc += 2.0 * a * a * c * x_q + 4.0 * c * c * c * x_c4
        _store_out(dc_ptr + out_offs, dc, w_mask)


# ----------------------------------------------------------------- fixed backward
@triton.jit
def _fixed_coef_kernel(x_ptr, m_ptr, a_ptr, b_ptr, s2_ptr, go_ptr,
                       g_ptr, dx_ptr, db_ptr, ds_ptr,
                       B, K, D, sxb, sxk, smb, smd, sak, sad, sb, ss, sgo,
                       HAS_BIAS: tl.constexpr, STORE_G: tl.constexpr, NEED_X: tl.constexpr,
                       NEED_B: tl.constexpr, NEED_S: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """g_u = -grad[n] (x - ubar) / sigma2 (stored), dx = -g_u, per-batch-tile partial
    column sums of g_u (bias) and of grad[n] (1/(2 sigma2) - e^2 / (2 sigma2^2)) (sigma2)."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = _tile_index(pid_b, BLOCK_B)
    pix = _tile_index(pid_k, BLOCK_K)
    rmask = rows < B
    pmask = pix < K
    ubar = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        lat = d0 + tl.arange(0, BLOCK_D)
        dmask = lat < D
        at = tl.load(a_ptr + _offsets(lat, pix, sad, sak), mask=dmask[:, None] & pmask[None, :],
                     other=0.0).to(ACC)
        m = tl.load(m_ptr + _offsets(rows, lat, smb, smd), mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        ubar = tl.dot(m, at, ubar, input_precision="ieee")
    if HAS_BIAS:
        ubar += tl.load(b_ptr + pix * sb, mask=pmask, other=0.0).to(ACC)[None, :]
    tile_mask = rmask[:, None] & pmask[None, :]
    x = tl.load(x_ptr + _offsets(rows, pix, sxb, sxk), mask=tile_mask, other=0.0).to(ACC)
    inv_s2 = 1.0 / tl.load(s2_ptr + pix * ss, mask=pmask, other=1.0).to(ACC)
    go = tl.load(go_ptr + rows * sgo, mask=rmask, other=0.0).to(ACC)[:, None]
    e = x - ubar
    g_u = tl.where(tile_mask, -go * e * inv_s2[None, :], 0.0)
    if STORE_G:
        tl.store(g_ptr + _offsets(rows, pix, K, 1), g_u, mask=tile_mask)
    if NEED_X:
        _store_out(dx_ptr + _offsets(rows, pix, K, 1), -g_u, tile_mask)
    if NEED_B:
        tl.store(db_ptr + pid_b.to(tl.int64) * K + pix, tl.sum(g_u, axis=0), mask=pmask)
    if NEED_S:
        half_inv = 0.5 * inv_s2[None, :]
        ds = tl.where(tile_mask, go * half_inv * (1.0 - e * e * inv_s2[None, :]), 0.0)
        tl.store(ds_ptr + pid_b.to(tl.int64) * K + pix, tl.sum(ds, axis=0), mask=pmask)


@triton.jit
def _fixed_moment_grad_kernel(g_ptr, a_ptr, s2_ptr, go_ptr, dm_ptr, dv_ptr,
                              B, K, D, sak, sad, ss, sgo,
                              NEED_M: tl.constexpr, NEED_V: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dm = g_u A (GEMM); dk2[n, i] = grad[n] w_i, w_i = sum_p A_pi^2 / (2 sigma_p^2) (O(kd))."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = _tile_index(pid_b, BLOCK_B)
    lat = _tile_index(pid_d, BLOCK_D)
    rmask = rows < B
    dmask = lat < D
    dm = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    w = tl.zeros((BLOCK_D,), dtype=ACC)
    for p0 in range(0, K, BLOCK_K):
        pix = p0 + tl.arange(0, BLOCK_K)
        pmask = pix < K
        a = tl.load(a_ptr + _offsets(pix, lat, sak, sad), mask=pmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        if NEED_M:
            g = tl.load(g_ptr + _offsets(rows, pix, K, 1), mask=rmask[:, None] & pmask[None, :], other=0.0)
            dm = tl.dot(g, a, dm, input_precision="ieee")
        if NEED_V:
            half_inv = 0.5 / tl.load(s2_ptr + pix * ss, mask=pmask, other=1.0).to(ACC)
            w += tl.sum(a * a * half_inv[:, None], axis=0)
    out_mask = rmask[:, None] & dmask[None, :]
    out_offs = _offsets(rows, lat, D, 1)
    if NEED_M:
        _store_out(dm_ptr + out_offs, dm, out_mask)
    if NEED_V:
        go = tl.load(go_ptr + rows * sgo, mask=rmask, other=0.0).to(ACC)
        _store_out(dv_ptr + out_offs, go[:, None] * w[None, :], out_mask)


@triton.jit
def _fixed_weight_grad_kernel(g_ptr, m_ptr, k2_ptr, a_ptr, s2_ptr, go_ptr, da_ptr, ds_ptr,
                              B, K, D, smb, smd, svb, svd, sak, sad, ss, sgo,
                              NEED_A: tl.constexpr, NEED_S: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dA = g_u^T m + A r / sigma2 with r_i = sum_n grad[n] k2_ni; the Saa part of dsigma2,
    -sum_i A_pi^2 r_i / (2 sigma_p^4), as per-latent-tile partial sums."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    pix = _tile_index(pid_k, BLOCK_K)
    lat = _tile_index(pid_d, BLOCK_D)
    pmask = pix < K
    dmask = lat < D
    xu = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    r = tl.zeros((BLOCK_D,), dtype=ACC)
    for n0 in range(0, B, BLOCK_B):
        rows = n0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        mom_mask = rmask[:, None] & dmask[None, :]
        if NEED_A:
            gt = tl.load(g_ptr + _offsets(pix, rows, 1, K), mask=pmask[:, None] & rmask[None, :], other=0.0)
            m = tl.load(m_ptr + _offsets(rows, lat, smb, smd), mask=mom_mask, other=0.0).to(ACC)
            xu = tl.dot(gt, m, xu, input_precision="ieee")
        go = tl.load(go_ptr + rows * sgo, mask=rmask, other=0.0).to(ACC)
        k2 = tl.load(k2_ptr + _offsets(rows, lat, svb, svd), mask=mom_mask, other=0.0).to(ACC)
        r += tl.sum(go[:, None] * k2, axis=0)
    w_mask = pmask[:, None] & dmask[None, :]
    a = tl.load(a_ptr + _offsets(pix, lat, sak, sad), mask=w_mask, other=0.0).to(ACC)
    inv_s2 = 1.0 / tl.load(s2_ptr + pix * ss, mask=pmask, other=1.0).to(ACC)
    if NEED_A:
        _store_out(da_ptr + _offsets(pix, lat, D, 1), xu + a * r[None, :] * inv_s2[:, None], w_mask)
    if NEED_S:
        part = -0.5 * inv_s2 * inv_s2 * tl.sum(a * a * r[None, :], axis=1)
        tl.store(ds_ptr + pid_d.to(tl.int64) * K + pix, part, mask=pmask)


# ------------------------------------------------------------------- host side
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# GPU block configurations (BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages), per kernel and
# accumulator width. Not timed (no GPU was available); chosen as the largest tiles whose
# sm_90 build needs no local memory (no register spills) by `cuobjdump -res-usage` on an
# ahead-of-time compile: the fp32 "ieee" dots run on FMA units and hold operand slices in
# registers, so the tiles are smaller than a tensor-core GEMM's. "prec" = the precision
# forward / coefficient kernel ("_g" without k3/k4), "mom" / "w" = moment / weight gradients.
_GPU_CONFIGS = {
    4: {"fixed": (64, 64, 32, 8, 1), "prec_g": (64, 32, 16, 8, 1), "prec": (32, 32, 16, 8, 1),
        "mom": (32, 16, 32, 8, 1), "w": (32, 32, 32, 8, 2)},
    8: {"fixed": (32, 64, 32, 8, 1), "prec_g": (16, 32, 16, 8, 1), "prec": (16, 32, 16, 8, 1),
        "mom": (32, 16, 32, 8, 1), "w": (32, 32, 16, 8, 2)},
}


_USE_GPU_TABLE = False  # tests set this to run the GPU tiling in the interpreter


def _config(kernel: str, B: int, K: int, D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """One block configuration per launch (tl.dot needs every block dimension >= 16).

    Interpreter (or CPU tensors): blocks sized to the problem, since fewer and larger
    programs run fastest there. GPU: the table above, shrunk to the problem's size.
    """
    if not _USE_GPU_TABLE and (INTERPRET or device.type != "cuda"):
        return dict(BLOCK_B=_pow2(B, 16, 64), BLOCK_K=_pow2(K, 16, 128), BLOCK_D=_pow2(D, 16, 64))
    bb, bk, bd, warps, stages = _GPU_CONFIGS[8 if dtype == torch.float64 else 4][kernel]
    return dict(BLOCK_B=_pow2(B, 16, bb), BLOCK_K=_pow2(K, 16, bk), BLOCK_D=_pow2(D, 16, bd),
                num_warps=warps, num_stages=stages)


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _check_device(x: Tensor) -> None:
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors, got {x.device}; CPU tensors work only in the "
            "Triton interpreter (set TRITON_INTERPRET=1 before silent_kernels.triton_kernels is imported)")


def _check_shapes(x: Tensor, moments: Sequence[Optional[Tensor]], weights: Sequence[Tensor],
                  vectors: Sequence[Optional[Tensor]]) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (B, k), got {tuple(x.shape)}")
    B, K = x.shape
    D = weights[0].shape[1] if weights[0].dim() == 2 else -1
    for t in moments:
        if t is not None and tuple(t.shape) != (B, D):
            raise ValueError(f"moments: expected shape {(B, D)}, got {tuple(t.shape)}")
    for t in weights:
        if tuple(t.shape) != (K, D):
            raise ValueError(f"weights: expected shape {(K, D)}, got {tuple(t.shape)}")
    for t in vectors:
        if t is not None and tuple(t.shape) != (K,):
            raise ValueError(f"bias/sigma2: expected shape {(K,)}, got {tuple(t.shape)}")
    for t in (*moments, *weights, *vectors):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"all inputs must share x's dtype {x.dtype} and device {x.device}, "
                             f"got {t.dtype} on {t.device}")
    _check_device(x)
    return B, K, D


def _check_needs(needs: Sequence[bool], n: int) -> None:
    if len(needs) != n:
        raise ValueError(f"needs: expected {n} flags (one per input), got {len(needs)}")


def _launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    if grid[0] == 0 or grid[1] == 0:
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _vec_stride(t: Optional[Tensor]) -> int:
    return t.stride(0) if t is not None else 0


def fixed_forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
                  sigma2: Tensor) -> Tensor:
    """Per-sample fixed-variance NLL (B,), in x's dtype."""
    B, K, D = _check_shapes(x, (mean, var), (weight,), (bias, sigma2))
    if B == 0 or K == 0:
        return x.new_zeros(B)
    acc_tl, acc_torch = _acc(x.dtype)
    cfg = _config("fixed", B, K, D, x.dtype, x.device)
    n_k = _cdiv(K, cfg["BLOCK_K"])
    part = torch.empty((n_k, B), dtype=acc_torch, device=x.device)
    _launch(_fixed_fwd_kernel, (_cdiv(B, cfg["BLOCK_B"]), n_k), x.device,
            x, mean, var, weight, bias if bias is not None else x, sigma2, part,
            B, K, D, *x.stride(), *mean.stride(), *var.stride(), *weight.stride(),
            _vec_stride(bias), sigma2.stride(0),
            HAS_BIAS=bias is not None, ACC=acc_tl, **cfg)
    return part.sum(0).to(x.dtype)


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


def fixed_backward(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor,
                   bias: Optional[Tensor], sigma2: Tensor, needs: Sequence[bool]) -> tuple[Tensor, ...]:
    """Gradients w.r.t. (x, mean, var, weight, bias, sigma2); (0,) tensors where not needed."""
    inputs = (x, mean, var, weight, bias, sigma2)
    _check_needs(needs, len(inputs))
    need = [bool(n) and t is not None for n, t in zip(needs, inputs)]
    B, K, D = _check_shapes(x, (mean, var), (weight,), (bias, sigma2))
    if tuple(grad.shape) != (B,):
        raise ValueError(f"grad: expected shape {(B,)}, got {tuple(grad.shape)}")
    degenerate = B == 0 or K == 0
    outs = [(t.new_zeros(t.shape) if degenerate else t.new_empty(t.shape)) if n else _empty(grad)
            for t, n in zip(inputs, need)]
    if degenerate or not any(need):
        return tuple(outs)
    need_x, need_m, need_v, need_a, need_b, need_s = need
    dx, dm, dv, da, db, ds = outs
    acc_tl, acc_torch = _acc(x.dtype)
    dev = x.device
    cfg = _config("fixed", B, K, D, x.dtype, dev)
    n_b, n_k, n_d = _cdiv(B, cfg["BLOCK_B"]), _cdiv(K, cfg["BLOCK_K"]), _cdiv(D, cfg["BLOCK_D"])
    dummy = x  # stands in for pointers a kernel does not dereference (its flag is off)
    store_g = (need_m or need_a) and D > 0
    g = torch.empty((B, K), dtype=acc_torch, device=dev) if store_g else dummy
    db_part = torch.empty((n_b, K), dtype=acc_torch, device=dev) if need_b else dummy
    ds_part = torch.empty((n_b, K), dtype=acc_torch, device=dev) if need_s else dummy
    if need_x or need_b or need_s or store_g:
        _launch(_fixed_coef_kernel, (n_b, n_k), dev,
                x, mean, weight, bias if bias is not None else x, sigma2, grad,
                g, dx if need_x else dummy, db_part, ds_part,
                B, K, D, *x.stride(), *mean.stride(), *weight.stride(), _vec_stride(bias),
                sigma2.stride(0), grad.stride(0),
                HAS_BIAS=bias is not None, STORE_G=store_g, NEED_X=need_x, NEED_B=need_b,
                NEED_S=need_s, ACC=acc_tl, **cfg)
    if (need_m or need_v) and D > 0:
        _launch(_fixed_moment_grad_kernel, (n_b, n_d), dev,
                g, weight, sigma2, grad, dm if need_m else dummy, dv if need_v else dummy,
                B, K, D, *weight.stride(), sigma2.stride(0), grad.stride(0),
                NEED_M=need_m, NEED_V=need_v, ACC=acc_tl, **cfg)
    ds2_part = None
    if (need_a or need_s) and D > 0:
        ds2_part = torch.empty((n_d, K), dtype=acc_torch, device=dev) if need_s else dummy
        _launch(_fixed_weight_grad_kernel, (n_k, n_d), dev,
                g, mean, var, weight, sigma2, grad, da if need_a else dummy, ds2_part,
                B, K, D, *mean.stride(), *var.stride(), *weight.stride(), sigma2.stride(0),
                grad.stride(0), NEED_A=need_a, NEED_S=need_s, ACC=acc_tl, **cfg)
    if need_b:
        db.copy_(db_part.sum(0))
    if need_s:
        total = ds_part.sum(0)
        if need_s and ds2_part is not None:
            total = total + ds2_part.sum(0)
        ds.copy_(total)
    return tuple(outs)


def _precision_planes(has_k3: bool, has_k4: bool) -> tuple[int, int, int]:
    """Plane layout of the coefficient buffer: [u, v, Saa, Scc, Sac, (Tacc, Taac, C3), (Q, C4)]."""
    p_k3 = 5
    p_k4 = 5 + 3 * has_k3
    return p_k3, p_k4, p_k4 + 2 * has_k4


def _precision_coef_config(x: Tensor, D: int, k3, k4) -> dict:
    kind = "prec" if (k3 is not None or k4 is not None) else "prec_g"
    return _config(kind, x.shape[0], x.shape[1], D, x.dtype, x.device)


def _precision_launch_coef(x, mean, var, k3, k4, weight, bias, pw, pb, *, grad=None, part=None,
                           g=None, dx=None, db=None, dbc=None, cfg, acc_tl):
    B, K = x.shape
    D = weight.shape[1]
    p_k3, p_k4, _ = _precision_planes(k3 is not None, k4 is not None)
    dummy = x
    _launch(_precision_fwd_kernel, (_cdiv(B, cfg["BLOCK_B"]), _cdiv(K, cfg["BLOCK_K"])), x.device,
            x, mean, var, k3 if k3 is not None else dummy, k4 if k4 is not None else dummy,
            weight, bias if bias is not None else dummy, pw, pb if pb is not None else dummy,
            grad if grad is not None else dummy, part if part is not None else dummy,
            g if g is not None else dummy, dx if dx is not None else dummy,
            db if db is not None else dummy, dbc if dbc is not None else dummy,
            B, K, D, *x.stride(), *mean.stride(), *var.stride(),
            *(k3.stride() if k3 is not None else (0, 0)), *(k4.stride() if k4 is not None else (0, 0)),
            *weight.stride(), _vec_stride(bias), *pw.stride(), _vec_stride(pb),
            grad.stride(0) if grad is not None else 0, B * K,
            HAS_K3=k3 is not None, HAS_K4=k4 is not None, HAS_BIAS=bias is not None,
            HAS_PBIAS=pb is not None, GRAD=grad is not None, STORE_G=g is not None,
            NEED_X=dx is not None, NEED_B=db is not None, NEED_BC=dbc is not None,
            P_K3=p_k3, P_K4=p_k4, ACC=acc_tl, **cfg)


def precision_forward(x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor], k4: Optional[Tensor],
                      weight: Tensor, bias: Optional[Tensor], precision_weight: Tensor,
                      precision_bias: Optional[Tensor]) -> Tensor:
    """Per-sample learnable-precision NLL (B,), in x's dtype."""
    B, K, D = _check_shapes(x, (mean, var, k3, k4), (weight, precision_weight), (bias, precision_bias))
    if B == 0 or K == 0:
        return x.new_zeros(B)
    acc_tl, acc_torch = _acc(x.dtype)
    cfg = _precision_coef_config(x, D, k3, k4)
    part = torch.empty((_cdiv(K, cfg["BLOCK_K"]), B), dtype=acc_torch, device=x.device)
    _precision_launch_coef(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias,
                           part=part, cfg=cfg, acc_tl=acc_tl)
    return part.sum(0).to(x.dtype)


def precision_backward(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, k3: Optional[Tensor],
                       k4: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                       precision_weight: Tensor, precision_bias: Optional[Tensor],
                       needs: Sequence[bool]) -> tuple[Tensor, ...]:
    """Gradients w.r.t. the 9 inputs of ``precision_forward``; (0,) tensors where not needed."""
    inputs = (x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias)
    _check_needs(needs, len(inputs))
    need = [bool(n) and t is not None for n, t in zip(needs, inputs)]
    B, K, D = _check_shapes(x, (mean, var, k3, k4), (weight, precision_weight), (bias, precision_bias))
    if tuple(grad.shape) != (B,):
        raise ValueError(f"grad: expected shape {(B,)}, got {tuple(grad.shape)}")
    degenerate = B == 0 or K == 0
    outs = [(t.new_zeros(t.shape) if degenerate else t.new_empty(t.shape)) if n else _empty(grad)
            for t, n in zip(inputs, need)]
    if degenerate or not any(need):
        return tuple(outs)
    need_x, need_m, need_v, need_k3, need_k4, need_a, need_b, need_c, need_bc = need
    dx, dm, dv, dk3, dk4, da, db, dc, dbc = outs
    acc_tl, acc_torch = _acc(x.dtype)
    dev = x.device
    has_k3, has_k4 = k3 is not None, k4 is not None
    cfg = _precision_coef_config(x, D, k3, k4)
    cfg_m = _config("mom", B, K, D, x.dtype, dev)
    cfg_w = _config("w", B, K, D, x.dtype, dev)
    n_b = _cdiv(B, cfg["BLOCK_B"])
    p_k3, p_k4, n_planes = _precision_planes(has_k3, has_k4)
    store_g = any((need_m, need_v, need_k3, need_k4, need_a, need_c)) and D > 0
    g = torch.empty((n_planes, B, K), dtype=acc_torch, device=dev) if store_g else None
    db_part = torch.empty((n_b, K), dtype=acc_torch, device=dev) if need_b else None
    dbc_part = torch.empty((n_b, K), dtype=acc_torch, device=dev) if need_bc else None
    _precision_launch_coef(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias,
                           grad=grad, g=g, dx=dx if need_x else None, db=db_part, dbc=dbc_part,
                           cfg=cfg, acc_tl=acc_tl)
    dummy = x
    if any((need_m, need_v, need_k3, need_k4)) and D > 0:
        _launch(_precision_moment_grad_kernel, (_cdiv(B, cfg_m["BLOCK_B"]), _cdiv(D, cfg_m["BLOCK_D"])), dev,
                g, weight, precision_weight, dm if need_m else dummy, dv if need_v else dummy,
                dk3 if need_k3 else dummy, dk4 if need_k4 else dummy,
                B, K, D, *weight.stride(), *precision_weight.stride(), B * K,
                NEED_M=need_m, NEED_K2=need_v, NEED_K3=need_k3, NEED_K4=need_k4,
                P_K3=p_k3, P_K4=p_k4, ACC=acc_tl, **cfg_m)
    if (need_a or need_c) and D > 0:
        _launch(_precision_weight_grad_kernel, (_cdiv(K, cfg_w["BLOCK_K"]), _cdiv(D, cfg_w["BLOCK_D"])), dev,
                g, mean, var, k3 if has_k3 else dummy, k4 if has_k4 else dummy,
                weight, precision_weight, da if need_a else dummy, dc if need_c else dummy,
                B, K, D, *mean.stride(), *var.stride(),
                *(k3.stride() if has_k3 else (0, 0)), *(k4.stride() if has_k4 else (0, 0)),
                *weight.stride(), *precision_weight.stride(), B * K,
                HAS_K3=has_k3, HAS_K4=has_k4, NEED_A=need_a, NEED_C=need_c,
                P_K3=p_k3, P_K4=p_k4, ACC=acc_tl, **cfg_w)
    if need_b:
        db.copy_(db_part.sum(0))
    if need_bc:
        dbc.copy_(dbc_part.sum(0))
    return tuple(outs)
