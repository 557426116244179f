"""Host emulation of the CUDA backend (tests only): builds and loads ``libsk_cuda_emul.so``.

Every ``csrc/cuda/*.cu`` is compiled as host C++ by g++ (C++20) with ``sk_emul.h`` force-included
and each ``kernel<<<grid, block, smem, stream>>>(args)`` rewritten to
``::sk_emul::launch(::sk_emul::Cfg(grid, block, smem, stream), kernel, args)``; ``emu_api.cpp``
adds ctypes entry points over the launchers of ``csrc/cuda/kernels.h``. The library is built
once per test session (``build()`` is cached) and shared by tests/test_cuda_backend.py and
tests/test_cuda_heads.py.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
CSRC = os.path.join(ROOT, "csrc")
CUDA_DIR = os.path.join(CSRC, "cuda")
SHIM = os.path.join(HERE, "sk_emul.h")
API = os.path.join(HERE, "emu_api.cpp")

# kernel<...><<<grid, block, smem, stream>>>(args) -> ::sk_emul::launch(Cfg(grid, ...), kernel<...>, args)
_LAUNCH = re.compile(r"(\b\w+(?:<[^;{}]*?>)?)<<<(.*?)>>>\(", re.S)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

PRECISION_HEADS = {"taylor": 0, "exact": 1, "logvar": 2}
CATEGORICAL_HEADS = {"fixed": 3, "taylor": 0, "logvar": 2}
CATEGORICAL_INPUTS = ("x", "logits", "weight", "bias", "second_weight", "second_bias", "sigma2")


class Unavailable(Exception):
    """The emulation cannot be built here (the reason is the message): tests skip."""


def cuda_include():
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))):
        if cand and os.path.isfile(os.path.join(cand, "include", "cuda_fp16.h")):
            return os.path.join(cand, "include")
    return None


def emulated_source(path: str) -> str:
    """A .cu file's text with its kernel launches rewritten for the emulation."""
    with open(path) as f:
        text = f.read()
    return f'#line 1 "{path}"\n' + _LAUNCH.sub(r"::sk_emul::launch(::sk_emul::Cfg(\2), \1, ", text)


