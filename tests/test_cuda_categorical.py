"""The CUDA kernels of one-hot categorical latents (csrc/cuda/categorical.cu, MATH.md §12) against
the float64 reference (silent_kernels/categorical.py), on the CPU through the host emulation of
tests/cuda_emulation (the very same .cu source, g++-compiled):

- all three heads of the op (3 fixed variance, 0 learnable precision with the Taylor log term,
  2 log-variance by per-group tilting), forward and every gradient (x, logits, weight, bias,
  second weight, second bias, sigma2);
- float64 / float32 and the half types, odd shapes (K = 1, G = 0, B = 0, k = 0, ragged tiles),
  saturated and infinite logits, subsets of gradients, absent biases, determinism, the work
  skipped when a gradient is not needed, and the launchers' refusal of a bad head / argument set.

Both emulated devices are used: 1 multiprocessor (unsplit reductions) and 4096 (split pixel and
sample reductions). Error measure as in test_cuda_heads.py: normwise relative error
max|actual - expected| / max|expected| per tensor, against the float64 reference on the same
(upcast) inputs. The worst error per (dtype, head) is printed at the end (``pytest -s``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from silent_kernels import categorical
from tests.cuda_emulation import emulation

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEVICES = {"large": (0, 1), "split": (1, 4096)}
INPUTS = emulation.CATEGORICAL_INPUTS
HEADS = ("fixed", "taylor", "logvar")
CUDA_ERROR_INVALID_VALUE = 1

WORST: dict = defaultdict(lambda: (0.0, ""))


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
        lines = [f"  {dt:>9} {path:<34} {err:.2e} ({name})" for (dt, path), (err, name) in sorted(WORST.items())]
        print("\nworst normwise relative error vs the float64 reference (emulated CUDA, categorical):\n"
              + "\n".join(lines))


def assert_close(path, name, actual, expected, dtype):
    assert tuple(actual.shape) == tuple(expected.shape), (name, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(expected).all(), f"{name}: the reference is not finite"
    assert torch.isfinite(actual).all(), f"{path} {name}: non-finite values"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    key = (str(dtype).replace("torch.", ""), path)
    WORST[key] = max(WORST[key], (err, name))
    assert err <= TOL[dtype], f"{path} {name} ({dtype}): normwise relative error {err:.3e} > {TOL[dtype]:.0e}"


def reference(head, x, logits, weight, bias, second_weight, second_bias, sigma2):
    if weight.shape[0] == 0 or logits.shape[1] * logits.shape[2] == 0:
        # no pixels or no categories: the reference has no chunk to concatenate; the loss is the
        # bias-only epilogue summed over the pixels (zero without pixels)
        B, k = x.shape
        zl = logits.sum((1, 2))[:, None] * 0
        if k == 0:
            return x.sum(-1) * 0 + zl[:, 0]
        logits = torch.zeros(B, 1, 1, dtype=x.dtype) + zl[:, :, None]
        weight = torch.zeros(k, 1, dtype=x.dtype) + weight.sum() * 0
        second_weight = None if second_weight is None else torch.zeros(k, 1, dtype=x.dtype) + second_weight.sum() * 0
    if head == "fixed":
        return categorical.categorical_fixed_nll(x, logits, weight, bias, sigma2)
    if head == "taylor":
        return categorical.categorical_precision_nll(x, logits, weight, bias, second_weight, second_bias)
    return categorical.categorical_logvar_nll(x, logits, weight, bias, second_weight, second_bias)


def reference_grads(head, case, grad, needs):
    leaves = {n: (None if case.get(n) is None else case[n].detach().double().clone().requires_grad_(n in needs))
              for n in INPUTS}
    loss = reference(head, **leaves)
    wanted = [n for n in INPUTS if n in needs and leaves[n] is not None]
    grads = {}
    if wanted:
        gs = torch.autograd.grad((loss * grad.double()).sum(), [leaves[w] for w in wanted], allow_unused=True)
        grads = {w: (torch.zeros_like(leaves[w]) if g is None else g) for w, g in zip(wanted, gs)}
    return loss.detach(), grads


def make_case(head, B, k, G, K, dtype, seed=0, bias=True, saturated=0.0, wscale=1.0):
    """logits ~ 2 N(0, 1); a `saturated` fraction of the groups gets one category `gap` above the
    rest (30..60 nats in float64, 12..20 otherwise). Weights ~ N(0, 1) / sqrt(G) (mean), precision
    weights small around a precision bias ~ 1.5, log-variance weights ~ 0.5 N(0, 1) / sqrt(G)."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    logits = 2 * n(B, G, K)
    if saturated > 0 and K > 1 and B * G > 0:
        lo, hi = (30.0, 60.0) if dtype == torch.float64 else (12.0, 20.0)
        mask = u(B, G) < saturated
        winner = torch.randint(0, K, (B, G), generator=gen)
        bump = torch.zeros(B, G, K, dtype=torch.float64).scatter_(2, winner[..., None], 1.0)
        gap = lo + (hi - lo) * u(B, G, 1)
        logits = torch.where(mask[..., None], logits + gap * bump, logits)
    d = G * K
    scale = wscale / math.sqrt(max(G, 1))
    case = {"x": u(B, k), "logits": logits, "weight": n(k, d) * scale, "bias": 0.1 * n(k) if bias else None,
            "second_weight": None, "second_bias": None, "sigma2": None}
    if head == "fixed":
        case["sigma2"] = 0.05 + u(k)
    elif head == "taylor":
        case["second_weight"] = 0.3 * scale * n(k, d)
        case["second_bias"] = (1.5 + 0.3 * n(k)) if bias else None
    else:
        case["second_weight"] = 0.5 * scale * n(k, d)
        case["second_bias"] = (0.5 * n(k) - 1.0) if bias else None
    return {name: (None if case[name] is None else case[name].to(dtype)) for name in INPUTS}


