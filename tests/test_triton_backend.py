"""The Triton backend against the pure-torch reference.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernels), on small shapes.

Error measure: normwise relative error max|actual - expected| / max|expected| per tensor
(per-sample loss, or one gradient), against the reference in float64 evaluated on the
very same input values (low-precision inputs are upcast exactly). Tolerances:
float32 1e-5 (or twice the fp32 reference's own error where the data make even that
miss 1e-5, see ``compare``); float64 1e-12; float16 6e-4 and bfloat16 5e-3 (1.25 units of
roundoff of the output dtype: the kernels accumulate in fp32 and round once, to nearest,
on store), and for those two also: no worse than the exact answer rounded to the dtype,
plus 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll, reference

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from silent_kernels import triton_common, triton_ops  # noqa: E402  (after TRITON_INTERPRET is set; registers the ops)
from silent_kernels.triton_common import offsets, plane, tile_index  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.silent_kernels
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 6e-4, torch.bfloat16: 5e-3}
FAMILIES = ("gaussian", "bernoulli", "uniform")
SIGMA_KINDS = ("float", "scalar", "pixel")


# ------------------------------------------------------------------------ helpers
def rel_err(actual, expected) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


def assert_rel(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
    return err


def make_leaves(family, head, B, k, d, *, bias=True, pbias=True, sigma_kind="pixel", seed=0):
    """The float64 leaf tensors of one case (encoder parameters, decoder parameters, data)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    leaves = {"x": rnd(B, k)}
    if family == "gaussian":
        leaves.update(mu=rnd(B, d), logvar=rnd(B, d, scale=0.3))
    elif family == "bernoulli":
        leaves.update(logits=rnd(B, d, scale=1.5))
    elif family == "uniform":
        leaves.update(low=rnd(B, d), logwidth=rnd(B, d, scale=0.3))
    else:
        raise ValueError(family)
    s = 1.0 / math.sqrt(d) if d else 1.0
    leaves["weight"] = rnd(k, d, scale=s)
    if bias:
        leaves["bias"] = rnd(k, scale=0.5)
    if head == "fixed":
        if sigma_kind == "scalar":
            leaves["sigma2"] = torch.tensor(0.7, dtype=torch.float64)
        elif sigma_kind == "pixel":
            leaves["sigma2"] = torch.rand(k, generator=g, dtype=torch.float64) + 0.4
    else:
        # precision v = C z + b': keep E[v^2] away from 0 so the loss is well conditioned
        leaves["precision_weight"] = rnd(k, d, scale=0.4 * s, shift=0.0 if pbias else 0.6 * s)
        if pbias:
            leaves["precision_bias"] = rnd(k, scale=0.3, shift=1.2)
    return leaves


def build_q(family, t):
    if family == "gaussian":
        return LatentMoments.gaussian(t["mu"], logvar=t["logvar"])
    if family == "bernoulli":
        return LatentMoments.bernoulli(logits=t["logits"])
    return LatentMoments.from_distribution(D.Uniform(t["low"], t["low"] + t["logwidth"].exp()))


def run_loss(leaves, family, head, *, backend, dtype, reduction="none", requires=None, upstream=None,
             sigma_kind="pixel", device=DEVICE):
    """Loss (and grads of the leaves in `requires`) through the public analytic_nll."""
    requires = set(leaves) if requires is None else set(requires)
    t = {n: v.detach().to(device=device, dtype=dtype).clone().requires_grad_(n in requires)
         for n, v in leaves.items()}
    q = build_q(family, t)
    if head == "fixed":
        sigma2 = t["sigma2"] if sigma_kind != "float" else 0.7
        loss = analytic_nll(t["x"], q, t["weight"], t.get("bias"), sigma2=sigma2,
                            reduction=reduction, backend=backend)
    else:
        loss = analytic_nll(t["x"], q, t["weight"], t.get("bias"),
                            precision_weight=t["precision_weight"], precision_bias=t.get("precision_bias"),
                            reduction=reduction, backend=backend)
    grads = {}
    if requires & set(t):
        out = loss if upstream is None or reduction != "none" else loss * upstream.to(device, dtype)
        out.sum().backward()
        grads = {n: t[n].grad for n in sorted(requires & set(t))}
    return loss.detach(), grads