@functools.lru_cache(maxsize=1)
def build() -> "Emulated":
    """Compile and load the emulated backend once per process; raises Unavailable."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise Unavailable("g++ not found")
    inc = cuda_include()
    if inc is None:
        raise Unavailable("CUDA headers (cuda_fp16.h) not found")
    out = tempfile.mkdtemp(prefix="sk_cuda_emul_")
    sources = []
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        dst = os.path.join(out, os.path.basename(path)[:-3] + ".cpp")
        with open(dst, "w") as f:
            f.write(emulated_source(path))
        sources.append(dst)
    sources.append(API)
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w", "-include", SHIM,
             f"-I{CSRC}", f"-I{CUDA_DIR}", f"-I{inc}"]

    def compile_one(src):
        obj = os.path.join(out, os.path.basename(src) + ".o")
        proc = subprocess.run([gxx, *flags, "-c", src, "-o", obj], capture_output=True, text=True,
                              timeout=900)
        return obj, proc

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, sources))
    for obj, proc in results:
        if proc.returncode != 0:
            if "<barrier>" in proc.stderr or "std::barrier" in proc.stderr:
                raise Unavailable("g++ without C++20 <barrier>")
            raise RuntimeError(f"host compile of the CUDA sources failed ({obj}):\n{proc.stderr[-6000:]}")
    lib_path = os.path.join(out, "libsk_cuda_emul.so")
    proc = subprocess.run([gxx, "-shared", "-pthread", *[o for o, _ in results], "-o", lib_path],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return Emulated(ctypes.CDLL(lib_path))


def _ptr(t):
    return None if t is None else t.data_ptr()


class Emulated:
    """The CUDA launchers of kernels.h, host-compiled, called on CPU tensors.

    ``case`` dicts hold the op inputs in op order (None for an absent optional input)."""

    def __init__(self, lib):
        self.lib = lib
        v, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.emu_fixed_forward.argtypes = [c_int] + [v] * 6 + [i64] * 3 + [v, v]
        lib.emu_precision_forward.argtypes = [c_int] + [v] * 9 + [i64] * 3 + [v, v, c_int]
        lib.emu_fixed_backward.argtypes = [c_int] + [v] * 7 + [i64] * 3 + [v, v]
        lib.emu_precision_backward.argtypes = [c_int] + [v] * 10 + [i64] * 3 + [v, v, c_int]
        lib.emu_bernoulli_forward.argtypes = [c_int] + [v] * 6 + [i64] * 3 + [v, v]
        lib.emu_bernoulli_backward.argtypes = [c_int] + [v] * 7 + [i64] * 3 + [v, v]
        lib.emu_categorical_forward.argtypes = [c_int, v, i64, i64, i64, i64, c_int, v, v]
        lib.emu_categorical_backward.argtypes = [c_int, v, v, i64, i64, i64, i64, c_int, v, v]
        lib.emu_launches.restype = ctypes.c_long

    def set_device(self, device: int, sm_count: int):
        self.lib.emu_set_device(device, sm_count)

    def launches(self) -> int:
        return self.lib.emu_launches()

    @staticmethod
    def _sizes(case, latent_key):
        B, k = case["x"].shape
        return B, k, case[latent_key].shape[1]

    @staticmethod
    def _outs(case, needs, dtype):
        outs = {name: torch.full(t.shape, float("nan"), dtype=dtype)
                for name, t in case.items() if name in needs and t is not None}
        ptrs = [outs[name].data_ptr() if name in outs else None for name in case]
        return outs, (ctypes.c_void_p * len(ptrs))(*ptrs)

    def forward(self, head, case, precision_head=0, rc_expected=0):
        """head "fixed" or "precision" (precision_head: 0 Taylor, 1 exact log, 2 log-variance)."""
        x = case["x"]
        B, k, d = self._sizes(case, "mean")
        loss = torch.full((B,), float("nan"), dtype=x.dtype)
        info = (ctypes.c_int64 * 8)()
        args = [DTYPE_CODE[x.dtype], *[_ptr(t) for t in case.values()], B, k, d, loss.data_ptr(), info]
        if head == "fixed":
            rc = self.lib.emu_fixed_forward(*args)
        else:
            rc = self.lib.emu_precision_forward(*args, precision_head)
        assert rc == rc_expected, f"launcher returned CUDA error {rc}"
        return loss, list(info)

    def backward(self, head, case, grad, needs, precision_head=0, rc_expected=0):
        x = case["x"]
        B, k, d = self._sizes(case, "mean")
        outs, arr = self._outs(case, needs, x.dtype)
        info = (ctypes.c_int64 * 8)()
        args = [DTYPE_CODE[x.dtype], grad.data_ptr(), *[_ptr(t) for t in case.values()], B, k, d, arr, info]
        if head == "fixed":
            rc = self.lib.emu_fixed_backward(*args)
        else:
            rc = self.lib.emu_precision_backward(*args, precision_head)
        assert rc == rc_expected, f"launcher returned CUDA error {rc}"
        return outs, list(info)

    def bernoulli_forward(self, case):
        """case: x, logits, weight, bias, logvar_weight, logvar_bias."""
        x = case["x"]
        B, k, d = self._sizes(case, "logits")
        loss = torch.full((B,), float("nan"), dtype=x.dtype)
        info = (ctypes.c_int64 * 8)()
        rc = self.lib.emu_bernoulli_forward(DTYPE_CODE[x.dtype], *[_ptr(t) for t in case.values()],
                                            B, k, d, loss.data_ptr(), info)
        assert rc == 0, f"launcher returned CUDA error {rc}"
        return loss, list(info)

    def bernoulli_backward(self, case, grad, needs):
        x = case["x"]
        B, k, d = self._sizes(case, "logits")
        outs, arr = self._outs(case, needs, x.dtype)
        info = (ctypes.c_int64 * 8)()
        rc = self.lib.emu_bernoulli_backward(DTYPE_CODE[x.dtype], grad.data_ptr(),
                                             *[_ptr(t) for t in case.values()], B, k, d, arr, info)
        assert rc == 0, f"launcher returned CUDA error {rc}"
        return outs, list(info)

    @staticmethod
    def _categorical_inputs(case):
        ptrs = [_ptr(case.get(name)) for name in CATEGORICAL_INPUTS]
        return (ctypes.c_void_p * len(ptrs))(*ptrs)

    def categorical_forward(self, case, head, rc_expected=0):
        """case: the op inputs by CATEGORICAL_INPUTS name (logits (B, G, K)); head 3 fixed,
        0 Taylor precision, 2 log-variance (or its name)."""
        head = CATEGORICAL_HEADS.get(head, head)
        x, logits = case["x"], case["logits"]
        B, k = x.shape
        _, G, K = logits.shape
        loss = torch.full((B,), float("nan"), dtype=x.dtype)
        info = (ctypes.c_int64 * 8)()
        rc = self.lib.emu_categorical_forward(DTYPE_CODE[x.dtype], self._categorical_inputs(case),
                                              B, k, G, K, head, loss.data_ptr(), info)
        assert rc == rc_expected, f"launcher returned CUDA error {rc}"
        return loss, list(info)

    def categorical_backward(self, case, head, grad, needs, rc_expected=0):
        """Gradients (dict by input name) for the inputs in needs that are present."""
        head = CATEGORICAL_HEADS.get(head, head)
        x, logits = case["x"], case["logits"]
        B, k = x.shape
        _, G, K = logits.shape
        outs = {name: torch.full(case[name].shape, float("nan"), dtype=x.dtype)
                for name in CATEGORICAL_INPUTS if name in needs and case.get(name) is not None}
        ptrs = [outs[name].data_ptr() if name in outs else None for name in CATEGORICAL_INPUTS]
        arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        info = (ctypes.c_int64 * 8)()
        rc = self.lib.emu_categorical_backward(DTYPE_CODE[x.dtype], grad.data_ptr(),
                                               self._categorical_inputs(case), B, k, G, K, head,
                                               arr, info)
        assert rc == rc_expected, f"launcher returned CUDA error {rc}"
        return outs, list(info)
