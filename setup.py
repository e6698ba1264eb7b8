"""Build of ultron_kernels: pure Python, plus two extensions from the same csrc/ sources:

* ``ultron_kernels._C``: the CUDA kernels, when a CUDA-enabled torch and nvcc are present.
  ULTRON_KERNELS_BUILD_CUDA=1 forces it (fails loudly if it cannot be built), =0 skips it.
* ``ultron_kernels._C_sim``: the same kernels compiled as host C++ against the CUDA host
  simulation (csrc/sim/), for CPU tensors; needs only torch, a C++20 compiler and the CUDA
  headers (cuda_fp16.h, ...: a CUDA toolkit or pip's nvidia runtime headers). Built whenever
  those are found; ULTRON_KERNELS_BUILD_SIM=1 forces it, =0 skips it.

TORCH_CUDA_ARCH_LIST picks the CUDA targets. Unset, it follows torch's rule when a GPU is
visible (the architectures of the GPUs present); with none (CI, wheels) it is
DEFAULT_ARCH_LIST: A100 (8.0), A10/A40/RTX 30xx (8.6), L4/L40/RTX 40xx (8.9), H100/H200 (9.0),
plus PTX for later GPUs. The list is compiled into the extension, so that the package can say
when the running GPU has no kernel image. MAX_JOBS sets the parallel compile jobs,
ULTRON_KERNELS_DEBUG=1 builds with -O0 -g (-G for CUDA).
"""

import glob
import importlib.util
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("ULTRON_KERNELS_BUILD_CUDA")
    try:
        import torch
    except ImportError:
        if flag == "1":
            raise SystemExit("ULTRON_KERNELS_BUILD_CUDA=1, but torch is not installed: install a CUDA "
                             "build of torch first, then build with --no-build-isolation")
        return False
    if flag is not None:
        if flag == "1" and torch.version.cuda is None:
            raise SystemExit(f"ULTRON_KERNELS_BUILD_CUDA=1, but torch {torch.__version__} is a CPU-only "
                             "build (torch.version.cuda is None): install a CUDA build of torch, or "
                             "build without the CUDA extension (ULTRON_KERNELS_BUILD_CUDA=0)")
        return flag == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' architectures; else the default."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in capabilities)
    return DEFAULT_ARCH_LIST


def _cuda_header_dirs() -> list[str]:
    spec = importlib.util.spec_from_file_location("cuda_headers", os.path.join(ROOT, "tools", "cuda_headers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cuda_header_dirs()


def _want_sim() -> bool:
    flag = os.environ.get("ULTRON_KERNELS_BUILD_SIM")
    if flag is not None:
        return flag == "1"
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return bool(_cuda_header_dirs())


def _extensions():
    exts = []
    debug = os.environ.get("ULTRON_KERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    if _want_cuda():
        from torch.utils.cpp_extension import CUDAExtension

        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
        built_for = [f'-DULTRON_KERNELS_CUDA_ARCHS="{arch_list}"']
        nvcc = opt + (["-G"] if debug else ["-lineinfo"]) + ["--use_fast_math"] + built_for
        sources = sorted(glob.glob("csrc/*/*.cu")) + ["csrc/bindings.cpp"]
        exts.append(CUDAExtension(
            name="ultron_kernels._C",
            sources=sources,
            extra_compile_args={"cxx": opt + built_for, "nvcc": nvcc},
            py_limited_api=False,
        ))
    if _want_sim():
        from torch.utils.cpp_extension import CppExtension

        exts.append(CppExtension(
            name="ultron_kernels._C_sim",
            sources=sorted(glob.glob("csrc/sim/*.cpp")),
            include_dirs=_cuda_header_dirs(),
            define_macros=[("ULTRON_CUDA_SIM", "1")],
            extra_compile_args={"cxx": (["-O0", "-g"] if debug else ["-O2"])},
            py_limited_api=False,
        ))
    if not exts:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