def compare(leaves, family, head, *, dtype=torch.float32, tol=None, **kw):
    """Triton at `dtype` vs the reference in float64, through analytic_nll (loss and the
    gradients of every leaf in `requires`); returns the largest error seen.

    float32 only: where the fp32 *reference* itself misses `tol` (a gradient that is a
    cancellation of much larger terms, e.g. one pixel, one latent), no fp32 implementation
    can meet it, so the bar becomes twice the fp32 reference's own error there.
    """
    assert dtype in (torch.float32, torch.float64), "fp16 / bf16: see check_ops_low_precision"
    tol = TOL[dtype] if tol is None else tol
    lt, gt = run_loss(leaves, family, head, backend="triton", dtype=dtype, **kw)
    cpu_kw = {**kw, "device": "cpu"}
    lr, gr = run_loss(leaves, family, head, backend="torch", dtype=torch.float64, **cpu_kw)
    l32, g32 = (run_loss(leaves, family, head, backend="torch", dtype=torch.float32, **cpu_kw)
                if dtype == torch.float32 else (None, {}))

    def check(actual, expected, ref32, what):
        bar = tol if ref32 is None else max(tol, 2 * rel_err(ref32, expected))
        err = assert_rel(actual, expected, bar, what)
        if err <= tol:
            WORST[f"{dtype} (well-conditioned)"] = max(WORST.get(f"{dtype} (well-conditioned)", 0.0), err)
        else:
            ILL_CONDITIONED.append((what, f"{err:.2e}", f"fp32 reference {rel_err(ref32, expected):.2e}"))
        return err

    assert lt.dtype == dtype and lt.shape == lr.shape
    worst = check(lt, lr, l32, f"{head}/{family} loss")
    assert set(gt) == set(gr)
    for name in gr:
        assert gt[name] is not None and gt[name].dtype == dtype, name
        worst = max(worst, check(gt[name], gr[name], g32.get(name), f"{head}/{family} d{name}"))
    WORST[dtype] = max(WORST.get(dtype, 0.0), worst)
    return worst


WORST: dict = {}  # largest error seen per dtype (reported by -s via the last test)
ILL_CONDITIONED: list = []  # fp32 comparisons that needed the fp32-reference bar


# --------------------------------------------------------------- index arithmetic
def tile_offsets(pid: int, block: int, col: int, stride_r: int, stride_c: int,
                 plane_index: int = 0, plane_stride: int = 0) -> list[int]:
    """Plain-Python twin of ``plane + offsets(tile_index(pid, block), col)``: the exact
    (unbounded) offsets the kernels compute."""
    return [plane_index * plane_stride + (pid * block + i) * stride_r + col * stride_c for i in range(block)]


@triton.jit(do_not_specialize=["pid"])  # a pid of 1 must stay a tensor, as program_id is
def _offset_probe_kernel(out_ptr, pid, col, stride_r, stride_c, plane_stride,
                         PLANE: tl.constexpr, BLOCK: tl.constexpr):
    rows = tile_index(pid, BLOCK)
    cols = tl.full([1], 0, tl.int32) + col
    offs = offsets(rows, cols, stride_r, stride_c) + plane(PLANE, plane_stride)  # (BLOCK, 1)
    tl.store(out_ptr + tl.arange(0, BLOCK)[:, None], offs)


def probe_offsets(pid, block, col, stride_r, stride_c, plane_index=0, plane_stride=0, device="cpu"):
    """Run the kernels' index helpers for one tile with the given (int32-sized) program id and
    strides and return the int64 offsets they produce; no big tensor is needed."""
    out = torch.empty(block, dtype=torch.int64, device=device)
    _offset_probe_kernel[(1,)](out, pid, col, stride_r, stride_c, plane_stride, PLANE=plane_index, BLOCK=block)
    return out


@pytest.mark.parametrize("pid,block,col,stride_r,stride_c,plane,plane_stride", [
    (3, 16, 5, 7, 1, 0, 0),                         # small: sanity
    (2**25, 128, 3, 1, 1, 0, 0),                    # pid * BLOCK = 2^32 (int32 program-id overflow)
    (70_000, 64, 11, 1000, 1, 0, 0),                # row * stride ~ 4.5e9
    (5, 16, 2**30 + 5, 3, 2, 0, 0),                 # column * stride beyond 2^31
    (1, 16, 0, 1, 1, 9, 2**30 - 1),                 # plane 9 of a (planes, B, k) buffer, B*k ~ 2^30
    (3, 16, 0, 1, 1, 2, 1),                         # plane stride specialised to 1 on GPU
])
def test_offsets_beyond_int32(pid, block, col, stride_r, stride_c, plane, plane_stride):
    got = probe_offsets(pid, block, col, stride_r, stride_c, plane, plane_stride, device=DEVICE)
    want = tile_offsets(pid, block, col, stride_r, stride_c, plane, plane_stride)
    assert got.dtype == torch.int64
    assert got.cpu().tolist() == want


