"""The CUDA kernels of the exact heads (issue 11) against the float64 reference, on the CPU
through the host emulation of tests/cuda_emulation (the very same .cu sources, g++-compiled):

- precision-family ``head`` 1 (exact E[log v^2], MATH.md §10) and 2 (Gaussian log-variance
  head, §11) through the forward / coefficient kernels of forward.cu and coef.cu and the
  head-independent moment- and weight-gradient kernels;
- the fused Bernoulli log-variance kernels (bernoulli_logvar.cu), forward and every gradient,
  including saturated logits, odd shapes, subsets of gradients, absent biases;
- the launchers refuse an unknown head and heads 1/2 with k3/k4 (cudaErrorInvalidValue).

Both emulated devices are used: 1 multiprocessor (large tiles, unsplit reductions) and 4096
(small tiles, split reductions). Error measure as in test_cuda_backend.py: normwise relative
error max|actual - expected| / max|expected| per tensor, against the float64 reference on the
same (upcast) inputs. The worst error per (dtype, path), and the tensor it was on, is printed
at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from silent_kernels import LatentMoments, reference
from tests.cuda_emulation import emulation

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEVICES = {"large_tiles": (0, 1), "small_tiles_split": (1, 4096)}
PRECISION_INPUTS = ("x", "mean", "var", "k3", "k4", "weight", "bias", "precision_weight", "precision_bias")
BERNOULLI_INPUTS = ("x", "logits", "weight", "bias", "logvar_weight", "logvar_bias")
CUDA_ERROR_INVALID_VALUE = 1

WORST: dict = defaultdict(lambda: (0.0, ""))  # (dtype, path) -> (worst error seen, on which tensor)


@pytest.fixture(scope="module")
def emu():
    try:
        return emulation.build()
    except emulation.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        lines = [f"  {dt:>9} {path:<28} {err:.2e} ({name})" for (dt, path), (err, name) in sorted(WORST.items())]
        print("\nworst normwise relative error vs the float64 reference (emulated CUDA):\n" + "\n".join(lines))


def assert_close(path: str, name: str, actual, expected, dtype):
    assert tuple(actual.shape) == tuple(expected.shape), (name, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(expected).all(), f"{name}: the reference is not finite"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    key = (str(dtype).replace("torch.", ""), path)
    WORST[key] = max(WORST[key], (err, name))
    assert err <= TOL[dtype], f"{path} {name} ({dtype}): normwise relative error {err:.3e} > {TOL[dtype]:.0e}"


def upstream(B: int, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)


def reference_grads(fn, case: dict, grad, needs):
    """float64 reference loss (B,) and d(sum_n grad_n loss_n)/d(input) for the inputs in needs."""
    leaves = {n: (None if t is None else t.detach().double().clone().requires_grad_(n in needs))
              for n, t in case.items()}
    loss = fn(**leaves)
    wanted = [n for n in needs if leaves.get(n) is not None]
    grads = {}
    if wanted:
        gs = torch.autograd.grad((loss * grad.double()).sum(), [leaves[w] for w in wanted], allow_unused=True)
        grads = {w: (torch.zeros_like(leaves[w]) if g is None else g) for w, g in zip(wanted, gs)}
    return loss.detach(), grads


# ------------------------------------------------------------------------------ precision heads
def ref_exact(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias):
    return reference.precision_nll(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias,
                                   log_term="exact")


def ref_logvar_gaussian(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias):
    assert k3 is None and k4 is None
    t = reference.gaussian_logvar_terms(mean, var, weight, bias, precision_weight, precision_bias)
    return reference.logvar_pixel_nll(x, t).sum(dim=-1)


HEADS = {"exact": (1, ref_exact), "logvar": (2, ref_logvar_gaussian)}


def make_gaussian_case(head: str, B: int, k: int, d: int, dtype, seed: int = 0, bias: bool = True) -> dict:
    """Gaussian latents. Exact head: the precision mean vbar spans |vbar|/sqrt(Scc) from ~0
    (series branch, where the Taylor term is worst) to far beyond the asymptotic crossover;
    log-variance head: moderate log-variances so exp(-s) stays O(1..100)."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    scale = 1 / math.sqrt(max(d, 1))
    case = {"x": u(B, k), "mean": n(B, d), "var": 0.05 + u(B, d), "k3": None, "k4": None,
            "weight": n(k, d) * scale, "bias": 0.1 * n(k) if bias else None}
    if head == "exact":
        # per-pixel precision-weight scale from 1e-3 (|vbar| >> sd) to 1 (|vbar| ~ sd or less)
        row_scale = torch.logspace(-3, 0, k, dtype=torch.float64)[torch.randperm(k, generator=gen)]
        case["precision_weight"] = scale * n(k, d) * row_scale[:, None]
        case["precision_bias"] = (torch.linspace(-2.0, 2.0, k, dtype=torch.float64) * u(k)) if bias else None
    else:
        case["precision_weight"] = 0.4 * scale * n(k, d)
        case["precision_bias"] = (0.5 * n(k) - 1.0) if bias else None
    return {name: (None if case[name] is None else case[name].to(dtype)) for name in PRECISION_INPUTS}


