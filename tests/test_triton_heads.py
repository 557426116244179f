"""The Triton kernels of the exact learned-variance heads against the float64 reference.

* ``triton_precision_nll(..., head=1)``: the exact E[log v^2] (MATH.md §10) vs
  ``reference.precision_nll(..., log_term="exact")``;
* ``triton_precision_nll(..., head=2)``: the log-variance head on Gaussian latents (§11) vs
  ``reference.logvar_nll`` with ``LatentMoments.gaussian``;
* ``triton_bernoulli_logvar_nll``: the fused tilted log-variance head on Bernoulli latents
  vs ``reference.logvar_nll`` with ``LatentMoments.bernoulli(logits=...)``.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 first), so the shapes are small. Error measure: normwise relative error
max|actual - expected| / max|expected| per tensor (per-sample loss, each gradient), against
the reference in float64 on the very same input values (float32 inputs upcast exactly).
Tolerances: float64 1e-10, float32 2e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from silent_kernels import LatentMoments, analytic_nll, reference

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from silent_kernels import triton_common, triton_ops  # noqa: E402  (after TRITON_INTERPRET; registers the ops)
from silent_kernels.autograd import HEADS, PrecisionNLLFunction  # noqa: E402
from silent_kernels.special import SERIES_LIMIT  # noqa: E402
from silent_kernels.special import expected_log_square as special_log_square  # noqa: E402
from silent_kernels.triton_heads import expected_log_square  # noqa: E402
from tests.backend_cases import relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.silent_kernels
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
DTYPES = [torch.float64, torch.float32]
EXACT, LOGVAR = HEADS["exact"], HEADS["logvar"]
WORST: dict = {}  # largest error per (path, dtype), printed by the last test (pytest -s)


def check(actual, expected, dtype, what, path):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = relative_error(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"
    key = f"{path}/{str(dtype).replace('torch.', '')}"
    WORST[key] = max(WORST.get(key, 0.0), err)


# ---------------------------------------------------------------------------- cases
def gaussian_case(head, B, k, d, seed=0, special=False, bias=True, second_bias=True):
    """float64 (x, mean, var, weight, bias, C or H, c or h0) for a Gaussian-latent head.

    Exact log term: the precision biases spread |vbar| / sqrt(2 Scc) over both sides of the
    series / asymptotic crossover. ``special`` adds the degenerate pixels: vbar = 0 exactly
    (pixel 0), Scc -> 0 with vbar != 0 (pixel 1: Scc ~ 1e-14, far asymptotic), Scc = 0 exactly
    (pixel 2), and vbar, Scc -> 0 together (pixel 3: x of order 1 at Scc ~ 1e-10)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    s = 1.0 / math.sqrt(max(d, 1))
    x, mean = rnd(B, k), rnd(B, d)
    var = torch.exp(rnd(B, d, scale=0.3))
    weight, b = rnd(k, d, scale=s), rnd(k, scale=0.5)
    if head == EXACT:
        second, second_b = rnd(k, d, scale=0.4 * s), rnd(k, scale=2.5)
    else:   # log-variance weights: exp(-(H z + h0)) stays moderate
        second, second_b = rnd(k, d, scale=0.5 * s), rnd(k, scale=0.5)
    if special:
        assert k >= 4 and second_bias
        mean[:, 0] = 0.0
        second[0] = 0.0
        second[0, 0], second_b[0] = 0.7, 0.0
        second[1], second_b[1] = 1e-7, 0.8
        second[2], second_b[2] = 0.0, -1.3
        second[3], second_b[3] = 1e-5, 0.0
    return [x, mean, var, weight, b if bias else None, second, second_b if second_bias else None]


