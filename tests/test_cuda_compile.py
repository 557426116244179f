"""Compile checks of the CUDA backend that need no GPU.

- every ``csrc/cuda/*.cu`` compiles with nvcc for sm_89 and sm_90 (``-Xptxas -v``); the
  registers and spill bytes of every kernel are parsed, printed and recorded
  (``record_property``); the forward kernels must not spill; the categorical kernels stay within
  a register budget and at most the slow-path caller saves (CATEGORICAL_MAX_SPILL bytes);
- the objects of all .cu files link into one host program (no missing template
  instantiation), whose plan checks run on the host (no device needed);
- ``csrc/cuda/ops_cuda.cpp`` (the torch glue) passes ``g++ -fsyntax-only -DWITH_CUDA``
  against the installed torch's headers, and compiles to nothing without WITH_CUDA;
- the int64 offset functions of ``csrc/cuda/index.h`` give exact values beyond 2^31;
- the derivatives in ``csrc/epilogue.h`` (fixed, Taylor precision, exact log term, Gaussian and
  tilted log-variance heads, the Bernoulli tilt) match central finite differences.

The C++ host programs live in tests/cuda_emulation/*.cpp.

Everything is skipped cleanly (with the reason) when nvcc or g++ is missing.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
CSRC = os.path.join(ROOT, "csrc")
CUDA_DIR = os.path.join(CSRC, "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
CU_NAMES = [os.path.basename(p) for p in CU_FILES]
ARCHS = ("sm_89", "sm_90")
# kernels whose registers must fit without spilling (the forward pass)
NO_SPILL_KERNELS = ("fixed_forward_kernel", "precision_forward_kernel", "bernoulli_logvar_forward_kernel")
# The categorical kernels (csrc/cuda/categorical.cu) hold no register arrays and stay far below the
# register limit; what ptxas reports for some of them (the log-variance head's tilt, fp64 epilogues)
# are caller saves around the IEEE division / reciprocal slow-path subroutine, executed only on
# that slow path. They are bounded here: at most this many bytes, and no kernel over the registers.
CATEGORICAL_KERNELS = ("categorical_softmax_kernel", "categorical_forward_kernel", "categorical_coef_kernel",
                       "categorical_dlogits_kernel", "categorical_dweight_kernel")
CATEGORICAL_MAX_SPILL = 32
CATEGORICAL_MAX_REGISTERS = 192  # measured max: 142 (fp64 Taylor dweight, sm_89)
COMPILE_TIMEOUT = 600


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True):
        if os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _find_nvcc()
GXX = shutil.which("g++")
CXXFILT = shutil.which("c++filt")


def _cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 os.path.dirname(os.path.dirname(os.path.realpath(NVCC))) if NVCC else None,
                 "/usr/local/cuda"):
        if cand and os.path.isfile(os.path.join(cand, "include", "cuda_runtime_api.h")):
            return cand
    return None


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or /usr/local/cuda*/bin)")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ not found")


# ------------------------------------------------------------------------------ ptxas report
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict:
    """{mangled kernel: {"registers", "spill_stores", "spill_loads", "stack"}} from ptxas -v."""
    kernels: dict = {}
    current = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, {"registers": None, "spill_stores": 0, "spill_loads": 0,
                                         "stack": 0})
            continue
        m = _PROPS.search(line)
        if m:
            current = m.group(1)
            continue
        m = _SPILL.search(line)
        if m and current in kernels:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
            continue
        m = _REGS.search(line)
        if m and current in kernels:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


def demangle(names):
    names = list(names)
    if not names or CXXFILT is None:
        return {n: n for n in names}
    out = subprocess.run([CXXFILT], input="\n".join(names), capture_output=True, text=True).stdout
    heads = ("kTaylor", "kExactLog", "kLogVar", "kFixed")
    pretty = [re.sub(r"\((?:silent_kernels::)?Head\)(\d)", lambda m: "Head::" + heads[int(m.group(1))], s)
              for s in out.splitlines()]  # enum template arguments print as (silent_kernels::Head)1
    pretty = [re.sub(r"\(anonymous namespace\)::|silent_kernels::cuda::|silent_kernels::", "", s) for s in pretty]
    pretty = [s.split("(")[0].replace("void ", "", 1) for s in pretty]
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def test_parse_ptxas():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 14592 bytes smem
"""
    assert parse_ptxas(text) == {"_Z3fooPf": {"registers": 64, "spill_stores": 12, "spill_loads": 4,
                                              "stack": 8}}


