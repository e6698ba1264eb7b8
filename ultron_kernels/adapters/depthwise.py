"""Every plain depthwise ``nn.Conv2d`` (ConvNeXt, EfficientNet, MobileNet, MetaFormer,
RepLKNet...) and timm's TF-'SAME' ``Conv2dSame``, as one grouped depthwise convolution with
one group. Opt-in: ``swap_in(model, depthwise=True)``: cuDNN is a strong peer here, and which
shapes we win on is a GPU measurement (bench/NOTES.md), so by default the report only counts them.

A candidate is a conv with ``groups == in_channels`` (one filter bank per channel); dense and
grouped convs never are. Left alone, with the reason: a depth multiplier above 1, a 1x1 kernel
(a per-channel scale: nothing to fuse), and whatever the op does not take (padding modes other
than zeros, strides other than 1 or 2, kernels over 31).
"""

from __future__ import annotations

from torch import nn

from ultron_kernels.adapters import Adapter, Unsupported, set_fused
from ultron_kernels.adapters.timm_conv import grouped_forward
from ultron_kernels.nn.grouped_depthwise_conv import TF_SAME_CONVS, depthwise_group_of


def _is_candidate(module: nn.Module) -> bool:
    cls = getattr(type(module), "_ultron_original", type(module))
    plain = cls is nn.Conv2d or (cls.__module__, cls.__name__) in TF_SAME_CONVS
    return plain and module.in_channels > 1 and module.groups == module.in_channels


def _convert(conv: nn.Conv2d, backend: str):
    if conv.out_channels != conv.in_channels:
        raise Unsupported(f"depth multiplier {conv.out_channels // conv.in_channels} (out_channels "
                          f"{conv.out_channels} = {conv.out_channels // conv.in_channels} x in_channels): "
                          "the fused op has one filter per channel")
    if tuple(conv.kernel_size) == (1, 1):
        raise Unsupported("1x1 depthwise (a per-channel scale): nothing to fuse")
    try:
        group, stride = depthwise_group_of(conv)
    except ValueError as why:
        raise Unsupported(str(why)) from None
    set_fused(conv, {"forward": grouped_forward, "_ultron_parts": staticmethod(lambda m: [m])}, __name__, backend)
    conv._ultron_groups, conv._ultron_stride = [group], stride
    kh, kw = conv.kernel_size
    return conv, (f"depthwise {kh}x{kw} -> grouped_depthwise_conv2d[{backend}] (one group; stride {stride}, "
                  f"dilation {tuple(conv.dilation)}, padding {group.padding!r})")


ADAPTERS = [Adapter("depthwise Conv2d", _is_candidate, _convert, opt_in="depthwise")]