def run_precision_head(emu, head: str, case: dict, dtype, needs, device="small_tiles_split"):
    head_id, ref_fn = HEADS[head]
    emu.set_device(*DEVICES[device])
    B = case["x"].shape[0]
    grad = upstream(B, dtype)
    loss, finfo = emu.forward("precision", case, precision_head=head_id)
    outs, binfo = emu.backward("precision", case, grad, needs, precision_head=head_id)
    ref_loss, ref_grads = reference_grads(ref_fn, case, grad, needs)
    path = f"{head} head"
    assert_close(path, "loss", loss, ref_loss, dtype)
    for name, ref in ref_grads.items():
        assert_close(path, f"d{name}", outs[name], ref, dtype)
    return finfo, binfo


def all_needs(case):
    return {name for name, t in case.items() if t is not None}


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head", list(HEADS))
def test_precision_heads_against_reference(emu, head, dtype, device):
    case = make_gaussian_case(head, 70, 130, 9, dtype, seed=sum(map(ord, head)))
    finfo, binfo = run_precision_head(emu, head, case, dtype, all_needs(case), device)
    if device == "large_tiles":
        assert finfo[0] == 0 and binfo[0] == 0
    else:
        assert finfo[0] == 1 and binfo[0] == 1 and binfo[1] > 1 and binfo[2] > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head", list(HEADS))
def test_precision_heads_low_precision(emu, head, dtype):
    case = make_gaussian_case(head, 37, 75, 6, dtype, seed=3)
    run_precision_head(emu, head, case, dtype, all_needs(case))


@pytest.mark.parametrize("shape", [(1, 1, 1), (0, 5, 3), (5, 0, 3), (6, 7, 0), (33, 1, 65), (40, 33, 17)], ids=str)
@pytest.mark.parametrize("head", list(HEADS))
def test_precision_heads_edge_shapes(emu, head, shape):
    case = make_gaussian_case(head, *shape, torch.float64, seed=sum(shape))
    for device in DEVICES:
        run_precision_head(emu, head, case, torch.float64, all_needs(case), device)


@pytest.mark.parametrize("needs", [{"mean", "var"}, {"weight"}, {"precision_weight"},
                                   {"bias", "precision_bias"}, {"x"}], ids=lambda s: "+".join(sorted(s)))
@pytest.mark.parametrize("head", list(HEADS))
def test_precision_heads_needs_subsets_and_no_bias(emu, head, needs):
    case = make_gaussian_case(head, 21, 45, 7, torch.float64, seed=5)
    run_precision_head(emu, head, case, torch.float64, needs)
    case = make_gaussian_case(head, 19, 50, 4, torch.float64, seed=9, bias=False)
    run_precision_head(emu, head, case, torch.float64, {n for n in needs if case[n] is not None})


