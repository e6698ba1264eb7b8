"""Argument checks and autocast handling shared by the ops' public functions."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def check_tensor(name: str, value, dims: Optional[int] = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(value.shape)}")


# Sizes the kernels index with 32-bit integers.
MAX_INT32 = 2**31 - 1


def check_int32_sizes(name: str, t: torch.Tensor) -> None:
    big = [s for s in t.shape if s > MAX_INT32]
    if big:
        raise ValueError(f"{name}: every dimension must be < 2**31 (the kernels index with 32-bit "
                         f"integers), got shape {tuple(t.shape)}")


def check_same_device_and_dtype(**tensors: Optional[torch.Tensor]) -> None:
    """All given tensors (None skipped) share the first one's device and dtype."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def autocast_inputs(*tensors: Optional[torch.Tensor]):
    """Under AMP autocast, cast floating inputs to the autocast dtype (as matmul/conv do);
    outside autocast, return them unchanged. Custom ops are not autocast by PyTorch itself."""
    floating = [t for t in tensors if t is not None]
    device_type = floating[0].device.type
    # Devices without autocast (meta: shape inference) take the tensors as they are.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def no_autocast(device_type: str):
    """A context in which autocast is off on ``device_type`` (a no-op where it has none: meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
