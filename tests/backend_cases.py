"""One table of ``analytic_nll`` cases that drives every backend (tests/test_backends.py).

A ``Case`` names a problem: its shape (batch B, latents d, pixels k), head (fixed variance
with a float / scalar / per-pixel sigma2, or learnable precision), latent family, dtype,
reduction, memory layout and which leaves require gradients. ``Problem`` generates its values
once in float64 (rounded to the case's dtype) and evaluates it through ``analytic_nll`` with
any backend, returning the loss and the gradient of every leaf.

Error measure: normwise relative error max|actual - expected| / max|expected| per tensor,
against the float64 reference (backend="torch") evaluated on the very same (upcast) values.
One tolerance per dtype (``TOL``), met by every backend: float64 1e-10; float32 2e-5 (the
Triton kernels' bar at real-model shapes on a GPU, where split reductions add up more terms;
the CPU backends stay below 1e-5 here); float16 1e-3 and bfloat16 8e-3, about two units in the
last place: the kernels accumulate those inputs in float32 and round once on store, so their
errors are also held to those of the exact answer rounded to the dtype (+1e-5). For those two
dtypes the posterior's cumulants are the inputs (``moments_as_inputs``), as an exact moment map
would round them, rather than PyTorch's own half-precision moment maps (their rounding is not
the backends').
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import distributions as D

from silent_kernels import LatentMoments, analytic_nll

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
HALF_DTYPES = (torch.float16, torch.bfloat16)
ENCODER_FAMILIES = ("gaussian", "bernoulli", "uniform", "laplace", "poisson", "gamma")
MOMENT_NAMES = ("mean", "var", "k3", "k4")
FIXED_OP_INPUTS = ("x", "mean", "var", "weight", "bias", "sigma2")
PRECISION_OP_INPUTS = ("x", "mean", "var", "k3", "k4", "weight", "bias", "precision_weight", "precision_bias")
FLOAT_SIGMA2 = 0.25  # the fixed head's sigma2 when given as a Python float
# B * d * k beyond which the Triton interpreter takes too long (cpp and GPUs run such cases).
LARGE_ELEMENTS = 100_000


@dataclass(frozen=True)
class Case:
    """One problem of the table; see the module docstring."""

    B: int
    d: int
    k: int
    head: str = "precision"            # "fixed" | "precision"
    family: str = "bernoulli"          # one of make_q's families
    sigma2: str = "pixel"              # fixed head: "float" | "scalar" | "pixel"
    bias: bool = True
    precision_bias: bool = True
    dtype: torch.dtype = torch.float64
    reduction: str = "none"
    layout: str = "contiguous"         # "contiguous" | "strided" (every input a non-contiguous view)
    moments: bool = False              # the cumulants are the leaves (forced for half dtypes, k3only)
    log_term: str = "auto"             # precision head: "auto" | "taylor"
    requires: Optional[tuple] = None   # leaves that require grad (None: all)
    floored_pixels: int = 0            # precision rows set to 0, so E[v^2] sits on its floor
    gpu_sized: bool = False            # the shape of a real model: for the GPU backends only
    seed: int = 0

    @property
    def moments_as_inputs(self) -> bool:
        return self.moments or self.dtype in HALF_DTYPES or self.family == "k3only"

    @property
    def large(self) -> bool:
        return self.B * self.k * max(self.d, 1) > LARGE_ELEMENTS

    @property
    def id(self) -> str:
        parts = [f"B{self.B}d{self.d}k{self.k}", self.head, self.family, str(self.dtype).replace("torch.", "")]
        if self.head == "fixed":
            parts.append(f"sigma2-{self.sigma2}")
        if not self.bias:
            parts.append("nobias")
        if self.head == "precision" and not self.precision_bias:
            parts.append("noprecbias")
        if self.log_term != "auto":
            parts.append(self.log_term)
        if self.reduction != "none":
            parts.append(self.reduction)
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.moments and self.dtype not in HALF_DTYPES and self.family != "k3only":
            parts.append("moments")
        if self.requires is not None:
            parts.append("needs-" + ("+".join(self.requires) or "none"))
        if self.floored_pixels:
            parts.append(f"floor{self.floored_pixels}")
        return "-".join(parts)


def make_q(family: str, enc: torch.Tensor, enc2: torch.Tensor):
    """A posterior of `family` from two (B, d) encoder outputs. Positive means keep
    E[v] = C m + b' away from 0 when there is no precision bias."""
    loc = 0.5 + enc.sigmoid()
    spread = F.softplus(enc2) + 0.1
    if family == "gaussian":
        return LatentMoments.gaussian(loc, logvar=0.5 * enc2 - 1.0)
    if family == "bernoulli":
        return LatentMoments.bernoulli(logits=enc)
    if family == "uniform":
        return D.Uniform(loc - spread, loc + spread)
    if family == "laplace":
        return D.Laplace(loc, 0.5 * spread)
    if family == "poisson":
        return D.Poisson(loc)
    if family == "gamma":
        return D.Gamma(2.0 + spread, 2.0 + enc.sigmoid())
    if family == "normal":  # the torch.distributions objects of the two LatentMoments families
        return D.Normal(enc, spread)
    if family == "bernoulli_probs":
        return D.Bernoulli(probs=0.05 + 0.9 * enc.sigmoid())
    if family == "k3only":
        return LatentMoments(loc, 0.1 * spread, 0.05 * enc2.tanh(), None)
    raise ValueError(family)