def test_exact_head_extreme_ratios(emu):
    """vbar = 0 exactly, |vbar|/sd around the series/asymptotic crossover, and tiny Scc."""
    B, k, d = 5, 12, 3
    dtype = torch.float64
    case = make_gaussian_case("exact", B, k, d, dtype, seed=21)
    pw = case["precision_weight"].clone()
    pb = case["precision_bias"].clone()
    pw[0] = 0.0
    pb[0] = 0.7                        # Scc = 0: v is the constant 0.7, E[log v^2] = log 0.49
    pb[1] = 0.0
    case["mean"][:, :] = 0.0           # vbar = bias = 0 at pixel 1
    pw[2] *= 1e-6                      # Scc ~ 1e-12 around vbar = pb[2]
    case["precision_weight"], case["precision_bias"] = pw, pb
    run_precision_head(emu, "exact", case, dtype, all_needs(case))


def test_head_argument_checked_by_the_launchers(emu):
    case = make_gaussian_case("exact", 4, 6, 3, torch.float64, seed=2)
    grad = upstream(4, torch.float64)
    for bad in (3, -1):
        emu.forward("precision", case, precision_head=bad, rc_expected=CUDA_ERROR_INVALID_VALUE)
        emu.backward("precision", case, grad, {"mean"}, precision_head=bad, rc_expected=CUDA_ERROR_INVALID_VALUE)
    with_k4 = dict(case, k4=torch.full_like(case["var"], 0.1))
    for head in (1, 2):
        emu.forward("precision", with_k4, precision_head=head, rc_expected=CUDA_ERROR_INVALID_VALUE)
        emu.backward("precision", with_k4, grad, {"mean"}, precision_head=head,
                     rc_expected=CUDA_ERROR_INVALID_VALUE)
    emu.forward("precision", with_k4, precision_head=0)  # the Taylor head takes any family


# ------------------------------------------------------------------------------ Bernoulli log-variance
def ref_bernoulli(x, logits, weight, bias, logvar_weight, logvar_bias):
    if weight.shape[0] == 0:  # no pixels: a zero loss (reference.tilted_logvar_terms has no chunk to cat)
        return (x.sum(-1) + logits.sum(-1)) * 0
    q = LatentMoments.bernoulli(logits=logits)
    return reference.logvar_nll(x, q, weight, bias, logvar_weight, logvar_bias)


