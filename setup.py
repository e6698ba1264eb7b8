"""Build of ultron_kernels: pure Python, plus the CUDA extension ``ultron_kernels._C`` (csrc/)
when a CUDA-enabled torch and nvcc are present.

ULTRON_KERNELS_BUILD_CUDA=1 forces the extension (fails loudly if it cannot be built),
ULTRON_KERNELS_BUILD_CUDA=0 skips it. TORCH_CUDA_ARCH_LIST picks the targets (default 9.0),
MAX_JOBS the parallel compile jobs, ULTRON_KERNELS_DEBUG=1 builds with -O0 -g -G.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("ULTRON_KERNELS_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _extensions():
    if not _want_cuda():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    debug = os.environ.get("ULTRON_KERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    nvcc = opt + (["-G"] if debug else ["-lineinfo"]) + ["--use_fast_math"]
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True)) + ["csrc/bindings.cpp"]
    ext = CUDAExtension(
        name="ultron_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": opt, "nvcc": nvcc},
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