# ------------------------------------------------------------------------------ nvcc compiles
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .cu for every arch (two at a time); {(name, arch): (returncode, log, obj)}."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out_dir = tmp_path_factory.mktemp("cuda_objs")

    def one(job):
        path, arch = job
        obj = os.path.join(out_dir, f"{os.path.basename(path)}.{arch}.o")
        cmd = [NVCC, "-c", "-std=c++17", f"-arch={arch}", "-Xptxas", "-v", "-I", CSRC, "-O3",
               path, "-o", obj]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
            return (os.path.basename(path), arch), (proc.returncode, proc.stdout + proc.stderr, obj)
        except subprocess.TimeoutExpired:
            return (os.path.basename(path), arch), (-1, f"timeout after {COMPILE_TIMEOUT}s", obj)

    jobs = [(p, a) for p in CU_FILES for a in ARCHS]
    # heaviest first, at most two compilers at once (the machine is shared)
    jobs.sort(key=lambda j: -os.path.getsize(j[0]))
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, jobs))


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_NAMES)
def test_cu_compiles(compiled, cu, arch, record_property):
    rc, log, _ = compiled[(cu, arch)]
    assert rc == 0, f"nvcc -arch={arch} failed on csrc/cuda/{cu}:\n{log[-6000:]}"
    kernels = parse_ptxas(log)
    pretty = demangle(kernels)
    lines = []
    for mangled, info in sorted(kernels.items(), key=lambda kv: pretty[kv[0]]):
        lines.append(f"{pretty[mangled]}: {info['registers']} registers, "
                     f"{info['spill_stores']} B spill stores, {info['spill_loads']} B spill loads")
        record_property(f"{cu}:{arch}:{pretty[mangled]}",
                        f"regs={info['registers']} spill_stores={info['spill_stores']} "
                        f"spill_loads={info['spill_loads']}")
    print(f"\n[{cu} {arch}] {len(kernels)} kernels\n  " + "\n  ".join(lines))
    spilling = [f"{pretty[m]} ({i['spill_stores']} B stores, {i['spill_loads']} B loads)"
                for m, i in kernels.items()
                if any(k in pretty[m] for k in NO_SPILL_KERNELS) and (i["spill_stores"] or i["spill_loads"])]
    assert not spilling, f"forward kernels spill on {arch}: {spilling}"
    if cu == "categorical.cu":
        names = [pretty[m] for m in kernels]
        for kind in CATEGORICAL_KERNELS:  # every kernel, every head and dtype, was compiled
            assert sum(kind in n for n in names) >= 4, (kind, names)
        heavy = [f"{pretty[m]} ({i['registers']} registers, {i['spill_stores']} B stores, {i['spill_loads']} B loads)"
                 for m, i in kernels.items()
                 if (i["registers"] or 0) > CATEGORICAL_MAX_REGISTERS
                 or max(i["spill_stores"], i["spill_loads"]) > CATEGORICAL_MAX_SPILL]
        assert not heavy, f"categorical kernels over budget on {arch}: {heavy}"


# ------------------------------------------------------------------------------ link + plans
PLAN_PROGRAM = os.path.join(ROOT, "tests", "cuda_emulation", "plans_main.cpp")


