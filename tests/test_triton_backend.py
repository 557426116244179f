"""The Triton backend: what only it has.

Its results against the reference on every case of the shared table are in
tests/test_backends.py (without a GPU the kernels run in the Triton interpreter: tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports them). Here: the int64 index helpers, the GPU
block configurations run in the interpreter, the compiled-out cumulant path, the autograd.Function
entry, the TF32 trap, the ahead-of-time GPU build without spills, and GPU determinism.
"""

from __future__ import annotations

import pytest
import torch

from silent_kernels import reference
from tests.backend_cases import Case, Problem, assert_matches_reference, relative_error

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from silent_kernels import triton_common  # noqa: E402  (after TRITON_INTERPRET is set; registers the ops)
from silent_kernels.triton_common import offsets, plane, tile_index  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.silent_kernels
FP32_TOL = 1e-5  # what float32 arithmetic with ieee (not TF32) dots achieves on the TF32 trap


def _assert_rel(actual, expected, tol, what=""):
    error = relative_error(actual, expected)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol:g}"


def _op_inputs(head, family="bernoulli", B=3, k=7, d=4, dtype=torch.float32, seed=5):
    return Problem(Case(B, d, k, head=head, family=family, dtype=dtype, seed=seed)).op_inputs(DEVICE)


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


# ------------------------------------------------------------ block configurations
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head,family", [("fixed", "gaussian"), ("precision", "gaussian"),
                                         ("precision", "bernoulli")])
def test_gpu_block_table(monkeypatch, dtype, head, family):
    """The GPU block configurations (smaller tiles than the interpreter's), run here with
    several ragged tiles along every dimension of every kernel."""
    monkeypatch.setattr(triton_common, "sized_to_problem", lambda device: False)
    case = Case(37, 35, 70, head=head, family=family, dtype=dtype, seed=41)
    assert_matches_reference(Problem(case), "triton", DEVICE)


# ---------------------------------------------------------- compiled-out cumulants, entry points
def test_absent_cumulants_equal_zero_cumulants():
    """k3/k4 = None (the compiled-out path) gives what explicit zero tensors give."""
    inputs = _op_inputs("precision", "gaussian")
    zeros = torch.zeros_like(inputs[1])
    with_none = OPS.triton_precision_nll(*inputs)
    with_zeros = OPS.triton_precision_nll(*inputs[:3], zeros, zeros, *inputs[5:])
    _assert_rel(with_none, with_zeros, 1e-6)
    grad = torch.tensor([1.0, 2.0, -1.0], device=DEVICE)
    needs = [True] * 9
    a = OPS.triton_precision_nll_backward(grad, *inputs, needs)
    b = OPS.triton_precision_nll_backward(grad, *inputs[:3], zeros, zeros, *inputs[5:], needs)
    for i in (0, 1, 2, 5, 6, 7, 8):
        _assert_rel(a[i], b[i], 1e-6, f"input {i}")
    assert a[3].numel() == 0 and a[4].numel() == 0


def test_public_function_api():
    """The ops are also reachable through the shared autograd.Function wrappers."""
    from silent_kernels.autograd import FixedNLLFunction, PrecisionNLLFunction

    for function, head, family in ((FixedNLLFunction, "fixed", "gaussian"),
                                   (PrecisionNLLFunction, "precision", "bernoulli")):
        inputs = _op_inputs(head, family)
        reference_op = reference.fixed_nll if head == "fixed" else reference.precision_nll
        expected = reference_op(*[t.double().cpu() if t is not None else None for t in inputs])
        _assert_rel(function.apply(*inputs, "triton"), expected, FP32_TOL, head)


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
    assert relative_error(tf32, exact) > 100 * FP32_TOL
    (x, mean, var, weight), sigma2 = tf32_trap_case()
    got = OPS.triton_fixed_nll(x.float(), mean.float(), var.float(), weight.float(), None, sigma2.float())
    _assert_rel(got, exact, FP32_TOL, "tf32 trap")


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
def test_gpu_tf32_trap():
    torch.backends.cuda.matmul.allow_tf32 = True  # must not matter: the kernels ask for ieee dots
    try:
        (x, mean, var, weight), sigma2 = tf32_trap_case(B=64, k=512, d=128, device="cuda")
        exact = reference.fixed_nll(*(t.cpu() for t in (x, mean, var, weight)), None, sigma2.cpu())
        got = OPS.triton_fixed_nll(x.float(), mean.float(), var.float(), weight.float(), None, sigma2.float())
        _assert_rel(got, exact, FP32_TOL, "tf32 trap (cuda)")
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
