"""The Triton kernels of one-hot categorical latents (MATH.md §12-13, silent_kernels/
triton_categorical.py) against enumeration of all K^G joint states and against the float64
reference (silent_kernels/categorical.py), every head, forward and every gradient.

Heads (op argument ``head``): 3 fixed variance (sigma2), 0 learnable precision with the
paper's Taylor log term (second weight C), 2 log-variance (second weight H), exact by per-group
tilting.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 first), so the shapes are small. Error measure: normwise relative error
max|actual - expected| / max|expected| per tensor, against float64 on the very same input
values (float32 inputs upcast exactly). Tolerances: float64 1e-10, float32 2e-5.
"""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll, backends

triton = pytest.importorskip("triton")

from silent_kernels import triton_ops  # noqa: E402  (after TRITON_INTERPRET; registers the ops)
from silent_kernels import triton_categorical_launch  # noqa: E402
from silent_kernels.autograd import HEADS, reference_loss  # noqa: E402
from tests.backend_cases import relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.silent_kernels
F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
DTYPES = [torch.float64, torch.float32]
HEAD_CODES = {"fixed": HEADS["fixed"], "precision": HEADS["taylor"], "logvar": HEADS["logvar"]}
NAMES = ("x", "logits", "weight", "bias", "second_weight", "second_bias", "sigma2")
LOG_2PI = math.log(2 * math.pi)
REFERENCE = reference_loss("categorical")
WORST: dict = {}  # largest error per (head, dtype), printed by the last test (pytest -s)


