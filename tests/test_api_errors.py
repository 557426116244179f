"""Every item of the "Bad input" list of the foundation issue: a clear ValueError /
TypeError naming the argument and the expected and actual shape, dtype or device.
Plus the empty batch (no error) and image-shaped x (flattened)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll

B, k, d = 3, 5, 4


def inputs(dtype=torch.float32, batch=B):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, k, generator=g, dtype=dtype)
    q = LatentMoments(torch.randn(batch, d, generator=g, dtype=dtype),
                      torch.rand(batch, d, generator=g, dtype=dtype) + 0.1)
    W = torch.randn(k, d, generator=g, dtype=dtype)
    return x, q, W


def call(x, q, W, bias=None, **kw):
    kw.setdefault("backend", "torch")
    return analytic_nll(x, q, W, bias, **kw)


# ------------------------------------------------------------------------ shapes
def test_mismatched_k_between_x_and_weight():
    x, q, W = inputs()
    with pytest.raises(ValueError, match=rf"weight: expected shape \(k={k}, d\).*x \({B}, {k}\).*got \({k + 1}, {d}\)"):
        call(x, q, torch.zeros(k + 1, d), sigma2=1.0)
    with pytest.raises(ValueError, match=rf"weight: expected shape \(k={k}, d\).*got \({k}, {d}, 1\)"):
        call(x, q, torch.zeros(k, d, 1), sigma2=1.0)
    # image-shaped x: k is the product of the data dimensions
    with pytest.raises(ValueError, match=r"weight: expected shape \(k=12, d\).*x \(3, 12\).*got \(5, 4\)"):
        call(torch.zeros(B, 1, 3, 4), q, W, sigma2=1.0)


def test_mismatched_d_between_q_and_weight():
    x, q, W = inputs()
    with pytest.raises(ValueError, match=rf"q: latent dimension d={d} .*\({B}, {d}\).*weight shape \({k}, {d + 2}\)"):
        call(x, q, torch.zeros(k, d + 2), sigma2=1.0)
    with pytest.raises(ValueError, match=rf"q: latent dimension d={d} .*weight shape \({k}, {d + 2}\)"):
        call(x, q, torch.zeros(k, d + 2), precision_weight=torch.zeros(k, d + 2))


def test_mismatched_batch_between_x_and_q():
    x, q, W = inputs()
    msg = rf"q: batch size {B} .*does not match x batch size {B - 1} \(x shape \({B - 1}, {k}\)\)"
    with pytest.raises(ValueError, match=msg):
        call(x[:-1], q, W, sigma2=1.0)
    with pytest.raises(ValueError, match=r"q: batch size 3 .*x batch size 0"):
        call(x[:0], q, W, precision_weight=W)


def test_precision_weight_shape_must_equal_weight_shape():
    x, q, W = inputs()
    msg = rf"precision_weight: expected shape \({k}, {d}\) \(the shape of weight\), got \({d}, {k}\)"
    with pytest.raises(ValueError, match=msg):
        call(x, q, W, precision_weight=torch.zeros(d, k))
    with pytest.raises(ValueError, match=rf"precision_weight: expected shape \({k}, {d}\).*got \({k}, {d}, 1\)"):
        call(x, q, W, precision_weight=torch.zeros(k, d, 1))


def test_bias_shapes():
    x, q, W = inputs()
    with pytest.raises(ValueError, match=rf"bias: expected shape \({k},\), got \({k - 1},\)"):
        call(x, q, W, torch.zeros(k - 1), sigma2=1.0)
    with pytest.raises(ValueError, match=rf"precision_bias: expected shape \({k},\), got \(1, {k}\)"):
        call(x, q, W, precision_weight=W, precision_bias=torch.zeros(1, k))
    with pytest.raises(ValueError, match="precision_bias: only valid together with precision_weight"):
        call(x, q, W, sigma2=1.0, precision_bias=torch.zeros(k))


def test_x_must_be_a_batch():
    x, q, W = inputs()
    with pytest.raises(ValueError, match=rf"x: expected shape \(B, k\) or \(B, \*data_shape\), got \({k},\)"):
        call(x[0], q, W, sigma2=1.0)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        call(x.tolist(), q, W, sigma2=1.0)
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor of shape \\(k, d\\), got list"):
        call(x, q, W.tolist(), sigma2=1.0)
    with pytest.raises(TypeError, match="precision_weight: expected a torch.Tensor, got list"):
        call(x, q, W, precision_weight=W.tolist())


# ------------------------------------------------------------------- heads / sigma2
def test_exactly_one_head():
    x, q, W = inputs()
    msg = r"exactly one head: sigma2 .*, precision_weight .* or logvar_weight .*; got {}"
    with pytest.raises(ValueError, match=msg.format("sigma2, precision_weight")):
        call(x, q, W, sigma2=1.0, precision_weight=W)
    with pytest.raises(ValueError, match=msg.format("none")):
        call(x, q, W)


@pytest.mark.parametrize("bad", [0.0, -1.0, 0, float("nan"), float("inf")], ids=["0.0", "-1.0", "int0", "nan", "inf"])
def test_sigma2_float_not_positive(bad):
    x, q, W = inputs()
    with pytest.raises(ValueError, match=r"sigma2: expected a positive finite variance, got"):
        call(x, q, W, sigma2=bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("inf"), float("nan")])
def test_sigma2_tensor_not_positive(bad):
    x, q, W = inputs()
    with pytest.raises(ValueError, match=r"sigma2: variances must be positive and finite, got range"):
        call(x, q, W, sigma2=torch.tensor(bad))
    per_pixel = torch.ones(k)
    per_pixel[2] = bad
    with pytest.raises(ValueError, match=r"sigma2: variances must be positive and finite, got range"):
        call(x, q, W, sigma2=per_pixel)


@pytest.mark.parametrize("shape", [(k + 1,), (1,), (1, k), (k, 1)])
def test_sigma2_wrong_shape(shape):
    x, q, W = inputs()
    with pytest.raises(ValueError, match=re.escape(f"sigma2: expected shape ({k},), got {tuple(shape)}")):
        call(x, q, W, sigma2=torch.ones(shape))


@pytest.mark.parametrize("bad", ["1.0", True, [1.0] * k], ids=["str", "bool", "list"])
def test_sigma2_wrong_type(bad):
    x, q, W = inputs()
    with pytest.raises(TypeError, match=rf"sigma2: expected a float or a torch.Tensor, got {type(bad).__name__}"):
        call(x, q, W, sigma2=bad)


# ----------------------------------------------------------------- values of q
def test_negative_variance():
    x, q, W = inputs()
    var = q.var.clone()
    var[1, 2] = -0.25
    bad = LatentMoments(q.mean, var)
    for head in ({"sigma2": 1.0}, {"precision_weight": W}):
        with pytest.raises(ValueError, match=r"q.var: variances must be >= 0, got minimum -0.25"):
            call(x, bad, W, **head)
    var[1, 2] = float("nan")   # NaN is never a variance, wherever it sits
    with pytest.raises(ValueError, match=r"q.var: variances must be >= 0, got minimum nan"):
        call(x, LatentMoments(q.mean, var), W, sigma2=1.0)
    # a distribution whose parameters give a negative variance (no validation)
    with pytest.raises(ValueError, match=r"q.var: variances must be >= 0"):
        call(x, D.Poisson(torch.full((B, d), -1.0), validate_args=False), W, sigma2=1.0)


def test_value_checks_of_trainable_inputs_warn_nothing():
    """The value checks read q.var and a tensor sigma2 while they require grad: no warning. In a
    fresh interpreter, as torch warns of a grad-requiring tensor's conversion only once per process."""
    import subprocess
    import sys

    program = """
import torch
from silent_kernels import LatentMoments, analytic_nll
from silent_kernels.backends import available
for backend in [b for b in ("torch", "cpp") if available(b)]:
    logvar = torch.zeros(3, 4, requires_grad=True)
    sigma2 = torch.ones(5, requires_grad=True)
    loss = analytic_nll(torch.randn(3, 5), LatentMoments.gaussian(torch.randn(3, 4), logvar=logvar),
                        torch.randn(5, 4), sigma2=sigma2, backend=backend)
    loss.backward()
    assert logvar.grad is not None and sigma2.grad is not None
"""
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("bad", [1.2, -0.1])
def test_bernoulli_probs_out_of_range(bad):
    x, q, W = inputs()
    probs = torch.full((B, d), 0.5)
    probs[0, 1] = bad
    lo, hi = min(bad, 0.5), max(bad, 0.5)
    msg = rf"Bernoulli probs: expected values in \[0, 1\], got range \[{lo:g}, {hi:g}\]"
    with pytest.raises(ValueError, match=msg):
        LatentMoments.bernoulli(probs=probs)
    dist = D.Bernoulli(probs=probs, validate_args=False)
    with pytest.raises(ValueError, match=msg):
        LatentMoments.from_distribution(dist)
    with pytest.raises(ValueError, match=msg):
        call(x, dist, W, sigma2=1.0)


