"""Host launchers of the categorical Triton kernels (triton_categorical): checks, block sizes, outputs, launches."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .triton_categorical import HEAD_FIXED, HEAD_LOGVAR, HEAD_TAYLOR, categorical_kernel
from .triton_common import (pow2, sized_to_problem, acc_dtypes, backward_outputs, cdiv, check_device, launch,
                            mat_strides, opt, tile_grid, vec_stride, workspace)

__all__ = ["categorical_forward", "categorical_backward"]

_HEAD_NAMES = {HEAD_FIXED: "fixed", HEAD_TAYLOR: "precision, Taylor log term", HEAD_LOGVAR: "log-variance"}

# Elements of one (BLOCK_B, BLOCK_P, BLOCK_C) tile. GPU: a program holds about ten such tiles
# live (deviations, their products, the gradient terms), so the budget is small: the largest
# power of two whose sm_90 build of every head needs no local memory (Triton's ptxas,
# cuobjdump -res-usage; tests/test_triton_categorical.py checks it). Not timed (no GPU here).
# Interpreter: larger tiles, fewer programs.
_GPU_TILE = {4: {"fwd": 2048, "bwd": 1024}, 8: {"fwd": 512, "bwd": 512}}
# ... and at most this many (sample, pixel) pairs: the ten 2-D accumulators matter at small K.
_GPU_PAIRS = {4: 512, 8: 128}
_INTERP_TILE = 16384
_GPU_WARPS = 4


def _config(B: int, P: int, ncat: int, dtype: torch.dtype, device: torch.device, kind: str = "fwd") -> dict:
    """Blocks: all categories of a group in one block; samples and pixels share the rest of the
    tile budget (``kind`` "fwd" or "bwd": the backward holds more tiles). Interpreter / CPU
    tensors: a large budget (fewer, larger programs)."""
    interp = sized_to_problem(device)
    width = 8 if dtype == torch.float64 else 4
    budget = _INTERP_TILE if interp else _GPU_TILE[width][kind]
    pairs = 1 << 30 if interp else _GPU_PAIRS[width]
    bc = pow2(ncat, 2, 1 << 20)
    rest = max(1, budget // bc)
    # samples and pixels about equal (a power of two each): the backward's dlogits partials
    # scale as B k d / BLOCK_P and its dweight partials as B k d / BLOCK_B
    half = 1 << max(0, (rest.bit_length() - 1) // 2)
    bb = pow2(B, 2, max(2, min(16, half)))
    bp = pow2(P, 2, max(2, min(64, rest // bb, pairs // bb)))
    cfg = dict(BLOCK_B=bb, BLOCK_P=bp, BLOCK_C=bc)
    if not interp:
        cfg.update(num_warps=_GPU_WARPS, num_stages=1)
    return cfg


def _check(x: Tensor, logits: Tensor, weight: Tensor, bias, second_weight, second_bias, sigma2,
           head: int) -> tuple[int, int, int, int]:
    """Shapes, dtypes, device and the head / argument combination (as the C++ op checks)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (B, k), got {tuple(x.shape)}")
    B, P = x.shape
    if logits.dim() != 3 or logits.shape[0] != B:
        raise ValueError(f"logits: expected shape (B={B}, G, K), got {tuple(logits.shape)}")
    G, ncat = logits.shape[1], logits.shape[2]
    D = G * ncat
    for name, t, shape in (("weight", weight, (P, D)), ("bias", bias, (P,)),
                           ("second_weight", second_weight, (P, D)), ("second_bias", second_bias, (P,)),
                           ("sigma2", sigma2, (P,))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    for name, t in (("logits", logits), ("weight", weight), ("bias", bias), ("second_weight", second_weight),
                    ("second_bias", second_bias), ("sigma2", sigma2)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name}: all inputs must share x's dtype {x.dtype} and device {x.device}, "
                             f"got {t.dtype} on {t.device}")
    if head not in _HEAD_NAMES:
        raise RuntimeError(f"head: expected 3 (fixed), 0 (precision, Taylor log term) or 2 (log-variance), "
                           f"got {head}")
    has_w2, has_s2 = second_weight is not None, sigma2 is not None
    if head == HEAD_FIXED and not (has_s2 and not has_w2):
        raise RuntimeError(f"head={head} (fixed) needs sigma2 and no second_weight")
    if head != HEAD_FIXED and not (has_w2 and not has_s2):
        raise RuntimeError(f"head={head} needs second_weight and no sigma2")
    check_device(x)
    return B, P, G, ncat


def _log_probs(logits: Tensor, acc_torch: torch.dtype) -> Tensor:
    """Per-group normalised log-probabilities (B, G K), contiguous, in the accumulation dtype."""
    B, G, ncat = logits.shape
    return torch.log_softmax(logits.to(acc_torch), dim=-1).reshape(B, G * ncat).contiguous()


