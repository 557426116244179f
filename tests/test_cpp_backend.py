"""The C++ CPU backend (``backend="cpp"``, ops in ``silent_kernels._C``) against the reference.

Tolerances (relative, max-norm: max|cpp - ref| / max|ref| per tensor):
  float64 inputs: 1e-10 against the float64 reference;
  float32 inputs: 1e-5 against the float64 reference evaluated on the same (float32) values;
  float16 / bfloat16 inputs (accumulated in float32, results rounded to the input dtype):
  the ops against the float64 reference on the same rounded values: HALF_OP_TOL, about two
  units in the output's last place (float16: 2^-11 ~ 4.9e-4, bfloat16: 2^-8 ~ 3.9e-3);
  end to end through analytic_nll, where PyTorch also computes the moments and their
  gradients in half precision: HALF_TOL.
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import distributions as D
from torch.utils._python_dispatch import TorchDispatchMode

import silent_kernels
from silent_kernels import LatentMoments, analytic_nll, reference

if os.environ.get("SILENT_KERNELS_NO_EXTENSION") == "1":  # built without the extension on purpose
    pytest.skip("silent_kernels built without its compiled extension", allow_module_level=True)

from silent_kernels import ops as sk_ops  # noqa: E402  (fails loudly when the build is broken)

OPS = torch.ops.silent_kernels
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
HALF_OP_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # ~2 units in the last place
HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}  # end to end, moments in half too
FAMILIES = ("gaussian", "bernoulli", "uniform", "laplace", "poisson", "gamma")


# ----------------------------------------------------------------------------- helpers
def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_q(family: str, enc: torch.Tensor, enc2: torch.Tensor):
    """A posterior of `family` from encoder outputs (both (B, d)); positive means keep
    E[v] = C m + b' away from 0 when there is no precision bias."""
    loc = 0.5 + enc.sigmoid()
    spread = F.softplus(enc2) + 0.1
    if family == "gaussian":
        return LatentMoments.gaussian(loc, logvar=enc2 * 0.5 - 1.0)  # k3 = k4 = None
    if family == "bernoulli":
        return LatentMoments.bernoulli(logits=enc)
    if family == "uniform":
        return D.Uniform(loc - spread, loc + spread)  # k3 None, k4 given
    if family == "laplace":
        return D.Laplace(loc, 0.5 * spread)  # k3 None, k4 given
    if family == "poisson":
        return D.Poisson(loc)
    if family == "gamma":
        return D.Gamma(2.0 + spread, 2.0 + enc.sigmoid())
    raise ValueError(family)


class Problem:
    """One test problem, generated in float64 and stored as leaves of `dtype`."""

    def __init__(self, B, d, k, *, head="precision", family="bernoulli", bias=True,
                 precision_bias=True, sigma="pixel", dtype=torch.float64, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
        self.head, self.family, self.sigma = head, family, sigma
        self.data = {
            "x": u(B, k),
            "enc": r(B, d),
            "enc2": r(B, d),
            "weight": r(k, d) / math.sqrt(d),
        }
        if bias:
            self.data["bias"] = 0.1 * r(k)
        if head == "precision":
            self.data["precision_weight"] = (0.5 + 0.5 * u(k, d)) / d + 0.2 * r(k, d) / math.sqrt(d)
            if precision_bias:
                self.data["precision_bias"] = 1.0 + u(k)
        elif sigma == "pixel":
            self.data["sigma2"] = 0.2 + u(k)
        elif sigma == "scalar":
            self.data["sigma2"] = torch.tensor(0.3, dtype=torch.float64)
        self.dtype = dtype
        self.leaves = {n: t.to(dtype) for n, t in self.data.items()}

    def run(self, backend, dtype=None, reduction="none", upstream=None, x_requires_grad=True,
            learn=True):
        """Loss and the gradients of every leaf; `dtype` = evaluate on the leaves cast to it."""
        dtype = dtype or self.dtype
        leaves = {n: t.detach().to(dtype).requires_grad_(learn or n in ("enc", "enc2"))
                  for n, t in self.leaves.items()}
        leaves["x"].requires_grad_(x_requires_grad)
        q = make_q(self.family, leaves["enc"], leaves["enc2"])
        kw = dict(reduction=reduction, backend=backend)
        if self.head == "precision":
            loss = analytic_nll(leaves["x"], q, leaves["weight"], leaves.get("bias"),
                                precision_weight=leaves["precision_weight"],
                                precision_bias=leaves.get("precision_bias"), **kw)
        else:
            sigma2 = leaves.get("sigma2", 0.25)
            loss = analytic_nll(leaves["x"], q, leaves["weight"], leaves.get("bias"), sigma2=sigma2, **kw)
        names = [n for n, t in leaves.items() if t.requires_grad]
        if loss.numel() and upstream is not None:
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], upstream.to(dtype),
                                        allow_unused=True)
        elif loss.requires_grad:
            grads = torch.autograd.grad(loss.sum(), [leaves[n] for n in names], allow_unused=True)
        else:
            grads = [None] * len(names)
        return loss, dict(zip(names, grads))