def as_moments(q) -> LatentMoments:
    return q if isinstance(q, LatentMoments) else LatentMoments.from_distribution(q)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|; where `expected` is all zeros, max|actual|."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().item()
    error = (a - e).abs().max().item()
    return error / scale if scale > 0 else error


def strided_view(t: torch.Tensor, turn: int) -> torch.Tensor:
    """The values of `t` in non-contiguous storage (differentiable back to `t`); `turn` picks
    the layout of 2-D tensors: transposed, column stride 2 or row stride 2k."""
    if t.dim() == 1:
        return torch.stack([t, t], 1)[:, 0]
    if t.dim() != 2:
        return t
    if turn % 3 == 0:
        return t.t().contiguous().t()
    if turn % 3 == 1:
        return torch.stack([t, t], -1)[..., 0]
    return torch.stack([t, t], 1)[:, 0]


class Problem:
    """The values of a Case (generated in float64, rounded to its dtype) and its evaluation."""

    def __init__(self, case: Case):
        self.case = c = case
        g = torch.Generator().manual_seed(c.seed)
        normal = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        uniform = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
        values = {"x": uniform(c.B, c.k)}
        enc, enc2 = normal(c.B, c.d), normal(c.B, c.d)
        if c.moments_as_inputs:
            q = as_moments(make_q(c.family, enc, enc2))
            values.update({n: getattr(q, n) for n in MOMENT_NAMES if getattr(q, n) is not None})
        else:
            values.update(enc=enc, enc2=enc2)
        values["weight"] = normal(c.k, c.d) / math.sqrt(max(c.d, 1))
        if c.bias:
            values["bias"] = 0.1 * normal(c.k)
        if c.head == "precision":
            values["precision_weight"] = ((0.5 + 0.5 * uniform(c.k, c.d)) / max(c.d, 1)
                                          + 0.2 * normal(c.k, c.d) / math.sqrt(max(c.d, 1)))
            if c.precision_bias:  # one value for all pixels in strided layout: a stride-0 view
                values["precision_bias"] = 1.0 + uniform(c.k if c.layout == "contiguous" else ())
            if c.floored_pixels:
                values["precision_weight"][:c.floored_pixels] = 0.0
                values["precision_bias"][:c.floored_pixels] = 0.0
        elif c.sigma2 == "pixel":
            values["sigma2"] = 0.2 + uniform(c.k)
        elif c.sigma2 == "scalar":
            values["sigma2"] = torch.tensor(0.3, dtype=torch.float64)
        self.values = {n: v.to(c.dtype) for n, v in values.items()}
        self.upstream = torch.linspace(-1.0, 2.0, c.B, dtype=torch.float64).to(c.dtype)

    # ------------------------------------------------------------------ evaluation
    def leaves(self, dtype, device="cpu") -> dict:
        wanted = set(self.values) if self.case.requires is None else set(self.case.requires)
        return {n: v.detach().to(device=device, dtype=dtype).requires_grad_(n in wanted)
                for n, v in self.values.items()}

    def inputs(self, leaves: dict) -> dict:
        """The tensors handed to analytic_nll: the leaves, or views of them in strided layout
        (a scalar sigma2 or precision bias then becomes a stride-0 (k,) vector)."""
        if self.case.layout == "contiguous":
            return dict(leaves)
        return {n: t.expand(self.case.k) if t.dim() == 0 else strided_view(t, turn)
                for turn, (n, t) in enumerate(leaves.items())}

    def posterior(self, t: dict):
        if self.case.moments_as_inputs:
            return LatentMoments(*(t.get(n) for n in MOMENT_NAMES))
        return make_q(self.case.family, t["enc"], t["enc2"])

    def loss(self, t: dict, backend: str) -> torch.Tensor:
        c = self.case
        q = self.posterior(t)
        if c.head == "fixed":
            sigma2 = t["sigma2"] if c.sigma2 != "float" else FLOAT_SIGMA2
            return analytic_nll(t["x"], q, t["weight"], t.get("bias"), sigma2=sigma2,
                                reduction=c.reduction, backend=backend)
        return analytic_nll(t["x"], q, t["weight"], t.get("bias"), precision_weight=t["precision_weight"],
                            precision_bias=t.get("precision_bias"), log_term=c.log_term,
                            reduction=c.reduction, backend=backend)

    def run(self, backend: str, *, reference: bool = False, device="cpu"):
        """Loss and {leaf: gradient} (None where autograd gives none) at the case's dtype, or
        in float64 on the same values when `reference`."""
        dtype = torch.float64 if reference else self.case.dtype
        leaves = self.leaves(dtype, device)
        loss = self.loss(self.inputs(leaves), backend)
        names = [n for n, t in leaves.items() if t.requires_grad]
        if not names or not loss.requires_grad:
            return loss.detach(), dict.fromkeys(names)
        upstream = self.upstream.to(device=device, dtype=dtype) if self.case.reduction == "none" \
            else torch.ones((), device=device, dtype=dtype)
        if self.case.layout == "strided" and upstream.dim() == 1:
            upstream = strided_view(upstream, 0)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], upstream, allow_unused=True)
        return loss.detach(), dict(zip(names, grads))

    def op_inputs(self, device="cpu") -> list:
        """The arguments of the backend ops (fixed_nll or precision_nll order), cumulants
        included, at the case's dtype."""
        t = {n: v.to(device) for n, v in self.values.items()}
        q = as_moments(self.posterior(t))
        t.update({n: getattr(q, n) for n in MOMENT_NAMES})
        if self.case.head == "fixed":
            t.setdefault("sigma2", torch.tensor(FLOAT_SIGMA2, dtype=self.case.dtype, device=device))
        t = {n: v.expand(self.case.k).contiguous() if v is not None and v.dim() == 0 else v for n, v in t.items()}
        names = FIXED_OP_INPUTS if self.case.head == "fixed" else PRECISION_OP_INPUTS
        return [t.get(n) for n in names]


