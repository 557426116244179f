"""The C++ CPU backend (``backend="cpp"``, ops in ``silent_kernels._C``): what only it has.

Its results against the reference on every case of the shared table (shapes, heads, latent
families, dtypes, reductions, layouts, gradient subsets, gradcheck, opcheck of the plain ops,
torch.compile) are in tests/test_backends.py. Here: how auto dispatch reaches it, its int64
offsets, which gradients its backward is asked for, its argument checks, the training pair
(the forward op that saves coefficients for its backward) and its float32 logarithm.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import silent_kernels
from tests.backend_cases import Case, Problem

if os.environ.get("SILENT_KERNELS_NO_EXTENSION") == "1":  # built without the extension on purpose
    pytest.skip("silent_kernels built without its compiled extension", allow_module_level=True)

from silent_kernels import ops as sk_ops  # noqa: E402  (fails loudly when the build is broken)

OPS = torch.ops.silent_kernels


def _precision_args(B=4, d=3, k=5, dtype=torch.float64, k3=True, k4=True, biases=True, seed=0):
    """precision_nll's arguments for Bernoulli latents, k3 / k4 / the biases left out on request."""
    case = Case(B, d, k, head="precision", family="bernoulli", bias=biases, precision_bias=biases,
                dtype=dtype, seed=seed)
    args = Problem(case).op_inputs()
    args[3] = args[3] if k3 else None
    args[4] = args[4] if k4 else None
    return args


def _fixed_args(B=4, d=3, k=5, dtype=torch.float64):
    return Problem(Case(B, d, k, head="fixed", family="gaussian", dtype=dtype)).op_inputs()


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
    p = Problem(Case(3, 4, 5))
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


# ------------------------------------------------------ which gradients the kernel is asked for
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
    p = Problem(Case(5, 4, 7, head=head, family="gamma", dtype=torch.float32, requires=("enc", "enc2")))
    with _RecordNeeds() as mode:
        p.run("cpp")
    assert len(mode.needs) == 1
    n = len(mode.needs[0])
    moment_slots = {1, 2, 3, 4} if head == "precision" else {1, 2}  # mean, var (, k3, k4)
    assert [i for i in range(n) if mode.needs[0][i]] == sorted(moment_slots)


def test_backward_op_honours_noncontiguous_upstream_gradient():
    args = _precision_args()
    grad_full = torch.arange(8, dtype=torch.float64) - 3.0
    strided = grad_full[::2]
    assert not strided.is_contiguous()
    a = OPS.precision_nll_backward(strided, *args, [True] * 9)
    b = OPS.precision_nll_backward(strided.contiguous(), *args, [True] * 9)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)



def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))



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


def _recorder(called: list) -> type:
    """A dispatch mode class that appends the name of every op it sees to ``called``."""
    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(func._schema.name)
            return func(*args, **(kwargs or {}))
    return Record


def test_cpp_entry_uses_the_train_op_only_when_grads_are_needed():
    args = _precision_args(B=3, d=4, k=5)
    called = []
    Record = _recorder(called)
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
    with pytest.raises(RuntimeError, match="coefficients: expected shape"):
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


# ----------------------------------------- fixed head: the training pair keeps the residuals
def _fixed_args(B=4, d=3, k=5, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return [r(B, k), n(B, d), 0.5 * r(B, d), n(k, d), n(k) if bias else None, 0.05 + r(k)]


@pytest.mark.parametrize("bias", [True, False])
def test_fixed_train_ops_match_the_plain_ops(bias):
    args = _fixed_args(B=6, d=5, k=37, bias=bias, seed=3)
    loss, coef = OPS.fixed_nll_train(*args)
    torch.testing.assert_close(loss, OPS.fixed_nll(*args), rtol=0, atol=0)
    x, mean, var, weight, b, sigma2 = args
    ubar = mean @ weight.T + (b if bias else 0)
    torch.testing.assert_close(coef, (x - ubar) / sigma2, rtol=1e-13, atol=1e-13)
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -0.25], dtype=torch.float64)
    needs = [True, True, True, True, bias, True]
    ref = OPS.fixed_nll_backward(grad, *args, needs)
    full = OPS.fixed_nll_train_backward(grad, coef, mean, var, weight, sigma2, needs)
    for i in range(6):
        torch.testing.assert_close(full[i], ref[i], rtol=0, atol=0)
        one = [need and j == i for j, need in enumerate(needs)]
        out = OPS.fixed_nll_train_backward(grad, coef, mean, var, weight, sigma2, one)
        for j, t in enumerate(out):
            assert t.shape == (full[j].shape if one[j] else (0,)), (i, j)


