"""What every Triton kernel of the package shares: int64 index arithmetic, tile loads and
stores, block configurations, input checks, workspaces and launching (no loss math here).

Numerics: fp16 / bf16 / fp32 inputs are loaded and accumulated in fp32, fp64 inputs in
fp64 (``tl.dot`` on fp64 runs in the interpreter and compiles for sm_90); outputs are
written in the input dtype. Every dot asks for ``input_precision="ieee"``: TF32 would
destroy the cancellations in the centred contractions.

Addresses: all offsets are int64 (``tile_index`` / ``offsets`` / ``plane``); every load and
store is masked on ragged edges; every tensor is addressed through both of its strides, so
non-contiguous and stride-0 (expanded) inputs are read correctly without copies.

Block sizes: one configuration per launch. Under TRITON_INTERPRET=1 (or for CPU tensors)
the blocks are sized to the problem, since fewer and larger programs run fastest in the
interpreter; on a GPU each kernel module has a fixed table per accumulator width, chosen so
that no kernel spills registers on sm_90. No autotuning: nothing could be timed without a GPU.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .moments import LOG_2PI

__all__ = [
    "INTERPRET", "HALF_LOG_2PI", "tile_index", "offsets", "plane", "store_out",
    "program_tile", "block_range", "load_tile", "load_vec", "partial_row", "load_plane",
    "plane_dot", "contraction_zeros", "store_x_and_bias_grads",
    "block_config", "acc_dtypes", "check_device", "check_shapes", "check_needs", "check_grad",
    "grad_outputs", "backward_outputs", "launch", "tile_grid", "cdiv", "vec_stride", "mat_strides",
    "opt", "workspace", "reduce_partials",
]

# Read once at import, like triton.jit itself does when it decorates the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

HALF_LOG_2PI = tl.constexpr(0.5 * LOG_2PI)


# ----------------------------------------------------------------- index arithmetic
# A program id or a loop index is widened *before* it is multiplied by a block size or a
# stride, so B * k, k * d or (#planes) * B * k beyond 2^31 elements never wraps.
@triton.jit
def tile_index(pid, BLOCK: tl.constexpr):
    """Indices pid * BLOCK + [0, BLOCK) of a program's tile, as int64."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def offsets(rows, cols, stride_r, stride_c):
    """Element offsets rows[:, None] * stride_r + cols[None, :] * stride_c, in int64."""
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def plane(J: tl.constexpr, plane_stride):
    """Offset of plane J of a stacked (planes, B, k) buffer, in int64 (plane_stride may be
    specialised to a constexpr 1 by the launcher, so it is not ``.to()``-cast)."""
    return tl.full([], J, tl.int64) * plane_stride


@triton.jit
def store_out(ptrs, val, mask):
    """Store into an output in the input dtype. bf16 is rounded to nearest-even here, by bit
    arithmetic, because the interpreter's fp32 -> bf16 cast truncates; the result is then
    exactly representable, so the GPU's (round-to-nearest) cast gives the same bits."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        f = val.to(tl.float32)
        bits = f.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        val = tl.where(f != f, f, bits.to(tl.float32, bitcast=True))
    tl.store(ptrs, val, mask=mask)


# ------------------------------------------------------------------ tiles and loads
@triton.jit
def program_tile(n0, n1, BLOCK_0: tl.constexpr, BLOCK_1: tl.constexpr):
    """This program's tile of a 2-D grid over an (n0, n1) index space: the program ids
    (pid0, pid1), the int64 indices of both axes, (BLOCK_0,) and (BLOCK_1,), and their
    in-range masks."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    idx0 = tile_index(pid0, BLOCK_0)
    idx1 = tile_index(pid1, BLOCK_1)
    return pid0, pid1, idx0, idx1, idx0 < n0, idx1 < n1


