"""The CUDA backend (csrc/cuda) against the pure-torch reference, two ways.

1. On a GPU (``pytest -m gpu``; skipped without one): ``analytic_nll(..., backend="cuda")``,
   forward and every gradient, both heads, Gaussian / Bernoulli / Uniform latents (and
   k3-only moments), reductions, requires_grad subsets, non-contiguous inputs, empty batch,
   odd shapes, plus ``torch.library.opcheck`` of the four ops.
2. Without one (always): the very same ``.cu`` sources compiled for the host by g++ with a
   small CUDA emulation shim (tests/cuda_emulation: one std::thread per CUDA thread of a block,
   a std::barrier for __syncthreads, a per-warp barrier for __shfl_xor_sync, ``__shared__`` as
   static storage, blocks run one after another), called through ctypes. This exercises the tiling,
   ragged edges, plans, split reductions, scratch layout (filled with NaN, so reading an
   unwritten slot shows), dtype conversions and the math of every kernel; it says nothing
   about performance or the GPU memory model. Both tile configurations and the split
   reductions are reached by emulating a device with 1 or with 4096 multiprocessors.

Error measure: normwise relative error max|actual - expected| / max|expected| per tensor,
against the reference in float64 evaluated on the very same (upcast) input values.
Tolerances: float64 1e-10, float32 1e-5, float16 1e-3 and bfloat16 8e-3 (about two units
of roundoff of the output dtype: the kernels read fp16/bf16, accumulate in fp32 and round
once on store).
"""

from __future__ import annotations

import math

import pytest
import torch

from silent_kernels import LatentMoments, analytic_nll, reference
from tests.cuda_emulation import emulation

FIXED_INPUTS = ("x", "mean", "var", "weight", "bias", "sigma2")
PRECISION_INPUTS = ("x", "mean", "var", "k3", "k4", "weight", "bias", "precision_weight", "precision_bias")
FAMILIES = ("gaussian", "bernoulli", "uniform", "k3only")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ------------------------------------------------------------------------------ cases
def make_moments(family: str, B: int, d: int, gen: torch.Generator):
    """float64 cumulants (mean, var, k3, k4) of a mean-field family (MATH.md §1 table)."""
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if family == "gaussian":
        return n(B, d), 0.05 + u(B, d), None, None
    if family == "bernoulli":
        p = 0.05 + 0.9 * u(B, d)
        var = p * (1 - p)
        return p, var, var * (1 - 2 * p), var * (1 - 6 * var)
    if family == "uniform":
        lo, width = n(B, d), 0.1 + u(B, d)
        return lo + width / 2, width**2 / 12, None, -(width**4) / 120
    if family == "k3only":
        return 0.5 * n(B, d), 0.05 + u(B, d), 0.1 * n(B, d), None
    raise ValueError(family)


