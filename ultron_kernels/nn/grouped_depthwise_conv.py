"""Drop-in module for the grouped depthwise convolution, and the reading of a depthwise
``nn.Conv2d`` as one of its groups (shared with the timm adapters)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ultron_kernels.ops.grouped_depthwise_conv import DepthwiseGroup, grouped_depthwise_conv2d

# timm's TF-'SAME' convolutions (padding computed from the input size in forward), recognised
# by name so that timm is not imported here.
TF_SAME_CONVS = {("timm.layers.conv2d_same", "Conv2dSame"), ("timm.layers.conv2d_same", "Conv2dSameExport")}


def depthwise_group_of(conv: nn.Module) -> tuple[DepthwiseGroup, int]:
    """(group, stride) that computes ``conv`` exactly; ValueError saying why when none does."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{type(conv).__name__} is not an nn.Conv2d")
    channels = conv.in_channels
    if not (conv.groups == channels == conv.out_channels):
        raise ValueError(f"not depthwise: in={channels}, out={conv.out_channels}, groups={conv.groups} "
                         "(a grouped or dense conv stays on PyTorch)")
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} (only zero padding is fused)")
    if conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2):
        raise ValueError(f"stride {conv.stride} (fused: 1 or 2 on both axes)")
    if max(conv.kernel_size) > 31:
        raise ValueError(f"kernel {conv.kernel_size} (fused: up to 31)")
    tf_same = (type(conv).__module__, type(conv).__name__) in TF_SAME_CONVS
    if tf_same:
        padding = "tf_same"
    elif conv.padding == "valid":
        padding = 0
    elif conv.padding == "same":  # PyTorch allows it at stride 1 only: total d*(k-1), smaller half first
        padding = "same"
    else:
        padding = tuple(conv.padding)
    return DepthwiseGroup(channels, tuple(conv.kernel_size), tuple(conv.dilation), padding), conv.stride[0]


def depthwise_groups_of(parts: Sequence[Union[nn.Module, int]]) -> tuple[list[DepthwiseGroup], int]:
    """The groups of a split + convs + cat block, in channel order: each part a depthwise conv,
    or an int (the channel count of an identity part; 0 is dropped). Returns (groups, stride);
    ValueError naming the part when one cannot be fused or the strides differ."""
    groups, strides = [], set()
    for i, part in enumerate(parts):
        if isinstance(part, int):
            if part > 0:
                groups.append(DepthwiseGroup.identity(part))
            continue
        try:
            group, stride = depthwise_group_of(part)
        except ValueError as why:
            raise ValueError(f"part {i}: {why}") from None
        groups.append(group)
        strides.add(stride)
    if len(strides) > 1:
        raise ValueError(f"the convs' strides differ: {sorted(strides)}")
    return groups, strides.pop() if strides else 1


class GroupedDepthwiseConv2d(nn.Module):
    """Depthwise conv whose contiguous channel groups each have their own kernel shape,
    dilation and padding (identity groups pass through): :func:`grouped_depthwise_conv2d`.

    Parameters: ``weights.<j>`` (c_j, 1, kh_j, kw_j) and ``biases.<j>`` (c_j,) for the j-th
    non-identity group, as in the ``nn.Conv2d`` each group replaces.
    """

    def __init__(self, groups: Sequence[DepthwiseGroup], stride: int = 1, bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.groups, self.stride, self.backend = tuple(groups), stride, backend
        if not self.groups or not all(isinstance(g, DepthwiseGroup) for g in self.groups):
            raise TypeError(f"groups must be a non-empty sequence of DepthwiseGroup, got {groups!r}")
        factory = dict(device=device, dtype=dtype)
        convolved = [g for g in self.groups if g.kernel_size is not None]
        shapes = [(g.channels, 1) + ((g.kernel_size,) * 2 if isinstance(g.kernel_size, int) else tuple(g.kernel_size))
                  for g in convolved]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(shape, **factory)) for shape in shapes])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.empty(g.channels, **factory)) for g in convolved] if bias else [])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, per group (fan_in = kh*kw for a depthwise filter).
        for j, weight in enumerate(self.weights):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            if len(self.biases):
                bound = 1 / math.sqrt(weight.shape[2] * weight.shape[3])
                nn.init.uniform_(self.biases[j], -bound, bound)

    def _per_group(self, params: nn.ParameterList) -> list[Optional[torch.Tensor]]:
        values, j = [], 0
        for g in self.groups:
            if g.kernel_size is None or not len(params):
                values.append(None)
            else:
                values.append(params[j])
                j += 1
        return values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = self._per_group(self.biases) if len(self.biases) else None
        return grouped_depthwise_conv2d(x, self._per_group(self.weights), self.groups, biases, self.stride,
                                        backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"{g.channels}:identity" if g.kernel_size is None else
                 f"{g.channels}:k={g.kernel_size},d={g.dilation},pad={g.padding!r}" for g in self.groups]
        return (f"groups=[{'; '.join(parts)}], stride={self.stride}, bias={len(self.biases) > 0}, "
                f"backend={self.backend!r}")

    @classmethod
    def from_convs(cls, parts: Sequence[Union[nn.Module, int]], backend: str = "auto") -> "GroupedDepthwiseConv2d":
        """Build from the parts of a split + convs + cat block, in channel order (each a depthwise
        ``nn.Conv2d`` - timm's ``Conv2dSame`` included - or an int: the channel count of an
        identity part), copying the convs' weights and biases."""
        convs = [p for p in parts if not isinstance(p, int)]
        if not convs:
            raise ValueError("parts: expected at least one nn.Conv2d")
        groups, stride = depthwise_groups_of(parts)
        with_bias = {conv.bias is not None for conv in convs}
        if len(with_bias) > 1:
            raise ValueError("parts: some convs have a bias and some do not")
        first = convs[0]
        module = cls(groups, stride, with_bias.pop(), backend, device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            for j, conv in enumerate(convs):
                module.weights[j].copy_(conv.weight)
                if conv.bias is not None:
                    module.biases[j].copy_(conv.bias)
        return module