@triton.jit
def block_range(start, n, BLOCK: tl.constexpr):
    """Indices start + [0, BLOCK) of one step of a loop over an axis of length n (int32, like
    the loop counter; ``offsets`` widens them) and their in-range mask."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < n


@triton.jit
def load_tile(ptr, rows, cols, stride_r, stride_c, mask, ACC: tl.constexpr):
    """The (len(rows), len(cols)) tile ptr[rows * stride_r + cols * stride_c] in ACC, 0 where
    ``mask`` is off."""
    return tl.load(ptr + offsets(rows, cols, stride_r, stride_c), mask=mask, other=0.0).to(ACC)


@triton.jit
def load_vec(ptr, idx, stride, mask, other, ACC: tl.constexpr):
    """ptr[idx * stride] in ACC, ``other`` where ``mask`` is off."""
    return tl.load(ptr + idx * stride, mask=mask, other=other).to(ACC)


@triton.jit
def partial_row(ptr, tile, n, idx):
    """Pointers ptr + tile * n + idx (int64) into row ``tile`` of a (num_tiles, n) buffer of
    per-tile partial sums."""
    return ptr + tile.to(tl.int64) * n + idx


@triton.jit
def load_plane(base, J: tl.constexpr, plane_stride, mask):
    """Plane J of a stacked (planes, B, k) buffer; ``base``: the tile's pointers into plane 0.
    The buffer is in the accumulation dtype, so no cast."""
    return tl.load(base + plane(J, plane_stride), mask=mask, other=0.0)


@triton.jit
def plane_dot(base, J: tl.constexpr, plane_stride, mask, rhs, acc):
    """acc + (plane J tile) @ rhs, an ieee dot (TF32 would break the centred contractions).
    ``rhs`` is evaluated before the load: pass a tensor already formed, not an expression, or the
    kernel's instruction order (and its register allocation) changes."""
    return tl.dot(load_plane(base, J, plane_stride, mask), rhs, acc, input_precision="ieee")


@triton.jit
def contraction_zeros(BLOCK_0: tl.constexpr, BLOCK_1: tl.constexpr, ACC: tl.constexpr):
    """Ten (BLOCK_0, BLOCK_1) zero tiles in ACC: accumulators for the ten contractions of the
    mean-field stage (ubar, vbar, Saa, Scc, Sac, Tacc, Taac, C3, Q, C4) or their gradients."""
    z = tl.zeros((BLOCK_0, BLOCK_1), dtype=ACC)
    return z, z, z, z, z, z, z, z, z, z


@triton.jit
def store_x_and_bias_grads(dx_ptr, db_ptr, g, tile, rows, cols, n_cols, tile_mask, col_mask,
                           NEED_X: tl.constexpr, NEED_B: tl.constexpr):
    """Gradients of x and of the bias from g = d loss / d(prediction) on a (rows, cols) tile,
    where the loss depends on x - prediction and the bias adds to the prediction: dx = -g into a
    contiguous (B, n_cols) output, and the bias's partial column sums over the tile's rows into
    row ``tile`` of a (num_row_tiles, n_cols) buffer."""
    if NEED_X:
        store_out(dx_ptr + offsets(rows, cols, n_cols, 1), -g, tile_mask)
    if NEED_B:
        tl.store(partial_row(db_ptr, tile, n_cols, cols), tl.sum(g, axis=0), mask=col_mask)


# ------------------------------------------------------------------- host side
def pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def sized_to_problem(device: torch.device) -> bool:
    """Interpreter-style blocks (sized to the problem) rather than the GPU table."""
    return INTERPRET or device.type != "cuda"


def block_config(table: dict, kernel: str, B: int, K: int, D: int, dtype: torch.dtype,
                 device: torch.device, lo: int = 16, interp_max=(64, 128, 64)) -> dict:
    """One block configuration per launch.

    ``table[4 or 8][kernel] = (BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages)`` for 4- and
    8-byte accumulators. ``lo``: the smallest block (``tl.dot`` needs 16 in every dimension;
    kernels without dots may go lower). Interpreter: blocks sized to the problem, capped at
    ``interp_max``; GPU: the table's blocks, shrunk to the problem's size.
    """
    if sized_to_problem(device):
        bb, bk, bd = interp_max
        return dict(BLOCK_B=pow2(B, lo, bb), BLOCK_K=pow2(K, lo, bk), BLOCK_D=pow2(D, lo, bd))
    bb, bk, bd, warps, stages = table[8 if dtype == torch.float64 else 4][kernel]
    return dict(BLOCK_B=pow2(B, lo, bb), BLOCK_K=pow2(K, lo, bk), BLOCK_D=pow2(D, lo, bd),
                num_warps=warps, num_stages=stages)


