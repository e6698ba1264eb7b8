"""ultron_kernels: fused local operators of the ULTRON image-retrieval network.

* :func:`grouped_depthwise_conv2d` - depthwise conv with a kernel shape, dilation and padding
  per channel group (:class:`DepthwiseGroup`), identity groups included;
* :func:`channelwise_dilated_conv2d` - its special case: one square kernel, a dilation rate
  per channel;
* :func:`window_attention` - Swin-style window attention with shift and relative position bias;
* :mod:`ultron_kernels.nn` - drop-in modules; :func:`swap_in` - run a model's local ops
  (ours; timm's and torchvision's Swin attention; timm's MixNet, InceptionNeXt and CoaT
  convolutions) on the kernels; :func:`swap_out` - undo.

Each op runs on the ``reference`` (pure PyTorch), ``triton`` or ``cuda`` backend;
:func:`available_backends` says which can run here and why not.
"""

from ultron_kernels.backends import BackendUnavailableError, available_backends
from ultron_kernels.ops.dilated_conv import channelwise_dilated_conv2d
from ultron_kernels.ops.grouped_depthwise_conv import DepthwiseGroup, grouped_depthwise_conv2d
from ultron_kernels.ops.window_attention import window_attention
from ultron_kernels import nn
from ultron_kernels.swap import SwapReport, swap_in, swap_out

__all__ = ["BackendUnavailableError", "available_backends", "channelwise_dilated_conv2d",
           "DepthwiseGroup", "grouped_depthwise_conv2d",
           "window_attention", "nn", "swap_in", "swap_out", "SwapReport"]
__version__ = "0.1.0"