def bernoulli_case(B, k, d, seed=0, saturate=True, bias=True, second_bias=True):
    """float64 (x, logits, weight, bias, H, h0); with ``saturate`` some logits at +-30
    (one latent saturated for every sample, one sample saturated on every latent, where
    B, d >= 2: a logits gradient made only of saturated entries is ~e^-30 and below what
    the float64 reference itself resolves to 1e-10)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    s = 1.0 / math.sqrt(max(d, 1))
    logits = rnd(B, d, scale=2.0)
    if saturate and B >= 2 and d >= 2:
        logits[:, 0] = 30.0
        logits[0, :] = torch.where(torch.arange(d) % 2 == 0, 30.0, -30.0).double()
        logits[-1, -1] = -30.0
    return [rnd(B, k), logits, rnd(k, d, scale=s), rnd(k, scale=0.5) if bias else None,
            rnd(k, d, scale=0.7), rnd(k, scale=0.5) if second_bias else None]


def op_inputs(head, case):
    """The 9 tensor inputs of the precision op from a Gaussian case."""
    x, mean, var, weight, b, second, second_b = case
    return [x, mean, var, None, None, weight, b, second, second_b]


def precision_reference(head, inputs):
    """The public reference of each head (float64, autograd)."""
    x, mean, var, _, _, weight, b, second, second_b = inputs
    if head == EXACT:
        return reference.precision_nll(x, mean, var, None, None, weight, b, second, second_b, log_term="exact")
    q = LatentMoments.gaussian(mean, logvar=var.log())
    return reference.logvar_nll(x, q, weight, b, second, second_b)


def bernoulli_reference(inputs):
    x, logits, weight, b, H, h0 = inputs
    return reference.logvar_nll(x, LatentMoments.bernoulli(logits=logits), weight, b, H, h0)


def compare(path, inputs, dtype, upstream=None):
    """Forward and backward of the op at ``dtype`` vs the float64 reference on the same values."""
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    ref_in = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in cast]
    B = inputs[0].shape[0]
    grad = (torch.linspace(-1.0, 2.0, B, dtype=torch.float64) if upstream is None else upstream).to(dtype)
    if path == "bernoulli_logvar":
        fwd, bwd, ref, extra = OPS.triton_bernoulli_logvar_nll, OPS.triton_bernoulli_logvar_nll_backward, \
            bernoulli_reference(ref_in), ()
    else:
        head = EXACT if path == "exact" else LOGVAR
        fwd, bwd, ref, extra = OPS.triton_precision_nll, OPS.triton_precision_nll_backward, \
            precision_reference(head, ref_in), (head,)
    loss = fwd(*cast, *extra)
    assert loss.dtype == dtype and loss.shape == (B,)
    check(loss, ref, dtype, f"{path} loss", path)
    (ref * grad.double()).sum().backward()
    grads = bwd(grad.to(DEVICE), *cast, [t is not None for t in cast], *extra)
    assert len(grads) == len(cast)
    for i, (got, r) in enumerate(zip(grads, ref_in)):
        if r is None:
            assert got.shape == (0,)
            continue
        assert got.dtype == dtype and got.shape == r.shape, i
        check(got, r.grad, dtype, f"{path} grad of input {i}", path)


def crossover_x(inputs):
    """x = |vbar| / sqrt(2 Scc) per (sample, pixel) of a Gaussian case (float64)."""
    x, mean, var, _, _, _, _, C, c = inputs
    vbar = mean @ C.t() + (0 if c is None else c)
    scc = var @ C.square().t()
    return vbar.abs() / (2 * scc).sqrt()


# ------------------------------------------------------ the special function, elementwise
@triton.jit
def _log_square_kernel(m_ptr, s_ptr, v_ptr, dm_ptr, ds_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    value, d_mean, d_var = expected_log_square(tl.load(m_ptr + i), tl.load(s_ptr + i))
    tl.store(v_ptr + i, value)
    tl.store(dm_ptr + i, d_mean)
    tl.store(ds_ptr + i, d_var)


def test_expected_log_square_matches_special():
    """The Triton E[log v^2] and its two derivatives, elementwise, against special.py (the
    spec, autograd for the derivatives) at |m|/sqrt(s2) from 0 to 1e4 (both sides of the
    crossover at 6 sqrt(2) = 8.485...), s2 from 1e-12 to 1e6, both signs of m, s2 = 0 and s2
    below the floor."""
    ratios = [0.0, 1e-3, 0.5, 1.0, 2.0, 5.0, 8.4, 8.4852, 8.4853, 8.5, 30.0, 1e4]
    m, s2 = [], []
    for r in ratios:
        for s in (1e-12, 1e-3, 1.0, 1e6):
            for sign in (1.0, -1.0):
                m.append(sign * r * math.sqrt(s))
                s2.append(s)
    m += [0.7, 1.0, -2.0]
    s2 += [0.0, 1e-40, 0.0]
    n = triton.next_power_of_2(len(m))
    m = torch.tensor(m + [1.0] * (n - len(m)), dtype=torch.float64, device=DEVICE)
    s2 = torch.tensor(s2 + [1.0] * (n - len(s2)), dtype=torch.float64, device=DEVICE)
    got = [torch.empty_like(m) for _ in range(3)]
    _log_square_kernel[(1,)](m, s2, *got, N=n)
    mr, sr = m.cpu().requires_grad_(), s2.cpu().requires_grad_()
    value = special_log_square(mr, sr)
    value.sum().backward()
    for actual, expected, name, tol in zip(got, (value.detach(), mr.grad, sr.grad), ("value", "d/dm", "d/ds2"),
                                           (1e-14, 1e-14, 1e-12)):
        err = ((actual.cpu() - expected).abs() / expected.abs().clamp_min(1e-300)).max().item()
        assert err <= tol, f"{name}: elementwise relative error {err:.3g}"


# ----------------------------------------------------------- oracles (MATH.md §13)
def _quadrature_log_square(m: float, s2: float) -> float:
    """E[log (m + s t)^2], t ~ N(0, 1), by mpmath quadrature split at the log singularity and
    across the bulk of the normal density."""
    import mpmath

    mpmath.mp.dps = 30
    m, s = mpmath.mpf(m), mpmath.sqrt(mpmath.mpf(s2))
    f = lambda t: mpmath.log((m + s * t) ** 2) * mpmath.npdf(t)  # noqa: E731
    points = sorted({-m / s, mpmath.mpf(-8), mpmath.mpf(0), mpmath.mpf(8)})   # the bulk of N(0, 1), too
    return float(mpmath.quad(f, [-mpmath.inf, *points, mpmath.inf]))


def _dawson_mp(x: float) -> float:
    import mpmath

    mpmath.mp.dps = 30
    x = mpmath.mpf(x)
    return float(mpmath.sqrt(mpmath.pi) / 2 * mpmath.exp(-x * x) * mpmath.erfi(x))


def test_expected_log_square_quadrature_oracle():
    """The Triton E[log v^2] against direct quadrature, and its derivatives against the closed
    forms d/dm = 2 sqrt(2) D(m / sqrt(2 s2)) / sqrt(s2), d/ds2 = (1 - 2 x D(x)) / s2 with
    Dawson's D from mpmath, at |m|/s in {0, 1e-3, 0.5, 1, 2, 5, 30, 1e4}, s2 in {1e-12, 1, 1e6}."""
    pytest.importorskip("mpmath")
    cases = [(r * math.sqrt(s2), s2) for r in (0.0, 1e-3, 0.5, 1.0, 2.0, 5.0, 30.0, 1e4)
             for s2 in (1e-12, 1.0, 1e6)]
    n = triton.next_power_of_2(len(cases))
    m = torch.tensor([c[0] for c in cases] + [1.0] * (n - len(cases)), dtype=torch.float64, device=DEVICE)
    s2 = torch.tensor([c[1] for c in cases] + [1.0] * (n - len(cases)), dtype=torch.float64, device=DEVICE)
    got = [torch.empty_like(m) for _ in range(3)]
    _log_square_kernel[(1,)](m, s2, *got, N=n)
    for i, (mi, si) in enumerate(cases):
        value = _quadrature_log_square(mi, si)
        x = abs(mi) / math.sqrt(2 * si)
        dawson = _dawson_mp(x)
        d_mean = 2 * math.sqrt(2) * dawson / math.sqrt(si) * (1 if mi >= 0 else -1)
        d_var = (1 - 2 * x * dawson) / si
        scale = max(abs(value), abs(math.log(si)))         # value ~ log s2 + O(1)
        assert abs(got[0][i].item() - value) <= 1e-13 * scale, (mi, si, got[0][i].item(), value)
        assert abs(got[1][i].item() - d_mean) <= 1e-12 * max(abs(d_mean), 1e-300) + 1e-300, (mi, si)
        if x < 1e3:       # beyond, 1 - 2 x D(x) ~ -1/(2 x^2) cancels in the closed form itself
            assert abs(got[2][i].item() - d_var) <= 1e-9 * abs(d_var), (mi, si, got[2][i].item(), d_var)