# ------------------------------------------------------------ hypothesis sweeps
shape_st = st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(1, 10))


@settings(max_examples=8, deadline=None)
@given(shape=shape_st, family=st.sampled_from(FAMILIES), bias=st.booleans(),
       sigma_kind=st.sampled_from(SIGMA_KINDS), reduction=st.sampled_from(("none", "sum", "mean")),
       seed=st.integers(0, 2**16))
def test_fixed_matches_reference(shape, family, bias, sigma_kind, reduction, seed):
    B, k, d = shape
    leaves = make_leaves(family, "fixed", B, k, d, bias=bias, sigma_kind=sigma_kind, seed=seed)
    upstream = torch.linspace(-1.0, 2.0, B, dtype=torch.float64)
    compare(leaves, family, "fixed", sigma_kind=sigma_kind, reduction=reduction, upstream=upstream)


@settings(max_examples=8, deadline=None)
@given(shape=shape_st, family=st.sampled_from(FAMILIES), bias=st.booleans(), pbias=st.booleans(),
       reduction=st.sampled_from(("none", "sum", "mean")), seed=st.integers(0, 2**16))
def test_precision_matches_reference(shape, family, bias, pbias, reduction, seed):
    B, k, d = shape
    leaves = make_leaves(family, "precision", B, k, d, bias=bias, pbias=pbias, seed=seed)
    upstream = torch.linspace(-1.0, 2.0, B, dtype=torch.float64)
    compare(leaves, family, "precision", reduction=reduction, upstream=upstream)


# ------------------------------------------------------------- fixed odd shapes
ODD_SHAPES = [(1, 1, 1), (3, 1, 4), (2, 5, 1), (70, 3, 2), (2, 130, 3), (3, 6, 70)]


@pytest.mark.parametrize("B,k,d", ODD_SHAPES)
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "bernoulli"),
                                         ("precision", "uniform")])
def test_odd_shapes(B, k, d, head, family):
    """k = 1, d = 1, and batch / pixel / latent counts that leave ragged last tiles
    (the interpreter's blocks cap at 64 samples, 128 pixels, 64 latents)."""
    leaves = make_leaves(family, head, B, k, d, seed=B * 1000 + k * 10 + d)
    compare(leaves, family, head, upstream=torch.linspace(0.5, 1.5, B, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "gaussian"),
                                         ("precision", "bernoulli")])
def test_gpu_block_table(monkeypatch, dtype, head, family):
    """The GPU block configurations (smaller tiles than the interpreter's), run here with
    several ragged tiles along every dimension of every kernel."""
    monkeypatch.setattr(triton_common, "_sized_to_problem", lambda device: False)
    leaves = make_leaves(family, head, 37, 70, 35, seed=41)
    compare(leaves, family, head, dtype=dtype, upstream=torch.linspace(-1.0, 1.0, 37, dtype=torch.float64))


@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "gaussian"),
                                         ("precision", "bernoulli")])
def test_float64(head, family):
    leaves = make_leaves(family, head, 5, 23, 7, seed=3)
    compare(leaves, family, head, dtype=torch.float64)


@pytest.mark.parametrize("head", ["fixed", "precision"])
@pytest.mark.parametrize("family", FAMILIES)
def test_empty_batch(head, family):
    leaves = make_leaves(family, head, 0, 6, 3, seed=1)
    for reduction in ("none", "sum", "mean"):
        lt, gt = run_loss(leaves, family, head, backend="triton", dtype=torch.float32, reduction=reduction)
        lr, gr = run_loss(leaves, family, head, backend="torch", dtype=torch.float32, reduction=reduction,
                          device="cpu")
        assert lt.shape == lr.shape and torch.equal(lt.cpu(), lr)
        for name in gr:
            assert gt[name].shape == gr[name].shape
            assert torch.equal(gt[name].cpu(), gr[name]), name


# ----------------------------------------------------- gradients on input subsets
FIXED_SUBSETS = [("x",), ("mu", "logvar"), ("weight",), ("bias",), ("sigma2",), ("logvar", "sigma2"),
                 ("weight", "sigma2"), ("mu",)]
PRECISION_SUBSETS = [("x",), ("logits",), ("weight",), ("precision_weight",), ("bias", "precision_bias"),
                     ("precision_weight", "precision_bias"), ("logits", "weight")]