# --------------------------------------------------------------- dtypes / devices
def test_mixed_dtypes():
    x, q, W = inputs(torch.float32)
    x64, q64, W64 = inputs(torch.float64)
    f32, f64 = r"torch.float32", r"torch.float64"
    cases = [
        (dict(x=x, q=q, W=W64, sigma2=1.0), "weight", f32, f64),
        (dict(x=x64, q=q, W=W64, sigma2=1.0), "q.mean", f64, f32),
        (dict(x=x, q=LatentMoments(q.mean, q.var.double()), W=W, sigma2=1.0), "q.var", f32, f64),
        (dict(x=x, q=LatentMoments(q.mean, q.var, q.mean.double()), W=W, precision_weight=W), "q.k3", f32, f64),
        (dict(x=x, q=LatentMoments(q.mean, q.var, None, q.var.double()), W=W, precision_weight=W), "q.k4", f32, f64),
        (dict(x=x, q=q, W=W, bias=torch.zeros(k, dtype=torch.float64), sigma2=1.0), "bias", f32, f64),
        (dict(x=x, q=q, W=W, sigma2=torch.tensor(1.0, dtype=torch.float64)), "sigma2", f32, f64),
        (dict(x=x, q=q, W=W, sigma2=torch.ones(k, dtype=torch.float64)), "sigma2", f32, f64),
        (dict(x=x, q=q, W=W, precision_weight=W64), "precision_weight", f32, f64),
        (dict(x=x, q=q, W=W, precision_weight=W, precision_bias=torch.ones(k, dtype=torch.float64)),
         "precision_bias", f32, f64),
    ]
    for kw, name, want, got in cases:
        x_, q_, W_ = kw.pop("x"), kw.pop("q"), kw.pop("W")
        with pytest.raises(TypeError, match=rf"^{name}: expected dtype {want} \(the dtype of x\), got {got}$"):
            call(x_, q_, W_, **kw)


