"""Every compiled backend of analytic_nll against the float64 reference, on one case table.

The cases, the values and the tolerances are in tests/backend_cases.py; each test here runs
for every backend ("cpp", "triton", "cuda") that this machine has: cpp on the CPU, Triton on
a GPU or else in its CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), cuda on a
GPU only. The CUDA kernels are also run without a GPU, through their host emulation, in
tests/test_cuda_backend.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from silent_kernels import backends, reference
from tests.backend_cases import (CASES, GRADCHECK_CASES, OPCHECK_CASES, TOL, Case, Problem,
                                 assert_matches_reference, random_cases, relative_error)

BACKENDS = ("cpp", "triton", "cuda")
OPS = torch.ops.silent_kernels
# The registered ops behind each backend: cpp and cuda share the op names (the dispatcher picks
# the device's kernel), Triton registers its own.
OP_PREFIX = {"cpp": "", "cuda": "", "triton": "triton_"}
RANDOM_EXAMPLES = {"cpp": 40, "triton": 16, "cuda": 40}  # the Triton interpreter is slow


def device_for(backend: str, case: Case | None = None) -> str:
    """The device `backend` runs on here, or skip the test saying why it cannot run."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend: needs a CUDA device")
    if case is not None and case.gpu_sized and not torch.cuda.is_available():
        pytest.skip("a real model's shape, checked on a GPU only")
    if not backends.available(backend):
        pytest.skip(f"{backend} backend unavailable: {backends.info()['backends'][backend].get('reason')}")
    if backend == "cpp":
        return "cpu"
    if backend == "triton" and not torch.cuda.is_available():
        if case is not None and case.large:
            pytest.skip("too large for the Triton CPU interpreter (runs on a GPU)")
        return "cpu"
    return "cuda"


def ops_of(backend: str, head: str):
    name = OP_PREFIX[backend] + ("fixed_nll" if head == "fixed" else "precision_nll")
    return getattr(OPS, name), getattr(OPS, name + "_backward")


def reference_op(head: str):
    return reference.fixed_nll if head == "fixed" else reference.precision_nll


# ------------------------------------------------------------------ forward and gradients
# GPU-sized cases are for the GPU backends (cpp has its own large shapes in the table)
BACKEND_CASES = [pytest.param(backend, case, id=f"{backend}-{case.id}")
                 for backend in BACKENDS for case in CASES if not (case.gpu_sized and backend == "cpp")]


@pytest.mark.parametrize("backend, case", BACKEND_CASES)
def test_matches_float64_reference(backend, case):
    device = device_for(backend, case)
    assert_matches_reference(Problem(case), backend, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_cases_match_float64_reference(backend):
    device = device_for(backend)

    @settings(max_examples=RANDOM_EXAMPLES[backend], deadline=None)
    @given(case=random_cases())
    def check(case):
        assert_matches_reference(Problem(case), backend, device)

    check()


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, case):
    device = device_for(backend, case)
    problem = Problem(case)
    leaves = problem.leaves(torch.float64, device)
    names = list(leaves)

    def loss(*tensors):
        return problem.loss(problem.inputs(dict(zip(names, tensors))), backend)

    # In the Triton interpreter a full Jacobian (two evaluations per input element) takes
    # minutes: there, fast mode checks the Jacobian along random directions instead.
    interpreted = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(loss, [leaves[n] for n in names], eps=1e-6, atol=1e-7,
                                    fast_mode=interpreted)


# ------------------------------------------------------------------------------ the ops
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, case):
    device = device_for(backend, case)
    forward, backward = ops_of(backend, case.head)
    args = Problem(case).op_inputs(device)
    torch.library.opcheck(forward.default, args)
    torch.library.opcheck(forward.default, [a.clone().requires_grad_() if a is not None else None for a in args])
    grad = torch.linspace(-1.0, 1.0, case.B, dtype=case.dtype, device=device)
    torch.library.opcheck(backward.default, [grad, *args, [True] * len(args)])
    torch.library.opcheck(backward.default, [grad, *args, [i % 3 != 1 for i in range(len(args))]])