def acc_dtypes(dtype: torch.dtype):
    """(Triton, torch) accumulation dtypes for inputs of ``dtype``."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def check_device(x: Tensor) -> None:
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors, got {x.device}; CPU tensors work only in the "
            "Triton interpreter (set TRITON_INTERPRET=1 before the Triton kernels are imported)")


def check_shapes(x: Tensor, moments: Sequence[Optional[Tensor]], weights: Sequence[Tensor],
                 vectors: Sequence[Optional[Tensor]]) -> tuple[int, int, int]:
    """x (B, k), moments / logits (B, d), weights (k, d), vectors (k,); one dtype and device."""
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
    check_device(x)
    return B, K, D


def check_needs(needs: Sequence[bool], n: int) -> None:
    if len(needs) != n:
        raise ValueError(f"needs: expected {n} flags (one per input), got {len(needs)}")


def check_grad(grad: Tensor, B: int) -> None:
    if tuple(grad.shape) != (B,):
        raise ValueError(f"grad: expected shape {(B,)}, got {tuple(grad.shape)}")


def grad_outputs(grad: Tensor, inputs: Sequence[Optional[Tensor]], needs: Sequence[bool],
                 degenerate: bool) -> tuple[list[bool], list[Tensor]]:
    """The backward contract: which gradients to compute (asked for and the input present) and
    their output tensors (zeros when B or k is 0, an empty (0,) tensor where not needed)."""
    check_needs(needs, len(inputs))
    need = [bool(n) and t is not None for n, t in zip(needs, inputs)]
    outs = [(t.new_zeros(t.shape) if degenerate else t.new_empty(t.shape)) if n else grad.new_empty(0)
            for t, n in zip(inputs, need)]
    return need, outs


def backward_outputs(grad: Tensor, inputs: Sequence[Optional[Tensor]], needs: Sequence[bool],
                     B: int, K: int) -> tuple[Optional[list[bool]], list[Tensor]]:
    """``check_grad`` and ``grad_outputs`` for a backward over B samples and K pixels; ``need``
    is None when no kernel has to run (B or K is 0, or no gradient is needed)."""
    check_grad(grad, B)
    degenerate = B == 0 or K == 0
    need, outs = grad_outputs(grad, inputs, needs, degenerate)
    return (None if degenerate or not any(need) else need), outs


def workspace(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
              needed: bool = True) -> Optional[Tensor]:
    """An uninitialised buffer the kernels fill (partial sums, coefficients), or None."""
    return torch.empty(tuple(shape), dtype=dtype, device=device) if needed else None


def reduce_partials(out: Tensor, part: Optional[Tensor]) -> None:
    """out = the sum of a (num_tiles, ...) buffer of per-tile partial sums over its tiles; nothing
    when the buffer was not allocated (``workspace`` gave None: the gradient is not needed)."""
    if part is not None:
        out.copy_(part.sum(0))


def tile_grid(cfg: dict, **extents: int) -> tuple[int, ...]:
    """Launch grid over the named axes, in order: ``tile_grid(cfg, B=B, K=K)`` is
    (cdiv(B, cfg["BLOCK_B"]), cdiv(K, cfg["BLOCK_K"]))."""
    return tuple(cdiv(n, cfg["BLOCK_" + axis]) for axis, n in extents.items())


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    if grid[0] == 0 or grid[1] == 0:
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def vec_stride(t: Optional[Tensor]) -> int:
    return t.stride(0) if t is not None else 0


def mat_strides(t: Optional[Tensor]) -> tuple[int, int]:
    """Both strides of an optional 2-D tensor ((0, 0) when absent)."""
    return tuple(t.stride()) if t is not None else (0, 0)


def opt(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    """``t``, or a stand-in pointer for a kernel argument whose flag is off (never read)."""
    return t if t is not None else dummy