def test_mixed_devices_meta():
    """'meta' stands in for a second device."""
    x, q, W = inputs()
    meta = torch.device("meta")
    cases = [
        (dict(x=x, q=q, W=W.to(meta), sigma2=1.0), "weight", "cpu", "meta"),
        (dict(x=x.to(meta), q=q, W=W, sigma2=1.0), "weight", "meta", "cpu"),
        (dict(x=x, q=LatentMoments(q.mean.to(meta), q.var.to(meta)), W=W, sigma2=1.0), "q.mean", "cpu", "meta"),
        (dict(x=x, q=LatentMoments(q.mean, q.var, q.var.to(meta)), W=W, precision_weight=W), "q.k3", "cpu", "meta"),
        (dict(x=x, q=q, W=W, bias=torch.zeros(k, device=meta), sigma2=1.0), "bias", "cpu", "meta"),
        (dict(x=x, q=q, W=W, sigma2=torch.ones(k, device=meta)), "sigma2", "cpu", "meta"),
        (dict(x=x, q=q, W=W, sigma2=torch.tensor(1.0, device=meta)), "sigma2", "cpu", "meta"),
        (dict(x=x, q=q, W=W, precision_weight=W.to(meta)), "precision_weight", "cpu", "meta"),
        (dict(x=x, q=q, W=W, precision_weight=W, precision_bias=torch.ones(k, device=meta)),
         "precision_bias", "cpu", "meta"),
    ]
    for kw, name, want, got in cases:
        x_, q_, W_ = kw.pop("x"), kw.pop("q"), kw.pop("W")
        with pytest.raises(ValueError, match=rf"^{name}: expected device {want} \(the device of x\), got {got}$"):
            call(x_, q_, W_, **kw)


def test_all_on_meta_gives_shapes():
    """All inputs on one (meta) device is consistent: no error, only shapes (through
    backend='auto', which falls back to the reference for device types without kernels)."""
    x, q, W = inputs()
    meta = torch.device("meta")
    qm = LatentMoments(q.mean.to(meta), q.var.to(meta))
    out = call(x.to(meta), qm, W.to(meta), sigma2=1.0, reduction="none", backend="auto")
    assert out.shape == (B,) and out.device.type == "meta"


def test_integer_dtypes():
    x, q, W = inputs()
    with pytest.raises(TypeError, match=r"x: expected a floating-point dtype .*got torch.uint8"):
        call((x * 10).to(torch.uint8), q, W, sigma2=1.0)
    with pytest.raises(TypeError, match=r"x: expected a floating-point dtype .*got torch.int64"):
        call(x.long(), q, W, sigma2=1.0)
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32 \(the dtype of x\), got torch.int32"):
        call(x, q, W.int(), sigma2=1.0)
    with pytest.raises(TypeError, match=r"q.mean: expected dtype torch.float32 \(the dtype of x\), got torch.int64"):
        call(x, LatentMoments(q.mean.long(), q.var.long()), W, sigma2=1.0)
    with pytest.raises(TypeError, match=r"sigma2: expected dtype torch.float32 \(the dtype of x\), got torch.int64"):
        call(x, q, W, sigma2=torch.ones(k, dtype=torch.long))