def test_fixed_cpp_entry_uses_the_train_op_only_when_grads_are_needed():
    args = _fixed_args()
    called = []
    Record = _recorder(called)
    with Record():
        sk_ops.cpp_fixed_nll(*args)
    assert "silent_kernels::fixed_nll" in called and "silent_kernels::fixed_nll_train" not in called
    called.clear()
    leaf = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    with Record():
        sk_ops.cpp_fixed_nll(*leaf).sum().backward()
    assert "silent_kernels::fixed_nll_train" in called and "silent_kernels::fixed_nll_train_backward" in called
    # the backward reuses the forward's residuals: no second forward, no recomputing backward
    assert called.count("silent_kernels::fixed_nll_train") == 1 and "silent_kernels::fixed_nll_backward" not in called


@pytest.mark.parametrize("bias", [True, False])
def test_fixed_train_pair_gradcheck_and_opcheck(bias):
    args = _fixed_args(B=3, d=4, k=5, bias=bias, seed=2)
    inputs = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    assert torch.autograd.gradcheck(lambda *t: OPS.fixed_nll_train(*t)[0], inputs, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda *t: sk_ops.cpp_fixed_nll(*t) * torch.tensor(
        [1.0, -2.0, 0.5], dtype=torch.float64), inputs, eps=1e-6, atol=1e-7)
    _opcheck(OPS.fixed_nll_train.default, args)
    _opcheck(OPS.fixed_nll_train.default, inputs)
    _, coef = OPS.fixed_nll_train(*args)
    x, mean, var, weight, b, sigma2 = args
    _opcheck(OPS.fixed_nll_train_backward.default,
             [torch.ones(3, dtype=torch.float64), coef, mean, var, weight, sigma2, [True, True, False, True, bias, True]])


@pytest.mark.parametrize("d,k", [(7, 777), (64, 4000)])
def test_fixed_pixel_tiles_over_two_threads_match_the_reference(d, k):
    """The cpp fixed head cuts the pixels into tiles spread over one part per thread. (7, 777):
    one tile per part; (64, 4000): several per part in the forward and the backward (the tile
    budget is 128 Ki floats of A, R and dA rows), so the per-part R @ A partial accumulates over
    tiles. The loss and every gradient, each need alone and all together, against the reference."""
    from silent_kernels import reference
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = _fixed_args(B=5, d=d, k=k, seed=4)
        grad = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25], dtype=torch.float64)
        leaves = [a.detach().clone().requires_grad_() for a in args]
        loss = reference.fixed_nll(*leaves)
        want = torch.autograd.grad(loss, leaves, grad)
        got_loss, coef = OPS.fixed_nll_train(*args)
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-12, atol=1e-12)
        x, mean, var, weight, b, sigma2 = args
        for needs in ([True] * 6, *([j == i for j in range(6)] for i in range(6))):
            got = OPS.fixed_nll_train_backward(grad, coef, mean, var, weight, sigma2, needs)
            for i, need in enumerate(needs):
                if need:
                    torch.testing.assert_close(got[i], want[i], rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_fixed_train_backward_checks_the_coefficients():
    x, mean, var, weight, b, sigma2 = _fixed_args()
    _, coef = OPS.fixed_nll_train(x, mean, var, weight, b, sigma2)
    grad = torch.ones(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"coefficients: expected shape \(4, 5\)"):
        OPS.fixed_nll_train_backward(grad, coef[:, :-1], mean, var, weight, sigma2, [True] * 6)
    with pytest.raises(RuntimeError, match="coefficients: expected dtype"):
        OPS.fixed_nll_train_backward(grad, coef.float(), mean, var, weight, sigma2, [True] * 6)
    with pytest.raises(RuntimeError, match="sigma2: expected shape"):
        OPS.fixed_nll_train_backward(grad, coef, mean, var, weight, sigma2[:-1], [True] * 6)