@pytest.mark.parametrize("requires", FIXED_SUBSETS)
def test_fixed_requires_grad_subsets(requires):
    leaves = make_leaves("gaussian", "fixed", 4, 9, 3, seed=11)
    compare(leaves, "gaussian", "fixed", requires=requires,
            upstream=torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("requires", PRECISION_SUBSETS)
def test_precision_requires_grad_subsets(requires):
    leaves = make_leaves("bernoulli", "precision", 4, 9, 3, seed=12)
    compare(leaves, "bernoulli", "precision", requires=requires,
            upstream=torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))


def _op_inputs(head, family="bernoulli", B=3, k=7, d=4, dtype=torch.float32, seed=5, bias=True, pbias=True):
    leaves = make_leaves(family, head, B, k, d, bias=bias, pbias=pbias, seed=seed)
    t = {n: v.to(DEVICE, dtype) for n, v in leaves.items()}
    q = build_q(family, t)
    if head == "fixed":
        return [t["x"], q.mean, q.var, t["weight"], t.get("bias"), t["sigma2"]]
    return [t["x"], q.mean, q.var, q.k3, q.k4, t["weight"], t.get("bias"), t["precision_weight"],
            t.get("precision_bias")]


@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_backward_op_contract(head):
    """Each needs flag alone: that gradient (vs autograd of the reference) and (0,) elsewhere;
    a needs flag on a None input gives an empty tensor too."""
    inputs = _op_inputs(head, "uniform" if head == "precision" else "gaussian", bias=False)
    fwd_ref = reference.fixed_nll if head == "fixed" else reference.precision_nll
    bwd = OPS.triton_fixed_nll_backward if head == "fixed" else OPS.triton_precision_nll_backward
    grad = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    for i, t in enumerate(inputs):
        needs = [j == i for j in range(len(inputs))]
        outs = bwd(grad, *inputs, needs)
        assert len(outs) == len(inputs)
        for j, (o, inp) in enumerate(zip(outs, inputs)):
            if j == i and inp is not None:
                ref_in = [None if u is None else u.detach().double().cpu().requires_grad_(n == i)
                          for n, u in enumerate(inputs)]
                (fwd_ref(*ref_in) * grad.double().cpu()).sum().backward()
                assert o.shape == inp.shape and o.dtype == inp.dtype
                assert_rel(o, ref_in[i].grad, TOL[torch.float32], f"input {i}")
            else:
                assert o.shape == (0,) and o.dtype == grad.dtype


# --------------------------------------------------------- layouts and families
def test_non_contiguous_inputs():
    """Transposed, strided and stride-0 views are read through their strides (no misreads)."""
    B, k, d = 4, 11, 5
    g = torch.Generator().manual_seed(7)

    def base(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(DEVICE).requires_grad_()

    views = [
        base(k, B).t(),                                  # x (B, k), strides (1, B)
        base(B, 2 * d)[:, ::2],                          # mean, column stride 2
        base(d, B).t().exp(),                            # var, transposed
        base(B, d, 3)[..., 1],                           # k3, inner stride 3
        -base(2 * B, d)[::2].abs(),                      # k4, row stride 2d
        base(d, k, scale=0.3).t(),                       # weight (k, d), strides (1, k)
        base(2 * k)[::2],                                # bias, stride 2
        base(k, 3 * d, scale=0.2)[:, 1::3],              # precision_weight, column stride 3
        base(1, shift=1.5).expand(k),                    # precision_bias, stride 0
        (base((), scale=0.1, shift=0.8)).expand(k),      # sigma2, stride 0
    ]
    for v in views:
        v.retain_grad()
    for i in (0, 1, 2, 3, 5, 6, 7, 8, 9):
        assert not views[i].is_contiguous(), i
    ref = [v.detach().double().cpu().contiguous().requires_grad_() for v in views]
    up = torch.arange(1.0, B + 1)

    prec = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    lt = triton_ops.triton_precision_nll(*[views[i] for i in prec])
    lr = reference.precision_nll(*[ref[i] for i in prec])
    assert_rel(lt, lr, TOL[torch.float32], "precision loss")
    (lt * up.to(DEVICE)).sum().backward(retain_graph=True)  # the views are reused below
    (lr * up.double()).sum().backward()
    for i in prec:
        assert_rel(views[i].grad, ref[i].grad, TOL[torch.float32], f"precision input {i}")

    for v in views + ref:
        v.grad = None
    fixed = [0, 1, 2, 5, 6, 9]
    lt = triton_ops.triton_fixed_nll(*[views[i] for i in fixed])
    lr = reference.fixed_nll(*[ref[i] for i in fixed])
    assert_rel(lt, lr, TOL[torch.float32], "fixed loss")
    (lt * up.to(DEVICE)).sum().backward()
    (lr * up.double()).sum().backward()
    for i in fixed:
        assert_rel(views[i].grad, ref[i].grad, TOL[torch.float32], f"fixed input {i}")


def test_absent_cumulants_equal_zero_cumulants():
    """k3/k4 = None (the compiled-out path) gives what explicit zero tensors give."""
    inputs = _op_inputs("precision", "gaussian")
    zeros = torch.zeros_like(inputs[1])
    with_none = OPS.triton_precision_nll(*inputs)
    with_zeros = OPS.triton_precision_nll(*inputs[:3], zeros, zeros, *inputs[5:])
    assert_rel(with_none, with_zeros, 1e-6)
    grad = torch.tensor([1.0, 2.0, -1.0], device=DEVICE)
    needs = [True] * 9
    a = OPS.triton_precision_nll_backward(grad, *inputs, needs)
    b = OPS.triton_precision_nll_backward(grad, *inputs[:3], zeros, zeros, *inputs[5:], needs)
    for i in (0, 1, 2, 5, 6, 7, 8):
        assert_rel(a[i], b[i], 1e-6, f"input {i}")
    assert a[3].numel() == 0 and a[4].numel() == 0


def test_precision_floor():
    """Pixels whose precision head is exactly 0 (E[v^2] = 0 < floor): same clamped loss and
    the same dropped gradient through M as the reference."""
    leaves = make_leaves("bernoulli", "precision", 3, 8, 4, seed=21)
    leaves["precision_weight"][:3] = 0.0
    leaves["precision_bias"][:3] = 0.0
    compare(leaves, "bernoulli", "precision", upstream=torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64))


