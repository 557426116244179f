"""LatentMoments: the cumulants of every family of MATH.md §1 against independent
computations, autograd through the constructors, unsupported families and shape checks.

Independent computations (none re-uses the closed forms of moments.py):
- mean and variance from torch.distributions' own ``mean`` / ``variance``;
- central moments by exact quadrature: the two-point sum (Bernoulli), Gauss-Legendre
  (Uniform), Gauss-Laguerre on each half-line (Laplace), the pmf summed over its
  support (Poisson), raw moments Gamma(s + r) / (Gamma(s) rate^r) converted to
  central moments with the binomial theorem (Gamma);
- Monte Carlo from ``dist.sample`` for every family, tolerance from the standard error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll, as_latent_moments

DT = torch.float64
B, d = 3, 4
SUPPORTED_RE = r"Normal, Independent\(Normal\), Bernoulli, Uniform, Laplace, Poisson, Gamma"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def params(seed):
    """A set of positive-where-needed (B, d) parameter tensors in float64."""
    g = gen(seed)
    r = lambda: torch.rand(B, d, generator=g, dtype=DT)  # noqa: E731
    n = lambda: torch.randn(B, d, generator=g, dtype=DT)  # noqa: E731
    return {
        "loc": n(), "scale": 0.3 + r(), "probs": 0.05 + 0.9 * r(), "logits": 3 * n(),
        "low": n(), "width": 0.2 + 2 * r(), "rate": 0.2 + 5 * r(),
        "concentration": 0.3 + 4 * r(), "grate": 0.5 + 2 * r(),
    }


def build(family, p):
    """The distribution of `family` from the parameter dict `p`."""
    if family == "Normal":
        return D.Normal(p["loc"], p["scale"])
    if family == "Independent(Normal)":
        return D.Independent(D.Normal(p["loc"], p["scale"]), 1)
    if family == "Bernoulli(probs)":
        return D.Bernoulli(probs=p["probs"])
    if family == "Bernoulli(logits)":
        return D.Bernoulli(logits=p["logits"])
    if family == "Uniform":
        return D.Uniform(p["low"], p["low"] + p["width"])
    if family == "Laplace":
        return D.Laplace(p["loc"], p["scale"])
    if family == "Poisson":
        return D.Poisson(p["rate"])
    if family == "Gamma":
        return D.Gamma(p["concentration"], p["grate"])
    raise AssertionError(family)


FAMILIES = ["Normal", "Independent(Normal)", "Bernoulli(probs)", "Bernoulli(logits)",
            "Uniform", "Laplace", "Poisson", "Gamma"]
PARAMS_OF = {
    "Normal": ("loc", "scale"), "Independent(Normal)": ("loc", "scale"),
    "Bernoulli(probs)": ("probs",), "Bernoulli(logits)": ("logits",),
    "Uniform": ("low", "width"), "Laplace": ("loc", "scale"), "Poisson": ("rate",),
    "Gamma": ("concentration", "grate"),
}


def central_moments_quadrature(family, dist):
    """(mu2, mu3, mu4) of each latent, (B, d) each, by an exact quadrature / sum around
    the mean torch.distributions reports."""
    m = dist.mean
    base = dist.base_dist if isinstance(dist, D.Independent) else dist
    if isinstance(base, D.Normal):
        s = base.scale
        t, w = np.polynomial.hermite_e.hermegauss(8)
        t, w = torch.from_numpy(t), torch.from_numpy(w) / math.sqrt(2 * math.pi)
        return [((s[..., None] * t).pow(r) * w).sum(-1) for r in (2, 3, 4)]
    if isinstance(base, D.Bernoulli):
        p = base.probs
        return [(1 - p) * (0 - m).pow(r) + p * (1 - m).pow(r) for r in (2, 3, 4)]
    if isinstance(base, D.Uniform):
        t, w = np.polynomial.legendre.leggauss(6)  # on [-1, 1], exact to degree 11
        t, w = torch.from_numpy(t), torch.from_numpy(w) / 2
        z = (base.low[..., None] + base.high[..., None]) / 2 + (base.high - base.low)[..., None] / 2 * t
        return [((z - m[..., None]).pow(r) * w).sum(-1) for r in (2, 3, 4)]
    if isinstance(base, D.Laplace):
        t, w = np.polynomial.laguerre.laggauss(6)  # int_0^inf f(t) e^-t dt, exact to degree 11
        t, w = torch.from_numpy(t), torch.from_numpy(w)
        bt = base.scale[..., None] * t
        # density e^{-|y|/b} / (2b): half of the mass on each side of the location
        return [0.5 * ((bt.pow(r) + (-bt).pow(r)) * w).sum(-1) for r in (2, 3, 4)]
    if isinstance(base, D.Poisson):
        n = torch.arange(0, 400, dtype=DT)
        pmf = base.log_prob(n.view(-1, 1, 1).expand(-1, *m.shape)).exp()
        assert torch.allclose(pmf.sum(0), torch.ones_like(m), rtol=0, atol=1e-14)
        return [(pmf * (n.view(-1, 1, 1) - m).pow(r)).sum(0) for r in (2, 3, 4)]
    if isinstance(base, D.Gamma):
        s, rate = base.concentration, base.rate
        raw = [torch.ones_like(s)]
        for r in range(1, 5):  # E[X^r] = s (s+1) ... (s+r-1) / rate^r
            raw.append(raw[-1] * (s + r - 1) / rate)
        # E[(X - m)^r] = sum_j C(r, j) E[X^j] (-m)^(r-j)
        return [sum(math.comb(r, j) * raw[j] * (-m).pow(r - j) for j in range(r + 1)) for r in (2, 3, 4)]
    raise AssertionError(family)


def as_full(q: LatentMoments):
    z = torch.zeros_like(q.mean)
    return q.mean, q.var, z if q.k3 is None else q.k3, z if q.k4 is None else q.k4


@pytest.mark.parametrize("family", FAMILIES)
def test_cumulants_exact(family):
    dist = build(family, params(1))
    q = LatentMoments.from_distribution(dist)
    assert q.mean.shape == (B, d) and q.mean.dtype == DT
    mean, var, k3, k4 = as_full(q)
    torch.testing.assert_close(mean, dist.mean.expand(B, d), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(var, dist.variance.expand(B, d), rtol=1e-13, atol=1e-14)
    mu2, mu3, mu4 = central_moments_quadrature(family, dist)
    torch.testing.assert_close(var, mu2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(k3, mu3, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(k4, mu4 - 3 * mu2.square(), rtol=1e-11, atol=1e-12)
    if family in ("Normal", "Independent(Normal)"):
        assert q.is_gaussian  # k3 = k4 = 0: the cheaper kernels apply
    if family in ("Uniform", "Laplace"):
        assert q.k3 is None and q.k4 is not None  # symmetric


MC_N = 200_000


@pytest.mark.parametrize("family", FAMILIES)
def test_cumulants_monte_carlo(family):
    """E[(z - m)^r] for r = 1..4 from samples, with m the claimed mean, against the
    claimed (0, k2, k3, k4 + 3 k2^2): every z-score below 5."""
    torch.manual_seed(7)
    dist = build(family, params(2))
    mean, var, k3, k4 = as_full(LatentMoments.from_distribution(dist))
    z = dist.sample((MC_N,)) - mean
    claimed = [torch.zeros_like(mean), var, k3, k4 + 3 * var.square()]
    worst = 0.0
    for r, want in zip((1, 2, 3, 4), claimed):
        f = z.pow(r)
        se = f.std(0) / math.sqrt(MC_N)
        worst = max(worst, float(((f.mean(0) - want).abs() / se).max()))
    assert worst < 5.0, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_to_distribution_parameters(family):
    """The constructors are differentiable: gradcheck of the cumulant map, and the loss
    (the precision head, which uses every cumulant) reaches every parameter."""
    names = PARAMS_OF[family]
    base = params(3)

    def cumulants(*leaves):
        p = dict(base, **dict(zip(names, leaves)))
        return tuple(t for t in as_full(LatentMoments.from_distribution(build(family, p))))

    leaves = tuple(base[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(cumulants, leaves)

    g = gen(4)
    k = 6
    x = torch.randn(B, k, generator=g, dtype=DT)
    A, C = torch.randn(k, d, generator=g, dtype=DT), 0.3 * torch.randn(k, d, generator=g, dtype=DT)
    p = dict(base, **dict(zip(names, leaves)))
    loss = analytic_nll(x, build(family, p), A, precision_weight=C,
                        precision_bias=torch.ones(k, dtype=DT), backend="torch")
    loss = loss + analytic_nll(x, build(family, p), A, sigma2=0.5, backend="torch")
    grads = torch.autograd.grad(loss, leaves)
    for n, gr in zip(names, grads):
        assert torch.isfinite(gr).all(), n
        assert float(gr.abs().max()) > 0, n


@pytest.mark.parametrize("family", FAMILIES)
def test_as_latent_moments_and_broadcast(family):
    """as_latent_moments accepts a distribution; a parameter given as a scalar tensor
    broadcasts to (B, d) like torch.distributions does."""
    p = params(5)
    q = as_latent_moments(build(family, p))
    assert q.mean.shape == (B, d)
    assert as_latent_moments(q) is q
    scalar = {"Normal": lambda: D.Normal(p["loc"], torch.tensor(0.7, dtype=DT)),
              "Uniform": lambda: D.Uniform(torch.tensor(-1.0, dtype=DT), p["low"].abs() + 0.1),
              "Laplace": lambda: D.Laplace(torch.tensor(0.0, dtype=DT), p["scale"]),
              "Gamma": lambda: D.Gamma(torch.tensor(2.0, dtype=DT), p["grate"])}
    if family in scalar:
        qs = LatentMoments.from_distribution(scalar[family]())
        for t in as_full(qs):
            assert t.shape == (B, d)


# ------------------------------------------------------------------ unsupported
@pytest.mark.parametrize("make", [
    lambda: D.Beta(torch.ones(B, d), torch.ones(B, d)),
    lambda: D.Categorical(logits=torch.zeros(B, d)),
    lambda: D.Independent(D.Bernoulli(probs=torch.full((B, d), 0.5)), 1),
    lambda: D.MultivariateNormal(torch.zeros(B, d), torch.eye(d)),
    lambda: D.Exponential(torch.ones(B, d)),
], ids=["Beta", "Categorical", "Independent(Bernoulli)", "MultivariateNormal", "Exponential"])
def test_unsupported_distribution_is_a_type_error(make):
    dist = make()
    with pytest.raises(TypeError, match=SUPPORTED_RE):
        LatentMoments.from_distribution(dist)
    with pytest.raises(TypeError, match=SUPPORTED_RE):
        analytic_nll(torch.zeros(B, 5), dist, torch.zeros(5, d), sigma2=1.0, backend="torch")


def test_non_distribution_q_is_a_type_error():
    with pytest.raises(TypeError, match=r"q: expected LatentMoments or a torch.distributions"):
        analytic_nll(torch.zeros(B, 5), (torch.zeros(B, d), torch.ones(B, d)),
                     torch.zeros(5, d), sigma2=1.0, backend="torch")


# ------------------------------------------------------------ convenience constructors
def test_gaussian_from_mu_logvar():
    g = gen(6)
    mu = torch.randn(B, d, generator=g, dtype=DT, requires_grad=True)
    logvar = torch.randn(B, d, generator=g, dtype=DT, requires_grad=True)
    q = LatentMoments.gaussian(mu, logvar=logvar)
    assert q.is_gaussian and q.k3 is None and q.k4 is None
    assert q.mean is mu
    torch.testing.assert_close(q.var, logvar.detach().exp(), rtol=1e-15, atol=0)
    ref = LatentMoments.from_distribution(D.Normal(mu, (0.5 * logvar).exp()))
    torch.testing.assert_close(q.var, ref.var, rtol=1e-14, atol=0)
    assert torch.autograd.gradcheck(lambda m, lv: LatentMoments.gaussian(m, logvar=lv).tensors()[:2], (mu, logvar))
    x, A = torch.randn(B, 5, generator=g, dtype=DT), torch.randn(5, d, generator=g, dtype=DT)
    gm, glv = torch.autograd.grad(analytic_nll(x, q, A, sigma2=0.3, backend="torch"), (mu, logvar))
    for gr in (gm, glv):
        assert torch.isfinite(gr).all() and float(gr.abs().max()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_logits_matches_probs_and_formula(dtype):
    logits = torch.linspace(-6, 6, B * d, dtype=DT).view(B, d)
    q = LatentMoments.bernoulli(logits=logits.to(dtype))
    p = torch.sigmoid(logits)
    ref = LatentMoments.bernoulli(probs=p)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-16)
    for got, want in zip(q.tensors(), ref.tensors()):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
    # the same through torch.distributions, built from logits
    qd = LatentMoments.from_distribution(D.Bernoulli(logits=logits.to(dtype)))
    for got, want in zip(qd.tensors(), q.tensors()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("via", ["convenience", "distribution"])
def test_bernoulli_logits_stable_when_saturated(dtype, via):
    """At |logits| = 50, p(1-p) ~ e^-50 ~ 2e-22 underflows to 0 through probs in float32
    (1 - sigmoid(50) == 0), but the logits path keeps it positive and accurate."""
    logits = torch.tensor([[50.0, -50.0, 30.0, -30.0]], dtype=dtype).expand(B, d).clone().requires_grad_()
    q = (LatentMoments.bernoulli(logits=logits) if via == "convenience"
         else LatentMoments.from_distribution(D.Bernoulli(logits=logits)))
    for t in q.tensors():
        assert torch.isfinite(t).all()
    assert bool((q.var > 0).all())
    L = logits.detach().double().abs()
    pq = torch.exp(-L) / (1 + torch.exp(-L)).square()  # p(1-p) = e^-|l| / (1 + e^-|l|)^2
    rtol = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(q.var.double(), pq, rtol=rtol, atol=0)
    # 1 - 2p = -tanh(l / 2) without cancellation
    torch.testing.assert_close(q.k3.double(), -torch.tanh(logits.detach().double() / 2) * pq, rtol=rtol, atol=0)
    torch.testing.assert_close(q.k4.double(), pq * (1 - 6 * pq), rtol=rtol, atol=0)
    (grad,) = torch.autograd.grad(q.var.sum() + q.k3.sum() + q.k4.sum(), logits)
    assert torch.isfinite(grad).all()
    x = torch.zeros(B, 3, dtype=dtype)
    A = torch.ones(3, d, dtype=dtype)
    loss = analytic_nll(x, q, A, precision_weight=A, precision_bias=torch.ones(3, dtype=dtype),
                        backend="torch")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("touch", ["sample", "mean", "probs"])
def test_bernoulli_distribution_keeps_logits_path_after_probs_is_cached(touch):
    """dist.sample() / .mean cache probs on a logits-built Bernoulli; the cumulants must
    still come from the logits (float32 p(1-p) at |logits| = 50 would otherwise be 0)."""
    logits = torch.tensor([[50.0, -50.0, 30.0, -30.0]]).expand(B, d).clone()
    dist = D.Bernoulli(logits=logits)
    getattr(dist, touch)() if touch == "sample" else getattr(dist, touch)
    assert "probs" in dist.__dict__
    q = LatentMoments.from_distribution(dist)
    assert bool((q.var > 0).all())
    for got, want in zip(q.tensors(), LatentMoments.bernoulli(logits=logits).tensors()):
        assert torch.equal(got, want)
    # and a probs-built Bernoulli whose logits got cached keeps its exact probs path
    probs = torch.tensor([[0.0, 1.0, 0.5, 0.25]]).expand(B, d)
    dist = D.Bernoulli(probs=probs)
    dist.logits
    q = LatentMoments.from_distribution(dist)
    for got, want in zip(q.tensors(), LatentMoments.bernoulli(probs=probs).tensors()):
        assert torch.equal(got, want)


def test_bernoulli_needs_exactly_one_of_logits_probs():
    with pytest.raises(ValueError, match="exactly one of logits or probs"):
        LatentMoments.bernoulli()
    with pytest.raises(ValueError, match="exactly one of logits or probs"):
        LatentMoments.bernoulli(logits=torch.zeros(B, d), probs=torch.full((B, d), 0.5))


def test_bernoulli_probs_at_the_edges():
    q = LatentMoments.bernoulli(probs=torch.tensor([[0.0, 1.0, 0.5]], dtype=DT))
    torch.testing.assert_close(q.var, torch.tensor([[0.0, 0.0, 0.25]], dtype=DT))
    torch.testing.assert_close(q.k3, torch.tensor([[0.0, 0.0, 0.0]], dtype=DT))
    torch.testing.assert_close(q.k4, torch.tensor([[0.0, 0.0, -0.125]], dtype=DT))


# -------------------------------------------------------------------- shape checks
def test_latent_moments_shape_validation():
    m, v = torch.zeros(B, d), torch.ones(B, d)
    with pytest.raises(ValueError, match=r"LatentMoments.mean: expected shape \(B, d\), got \(4,\)"):
        LatentMoments(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"LatentMoments.mean: expected shape \(B, d\), got \(2, 3, 4\)"):
        LatentMoments(torch.zeros(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=rf"LatentMoments.var: expected shape \({B}, {d}\).*got \({B}, {d + 1}\)"):
        LatentMoments(m, torch.ones(B, d + 1))
    with pytest.raises(ValueError, match=rf"LatentMoments.k3: expected shape \({B}, {d}\).*got \({B + 1}, {d}\)"):
        LatentMoments(m, v, torch.zeros(B + 1, d))
    with pytest.raises(ValueError, match=r"LatentMoments.k4: expected shape .*got \(3,\)"):
        LatentMoments(m, v, None, torch.zeros(3))
    with pytest.raises(TypeError, match="LatentMoments.var: expected a torch.Tensor, got ndarray"):
        LatentMoments(m, np.ones((B, d)))
    with pytest.raises(TypeError, match="LatentMoments.mean: expected a torch.Tensor, got list"):
        LatentMoments([[0.0]], v)
    q = LatentMoments(m, v, k4=torch.zeros(B, d))
    assert (q.batch_size, q.latent_dim) == (B, d) and not q.is_gaussian


def test_gaussian_constructors_are_explicit_about_the_scale():
    mu, logvar = torch.zeros(2, 3), torch.full((2, 3), math.log(4.0))
    with pytest.raises(TypeError, match=r"logvar=logvar.*from_std"):
        LatentMoments.gaussian(mu, logvar)                   # positional: refused, not guessed
    assert torch.allclose(LatentMoments.gaussian(mu, logvar=logvar).var, torch.full((2, 3), 4.0))
    assert torch.allclose(LatentMoments.from_std(mu, torch.full((2, 3), 2.0)).var, torch.full((2, 3), 4.0))


def test_only_the_gaussian_family_counts_as_gaussian():
    logits = torch.randn(3, 4, 5, dtype=DT)
    assert not LatentMoments.categorical(logits=logits).is_gaussian
    assert not LatentMoments.bernoulli(logits=torch.randn(3, 4, dtype=DT)).is_gaussian
    assert LatentMoments.gaussian(torch.zeros(3, 4, dtype=DT), logvar=torch.zeros(3, 4, dtype=DT)).is_gaussian