def upstream(B, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)


def all_needs(case):
    return {name for name, t in case.items() if t is not None}


def run(emu, head, case, dtype, needs, device="split", path=None):
    emu.set_device(*DEVICES[device])
    B = case["x"].shape[0]
    grad = upstream(B, dtype)
    loss, finfo = emu.categorical_forward(case, head)
    outs, binfo = emu.categorical_backward(case, head, grad, needs)
    ref_loss, ref_grads = reference_grads(head, case, grad, needs)
    path = path or f"{head}"
    assert_close(path, "loss", loss, ref_loss, dtype)
    for name, ref in ref_grads.items():
        assert_close(path, f"d{name}", outs[name], ref, dtype)
    assert set(outs) == set(ref_grads)
    return finfo, binfo


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head", HEADS)
def test_against_reference(emu, head, dtype, device):
    case = make_case(head, 70, 130, 5, 7, dtype, seed=sum(map(ord, head)))
    _, binfo = run(emu, head, case, dtype, all_needs(case), device)
    if device == "split":  # both reductions of the backward are split
        assert binfo[0] > 1 and binfo[1] > 1, binfo
    else:
        assert binfo[0] == 1 and binfo[1] == 1, binfo


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head", HEADS)
def test_low_precision(emu, head, dtype):
    case = make_case(head, 37, 75, 4, 5, dtype, seed=3)
    run(emu, head, case, dtype, all_needs(case))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head", HEADS)
def test_saturated_logits(emu, head, dtype):
    case = make_case(head, 40, 50, 6, 10, dtype, seed=11, saturated=0.6)
    run(emu, head, case, dtype, all_needs(case), path=f"{head} saturated")


@pytest.mark.parametrize("head", HEADS)
def test_many_categories_and_large_weights(emu, head):
    """K = 100 (the Triton backend's largest tested K) and weights 4x larger."""
    case = make_case(head, 9, 40, 3, 100, torch.float64, seed=12, wscale=4.0 if head != "logvar" else 1.0)
    run(emu, head, case, torch.float64, all_needs(case), path=f"{head} K=100")