def make_case(head: str, family: str, B: int, k: int, d: int, dtype, seed: int = 0,
              bias: bool = True) -> dict:
    """Inputs of one op call (op order), in `dtype`; values chosen so that E[v^2] stays well
    away from its floor."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    mean, var, k3, k4 = make_moments(family, B, d, gen)
    scale = 1 / math.sqrt(max(d, 1))
    case = {"x": u(B, k), "mean": mean, "var": var, "weight": n(k, d) * scale,
            "bias": 0.1 * n(k) if bias else None}
    if head == "fixed":
        case["sigma2"] = 0.3 + u(k)
    else:
        case.update(k3=k3, k4=k4, precision_weight=0.5 * scale * n(k, d),
                    precision_bias=(1.5 + 0.1 * n(k)) if bias else None)
    names = FIXED_INPUTS if head == "fixed" else PRECISION_INPUTS
    return {name: (None if case.get(name) is None else case[name].to(dtype)) for name in names}


def upstream(B: int, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)


def reference_outputs(head: str, case: dict, grad, needs) -> tuple:
    """float64 reference per-sample loss and d(sum_n grad_n loss_n)/d(input) for `needs`."""
    leaves = {name: (None if t is None else t.detach().double().clone().requires_grad_(name in needs))
              for name, t in case.items()}
    fn = reference.fixed_nll if head == "fixed" else reference.precision_nll
    loss = fn(*leaves.values())
    wanted = [name for name in needs if leaves.get(name) is not None]
    grads = {}
    if wanted:
        gs = torch.autograd.grad((loss * grad.double()).sum(), [leaves[w] for w in wanted],
                                 allow_unused=True)
        grads = {w: (torch.zeros_like(leaves[w]) if g is None else g) for w, g in zip(wanted, gs)}
    return loss.detach(), grads


def assert_close(name: str, actual, expected, dtype):
    assert tuple(actual.shape) == tuple(expected.shape), (name, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    assert err <= TOL[dtype], f"{name} ({dtype}): normwise relative error {err:.3e} > {TOL[dtype]:.0e}"


# ------------------------------------------------------------------------------ host emulation
@pytest.fixture(scope="module")
def emu():
    """The emulated CUDA backend (tests/cuda_emulation), built once per session."""
    try:
        return emulation.build()
    except emulation.Unavailable as exc:
        pytest.skip(str(exc))


# device id -> multiprocessor count: 1 SM gives the large tiles and no split reductions,
# 4096 SMs the small tiles and split reductions (each emulated device caches its own count)
DEVICES = {"large_tiles": (0, 1), "small_tiles_split": (1, 4096)}


def run_emulated(emu, head, case, dtype, needs, device="small_tiles_split"):
    emu.set_device(*DEVICES[device])
    B = case["x"].shape[0]
    grad = upstream(B, dtype)
    loss, finfo = emu.forward(head, case)
    outs, binfo = emu.backward(head, case, grad, needs)
    ref_loss, ref_grads = reference_outputs(head, case, grad, needs)
    assert_close("loss", loss, ref_loss, dtype)
    for name, ref in ref_grads.items():
        assert_close(f"d{name}", outs[name], ref, dtype)
    return finfo, binfo


def all_needs(head, case):
    return {name for name, t in case.items() if t is not None}


HEAD_FAMILIES = [("fixed", "gaussian"), ("fixed", "bernoulli")] + [("precision", f) for f in FAMILIES]


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head,family", HEAD_FAMILIES)
def test_emulated_against_reference(emu, head, family, dtype, device):
    case = make_case(head, family, 70, 130, 9, dtype, seed=sum(map(ord, head + family)))
    finfo, binfo = run_emulated(emu, head, case, dtype, all_needs(head, case), device)
    if device == "large_tiles":
        assert finfo[0] == 0 and binfo[0] == 0 and binfo[1] == 1 and binfo[2] == 1
    else:  # small tiles; the moment (over k) and weight (over B) reductions are split
        assert finfo[0] == 1 and binfo[0] == 1 and binfo[1] > 1 and binfo[2] > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "bernoulli"),
                                         ("precision", "uniform")])
def test_emulated_low_precision(emu, head, family, dtype):
    case = make_case(head, family, 37, 75, 6, dtype, seed=3)
    run_emulated(emu, head, case, dtype, all_needs(head, case))


@pytest.mark.parametrize("shape", [(1, 1, 1), (0, 5, 3), (5, 0, 3), (6, 7, 0), (33, 1, 65), (3, 300, 1),
                                   (40, 33, 17)], ids=str)
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_emulated_edge_shapes(emu, head, shape):
    B, k, d = shape
    case = make_case(head, "bernoulli", B, k, d, torch.float64, seed=B + 7 * k + 13 * d)
    for device in DEVICES:
        run_emulated(emu, head, case, torch.float64, all_needs(head, case), device)


@pytest.mark.parametrize("needs", [{"mean", "var", "k3", "k4"}, {"weight"}, {"precision_weight"},
                                   {"bias", "precision_bias"}, {"x"}, {"k4"}, {"var", "weight"}],
                         ids=lambda s: "+".join(sorted(s)))
def test_emulated_precision_needs_subsets(emu, needs):
    case = make_case("precision", "bernoulli", 21, 45, 7, torch.float64, seed=5)
    run_emulated(emu, "precision", case, torch.float64, needs)


@pytest.mark.parametrize("needs", [{"sigma2"}, {"weight"}, {"var"}, {"mean"}, {"bias", "x"}],
                         ids=lambda s: "+".join(sorted(s)))
def test_emulated_fixed_needs_subsets(emu, needs):
    case = make_case("fixed", "gaussian", 21, 45, 7, torch.float64, seed=6)
    run_emulated(emu, "fixed", case, torch.float64, needs)


def test_emulated_skips_unneeded_work(emu):
    """Only the bias gradients: the coefficient kernel and two column sums, nothing else."""
    case = make_case("precision", "bernoulli", 21, 45, 7, torch.float64, seed=8)
    emu.set_device(*DEVICES["small_tiles_split"])
    before = emu.launches()
    emu.backward("precision", case, upstream(21, torch.float64), {"bias", "precision_bias"})
    assert emu.launches() - before == 3
    before = emu.launches()
    emu.backward("precision", case, upstream(21, torch.float64), set())
    assert emu.launches() == before


@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_emulated_without_biases(emu, head):
    case = make_case(head, "uniform", 19, 50, 4, torch.float64, seed=9, bias=False)
    run_emulated(emu, head, case, torch.float64, all_needs(head, case))


# ------------------------------------------------------------------------------ on a GPU
def _cuda_backend_or_skip():
    from silent_kernels import backends
    if not backends.available("cuda"):
        pytest.skip(f"cuda backend unavailable: {backends.info()['backends']['cuda'].get('reason')}")


def _call(head, case, reduction="none", backend="cuda", **overrides):
    c = {**case, **overrides}
    q = LatentMoments(c["mean"], c["var"], c.get("k3"), c.get("k4"))
    if head == "fixed":
        return analytic_nll(c["x"], q, c["weight"], c["bias"], sigma2=c["sigma2"], reduction=reduction,
                            backend=backend)
    return analytic_nll(c["x"], q, c["weight"], c["bias"], precision_weight=c["precision_weight"],
                        precision_bias=c["precision_bias"], reduction=reduction, backend=backend)


def _gpu_check(head, case, dtype, needs, reduction="none"):
    """analytic_nll(backend='cuda') forward and the gradients of `needs` against the reference."""
    _cuda_backend_or_skip()
    dev_case = {n: (None if t is None else t.cuda().requires_grad_(n in needs)) for n, t in case.items()}
    B = case["x"].shape[0]
    out = _call(head, dev_case, reduction=reduction)
    grad = upstream(B, dtype)
    ref_loss, ref_grads = reference_outputs(head, case, grad if reduction == "none" else
                                            (torch.ones(B, dtype=dtype) / (B if reduction == "mean" else 1)),
                                            needs)
    if reduction == "none":
        assert_close("loss", out.cpu(), ref_loss, dtype)
        objective = (out * grad.cuda()).sum()
    else:
        expected = ref_loss.sum() / (B if reduction == "mean" and B > 0 else 1)
        assert_close(f"loss ({reduction})", out.cpu().reshape(1), expected.reshape(1), dtype)
        objective = out
    wanted = [n for n in needs if dev_case.get(n) is not None]
    if wanted and objective.requires_grad:
        grads = torch.autograd.grad(objective, [dev_case[n] for n in wanted], allow_unused=True)
        for name, g in zip(wanted, grads):
            g = torch.zeros_like(dev_case[name]) if g is None else g
            assert_close(f"d{name}", g.cpu(), ref_grads[name], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head,family", HEAD_FAMILIES)
@pytest.mark.parametrize("shape", [(37, 61, 13), (130, 785, 33), (1, 1, 1), (300, 7, 201)], ids=str)
def test_gpu_against_reference(head, family, dtype, shape):
    case = make_case(head, family, *shape, dtype, seed=11)
    _gpu_check(head, case, dtype, all_needs(head, case))


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_gpu_reductions(head, reduction):
    case = make_case(head, "bernoulli", 29, 100, 10, torch.float64, seed=12)
    _gpu_check(head, case, torch.float64, all_needs(head, case), reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("needs", [{"mean", "var"}, {"weight", "bias"}, {"precision_weight"}, {"k3", "k4"},
                                   {"x"}, {"sigma2"}, set()], ids=lambda s: "+".join(sorted(s)) or "none")
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_gpu_requires_grad_subsets(head, needs):
    case = make_case(head, "bernoulli", 23, 77, 9, torch.float64, seed=13)
    needs = {n for n in needs if n in case}
    _gpu_check(head, case, torch.float64, needs)


@pytest.mark.gpu
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_gpu_non_contiguous_inputs(head):
    _cuda_backend_or_skip()
    dtype = torch.float32
    case = make_case(head, "bernoulli", 31, 90, 11, dtype, seed=14)
    needs = all_needs(head, case)

    def strided(t):  # same values, non-contiguous storage
        if t is None:
            return None
        if t.dim() == 2:
            return t.t().contiguous().t()
        return torch.stack([t, t], dim=1)[:, 0]

    dev = {n: (None if t is None else strided(t.cuda()).detach().requires_grad_(n in needs))
           for n, t in case.items()}
    assert not dev["x"].is_contiguous() and not dev["weight"].is_contiguous()
    grad = upstream(31, dtype).cuda()
    grad_nc = torch.stack([grad, grad], dim=1)[:, 0]
    out = _call(head, dev)
    ref_loss, ref_grads = reference_outputs(head, case, grad.cpu(), needs)
    assert_close("loss", out.cpu(), ref_loss, dtype)
    grads = torch.autograd.grad(out, [dev[n] for n in sorted(needs)], grad_outputs=grad_nc)
    for name, g in zip(sorted(needs), grads):
        assert_close(f"d{name}", g.cpu(), ref_grads[name], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_gpu_empty_batch(head):
    _cuda_backend_or_skip()
    case = make_case(head, "bernoulli", 0, 17, 5, torch.float32, seed=15)
    needs = all_needs(head, case)
    dev = {n: (None if t is None else t.cuda().requires_grad_(n in needs)) for n, t in case.items()}
    out = _call(head, dev, reduction="sum")
    assert out.item() == 0.0
    grads = torch.autograd.grad(out, [dev[n] for n in sorted(needs)], allow_unused=True)
    for g in grads:
        assert g is None or (torch.isfinite(g).all() and (g == 0).all())


@pytest.mark.gpu
def test_gpu_torch_distributions_and_scalar_sigma2():
    _cuda_backend_or_skip()
    from torch import distributions as D
    gen = torch.Generator().manual_seed(16)
    B, k, d = 17, 45, 6
    x = torch.rand(B, k, generator=gen, dtype=torch.float64)
    w = torch.randn(k, d, generator=gen, dtype=torch.float64) / 3
    qs = [D.Normal(torch.randn(B, d, generator=gen, dtype=torch.float64), torch.rand(B, d, generator=gen, dtype=torch.float64) + 0.1),
          D.Bernoulli(probs=torch.rand(B, d, generator=gen, dtype=torch.float64) * 0.9 + 0.05),
          D.Uniform(torch.zeros(B, d, dtype=torch.float64), torch.rand(B, d, generator=gen, dtype=torch.float64) + 0.2)]
    for q in qs:
        q_dev = type(q)(**{name: getattr(q, name).cuda() for name in q.arg_constraints if name in ("loc", "scale", "probs", "low", "high")})
        for sigma2 in (0.3, torch.tensor(0.3, dtype=torch.float64)):
            got = analytic_nll(x.cuda(), q_dev, w.cuda(), sigma2=sigma2 if isinstance(sigma2, float) else sigma2.cuda(),
                               reduction="none", backend="cuda")
            want = analytic_nll(x, q, w, sigma2=sigma2, reduction="none", backend="torch")
            assert_close("loss", got.cpu(), want, torch.float64)
        pw = torch.randn(k, d, generator=gen, dtype=torch.float64) / 4
        pb = torch.full((k,), 1.5, dtype=torch.float64)
        got = analytic_nll(x.cuda(), q_dev, w.cuda(), precision_weight=pw.cuda(), precision_bias=pb.cuda(),
                           reduction="none", backend="cuda")
        want = analytic_nll(x, q, w, precision_weight=pw, precision_bias=pb, reduction="none", backend="torch")
        assert_close("loss", got.cpu(), want, torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_gpu_opcheck(head):
    _cuda_backend_or_skip()
    ops = torch.ops.silent_kernels
    case = {n: (None if t is None else t.cuda()) for n, t in
            make_case(head, "bernoulli", 9, 20, 4, torch.float64, seed=17).items()}
    args = tuple(case.values())
    fwd = ops.fixed_nll.default if head == "fixed" else ops.precision_nll.default
    bwd = ops.fixed_nll_backward.default if head == "fixed" else ops.precision_nll_backward.default
    torch.library.opcheck(fwd, args)
    needs = [t is not None for t in args]
    torch.library.opcheck(bwd, (upstream(9, torch.float64).cuda(), *args, needs))
