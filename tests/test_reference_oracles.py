"""The reference backend against the exact oracles of MATH.md §7, in float64.

- discrete latents (Bernoulli, a 3-point law): enumerate every latent state and take
  the expectations exactly; the analytic formulas must agree to <= 1e-12 relative;
- Gaussian latents: Monte Carlo with >= 10^6 draws (tolerance from the standard
  error) and tensor-product Gauss-Hermite quadrature (exact for the polynomial
  integrands here, so a tight deterministic check);
- the fixed-variance head equals the precision head with a constant precision;
- the linear VAE at the probabilistic-PCA optimum: ELBO = the pPCA maximum
  log-likelihood (Tipping & Bishop 1999), and the optimum is stationary.

The Taylor log term of the precision head is an approximation of E[log v^2]; it is
checked against its own formula evaluated on enumerated/quadrature M and V, never
against E[log v^2].
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from silent_kernels import LatentMoments, analytic_nll, reference

DT = torch.float64
LOG_2PI = math.log(2 * math.pi)
ENUM_RTOL = 1e-12


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max element-wise relative error."""
    actual, expected = torch.broadcast_tensors(actual, expected)
    return float(((actual - expected).abs() / expected.abs()).max())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decoder(k: int, d: int, g: torch.Generator, with_bias: bool):
    """Random mean and precision heads; the precision head is centred away from 0."""
    A = torch.randn(k, d, generator=g, dtype=DT) / math.sqrt(d)
    C = 0.5 * torch.randn(k, d, generator=g, dtype=DT) / math.sqrt(d)
    b = torch.randn(k, generator=g, dtype=DT) if with_bias else None
    bp = (1.5 + 0.3 * torch.randn(k, generator=g, dtype=DT)) if with_bias else None
    return A, b, C, bp


def heads(z: torch.Tensor, weight: torch.Tensor, bias):
    """A linear head applied to latent values z (..., d): z W^T + b."""
    out = z @ weight.T
    return out if bias is None else out + bias


# --------------------------------------------------------------- discrete enumeration
def enumerate_states(support: torch.Tensor, probs: torch.Tensor):
    """All states of d independent discrete latents.

    support: (d, m) the m values latent i can take; probs: (B, d, m) their probabilities.
    Returns Z (S, d) with S = m^d and the state probabilities P (B, S).
    """
    d, m = support.shape
    idx = torch.tensor(list(itertools.product(range(m), repeat=d)), dtype=torch.long)  # (S, d)
    Z = torch.gather(support, 1, idx.T).T                                             # (S, d)
    P = torch.ones(probs.shape[0], idx.shape[0], dtype=probs.dtype)
    for i in range(d):
        P = P * probs[:, i, idx[:, i]]
    return Z, P


def discrete_cumulants(support: torch.Tensor, probs: torch.Tensor) -> LatentMoments:
    """Exact (m, k2, k3, k4) of each latent from its pmf (central moments, k4 = mu4 - 3 mu2^2)."""
    mean = (probs * support).sum(-1)
    c = support - mean[..., None]
    mu2, mu3, mu4 = ((probs * c.pow(r)).sum(-1) for r in (2, 3, 4))
    return LatentMoments(mean, mu2, mu3, mu4 - 3 * mu2.square())


def enumerated_pixel_moments(x, Z, P, A, b, C, bp):
    """Exact per-pixel E[(x-u)^2], E[(x-u)^2 v^2], M = E[v^2], V = Var[v^2] (each (B, k)),
    and the exact expected Gaussian log-density terms, by summing over states."""
    u = heads(Z, A, b)                       # (S, k)
    v = heads(Z, C, bp)                      # (S, k)
    r2 = (x[:, None, :] - u[None]).square()  # (B, S, k)
    E = lambda f: torch.einsum("bs,bsk->bk", P, f)  # noqa: E731
    v2 = v.square()[None].expand_as(r2)
    M = E(v2)
    V = E((v2 - M[:, None, :]).square())    # centred: no E[v^4] - M^2 cancellation
    return E(r2), E(r2 * v2), M, V


def bernoulli_case(B, d, k, seed, with_bias):
    g = gen(seed)
    x = torch.randn(B, k, generator=g, dtype=DT)
    p = torch.rand(B, d, generator=g, dtype=DT) * 0.9 + 0.05
    support = torch.tensor([0.0, 1.0], dtype=DT).expand(d, 2)
    probs = torch.stack([1 - p, p], dim=-1)
    A, b, C, bp = decoder(k, d, g, with_bias)
    return x, support, probs, A, b, C, bp