@pytest.mark.parametrize("head", ["fixed", "precision"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_returns_only_the_needed_gradients(backend, head):
    """All flags: every gradient (vs autograd of the reference), contiguous; one flag: that
    gradient alone, the others empty (also for a flag on an absent input); no flag: all empty."""
    case = Case(4, 3, 7, head=head, family="uniform", bias=False, precision_bias=head == "fixed",
                dtype=torch.float32, seed=6)
    device = device_for(backend, case)
    _, backward = ops_of(backend, head)
    args = Problem(case).op_inputs(device)
    grad = torch.tensor([0.5, -1.0, 2.0, 0.25], device=device)
    ref_in = [None if a is None else a.detach().double().cpu().requires_grad_() for a in args]
    (reference_op(head)(*ref_in) * grad.double().cpu()).sum().backward()
    full = backward(grad, *args, [True] * len(args))
    assert len(full) == len(args)
    for i, (g, a, r) in enumerate(zip(full, args, ref_in)):
        if a is None:
            assert g.shape == (0,), i
            continue
        assert g.shape == a.shape and g.dtype == a.dtype and g.is_contiguous(), i
        assert relative_error(g, r.grad) <= TOL[case.dtype], i
    for i in range(len(args)):
        one = backward(grad, *args, [j == i for j in range(len(args))])
        for j, g in enumerate(one):
            if j == i and args[j] is not None:
                torch.testing.assert_close(g, full[j], rtol=1e-6, atol=0)
            else:
                assert g.shape == (0,) and g.dtype == grad.dtype, (i, j, g.shape)
    assert all(g.shape == (0,) for g in backward(grad, *args, [False] * len(args)))


# ------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """Both heads through analytic_nll inside torch.compile(fullgraph=True) give the eager
    loss and gradients (the fake kernels and the autograd registration at work)."""
    problems = [Problem(Case(3, 4, 10, head="fixed", family="gaussian", sigma2="scalar", reduction="sum",
                             dtype=torch.float32, seed=3)),
                Problem(Case(3, 4, 10, head="precision", family="gaussian", reduction="mean",
                             dtype=torch.float32, seed=4))]
    device = device_for(backend, problems[0].case)

    def total_loss(*tensors):
        rest, total = list(tensors), 0.0
        for p in problems:
            names = list(p.values)
            total = total + p.loss(p.inputs(dict(zip(names, rest[:len(names)]))), backend)
            rest = rest[len(names):]
        return total

    results = []
    for fn in (torch.compile(total_loss, fullgraph=True), total_loss):
        leaves = [t for p in problems for t in p.leaves(torch.float32, device).values()]
        loss = fn(*leaves)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    (compiled, compiled_grads), (eager, eager_grads) = results
    assert relative_error(compiled, eager) <= 1e-6
    for i, (a, b) in enumerate(zip(compiled_grads, eager_grads)):
        assert relative_error(a, b) <= 1e-6, i


# ------------------------------------------------------------------ half precision end to end
# Through torch.distributions the posterior's moments and their gradients are computed by PyTorch
# in the half dtype too (sigmoid and its backward), which adds its own rounding to the backend's:
# a looser tolerance than TOL, for this path only.
END_TO_END_HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", list(END_TO_END_HALF_TOL))
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_end_to_end_through_a_distribution(backend, dtype):
    case = Case(16, 10, 50, head="precision", family="bernoulli", seed=7)   # float64 values, logits as leaves
    device = device_for(backend, case)
    problem = Problem(case)

    def run(run_backend, run_dtype, run_device):
        leaves = problem.leaves(run_dtype, run_device)
        loss = problem.loss(leaves, run_backend)
        grads = torch.autograd.grad(loss, list(leaves.values()), problem.upstream.to(run_device, run_dtype),
                                    allow_unused=True)
        return loss, dict(zip(leaves, grads))

    half_values = {n: v.to(dtype).double() for n, v in problem.values.items()}
    problem.values = half_values                   # both runs on the same (rounded) values
    loss, grads = run(backend, dtype, device)
    ref_loss, ref_grads = run("torch", torch.float64, "cpu")
    assert loss.dtype == dtype
    errors = {"loss": relative_error(loss.cpu(), ref_loss)}
    errors.update({n: relative_error(g.cpu(), ref_grads[n]) for n, g in grads.items() if ref_grads[n] is not None})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= END_TO_END_HALF_TOL[dtype], (worst, errors)
