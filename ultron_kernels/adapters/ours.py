"""Adapters for the package's own modules: a backend attribute to set, or split convs to fuse."""

from __future__ import annotations

from ultron_kernels.adapters import Adapter, Unsupported
from ultron_kernels.adapters.swin import conversion_device
from ultron_kernels.nn import ChannelwiseDilatedConv2d, GroupedDepthwiseConv2d, SplitDilatedConv2d, WindowAttention
from ultron_kernels.ops.window_attention import fused_shape_reason


def _set_backend(module, backend: str):
    previous = module.backend
    module.backend = backend
    return module, f"backend {previous!r} -> {backend!r}"


def _set_attention_backend(module: WindowAttention, backend: str):
    """A fused backend only where its kernels take the module's windows and head dim, so that
    the swapped model runs."""
    if backend != "auto":
        why = fused_shape_reason(backend, module.window_size, module.dim // module.num_heads,
                                 conversion_device(module, backend))
        if why:
            raise Unsupported(f"{why}: left on its backend")
    return _set_backend(module, backend)


def _fuse_split(module: SplitDilatedConv2d, backend: str):
    # Same weights, and the same state_dict keys (convs.<i>.weight / .bias).
    fused = ChannelwiseDilatedConv2d.from_split_convs(list(module.convs), backend)
    return fused, f"split + conv + cat -> ChannelwiseDilatedConv2d[{backend}]"


ADAPTERS = [
    Adapter("ultron_kernels ChannelwiseDilatedConv2d",
            lambda m: isinstance(m, ChannelwiseDilatedConv2d), _set_backend),
    Adapter("ultron_kernels GroupedDepthwiseConv2d",
            lambda m: isinstance(m, GroupedDepthwiseConv2d), _set_backend),
    Adapter("ultron_kernels WindowAttention", lambda m: isinstance(m, WindowAttention), _set_attention_backend),
    Adapter("ultron_kernels SplitDilatedConv2d", lambda m: isinstance(m, SplitDilatedConv2d), _fuse_split),
]
