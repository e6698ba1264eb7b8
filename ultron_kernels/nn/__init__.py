"""Drop-in modules built on the ultron_kernels ops."""

from ultron_kernels.nn.dilated_conv import ChannelwiseDilatedConv2d, SplitDilatedConv2d
from ultron_kernels.nn.grouped_depthwise_conv import GroupedDepthwiseConv2d
from ultron_kernels.nn.window_attention import WindowAttention

__all__ = ["ChannelwiseDilatedConv2d", "GroupedDepthwiseConv2d", "SplitDilatedConv2d", "WindowAttention"]
