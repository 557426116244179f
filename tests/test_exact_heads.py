"""The exact learned-variance heads (MATH.md §10-11, §13): the exact log term of the precision
head and the log-variance head, against their oracles (quadrature, enumeration, Monte Carlo),
and every CPU backend (reference, cpp) against the float64 reference, forward and backward.
Also: double backward through every CPU backend, opcheck, torch.compile and bad input.
"""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll, backends, reference
from silent_kernels.special import dawson, dawson_integral, expected_log_square

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
CPU_KERNEL_BACKENDS = [b for b in ("cpp",) if backends.available(b)]


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


# ------------------------------------------------------------------------ special function
def _mp_dawson(x):
    return mpmath.sqrt(mpmath.pi) / 2 * mpmath.exp(-x * x) * mpmath.erfi(x)


def _mp_expected_log_square(m, s):
    f = lambda t: mpmath.log((m + s * t) ** 2) * mpmath.npdf(t)  # noqa: E731
    if abs(m / s) > 20:   # the log's singularity is beyond the density's e^-200: skip it
        return mpmath.quad(f, [-15, 0, 15])
    return mpmath.quad(f, [-mpmath.inf, -m / s, mpmath.inf])


@pytest.fixture(scope="module", autouse=True)
def _mp_precision():
    old = mpmath.mp.dps
    mpmath.mp.dps = 30
    yield
    mpmath.mp.dps = old


@pytest.mark.parametrize("x", [0.0, 1e-8, 1e-3, 0.5, 1.0, 2.0, 4.0, 5.99, 6.0, 6.01, 10.0, 100.0, 1e8])
def test_dawson_and_its_integral_against_mpmath(x):
    got = dawson(torch.tensor([x, -x], dtype=F64))
    want = float(_mp_dawson(mpmath.mpf(x)))
    assert rel_err(got, torch.tensor([want, -want], dtype=F64)) <= 2e-15
    if x <= 10:
        want_f = float(mpmath.quad(_mp_dawson, [0, x])) if x else 0.0
        assert rel_err(dawson_integral(torch.tensor([x], dtype=F64)), torch.tensor([want_f], dtype=F64)) <= 2e-15


@pytest.mark.parametrize("ratio", [0, 1e-3, 0.5, 1, 2, 5, 30, 1e4])
@pytest.mark.parametrize("s2", [1e-12, 1e-3, 1.0, 1e6])
def test_expected_log_square_against_quadrature(ratio, s2):
    s = math.sqrt(s2)
    want = float(_mp_expected_log_square(mpmath.mpf(ratio * s), mpmath.mpf(s)))
    for dtype, tol in ((F64, 1e-14), (torch.float32, 1e-6)):
        got = expected_log_square(torch.tensor([ratio * s], dtype=dtype), torch.tensor([s2], dtype=dtype))
        assert abs(float(got) - want) <= tol * max(1.0, abs(want)), (dtype, float(got), want)