def assert_close_to_reference(p: Problem, reduction="none", upstream=None, tol=None, **kw):
    loss, grads = p.run("cpp", reduction=reduction, upstream=upstream, **kw)
    ref_loss, ref_grads = p.run("torch", dtype=torch.float64, reduction=reduction, upstream=upstream, **kw)
    tol = tol if tol is not None else TOL[p.dtype]
    assert loss.dtype == p.dtype and loss.shape == ref_loss.shape
    errors = {"loss": rel_err(loss, ref_loss)}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref = ref_grads[name]
        if ref is None:
            assert g is None or g.abs().max() == 0, name
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == p.dtype and g.shape == ref.shape, name
        errors[name] = rel_err(g, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.3g} > {tol:g} ({errors})"
    return errors


# ------------------------------------------------------------------------- availability
def test_info_reports_cpp_and_auto_picks_it_on_cpu():
    report = silent_kernels.info()
    assert report["backends"]["cpp"]["available"], report["backends"]["cpp"]
    assert report["backends"]["cpp"]["devices"] == ["cpu"]
    assert report["auto"]["cpu"] == "cpp"
    assert sk_ops.cpp_ops_registered()
    assert sk_ops.cuda_ops_registered() == torch._C._dispatch_has_kernel_for_dispatch_key(
        "silent_kernels::fixed_nll", "CUDA")


def test_auto_uses_the_cpp_op(monkeypatch):
    p = Problem(3, 4, 5)
    calls = []
    real = sk_ops.cpp_precision_nll
    monkeypatch.setattr(sk_ops, "cpp_precision_nll", lambda *a: calls.append(1) or real(*a))
    silent_kernels.backends._load.cache_clear()
    try:
        auto, _ = p.run("auto")
        cpp, _ = p.run("cpp")
    finally:
        silent_kernels.backends._load.cache_clear()
    assert calls and torch.equal(auto, cpp)


