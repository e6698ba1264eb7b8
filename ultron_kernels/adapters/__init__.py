"""The adapters behind :func:`ultron_kernels.swap_in`: one table, one small adapter per
module type (ours, timm's, torchvision's).

An adapter recognises a module by its class (third-party classes by module path and name, so
that neither timm nor torchvision is imported here) and converts it in place. Third-party
modules keep their object, parameters, buffers and state_dict keys: the adapter only swaps
the module's class for a subclass whose forward runs our op (:func:`fused_class`), and
:func:`ultron_kernels.swap_out` swaps the original back. A module the adapter cannot convert
exactly is left alone, with the reason in the report.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

from torch import nn


class Unsupported(Exception):
    """The adapter recognises the module but cannot convert it; the message says why."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str                                              # what the report calls the module
    # Whether a module is a candidate: the kind of local operator this adapter is about (a
    # module that never could be, such as a pointwise conv, does not match and is not reported).
    matches: Callable[[nn.Module], bool]
    # convert(module, backend) -> (the module to put in its place, a note); raises Unsupported.
    convert: Callable[[nn.Module, str], tuple[nn.Module, str]]
    # The swap_in keyword that switches this adapter on (None: always on); without it, its
    # candidates are reported left alone, with that keyword named.
    opt_in: Optional[str] = None


def recognised_only(reason: str) -> Callable[[nn.Module, str], tuple[nn.Module, str]]:
    """The ``convert`` of a local operator we recognise but do not run yet: always left alone,
    with ``reason``, so that the report says so instead of passing it by in silence."""
    def convert(module: nn.Module, backend: str):
        raise Unsupported(reason)
    return convert


def class_named(module_path: str, class_name: str) -> Callable[[nn.Module], bool]:
    """Matches instances of exactly that class (not its subclasses: Swin V2's attention
    subclasses V1's), or of the fused subclass an adapter made from it."""
    def matches(module: nn.Module) -> bool:
        cls = getattr(type(module), "_ultron_original", type(module))
        return cls.__module__ == module_path and cls.__name__ == class_name
    return matches


_FUSED: dict = {}


def fused_class(original: type, overrides: dict, home: str) -> type:
    """The subclass of ``original`` with ``overrides`` (methods), made once and registered as
    ``<home>.Ultron<Name>`` so that pickling a swapped model finds it."""
    key = (original, home)
    if key not in _FUSED:
        name = f"Ultron{original.__name__}"
        cls = type(name, (original,), dict(overrides, _ultron_original=original,
                                           __module__=home, __qualname__=name))
        setattr(sys.modules[home], name, cls)
        _FUSED[key] = cls
    return _FUSED[key]


def set_fused(module: nn.Module, overrides: dict, home: str, backend: str) -> nn.Module:
    """Turn ``module`` (in place) into its fused subclass, running on ``backend``."""
    original = getattr(type(module), "_ultron_original", type(module))
    module.__class__ = fused_class(original, overrides, home)
    module._ultron_backend = backend
    return module


def restore(module: nn.Module) -> Optional[str]:
    """Undo :func:`set_fused`; returns the original class name, or None if not swapped."""
    original = getattr(type(module), "_ultron_original", None)
    if original is None:
        return None
    module.__class__ = original
    for name in [n for n in vars(module) if n.startswith("_ultron_")]:  # what the adapter stored
        delattr(module, name)
    return original.__name__


def adapters() -> list[Adapter]:
    from ultron_kernels.adapters import depthwise, ours, timm_conv, timm_sam, timm_swin, torchvision_swin

    return (ours.ADAPTERS + timm_swin.ADAPTERS + timm_sam.ADAPTERS + torchvision_swin.ADAPTERS
            + timm_conv.ADAPTERS + depthwise.ADAPTERS)