def check_ops_low_precision(head, family, dtype, B, k, d, seed, device=DEVICE):
    """Op-level comparison for fp16 / bf16 inputs (the cumulants are inputs, so the
    encoder-side moment maps, which torch evaluates in the low dtype, do not blur it)
    against the float64 reference on the very same rounded values: per-sample loss and
    every gradient within TOL[dtype] and no worse than the exact answer rounded to dtype
    (+1e-5 for the fp32 accumulation)."""
    inputs = [t.to(device, dtype) if t is not None else None
              for t in _op_inputs(head, family, B=B, k=k, d=d, seed=seed)]
    ref_in = [t.double().cpu().requires_grad_() if t is not None else None for t in inputs]
    grad = torch.linspace(-1.0, 2.0, B, device=device).to(dtype)
    fwd, bwd, ref = ((OPS.triton_fixed_nll, OPS.triton_fixed_nll_backward, reference.fixed_nll)
                     if head == "fixed" else
                     (OPS.triton_precision_nll, OPS.triton_precision_nll_backward, reference.precision_nll))
    loss = fwd(*inputs)
    expected = ref(*ref_in)
    (expected * grad.double().cpu()).sum().backward()
    assert loss.dtype == dtype

    def check(actual, exact, what):
        err = assert_rel(actual, exact, TOL[dtype], what)
        rounding = rel_err(exact.to(dtype), exact)  # the error of the correctly rounded answer
        assert err <= rounding + 1e-5, f"{what}: error {err:.3g} vs {rounding:.3g} from rounding alone"
        return err

    worst = check(loss, expected, "loss")
    grads = bwd(grad, *inputs, [t is not None for t in inputs])
    for i, (g, r) in enumerate(zip(grads, ref_in)):
        if r is not None:
            assert g.dtype == dtype and g.shape == r.shape
            worst = max(worst, check(g, r.grad, f"input {i}"))
    WORST[dtype] = max(WORST.get(dtype, 0.0), worst)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "gaussian"),
                                         ("precision", "bernoulli"), ("precision", "uniform")])
def test_low_precision_inputs(dtype, head, family):
    """fp16 / bf16 inputs, fp32 accumulation, outputs in the input dtype."""
    check_ops_low_precision(head, family, dtype, B=4, k=19, d=6, seed=31)


# ----------------------------------------------------------------------- TF32 trap
def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 explicit mantissa bits), as tensor cores do."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_trap_case(B=8, k=64, d=64, device=DEVICE):
    """Fixed head, data a small residual away from a mean built of values that TF32 cannot
    represent: the squared residual is the whole loss (after the constants), so rounding the
    GEMM inputs to TF32 moves the loss by far more than the fp32 tolerance."""
    g = torch.Generator().manual_seed(123)
    mean = (1.0 + torch.rand(B, d, generator=g, dtype=torch.float64) * 2**-9).float().double()
    weight = (1.0 + torch.rand(k, d, generator=g, dtype=torch.float64) * 2**-9).float().double() / d
    var = torch.full((B, d), 1e-6, dtype=torch.float64)
    resid = 1e-3 * torch.randn(B, k, generator=g, dtype=torch.float64)
    x = (mean @ weight.t() + resid).float().double()
    sigma2 = torch.full((k,), 1e-6, dtype=torch.float64)
    return [t.to(device) for t in (x, mean, var, weight)], sigma2.to(device)


