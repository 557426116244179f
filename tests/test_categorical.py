"""One-hot categorical latents (MATH.md §12-13): every head against enumeration of all K^G
joint states, gradients included; K = 2 against the Bernoulli path; distributions and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll, backends

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)
BACKENDS = ["torch"] + [b for b in ("cpp",) if backends.available(b)
                        and backends._load(b)[0].has("categorical_fixed")]


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _problem(B, G, K, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    d = G * K
    t = {"x": torch.rand(B, 5, generator=g, dtype=F64), "logits": 1.5 * torch.randn(B, G, K, generator=g, dtype=F64),
         "A": torch.randn(5, d, generator=g, dtype=F64), "b": torch.randn(5, generator=g, dtype=F64),
         "C": 0.4 * torch.randn(5, d, generator=g, dtype=F64), "c": 1.0 + 0.3 * torch.randn(5, generator=g, dtype=F64)}
    return {n: v.to(dtype).requires_grad_(True) for n, v in t.items()}


def _enumerate(t, head):
    """E over all K^G joint states, differentiable in every input (weights are softmax probs)."""
    B, G, K = t["logits"].shape
    probs = torch.softmax(t["logits"], -1)
    total = 0
    moments = {"e2v2": 0, "M": 0, "v4": 0}
    for state in itertools.product(range(K), repeat=G):
        z = torch.zeros(G, K, dtype=F64)
        z[torch.arange(G), torch.tensor(state)] = 1.0
        w = probs[:, torch.arange(G), torch.tensor(state)].prod(-1)[:, None]      # (B, 1)
        zf = z.flatten()
        u = t["A"] @ zf + t["b"]
        v = t["C"] @ zf + t["c"]
        r2 = (t["x"] - u) ** 2
        if head == "fixed":
            total = total + w * (r2 / (2 * 0.3) + 0.5 * (LOG_2PI + math.log(0.3)))
        elif head == "logvar":
            total = total + w * 0.5 * (LOG_2PI + v + r2 * torch.exp(-v))
        else:
            moments["e2v2"] = moments["e2v2"] + w * r2 * v * v
            moments["M"] = moments["M"] + w * v * v
            moments["v4"] = moments["v4"] + w * v ** 4
    if head == "precision":    # the Taylor log term from the enumerated M = E v^2, V = Var v^2
        M, V = moments["M"], moments["v4"] - moments["M"] ** 2
        total = 0.5 * moments["e2v2"] - 0.5 * torch.log(M) + V / (4 * M * M) + 0.5 * LOG_2PI
    return total.sum(-1)


def _analytic(t, head, backend, q=None):
    q = q if q is not None else LatentMoments.categorical(logits=t["logits"])
    kwargs = {"fixed": dict(sigma2=0.3), "precision": dict(precision_weight=t["C"], precision_bias=t["c"]),
              "logvar": dict(logvar_weight=t["C"], logvar_bias=t["c"])}[head]
    return analytic_nll(t["x"], q, t["A"], t["b"], reduction="none", backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
@pytest.mark.parametrize("shape", [(2, 3, 3), (3, 2, 4), (2, 4, 2), (1, 1, 5)])
def test_every_head_against_enumeration_with_gradients(backend, head, shape):
    B, G, K = shape
    t = _problem(B, G, K, seed=G * K)
    got, want = _analytic(t, head, backend), _enumerate(t, head)
    assert rel_err(got, want) <= 1e-12
    names = [n for n in t if not (head == "fixed" and n in ("C", "c"))]
    weights = torch.linspace(0.5, 1.5, B, dtype=F64)
    g_got = torch.autograd.grad((got * weights).sum(), [t[n] for n in names])
    g_want = torch.autograd.grad((want * weights).sum(), [t[n] for n in names])
    for n, a, b in zip(names, g_got, g_want):
        assert rel_err(a, b) <= 1e-11, (n, rel_err(a, b))


@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_two_categories_agree_with_the_bernoulli_path(head):
    g = torch.Generator().manual_seed(3)
    B, d, k = 3, 4, 5
    l = 2 * torch.randn(B, d, generator=g, dtype=F64)
    x = torch.rand(B, k, generator=g, dtype=F64)
    A, C = torch.randn(k, d, generator=g, dtype=F64), 0.3 * torch.randn(k, d, generator=g, dtype=F64)
    b, c = torch.randn(k, generator=g, dtype=F64), 1 + 0.2 * torch.randn(k, generator=g, dtype=F64)
    onehot_logits = torch.stack([torch.zeros_like(l), l], dim=-1)          # (B, G=d, K=2)
    widen = lambda W: torch.stack([torch.zeros_like(W), W], dim=-1).flatten(1)  # noqa: E731
    kwargs = {"fixed": (dict(sigma2=0.3), dict(sigma2=0.3)),
              "precision": (dict(precision_weight=C, precision_bias=c, log_term="taylor"),
                            dict(precision_weight=widen(C), precision_bias=c)),
              "logvar": (dict(logvar_weight=C, logvar_bias=c), dict(logvar_weight=widen(C), logvar_bias=c))}[head]
    bern = analytic_nll(x, LatentMoments.bernoulli(logits=l), A, b, reduction="none", **kwargs[0])
    cat = analytic_nll(x, D.OneHotCategorical(logits=onehot_logits), widen(A), b, reduction="none", **kwargs[1])
    assert rel_err(cat, bern) <= 1e-12


def test_distributions_accepted_and_saturated_logits_stable():
    t = {n: v.detach() for n, v in _problem(2, 3, 3, seed=5).items()}
    t["logits"][0, 0] = torch.tensor([60.0, -60.0, 0.0], dtype=F64)
    want = _enumerate(t, "logvar")
    for dist in (D.OneHotCategorical(logits=t["logits"]), D.OneHotCategoricalStraightThrough(logits=t["logits"]),
                 D.OneHotCategorical(probs=torch.softmax(t["logits"], -1))):
        assert rel_err(_analytic(t, "logvar", "torch", q=dist), want) <= 1e-12


def test_bad_categorical_input_is_named():
    t = {n: v.detach() for n, v in _problem(2, 3, 3).items()}
    with pytest.raises(ValueError, match=r"q: latent dimension d=9 .* does not match weight shape \(5, 8\)"):
        analytic_nll(t["x"], D.OneHotCategorical(logits=t["logits"]), t["A"][:, :8], sigma2=1.0)
    probs = torch.full((2, 3, 3), 0.3, dtype=F64)
    with pytest.raises(ValueError, match=r"categorical probs: each group must sum to 1"):
        LatentMoments.categorical(probs=probs)
    with pytest.raises(ValueError, match=r"OneHotCategorical needs batch shape \(B, G\)"):
        analytic_nll(t["x"], D.OneHotCategorical(logits=t["logits"][:, 0]), t["A"][:, :3], sigma2=1.0)
    with pytest.raises(ValueError, match=r"log_term: 'exact' needs Gaussian latents .*'categorical'"):
        analytic_nll(t["x"], D.OneHotCategorical(logits=t["logits"]), t["A"], precision_weight=t["C"],
                     log_term="exact")
    with pytest.raises(ValueError, match=r"expected shape \(B=2, G, K\) with G \* K = d = 9"):
        LatentMoments(torch.zeros(2, 9, dtype=F64), torch.zeros(2, 9, dtype=F64), family="categorical",
                      params=(torch.zeros(2, 9, dtype=F64),))


KERNELS = [b for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference_in_each_dtype(backend, head, dtype):
    t = _problem(4, 5, 3, seed=21, dtype=dtype)
    t["logits"].data[0, 0] = torch.tensor([40.0, -40.0, 0.0], dtype=dtype)     # saturated group
    t64 = {n: v.detach().double().requires_grad_(True) for n, v in t.items()}
    got, want = _analytic(t, head, backend), _analytic(t64, head, "torch")
    assert got.dtype == dtype
    tol = 1e-10 if dtype == F64 else 2e-5
    assert rel_err(got, want) <= tol
    names = [n for n in t if not (head == "fixed" and n in ("C", "c"))]
    for n, a, b in zip(names, torch.autograd.grad(got.sum(), [t[n] for n in names]),
                       torch.autograd.grad(want.sum(), [t64[n] for n in names])):
        assert rel_err(a, b) <= tol, (n, rel_err(a, b))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("head", ["fixed", "precision", "logvar"])
def test_kernel_gradcheck_gradgradcheck_opcheck_compile(backend, head):
    t = _problem(2, 2, 3, seed=22)
    names = list(t)

    def f(*leaves):
        return _analytic(dict(zip(names, leaves)), head, backend)

    leaves = tuple(t.values())
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)
    d = {n: v.detach() for n, v in t.items()}
    code = {"fixed": 3, "precision": 0, "logvar": 2}[head]
    second = (None, None, torch.full((5,), 0.3, dtype=F64)) if head == "fixed" else (d["C"], d["c"], None)
    torch.library.opcheck(torch.ops.silent_kernels.categorical_nll.default,
                          (d["x"], d["logits"], d["A"], d["b"], *second, code),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    compiled = torch.compile(lambda tt: _analytic(tt, head, backend).sum(), fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(t), _analytic(t, head, backend).sum()) <= 1e-12


def test_categorical_op_refuses_a_wrong_head_combination():
    t = {n: v.detach() for n, v in _problem(2, 2, 3).items()}
    with pytest.raises(RuntimeError, match=r"head=3 \(fixed\) needs sigma2"):
        torch.ops.silent_kernels.categorical_nll(t["x"], t["logits"], t["A"], None, t["C"], None, None, 3)