def test_expected_log_square_derivatives_finite_continuous_and_twice_differentiable():
    m = torch.tensor([0.0, 0.3, -1.2, 4.0, 8.47, 8.49, -8.6, 100.0, 2.0], dtype=F64, requires_grad=True)
    s2 = torch.tensor([1.0, 0.5, 2.0, 0.49, 1.0, 1.0, 1.0, 1e-3, 0.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(expected_log_square, (m[:-1], s2[:-1]))
    assert torch.autograd.gradgradcheck(expected_log_square, (m[:-1], s2[:-1]))
    gm, gs = torch.autograd.grad(expected_log_square(m, s2).sum(), (m, s2))
    assert torch.isfinite(gm).all() and torch.isfinite(gs).all()
    assert gm[0] == 0 and abs(float(gs[-1]) + 0.25) < 1e-15     # d/ds2 -> -1/m^2 as s2 -> 0
    # across the series/asymptotic crossover x = 6 (|m| = 6 sqrt 2 at s2 = 1)
    edge = 6 * math.sqrt(2)
    mm = torch.tensor([edge * (1 - 1e-12), edge * (1 + 1e-12)], dtype=F64, requires_grad=True)
    val = expected_log_square(mm, torch.ones(2, dtype=F64))
    g, = torch.autograd.grad(val.sum(), mm)
    jump = float(((val[1] - val[0]) - g[0] * (mm[1] - mm[0])).detach())   # beyond the slope
    assert abs(jump) < 1e-14 and abs(float(g[1] - g[0])) < 1e-12


def test_taylor_error_table_of_math_md():
    # MATH.md §10: Taylor minus exact E[log v^2] at |m|/s = 0, 1, 2, 5: +0.270, +0.360, +0.209, +0.007
    for ratio, want in ((0.0, 0.270), (1.0, 0.360), (2.0, 0.209), (5.0, 0.007)):
        m, s2 = torch.tensor(ratio, dtype=F64), torch.tensor(1.0, dtype=F64)
        M, V = m * m + s2, 4 * m * m * s2 + 2 * s2 * s2
        taylor = torch.log(M) - V / (2 * M * M)
        assert abs(float(taylor - expected_log_square(m, s2)) - want) < 1.5e-3


# ------------------------------------------------------------------------ problems
def _problem(B=3, d=4, k=5, *, family="gaussian", seed=0, dtype=F64, saturate=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=F64)).to(dtype)  # noqa: E731
    t = {"x": torch.rand(B, k, generator=g, dtype=F64).to(dtype), "A": r(k, d), "b": r(k),
         "H": r(k, d, scale=0.4), "h": r(k, scale=0.5)}
    if family == "gaussian":
        t["mu"], t["lv"] = r(B, d), r(B, d, scale=0.5)
    else:
        t["logits"] = r(B, d, scale=2.0)
        if saturate:
            t["logits"][0, 0], t["logits"][-1, -1] = 30.0, -30.0
    for v in t.values():
        v.requires_grad_(True)
    return t


def _q(t):
    if "mu" in t:
        return LatentMoments.gaussian(t["mu"], logvar=t["lv"])
    return LatentMoments.bernoulli(logits=t["logits"])


PATHS = {  # name -> (family, keyword arguments of analytic_nll built from a problem)
    "precision-exact": ("gaussian", lambda t: dict(precision_weight=t["H"], precision_bias=t["h"], log_term="exact")),
    "precision-taylor": ("gaussian", lambda t: dict(precision_weight=t["H"], precision_bias=t["h"], log_term="taylor")),
    "logvar-gaussian": ("gaussian", lambda t: dict(logvar_weight=t["H"], logvar_bias=t["h"])),
    "logvar-bernoulli": ("bernoulli", lambda t: dict(logvar_weight=t["H"], logvar_bias=t["h"])),
    "precision-taylor-bernoulli": ("bernoulli", lambda t: dict(precision_weight=t["H"], precision_bias=t["h"])),
    "fixed": ("gaussian", lambda t: dict(sigma2=0.3)),
}


def _loss_and_grads(t, path, backend):
    kwargs = PATHS[path][1](t)
    loss = analytic_nll(t["x"], _q(t), t["A"], t["b"], reduction="none", backend=backend, **kwargs)
    leaves = list(t.values())
    grads = torch.autograd.grad((loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)).sum(), leaves,
                                allow_unused=True)
    return loss, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