def test_tf32_trap_is_a_trap():
    """The reference with TF32-rounded GEMM inputs misses the fp32 tolerance on this case,
    while the Triton kernels (ieee fp32 dots) meet it."""
    (x, mean, var, weight), sigma2 = tf32_trap_case(device="cpu")
    exact = reference.fixed_nll(x, mean, var, weight, None, sigma2)
    tf32 = reference.fixed_nll(x, _tf32(mean).double(), var, _tf32(weight).double(), None, sigma2)
    assert rel_err(tf32, exact) > 100 * TOL[torch.float32]
    (x, mean, var, weight), sigma2 = tf32_trap_case()
    got = OPS.triton_fixed_nll(x.float(), mean.float(), var.float(), weight.float(), None, sigma2.float())
    assert_rel(got, exact, TOL[torch.float32], "tf32 trap")


# ------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    fixed = _op_inputs("fixed", "gaussian", B=2, k=5, d=3)
    fixed_nobias = _op_inputs("fixed", "gaussian", B=2, k=5, d=3, bias=False)
    prec_b = _op_inputs("precision", "bernoulli", B=2, k=5, d=3)
    prec_u = _op_inputs("precision", "uniform", B=2, k=5, d=3, bias=False, pbias=False)
    return fixed, fixed_nobias, prec_b, prec_u


def test_opcheck():
    fixed, fixed_nobias, prec_b, prec_u = _opcheck_samples()

    def grad_on(inputs):
        return [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]

    grad = torch.tensor([1.0, -0.5], device=DEVICE)
    for inputs in (fixed, fixed_nobias):
        torch.library.opcheck(OPS.triton_fixed_nll.default, grad_on(inputs))
        torch.library.opcheck(OPS.triton_fixed_nll_backward.default, [grad, *inputs, [True] * 6])
    torch.library.opcheck(OPS.triton_fixed_nll_backward.default,
                          [grad, *fixed, [False, True, False, True, False, True]])
    for inputs in (prec_b, prec_u):
        torch.library.opcheck(OPS.triton_precision_nll.default, grad_on(inputs))
        torch.library.opcheck(OPS.triton_precision_nll_backward.default, [grad, *inputs, [True] * 9])
    torch.library.opcheck(OPS.triton_precision_nll_backward.default,
                          [grad, *prec_b, [True, False, True, False, True, False, True, False, True]])


def test_public_function_api():
    """The ops are also reachable through the shared autograd.Function wrappers."""
    from silent_kernels.autograd import FixedNLLFunction, PrecisionNLLFunction

    fixed = _op_inputs("fixed", "gaussian")
    prec = _op_inputs("precision", "bernoulli")
    assert_rel(FixedNLLFunction.apply(*fixed, "triton"), reference.fixed_nll(*[t.double().cpu() if t is not None
                                                                              else None for t in fixed]), 1e-5)
    assert_rel(PrecisionNLLFunction.apply(*prec, "triton"),
               reference.precision_nll(*[t.double().cpu() if t is not None else None for t in prec]), 1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """analytic_nll(backend="triton") inside torch.compile(fullgraph=True) gives the eager
    loss and gradients (the fake kernels and the autograd registration at work)."""
    g = torch.Generator().manual_seed(3)
    B, k, d = 3, 10, 4

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    x, bc = rnd(B, k), rnd(k, scale=0.1) + 1.0
    params = [rnd(B, d), rnd(B, d, scale=0.3), rnd(k, d, scale=0.5), rnd(k, d, scale=0.2), rnd(()).abs() + 0.5]

    def loss_fn(mu, logvar, weight, pweight, sigma2):
        q = LatentMoments.gaussian(mu, logvar=logvar)
        fixed = analytic_nll(x, q, weight, sigma2=sigma2, reduction="sum", backend="triton")
        prec = analytic_nll(x, q, weight, precision_weight=pweight, precision_bias=bc, backend="triton")
        return fixed + prec

    results = []
    for fn in (torch.compile(loss_fn, fullgraph=True), loss_fn):
        leaves = [p.clone().requires_grad_() for p in params]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in leaves]))
    (compiled, compiled_grads), (eager, eager_grads) = results
    assert_rel(compiled, eager, 1e-6, "loss")
    for i, (a, b) in enumerate(zip(compiled_grads, eager_grads)):
        assert_rel(a, b, 1e-6, f"grad {i}")