@needs_nvcc
def test_objects_link_and_plans(compiled, tmp_path):
    arch = "sm_90"
    failed = [name for (name, a), (rc, _, _) in compiled.items() if a == arch and rc != 0]
    if failed:
        pytest.skip(f"compile failures (reported by test_cu_compiles): {failed}")
    exe = tmp_path / "plans"
    objs = [obj for (name, a), (_, _, obj) in sorted(compiled.items()) if a == arch]
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-I", CSRC, PLAN_PROGRAM, *objs, "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    assert proc.returncode == 0, f"link failed (missing instantiation?):\n{proc.stderr[-6000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


# ------------------------------------------------------------------------------ torch glue
def _torch_includes():
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    return include_paths()


@needs_gxx
def test_ops_cuda_syntax(tmp_path):
    incs = _torch_includes()
    if incs is None:
        pytest.skip("torch not importable")
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAGuard.h")) for p in incs):
        pytest.skip("this torch install ships no c10/cuda headers")
    cuda_home = _cuda_home()
    if cuda_home is None:
        pytest.skip("CUDA include directory not found")
    # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; a CUDA build has it.
    stub = tmp_path / "stub"
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in incs):
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    src = os.path.join(CUDA_DIR, "ops_cuda.cpp")
    base = [GXX, "-fsyntax-only", "-std=c++17", *[f"-I{p}" for p in incs], f"-I{CSRC}"]
    with_cuda = base + ["-DWITH_CUDA", f"-I{stub}", f"-I{os.path.join(cuda_home, 'include')}", src]
    proc = subprocess.run(with_cuda, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    assert proc.returncode == 0, f"g++ -fsyntax-only -DWITH_CUDA failed:\n{proc.stderr[-6000:]}"
    # CPU-only builds compile csrc/cuda/*.cpp too: without WITH_CUDA it must be empty
    proc = subprocess.run(base + [src], capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ------------------------------------------------------------------------------ host programs
def _build_and_run(tmp_path, name, source, stdin=""):
    """Compile the host program at path `source` with g++ and run it; its stdout."""
    exe = tmp_path / name
    proc = subprocess.run([GXX, "-std=c++17", "-O1", "-Wall", f"-I{CSRC}", source, "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


OFFSET_PROGRAM = os.path.join(ROOT, "tests", "cuda_emulation", "offsets_main.cpp")


@needs_gxx
def test_offsets_beyond_int32(tmp_path):
    cases = [
        (70_000, 65_000, 70_000, 100_000, 784),            # row * ld ~ 4.9e9
        (2**31 - 1, 1, 1, 1, 1),                           # exactly past INT32_MAX
        (3_000_000, 783, 784, 3_000_000, 784),             # B * k of a big batch
        (9, 2**20, 2**21, 2**21, 784),                     # plane offset ~ 1.5e10
        (2**40, 12_345, 2**20, 3, 5),                      # far beyond 2^32
        (0, 0, 1, 1, 1),
    ]
    stdin = "\n".join(" ".join(map(str, c)) for c in cases) + "\n"
    out = _build_and_run(tmp_path, "offsets", OFFSET_PROGRAM, stdin).split("\n")
    for (a, b, c, d, e), line in zip(cases, out):
        expected = [a * c + b, (a * d + b) * e + c, -(-a // c), a // c, a % c]
        assert [int(v) for v in line.split()] == expected, (a, b, c, d, e)
    assert max(a * c + b for a, b, c, _, _ in cases) > 2**32


EPILOGUE_PROGRAM = os.path.join(ROOT, "tests", "cuda_emulation", "epilogue_fd_main.cpp")


@needs_gxx
def test_epilogue_gradients_match_finite_differences(tmp_path):
    out = _build_and_run(tmp_path, "epilogue_fd", EPILOGUE_PROGRAM)
    rows = [line.split() for line in out.strip().splitlines()]
    assert len(rows) == 12 * (13 + 10 + 6 + 3)
    worst = (0.0, None)
    for kind, point, j, analytic, fd in rows:
        analytic, fd = float(analytic), float(fd)
        err = abs(analytic - fd) / max(1.0, abs(fd))
        if err > worst[0]:
            worst = (err, (kind, point, j, analytic, fd))
    assert worst[0] < 1e-7, f"worst derivative mismatch {worst}"