def check(actual, expected, dtype, what, head):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = relative_error(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"
    key = f"{head}/{str(dtype).replace('torch.', '')}"
    WORST[key] = max(WORST.get(key, 0.0), err)


# ---------------------------------------------------------------------------- cases
def case(head, B, k, G, K, seed=0, saturate=False, bias=True, second_bias=True):
    """float64 op inputs (x, logits, weight, bias, second_weight, second_bias, sigma2) for
    ``head``; ``saturate`` puts logits +-40 into group 0 of sample 0 (and a one-sided group)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    d = G * K
    s = 1.0 / math.sqrt(max(G, 1))
    x = torch.rand(B, k, generator=g, dtype=F64)
    logits = rnd(B, G, K, scale=1.5)
    if saturate and B > 0 and G > 0:
        logits[0, 0] = torch.tensor([40.0, -40.0, 0.0][:K] + [-40.0] * max(0, K - 3), dtype=F64)
        if B > 1:
            logits[-1, -1] = torch.full((K,), -40.0, dtype=F64)
            logits[-1, -1, 0] = 40.0
    weight = rnd(k, d, scale=s)
    b = rnd(k, scale=0.5) if bias else None
    if head == "fixed":
        return [x, logits, weight, b, None, None, 0.2 + torch.rand(k, generator=g, dtype=F64)]
    second = rnd(k, d, scale=0.4 * s)
    if head == "precision":
        c = (1.0 + 0.3 * rnd(k)) if second_bias else None
    else:
        c = rnd(k, scale=0.5) if second_bias else None
    return [x, logits, weight, b, second, c, None]


def _grad_on(inputs):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]


def compare(head, inputs, dtype, grad_weights=None, logits_scale=None):
    """The Triton op (forward and its backward through autograd) against the float64 reference
    on the same (rounded) values. ``logits_scale``: measure the logits' gradient against this
    scale instead of its own maximum (all groups saturated: that gradient is ~1e-35 everywhere,
    and kernel and reference alike get it only to ~1e-16 of the unsaturated scale)."""
    code = HEAD_CODES[head]
    cast = _grad_on([t.to(DEVICE, dtype) if t is not None else None for t in inputs])
    ref_in = _grad_on([t.detach().double().cpu() if t is not None else None for t in cast])
    B = inputs[0].shape[0]
    w = grad_weights if grad_weights is not None else torch.linspace(0.5, 1.5, B, dtype=F64)
    got = OPS.triton_categorical_nll(*cast, code)
    want = REFERENCE(*ref_in, code)
    assert got.dtype == dtype and got.shape == (B,)
    check(got, want, dtype, f"{head} loss", head)
    leaves = [i for i, t in enumerate(cast) if t is not None]
    g_got = torch.autograd.grad((got * w.to(got)).sum(), [cast[i] for i in leaves])
    g_want = torch.autograd.grad((want * w).sum(), [ref_in[i] for i in leaves])
    for i, a, b in zip(leaves, g_got, g_want):
        assert a.dtype == dtype
        if i == 1 and logits_scale is not None:
            err = (a.double().cpu() - b).abs().max().item() / logits_scale
            assert err <= TOL[dtype], f"{head} dlogits: error {err:.3g} of the scale {logits_scale:g}"
            continue
        check(a, b, dtype, f"{head} d{NAMES[i]}", head)


# ------------------------------------------------------------------ enumeration oracle
def enumerate_states(inputs, head):
    """E over all K^G joint one-hot states of the exact per-state loss (fixed, log-variance) or
    the Taylor term from the enumerated E[v^2], E[v^4] (precision); differentiable."""
    x, logits, A, b, C, c, sigma2 = inputs
    B, G, K = logits.shape
    probs = torch.softmax(logits, -1)
    b = 0 if b is None else b
    c = 0 if c is None else c
    total, e2v2, m2, v4 = 0, 0, 0, 0
    for state in itertools.product(range(K), repeat=G):
        idx = torch.tensor(state)
        z = torch.zeros(G, K, dtype=F64)
        z[torch.arange(G), idx] = 1.0
        w = probs[:, torch.arange(G), idx].prod(-1)[:, None]            # (B, 1)
        u = A @ z.flatten() + b
        r2 = (x - u) ** 2
        if head == "fixed":
            total = total + w * (r2 / (2 * sigma2) + 0.5 * (LOG_2PI + torch.log(sigma2)))
            continue
        v = C @ z.flatten() + c
        if head == "logvar":
            total = total + w * 0.5 * (LOG_2PI + v + r2 * torch.exp(-v))
        else:
            e2v2, m2, v4 = e2v2 + w * r2 * v * v, m2 + w * v * v, v4 + w * v ** 4
    if head == "precision":
        total = 0.5 * e2v2 - 0.5 * torch.log(m2) + (v4 - m2 * m2) / (4 * m2 * m2) + 0.5 * LOG_2PI
    return total.sum(-1)


@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (3, 2, 2, 5), (1, 1, 1, 2), (2, 4, 4, 2)])
def test_against_enumeration(head, shape):
    """float64 loss and every gradient against enumeration of all K^G joint states."""
    B, k, G, K = shape
    inputs = case(head, B, k, G, K, seed=G * K + k)
    cast = _grad_on([t.to(DEVICE) if t is not None else None for t in inputs])
    ref_in = _grad_on(inputs)
    got = OPS.triton_categorical_nll(*cast, HEAD_CODES[head])
    want = enumerate_states(ref_in, head)
    check(got, want, F64, f"{head} loss vs enumeration", head)
    w = torch.linspace(0.5, 1.5, B, dtype=F64)
    leaves = [i for i, t in enumerate(cast) if t is not None]
    g_got = torch.autograd.grad((got * w.to(got)).sum(), [cast[i] for i in leaves])
    g_want = torch.autograd.grad((want * w).sum(), [ref_in[i] for i in leaves])
    for i, a, b in zip(leaves, g_got, g_want):
        check(a, b, F64, f"{head} d{NAMES[i]} vs enumeration", head)


# ------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (3, 7, 5, 3), (5, 3, 2, 7), (2, 5, 3, 1)])
def test_against_reference(head, shape, dtype):
    """Odd shapes (B = 1, k = 1, G = 1, K = 2; primes; K = 1, a degenerate group) with
    saturated groups (logits +-40) among unsaturated ones."""
    B, k, G, K = shape
    compare(head, case(head, B, k, G, K, seed=sum(shape), saturate=K >= 2 and B * G > 2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_saturated_logits(head, dtype):
    """Every group of every sample saturated at +-40 (one category carries all the mass): the
    loss and every other gradient to the usual relative tolerance; the logits' gradient (~1e-35)
    to the tolerance of its unsaturated scale (the same problem at logits +-1)."""
    inputs = case(head, 3, 4, 3, 3, seed=7)
    g = torch.Generator().manual_seed(1)
    sign = torch.stack([torch.tensor([1.0, -1.0, -1.0], dtype=F64)[torch.randperm(3, generator=g)]
                        for _ in range(9)]).reshape(3, 3, 3)
    mild = [t.clone() if t is not None else None for t in inputs]
    mild[1] = sign.clone().requires_grad_()
    w = torch.linspace(0.5, 1.5, 3, dtype=F64)
    scale = torch.autograd.grad((REFERENCE(*mild, HEAD_CODES[head]) * w).sum(), mild[1])[0].abs().max().item()
    inputs[1] = 40.0 * sign
    compare(head, inputs, dtype, logits_scale=scale)


def mp_logits_grad(inputs, head, grad):
    """sum_n grad[n] d loss_n / d logits, exactly (mpmath, 60 digits) by enumeration of all K^G
    states: d E[f] / d l_gj = E[f (1[z_g = j] - pi_gj)] for every expectation the head needs."""
    with mpmath.workdps(60):
        return _mp_logits_grad(inputs, head, grad.tolist())


def _mp_logits_grad(inputs, head, grad):
    mp = mpmath
    x, logits, A, b, C, c, sigma2 = [t.tolist() if t is not None else None for t in inputs]
    B, G, K = inputs[1].shape
    k = inputs[0].shape[1]
    out = torch.zeros(B, G, K, dtype=F64)
    for n in range(B):
        probs = []
        for g in range(G):
            e = [mp.exp(mp.mpf(v)) for v in logits[n][g]]
            probs.append([v / mp.fsum(e) for v in e])
        total = [[mp.mpf(0)] * K for _ in range(G)]
        for p_ in range(k):
            sums = {}     # name -> (E[f], [[d E[f] / d l_gj]])
            for state in itertools.product(range(K), repeat=G):
                w = mp.fprod(probs[g][state[g]] for g in range(G))
                cols = [g * K + state[g] for g in range(G)]
                u = mp.fsum(mp.mpf(A[p_][i]) for i in cols) + (mp.mpf(b[p_]) if b is not None else 0)
                r2 = (mp.mpf(x[n][p_]) - u) ** 2
                if head == "fixed":
                    fs = {"f": r2 / (2 * mp.mpf(sigma2[p_]))}
                else:
                    v = mp.fsum(mp.mpf(C[p_][i]) for i in cols) + (mp.mpf(c[p_]) if c is not None else 0)
                    fs = ({"f": 0.5 * (v + r2 * mp.exp(-v))} if head == "logvar"
                          else {"e2": r2 * v * v, "m": v * v, "v4": v ** 4})
                for name, f in fs.items():
                    val, d = sums.setdefault(name, [mp.mpf(0), [[mp.mpf(0)] * K for _ in range(G)]])
                    sums[name][0] = val + w * f
                    for g in range(G):
                        for j in range(K):
                            d[g][j] += w * f * ((1 if state[g] == j else 0) - probs[g][j])
            if head == "precision":
                (m, dm), (v4, dv4), (_, de2) = sums["m"], sums["v4"], sums["e2"]
                for g in range(G):      # l = 0.5 E2 - 0.5 log M + V4 / (4 M^2) - 1/4 + const
                    for j in range(K):
                        total[g][j] += (0.5 * de2[g][j] - 0.5 * dm[g][j] / m + dv4[g][j] / (4 * m * m)
                                        - v4 * dm[g][j] / (2 * m ** 3))
            else:
                for g in range(G):
                    for j in range(K):
                        total[g][j] += sums["f"][1][g][j]
        for g in range(G):
            for j in range(K):
                out[n, g, j] = float(mp.mpf(grad[n]) * total[g][j])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_saturated_logits_gradient_elementwise(head, dtype):
    """Every group saturated (logits a permutation of (40, -40, 0) or (40, -40, 38)): the
    logits' gradient is ~1e-18 .. 1e-35, and each element keeps its relative accuracy against
    an exact (60-digit) enumeration."""
    inputs = case(head, 2, 3, 2, 3, seed=19)
    inputs[1] = torch.tensor([[[40.0, -40.0, 0.0], [0.0, 40.0, -40.0]],
                              [[-40.0, 38.0, 40.0], [-40.0, 0.0, 40.0]]], dtype=F64)
    if head == "logvar":    # tilts that keep, move and split the mode
        inputs[4] = inputs[4] * 0.5
        inputs[4][0, 0:3] = torch.tensor([0.0, -79.0, 3.0], dtype=F64)
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    grad = torch.tensor([1.0, -0.7], dtype=F64)
    code = HEAD_CODES[head]
    got = OPS.triton_categorical_nll_backward(grad.to(DEVICE, dtype), *cast,
                                              [False, True, False, False, False, False, False], code)[1]
    want = mp_logits_grad([t.double().cpu() if t is not None else None for t in cast], head, grad)
    assert (want != 0).all()
    err = ((got.double().cpu() - want).abs() / want.abs()).max().item()
    assert err <= TOL[dtype], f"{head} dlogits elementwise relative error {err:.3g}"
    WORST[f"{head}/{str(dtype).replace('torch.', '')} saturated elementwise"] = err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_infinite_logits(head, dtype):
    """Probabilities exactly 0 (logits -inf, as log(probs) gives): finite loss and gradients, a
    zero logits gradient there; the reference is evaluated at logits -1e4 instead (float64 is at
    the limit there)."""
    inputs = case(head, 3, 4, 2, 3, seed=23)
    inputs[1][0, 1, 2], inputs[1][1, 0, 0], inputs[1][2, 1, 1] = -math.inf, -math.inf, -math.inf
    inputs[1][2, 1, 0] = -math.inf            # a group with one possible category
    finite = [t.clone() if t is not None else None for t in inputs]
    finite[1] = finite[1].clamp_min(-1e4)
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    ref_in = _grad_on(finite)
    code = HEAD_CODES[head]
    grad = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    ref = REFERENCE(*ref_in, code)
    (ref * grad).sum().backward()
    check(OPS.triton_categorical_nll(*cast, code), ref, dtype, f"{head} infinite logits loss", head)
    outs = OPS.triton_categorical_nll_backward(grad.to(DEVICE, dtype), *cast, [t is not None for t in cast], code)
    for i, (got, r) in enumerate(zip(outs, ref_in)):
        if r is not None:
            check(got, r.grad, dtype, f"{head} infinite logits d{NAMES[i]}", head)
    assert (outs[1][torch.isinf(inputs[1]).to(DEVICE)] == 0).all()


@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_optional_biases_and_strided_inputs(head):
    """No biases; non-contiguous weights (a transposed view) and x (a column slice)."""
    inputs = case(head, 3, 5, 2, 3, seed=11, bias=False, second_bias=False)
    inputs[0] = torch.cat([inputs[0], torch.zeros(3, 2, dtype=F64)], 1)[:, :5]
    inputs[2] = inputs[2].t().contiguous().t()
    if inputs[4] is not None:
        inputs[4] = inputs[4].t().contiguous().t()
    inputs = [t.to(DEVICE) if t is not None else None for t in inputs]
    assert not inputs[0].is_contiguous() and not inputs[2].is_contiguous()
    code = HEAD_CODES[head]
    ref_in = _grad_on([t.cpu() if t is not None else None for t in inputs])
    grad = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    ref = REFERENCE(*ref_in, code)
    (ref * grad).sum().backward()
    check(OPS.triton_categorical_nll(*inputs, code), ref, F64, f"{head} strided loss", head)
    outs = OPS.triton_categorical_nll_backward(grad.to(DEVICE), *inputs, [t is not None for t in inputs], code)
    for i, (got, r) in enumerate(zip(outs, ref_in)):
        if r is not None:
            check(got, r.grad, F64, f"{head} strided d{NAMES[i]}", head)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_multiple_tiles(monkeypatch, head, dtype):
    """Tiny tiles (2 x 2 samples x pixels), so several programs own ragged tiles and the
    per-tile partials of the loss, dlogits, dweights and the bias gradients are summed."""
    monkeypatch.setattr(triton_categorical_launch, "_INTERP_TILE", 8)
    cfg = triton_categorical_launch._config(5, 7, 3, dtype, torch.device(DEVICE))
    assert (cfg["BLOCK_B"], cfg["BLOCK_P"]) == (2, 2)
    compare(head, case(head, 5, 7, 3, 3, seed=13, saturate=True), dtype,
            grad_weights=torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5], dtype=F64))


def test_gpu_block_configuration(monkeypatch):
    """The GPU blocks hold all categories of a group and respect the tile budget (a 2 x 2
    sample x pixel tile at least); then the GPU blocks run here on a ragged problem."""
    monkeypatch.setattr(triton_categorical_launch, "sized_to_problem", lambda device: False)
    for ncat, dtype, kind in itertools.product((1, 2, 3, 10, 100, 1000), DTYPES, ("fwd", "bwd")):
        width = 8 if dtype == F64 else 4
        budget = triton_categorical_launch._GPU_TILE[width][kind]
        pairs = triton_categorical_launch._GPU_PAIRS[width]
        cfg = triton_categorical_launch._config(128, 784, ncat, dtype, torch.device(DEVICE), kind)
        tile = cfg["BLOCK_B"] * cfg["BLOCK_P"] * cfg["BLOCK_C"]
        assert cfg["BLOCK_C"] >= ncat and tile <= max(budget, 4 * cfg["BLOCK_C"]), (ncat, cfg)
        assert cfg["BLOCK_B"] * cfg["BLOCK_P"] <= pairs and cfg["num_warps"] == 4
    compare("precision", case("precision", 19, 37, 3, 5, seed=3, saturate=True), torch.float32)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_half_precision_inputs(head, dtype, tol):
    """fp16 / bf16 inputs: fp32 accumulation, outputs in the input dtype, within the README's
    tolerances of the float64 reference on the same rounded values."""
    inputs = case(head, 3, 5, 2, 3, seed=17)
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    ref_in = _grad_on([t.double().cpu() if t is not None else None for t in cast])
    ref = REFERENCE(*ref_in, HEAD_CODES[head])
    grad = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    (ref * grad).sum().backward()
    loss = OPS.triton_categorical_nll(*cast, HEAD_CODES[head])
    assert loss.dtype == dtype and relative_error(loss, ref) <= tol
    outs = OPS.triton_categorical_nll_backward(grad.to(DEVICE, dtype), *cast, [t is not None for t in cast],
                                               HEAD_CODES[head])
    for got, r in zip(outs, ref_in):
        if r is not None:
            assert got.dtype == dtype and relative_error(got, r.grad) <= tol


# --------------------------------------------------------------- backward contract
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_backward_each_needs_flag(head):
    """Each needs flag alone: that gradient (vs the reference) and (0,) tensors elsewhere."""
    inputs = [t.to(DEVICE) if t is not None else None for t in case(head, 3, 4, 2, 3, seed=21)]
    code = HEAD_CODES[head]
    grad = torch.tensor([0.5, -1.0, 2.0], dtype=F64, device=DEVICE)
    ref_in = _grad_on([t.cpu() if t is not None else None for t in inputs])
    (REFERENCE(*ref_in, code) * grad.cpu()).sum().backward()
    for i in range(7):
        outs = OPS.triton_categorical_nll_backward(grad, *inputs, [j == i for j in range(7)], code)
        for j, (o, inp) in enumerate(zip(outs, inputs)):
            if j == i and inp is not None:
                assert o.shape == inp.shape
                assert relative_error(o, ref_in[i].grad) <= TOL[F64], (head, i)
            else:
                assert o.shape == (0,), (head, i, j)


def test_empty_batch_and_no_pixels():
    for head in ("fixed", "logvar"):
        for B, k in ((0, 3), (2, 0)):
            inputs = [t.to(DEVICE) if t is not None else None for t in case(head, B, k, 2, 3)]
            loss = OPS.triton_categorical_nll(*inputs, HEAD_CODES[head])
            assert loss.shape == (B,) and (loss == 0).all()
            outs = OPS.triton_categorical_nll_backward(torch.ones(B, dtype=F64, device=DEVICE), *inputs,
                                                       [True] * 7, HEAD_CODES[head])
            for o, t in zip(outs, inputs):
                assert o.shape == (t.shape if t is not None else (0,)) and (o == 0).all()


@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_no_groups(head):
    """G = 0 (no latents): the loss of the constant decoder x ~ N(b, v), v = sigma2, 1/c^2 or
    exp(h0), and its gradients; an empty logits gradient."""
    x, logits, weight, bias, second, second_bias, sigma2 = case(head, 2, 3, 0, 3, seed=29)
    assert logits.shape == (2, 0, 3) and weight.shape == (3, 0)
    leaves = _grad_on([x, bias, sigma2 if head == "fixed" else second_bias])
    xl, bl, vl = leaves
    r2 = (xl - bl) ** 2
    if head == "fixed":
        want = 0.5 * (r2 / vl + torch.log(vl) + LOG_2PI)
    elif head == "precision":
        want = 0.5 * (r2 * vl * vl - torch.log(vl * vl) + LOG_2PI)
    else:
        want = 0.5 * (LOG_2PI + vl + r2 * torch.exp(-vl))
    want = want.sum(-1)
    inputs = [xl, logits, weight, bl, second, vl if head != "fixed" else None, vl if head == "fixed" else None]
    got = OPS.triton_categorical_nll(*[t.to(DEVICE) if t is not None else None for t in inputs], HEAD_CODES[head])
    check(got, want, F64, f"{head} G=0 loss", head)
    grads = torch.autograd.grad(want.sum(), leaves)
    outs = OPS.triton_categorical_nll_backward(torch.ones(2, dtype=F64, device=DEVICE),
                                               *[t.detach().to(DEVICE) if t is not None else None for t in inputs],
                                               [True] * 7, HEAD_CODES[head])
    assert outs[1].shape == (2, 0, 3) and outs[2].shape == (3, 0)
    for got_g, want_g in zip((outs[0], outs[3], outs[6] if head == "fixed" else outs[5]), grads):
        check(got_g, want_g, F64, f"{head} G=0 gradient", head)


def test_argument_checks():
    x, logits, weight, bias, second, second_bias, _ = [t.to(DEVICE) if t is not None else None
                                                       for t in case("logvar", 2, 3, 2, 3)]
    sigma2 = torch.ones(3, dtype=F64, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"head=3 \(fixed\) needs sigma2 and no second_weight"):
        OPS.triton_categorical_nll(x, logits, weight, bias, second, None, None, 3)
    with pytest.raises(RuntimeError, match=r"head=2 needs second_weight and no sigma2"):
        OPS.triton_categorical_nll(x, logits, weight, bias, second, second_bias, sigma2, 2)
    with pytest.raises(RuntimeError, match=r"head: expected 3 \(fixed\), 0 .* got 1"):
        OPS.triton_categorical_nll(x, logits, weight, bias, second, second_bias, None, 1)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3, 6\), got \(3, 5\)"):
        OPS.triton_categorical_nll(x, logits, weight[:, :5], bias, None, None, sigma2, 3)
    with pytest.raises(ValueError, match=r"logits: expected shape \(B=2, G, K\)"):
        OPS.triton_categorical_nll(x, logits.flatten(1), weight, bias, None, None, sigma2, 3)
    with pytest.raises(ValueError, match=r"bias: all inputs must share x's dtype"):
        OPS.triton_categorical_nll(x, logits, weight, bias.float(), None, None, sigma2, 3)


# -------------------------------------------------------- autograd, opcheck, gradcheck
def test_opcheck():
    grad = torch.tensor([1.0, -0.5], device=DEVICE)
    for head in ("fixed", "precision", "logvar"):
        for bias in (True, False):
            inputs = [t.to(DEVICE, torch.float32) if t is not None else None
                      for t in case(head, 2, 3, 2, 3, seed=5, bias=bias, second_bias=bias)]
            torch.library.opcheck(OPS.triton_categorical_nll.default, [*_grad_on(inputs), HEAD_CODES[head]])
        torch.library.opcheck(OPS.triton_categorical_nll_backward.default,
                              [grad, *inputs, [True] * 7, HEAD_CODES[head]])
        torch.library.opcheck(OPS.triton_categorical_nll_backward.default,
                              [grad, *inputs, [False, True, False, True, True, False, True], HEAD_CODES[head]])


@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_gradcheck(head):
    """torch.autograd.gradcheck (and gradgradcheck) in float64 through the public wrappers."""
    x, logits, weight, bias, second, second_bias, sigma2 = _grad_on(
        [t.to(DEVICE) if t is not None else None for t in case(head, 2, 2, 2, 3, seed=31)])
    if head == "fixed":
        fn, inputs = triton_ops.triton_categorical_fixed_nll, (x, logits, weight, bias, sigma2)
    elif head == "precision":
        fn, inputs = triton_ops.triton_categorical_precision_nll, (x, logits, weight, bias, second, second_bias)
    else:
        fn, inputs = triton_ops.triton_categorical_logvar_nll, (x, logits, weight, bias, second, second_bias)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    # second derivatives (create_graph=True differentiates the reference, autograd.py)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


# ------------------------------------------------------------- through analytic_nll
def _public_loss(t, head, backend):
    q = D.OneHotCategorical(logits=t["logits"])
    if head == "fixed":
        kwargs = dict(sigma2=t["sigma2"])
    elif head == "precision":
        kwargs = dict(precision_weight=t["second"], precision_bias=t["second_bias"])
    else:
        kwargs = dict(logvar_weight=t["second"], logvar_bias=t["second_bias"])
    return analytic_nll(t["x"], q, t["weight"], t["bias"], reduction="sum", backend=backend, **kwargs)


def _public_leaves(head, seed):
    x, logits, weight, bias, second, second_bias, sigma2 = case(head, 3, 4, 2, 3, seed=seed)
    leaves = {"x": x, "logits": logits, "weight": weight, "bias": bias}
    if head == "fixed":
        leaves["sigma2"] = sigma2
    else:
        leaves.update(second=second, second_bias=second_bias)
    return leaves


@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_analytic_nll_triton_backend(head):
    """analytic_nll(backend="triton") routes categorical latents to the Triton op (the kinds
    _load_triton offers) and matches the reference backend, gradients included."""
    backend = backends.resolve("triton", torch.device(DEVICE), f"categorical_{head}")
    assert backend.name == "triton"
    leaves = _public_leaves(head, seed=41)
    results = []
    for name, device in (("triton", DEVICE), ("torch", "cpu")):
        t = {n: v.to(device).requires_grad_() for n, v in leaves.items()}
        loss = _public_loss(t, head, name)
        loss.backward()
        results.append((loss.detach(), {n: v.grad for n, v in t.items()}))
    (got, got_grads), (ref, ref_grads) = results
    check(got, ref, F64, f"{head} analytic_nll", head)
    for n in ref_grads:
        check(got_grads[n], ref_grads[n], F64, f"{head} analytic_nll d{n}", head)


def test_latent_moments_categorical_triton():
    """LatentMoments.categorical goes through the same Triton kernels."""
    leaves = _public_leaves("logvar", seed=43)
    q = LatentMoments.categorical(logits=leaves["logits"].to(DEVICE))
    got = analytic_nll(leaves["x"].to(DEVICE), q, leaves["weight"].to(DEVICE), leaves["bias"].to(DEVICE),
                       logvar_weight=leaves["second"].to(DEVICE), logvar_bias=leaves["second_bias"].to(DEVICE),
                       reduction="none", backend="triton")
    want = REFERENCE(leaves["x"], leaves["logits"], leaves["weight"], leaves["bias"], leaves["second"],
                     leaves["second_bias"], None, HEAD_CODES["logvar"])
    check(got, want, F64, "logvar LatentMoments.categorical", "logvar")


def test_torch_compile_fullgraph():
    """The three heads through analytic_nll(backend="triton") inside torch.compile(fullgraph=True)
    give the eager loss and gradients."""
    heads = ("fixed", "precision", "logvar")
    leaves = {h: _public_leaves(h, seed=51 + i) for i, h in enumerate(heads)}

    def loss_fn(ts):
        return sum(_public_loss(ts[h], h, "triton") for h in heads)

    results = []
    for fn in (torch.compile(loss_fn, fullgraph=True), loss_fn):
        ts = {h: {n: v.to(DEVICE).float().requires_grad_() for n, v in leaves[h].items()} for h in heads}
        loss = fn(ts)
        loss.backward()
        results.append((loss.detach(), [v.grad for h in heads for v in ts[h].values()]))
    (compiled, compiled_grads), (eager, eager_grads) = results
    assert relative_error(compiled, eager) <= 1e-6
    for i, (a, b) in enumerate(zip(compiled_grads, eager_grads)):
        assert relative_error(a, b) <= 1e-6, i


# ------------------------------------------------------ GPU build check (no GPU needed)
_BUILD_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from silent_kernels import triton_categorical as tc, triton_categorical_launch as tcl, triton_common as common
assert not common.INTERPRET
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
kernel = tc.categorical_kernel
acc_ptrs = {"lp_ptr", "loss_ptr", "dl_ptr", "da_ptr", "dc_ptr", "dv_ptr"}
ptr = {"float32": "*fp32", "float64": "*fp64", "bfloat16": "*bf16"}
out = {}
for head, dtype, grad, ncat in json.loads(sys.argv[1]):
    dt = getattr(torch, dtype)
    cfg = tcl._config(128, 784, ncat, dt, torch.device("cuda"), "bwd" if grad else "fwd")
    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    fixed = head == 3
    consts = dict(HEAD=head, HAS_C=not fixed, TAYLOR=head == 0, LOGVAR=head == 2, HAS_BIAS=True,
                  HAS_C0=not fixed, GRAD=grad, NEED_X=grad, NEED_L=grad, NEED_A=grad,
                  NEED_C=grad and not fixed, NEED_B=grad, NEED_C0=grad and not fixed,
                  NEED_S2=grad and fixed, ACC=common.acc_dtypes(dt)[0], **cfg)
    acc = "float64" if dtype == "float64" else "float32"
    sig = {a: "constexpr" if a in consts else (ptr[acc] if a in acc_ptrs else ptr[dtype])
           if a.endswith("_ptr") else "i32" for a in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
    binary = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(binary.asm["cubin"])
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name],
                           capture_output=True, text=True).stdout
    os.unlink(f.name)
    key = f"head{head}/{dtype}/{'bwd' if grad else 'fwd'}/K={ncat}"
    out[key] = [int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))]
print(json.dumps(out))
"""

_BUILD_CASES = ([[h, dt, g, 10] for h in (3, 0, 2) for dt in ("float32", "float64") for g in (False, True)]
                + [[0, dt, g, K] for K in (2, 3) for dt in ("float32", "float64") for g in (False, True)]
                + [[0, "float32", True, 100], [0, "float64", True, 100], [2, "float64", True, 2],
                   [0, "bfloat16", True, 10]])


@pytest.mark.slow
def test_kernel_builds_for_sm90_without_spills():
    """Ahead-of-time sm_90 build of the kernel (forward and backward of every head, fp32 / fp64,
    K = 2 .. 100) with the GPU block configurations: it compiles outside the interpreter, and
    needs no local memory (register spills). Runs without a GPU (Triton's bundled ptxas)."""
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "cuobjdump")):
        pytest.skip("this triton build has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(_BUILD_CASES)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    print("\nregisters / stack bytes:", usage)
    assert len(usage) == len(_BUILD_CASES)
    for name, (regs, stack) in usage.items():
        assert stack == 0, f"{name} spills ({regs} registers, {stack} bytes of stack)"


@pytest.mark.gpu
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_gpu_mnist_shape(head):
    """The GPU build at the MNIST shape (B = 64, k = 784, G = 20, K = 10) in float32 against the
    float64 reference, with saturated groups, and bitwise determinism (no atomics)."""
    inputs = case(head, 64, 784, 20, 10, seed=71, saturate=True)
    compare(head, inputs, torch.float32)
    cast = [t.to("cuda", torch.float32) if t is not None else None for t in inputs]
    grad = torch.linspace(-1.0, 1.0, 64, device="cuda")
    runs = [OPS.triton_categorical_nll_backward(grad, *cast, [t is not None for t in cast], HEAD_CODES[head])
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_report_worst_errors():
    """Prints the largest errors the comparisons above saw (pytest -s)."""
    print("\nworst normwise relative error (head/dtype):", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})
