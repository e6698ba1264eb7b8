"""Adapters for the package's own modules: a backend attribute to set, or split convs to fuse."""

from __future__ import annotations

from ultron_kernels.adapters import Adapter
from ultron_kernels.nn import ChannelwiseDilatedConv2d, GroupedDepthwiseConv2d, SplitDilatedConv2d, WindowAttention


def _set_backend(module, backend: str):
    previous = module.backend
    module.backend = backend
    return module, f"backend {previous!r} -> {backend!r}"


def _fuse_split(module: SplitDilatedConv2d, backend: str):
    # Same weights, and the same state_dict keys (convs.<i>.weight / .bias).
    fused = ChannelwiseDilatedConv2d.from_split_convs(list(module.convs), backend)
    return fused, f"split + conv + cat -> ChannelwiseDilatedConv2d[{backend}]"


ADAPTERS = [
    Adapter("ultron_kernels ChannelwiseDilatedConv2d",
            lambda m: isinstance(m, ChannelwiseDilatedConv2d), _set_backend),
    Adapter("ultron_kernels GroupedDepthwiseConv2d",
            lambda m: isinstance(m, GroupedDepthwiseConv2d), _set_backend),
    Adapter("ultron_kernels WindowAttention", lambda m: isinstance(m, WindowAttention), _set_backend),
    Adapter("ultron_kernels SplitDilatedConv2d", lambda m: isinstance(m, SplitDilatedConv2d), _fuse_split),
]