def test_linear_offset_is_int64(tmp_path):
    # Most of these offsets are beyond 2^31 (and some beyond 2^32): int32 arithmetic would wrap.
    cases = [(0, 0, 1), (3, 4, 5), (2**31 - 1, 0, 1), (2**31, 7, 1), (70_000, 65_535, 40_000),
             (46_341, 3, 46_341), (2**20, 2**20 - 1, 2**20), (123_456_789, 98_765, 12_345)]
    here = os.path.dirname(os.path.abspath(__file__))
    exe = tmp_path / "linear_offsets"
    subprocess.run(["g++", "-std=c++17", "-O2", "-I", os.path.join(here, "..", "csrc"),
                    os.path.join(here, "cpp", "linear_offsets.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], input="\n".join(f"{r} {c} {ld}" for r, c, ld in cases),
                         capture_output=True, text=True, check=True).stdout.split()
    assert [int(v) for v in out] == [r * ld + c for r, c, ld in cases]   # Python ints: exact


# ---------------------------------------------------------------- against the reference
@given(
    B=st.integers(0, 8), d=st.integers(1, 12), k=st.integers(1, 24),
    head=st.sampled_from(["precision", "fixed"]),
    family=st.sampled_from(FAMILIES),
    bias=st.booleans(), precision_bias=st.booleans(),
    sigma=st.sampled_from(["float", "scalar", "pixel"]),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_hypothesis(B, d, k, head, family, bias, precision_bias, sigma, reduction,
                                      dtype, seed):
    p = Problem(B, d, k, head=head, family=family, bias=bias, precision_bias=precision_bias,
                sigma=sigma, dtype=dtype, seed=seed)
    upstream = None
    if reduction == "none":  # a non-uniform upstream gradient per sample
        upstream = torch.linspace(-1.0, 2.0, B, dtype=torch.float64) if B else None
    assert_close_to_reference(p, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head, family, sigma", [
    ("precision", "bernoulli", None), ("precision", "gaussian", None), ("precision", "uniform", None),
    ("precision", "gamma", None), ("fixed", "gaussian", "scalar"), ("fixed", "bernoulli", "pixel"),
])
@pytest.mark.parametrize("B, d, k", [(37, 19, 131), (130, 33, 300)])
def test_larger_odd_shapes(B, d, k, head, family, sigma, dtype):
    # (130, 33, 300) spans several pixel tiles and batch chunks in the kernels.
    p = Problem(B, d, k, head=head, family=family, sigma=sigma, dtype=dtype, seed=B + k)
    upstream = torch.rand(B, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.3
    assert_close_to_reference(p, upstream=upstream)


def test_fixed_head_many_batch_chunks():
    p = Problem(700, 5, 40, head="fixed", family="gaussian", sigma="pixel", dtype=torch.float64)
    assert_close_to_reference(p, reduction="mean")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("head", ["precision", "fixed"])
def test_reductions_and_nonuniform_upstream(head, reduction):
    p = Problem(6, 5, 9, head=head, family="gamma", dtype=torch.float64, seed=3)
    upstream = torch.tensor([3.0, -1.0, 0.0, 0.5, 2.0, -4.0], dtype=torch.float64)
    errors = assert_close_to_reference(p, reduction=reduction,
                                       upstream=upstream if reduction == "none" else None)
    assert set(errors) >= {"loss", "x", "enc", "weight"}


def test_floor_on_precision_square_matches_reference():
    # Pixels whose precision head is exactly zero (C row = 0, b' = 0): M = E[v^2] = 0 is
    # clamped to PRECISION_SQ_FLOOR and its derivative dropped, as torch.clamp_min does.
    p = Problem(4, 3, 6, head="precision", family="bernoulli", dtype=torch.float64, seed=5)
    p.leaves["precision_weight"][:2] = 0.0
    p.leaves["precision_bias"][:2] = 0.0
    loss, _ = p.run("cpp")
    assert torch.isfinite(loss).all()
    assert_close_to_reference(p)


# ------------------------------------------------------------- requires_grad subsets
def test_frozen_decoder_and_detached_inputs():
    p = Problem(5, 4, 7, head="precision", family="bernoulli", dtype=torch.float64)
    # Only the encoder learns: the weights, biases and x need no gradient.
    errors = assert_close_to_reference(p, learn=False, x_requires_grad=False)
    assert set(errors) == {"loss", "enc"}  # Bernoulli uses enc only
    pf = Problem(5, 4, 7, head="fixed", family="gaussian", sigma="pixel", dtype=torch.float64)
    errors = assert_close_to_reference(pf, learn=False, x_requires_grad=False)
    assert set(errors) == {"loss", "enc", "enc2"}


class _RecordNeeds(TorchDispatchMode):
    """Records the `needs` flags of every backward op call."""

    def __init__(self):
        super().__init__()
        self.needs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("silent_kernels::") and func._schema.name.endswith("_backward"):
            self.needs.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", ["precision", "fixed"])
def test_frozen_decoder_asks_the_kernel_for_encoder_gradients_only(head):
    p = Problem(5, 4, 7, head=head, family="gamma", sigma="pixel", dtype=torch.float32)
    with _RecordNeeds() as mode:
        p.run("cpp", learn=False, x_requires_grad=False)
    assert len(mode.needs) == 1
    n = len(mode.needs[0])
    moment_slots = {1, 2, 3, 4} if head == "precision" else {1, 2}  # mean, var (, k3, k4)
    assert [i for i in range(n) if mode.needs[0][i]] == sorted(moment_slots)


def _precision_args(B=4, d=3, k=5, dtype=torch.float64, k3=True, k4=True, biases=True, seed=0):
    p = Problem(B, d, k, head="precision", family="bernoulli", bias=biases, precision_bias=biases,
                dtype=dtype, seed=seed)
    q = make_q("bernoulli", p.leaves["enc"], p.leaves["enc2"])
    L = p.leaves
    return [L["x"], q.mean, q.var, q.k3 if k3 else None, q.k4 if k4 else None, L["weight"],
            L.get("bias"), L["precision_weight"], L.get("precision_bias")]


def _fixed_args(B=4, d=3, k=5, dtype=torch.float64, bias=True, seed=0):
    p = Problem(B, d, k, head="fixed", family="gaussian", bias=bias, sigma="pixel", dtype=dtype, seed=seed)
    q = make_q("gaussian", p.leaves["enc"], p.leaves["enc2"])
    L = p.leaves
    return [L["x"], q.mean, q.var, L["weight"], L.get("bias"), L["sigma2"]]


@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_backward_op_returns_empty_where_not_needed(head):
    args = _precision_args() if head == "precision" else _fixed_args()
    backward = OPS.precision_nll_backward if head == "precision" else OPS.fixed_nll_backward
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    full = backward(grad, *args, [True] * len(args))
    for i, (g, a) in enumerate(zip(full, args)):
        assert g.shape == a.shape and g.is_contiguous(), i
    for i in range(len(args)):  # one gradient at a time: the same values, the rest empty
        needs = [j == i for j in range(len(args))]
        out = backward(grad, *args, needs)
        for j, g in enumerate(out):
            if j == i:
                torch.testing.assert_close(g, full[j], rtol=1e-12, atol=1e-14)
            else:
                assert g.shape == (0,), (i, j, g.shape)
    none = backward(grad, *args, [False] * len(args))
    assert all(g.shape == (0,) for g in none)


def test_backward_op_honours_noncontiguous_upstream_gradient():
    args = _precision_args()
    grad_full = torch.arange(8, dtype=torch.float64) - 3.0
    strided = grad_full[::2]
    assert not strided.is_contiguous()
    a = OPS.precision_nll_backward(strided, *args, [True] * 9)
    b = OPS.precision_nll_backward(strided.contiguous(), *args, [True] * 9)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ------------------------------------------------------------------- gradcheck, opcheck
@pytest.mark.parametrize("k3, k4, biases", [(True, True, True), (False, False, False), (False, True, True)])
def test_gradcheck_precision_op(k3, k4, biases):
    args = _precision_args(B=3, d=4, k=5, k3=k3, k4=k4, biases=biases, seed=2)
    inputs = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    assert torch.autograd.gradcheck(lambda *t: OPS.precision_nll(*t), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_fixed_op(bias):
    args = _fixed_args(B=3, d=4, k=5, bias=bias, seed=2)
    inputs = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    assert torch.autograd.gradcheck(lambda *t: OPS.fixed_nll(*t), inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_learnable_scalar_sigma2_through_expand():
    args = _fixed_args(B=3, d=2, k=4, seed=4)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    mean = args[1].detach().requires_grad_()
    fn = lambda m, s: OPS.fixed_nll(args[0], m, args[2], args[3], args[4], s.expand(4))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mean, s))


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("variant", ["full", "gaussian_no_bias", "k4_only"])
def test_opcheck_precision_ops(variant):
    kw = {"full": {}, "gaussian_no_bias": dict(k3=False, k4=False, biases=False),
          "k4_only": dict(k3=False)}[variant]
    args = _precision_args(**kw)
    _opcheck(OPS.precision_nll.default, args)
    grad_args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    _opcheck(OPS.precision_nll.default, grad_args)
    needs = [True, False, True, True, False, True, True, False, True]
    _opcheck(OPS.precision_nll_backward.default, [torch.ones(4, dtype=torch.float64), *args, needs])


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_fixed_ops(bias):
    args = _fixed_args(bias=bias, dtype=torch.float32)
    _opcheck(OPS.fixed_nll.default, args)
    grad_args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    _opcheck(OPS.fixed_nll.default, grad_args)
    _opcheck(OPS.fixed_nll_backward.default, [torch.rand(4), *args, [True, True, False, True, True, True]])


# ------------------------------------------------------------------------ input layouts
def test_noncontiguous_inputs_are_read_correctly():
    B, d, k = 5, 4, 7
    p = Problem(B, d, k, head="precision", family="bernoulli", dtype=torch.float64, seed=9)
    L = p.leaves
    q = make_q("bernoulli", L["enc"], L["enc2"])
    ref = reference.precision_nll(L["x"], q.mean, q.var, q.k3, q.k4, L["weight"], L["bias"],
                                  L["precision_weight"], L["precision_bias"])
    x_wide = torch.zeros(B, 2 * k, dtype=torch.float64)
    x_wide[:, ::2] = L["x"]
    x_sliced = x_wide[:, ::2]                            # strided columns
    x_t = L["x"].t().contiguous().t()                    # column-major
    moments_t = [m.t().contiguous().t() for m in (q.mean, q.var, q.k3, q.k4)]
    w_t = L["weight"].t().contiguous().t()               # .t() of a (d, k) tensor
    c_t = L["precision_weight"].t().contiguous().t()
    b_strided = torch.stack([L["bias"], L["bias"]], 1)[:, 0]
    for x in (x_sliced, x_t):
        assert not x.is_contiguous()
        out = OPS.precision_nll(x, *moments_t, w_t, b_strided, c_t, L["precision_bias"])
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    # the public API with a (B, 1, k)-shaped transposed x and the backward through it
    loss = analytic_nll(x_t, LatentMoments(*moments_t), w_t, b_strided, precision_weight=c_t,
                        precision_bias=L["precision_bias"], reduction="none", backend="cpp")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_noncontiguous_fixed_and_expanded_sigma2():
    B, d, k = 6, 3, 8
    p = Problem(B, d, k, head="fixed", family="gaussian", sigma="pixel", dtype=torch.float64, seed=4)
    L = p.leaves
    q = make_q("gaussian", L["enc"], L["enc2"])
    s = torch.tensor(0.4, dtype=torch.float64)
    ref = reference.fixed_nll(L["x"], q.mean, q.var, L["weight"], L["bias"], s.expand(k))
    x_t = L["x"].t().contiguous().t()
    w_t = L["weight"].t().contiguous().t()
    out = OPS.fixed_nll(x_t, q.mean.t().contiguous().t(), q.var, w_t, L["bias"], s.expand(k))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    grads = OPS.fixed_nll_backward(torch.ones(B, dtype=torch.float64), x_t, q.mean, q.var, w_t,
                                   L["bias"], s.expand(k), [True] * 6)
    assert grads[5].shape == (k,) and grads[5].is_contiguous()
    sr = s.clone().requires_grad_()
    reference.fixed_nll(L["x"], q.mean, q.var, L["weight"], L["bias"], sr.expand(k)).sum().backward()
    torch.testing.assert_close(grads[5].sum(), sr.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("head", ["precision", "fixed"])
def test_empty_batch(head):
    p = Problem(0, 3, 4, head=head, family="bernoulli", sigma="pixel", dtype=torch.float64)
    for reduction in ("none", "sum", "mean"):
        loss, grads = p.run("cpp", reduction=reduction)
        assert loss.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert loss.item() == 0.0
    args = _precision_args(B=0) if head == "precision" else _fixed_args(B=0)
    backward = OPS.precision_nll_backward if head == "precision" else OPS.fixed_nll_backward
    out = backward(torch.ones(0, dtype=torch.float64), *args, [True] * len(args))
    for g, a in zip(out, args):
        if a is not None:
            assert g.shape == a.shape and (g == 0).all()


@pytest.mark.parametrize("B, d, k", [(4, 1, 6), (4, 5, 1), (1, 1, 1)])
@pytest.mark.parametrize("head", ["precision", "fixed"])
def test_degenerate_sizes(B, d, k, head):
    p = Problem(B, d, k, head=head, family="gamma", sigma="scalar", dtype=torch.float64)
    assert_close_to_reference(p, upstream=torch.linspace(1.0, 2.0, B, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", ["precision", "fixed"])
def test_half_inputs_accumulate_in_float32(head, dtype):
    # The ops on float16/bfloat16 inputs against the float64 reference on the same (rounded)
    # values: the kernels accumulate in float32 and round each result to `dtype` once, so the
    # error is about one unit in the last place of the output (HALF_OP_TOL).
    B, d, k = 16, 10, 50
    args = _precision_args(B, d, k, dtype=dtype, seed=7) if head == "precision" else \
        _fixed_args(B, d, k, dtype=dtype, seed=7)
    forward = OPS.precision_nll if head == "precision" else OPS.fixed_nll
    backward = OPS.precision_nll_backward if head == "precision" else OPS.fixed_nll_backward
    ref_fn = reference.precision_nll if head == "precision" else reference.fixed_nll
    upstream = torch.linspace(0.5, 1.5, B, dtype=dtype).double()  # representable in dtype
    ref_in = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    ref_loss = ref_fn(*ref_in)
    ref_grads = torch.autograd.grad(ref_loss, [a for a in ref_in if a is not None], upstream)
    loss = forward(*args)
    grads = [g for g, a in zip(backward(upstream.to(dtype), *args, [True] * len(args)), args) if a is not None]
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    errors = [rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) <= HALF_OP_TOL[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_end_to_end(dtype):
    # Through analytic_nll the posterior's moments and their gradients are also computed by
    # PyTorch in `dtype` (e.g. sigmoid / exp and their backward), which adds its own rounding:
    # HALF_TOL is looser than HALF_OP_TOL.
    p = Problem(16, 10, 50, head="precision", family="bernoulli", dtype=dtype, seed=7)
    assert_close_to_reference(p, upstream=torch.linspace(0.5, 1.5, 16, dtype=torch.float64),
                              tol=HALF_TOL[dtype])


# ------------------------------------------------------------------------------ errors
def test_kernel_entry_checks_name_the_argument():
    args = _precision_args()
    bad = list(args)
    bad[5] = args[5][:, :2]
    with pytest.raises(RuntimeError, match=r"precision_nll: weight: expected shape \(5, 3\)"):
        OPS.precision_nll(*bad)
    bad = list(args)
    bad[2] = args[2].float()
    with pytest.raises(RuntimeError, match="var: expected dtype Double"):
        OPS.precision_nll(*bad)
    bad = list(args)
    bad[0] = args[0][0]
    with pytest.raises(RuntimeError, match="x: expected a 2-D tensor"):
        OPS.precision_nll(*bad)
    fargs = _fixed_args()
    with pytest.raises(RuntimeError, match="sigma2: expected shape"):
        OPS.fixed_nll(*fargs[:5], fargs[5][:3])
    with pytest.raises(RuntimeError, match="needs: expected 6 flags"):
        OPS.fixed_nll_backward(torch.ones(4, dtype=torch.float64), *fargs, [True] * 5)
    with pytest.raises(RuntimeError, match="grad: expected shape"):
        OPS.fixed_nll_backward(torch.ones(3, dtype=torch.float64), *fargs, [True] * 6)
    with pytest.raises(RuntimeError, match="x: expected dtype"):
        OPS.fixed_nll(fargs[0].int(), *fargs[1:])


# ------------------------------------- training pair: forward saves coefficients, backward reuses
def _train_backward_args(args):
    x, mean, var, k3, k4, weight, bias, pweight, pbias = args
    return [mean, var, k3, k4, weight, pweight]


@pytest.mark.parametrize("k3, k4, biases", [(True, True, True), (False, False, False), (False, True, True),
                                            (True, False, False)])
def test_train_ops_match_the_plain_ops(k3, k4, biases):
    args = _precision_args(B=6, d=5, k=37, k3=k3, k4=k4, biases=biases, seed=3)
    loss, coef = OPS.precision_nll_train(*args)
    torch.testing.assert_close(loss, OPS.precision_nll(*args), rtol=1e-13, atol=1e-13)
    assert coef.shape == (6 * (5 + 3 * k3 + k4) * 37,) and coef.dtype == torch.float64
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -0.25], dtype=torch.float64)
    needs = [True, True, True, k3, k4, True, biases, True, biases]
    ref = OPS.precision_nll_backward(grad, *args, needs)
    full = OPS.precision_nll_train_backward(grad, coef, *_train_backward_args(args), needs)
    for i, (a, b) in enumerate(zip(ref, full)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    for i in range(9):  # one gradient at a time: the same values, the rest empty
        one = [n and j == i for j, n in enumerate(needs)]
        out = OPS.precision_nll_train_backward(grad, coef, *_train_backward_args(args), one)
        for j, g in enumerate(out):
            if one[j]:
                torch.testing.assert_close(g, full[j], rtol=1e-12, atol=1e-14)
            else:
                assert g.shape == (0,), (i, j, g.shape)


def test_cpp_entry_uses_the_train_op_only_when_grads_are_needed():
    args = _precision_args(B=3, d=4, k=5)
    called = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Record():
        sk_ops.cpp_precision_nll(*args)  # nothing requires grad
    assert "silent_kernels::precision_nll" in called and "silent_kernels::precision_nll_train" not in called
    called.clear()
    leaf = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    with torch.no_grad(), Record():
        sk_ops.cpp_precision_nll(*leaf)
    assert "silent_kernels::precision_nll_train" not in called
    called.clear()
    with Record():
        sk_ops.cpp_precision_nll(*leaf).sum().backward()
    assert "silent_kernels::precision_nll_train" in called
    assert "silent_kernels::precision_nll_train_backward" in called
    assert "silent_kernels::precision_nll_backward" not in called


@pytest.mark.parametrize("k3, k4, biases", [(True, True, True), (False, False, False), (False, True, True)])
def test_gradcheck_train_op(k3, k4, biases):
    args = _precision_args(B=3, d=4, k=5, k3=k3, k4=k4, biases=biases, seed=2)
    inputs = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    assert torch.autograd.gradcheck(lambda *t: OPS.precision_nll_train(*t)[0], inputs, eps=1e-6, atol=1e-7)
    # reduction="none" with a non-uniform upstream gradient through the cpp entry point
    assert torch.autograd.gradcheck(lambda *t: sk_ops.cpp_precision_nll(*t) * torch.tensor(
        [1.0, -2.0, 0.5], dtype=torch.float64), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["full", "gaussian_no_bias", "k4_only"])
def test_opcheck_train_ops(variant):
    kw = {"full": {}, "gaussian_no_bias": dict(k3=False, k4=False, biases=False),
          "k4_only": dict(k3=False)}[variant]
    args = _precision_args(**kw)
    _opcheck(OPS.precision_nll_train.default, args)
    grad_args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    _opcheck(OPS.precision_nll_train.default, grad_args)
    _, coef = OPS.precision_nll_train(*args)
    needs = [True, False, True, True, False, True, True, False, True]
    _opcheck(OPS.precision_nll_train_backward.default,
             [torch.ones(4, dtype=torch.float64), coef, *_train_backward_args(args), needs])


def test_train_backward_checks_the_coefficients():
    args = _precision_args()
    _, coef = OPS.precision_nll_train(*args)
    rest = _train_backward_args(args)
    with pytest.raises(RuntimeError, match="coefficients: expected a 1-D tensor of"):
        OPS.precision_nll_train_backward(torch.ones(4, dtype=torch.float64), coef[:-1], *rest, [True] * 9)
    with pytest.raises(RuntimeError, match="coefficients: expected dtype"):
        OPS.precision_nll_train_backward(torch.ones(4, dtype=torch.float64), coef.float(), *rest, [True] * 9)


@pytest.mark.parametrize("scale", [0.0, 1e-7, 1e-3, 1.0, 1e3, 1e8])
def test_float32_log_term_over_a_wide_range_of_precisions(scale):
    # The float32 kernels take log M with their own vectorised log: M from the floor (1e-12)
    # to ~1e17 must give the float64 loss to float32 accuracy, in both forward ops.
    g = torch.Generator().manual_seed(1)
    B, d, k = 16, 8, 333
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [r(B, k), r(B, d), 0.1 * r(B, d), None, None, n(k, d), None, scale * n(k, d), scale * n(k)]
    l64 = OPS.precision_nll(*args)
    args32 = [a.float() if a is not None else None for a in args]
    for l32 in (OPS.precision_nll(*args32), OPS.precision_nll_train(*args32)[0]):
        torch.testing.assert_close(l32.double(), l64, rtol=2e-6, atol=0)