def assert_matches_reference(problem: Problem, backend: str, device="cpu") -> dict:
    """`backend` on the case's dtype vs the float64 reference: same dtypes and shapes, the
    same set of gradients, each within TOL[dtype]; returns the errors."""
    c = problem.case
    tol = TOL[c.dtype]
    loss, grads = problem.run(backend, device=device)
    ref_loss, ref_grads = problem.run("torch", reference=True)
    assert loss.dtype == c.dtype and loss.shape == ref_loss.shape, (loss.dtype, loss.shape, ref_loss.shape)
    if c.B == 0 and c.reduction != "none":
        assert loss.item() == 0.0
    errors = {"loss": relative_error(loss, ref_loss)}
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        got = grads[name]
        if ref is None:
            assert got is None or not got.any(), f"{name}: gradient where the reference has none"
            continue
        assert got is not None, f"no gradient for {name}"
        assert got.dtype == c.dtype and got.shape == ref.shape, name
        errors[name] = relative_error(got, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.3g} > {tol:g} ({errors})"
    if c.dtype in HALF_DTYPES:  # float32 accumulation, one rounding: as good as the exact answer rounded
        exact = {"loss": ref_loss, **ref_grads}
        for name, error in errors.items():
            rounding = relative_error(exact[name].to(c.dtype), exact[name])
            assert error <= rounding + 1e-5, f"{name}: error {error:.3g}, {rounding:.3g} from rounding alone"
    return errors


