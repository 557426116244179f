"""Build script: the package plus the optional compiled extension ``silent_kernels._C``.

torch is imported here, so install with ``pip install --no-build-isolation`` into an
environment that already has torch (torch is deliberately not a build requirement).
The CPU kernels (csrc/*.cpp) are always built; the CUDA kernels (csrc/cuda/*.cu) only
when torch has CUDA and nvcc is found. ``SILENT_KERNELS_NO_EXTENSION=1`` skips the
extension altogether (the package then runs on its pure-torch reference backend);
``SILENT_KERNELS_NO_CUDA=1`` builds the CPU kernels only.
"""

import glob
import os
import platform
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def extension_modules():
    if _flag("SILENT_KERNELS_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("silent_kernels: torch not importable at build time; building without the extension "
              "(install torch first and use pip install --no-build-isolation)")
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if not sources:
        return [], {}
    # -fno-math-errno lets exp/log vectorise (csrc/cpu_vector_math.h): nothing reads errno;
    # -fno-trapping-math lets the per-pixel and per-latent loops if-convert their branches (as
    # PyTorch's own build does)
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]  # without it at link time at::parallel_for runs on one core
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        link_flags.append("-lmvec")  # glibc's vector exp/log, called by the tilted contractions
    include_dirs = [os.path.join(HERE, "csrc")]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and not _flag("SILENT_KERNELS_NO_CUDA"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "silent_kernels._C", sources, include_dirs=include_dirs,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "silent_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["silent_kernels", "silent_kernels.api", "silent_kernels.api.reproduce"],
    package_dir={"silent_kernels": "silent_kernels", "silent_kernels.api": "python_api"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