@pytest.mark.parametrize("head", HEADS)
def test_infinite_logits(emu, head):
    """Logits -inf (categories of probability exactly 0): finite results equal to those at
    logits -200, where the float64 reference is saturated."""
    case = make_case(head, 9, 20, 4, 5, torch.float64, seed=13)
    logits = case["logits"].clone()
    logits[0, :, :2] = -float("inf")
    logits[3, 1, 1:] = -float("inf")
    case_inf = dict(case, logits=logits)
    case_big = dict(case, logits=logits.clamp_min(-200.0))
    emu.set_device(*DEVICES["split"])
    grad = upstream(9, torch.float64)
    needs = all_needs(case)
    loss, _ = emu.categorical_forward(case_inf, head)
    outs, _ = emu.categorical_backward(case_inf, head, grad, needs)
    ref_loss, ref_grads = reference_grads(head, case_big, grad, needs)
    assert_close(f"{head} -inf logits", "loss", loss, ref_loss, torch.float64)
    for name, ref in ref_grads.items():
        assert_close(f"{head} -inf logits", f"d{name}", outs[name], ref, torch.float64)
    assert (outs["logits"][0, :, :2] == 0).all()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (0, 5, 3, 4), (5, 0, 3, 4), (6, 7, 0, 3), (9, 10, 4, 1),
                                   (33, 1, 13, 2), (40, 33, 3, 17), (3, 300, 1, 3)], ids=str)
@pytest.mark.parametrize("head", HEADS)
def test_edge_shapes(emu, head, shape):
    case = make_case(head, *shape, torch.float64, seed=sum(shape))
    for device in DEVICES:
        run(emu, head, case, torch.float64, all_needs(case), device)


@pytest.mark.parametrize("needs", [{"logits"}, {"weight"}, {"second_weight"}, {"bias", "second_bias", "sigma2"},
                                   {"x"}, {"sigma2"}, {"weight", "second_weight"}],
                         ids=lambda s: "+".join(sorted(s)))
@pytest.mark.parametrize("head", HEADS)
def test_needs_subsets(emu, head, needs):
    case = make_case(head, 21, 45, 3, 4, torch.float64, seed=15)
    run(emu, head, case, torch.float64, needs & all_needs(case))


@pytest.mark.parametrize("head", HEADS)
def test_without_biases(emu, head):
    case = make_case(head, 19, 50, 3, 3, torch.float64, seed=16, bias=False)
    run(emu, head, case, torch.float64, all_needs(case))


@pytest.mark.parametrize("head", HEADS)
def test_matches_the_cpu_kernels(emu, head):
    """The C++ CPU op runs the same per-group math (csrc/categorical.h) in another summation order:
    float64 agreement to rounding, for the loss and every gradient (the op's (0,) gradients of
    absent inputs aside)."""
    try:
        import silent_kernels._C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        pytest.skip(f"extension not built: {exc}")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("silent_kernels::categorical_nll", "CPU"):
        pytest.skip("no CPU kernel registered for silent_kernels::categorical_nll")
    ops = torch.ops.silent_kernels
    case = make_case(head, 23, 37, 4, 6, torch.float64, seed=21, saturated=0.3)
    args = [case[n] for n in INPUTS]
    head_id = emulation.CATEGORICAL_HEADS[head]
    grad = upstream(23, torch.float64)
    needs = all_needs(case)
    emu.set_device(*DEVICES["split"])
    loss, _ = emu.categorical_forward(case, head)
    outs, _ = emu.categorical_backward(case, head, grad, needs)
    cpu_loss = ops.categorical_nll(*args, head_id)
    cpu_grads = ops.categorical_nll_backward(grad, *args, [n in needs for n in INPUTS], head_id)
    pairs = [("loss", loss, cpu_loss)] + [(f"d{n}", outs[n], g) for n, g in zip(INPUTS, cpu_grads) if n in needs]
    for name, mine, theirs in pairs:
        err = ((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-300)).item()
        assert err < 1e-13, (name, err)


# ------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("head", HEADS)
def test_deterministic(emu, head):
    case = make_case(head, 64, 40, 4, 6, torch.float32, seed=17)
    emu.set_device(*DEVICES["split"])
    grad = upstream(64, torch.float32)
    needs = all_needs(case)
    first, _ = emu.categorical_backward(case, head, grad, needs)
    second, _ = emu.categorical_backward(case, head, grad, needs)
    for name in needs:
        assert torch.equal(first[name], second[name]), name
    l1, _ = emu.categorical_forward(case, head)
    l2, _ = emu.categorical_forward(case, head)
    assert torch.equal(l1, l2)