# ------------------------------------------------------------------------------ the table
def _cases() -> list:
    table = []
    add = table.append
    f64, f32 = torch.float64, torch.float32
    # every head x latent family, float64 and float32, a shape with ragged tiles
    heads = [dict(head="precision"), dict(head="precision", precision_bias=False, bias=False),
             dict(head="fixed", sigma2="pixel"), dict(head="fixed", sigma2="scalar", bias=False),
             dict(head="fixed", sigma2="float")]
    for dtype in (f64, f32):
        for family in ENCODER_FAMILIES:
            for head in heads:
                add(Case(6, 5, 9, family=family, dtype=dtype, seed=len(table), **head))
        add(Case(6, 5, 9, family="k3only", dtype=dtype, seed=1))
        add(Case(6, 5, 9, family="k3only", head="fixed", dtype=dtype, seed=2))
        add(Case(6, 5, 9, family="gaussian", log_term="taylor", dtype=dtype, seed=3))
        add(Case(6, 5, 9, family="gaussian", log_term="taylor", moments=True, bias=False, precision_bias=False,
                 dtype=dtype, seed=4))
        for family in ("gaussian", "bernoulli"):
            add(Case(5, 7, 23, family=family, dtype=dtype, seed=3))
        add(Case(5, 7, 23, head="fixed", family="gaussian", dtype=dtype, seed=3))
    # odd and degenerate shapes (B, d or k = 1 or 0; counts that leave ragged last tiles)
    for B, d, k in [(1, 1, 1), (4, 1, 6), (4, 5, 1), (3, 4, 1), (2, 1, 5), (70, 2, 3), (2, 3, 130),
                    (3, 70, 6)]:
        add(Case(B, d, k, head="fixed", family="gaussian", dtype=f32, seed=B * 1000 + k * 10 + d))
        add(Case(B, d, k, head="precision", family="bernoulli", dtype=f32, seed=B * 1000 + k * 10 + d))
        add(Case(B, d, k, head="precision", family="uniform", dtype=f32, seed=B * 1000 + k * 10 + d))
        add(Case(B, d, k, head="precision", family="gamma", seed=B + d))
        add(Case(B, d, k, head="fixed", family="gamma", sigma2="scalar", seed=B + d))
    for B, d, k in [(0, 3, 5), (5, 3, 0), (6, 0, 7), (33, 65, 1), (3, 1, 300), (40, 17, 33)]:
        for head in ("fixed", "precision"):
            add(Case(B, d, k, head=head, family="bernoulli", moments=True, seed=B + 7 * k + 13 * d))
    for B, d, k in [(37, 19, 131), (130, 33, 300)]:  # several pixel tiles and batch chunks
        for dtype in (f64, f32):
            for head, family, sigma2 in [("precision", "bernoulli", "pixel"), ("precision", "gaussian", "pixel"),
                                         ("precision", "uniform", "pixel"), ("precision", "gamma", "pixel"),
                                         ("fixed", "gaussian", "scalar"), ("fixed", "bernoulli", "pixel")]:
                add(Case(B, d, k, head=head, family=family, sigma2=sigma2, dtype=dtype, seed=B + k))
    add(Case(700, 5, 40, head="fixed", family="gaussian", reduction="mean"))  # many batch chunks
    for head in ("fixed", "precision"):
        for reduction in ("none", "sum", "mean"):
            add(Case(29, 10, 100, head=head, family="bernoulli", moments=True, reduction=reduction, seed=12))
        add(Case(31, 11, 90, head=head, family="bernoulli", moments=True, layout="strided", dtype=f32, seed=14))
        add(Case(0, 5, 17, head=head, family="bernoulli", moments=True, reduction="sum", dtype=f32, seed=15))
    # posteriors given as torch.distributions objects, float and 0-d tensor sigma2
    for family in ("normal", "bernoulli_probs", "uniform"):
        for head, sigma2 in (("precision", "pixel"), ("fixed", "float"), ("fixed", "scalar")):
            add(Case(17, 6, 45, head=head, family=family, sigma2=sigma2, seed=16))
    # empty batch, every reduction
    for reduction in ("none", "sum", "mean"):
        for head in ("precision", "fixed"):
            for family in ("bernoulli", "uniform", "gaussian"):
                add(Case(0, 3, 6, head=head, family=family, reduction=reduction, dtype=f32, seed=1))
            add(Case(0, 3, 4, head=head, family="bernoulli", reduction=reduction))
    # reductions with the upstream gradient they imply
    for reduction in ("sum", "mean"):
        for head in ("precision", "fixed"):
            add(Case(6, 5, 9, head=head, family="gamma", reduction=reduction, seed=3))
            add(Case(5, 4, 11, head=head, family="uniform", reduction=reduction, dtype=f32, seed=4))
    # non-contiguous inputs and upstream gradient: every argument, stride 0 for the scalars
    for dtype in (f64, f32):
        for head, sigma2 in (("precision", "pixel"), ("fixed", "pixel"), ("fixed", "scalar")):
            for family in ("bernoulli", "uniform", "gaussian"):
                add(Case(5, 4, 11, head=head, family=family, sigma2=sigma2, layout="strided", dtype=dtype))
        add(Case(5, 4, 11, head="precision", family="poisson", moments=True, layout="strided", dtype=dtype))
    # gradients of some inputs only (the backward kernels skip the rest)
    for requires in [("x",), ("enc", "enc2"), ("weight",), ("bias",), ("sigma2",), ("enc2", "sigma2"),
                     ("weight", "sigma2"), ("enc",)]:
        add(Case(4, 3, 9, head="fixed", family="gaussian", requires=requires, dtype=f32, seed=11))
    for requires in [("x",), ("enc",), ("weight",), ("precision_weight",), ("bias", "precision_bias"),
                     ("precision_weight", "precision_bias"), ("enc", "weight")]:
        add(Case(4, 3, 9, head="precision", family="bernoulli", requires=requires, dtype=f32, seed=12))
    add(Case(5, 4, 7, head="precision", family="bernoulli", requires=("enc",)))  # frozen decoder
    add(Case(5, 4, 7, head="fixed", family="gaussian", requires=("enc", "enc2")))
    for head in ("fixed", "precision"):
        for requires in [("mean", "var"), ("weight", "bias"), ("precision_weight",), ("k3", "k4"), ("x",),
                         ("sigma2",), (), ("k4",), ("var", "weight")]:
            if head == "fixed" and requires in [("precision_weight",), ("k3", "k4"), ("k4",)]:
                continue
            if head == "precision" and requires == ("sigma2",):
                continue
            add(Case(23, 9, 77, head=head, family="bernoulli", moments=True, requires=requires, seed=13))
    # pixels whose precision is exactly zero: E[v^2] on its floor, its derivative dropped
    add(Case(4, 3, 6, head="precision", family="bernoulli", floored_pixels=2, seed=5))
    add(Case(3, 4, 8, head="precision", family="bernoulli", floored_pixels=3, dtype=f32, seed=21))
    # float16 / bfloat16 inputs, float32 accumulation (cumulants as inputs)
    for dtype in HALF_DTYPES:
        for head, family in (("fixed", "gaussian"), ("precision", "gaussian"), ("precision", "bernoulli"),
                             ("precision", "uniform"), ("precision", "k3only"), ("fixed", "bernoulli")):
            add(Case(16, 10, 50, head=head, family=family, dtype=dtype, seed=7,
                     log_term="taylor" if head == "precision" else "auto"))
            add(Case(4, 6, 19, head=head, family=family, dtype=dtype, seed=31,
                     log_term="taylor" if head == "precision" else "auto"))
        add(Case(37, 6, 75, head="precision", family="gaussian", dtype=dtype, seed=8))  # exact log term
    # head x family x dtype on the shapes of the CUDA kernels' tiles; the last two for GPUs only
    for B, d, k in [(1, 1, 1), (37, 13, 61), (130, 33, 785), (300, 201, 7)]:
        for dtype in (f64, f32) + HALF_DTYPES:
            for head, family in [("fixed", "gaussian"), ("fixed", "bernoulli"), ("precision", "gaussian"),
                                 ("precision", "bernoulli"), ("precision", "uniform"), ("precision", "k3only")]:
                add(Case(B, d, k, head=head, family=family, moments=True, dtype=dtype, seed=11,
                         gpu_sized=B > 100))
    # shapes of real models, for GPUs
    for B, d, k in [(64, 200, 784), (37, 33, 1000)]:
        for head, family in (("fixed", "gaussian"), ("precision", "gaussian"), ("precision", "bernoulli"),
                             ("precision", "uniform")):
            add(Case(B, d, k, head=head, family=family, dtype=f32, seed=B + d + k, gpu_sized=True))
    for head, family in (("fixed", "gaussian"), ("precision", "bernoulli")):
        add(Case(64, 200, 784, head=head, family=family, dtype=torch.bfloat16, seed=5, gpu_sized=True,
                 log_term="taylor" if head == "precision" else "auto"))
    assert len({case.id for case in table}) == len(table), "two cases of the table share an id"
    return table


