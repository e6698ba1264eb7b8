"""Drop-in modules for the channel-wise dilated depthwise convolution."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ultron_kernels.ops.dilated_conv import Dilation, channelwise_dilated_conv2d, normalize_dilation, same_padding


def _describe(rates: Sequence[int]) -> str:
    """'0-31:1, 32-63:3' - channel ranges and their dilation."""
    parts, start = [], 0
    for c in range(1, len(rates) + 1):
        if c == len(rates) or rates[c] != rates[start]:
            parts.append(f"{start}-{c - 1}:{rates[start]}" if c - 1 > start else f"{start}:{rates[start]}")
            start = c
    return ", ".join(parts)


def _save_as_split_convs(module: "ChannelwiseDilatedConv2d", state_dict, prefix, local_metadata) -> None:
    """state_dict hook of a module built by from_split_convs: it saves under the split
    module's keys (convs.<i>.weight / .bias), so a swap never changes a checkpoint's keys;
    _load_from_state_dict reads both forms."""
    parts = {name: state_dict.pop(prefix + name).split(module.split_channels)
             for name in ("weight", "bias") if prefix + name in state_dict}
    for i in range(len(module.split_channels)):  # the split module's key order
        for name, chunks in parts.items():
            state_dict[f"{prefix}convs.{i}.{name}"] = chunks[i]


class ChannelwiseDilatedConv2d(nn.Module):
    """Depthwise KxK conv where each channel group has its own dilation ('same' padding).

    ``weight`` (C, 1, K, K) and ``bias`` (C,) as in ``nn.Conv2d(C, C, K, groups=C)``.
    ``dilation``: an int, G ints (C split into G equal contiguous groups) or C ints.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Dilation = (1, 3, 6),
                 stride: int = 1, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.channels, self.kernel_size, self.stride, self.backend = channels, kernel_size, stride, backend
        self.dilation = normalize_dilation(dilation, channels)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation (fan_in = K*K for a depthwise filter).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_size * self.kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channelwise_dilated_conv2d(x, self.weight, self.bias, self.dilation, self.stride,
                                          backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of the unfused SplitDilatedConv2d this module replaced (swap_in) has
        # per-group keys convs.<i>.weight / .bias: concatenate them into ours.
        group_keys = sorted((k for k in state_dict if k.startswith(prefix + "convs.")),
                            key=lambda k: int(k[len(prefix) + 6:].split(".")[0]))
        if group_keys and prefix + "weight" not in state_dict:
            for name in ("weight", "bias"):
                parts = [state_dict.pop(k) for k in list(group_keys) if k.endswith("." + name)]
                if parts:
                    state_dict[prefix + name] = torch.cat(parts)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}, backend={self.backend!r}, "
                f"dilation=[{_describe(self.dilation)}]")

    @classmethod
    def from_split_convs(cls, convs: Sequence[nn.Conv2d], backend: str = "auto"
                         ) -> "ChannelwiseDilatedConv2d":
        """Build from the depthwise convs of a split + conv + cat block (one per group, in
        channel order, each with 'same' padding and its own dilation), copying the weights."""
        if len(convs) == 0:
            raise ValueError("convs: expected at least one nn.Conv2d")
        first = convs[0]
        rates = []
        for i, conv in enumerate(convs):
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"convs[{i}] must be nn.Conv2d, got {type(conv).__name__}")
            k, d, s, p = conv.kernel_size[0], conv.dilation[0], conv.stride[0], conv.padding
            problem = None
            if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
                problem = "is not depthwise (groups == in_channels == out_channels)"
            elif conv.kernel_size != (k, k) or conv.dilation != (d, d) or conv.stride != (s, s):
                problem = "has a non-square kernel, dilation or stride"
            elif k != first.kernel_size[0] or s != first.stride[0] or (conv.bias is None) != (first.bias is None):
                problem = "differs from convs[0] in kernel size, stride or bias"
            elif p not in ("same", (same_padding(d, k),) * 2) or conv.padding_mode != "zeros":
                problem = f"padding {p!r} is not zero 'same' padding {same_padding(d, k)}"
            if problem:
                raise ValueError(f"convs[{i}] {problem}: {conv}")
            rates += [d] * conv.in_channels
        module = cls(len(rates), first.kernel_size[0], tuple(rates), first.stride[0],
                     first.bias is not None, backend, device=first.weight.device,
                     dtype=first.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(torch.cat([c.weight for c in convs]))
            if module.bias is not None:
                module.bias.copy_(torch.cat([c.bias for c in convs]))
        module.split_channels = [c.in_channels for c in convs]
        module.register_state_dict_post_hook(_save_as_split_convs)
        return module


class SplitDilatedConv2d(nn.Module):
    """The usual unfused form: split channels into groups, one depthwise ``nn.Conv2d`` per
    group (each with its dilation), concatenate. :func:`ultron_kernels.swap_in` replaces it
    with :class:`ChannelwiseDilatedConv2d`."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3, 6),
                 stride: int = 1, bias: bool = True):
        super().__init__()
        if channels % len(dilation) != 0:
            raise ValueError(f"channels={channels} is not divisible by len(dilation)={len(dilation)}")
        width = channels // len(dilation)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size, stride, same_padding(d, kernel_size), d,
                      groups=width, bias=bias) for d in dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.split([c.in_channels for c in self.convs], dim=1)
        return torch.cat([conv(chunk) for conv, chunk in zip(self.convs, chunks)], dim=1)