def _launch(x, lp, weight, bias, second_weight, second_bias, sigma2, head, cfg, acc_tl, *,
            grad=None, loss=None, dx=None, dl=None, da=None, dc=None, dv=None, needs=(False,) * 7,
            G: int, ncat: int):
    B, P = x.shape
    need_x, need_l, need_a, need_b, need_c, need_c0, need_s2 = needs
    n_b, n_p = tile_grid(cfg, B=B, P=P)
    launch(categorical_kernel, (n_b, n_p), x.device,
           x, lp, weight, opt(bias, x), opt(second_weight, x), opt(second_bias, x), opt(sigma2, x),
           opt(grad, x), opt(loss, lp), opt(dx, x), opt(dl, lp), opt(da, lp), opt(dc, lp), opt(dv, lp),
           B, P, G, ncat, *x.stride(), *weight.stride(), vec_stride(bias),
           *mat_strides(second_weight), vec_stride(second_bias), vec_stride(sigma2), vec_stride(grad),
           n_b * P,
           HEAD=head, HAS_C=head != HEAD_FIXED, TAYLOR=head == HEAD_TAYLOR, LOGVAR=head == HEAD_LOGVAR,
           HAS_BIAS=bias is not None, HAS_C0=second_bias is not None, GRAD=grad is not None,
           NEED_X=need_x, NEED_L=need_l, NEED_A=need_a, NEED_C=need_c, NEED_B=need_b,
           NEED_C0=need_c0, NEED_S2=need_s2, ACC=acc_tl, **cfg)


def categorical_forward(x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                        second_weight: Optional[Tensor], second_bias: Optional[Tensor],
                        sigma2: Optional[Tensor], head: int) -> Tensor:
    """Per-sample NLL (B,) with one-hot categorical latents, in x's dtype."""
    B, P, G, ncat = _check(x, logits, weight, bias, second_weight, second_bias, sigma2, head)
    if B == 0 or P == 0:
        return x.new_zeros(B)
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    cfg = _config(B, P, ncat, x.dtype, x.device)
    lp = _log_probs(logits, acc_torch)
    loss = workspace((cdiv(P, cfg["BLOCK_P"]), B), acc_torch, x.device)
    _launch(x, lp, weight, bias, second_weight, second_bias, sigma2, head, cfg, acc_tl, loss=loss,
            G=G, ncat=ncat)
    return loss.sum(0).to(x.dtype)


def categorical_backward(grad: Tensor, x: Tensor, logits: Tensor, weight: Tensor, bias: Optional[Tensor],
                         second_weight: Optional[Tensor], second_bias: Optional[Tensor],
                         sigma2: Optional[Tensor], needs: Sequence[bool], head: int) -> tuple[Tensor, ...]:
    """Gradients w.r.t. (x, logits, weight, bias, second_weight, second_bias, sigma2); empty (0,)
    tensors where not needed (or the input is None)."""
    B, P, G, ncat = _check(x, logits, weight, bias, second_weight, second_bias, sigma2, head)
    inputs = (x, logits, weight, bias, second_weight, second_bias, sigma2)
    need, outs = backward_outputs(grad, inputs, needs, B, P)
    if need is None:
        return tuple(outs)
    need_x, need_l, need_a, need_b, need_c, need_c0, need_s2 = need
    D = G * ncat
    need_l, need_a, need_c = (n and D > 0 for n in (need_l, need_a, need_c))
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    dev = x.device
    cfg = _config(B, P, ncat, x.dtype, dev, "bwd")
    n_b, n_p = tile_grid(cfg, B=B, P=P)
    lp = _log_probs(logits, acc_torch)
    dl = workspace((n_p, B, D), acc_torch, dev, need_l)
    da = workspace((n_b, P, D), acc_torch, dev, need_a)
    dc = workspace((n_b, P, D), acc_torch, dev, need_c)
    dv = workspace((3, n_b, P), acc_torch, dev, need_b or need_c0 or need_s2)
    _launch(x, lp, weight, bias, second_weight, second_bias, sigma2, head, cfg, acc_tl, grad=grad,
            dx=outs[0] if need_x else None, dl=dl, da=da, dc=dc, dv=dv,
            needs=(need_x, need_l, need_a, need_b, need_c, need_c0, need_s2), G=G, ncat=ncat)
    if need_l:
        outs[1].copy_(dl.sum(0).reshape(B, G, ncat))
    if need_a:
        outs[2].copy_(da.sum(0))
    if need_b:
        outs[3].copy_(dv[0].sum(0))
    if need_c:
        outs[4].copy_(dc.sum(0))
    if need_c0:
        outs[5].copy_(dv[1].sum(0))
    if need_s2:
        outs[6].copy_(dv[2].sum(0))
    return tuple(outs)
