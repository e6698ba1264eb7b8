"""timm's split + depthwise convs + cat blocks, each one grouped depthwise convolution:

* ``MixedConv2d`` (MixNet, when depthwise): one kernel size per channel split, PyTorch or
  TF-'SAME' padding (``tf_`` models: ``Conv2dSame``, asymmetric at stride 2);
* ``InceptionDWConv2d`` (InceptionNeXt): an identity split, a square kernel, two bands;
* ``ConvRelPosEnc`` (CoaT): one window size per head split, applied to v.

The module keeps its object, convs, parameters and keys; only its forward changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ultron_kernels.adapters import Adapter, Unsupported, class_named, set_fused
from ultron_kernels.nn.grouped_depthwise_conv import depthwise_groups_of
from ultron_kernels.ops.grouped_depthwise_conv import grouped_depthwise_conv2d


def _mixed_parts(module):
    return list(module.values())


def _inception_parts(module):
    return [module.split_indexes[0], module.dwconv_hw, module.dwconv_w, module.dwconv_h]


def _crpe_parts(module):
    return list(module.conv_list)


def _grouped_conv(module, x: torch.Tensor) -> torch.Tensor:
    """The block's split + convs + cat as one op call (identity parts: None weights)."""
    parts = [p for p in module._ultron_parts(module) if not (isinstance(p, int) and p == 0)]
    weights = [None if isinstance(p, int) else p.weight for p in parts]
    biases = [None if isinstance(p, int) else p.bias for p in parts]
    return grouped_depthwise_conv2d(x, weights, module._ultron_groups, biases, module._ultron_stride,
                                    backend=module._ultron_backend)


def grouped_forward(self, x):
    """The forward of a converted module: its parts as one grouped depthwise convolution."""
    return _grouped_conv(self, x)


def _crpe_forward(self, q, v, size):
    # ConvRelPosEnc: the image tokens of v (after the class token) as a (B, heads*Ch, H, W)
    # image, the grouped conv, then the product with q's image tokens, the class token's row
    # left zero. The image is made channels_last ((B, H, W, heads*Ch) in memory: one copy, as
    # timm's NCHW reshape is), so that the conv's output reads back as (B, heads, H*W, Ch)
    # without a second copy, and the kernels take their vectorised layout.
    batch, heads, tokens, head_chs = q.shape
    height, width = size
    torch._assert(tokens == 1 + height * width, "ConvRelPosEnc: tokens must be 1 + H*W")
    v_img = v[:, :, 1:, :].transpose(1, 2).reshape(batch, height, width, heads * head_chs).permute(0, 3, 1, 2)
    conv_v = _grouped_conv(self, v_img).permute(0, 2, 3, 1).reshape(batch, height * width, heads, head_chs)
    return F.pad(q[:, :, 1:, :] * conv_v.transpose(1, 2), (0, 0, 1, 0, 0, 0))


def _converter(parts, forward):
    def convert(module, backend: str):
        try:
            groups, stride = depthwise_groups_of(parts(module))
        except ValueError as why:
            raise Unsupported(str(why)) from None
        set_fused(module, {"forward": forward, "_ultron_parts": staticmethod(parts)}, __name__, backend)
        module._ultron_groups, module._ultron_stride = groups, stride
        kernels = ", ".join("identity" if g.kernel_size is None else "x".join(map(str, g.kernel_size))
                            for g in groups)
        return module, f"split + convs + cat -> grouped_depthwise_conv2d[{backend}] ({kernels}; stride {stride})"
    return convert


_is_mixed_conv = class_named("timm.layers.mixed_conv2d", "MixedConv2d")


def _is_depthwise_mixed_conv(module) -> bool:
    """MixNet splits its grouped 1x1 convs with MixedConv2d too: those are no candidates."""
    return _is_mixed_conv(module) and all(c.groups == c.in_channels for c in module.values())


ADAPTERS = [
    Adapter("timm MixedConv2d", _is_depthwise_mixed_conv, _converter(_mixed_parts, grouped_forward)),
    Adapter("timm InceptionDWConv2d", class_named("timm.models.inception_next", "InceptionDWConv2d"),
            _converter(_inception_parts, grouped_forward)),
    Adapter("timm ConvRelPosEnc", class_named("timm.models.coat", "ConvRelPosEnc"),
            _converter(_crpe_parts, _crpe_forward)),
]