CASES = _cases()

# Small float64 cases for torch.autograd.gradcheck (finite differences through analytic_nll)
GRADCHECK_CASES = [
    Case(3, 4, 5, head="precision", family="bernoulli", seed=2),
    Case(3, 4, 5, head="precision", family="gaussian", log_term="taylor", moments=True, bias=False,
         precision_bias=False, seed=2),
    Case(3, 4, 5, head="precision", family="uniform", seed=2),                    # k4 without k3
    Case(3, 4, 5, head="precision", family="k3only", seed=2),
    Case(3, 4, 5, head="precision", family="gaussian", seed=2),                   # exact log term
    Case(3, 4, 5, head="fixed", family="gaussian", seed=2),
    Case(3, 4, 5, head="fixed", family="gamma", bias=False, seed=2),
    Case(3, 2, 4, head="fixed", family="gaussian", sigma2="scalar", seed=4),      # learnable scalar sigma2
    Case(3, 4, 5, head="precision", family="poisson", reduction="sum", layout="strided", seed=3),
]

# Inputs for torch.library.opcheck of each backend's forward and backward ops
OPCHECK_CASES = [
    Case(4, 3, 5, head="fixed", family="gaussian", dtype=torch.float32),
    Case(4, 3, 5, head="fixed", family="gaussian", bias=False, dtype=torch.float32),
    Case(4, 3, 5, head="precision", family="bernoulli"),
    Case(4, 3, 5, head="precision", family="gaussian", bias=False, precision_bias=False),
    Case(4, 3, 5, head="precision", family="uniform", bias=False, precision_bias=False, dtype=torch.float32),
    Case(4, 3, 5, head="precision", family="laplace"),
]


def random_cases():
    """A hypothesis strategy over small float64 / float32 cases of every head and family."""
    from hypothesis import strategies as st

    return st.builds(
        Case, B=st.integers(0, 8), d=st.integers(1, 12), k=st.integers(1, 24),
        head=st.sampled_from(["precision", "fixed"]), family=st.sampled_from(ENCODER_FAMILIES),
        sigma2=st.sampled_from(["float", "scalar", "pixel"]), bias=st.booleans(), precision_bias=st.booleans(),
        dtype=st.sampled_from([torch.float64, torch.float32]), reduction=st.sampled_from(["none", "sum", "mean"]),
        seed=st.integers(0, 2**16))