def test_skips_unneeded_work(emu):
    """Only the bias gradients: softmax, coefficient kernel, two column sums; nothing: nothing;
    forward: softmax, the pixel kernel, the partial-loss sum."""
    case = make_case("taylor", 21, 45, 3, 4, torch.float64, seed=18)
    emu.set_device(*DEVICES["split"])
    grad = upstream(21, torch.float64)
    before = emu.launches()
    emu.categorical_backward(case, "taylor", grad, {"bias", "second_bias"})
    assert emu.launches() - before == 4
    before = emu.launches()
    emu.categorical_backward(case, "taylor", grad, set())
    assert emu.launches() == before
    before = emu.launches()
    emu.categorical_forward(case, "taylor")
    assert emu.launches() - before == 3


def test_launchers_refuse_bad_arguments(emu):
    fixed = make_case("fixed", 4, 6, 2, 3, torch.float64, seed=19)
    taylor = make_case("taylor", 4, 6, 2, 3, torch.float64, seed=19)
    grad = upstream(4, torch.float64)
    bad = [(fixed, 1), (fixed, -1), (fixed, 0), (fixed, 2), (taylor, 3), (taylor, 1),
           (dict(taylor, sigma2=fixed["sigma2"]), 0), (dict(fixed, second_weight=taylor["second_weight"]), 3)]
    for case, head in bad:
        emu.categorical_forward(case, head, rc_expected=CUDA_ERROR_INVALID_VALUE)
        emu.categorical_backward(case, head, grad, {"weight"}, rc_expected=CUDA_ERROR_INVALID_VALUE)


# ------------------------------------------------------------------------------ on a GPU
def _cuda_ops_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import silent_kernels._C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        pytest.skip(f"extension not built: {exc}")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("silent_kernels::categorical_nll", "CUDA"):
        pytest.skip("no CUDA kernel registered for silent_kernels::categorical_nll")
    return torch.ops.silent_kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("shape", [(37, 61, 5, 7), (130, 784, 20, 10), (1, 1, 1, 1), (300, 7, 3, 100)], ids=str)
def test_gpu_ops(head, dtype, shape):
    ops = _cuda_ops_or_skip()
    case = make_case(head, *shape, dtype, seed=41, saturated=0.2)
    dev = [None if case[n] is None else case[n].cuda() for n in INPUTS]
    B = shape[0]
    grad = upstream(B, dtype)
    head_id = emulation.CATEGORICAL_HEADS[head]
    needs = [t is not None for t in dev]
    loss = ops.categorical_nll(*dev, head_id)
    grads = ops.categorical_nll_backward(grad.cuda(), *dev, needs, head_id)
    ref_loss, ref_grads = reference_grads(head, case, grad, all_needs(case))
    assert_close("gpu", "loss", loss.cpu(), ref_loss, dtype)
    for name, g in zip(INPUTS, grads):
        if name in ref_grads:
            assert_close("gpu", f"d{name}", g.cpu(), ref_grads[name], dtype)
        else:
            assert g.shape == (0,)
    again = ops.categorical_nll_backward(grad.cuda(), *dev, needs, head_id)
    for g1, g2 in zip(grads, again):
        assert torch.equal(g1, g2)
    if dtype == torch.float64 and B < 100:
        torch.library.opcheck(ops.categorical_nll.default, (*dev, head_id))
        torch.library.opcheck(ops.categorical_nll_backward.default, (grad.cuda(), *dev, needs, head_id))


@pytest.mark.gpu
def test_gpu_bad_head():
    ops = _cuda_ops_or_skip()
    case = make_case("taylor", 4, 6, 2, 3, torch.float64, seed=43)
    dev = [None if case[n] is None else case[n].cuda() for n in INPUTS]
    with pytest.raises(RuntimeError, match="head"):
        ops.categorical_nll(*dev, 3)