# ------------------------------------------------------------ reduction / backend
def test_unknown_reduction():
    x, q, W = inputs()
    with pytest.raises(ValueError, match=r"reduction: expected one of 'none', 'sum', 'mean', got 'avg'"):
        call(x, q, W, sigma2=1.0, reduction="avg")
    with pytest.raises(ValueError, match=r"reduction: expected one of .*got None"):
        call(x, q, W, sigma2=1.0, reduction=None)


def test_unknown_backend():
    x, q, W = inputs()
    msg = r"backend: expected one of 'auto', 'torch', 'cpp', 'triton', 'cuda', got 'numpy'"
    with pytest.raises(ValueError, match=msg):
        call(x, q, W, sigma2=1.0, backend="numpy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_backend_is_a_clear_error():
    """backend='cuda' for CPU tensors: either the CUDA kernels are not built (RuntimeError
    saying why) or they are and do not take CPU tensors (ValueError)."""
    x, q, W = inputs()
    for head in ({"sigma2": 1.0}, {"precision_weight": W}):
        msg = r"backend='cuda' (is not available: .+|runs on cuda tensors, got tensors on cpu)"
        with pytest.raises((RuntimeError, ValueError), match=msg):
            call(x, q, W, backend="cuda", **head)


def test_auto_backend_works():
    x, q, W = inputs(torch.float64)
    want = call(x, q, W, sigma2=0.5)
    torch.testing.assert_close(analytic_nll(x, q, W, sigma2=0.5, backend="auto"), want)
    torch.testing.assert_close(analytic_nll(x, q, W, sigma2=0.5), want)


# ---------------------------------------------------------- empty batch, image x
@pytest.mark.parametrize("x_shape", [(0, k), (0, 1, 1, k)], ids=["flat", "image"])
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_empty_batch(x_shape, head):
    _, _, W = inputs()
    W = W.clone().requires_grad_()
    x = torch.zeros(x_shape)
    q = LatentMoments(torch.zeros(0, d, requires_grad=True), torch.ones(0, d), torch.zeros(0, d), torch.zeros(0, d))
    kw = ({"sigma2": torch.full((k,), 0.5)} if head == "fixed"
          else {"precision_weight": W, "precision_bias": torch.ones(k)})
    none = call(x, q, W, reduction="none", **kw)
    assert none.shape == (0,) and none.dtype == torch.float32
    for reduction in ("sum", "mean"):
        out = call(x, q, W, reduction=reduction, **kw)
        assert out.shape == () and float(out.detach()) == 0.0
        out.backward()
    assert W.grad is not None and float(W.grad.abs().max()) == 0.0
    # empty Bernoulli / Normal distributions too
    for dist in (D.Bernoulli(logits=torch.zeros(0, d)), D.Normal(torch.zeros(0, d), torch.ones(0, d))):
        assert call(x, dist, W, reduction="mean", **kw).shape == ()


@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_image_shaped_x_is_flattened(head):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 28, 28, generator=g, dtype=torch.float64)
    q = LatentMoments.bernoulli(logits=torch.randn(2, 3, generator=g, dtype=torch.float64))
    W = torch.randn(784, 3, generator=g, dtype=torch.float64) * 0.1
    kw = ({"sigma2": 0.2} if head == "fixed"
          else {"precision_weight": W, "precision_bias": torch.ones(784, dtype=torch.float64)})
    for reduction in ("none", "sum", "mean"):
        got = call(x, q, W, reduction=reduction, **kw)
        want = call(x.reshape(2, 784), q, W, reduction=reduction, **kw)
        assert torch.equal(got, want)
    # a non-contiguous image batch is flattened the same way
    xt = x.transpose(2, 3)
    torch.testing.assert_close(call(xt, q, W, reduction="none", **kw),
                               call(xt.contiguous().reshape(2, 784), q, W, reduction="none", **kw),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("where", ["var", "sigma2", "probs"])
def test_nan_values_are_rejected(where):
    import math

    from silent_kernels import LatentMoments, analytic_nll

    B, d, k = 3, 2, 4
    x, weight = torch.rand(B, k), torch.randn(k, d)
    mean, var, sigma2 = torch.randn(B, d), torch.rand(B, d), torch.full((k,), 0.5)
    if where == "var":
        var[1, 0] = math.nan
    if where == "sigma2":
        sigma2[2] = math.nan
    if where == "probs":
        probs = torch.rand(B, d)
        probs[0, 1] = math.nan
        with pytest.raises(ValueError, match="probs"):
            LatentMoments.bernoulli(probs=probs)
        return
    with pytest.raises(ValueError, match=where):
        analytic_nll(x, LatentMoments(mean, var), weight, sigma2=sigma2)