def _enumerated_bernoulli_logvar(x, logits, weight, bias, H, h0):
    """-E log N(x; A z + b, exp(H z + h0)) by summing over all 2^d states (float64, autograd)."""
    d = logits.shape[1]
    states = torch.tensor([[(s >> i) & 1 for i in range(d)] for s in range(2 ** d)], dtype=torch.float64)
    log_p = states @ torch.nn.functional.logsigmoid(logits).t() + (1 - states) @ \
        torch.nn.functional.logsigmoid(-logits).t()                          # (2^d, B)
    mean = states @ weight.t() + bias                                         # (2^d, k)
    logvar = states @ H.t() + h0
    nll = 0.5 * (math.log(2 * math.pi) + logvar[:, None] + (x[None] - mean[:, None]).square()
                 * torch.exp(-logvar[:, None]))                              # (2^d, B, k)
    return (log_p.exp()[..., None] * nll).sum((0, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_logvar_enumeration_oracle(dtype):
    """Loss and every gradient against enumeration of all 2^6 latent states (no reference code)."""
    inputs = bernoulli_case(3, 5, 6, seed=71)            # includes logits at +-30
    cast = [t.to(DEVICE, dtype) for t in inputs]
    exact_in = [t.detach().double().cpu().requires_grad_() for t in cast]
    expected = _enumerated_bernoulli_logvar(*exact_in)
    grad = torch.tensor([0.7, -1.0, 1.5], dtype=torch.float64)
    (expected * grad).sum().backward()
    check(OPS.triton_bernoulli_logvar_nll(*cast), expected, dtype, "enumeration loss", "bernoulli_logvar")
    grads = OPS.triton_bernoulli_logvar_nll_backward(grad.to(DEVICE, dtype), *cast, [True] * 6)
    for i, (got, r) in enumerate(zip(grads, exact_in)):
        check(got, r.grad, dtype, f"enumeration grad {i}", "bernoulli_logvar")


def test_gaussian_logvar_monte_carlo_oracle():
    """The Gaussian log-variance head against a 4e5-draw Monte Carlo estimate (z-score < 5)."""
    x, mean, var, weight, b, H, h0 = gaussian_case(LOGVAR, 2, 3, 2, seed=81)
    loss = OPS.triton_precision_nll(*[t.to(DEVICE) for t in (x, mean, var)], None, None,
                                    *[t.to(DEVICE) for t in (weight, b, H, h0)], LOGVAR).cpu()
    g = torch.Generator().manual_seed(82)
    z = mean[:, None] + var.sqrt()[:, None] * torch.randn(2, 400_000, 2, generator=g, dtype=torch.float64)
    logvar = z @ H.t() + h0
    draws = 0.5 * (math.log(2 * math.pi) + logvar + (x[:, None] - z @ weight.t() - b).square()
                   * torch.exp(-logvar)).sum(-1)                            # (B, draws)
    z_score = (loss - draws.mean(1)).abs() / (draws.std(1) / math.sqrt(draws.shape[1]))
    assert (z_score < 5).all(), z_score


# ---------------------------------------------------------------------- the sweeps
SHAPES = [(1, 1, 1), (7, 13, 5), (3, 1, 4), (2, 5, 1), (5, 37, 19)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,k,d", SHAPES)
@pytest.mark.parametrize("path", ["exact", "logvar"])
def test_gaussian_heads(path, B, k, d, dtype):
    head = EXACT if path == "exact" else LOGVAR
    inputs = op_inputs(head, gaussian_case(head, B, k, d, seed=B * 100 + k * 10 + d))
    compare(path, inputs, dtype)


def test_exact_log_case_spans_both_series():
    """The main exact-log case exercises the convergent and the asymptotic branch."""
    x = crossover_x(op_inputs(EXACT, gaussian_case(EXACT, 7, 13, 5, seed=7 * 100 + 13 * 10 + 5)))
    assert (x < SERIES_LIMIT).any() and (x >= SERIES_LIMIT).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["exact", "logvar"])
def test_gaussian_heads_degenerate_pixels(path, dtype):
    """vbar = 0 exactly, Scc -> 0 (and = 0) with vbar != 0, and both -> 0 together."""
    head = EXACT if path == "exact" else LOGVAR
    inputs = op_inputs(head, gaussian_case(head, 4, 6, 3, seed=9, special=True))
    if head == EXACT:
        x = crossover_x(inputs)
        assert (x[:, 0] == 0).all() and (x[:, 1] > 1e6).all() and torch.isinf(x[:, 2]).all()
    compare(path, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,second_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("path", ["exact", "logvar"])
def test_gaussian_heads_optional_biases(path, bias, second_bias, dtype):
    head = EXACT if path == "exact" else LOGVAR
    inputs = op_inputs(head, gaussian_case(head, 3, 6, 4, seed=5, bias=bias, second_bias=second_bias))
    compare(path, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,k,d", SHAPES)
def test_bernoulli_logvar(B, k, d, dtype):
    compare("bernoulli_logvar", bernoulli_case(B, k, d, seed=B * 100 + k * 10 + d), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,second_bias", [(False, False), (True, False), (False, True)])
def test_bernoulli_logvar_optional_biases(bias, second_bias, dtype):
    compare("bernoulli_logvar", bernoulli_case(3, 6, 4, seed=3, bias=bias, second_bias=second_bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_logvar_all_saturated(dtype):
    """Every logit at +-30 and logvar weights large enough to move the tilted logits across
    zero (l - h with |h| up to ~60): still finite and accurate."""
    inputs = bernoulli_case(3, 5, 4, seed=11, saturate=False)
    g = torch.Generator().manual_seed(12)
    inputs[1] = 30.0 * torch.sign(torch.randn(3, 4, generator=g, dtype=torch.float64))
    inputs[4] = 30.0 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    inputs[5] = inputs[5] + 40.0          # keeps exp(S - h0) moderate where the tilt is large
    compare("bernoulli_logvar", inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_logvar_infinite_logits(dtype):
    """Probabilities exactly 0 or 1 (logits -+inf, as LatentMoments.bernoulli(probs=...) gives):
    the kernels take the limit (finite loss and gradients, ~zero logits gradient there); the
    reference, which would give inf - inf there, is evaluated at logits -+1e4 instead, where
    float64 is already at the limit."""
    inputs = bernoulli_case(3, 5, 4, seed=13, saturate=False)
    inputs[1][0, 1], inputs[1][1, 2], inputs[1][2, 0] = math.inf, -math.inf, math.inf
    finite = [t.clone() for t in inputs]
    finite[1] = finite[1].clamp(-1e4, 1e4)
    cast = [t.to(DEVICE, dtype) for t in inputs]
    ref_in = [t.requires_grad_() for t in finite]
    ref = bernoulli_reference(ref_in)
    grad = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    (ref * grad).sum().backward()
    check(OPS.triton_bernoulli_logvar_nll(*cast), ref, dtype, "infinite logits loss", "bernoulli_logvar")
    grads = OPS.triton_bernoulli_logvar_nll_backward(grad.to(DEVICE, dtype), *cast, [True] * 6)
    for i, (got, r) in enumerate(zip(grads, ref_in)):
        check(got, r.grad, dtype, f"infinite logits grad {i}", "bernoulli_logvar")
    at_inf = torch.stack([grads[1][0, 1], grads[1][1, 2], grads[1][2, 0]]).abs().max()
    assert at_inf <= TOL[dtype] * grads[1].abs().max()


def test_bernoulli_logvar_multiple_tiles():
    """More samples, pixels and latents than one interpreter block holds (16 x 64 x 16), so
    every kernel runs ragged tiles and loops (and the partial sums over tiles)."""
    compare("bernoulli_logvar", bernoulli_case(19, 70, 21, seed=2), torch.float32)


def test_exact_log_multiple_tiles():
    compare("exact", op_inputs(EXACT, gaussian_case(EXACT, 19, 70, 21, seed=4)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["exact", "logvar", "bernoulli_logvar"])
def test_gpu_block_table(monkeypatch, path, dtype):
    """The GPU block configurations (smaller tiles than the interpreter's), run here with
    ragged tiles along every dimension of every kernel."""
    monkeypatch.setattr(triton_common, "sized_to_problem", lambda device: False)
    if path == "bernoulli_logvar":
        compare(path, bernoulli_case(19, 37, 21, seed=6), dtype)
    else:
        head = EXACT if path == "exact" else LOGVAR
        compare(path, op_inputs(head, gaussian_case(head, 37, 70, 35, seed=41)), dtype)


def test_empty_batch_and_no_latents():
    """B = 0: an empty loss and zero-sized gradients; d = 0: the loss of a constant decoder."""
    for B, d in ((0, 3), (2, 0)):
        cases = [("bernoulli_logvar", bernoulli_case(B, 4, d, saturate=False))]
        cases += [(path, op_inputs(head, gaussian_case(head, B, 4, d)))
                  for path, head in (("exact", EXACT), ("logvar", LOGVAR))]
        for path, inputs in cases:
            cast = [t.to(DEVICE, torch.float32) if t is not None else None for t in inputs]
            extra = () if path == "bernoulli_logvar" else (EXACT if path == "exact" else LOGVAR,)
            fwd = OPS.triton_bernoulli_logvar_nll if not extra else OPS.triton_precision_nll
            bwd = OPS.triton_bernoulli_logvar_nll_backward if not extra else OPS.triton_precision_nll_backward
            ref = bernoulli_reference(inputs) if not extra else precision_reference(extra[0], inputs)
            loss = fwd(*cast, *extra)
            assert loss.shape == (B,) and relative_error(loss, ref) <= 1e-6, (path, B, d)
            grads = bwd(torch.ones(B, device=DEVICE), *cast, [t is not None for t in cast], *extra)
            assert [tuple(g.shape) for g in grads] == [tuple(t.shape) if t is not None else (0,) for t in cast]


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("path", ["exact", "logvar", "bernoulli_logvar"])
def test_half_precision_inputs(path, dtype, tol):
    """fp16 / bf16 inputs: fp32 accumulation, outputs in the input dtype, within the README's
    tolerances of the float64 reference on the same rounded values."""
    if path == "bernoulli_logvar":
        inputs, extra = bernoulli_case(4, 19, 6, seed=31), ()
        fwd, bwd = OPS.triton_bernoulli_logvar_nll, OPS.triton_bernoulli_logvar_nll_backward
    else:
        head = EXACT if path == "exact" else LOGVAR
        inputs, extra = op_inputs(head, gaussian_case(head, 4, 19, 6, seed=31)), (head,)
        fwd, bwd = OPS.triton_precision_nll, OPS.triton_precision_nll_backward
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    ref_in = [t.double().cpu().requires_grad_() if t is not None else None for t in cast]
    ref = bernoulli_reference(ref_in) if not extra else precision_reference(extra[0], ref_in)
    grad = torch.linspace(-1.0, 2.0, 4).to(DEVICE, dtype)
    (ref * grad.double().cpu()).sum().backward()
    loss = fwd(*cast, *extra)
    assert loss.dtype == dtype and relative_error(loss, ref) <= tol
    for got, r in zip(bwd(grad, *cast, [t is not None for t in cast], *extra), ref_in):
        if r is not None:
            assert got.dtype == dtype and relative_error(got, r.grad) <= tol


# --------------------------------------------------------------- backward contract
@pytest.mark.parametrize("path", ["exact", "logvar", "bernoulli_logvar"])
def test_backward_each_needs_flag(path):
    """Each needs flag alone: that gradient (vs the reference) and (0,) tensors elsewhere."""
    if path == "bernoulli_logvar":
        inputs = [t.to(DEVICE, torch.float64) for t in bernoulli_case(3, 5, 4, seed=21)]
        bwd, extra = OPS.triton_bernoulli_logvar_nll_backward, ()
    else:
        head = EXACT if path == "exact" else LOGVAR
        inputs = [t.to(DEVICE) if t is not None else None
                  for t in op_inputs(head, gaussian_case(head, 3, 5, 4, seed=22))]
        bwd, extra = OPS.triton_precision_nll_backward, (head,)
    grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, device=DEVICE)
    ref_in = [t.detach().cpu().requires_grad_() if t is not None else None for t in inputs]
    ref = bernoulli_reference(ref_in) if path == "bernoulli_logvar" else precision_reference(extra[0], ref_in)
    (ref * grad.cpu()).sum().backward()
    for i in range(len(inputs)):
        outs = bwd(grad, *inputs, [j == i for j in range(len(inputs))], *extra)
        for j, (o, inp) in enumerate(zip(outs, inputs)):
            if j == i and inp is not None:
                assert o.shape == inp.shape
                assert relative_error(o, ref_in[i].grad) <= TOL[torch.float64], (path, i)
            else:
                assert o.shape == (0,), (path, i, j)


def test_head_argument_checks():
    inputs = [t.to(DEVICE) if t is not None else None for t in op_inputs(EXACT, gaussian_case(EXACT, 2, 3, 2))]
    k3 = torch.zeros_like(inputs[1])
    with pytest.raises(ValueError, match="Gaussian latents"):
        OPS.triton_precision_nll(*inputs[:3], k3, None, *inputs[5:], EXACT)
    with pytest.raises(ValueError, match="Gaussian latents"):
        OPS.triton_precision_nll_backward(torch.ones(2, dtype=torch.float64, device=DEVICE), *inputs[:3], None, k3,
                                          *inputs[5:], [True] * 9, LOGVAR)
    with pytest.raises(ValueError, match="head"):
        OPS.triton_precision_nll(*inputs, 3)


def test_taylor_head_unchanged_by_explicit_head():
    """head=0 passed explicitly is the default (the paper's Taylor term)."""
    inputs = [t.to(DEVICE) if t is not None else None for t in op_inputs(EXACT, gaussian_case(EXACT, 3, 5, 4))]
    assert torch.equal(OPS.triton_precision_nll(*inputs), OPS.triton_precision_nll(*inputs, 0))
    ref = reference.precision_nll(*[t.cpu() if t is not None else None for t in inputs])
    assert relative_error(OPS.triton_precision_nll(*inputs, 0), ref) <= 1e-12


# -------------------------------------------------------- autograd, opcheck, gradcheck
def test_wrappers_and_function_are_differentiable():
    """The triton_ops wrappers and PrecisionNLLFunction carry gradients to every input."""
    case = [t.to(DEVICE).requires_grad_() if t is not None else None
            for t in op_inputs(EXACT, gaussian_case(EXACT, 3, 5, 4, seed=1))]
    ref_in = [t.detach().cpu().requires_grad_() if t is not None else None for t in case]
    for head in (EXACT, LOGVAR):
        for fn in (lambda *a: triton_ops.triton_precision_nll(*a, head=head),
                   lambda *a: PrecisionNLLFunction.apply(*a, head, "triton")):
            for t in case + ref_in:
                if t is not None:
                    t.grad = None
            fn(*case).sum().backward()
            precision_reference(head, ref_in).sum().backward()
            for t, r in zip(case, ref_in):
                if t is not None:
                    assert relative_error(t.grad, r.grad) <= TOL[torch.float64]
    bern = [t.to(DEVICE).requires_grad_() for t in bernoulli_case(3, 5, 4, seed=2)]
    ref_b = [t.detach().cpu().requires_grad_() for t in bern]
    triton_ops.triton_bernoulli_logvar_nll(*bern).sum().backward()
    bernoulli_reference(ref_b).sum().backward()
    for t, r in zip(bern, ref_b):
        assert relative_error(t.grad, r.grad) <= TOL[torch.float64]


def test_non_contiguous_bernoulli_inputs():
    """Transposed, strided and stride-0 views are read through their strides."""
    B, k, d = 3, 6, 4
    base = bernoulli_case(B, k, d, seed=8)
    views = [base[0].t().contiguous().t(),                                  # x, strides (1, B)
             torch.stack([base[1], base[1]], -1)[..., 1],                    # logits, inner stride 2
             base[2].t().contiguous().t(),                                  # weight, strides (1, k)
             torch.stack([base[3], base[3]], -1)[:, 0],                      # bias, stride 2
             torch.cat([base[4], base[4]], 1)[:, ::2],                       # H, column stride 2
             base[5][:1].expand(k)]                                         # h0, stride 0
    assert not any(v.is_contiguous() for v in views)
    dense = [v.contiguous() for v in views]
    got = OPS.triton_bernoulli_logvar_nll(*views)
    assert relative_error(got, bernoulli_reference(dense)) <= TOL[torch.float64]
    grad = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    for a, b in zip(OPS.triton_bernoulli_logvar_nll_backward(grad, *views, [True] * 6),
                    OPS.triton_bernoulli_logvar_nll_backward(grad, *dense, [True] * 6)):
        assert relative_error(a, b) <= TOL[torch.float64]


def _grad_on(inputs):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]


def test_opcheck():
    grad = torch.tensor([1.0, -0.5], device=DEVICE)
    for head, bias in ((EXACT, True), (LOGVAR, False)):
        inputs = [t.to(DEVICE, torch.float32) if t is not None else None
                  for t in op_inputs(head, gaussian_case(head, 2, 5, 3, bias=bias, second_bias=bias))]
        torch.library.opcheck(OPS.triton_precision_nll.default, [*_grad_on(inputs), head])
        torch.library.opcheck(OPS.triton_precision_nll_backward.default, [grad, *inputs, [True] * 9, head])
    torch.library.opcheck(OPS.triton_precision_nll_backward.default,
                          [grad, *inputs, [False, True, True, False, False, True, False, True, False], head])
    for bias in (True, False):
        inputs = [t.to(DEVICE, torch.float32) if t is not None else None
                  for t in bernoulli_case(2, 5, 3, bias=bias, second_bias=bias)]
        torch.library.opcheck(OPS.triton_bernoulli_logvar_nll.default, _grad_on(inputs))
    torch.library.opcheck(OPS.triton_bernoulli_logvar_nll_backward.default, [grad, *inputs, [True] * 6])
    torch.library.opcheck(OPS.triton_bernoulli_logvar_nll_backward.default,
                          [grad, *inputs, [False, True, False, True, True, False]])


@pytest.mark.parametrize("path", ["exact", "logvar", "bernoulli_logvar"])
def test_gradcheck(path):
    """torch.autograd.gradcheck in float64 through the registered op (first derivatives)."""
    if path == "bernoulli_logvar":
        inputs = _grad_on([t.to(DEVICE) for t in bernoulli_case(2, 3, 2, seed=31)])
        fn = triton_ops.triton_bernoulli_logvar_nll
    else:
        head = EXACT if path == "exact" else LOGVAR
        inputs = _grad_on([t.to(DEVICE) if t is not None else None
                           for t in op_inputs(head, gaussian_case(head, 1, 3, 2, seed=32))])

        def fn(*a):
            return triton_ops.triton_precision_nll(*a, head=head)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_exact_log_gradcheck_across_crossover():
    """One pixel whose |vbar| / sqrt(2 Scc) sits just below and one just above the series /
    asymptotic crossover: finite differences straddle the switch and agree."""
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    mean = torch.tensor([[1.0]], dtype=torch.float64)
    var = torch.tensor([[0.5]], dtype=torch.float64)
    weight = torch.tensor([[0.4], [-0.3]], dtype=torch.float64)
    C = torch.tensor([[0.2], [0.2]], dtype=torch.float64)
    scc = 0.5 * 0.04
    limit = SERIES_LIMIT * math.sqrt(2 * scc)     # |vbar| at the crossover
    c = torch.tensor([limit - 0.2 - 1e-7, limit - 0.2 + 1e-7], dtype=torch.float64)
    inputs = _grad_on([x, mean, var, None, None, weight, None, C, c])
    assert torch.autograd.gradcheck(lambda *a: triton_ops.triton_precision_nll(*a, head=EXACT), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------- through analytic_nll
def _public_leaves(path, B=3, k=6, d=4, seed=51):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    leaves = {"x": rnd(B, k), "weight": rnd(k, d, scale=0.5), "bias": rnd(k, scale=0.5),
              "second": rnd(k, d, scale=0.3), "second_bias": rnd(k, scale=1.5)}
    if path == "bernoulli_logvar":
        leaves["logits"] = rnd(B, d, scale=2.0)
    else:
        leaves.update(mu=rnd(B, d), logvar=rnd(B, d, scale=0.3))
    return leaves


def _public_loss(path, t, backend, reduction="sum"):
    if path == "bernoulli_logvar":
        q = LatentMoments.bernoulli(logits=t["logits"])
    else:
        q = LatentMoments.gaussian(t["mu"], logvar=t["logvar"])
    if path == "exact":
        return analytic_nll(t["x"], q, t["weight"], t["bias"], precision_weight=t["second"],
                            precision_bias=t["second_bias"], log_term="exact", reduction=reduction,
                            backend=backend)
    return analytic_nll(t["x"], q, t["weight"], t["bias"], logvar_weight=t["second"],
                        logvar_bias=t["second_bias"], reduction=reduction, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["exact", "logvar", "bernoulli_logvar"])
def test_analytic_nll_triton_backend(path, dtype):
    """analytic_nll(backend="triton") routes each new head to its Triton op and matches the
    reference backend (loss and the gradients of every leaf, through the moment maps)."""
    leaves = _public_leaves(path)
    results = []
    for backend, dt, device in (("triton", dtype, DEVICE), ("torch", torch.float64, "cpu")):
        t = {n: v.to(device, dt).to(dt).requires_grad_() for n, v in leaves.items()}
        if dt == torch.float64 and dtype == torch.float32:   # the same (rounded) values
            t = {n: v.detach().float().double().requires_grad_() for n, v in t.items()}
        loss = _public_loss(path, t, backend)
        loss.backward()
        results.append((loss.detach(), {n: v.grad for n, v in t.items()}))
    (got, got_grads), (ref, ref_grads) = results
    check(got, ref, dtype, f"{path} analytic_nll", path)
    for name in ref_grads:
        check(got_grads[name], ref_grads[name], dtype, f"{path} analytic_nll d{name}", path)


@pytest.mark.slow
def test_torch_compile_fullgraph_new_heads():
    """The three new paths through analytic_nll(backend="triton") inside
    torch.compile(fullgraph=True) give the eager loss and gradients."""
    gauss, bern = _public_leaves("exact", seed=61), _public_leaves("bernoulli_logvar", seed=62)

    def loss_fn(g, b):
        return (_public_loss("exact", g, "triton") + _public_loss("logvar", g, "triton")
                + _public_loss("bernoulli_logvar", b, "triton"))

    results = []
    for fn in (torch.compile(loss_fn, fullgraph=True), loss_fn):
        g = {n: v.to(DEVICE).float().requires_grad_() for n, v in gauss.items()}
        b = {n: v.to(DEVICE).float().requires_grad_() for n, v in bern.items()}
        loss = fn(g, b)
        loss.backward()
        results.append((loss.detach(), [v.grad for v in (*g.values(), *b.values())]))
    (compiled, compiled_grads), (eager, eager_grads) = results
    assert relative_error(compiled, eager) <= 1e-6
    for i, (a, b) in enumerate(zip(compiled_grads, eager_grads)):
        assert relative_error(a, b) <= 1e-6, i


def test_report_worst_errors():
    """Prints the largest errors the comparisons above saw (pytest -s)."""
    print("\nworst normwise relative error vs the float64 reference:",
          {k: f"{v:.2e}" for k, v in sorted(WORST.items())})