def three_point_case(B, d, k, seed, with_bias):
    g = gen(seed)
    x = torch.randn(B, k, generator=g, dtype=DT)
    support = torch.sort(torch.randn(d, 3, generator=g, dtype=DT) * 1.5, dim=-1).values
    probs = torch.softmax(torch.randn(B, d, 3, generator=g, dtype=DT), dim=-1)
    A, b, C, bp = decoder(k, d, g, with_bias)
    return x, support, probs, A, b, C, bp


SIGMA2_KINDS = ("float", "0-dim", "per-pixel")


def make_sigma2(kind: str, k: int, g: torch.Generator):
    if kind == "float":
        return 0.37
    if kind == "0-dim":
        return torch.tensor(0.37, dtype=DT)
    return 0.1 + torch.rand(k, generator=g, dtype=DT)


def sigma2_vector(sigma2, k):
    return torch.as_tensor(sigma2, dtype=DT).expand(k)


DISCRETE_CASES = [
    # (name, builder, B, d, k, seed)
    ("bernoulli-d1", bernoulli_case, 3, 1, 5, 1),
    ("bernoulli-d4", bernoulli_case, 4, 4, 7, 2),
    ("bernoulli-d10", bernoulli_case, 3, 10, 6, 3),
    ("3point-d3", three_point_case, 3, 3, 5, 4),
    ("3point-d6", three_point_case, 2, 6, 4, 5),
]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", DISCRETE_CASES, ids=[c[0] for c in DISCRETE_CASES])
def test_enumeration_pixel_moments(case, with_bias):
    """Per-pixel E[(x-u)^2], E[(x-u)^2 v^2], E[v^2], Var[v^2] exactly (MATH.md §3, §4)."""
    _, build, B, d, k, seed = case
    x, support, probs, A, b, C, bp = build(B, d, k, seed, with_bias)
    q = discrete_cumulants(support, probs)
    if build is bernoulli_case:  # the public constructor must give the same cumulants
        q_pub = LatentMoments.bernoulli(probs=probs[..., 1])
        for got, want in zip(q_pub.tensors(), q.tensors()):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
        q = q_pub
    Z, P = enumerate_states(support, probs)
    torch.testing.assert_close(P.sum(-1), torch.ones(B, dtype=DT), rtol=0, atol=1e-13)
    e_r2, e_r2v2, e_M, e_V = enumerated_pixel_moments(x, Z, P, A, b, C, bp)

    c = reference.precision_contractions(*q.tensors(), A, b, C, bp)
    r2v2, M, V = reference.precision_pixel_moments(x, c)
    r2 = (x - c.ubar).square() + c.Saa  # the fixed-variance formula (MATH.md §3)
    errs = {"E[(x-u)^2]": rel_err(r2, e_r2), "E[(x-u)^2 v^2]": rel_err(r2v2, e_r2v2),
            "M": rel_err(M, e_M), "V": rel_err(V, e_V)}
    assert max(errs.values()) <= ENUM_RTOL, errs