# ------------------------------------------------------ GPU build check (no GPU needed)
_COMPILE_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from silent_kernels import triton_common as common
assert not common.INTERPRET
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ACC_PTRS = ("g_ptr", "part_ptr", "db_ptr", "dbc_ptr", "ds_ptr", "dh0_ptr")  # buffers in the accumulation dtype
PTR = {"float32": "*fp32", "float64": "*fp64", "bfloat16": "*bf16"}
res = {}
for i, (module, name, kind, dtype, arch, consts) in enumerate(json.loads(sys.argv[1])):
    mod = importlib.import_module("silent_kernels." + module)
    fn = getattr(mod, name)
    dt = getattr(torch, dtype)
    acc_tl, _ = common.acc_dtypes(dt)
    cfg = common.block_config(mod.GPU_CONFIGS, kind, 4096, 4096, 4096, dt, torch.device("cuda"),
                              lo=getattr(mod, "MIN_BLOCK", 16))
    meta = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    consts = dict(consts, ACC=acc_tl, **cfg)
    sig = {a: "constexpr" if a in consts else
              (PTR["float64" if dtype == "float64" else "float32"] if a in ACC_PTRS else PTR[dtype])
              if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                    constexprs={a: v for a, v in consts.items() if a in fn.arg_names})
    binary = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=meta)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(binary.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    res[f"{i}:{name}/{kind}/{dtype}/sm_{arch}"] = [
        int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))]