def make_bernoulli_case(B: int, k: int, d: int, dtype, seed: int = 0, bias: bool = True,
                        saturated: float = 0.0, hscale: float = 0.6) -> dict:
    """Logits ~ 2 N(0, 1); a `saturated` fraction of them at +-(20..60) (float64) or +-(12..20).
    Log-variance weights ~ hscale N(0, 1) / sqrt(d)."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    logits = 2 * n(B, d)
    if saturated > 0:
        mask = u(B, d) < saturated
        lo, hi = (20.0, 60.0) if dtype == torch.float64 else (12.0, 20.0)
        big = (lo + (hi - lo) * u(B, d)) * torch.where(u(B, d) < 0.5, -1.0, 1.0)
        logits = torch.where(mask, big, logits)
    scale = 1 / math.sqrt(max(d, 1))
    case = {"x": u(B, k), "logits": logits, "weight": n(k, d) * scale, "bias": 0.1 * n(k) if bias else None,
            "logvar_weight": hscale * scale * n(k, d), "logvar_bias": (0.5 * n(k) - 1.0) if bias else None}
    return {name: (None if case[name] is None else case[name].to(dtype)) for name in BERNOULLI_INPUTS}


def run_bernoulli(emu, case: dict, dtype, needs, device="small_tiles_split", path="bernoulli logvar"):
    emu.set_device(*DEVICES[device])
    B = case["x"].shape[0]
    grad = upstream(B, dtype)
    loss, finfo = emu.bernoulli_forward(case)
    outs, binfo = emu.bernoulli_backward(case, grad, needs)
    ref_loss, ref_grads = reference_grads(ref_bernoulli, case, grad, needs)
    assert_close(path, "loss", loss, ref_loss, dtype)
    for name, ref in ref_grads.items():
        assert_close(path, f"d{name}", outs[name], ref, dtype)
    return finfo, binfo


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bernoulli_logvar_against_reference(emu, dtype, device):
    case = make_bernoulli_case(150, 140, 37, dtype, seed=31)
    finfo, binfo = run_bernoulli(emu, case, dtype, all_needs(case), device)
    if device == "small_tiles_split":  # both reductions of the backward are split
        assert binfo[1] > 1 and binfo[2] > 1, binfo
    else:
        assert binfo[1] == 1 and binfo[2] == 1, binfo


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bernoulli_logvar_saturated_logits(emu, dtype):
    case = make_bernoulli_case(40, 50, 20, dtype, seed=32, saturated=0.4)
    run_bernoulli(emu, case, dtype, all_needs(case), path="bernoulli logvar saturated")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bernoulli_logvar_large_tilts(emu, dtype):
    """|h| well above 1 (the dlogits kernel's switch from -mu' q expm1(h) to mu' - p)."""
    case = make_bernoulli_case(30, 40, 4, dtype, seed=39, hscale=3.0)
    assert (case["logvar_weight"].abs() > 1).float().mean() > 0.3
    run_bernoulli(emu, case, dtype, all_needs(case), path="bernoulli logvar large tilts")


def test_bernoulli_logvar_infinite_logits_stay_finite(emu):
    """Logits +-inf (probabilities exactly 0 / 1): the kernels return finite values equal to
    those at logits +-80, where the float64 reference is already saturated."""
    case = make_bernoulli_case(9, 20, 6, torch.float64, seed=33)
    case_inf = dict(case)
    logits = case["logits"].clone()
    logits[0, :3] = float("inf")
    logits[1, 2:] = -float("inf")
    case_inf["logits"] = logits
    case_big = dict(case, logits=logits.clamp(-80.0, 80.0))
    emu.set_device(*DEVICES["small_tiles_split"])
    grad = upstream(9, torch.float64)
    loss_inf, _ = emu.bernoulli_forward(case_inf)
    ref_loss, _ = reference_grads(ref_bernoulli, case_big, grad, set())
    assert_close("bernoulli logvar inf logits", "loss", loss_inf, ref_loss, torch.float64)
    needs = all_needs(case) - {"logits"}
    outs, _ = emu.bernoulli_backward(case_inf, grad, needs)
    _, ref_grads = reference_grads(ref_bernoulli, case_big, grad, needs)
    for name, ref in ref_grads.items():
        assert_close("bernoulli logvar inf logits", f"d{name}", outs[name], ref, torch.float64)
    outs, _ = emu.bernoulli_backward(case_inf, grad, {"logits"})
    assert torch.isfinite(outs["logits"]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bernoulli_logvar_low_precision(emu, dtype):
    case = make_bernoulli_case(37, 75, 6, dtype, seed=34)
    run_bernoulli(emu, case, dtype, all_needs(case))


@pytest.mark.parametrize("shape", [(1, 1, 1), (0, 5, 3), (5, 0, 3), (6, 7, 0), (33, 1, 65), (3, 300, 1),
                                   (40, 33, 17)], ids=str)
def test_bernoulli_logvar_edge_shapes(emu, shape):
    case = make_bernoulli_case(*shape, torch.float64, seed=sum(shape))
    for device in DEVICES:
        run_bernoulli(emu, case, torch.float64, all_needs(case), device)


@pytest.mark.parametrize("needs", [{"logits"}, {"weight"}, {"logvar_weight"}, {"bias", "logvar_bias"},
                                   {"x"}, {"logvar_bias"}, {"weight", "logvar_weight"}],
                         ids=lambda s: "+".join(sorted(s)))
def test_bernoulli_logvar_needs_subsets(emu, needs):
    case = make_bernoulli_case(21, 45, 7, torch.float64, seed=35)
    run_bernoulli(emu, case, torch.float64, needs)


def test_bernoulli_logvar_without_biases(emu):
    case = make_bernoulli_case(19, 50, 4, torch.float64, seed=36, bias=False)
    run_bernoulli(emu, case, torch.float64, all_needs(case))


def test_bernoulli_logvar_skips_unneeded_work(emu):
    """Only the bias gradients: the coefficient kernel and two column sums; nothing needed: nothing."""
    case = make_bernoulli_case(21, 45, 7, torch.float64, seed=37)
    emu.set_device(*DEVICES["small_tiles_split"])
    before = emu.launches()
    emu.bernoulli_backward(case, upstream(21, torch.float64), {"bias", "logvar_bias"})
    assert emu.launches() - before == 3
    before = emu.launches()
    emu.bernoulli_backward(case, upstream(21, torch.float64), set())
    assert emu.launches() == before


def test_bernoulli_logvar_deterministic(emu):
    case = make_bernoulli_case(64, 40, 12, torch.float32, seed=38)
    emu.set_device(*DEVICES["small_tiles_split"])
    grad = upstream(64, torch.float32)
    needs = all_needs(case)
    first, _ = emu.bernoulli_backward(case, grad, needs)
    second, _ = emu.bernoulli_backward(case, grad, needs)
    for name in needs:
        assert torch.equal(first[name], second[name]), name


# ------------------------------------------------------------------------------ on a GPU
def _cuda_ops_or_skip(*names):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import silent_kernels._C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        pytest.skip(f"extension not built: {exc}")
    ops = torch.ops.silent_kernels
    for name in names:
        if not hasattr(ops, name):
            pytest.skip(f"op silent_kernels::{name} not registered")
    return ops


def _gpu_op_check(fwd, bwd, ref_fn, case, dtype, extra=()):
    dev = {n: (None if t is None else t.cuda()) for n, t in case.items()}
    args = tuple(dev.values())
    B = case["x"].shape[0]
    grad = upstream(B, dtype)
    needs = [t is not None for t in args]
    loss = fwd(*args, *extra)
    grads = bwd(grad.cuda(), *args, needs, *extra)
    ref_loss, ref_grads = reference_grads(ref_fn, case, grad, all_needs(case))
    assert_close("gpu", "loss", loss.cpu(), ref_loss, dtype)
    for name, g in zip(case, grads):
        if name in ref_grads:
            assert_close("gpu", f"d{name}", g.cpu(), ref_grads[name], dtype)
    if dtype == torch.float64:
        torch.library.opcheck(fwd, (*args, *extra))
        torch.library.opcheck(bwd, (grad.cuda(), *args, needs, *extra))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("shape", [(37, 61, 13), (130, 785, 33), (1, 1, 1)], ids=str)
def test_gpu_precision_heads_ops(head, dtype, shape):
    ops = _cuda_ops_or_skip("precision_nll", "precision_nll_backward")
    head_id, ref_fn = HEADS[head]
    case = make_gaussian_case(head, *shape, dtype, seed=41)
    _gpu_op_check(ops.precision_nll.default, ops.precision_nll_backward.default, ref_fn, case, dtype,
                  extra=(head_id,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(37, 61, 13), (130, 785, 33), (1, 1, 1), (300, 7, 201)], ids=str)
def test_gpu_bernoulli_logvar_ops(dtype, shape):
    ops = _cuda_ops_or_skip("bernoulli_logvar_nll", "bernoulli_logvar_nll_backward")
    case = make_bernoulli_case(*shape, dtype, seed=42, saturated=0.2)
    _gpu_op_check(ops.bernoulli_logvar_nll.default, ops.bernoulli_logvar_nll_backward.default,
                  ref_bernoulli, case, dtype)


@pytest.mark.gpu
def test_gpu_head_argument_errors():
    ops = _cuda_ops_or_skip("precision_nll")
    case = {n: (None if t is None else t.cuda()) for n, t in
            make_gaussian_case("exact", 4, 6, 3, torch.float64, seed=43).items()}
    with pytest.raises(RuntimeError, match="head"):
        ops.precision_nll(*case.values(), 3)
    case["k4"] = torch.zeros_like(case["var"])
    with pytest.raises(RuntimeError, match="head"):
        ops.precision_nll(*case.values(), 1)