@pytest.mark.parametrize("sigma2_kind", SIGMA2_KINDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", DISCRETE_CASES, ids=[c[0] for c in DISCRETE_CASES])
def test_enumeration_fixed_nll(case, with_bias, sigma2_kind):
    """Fixed head: analytic_nll = the exact expectation of the Gaussian NLL over all states."""
    _, build, B, d, k, seed = case
    x, support, probs, A, b, C, bp = build(B, d, k, seed, with_bias)
    sigma2 = make_sigma2(sigma2_kind, k, gen(seed + 100))
    q = discrete_cumulants(support, probs)
    Z, P = enumerate_states(support, probs)
    u = heads(Z, A, b)
    s2 = sigma2_vector(sigma2, k)
    logp = torch.distributions.Normal(u[None], s2.sqrt()).log_prob(x[:, None, :]).sum(-1)  # (B, S)
    exact = -(P * logp).sum(-1)
    got = analytic_nll(x, q, A, b, sigma2=sigma2, reduction="none", backend="torch")
    assert got.shape == (B,)
    assert rel_err(got, exact) <= ENUM_RTOL
    got_mean = analytic_nll(x, q, A, b, sigma2=sigma2, backend="torch")
    assert rel_err(got_mean, exact.mean()) <= ENUM_RTOL


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", DISCRETE_CASES, ids=[c[0] for c in DISCRETE_CASES])
def test_enumeration_precision_nll(case, with_bias):
    """Precision head: exact 0.5 E[(x-u)^2 v^2] plus the Taylor log term of its own formula
    -0.5 log M + V / (4 M^2), with M and V enumerated, plus the constants."""
    _, build, B, d, k, seed = case
    x, support, probs, A, b, C, bp = build(B, d, k, seed, with_bias)
    q = discrete_cumulants(support, probs)
    Z, P = enumerate_states(support, probs)
    _, e_r2v2, e_M, e_V = enumerated_pixel_moments(x, Z, P, A, b, C, bp)
    assert float(e_M.min()) > 1e-3  # far from the documented floor
    exact = (0.5 * e_r2v2 - 0.5 * e_M.log() + e_V / (4 * e_M.square()) + 0.5 * LOG_2PI).sum(-1)
    got = analytic_nll(x, q, A, b, precision_weight=C, precision_bias=bp,
                       reduction="none", backend="torch")
    assert got.shape == (B,)
    assert rel_err(got, exact) <= ENUM_RTOL


def test_enumeration_precision_first_term_alone():
    """With the Taylor term isolated: the exact part of the precision NLL equals
    0.5 sum_p E[(x-u)^2 v^2] by enumeration (d = 10, all 1024 states)."""
    x, support, probs, A, b, C, bp = bernoulli_case(3, 10, 6, 11, True)
    q = LatentMoments.bernoulli(probs=probs[..., 1])
    Z, P = enumerate_states(support, probs)
    _, e_r2v2, e_M, e_V = enumerated_pixel_moments(x, Z, P, A, b, C, bp)
    c = reference.precision_contractions(*q.tensors(), A, b, C, bp)
    pix = reference.precision_pixel_nll(x, c)
    taylor = -0.5 * e_M.log() + e_V / (4 * e_M.square()) + 0.5 * LOG_2PI
    assert rel_err(pix - taylor, 0.5 * e_r2v2) <= 1e-11  # a difference: one more rounding step


# ------------------------------------------------------------- Gaussian: Monte Carlo
MC_DRAWS = 1 << 20  # 1,048,576 >= 10^6
MC_CHUNK = 1 << 17
MC_Z = 5.0


def gaussian_case(B, d, k, seed, with_bias=True):
    g = gen(seed)
    x = torch.randn(B, k, generator=g, dtype=DT)
    mean = torch.randn(B, d, generator=g, dtype=DT)
    var = 0.2 + torch.rand(B, d, generator=g, dtype=DT)
    A, b, C, bp = decoder(k, d, g, with_bias)
    return x, LatentMoments(mean, var), A, b, C, bp


def mc_z_scores(x, q, A, b, C, bp, sigma2, analytic: dict, seed: int) -> dict:
    """Draw MC_DRAWS Gaussian latents per sample (chunked) and return, for each named
    quantity, max |MC mean - analytic| / (MC standard error). Sums are taken of the
    deviation from the analytic value, so the variance estimate is well conditioned."""
    g = gen(seed)
    B, d = q.mean.shape
    s2 = sigma2_vector(sigma2, x.shape[1])
    sums = {n: torch.zeros_like(a) for n, a in analytic.items()}
    sq = {n: torch.zeros_like(a) for n, a in analytic.items()}
    for _ in range(MC_DRAWS // MC_CHUNK):
        z = q.mean[:, None, :] + q.var.sqrt()[:, None, :] * torch.randn(B, MC_CHUNK, d, generator=g, dtype=DT)
        u, v = heads(z, A, b), heads(z, C, bp)                 # (B, N, k)
        r2 = (x[:, None, :] - u).square()
        v2 = v.square()
        f = {
            "E[(x-u)^2]": r2,
            "E[(x-u)^2 v^2]": r2 * v2,
            "M": v2,
            "fixed NLL": (0.5 * r2 / s2 + 0.5 * (LOG_2PI + s2.log())).sum(-1),
            "precision first term": 0.5 * (r2 * v2).sum(-1),
            "control": r2,
        }
        for n in analytic:
            dev = f[n] - analytic[n][:, None]
            sums[n] += dev.sum(1)
            sq[n] += dev.square().sum(1)
    out = {}
    for n in analytic:
        mean_dev = sums[n] / MC_DRAWS
        var = (sq[n] / MC_DRAWS - mean_dev.square()) * MC_DRAWS / (MC_DRAWS - 1)
        out[n] = float((mean_dev.abs() / (var / MC_DRAWS).sqrt()).max())
    return out


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gaussian_monte_carlo(with_bias):
    x, q, A, b, C, bp = gaussian_case(2, 3, 5, 21 + with_bias, with_bias)
    sigma2 = 0.1 + torch.rand(5, generator=gen(7), dtype=DT)
    c = reference.precision_contractions(*q.tensors(), A, b, C, bp)
    r2v2, M, _ = reference.precision_pixel_moments(x, c)
    analytic = {
        "E[(x-u)^2]": (x - c.ubar).square() + c.Saa,
        "E[(x-u)^2 v^2]": r2v2,
        "M": M,
        "fixed NLL": analytic_nll(x, q, A, b, sigma2=sigma2, reduction="none", backend="torch"),
        "precision first term": 0.5 * r2v2.sum(-1),
    }
    # negative control: E[(x-u)^2] without its variance term Saa must be rejected
    analytic["control"] = (x - c.ubar).square()
    z = mc_z_scores(x, q, A, b, C, bp, sigma2, analytic, seed=1234 + with_bias)
    control = z.pop("control")
    assert max(z.values()) < MC_Z, z
    assert control > 100 * MC_Z, control


# ------------------------------------------------- Gaussian: Gauss-Hermite quadrature
def hermite_grid(d: int, n: int):
    """Tensor-product probabilists' Gauss-Hermite rule for N(0, I_d): nodes (S, d), weights (S,)."""
    t, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / math.sqrt(2 * math.pi)
    nodes = np.array(list(itertools.product(t, repeat=d)))
    weights = np.prod(np.array(list(itertools.product(w, repeat=d))), axis=1)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gaussian_hermite_quadrature(d, with_bias):
    """Every integrand is a polynomial of degree <= 4 in z: 6 nodes per axis are exact."""
    B, k = 3, 6
    x, q, A, b, C, bp = gaussian_case(B, d, k, 40 + d + 10 * with_bias, with_bias)
    sigma2 = 0.1 + torch.rand(k, generator=gen(d), dtype=DT)
    nodes, weights = hermite_grid(d, 6)
    z = q.mean[:, None, :] + q.var.sqrt()[:, None, :] * nodes[None]  # (B, S, d)
    u, v = heads(z, A, b), heads(z, C, bp)
    r2, v2 = (x[:, None, :] - u).square(), v.square()
    E = lambda f: torch.einsum("s,bsk->bk", weights, f)  # noqa: E731
    e_M = E(v2)
    quad = {"E[(x-u)^2]": E(r2), "E[(x-u)^2 v^2]": E(r2 * v2), "M": e_M,
            "V": E((v2 - e_M[:, None, :]).square())}
    c = reference.precision_contractions(*q.tensors(), A, b, C, bp)
    r2v2, M, V = reference.precision_pixel_moments(x, c)
    got = {"E[(x-u)^2]": (x - c.ubar).square() + c.Saa, "E[(x-u)^2 v^2]": r2v2, "M": M, "V": V}
    errs = {n: rel_err(got[n], quad[n]) for n in quad}
    assert max(errs.values()) <= 1e-12, errs

    logp = torch.distributions.Normal(u, sigma2.sqrt()).log_prob(x[:, None, :]).sum(-1)
    fixed_exact = -(weights * logp).sum(-1)
    fixed = analytic_nll(x, q, A, b, sigma2=sigma2, reduction="none", backend="torch")
    assert rel_err(fixed, fixed_exact) <= 1e-12
    prec_exact = (0.5 * quad["E[(x-u)^2 v^2]"] - 0.5 * e_M.log()
                  + quad["V"] / (4 * e_M.square()) + 0.5 * LOG_2PI).sum(-1)
    prec = analytic_nll(x, q, A, b, precision_weight=C, precision_bias=bp, log_term="taylor",
                        reduction="none", backend="torch")
    assert rel_err(prec, prec_exact) <= 1e-12


# ------------------------------------------- fixed head == constant precision head
@pytest.mark.parametrize("family", ["gaussian", "bernoulli", "three-point"])
@pytest.mark.parametrize("sigma2_kind", ["0-dim", "per-pixel"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fixed_equals_constant_precision(family, sigma2_kind, with_bias):
    """precision_weight = 0, precision_bias = 1/sigma: E[(x-u)^2 v^2] = E[(x-u)^2]/sigma^2,
    M = 1/sigma^2 and V = 0, so the Taylor term vanishes and both heads are exact."""
    B, d, k = 4, 5, 9
    if family == "gaussian":
        x, q, A, b, _, _ = gaussian_case(B, d, k, 60, with_bias)
    else:
        build = bernoulli_case if family == "bernoulli" else three_point_case
        x, support, probs, A, b, _, _ = build(B, d, k, 61, with_bias)
        q = discrete_cumulants(support, probs)
        assert q.k3 is not None and q.k4 is not None
    sigma2 = make_sigma2(sigma2_kind, k, gen(62))
    fixed = analytic_nll(x, q, A, b, sigma2=sigma2, reduction="none", backend="torch")
    prec = analytic_nll(x, q, A, b, precision_weight=torch.zeros_like(A),
                        precision_bias=sigma2_vector(sigma2, k).rsqrt(),
                        reduction="none", backend="torch")
    assert rel_err(prec, fixed) <= 1e-12


# ---------------------------------------------------------------- the pPCA optimum
def ppca_problem(N=400, D=8, q=3, seed=5):
    g = gen(seed)
    W_true = torch.randn(D, q, generator=g, dtype=DT) * torch.tensor([3.0, 2.0, 1.5], dtype=DT)
    noise = torch.randn(N, D, generator=g, dtype=DT) * (0.3 + 0.4 * torch.rand(D, generator=g, dtype=DT))
    X = torch.randn(N, q, generator=g, dtype=DT) @ W_true.T + noise + torch.randn(D, generator=g, dtype=DT)
    mu = X.mean(0)
    S = (X - mu).T @ (X - mu) / N                                   # sample covariance, 1/N
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)                     # l_1 >= ... >= l_D
    sigma2_ml = evals[q:].mean()
    L_q, U_q = evals[:q], evecs[:, :q]
    W = U_q * (L_q - sigma2_ml).sqrt()                              # U_q (L_q - sigma2 I)^(1/2)
    # exact pPCA posterior: M = W^T W + sigma2 I = diag(L_q) for this W
    Mmat = W.T @ W + sigma2_ml * torch.eye(q, dtype=DT)
    torch.testing.assert_close(Mmat, torch.diag(L_q), rtol=0, atol=1e-12)
    post_mean = torch.linalg.solve(Mmat, W.T @ (X - mu).T).T       # (N, q)
    post_var = (sigma2_ml / L_q).expand(N, q).clone()               # diagonal of sigma2 M^-1
    loglik = -0.5 * (D * LOG_2PI + L_q.log().sum() + (D - q) * sigma2_ml.log() + D)
    return X, mu, W, sigma2_ml, post_mean, post_var, loglik, evals


def gaussian_kl(mean, var):
    """KL(N(mean, diag var) || N(0, I)) per sample."""
    return 0.5 * (var + mean.square() - 1 - var.log()).sum(-1)


def test_ppca_optimum_elbo_equals_max_loglik():
    X, mu, W, sigma2, m, v, loglik, _ = ppca_problem()
    nll = analytic_nll(X, LatentMoments(m, v), W, mu, sigma2=sigma2, reduction="none", backend="torch")
    elbo = -(nll + gaussian_kl(m, v)).mean()
    assert abs(float(elbo - loglik)) <= 1e-10 * abs(float(loglik))
    # the same through the precision head with a constant precision 1/sigma (exact there)
    nll_p = analytic_nll(X, LatentMoments(m, v), W, mu, precision_weight=torch.zeros_like(W),
                         precision_bias=sigma2.rsqrt().expand(X.shape[1]), backend="torch")
    assert abs(float(-(nll_p + gaussian_kl(m, v).mean()) - loglik)) <= 1e-10 * abs(float(loglik))
    # and the three-entropies identity (MATH.md §8) holds at this stationary point
    D = X.shape[1]
    three = -0.5 * D * math.log(2 * math.pi * math.e) - 0.5 * D * sigma2.log() + 0.5 * v.log().sum(-1).mean()
    assert abs(float(elbo - three)) <= 1e-10 * abs(float(loglik))


def test_ppca_optimum_is_stationary():
    """At the joint optimum the ELBO's gradient vanishes for the decoder (W, bias, sigma2)
    and, the posterior being exact, for every sample's q moments."""
    X, mu, W, sigma2, m, v, loglik, evals = ppca_problem()
    W, mu, s2, m, v = (t.clone().requires_grad_() for t in (W, mu, sigma2, m, v))
    nll = analytic_nll(X, LatentMoments(m, v), W, mu, sigma2=s2, reduction="sum", backend="torch")
    neg_elbo = (nll + gaussian_kl(m, v).sum()) / X.shape[0]
    grads = torch.autograd.grad(neg_elbo, (W, mu, s2, m, v))
    scale = float(evals[0])  # gradients are O(1) per unit of the data scale away from the optimum
    for name, gr in zip(("weight", "bias", "sigma2", "q.mean", "q.var"), grads):
        assert float(gr.abs().max()) <= 1e-10 * scale, (name, float(gr.abs().max()))