# ------------------------------------------------------------------------ oracles
def test_exact_log_term_precision_head_against_monte_carlo():
    t = _problem(B=2, d=3, k=4, seed=1)
    q = _q(t)
    got = analytic_nll(t["x"], q, t["A"], t["b"], precision_weight=t["H"], precision_bias=t["h"],
                       log_term="exact", reduction="none", backend="torch").detach()
    g = torch.Generator().manual_seed(7)
    n = 400_000
    z = q.mean.detach()[:, None] + q.var.detach().sqrt()[:, None] * torch.randn(2, n, 3, generator=g, dtype=F64)
    u, v = z @ t["A"].detach().T + t["b"].detach(), z @ t["H"].detach().T + t["h"].detach()
    sample = (0.5 * (t["x"].detach()[:, None] - u) ** 2 * v ** 2 - 0.5 * torch.log(v ** 2) + 0.5 * LOG_2PI).sum(-1)
    zscore = (got - sample.mean(1)).abs() / (sample.std(1) / math.sqrt(n))
    assert (zscore < 5).all(), zscore


def test_logvar_gaussian_against_monte_carlo_and_tilting():
    t = _problem(B=2, d=3, k=4, seed=2)
    q = _q(t)
    args = (t["x"], q, t["A"], t["b"], t["H"], t["h"])
    got = reference.logvar_nll(*args).detach()
    tilted = reference.logvar_pixel_nll(t["x"], reference.tilted_logvar_terms(*args[1:], max_elements=7)).sum(-1)
    assert rel_err(tilted, got) <= 1e-13
    g = torch.Generator().manual_seed(3)
    n = 400_000
    z = q.mean.detach()[:, None] + q.var.detach().sqrt()[:, None] * torch.randn(2, n, 3, generator=g, dtype=F64)
    u, s = z @ t["A"].detach().T + t["b"].detach(), z @ t["H"].detach().T + t["h"].detach()
    sample = (0.5 * (LOG_2PI + s + (t["x"].detach()[:, None] - u) ** 2 * torch.exp(-s))).sum(-1)
    zscore = (got - sample.mean(1)).abs() / (sample.std(1) / math.sqrt(n))
    assert (zscore < 5).all(), zscore


def _enumerate_logvar(x, probs, A, b, H, h):
    total = torch.zeros(x.shape[0], dtype=F64)
    for state in itertools.product([0.0, 1.0], repeat=probs.shape[1]):
        z = torch.tensor(state, dtype=F64)
        weight = torch.where(z.bool(), probs, 1 - probs).prod(-1)
        u, s = A @ z + b, H @ z + h
        total += weight * (0.5 * (LOG_2PI + s + (x - u) ** 2 * torch.exp(-s))).sum(-1)
    return total


@pytest.mark.parametrize("saturate", [False, True])
def test_logvar_bernoulli_against_enumeration(saturate):
    t = {k_: v.detach() for k_, v in _problem(B=3, d=6, k=4, family="bernoulli", seed=4, saturate=saturate).items()}
    want = _enumerate_logvar(t["x"], torch.sigmoid(t["logits"]), t["A"], t["b"], t["H"], t["h"])
    for backend in ["torch", *CPU_KERNEL_BACKENDS]:
        got = analytic_nll(t["x"], _q(t), t["A"], t["b"], logvar_weight=t["H"], logvar_bias=t["h"],
                           reduction="none", backend=backend)
        assert rel_err(got, want) <= 1e-13, backend


def test_logvar_bernoulli_from_probabilities_zero_and_one():
    t = {k_: v.detach() for k_, v in _problem(B=2, d=4, k=3, family="bernoulli", seed=5).items()}
    probs = torch.sigmoid(t["logits"])
    probs[0, 0], probs[1, 2] = 0.0, 1.0
    want = _enumerate_logvar(t["x"], probs, t["A"], t["b"], t["H"], t["h"])
    for backend in ["torch", *CPU_KERNEL_BACKENDS]:
        got = analytic_nll(t["x"], D.Bernoulli(probs=probs), t["A"], t["b"], logvar_weight=t["H"],
                           logvar_bias=t["h"], reduction="none", backend=backend)
        assert rel_err(got, want) <= 1e-13, backend


