"""Pure-PyTorch channel-wise dilated depthwise convolution: the CPU path and the oracle's twin.

Channels that share a dilation rate run as one grouped ``F.conv2d`` (one call per distinct
rate), so the path stays differentiable by autograd and works for every dtype and device.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def same_padding(dilation: int, kernel_size: int) -> int:
    """Zero 'same' padding of one channel: keeps H_out = floor((H - 1) / stride) + 1."""
    return dilation * (kernel_size - 1) // 2


def channelwise_dilated_conv2d_reference(x: torch.Tensor, weight: torch.Tensor,
                                         bias: Optional[torch.Tensor],
                                         dilation: Sequence[int], stride: int) -> torch.Tensor:
    """``x`` (B, C, H, W), ``weight`` (C, K, K), ``bias`` (C,) or None, ``dilation`` C ints."""
    channels, kernel_size = weight.shape[0], weight.shape[-1]
    if x.numel() == 0:
        # F.conv2d refuses empty planes and zero channels; the result is simply empty, with
        # (zero) gradients for every input, as on the fused backends.
        batch, _, height, width = x.shape
        out = torch.zeros((batch, channels, (height - 1) // stride + 1, (width - 1) // stride + 1),
                          dtype=x.dtype, device=x.device).contiguous(memory_format=_memory_format_of(x))
        linked = x.sum() + weight.sum() + (bias.sum() if bias is not None else 0)
        return out + linked * 0
    weight = weight.reshape(channels, 1, kernel_size, kernel_size)
    if len(set(dilation)) == 1:
        d = dilation[0]
        return F.conv2d(x, weight, bias, stride, same_padding(d, kernel_size), d, channels)
    order, outputs = [], []
    for d in sorted(set(dilation)):
        channels_d = [c for c in range(channels) if dilation[c] == d]
        index = torch.tensor(channels_d, device=x.device)
        order += channels_d
        outputs.append(F.conv2d(
            x.index_select(1, index), weight.index_select(0, index),
            None if bias is None else bias.index_select(0, index),
            stride, same_padding(d, kernel_size), d, len(channels_d)))
    inverse = torch.empty(channels, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(channels)
    out = torch.cat(outputs, 1).index_select(1, inverse.to(x.device))
    return out.contiguous(memory_format=_memory_format_of(x))


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