print(json.dumps(res))
"""

_BERNOULLI = dict(HAS_K3=True, HAS_K4=True, P_K3=5, P_K4=8)
_PREC_GRAD = dict(HAS_BIAS=True, HAS_PBIAS=True, GRAD=True, STORE_G=True, NEED_X=True, NEED_B=True, NEED_BC=True)
_PREC_FWD = dict(HAS_BIAS=True, HAS_PBIAS=True, GRAD=False, STORE_G=False, NEED_X=False, NEED_B=False,
                 NEED_BC=False)
_GAUSS = dict(HAS_K3=False, HAS_K4=False, P_K3=5, P_K4=5)
_LOGVAR_GRAD = dict(HAS_BIAS=True, HAS_H0=True, GRAD=True, STORE_G=True, NEED_X=True, NEED_B=True, NEED_H0=True)
_COMPILE_CASES = [
    ("triton_fixed", "_fixed_fwd_kernel", "fixed", "float32", 90, dict(HAS_BIAS=True)),
    ("triton_precision", "_precision_fwd_kernel", "prec", "float32", 90, dict(_BERNOULLI, HEAD=0, **_PREC_GRAD)),
    ("triton_precision", "_precision_moment_grad_kernel", "mom", "float32", 90,
     dict(NEED_M=True, NEED_K2=True, NEED_K3=True, NEED_K4=True, P_K3=5, P_K4=8)),
    ("triton_precision", "_precision_weight_grad_kernel", "w", "float32", 90,
     dict(_BERNOULLI, NEED_A=True, NEED_C=True)),
    ("triton_precision", "_precision_fwd_kernel", "prec", "float64", 90, dict(_BERNOULLI, HEAD=0, **_PREC_FWD)),
    ("triton_precision", "_precision_moment_grad_kernel", "mom", "bfloat16", 80,
     dict(NEED_M=True, NEED_K2=True, NEED_K3=True, NEED_K4=True, P_K3=5, P_K4=8)),
    # the new heads: the exact log term's float64 series and the log-variance epilogue
    ("triton_precision", "_precision_fwd_kernel", "prec_exact", "float32", 90, dict(_GAUSS, HEAD=1, **_PREC_FWD)),
    ("triton_precision", "_precision_fwd_kernel", "prec_exact", "float32", 90, dict(_GAUSS, HEAD=1, **_PREC_GRAD)),
    ("triton_precision", "_precision_fwd_kernel", "prec_exact", "float64", 90, dict(_GAUSS, HEAD=1, **_PREC_GRAD)),
    ("triton_precision", "_precision_fwd_kernel", "prec_g", "float32", 90, dict(_GAUSS, HEAD=2, **_PREC_GRAD)),
    ("triton_precision", "_precision_fwd_kernel", "prec_g", "float32", 90, dict(_GAUSS, HEAD=2, **_PREC_FWD)),
    # the fused Bernoulli log-variance kernels
    ("triton_logvar", "_fwd_kernel", "fwd", "float32", 90,
     dict(HAS_BIAS=True, HAS_H0=True, GRAD=False, STORE_G=False, NEED_X=False, NEED_B=False, NEED_H0=False)),
    ("triton_logvar", "_fwd_kernel", "fwd", "float32", 90, _LOGVAR_GRAD),
    ("triton_logvar", "_fwd_kernel", "fwd", "float64", 90, _LOGVAR_GRAD),
    ("triton_logvar", "_logits_grad_kernel", "logits", "float32", 90, {}),
    ("triton_logvar", "_logits_grad_kernel", "logits", "float64", 90, {}),
    ("triton_logvar", "_weight_grad_kernel", "w", "float32", 90, dict(NEED_A=True, NEED_H=True)),
    ("triton_logvar", "_weight_grad_kernel", "w", "float64", 90, dict(NEED_A=True, NEED_H=True)),
    ("triton_logvar", "_weight_grad_kernel", "w", "bfloat16", 80, dict(NEED_A=True, NEED_H=True)),
    ("triton_logvar", "_weight_grad_kernel", "w", "float32", 90, dict(NEED_A=False, NEED_H=True)),
    ("triton_logvar", "_weight_grad_kernel", "w", "float32", 90, dict(NEED_A=True, NEED_H=False)),
    ("triton_logvar", "_fwd_kernel", "fwd", "bfloat16", 80,
     dict(HAS_BIAS=False, HAS_H0=False, GRAD=True, STORE_G=False, NEED_X=True, NEED_B=False, NEED_H0=False)),
]


@pytest.mark.slow
def test_kernels_build_for_gpu_without_spills():
    """Ahead-of-time compile of the heaviest kernel variants with their GPU block
    configurations for sm_90 / sm_80 (runs without a GPU: Triton's bundled ptxas), and no
    local memory (register spills). Runs in a subprocess, outside the interpreter."""
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "cuobjdump")):
        pytest.skip("this triton build has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(_COMPILE_CASES)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    usage = json.loads(out.stdout.strip().splitlines()[-1])
    print("\nregisters / stack bytes per kernel:", usage)
    assert len(usage) == len(_COMPILE_CASES)
    for name, (regs, stack) in usage.items():
        assert stack == 0, f"{name} spills ({regs} registers, {stack} bytes of stack)"


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "gaussian"),
                                         ("precision", "bernoulli"), ("precision", "uniform")])
@pytest.mark.parametrize("shape", [(64, 784, 200), (37, 1000, 33)])
def test_gpu_matches_reference(head, family, shape):
    B, k, d = shape
    leaves = make_leaves(family, head, B, k, d, seed=sum(shape))
    compare(leaves, family, head, dtype=torch.float32, tol=2e-5, device="cuda",
            upstream=torch.linspace(-1.0, 1.0, B, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "bernoulli")])
def test_gpu_bfloat16(head, family):
    check_ops_low_precision(head, family, torch.bfloat16, B=64, k=784, d=200, seed=5, device="cuda")


@pytest.mark.gpu
def test_gpu_tf32_trap():
    torch.backends.cuda.matmul.allow_tf32 = True  # must not matter: the kernels ask for ieee dots
    try:
        (x, mean, var, weight), sigma2 = tf32_trap_case(B=64, k=512, d=128, device="cuda")
        exact = reference.fixed_nll(*(t.cpu() for t in (x, mean, var, weight)), None, sigma2.cpu())
        got = OPS.triton_fixed_nll(x.float(), mean.float(), var.float(), weight.float(), None, sigma2.float())
        assert_rel(got, exact, TOL[torch.float32], "tf32 trap (cuda)")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.gpu
def test_gpu_determinism():
    inputs = _op_inputs("precision", "bernoulli", B=64, k=784, d=200)
    grad = torch.ones(64, device="cuda")
    a = OPS.triton_precision_nll(*inputs)
    b = OPS.triton_precision_nll(*inputs)
    assert torch.equal(a, b)
    ga = OPS.triton_precision_nll_backward(grad, *inputs, [True] * 9)
    gb = OPS.triton_precision_nll_backward(grad, *inputs, [True] * 9)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_report_worst_errors():
    """Prints the largest errors the comparisons above saw (pytest -s)."""
    print("\nworst normwise relative error vs float64 reference:",
          {str(k).replace("torch.", ""): f"{v:.2e}" for k, v in WORST.items()})
    print("fp32 comparisons above 1e-5 (ill-conditioned: the fp32 reference misses too):", ILL_CONDITIONED)
