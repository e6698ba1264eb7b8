"""Backend registry and selection.

Every op has three backends: ``"reference"`` (pure PyTorch, any device, the test oracle),
``"triton"`` and ``"cuda"`` (fused kernels). Callers pass ``backend="auto"`` or a name.

The ``auto`` rule (documented in the README next to the benchmark results):

* tensors on the CPU -> ``reference``;
* tensors on a CUDA device -> the first backend of ``AUTO_ORDER[op]`` that can run the call,
  ``reference`` last. The order is not a measurement yet (no GPU run has been made); the
  benchmark suite is what may reorder this table.
* ``ULTRON_KERNELS_BACKEND=<name>`` replaces ``auto`` (an explicit ``backend=`` argument wins).

An explicit backend that cannot run raises :class:`BackendUnavailableError` naming why;
there is never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Callable, Optional

import torch

from ultron_kernels import _cuda

BACKENDS = ("reference", "triton", "cuda")
AUTO_ORDER = {
    "channelwise_dilated_conv2d": ("triton", "cuda", "reference"),
    "grouped_depthwise_conv2d": ("triton", "cuda", "reference"),
    "window_attention": ("triton", "cuda", "reference"),
}
ENV_VAR = "ULTRON_KERNELS_BACKEND"



# Modules whose @triton.jit functions show the mode they were decorated in (triton's own
# helpers such as tl.cdiv, and our kernels), with one such function each.
_JIT_PROBES = (("triton.language.standard", "cdiv"),
               ("ultron_kernels.triton.grouped_depthwise_conv", "_grouped_conv_gather_kernel"),
               ("ultron_kernels.triton.window_attention", "_window_attn_fwd_kernel"))


def triton_interpreter_on() -> bool:
    """Whether Triton kernels run through its interpreter (on CPU tensors, slowly: the way
    they are tested without a GPU). Triton fixes the mode of each @triton.jit function when
    its module is imported, reading TRITON_INTERPRET then: so once triton (or one of our
    kernel modules) is imported, its functions' actual mode decides, not the variable's
    current value. This package imports triton only at the first fused call, so setting the
    variable any time before that works."""
    decorated = [getattr(sys.modules[module], name, None) for module, name in _JIT_PROBES
                 if module in sys.modules]
    if not decorated:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return all(type(fn).__name__ == "InterpretedFunction" for fn in decorated)


def _triton_mode_mismatch() -> Optional[str]:
    """Why TRITON_INTERPRET=1 has no effect: triton was imported before it was set."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and not triton_interpreter_on():
        return ("TRITON_INTERPRET=1 was set after triton was imported (by torch.compile or another "
                "library), so its functions were already compiled for a GPU; set TRITON_INTERPRET=1 "
                "before triton is imported, e.g. at the top of the script or in the environment")
    return None


def autotune_enabled() -> bool:
    """ULTRON_KERNELS_AUTOTUNE=0 launches the Triton kernels with their fixed default
    configurations instead of autotuning each new shape (the GPU test sweeps use it: a tuning
    per random shape would cost seconds each)."""
    return os.environ.get("ULTRON_KERNELS_AUTOTUNE", "1") != "0"


AUTOTUNE_CONFIGS_VAR = "ULTRON_KERNELS_AUTOTUNE_CONFIGS"


def autotune_config_limit() -> Optional[int]:
    """ULTRON_KERNELS_AUTOTUNE_CONFIGS=K: the autotuners time only the first K configurations
    that fit the device, in each list's order of preference (each timed configuration is a
    compile: `make gpu-lease` sets K so that tuning costs seconds, not minutes). Unset: all."""
    value = os.environ.get(AUTOTUNE_CONFIGS_VAR)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{AUTOTUNE_CONFIGS_VAR} must be a positive integer, got {value!r}")
    return int(value)


# Only look for triton here: importing it fixes its interpreter mode (see above).
_TRITON_IMPORT_ERROR = ("" if importlib.util.find_spec("triton") is not None
                        else "triton is not installed")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


