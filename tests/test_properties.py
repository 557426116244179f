"""Property tests (hypothesis) of the reference backend over batch size B (0-8),
latent size d (1-12), data size k (1-24), latent families, reductions, heads
(fixed variance as a float, a 0-dim or a per-pixel tensor; learnable precision) and
biases on/off: finite outputs, shapes, reduction consistency, invariance to the
data shape, exactness of the constant-precision head, and float64 gradcheck through
every input and through the distribution parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll

FAMILIES = ("gaussian", "bernoulli", "uniform", "laplace", "poisson", "gamma")
HEADS = ("fixed-float", "fixed-0dim", "fixed-pixel", "precision")
REDUCTIONS = ("none", "sum", "mean")


@dataclass
class Problem:
    B: int
    d: int
    k: int
    family: str
    head: str
    with_bias: bool
    reduction: str
    seed: int


@st.composite
def problems(draw, family: str, head: str):
    """Sizes, biases, reduction and data seed drawn by hypothesis; the family and the
    head are pytest parameters, so that every combination is covered on every run.

    With the derandomized CI profile every parametrization would draw the same sizes,
    so they are rotated by a per-(family, head) salt (ranges unchanged); the extreme
    sizes are pinned separately by test_extreme_sizes."""
    salt = FAMILIES.index(family) * len(HEADS) + HEADS.index(head)
    B, d, k = draw(st.integers(0, 8)), draw(st.integers(1, 12)), draw(st.integers(1, 24))
    return Problem(
        B=(B + salt) % 9, d=(d - 1 + 5 * salt) % 12 + 1, k=(k - 1 + 7 * salt) % 24 + 1,
        family=family, head=head,
        with_bias=draw(st.booleans()), reduction=draw(st.sampled_from(REDUCTIONS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is faster on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GRAD_HEADS = ("fixed-0dim", "fixed-pixel", "precision")  # a float sigma2 has no gradient
each_family = pytest.mark.parametrize("family", FAMILIES)


def family_params(family: str, B: int, d: int, g: torch.Generator, dtype) -> dict:
    r = lambda: torch.rand(B, d, generator=g, dtype=dtype)  # noqa: E731
    n = lambda: torch.randn(B, d, generator=g, dtype=dtype)  # noqa: E731
    return {
        "gaussian": lambda: {"loc": n(), "scale": 0.3 + r()},
        "bernoulli": lambda: {"logits": 2 * n()},
        "uniform": lambda: {"low": n(), "width": 0.3 + 2 * r()},
        "laplace": lambda: {"loc": n(), "scale": 0.3 + r()},
        "poisson": lambda: {"rate": 0.2 + 3 * r()},
        "gamma": lambda: {"concentration": 0.5 + 3 * r(), "rate": 0.5 + 2 * r()},
    }[family]()


def build(family: str, p: dict) -> D.Distribution:
    if family == "gaussian":
        return D.Normal(p["loc"], p["scale"])
    if family == "bernoulli":
        return D.Bernoulli(logits=p["logits"])
    if family == "uniform":
        return D.Uniform(p["low"], p["low"] + p["width"])
    if family == "laplace":
        return D.Laplace(p["loc"], p["scale"])
    if family == "poisson":
        return D.Poisson(p["rate"])
    return D.Gamma(p["concentration"], p["rate"])


@dataclass
class Data:
    x: torch.Tensor
    params: dict
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    sigma2: object
    precision_weight: Optional[torch.Tensor]
    precision_bias: Optional[torch.Tensor]

    def head_kwargs(self) -> dict:
        if self.precision_weight is None:
            return {"sigma2": self.sigma2}
        return {"precision_weight": self.precision_weight, "precision_bias": self.precision_bias}


def make_data(pb: Problem, dtype=torch.float64) -> Data:
    g = torch.Generator().manual_seed(pb.seed)
    x = torch.randn(pb.B, pb.k, generator=g, dtype=dtype)
    params = family_params(pb.family, pb.B, pb.d, g, dtype)
    W = torch.randn(pb.k, pb.d, generator=g, dtype=dtype) / math.sqrt(pb.d)
    b = torch.randn(pb.k, generator=g, dtype=dtype) if pb.with_bias else None
    sigma2 = C = bp = None
    if pb.head == "fixed-float":
        sigma2 = 0.2 + float(torch.rand((), generator=g))
    elif pb.head == "fixed-0dim":
        sigma2 = 0.2 + torch.rand((), generator=g, dtype=dtype)
    elif pb.head == "fixed-pixel":
        sigma2 = 0.2 + torch.rand(pb.k, generator=g, dtype=dtype)
    else:
        # positive precision weights keep E[v^2] well away from 0 (gradcheck needs smoothness)
        C = (0.5 + 0.5 * torch.rand(pb.k, pb.d, generator=g, dtype=dtype)) / math.sqrt(pb.d)
        bp = (1.0 + 0.3 * torch.rand(pb.k, generator=g, dtype=dtype)) if pb.with_bias else None
    return Data(x, params, W, b, sigma2, C, bp)


def nll(data: Data, q, x=None, reduction="none"):
    return analytic_nll(data.x if x is None else x, q, data.weight, data.bias,
                        reduction=reduction, backend="torch", **data.head_kwargs())


def image_shape(k: int) -> tuple:
    """(1, h, w) with h * w = k, h the smallest divisor > 1 (or 1 for a prime / 1)."""
    h = next((h for h in range(2, k + 1) if k % h == 0), 1)
    return (1, h, k // h)


# ------------------------------------------------------------------------ the checks
def check_shapes_finite_reductions_reshape(pb: Problem, dtype) -> None:
    """Finite outputs of the right shape, sum = none.sum(), mean = sum / B (0 for B = 0),
    the distribution object = its LatentMoments, and x as (B, 1, h, w) = x as (B, k)."""
    data = make_data(pb, dtype)
    dist = build(pb.family, data.params)
    q = LatentMoments.from_distribution(dist)
    none = nll(data, q)
    assert none.shape == (pb.B,) and none.dtype == dtype
    assert torch.isfinite(none).all()
    total, mean = nll(data, q, reduction="sum"), nll(data, q, reduction="mean")
    assert total.shape == () and mean.shape == ()
    assert torch.isfinite(total) and torch.isfinite(mean)
    torch.testing.assert_close(total, none.sum(), rtol=0, atol=0)
    torch.testing.assert_close(mean, total / pb.B if pb.B else torch.zeros((), dtype=dtype), rtol=0, atol=0)
    assert torch.equal(nll(data, dist), none)
    x_img = data.x.reshape(pb.B, *image_shape(pb.k))
    for reduction in REDUCTIONS:
        assert torch.equal(nll(data, q, x=x_img, reduction=reduction),
                           nll(data, q, reduction=reduction))


def check_fixed_equals_constant_precision(pb: Problem) -> None:
    """precision_weight = 0, precision_bias = 1/sigma: both heads exact and equal."""
    data = make_data(pb)
    q = LatentMoments.from_distribution(build(pb.family, data.params))
    s2 = torch.as_tensor(data.sigma2 if data.sigma2 is not None else 0.7, dtype=torch.float64)
    fixed = analytic_nll(data.x, q, data.weight, data.bias, sigma2=s2, reduction="none", backend="torch")
    prec = analytic_nll(data.x, q, data.weight, data.bias, precision_weight=torch.zeros_like(data.weight),
                        precision_bias=s2.expand(pb.k).rsqrt(), reduction="none", backend="torch")
    torch.testing.assert_close(prec, fixed, rtol=1e-12, atol=1e-12)


def check_gradcheck_every_input(pb: Problem) -> None:
    """float64 gradcheck through x, mean, var, k3 and k4 (precision head, where the family
    has them), weight, bias, and sigma2 (0-dim or per-pixel) or the precision weight and bias."""
    data = make_data(pb)
    q0 = LatentMoments.from_distribution(build(pb.family, data.params))
    names, leaves = [], []

    def leaf(name, t):
        if t is None:
            return None
        t = t.detach().clone().requires_grad_()
        names.append(name)
        leaves.append(t)
        return t

    fixed_head = data.precision_weight is None
    leaf("x", data.x)
    leaf("mean", q0.mean)
    leaf("var", q0.var)
    # k3, k4 enter only the precision head; the fixed head gets them as constants
    k3, k4 = (t if fixed_head else leaf(n, t) for n, t in (("k3", q0.k3), ("k4", q0.k4)))
    leaf("weight", data.weight)
    leaf("bias", data.bias)
    if fixed_head:
        assert leaf("sigma2", data.sigma2).shape == ((pb.k,) if pb.head == "fixed-pixel" else ())
    else:
        leaf("precision_weight", data.precision_weight)
        leaf("precision_bias", data.precision_bias)
        assert ("k3" in names, "k4" in names) == (pb.family in ("bernoulli", "poisson", "gamma"),
                                                  pb.family != "gaussian")

    def f(*ts):
        env = dict(zip(names, ts))
        q = LatentMoments(env["mean"], env["var"], env.get("k3", k3), env.get("k4", k4))
        if fixed_head:
            head = {"sigma2": env["sigma2"]}
        else:
            head = {"precision_weight": env["precision_weight"], "precision_bias": env.get("precision_bias")}
        return analytic_nll(env["x"], q, env["weight"], env.get("bias"),
                            reduction=pb.reduction, backend="torch", **head)

    assert torch.autograd.gradcheck(f, tuple(leaves))
    if pb.B > 0:  # every input is used: a gradient (not None) of its own shape
        grads = torch.autograd.grad(f(*leaves).sum(), leaves, allow_unused=False)
        for n, t, gr in zip(names, leaves, grads):
            assert gr.shape == t.shape and torch.isfinite(gr).all(), n


def check_gradcheck_distribution_parameters(pb: Problem) -> None:
    """float64 gradcheck from the loss back to the parameters of the torch.distributions
    object (Bernoulli logits, Normal loc/scale, and the other families)."""
    data = make_data(pb)
    keys = list(data.params)
    leaves = tuple(data.params[kk].clone().requires_grad_() for kk in keys)

    def f(*ts):
        return nll(data, build(pb.family, dict(zip(keys, ts))), reduction=pb.reduction)

    assert torch.autograd.gradcheck(f, leaves)


# ---------------------------------------------------------------- hypothesis tests
@each_family
@pytest.mark.parametrize("head", HEADS)
@settings(max_examples=8)
@given(hyp=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_shapes_finite_reductions_reshape(family, head, hyp, dtype):
    check_shapes_finite_reductions_reshape(hyp.draw(problems(family, head), label="problem"), dtype)


@each_family
@pytest.mark.parametrize("head", HEADS)
@settings(max_examples=4)
@given(hyp=st.data())
def test_fixed_equals_constant_precision_head(family, head, hyp):
    check_fixed_equals_constant_precision(hyp.draw(problems(family, head), label="problem"))


@each_family
@pytest.mark.parametrize("head", GRAD_HEADS)
@settings(max_examples=8)
@given(hyp=st.data())
def test_gradcheck_every_input(family, head, hyp):
    check_gradcheck_every_input(hyp.draw(problems(family, head), label="problem"))


@each_family
@pytest.mark.parametrize("head", GRAD_HEADS)
@settings(max_examples=5)
@given(hyp=st.data())
def test_gradcheck_distribution_parameters(family, head, hyp):
    check_gradcheck_distribution_parameters(hyp.draw(problems(family, head), label="problem"))


# ------------------------------------------------------- pinned extremes of the ranges
EXTREMES = [  # (B, d, k, with_bias, reduction)
    (8, 12, 24, True, "none"),
    (8, 12, 24, False, "mean"),
    (0, 4, 6, True, "mean"),
    (1, 1, 1, True, "sum"),
]


@each_family
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("B,d,k,with_bias,reduction", EXTREMES)
def test_extreme_sizes(family, head, B, d, k, with_bias, reduction):
    pb = Problem(B, d, k, family, head, with_bias, reduction, seed=B * 1000 + d * 10 + k)
    check_shapes_finite_reductions_reshape(pb, torch.float32)
    check_shapes_finite_reductions_reshape(pb, torch.float64)
    check_fixed_equals_constant_precision(pb)
    if head != "fixed-float":
        check_gradcheck_every_input(pb)
        check_gradcheck_distribution_parameters(pb)


@pytest.mark.parametrize("family", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("head", ["fixed-0dim", "precision"])
def test_gradcheck_distribution_parameters_fixed_cases(family, head):
    """A deterministic mid-size case for the two families the issue names."""
    check_gradcheck_distribution_parameters(
        Problem(B=4, d=5, k=7, family=family, head=head, with_bias=True, reduction="mean", seed=3))
