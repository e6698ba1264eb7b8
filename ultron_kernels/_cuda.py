"""Loads the compiled extensions built from csrc/, when they were built.

* ``ultron_kernels._C``: the CUDA kernels as ``torch.ops.ultron_kernels_cuda.*``, for CUDA
  tensors.
* ``ultron_kernels._C_sim``: the same kernel sources compiled as host C++ against the CUDA
  host simulation (csrc/sim/), as ``torch.ops.ultron_kernels_cuda_sim.*`` for CPU tensors.
  It is used only when ``ULTRON_KERNELS_CUDA_SIM=1``: it runs the CUDA backend's own code on
  the CPU, slowly, to test it without a GPU (as ``TRITON_INTERPRET=1`` does for Triton).

When an extension is missing, the ``*_ERROR`` strings say why, so that backend selection can
report the reason instead of failing later.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
from typing import Optional

import torch

SIM_ENV_VAR = "ULTRON_KERNELS_CUDA_SIM"
_BUILD_HINT = ("to build it: `pip install --no-build-isolation .` from a checkout of the source "
               "(README, Install)")


def _installed_copy_with(module: str) -> Optional[str]:
    """The folder of an installed ultron_kernels that has ``module`` built, when the package
    imported here is another folder: a source checkout (the current directory, say) shadows
    the installed package and its extensions."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        files = importlib.metadata.files("ultron_kernels") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name.startswith(f"{module}.") and entry.name.endswith((".so", ".pyd")):
            folder = os.path.dirname(os.path.abspath(str(entry.locate())))
            if folder != here and os.path.exists(str(entry.locate())):
                return folder
    return None


def _load(module: str, what: str, needs: str) -> str:
    """Imports ultron_kernels.<module> (registering its operators); returns why it could
    not be, or ''."""
    if importlib.util.find_spec(f"ultron_kernels.{module}") is None:
        installed = _installed_copy_with(module)
        if installed:
            here = os.path.dirname(os.path.abspath(__file__))
            return (f"ultron_kernels was imported from {here}, a source checkout without its {what}, which "
                    f"shadows the installed copy in {installed} (which has it): run from another directory, "
                    "or build the checkout in place with `pip install --no-build-isolation -e .`")
        return f"ultron_kernels was installed without its {what} (ultron_kernels.{module}); {_BUILD_HINT}, {needs}"
    try:
        importlib.import_module(f"ultron_kernels.{module}")
    except ImportError as exc:  # built, but it does not load here (torch version, libraries)
        return f"ultron_kernels.{module} is built but does not load ({exc}); rebuild it: {_BUILD_HINT}"
    return ""


CUDA_EXTENSION_ERROR = _load("_C", "CUDA extension", "with nvcc and a CUDA build of torch")
HAS_CUDA_EXTENSION = not CUDA_EXTENSION_ERROR


# ultron_kernels_cuda_sim::* (CPU only; used when SIM_ENV_VAR is set).
SIM_EXTENSION_ERROR = _load("_C_sim", "CUDA host simulation", "with the CUDA headers (cuda_fp16.h) present")


def simulation_enabled() -> bool:
    """ULTRON_KERNELS_CUDA_SIM=1: backend="cuda" runs on CPU tensors through the simulation."""
    return os.environ.get(SIM_ENV_VAR, "0") == "1"


def simulation_reason() -> Optional[str]:
    """Why the CUDA kernels cannot run on CPU tensors here, or None when they can."""
    if not simulation_enabled():
        return (f"tensors are on 'cpu'; the CUDA kernels need a CUDA device (or {SIM_ENV_VAR}=1 "
                "to run them on the CPU through the host simulation)")
    return SIM_EXTENSION_ERROR or None


def cuda_ops(device: torch.device):
    """The namespace of the compiled operators for tensors on ``device``; raises with the
    reason if the extension that serves it is missing."""
    if device.type == "cpu":
        why = simulation_reason()
        if why is not None:
            raise RuntimeError(why)
        return torch.ops.ultron_kernels_cuda_sim
    if not HAS_CUDA_EXTENSION:
        raise RuntimeError(CUDA_EXTENSION_ERROR)
    return torch.ops.ultron_kernels_cuda


def shared_memory_per_block(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device``: the simulated device's on the CPU."""
    if device.type == "cpu":
        return int(cuda_ops(device).device_properties()[3])
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_shared_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def built_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST ultron_kernels._C was built with ('' if unknown or not built)."""
    if not HAS_CUDA_EXTENSION or not hasattr(torch.ops.ultron_kernels_cuda, "cuda_arch_list"):
        return ""
    return torch.ops.ultron_kernels_cuda.cuda_arch_list()


_ARCH_ENTRY = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a binary built for ``arch_list`` has a kernel image for a GPU of
    ``capability``: machine code for the same major version and a minor version not above
    the GPU's (sm_80 code runs on sm_86), or PTX for an architecture not above the GPU's,
    which the driver compiles at load."""
    for entry in arch_list.replace(" ", ";").split(";"):
        m = _ARCH_ENTRY.match(entry.strip())
        if not m:
            continue
        built = (int(m[1]), int(m[2]))
        if m[3]:  # sm_90a-style code runs on that exact architecture only
            if built == capability:
                return True
        elif m[4] and built <= capability:
            return True
        elif built[0] == capability[0] and built[1] <= capability[1]:
            return True
    return False


def arch_reason(device: torch.device) -> Optional[str]:
    """Why ultron_kernels._C has no kernel image for ``device``'s GPU, or None."""
    arch_list = built_arch_list()
    if not arch_list:
        return None
    capability = torch.cuda.get_device_capability(device)
    if runs_on(arch_list, capability):
        return None
    major, minor = capability
    return (f"ultron_kernels._C was built for TORCH_CUDA_ARCH_LIST={arch_list!r}; this GPU "
            f"({torch.cuda.get_device_name(device)}) is sm_{major}{minor}: rebuild it with "
            f"TORCH_CUDA_ARCH_LIST={major}.{minor} pip install --no-build-isolation . "
            "(or unset TORCH_CUDA_ARCH_LIST on this machine: the build then targets its GPU)")