def no_cuda_device_reason() -> Optional[str]:
    """Why no CUDA device can be used here, or None when one can (asked without touching the
    driver: torch's own calls raise "Found no NVIDIA driver" on such a machine)."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"no CUDA device: torch {torch.__version__} is a CPU-only build"
    return "no CUDA device is visible here (torch.cuda.is_available() is False: no NVIDIA GPU or driver)"


def _device_reason(backend: str, device: torch.device) -> Optional[str]:
    if device.type == "cuda" and no_cuda_device_reason():
        return no_cuda_device_reason()
    if backend == "reference" or device.type == "meta":
        # Meta tensors (shape inference, models built on torch.device("meta")) run every
        # backend through its custom op's fake implementation.
        return None
    if backend == "triton":
        if _TRITON_IMPORT_ERROR:
            return _TRITON_IMPORT_ERROR
        if device.type == "cuda":
            return _triton_arch_reason(device)
        if device.type == "cpu" and triton_interpreter_on():
            return None
        if device.type == "cpu" and _triton_mode_mismatch():
            return _triton_mode_mismatch()
        return (f"tensors are on '{device.type}'; Triton needs a CUDA device "
                "(or TRITON_INTERPRET=1 set before triton is imported, to run on the CPU)")
    if backend == "cuda":
        if device.type == "cpu":
            return _cuda.simulation_reason()
        if device.type != "cuda":
            return f"tensors are on '{device.type}'; the CUDA kernels need a CUDA device"
        if not _cuda.HAS_CUDA_EXTENSION:
            return _cuda.CUDA_EXTENSION_ERROR
        return _cuda.arch_reason(device)
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


# Triton's NVIDIA backend supports compute capability 8.0 and later (Triton's README).
TRITON_MIN_CAPABILITY = (8, 0)


def _triton_arch_reason(device: torch.device) -> Optional[str]:
    capability = torch.cuda.get_device_capability(device)
    if capability >= TRITON_MIN_CAPABILITY:
        return None
    return (f"Triton supports NVIDIA GPUs of compute capability {TRITON_MIN_CAPABILITY[0]}."
            f"{TRITON_MIN_CAPABILITY[1]} and later; this GPU ({torch.cuda.get_device_name(device)}) "
            f"is sm_{capability[0]}{capability[1]}")


_warned: set = set()


def _warn_reference_fallback(op: str, reasons: dict[str, str]) -> None:
    """Once per process and reason: ``auto`` found no fused backend for a CUDA device."""
    key = tuple(sorted(reasons.items()))
    if key in _warned:
        return
    _warned.add(key)
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    warnings.warn(f"ultron_kernels: no fused backend can run on this GPU, {op} runs on the "
                  f"PyTorch reference path ({detail})", RuntimeWarning, stacklevel=4)


def available_backends(device: Optional[torch.device | str] = None) -> dict[str, str]:
    """Map each backend name to ``"available"`` or to the reason it cannot run here.

    ``device`` defaults to the current CUDA device when there is one, else the CPU.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return {name: (_device_reason(name, device) or "available") for name in BACKENDS}


def auto_backend(device: torch.device) -> str:
    """The backend ``auto`` runs on ``device`` for a call every fused backend can take: the
    environment's ULTRON_KERNELS_BACKEND if set, the reference on the CPU, else the first fused
    backend available on the device (the order of AUTO_ORDER)."""
    if os.environ.get(ENV_VAR) in BACKENDS:
        return os.environ[ENV_VAR]
    if device.type != "cuda":
        return "reference"
    fused = [name for name in AUTO_ORDER["window_attention"] if name != "reference"]
    return next((name for name in fused if _device_reason(name, device) is None), "reference")


def select_backend(op: str, requested: str, device: torch.device,
                   op_reason: Callable[[str], Optional[str]]) -> str:
    """Resolve ``requested`` to a concrete backend for one call of ``op``.

    ``op_reason(name)`` returns why the op cannot use backend ``name`` for this call
    (unsupported head_dim, dtype, ...) or None.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    source = f"backend={requested!r}"
    if requested == "auto" and os.environ.get(ENV_VAR):
        requested = os.environ[ENV_VAR]
        source = f"backend {requested!r} (from the environment: {ENV_VAR}={requested})"
        if requested not in ("auto",) + BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {('auto',) + BACKENDS}, got {requested!r}")
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")

    def reason(name: str) -> Optional[str]:
        return _device_reason(name, device) or op_reason(name)

    if requested != "auto":
        why = reason(requested)
        if why is not None:
            raise BackendUnavailableError(f"{op}: {source} cannot run this call: {why}")
        return requested
    if device.type != "cuda":
        return "reference"
    fused = [name for name in AUTO_ORDER[op] if name != "reference"]
    for name in fused:
        if reason(name) is None:
            return name
    device_reasons = {name: _device_reason(name, device) for name in fused}
    if all(device_reasons.values()):  # not this call's shape: the GPU itself
        _warn_reference_fallback(op, device_reasons)
    return "reference"