@pytest.mark.parametrize("family", ["uniform", "laplace", "poisson", "gamma"])
def test_logvar_other_families_against_monte_carlo(family):
    g = torch.Generator().manual_seed(11)
    B, d, k = 2, 3, 3
    loc = 0.5 + torch.rand(B, d, generator=g, dtype=F64)
    dist = {"uniform": D.Uniform(loc - 0.7, loc + 0.7), "laplace": D.Laplace(loc, 0.3 + 0 * loc),
            "poisson": D.Poisson(loc), "gamma": D.Gamma(2.0 + loc, 3.0 + loc)}[family]
    x = torch.rand(B, k, generator=g, dtype=F64)
    A, b = torch.randn(k, d, generator=g, dtype=F64), torch.randn(k, generator=g, dtype=F64)
    H, h = 0.3 * torch.randn(k, d, generator=g, dtype=F64), 0.3 * torch.randn(k, generator=g, dtype=F64)
    got = analytic_nll(x, dist, A, b, logvar_weight=H, logvar_bias=h, reduction="none")
    n = 400_000
    torch.manual_seed(5)
    z = dist.sample((n,)).transpose(0, 1)                                   # (B, n, d)
    u, s = z @ A.T + b, z @ H.T + h
    sample = (0.5 * (LOG_2PI + s + (x[:, None] - u) ** 2 * torch.exp(-s))).sum(-1)
    zscore = (got - sample.mean(1)).abs() / (sample.std(1) / math.sqrt(n))
    assert (zscore < 5).all(), (family, zscore)


# ------------------------------------------------------------------------ backends
@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 1, 1), (7, 5, 13)])
def test_kernel_backend_matches_reference(backend, path, dtype, shape):
    B, d, k = shape
    family = PATHS[path][0]
    t = _problem(B, d, k, family=family, dtype=dtype, seed=B + d + k, saturate=family == "bernoulli")
    t64 = {n: v.detach().double().requires_grad_(True) for n, v in t.items()}
    loss, grads = _loss_and_grads(t, path, backend)
    ref_loss, ref_grads = _loss_and_grads(t64, path, "torch")
    assert loss.dtype == dtype
    assert rel_err(loss, ref_loss) <= TOL[dtype]
    for name, g, rg in zip(t, grads, ref_grads):
        if rg.abs().max() == 0:           # an input the head does not use
            assert g.abs().max() == 0, name
            continue
        assert rel_err(g, rg) <= TOL[dtype], (name, rel_err(g, rg))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
