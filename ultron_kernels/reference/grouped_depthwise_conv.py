"""Pure-PyTorch grouped depthwise convolution: the CPU path and the oracle's twin.

Each group is one depthwise ``F.conv2d`` on its channel range (an identity group passes its
channels through), then one concatenation: the split + conv + cat form that timm's modules
run, kept differentiable by autograd for every dtype and device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F


class ResolvedGroup(NamedTuple):
    """One group with its padding resolved for the input size: what the kernels take.
    An identity group has kernel (0, 0)."""
    channels: int
    kernel_h: int
    kernel_w: int
    dilation_h: int
    dilation_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int

    @property
    def identity(self) -> bool:
        return self.kernel_h == 0

    def output_size(self, height: int, width: int, stride: int) -> tuple[int, int]:
        if self.identity:
            return height, width
        span_h = self.dilation_h * (self.kernel_h - 1) + 1
        span_w = self.dilation_w * (self.kernel_w - 1) + 1
        return ((height + self.pad_top + self.pad_bottom - span_h) // stride + 1,
                (width + self.pad_left + self.pad_right - span_w) // stride + 1)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The output's layout: channels_last when x keeps its channels innermost (channels_last,
    or a channels-innermost view such as one slice of a packed qkv), else NCHW."""
    if not x.is_contiguous() and x.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


def grouped_depthwise_conv2d_reference(x: torch.Tensor, weights: Sequence[Optional[torch.Tensor]],
                                       biases: Sequence[Optional[torch.Tensor]],
                                       groups: Sequence[ResolvedGroup], stride: int) -> torch.Tensor:
    """``x`` (B, C, H, W); per group a weight (c_i, 1, kh, kw) (None: identity) and a bias
    (c_i,) or None."""
    batch, _, height, width = x.shape
    out_h, out_w = groups[0].output_size(height, width, stride)
    chunks = x.split([g.channels for g in groups], dim=1)
    outputs = []
    for chunk, weight, bias, g in zip(chunks, weights, biases, groups):
        if g.identity:
            outputs.append(chunk)
        elif x.numel() == 0:
            # F.conv2d refuses empty planes: every tap reads the zero padding, so the result is
            # the bias, linked to the inputs so that they get (zero) gradients.
            linked = chunk.sum() * 0 + weight.sum() * 0
            base = bias.view(1, -1, 1, 1) if bias is not None else chunk.new_zeros(())
            outputs.append((base + linked).expand(batch, g.channels, out_h, out_w))
        else:
            symmetric = g.pad_top == g.pad_bottom and g.pad_left == g.pad_right
            padded = chunk if symmetric else F.pad(
                chunk, (g.pad_left, g.pad_right, g.pad_top, g.pad_bottom))
            padding = (g.pad_top, g.pad_left) if symmetric else 0
            outputs.append(F.conv2d(padded, weight, bias, stride, padding,
                                    (g.dilation_h, g.dilation_w), g.channels))
    return torch.cat(outputs, dim=1).contiguous(memory_format=memory_format_of(x))
