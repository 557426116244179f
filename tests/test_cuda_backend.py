"""The CUDA backend (csrc/cuda) without a GPU: its ``.cu`` sources run on the host.

On a GPU, ``analytic_nll(..., backend="cuda")`` is checked against the reference on the shared
case table in tests/test_backends.py (skipped without a device). Here the very same ``.cu``
sources are compiled for the host by g++ with a small CUDA emulation shim (tests/cuda_emulation:
one std::thread per CUDA thread of a block, a std::barrier for __syncthreads, a per-warp barrier
for __shfl_xor_sync, ``__shared__`` as static storage, blocks run one after another), called
through ctypes. This exercises the tiling, ragged edges, plans, split reductions, scratch layout
(filled with NaN, so reading an unwritten slot shows), dtype conversions and the math of every
kernel; it says nothing about performance or the GPU memory model. Both tile configurations and
the split reductions are reached by emulating a device with 1 or with 4096 multiprocessors.

Cases, values and tolerances (``TOL``) come from tests/backend_cases.py; the error measure is the
normwise relative error against the float64 reference on the very same (upcast) input values.
"""

from __future__ import annotations

import pytest
import torch

from silent_kernels import reference
from tests.backend_cases import FIXED_OP_INPUTS, PRECISION_OP_INPUTS, TOL, Case, Problem
from tests.cuda_emulation import emulation

FAMILIES = ("gaussian", "bernoulli", "uniform", "k3only")


# ------------------------------------------------------------------------------ cases
def make_case(head: str, family: str, B: int, k: int, d: int, dtype, seed: int = 0,
              bias: bool = True) -> dict:
    """The op inputs of one table case, by name in op order (cumulants as inputs)."""
    case = Case(B, d, k, head=head, family=family, bias=bias, precision_bias=bias, moments=True,
                dtype=dtype, seed=seed)
    names = FIXED_OP_INPUTS if head == "fixed" else PRECISION_OP_INPUTS
    return dict(zip(names, Problem(case).op_inputs()))


def upstream(B: int, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)


def reference_outputs(head: str, case: dict, grad, needs) -> tuple:
    """float64 reference per-sample loss and d(sum_n grad_n loss_n)/d(input) for `needs`."""
    leaves = {name: (None if t is None else t.detach().double().clone().requires_grad_(name in needs))
              for name, t in case.items()}
    fn = reference.fixed_nll if head == "fixed" else reference.precision_nll
    loss = fn(*leaves.values())
    wanted = [name for name in needs if leaves.get(name) is not None]
    grads = {}
    if wanted:
        gs = torch.autograd.grad((loss * grad.double()).sum(), [leaves[w] for w in wanted],
                                 allow_unused=True)
        grads = {w: (torch.zeros_like(leaves[w]) if g is None else g) for w, g in zip(wanted, gs)}
    return loss.detach(), grads


def assert_close(name: str, actual, expected, dtype):
    assert tuple(actual.shape) == tuple(expected.shape), (name, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    assert err <= TOL[dtype], f"{name} ({dtype}): normwise relative error {err:.3e} > {TOL[dtype]:.0e}"


# ------------------------------------------------------------------------------ host emulation
@pytest.fixture(scope="module")
def emu():
    """The emulated CUDA backend (tests/cuda_emulation), built once per session."""
    try:
        return emulation.build()
    except emulation.Unavailable as exc:
        pytest.skip(str(exc))


# device id -> multiprocessor count: 1 SM gives the large tiles and no split reductions,
# 4096 SMs the small tiles and split reductions (each emulated device caches its own count)
DEVICES = {"large_tiles": (0, 1), "small_tiles_split": (1, 4096)}


def run_emulated(emu, head, case, dtype, needs, device="small_tiles_split"):
    emu.set_device(*DEVICES[device])
    B = case["x"].shape[0]
    grad = upstream(B, dtype)
    loss, finfo = emu.forward(head, case)
    outs, binfo = emu.backward(head, case, grad, needs)
    ref_loss, ref_grads = reference_outputs(head, case, grad, needs)
    assert_close("loss", loss, ref_loss, dtype)
    for name, ref in ref_grads.items():
        assert_close(f"d{name}", outs[name], ref, dtype)
    return finfo, binfo


def all_needs(head, case):
    return {name for name, t in case.items() if t is not None}


HEAD_FAMILIES = [("fixed", "gaussian"), ("fixed", "bernoulli")] + [("precision", f) for f in FAMILIES]


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head,family", HEAD_FAMILIES)
def test_emulated_against_reference(emu, head, family, dtype, device):
    case = make_case(head, family, 70, 130, 9, dtype, seed=sum(map(ord, head + family)))
    finfo, binfo = run_emulated(emu, head, case, dtype, all_needs(head, case), device)
    if device == "large_tiles":
        assert finfo[0] == 0 and binfo[0] == 0 and binfo[1] == 1 and binfo[2] == 1
    else:  # small tiles; the moment (over k) and weight (over B) reductions are split
        assert finfo[0] == 1 and binfo[0] == 1 and binfo[1] > 1 and binfo[2] > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "bernoulli"),
                                         ("precision", "uniform")])
def test_emulated_low_precision(emu, head, family, dtype):
    case = make_case(head, family, 37, 75, 6, dtype, seed=3)
    run_emulated(emu, head, case, dtype, all_needs(head, case))


@pytest.mark.parametrize("shape", [(1, 1, 1), (0, 5, 3), (5, 0, 3), (6, 7, 0), (33, 1, 65), (3, 300, 1),
                                   (40, 33, 17)], ids=str)
@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_emulated_edge_shapes(emu, head, shape):
    B, k, d = shape
    case = make_case(head, "bernoulli", B, k, d, torch.float64, seed=B + 7 * k + 13 * d)
    for device in DEVICES:
        run_emulated(emu, head, case, torch.float64, all_needs(head, case), device)


@pytest.mark.parametrize("needs", [{"mean", "var", "k3", "k4"}, {"weight"}, {"precision_weight"},
                                   {"bias", "precision_bias"}, {"x"}, {"k4"}, {"var", "weight"}],
                         ids=lambda s: "+".join(sorted(s)))
def test_emulated_precision_needs_subsets(emu, needs):
    case = make_case("precision", "bernoulli", 21, 45, 7, torch.float64, seed=5)
    run_emulated(emu, "precision", case, torch.float64, needs)


@pytest.mark.parametrize("needs", [{"sigma2"}, {"weight"}, {"var"}, {"mean"}, {"bias", "x"}],
                         ids=lambda s: "+".join(sorted(s)))
def test_emulated_fixed_needs_subsets(emu, needs):
    case = make_case("fixed", "gaussian", 21, 45, 7, torch.float64, seed=6)
    run_emulated(emu, "fixed", case, torch.float64, needs)


def test_emulated_skips_unneeded_work(emu):
    """Only the bias gradients: the coefficient kernel and two column sums, nothing else."""
    case = make_case("precision", "bernoulli", 21, 45, 7, torch.float64, seed=8)
    emu.set_device(*DEVICES["small_tiles_split"])
    before = emu.launches()
    emu.backward("precision", case, upstream(21, torch.float64), {"bias", "precision_bias"})
    assert emu.launches() - before == 3
    before = emu.launches()
    emu.backward("precision", case, upstream(21, torch.float64), set())
    assert emu.launches() == before


@pytest.mark.parametrize("head", ["fixed", "precision"])
def test_emulated_without_biases(emu, head):
    case = make_case(head, "uniform", 19, 50, 4, torch.float64, seed=9, bias=False)
    run_emulated(emu, head, case, torch.float64, all_needs(head, case))