def test_gradcheck_and_gradgradcheck(backend, path):
    t = _problem(2, 3, 4, family=PATHS[path][0], seed=9)
    names = list(t)

    def f(*leaves):
        tt = dict(zip(names, leaves))
        return analytic_nll(tt["x"], _q(tt), tt["A"], tt["b"], reduction="none", backend=backend,
                            **PATHS[path][1](tt))

    leaves = tuple(t.values())
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_double_backward_fixed_head_matches_reference(backend):
    t = _problem(3, 4, 5, seed=12)
    second = {}
    for be in (backend, "torch"):
        mu = t["mu"].detach().requires_grad_(True)
        W = t["A"].detach().requires_grad_(True)
        loss = analytic_nll(t["x"].detach(), LatentMoments.gaussian(mu, logvar=t["lv"].detach()), W, None,
                            sigma2=0.3, backend=be)
        g, = torch.autograd.grad(loss, mu, create_graph=True)
        g.square().sum().backward()
        assert mu.grad is not None and W.grad is not None, be
        second[be] = (mu.grad, W.grad)
    for got, want in zip(second[backend], second["torch"]):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_opcheck_new_ops(backend):
    ops = torch.ops.silent_kernels
    t = {n: v.detach() for n, v in _problem(3, 4, 5, seed=13).items()}
    tb = {n: v.detach() for n, v in _problem(3, 4, 5, family="bernoulli", seed=13).items()}
    var = t["lv"].exp()
    for head in (1, 2):
        args = (t["x"], t["mu"], var, None, None, t["A"], t["b"], t["H"], t["h"], head)
        torch.library.opcheck(ops.precision_nll.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(ops.bernoulli_logvar_nll.default, (tb["x"], tb["logits"], tb["A"], tb["b"], tb["H"], tb["h"]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("path", ["precision-exact", "logvar-gaussian", "logvar-bernoulli"])
def test_torch_compile_fullgraph(backend, path):
    t = _problem(3, 4, 5, family=PATHS[path][0], seed=14)

    def f(tt):
        return analytic_nll(tt["x"], _q(tt), tt["A"], tt["b"], backend=backend, **PATHS[path][1](tt))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(t), f(t)
    assert rel_err(got, want) <= 1e-12
    g1 = torch.autograd.grad(got, t["A"])[0]
    g2 = torch.autograd.grad(want, t["A"])[0]
    assert rel_err(g1, g2) <= 1e-12


# ------------------------------------------------------------------------ bad input
def test_log_term_choices_and_errors():
    t = {n: v.detach() for n, v in _problem(2, 3, 4, family="bernoulli").items()}
    q = _q(t)
    with pytest.raises(ValueError, match=r"log_term.*'exact' needs Gaussian.*bernoulli"):
        analytic_nll(t["x"], q, t["A"], precision_weight=t["H"], log_term="exact")
    with pytest.raises(ValueError, match=r"log_term: expected one of"):
        analytic_nll(t["x"], q, t["A"], precision_weight=t["H"], log_term="exactly")
    with pytest.raises(ValueError, match=r"log_term: only the precision head"):
        analytic_nll(t["x"], q, t["A"], sigma2=1.0, log_term="taylor")
    with pytest.raises(ValueError, match=r"exactly one head.*sigma2, logvar_weight"):
        analytic_nll(t["x"], q, t["A"], sigma2=1.0, logvar_weight=t["H"])
    with pytest.raises(ValueError, match=r"logvar_bias: only valid together with logvar_weight"):
        analytic_nll(t["x"], q, t["A"], sigma2=1.0, logvar_bias=t["h"])
    with pytest.raises(ValueError, match=r"logvar_weight: expected shape \(4, 3\)"):
        analytic_nll(t["x"], q, t["A"], logvar_weight=t["H"][:, :2])
    # "auto" is the Taylor term for Bernoulli latents: equal to asking for it
    auto = analytic_nll(t["x"], q, t["A"], precision_weight=t["H"])
    assert auto == analytic_nll(t["x"], q, t["A"], precision_weight=t["H"], log_term="taylor")


def test_logvar_refuses_latents_without_a_moment_generating_function():
    g = torch.Generator().manual_seed(0)
    x, A = torch.rand(2, 3, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)
    H = torch.full((3, 2), -5.0, dtype=F64)         # tilt t = 5 > rate 1: E[e^{t z}] infinite
    with pytest.raises(ValueError, match=r"logvar_weight: the Gamma latents' moment generating function"):
        analytic_nll(x, D.Gamma(torch.ones(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64)), A, logvar_weight=H)
    with pytest.raises(ValueError, match=r"logvar_weight: the Laplace latents"):
        analytic_nll(x, D.Laplace(torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64)), A, logvar_weight=H)
    cumulants = LatentMoments(torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64),
                              None, torch.ones(2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"family 'cumulants'.*has none"):
        analytic_nll(x, cumulants, A, logvar_weight=0 * H)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_kernel_backend_without_a_path_says_which(backend):
    x = torch.rand(2, 3, dtype=F64)
    q = D.Poisson(torch.ones(2, 2, dtype=F64))
    with pytest.raises(ValueError, match=rf"backend='{backend}' has no kernel for the log-variance head with poisson"):
        analytic_nll(x, q, torch.randn(3, 2, dtype=F64), logvar_weight=torch.zeros(3, 2, dtype=F64), backend=backend)
