"""``channelwise_dilated_conv2d``: public API and input validation.

The op is the grouped depthwise convolution with one square kernel for every channel and
the dilation as the only thing that changes between groups (one group per run of equal
rates): it runs on that op's custom ops and kernels (ops/grouped_depthwise_conv.py).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

from ultron_kernels.backends import select_backend
from ultron_kernels.ops._common import autocast_inputs, check_same_device_and_dtype, check_tensor
from ultron_kernels.ops.grouped_depthwise_conv import (MAX_DILATION, check_dtype, check_input, checked_stride,
                                                       fused_reason, pack_weights, run_fused)
from ultron_kernels.reference.grouped_depthwise_conv import ResolvedGroup, grouped_depthwise_conv2d_reference

OP_NAME = "channelwise_dilated_conv2d"

Dilation = Union[int, Sequence[int], torch.Tensor]


def normalize_dilation(dilation: Dilation, channels: int) -> tuple[int, ...]:
    """Per-channel dilation rates (one int per channel) from any accepted form."""
    if isinstance(dilation, torch.Tensor):
        if dilation.dim() != 1 or dilation.shape[0] != channels:
            raise ValueError(f"dilation: a tensor must be 1-D of length C={channels}, "
                             f"got shape {tuple(dilation.shape)}")
        if dilation.dtype.is_floating_point or dilation.dtype.is_complex or dilation.dtype == torch.bool:
            raise TypeError(f"dilation: a tensor must have an integer dtype, got {dilation.dtype}")
        rates = tuple(int(d) for d in dilation.tolist())
    elif isinstance(dilation, numbers.Integral) and not isinstance(dilation, bool):
        rates = (int(dilation),) * channels
    elif isinstance(dilation, Sequence) and not isinstance(dilation, str):
        if len(dilation) == 0 or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dilation):
            raise TypeError(f"dilation: a sequence must hold one or more ints, got {dilation!r}")
        groups = len(dilation)
        if channels % groups != 0:
            raise ValueError(f"dilation: C={channels} is not divisible by the number of "
                             f"groups G={groups} (dilation={tuple(dilation)})")
        per_group = channels // groups
        rates = tuple(int(dilation[c // per_group]) for c in range(channels))
    else:
        raise TypeError("dilation must be an int, a sequence of ints or a 1-D integer tensor, "
                        f"got {type(dilation).__name__}")
    bad = [d for d in rates if not 1 <= d <= MAX_DILATION]
    if bad:
        raise ValueError(f"dilation: every rate must be in [1, {MAX_DILATION}] (kernels hold "
                         f"rate * K in 32 bits), got {bad[0]}")
    return rates


def same_padding(dilation: int, kernel_size: int) -> int:
    """Zero 'same' padding of one channel: keeps H_out = floor((H - 1) / stride) + 1."""
    return dilation * (kernel_size - 1) // 2


def dilation_groups(rates: tuple[int, ...], kernel_size: int) -> tuple[ResolvedGroup, ...]:
    """The grouped convolution's groups: one per run of equal rates, each with the zero
    'same' padding d*(K-1)/2 on every side."""
    groups, start = [], 0
    for c in range(1, len(rates) + 1):
        if c == len(rates) or rates[c] != rates[start]:
            pad = same_padding(rates[start], kernel_size)
            groups.append(ResolvedGroup(c - start, kernel_size, kernel_size, rates[start], rates[start],
                                        pad, pad, pad, pad))
            start = c
    # No channels: one empty group still carries the kernel's output size.
    return tuple(groups) or (ResolvedGroup(0, kernel_size, kernel_size, 1, 1, *(same_padding(1, kernel_size),) * 4),)


def channelwise_dilated_conv2d(x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor] = None, dilation: Dilation = 1,
                               stride: int = 1, *, backend: str = "auto") -> torch.Tensor:
    """Depthwise KxK convolution with a dilation rate per channel and zero 'same' padding.

    Output channel c equals ``F.conv2d(x[:, c:c+1], weight[c:c+1], bias[c], stride,
    padding=d_c*(K-1)//2, dilation=d_c)``.

    Args:
        x: (B, C, H, W), NCHW or channels_last (the output keeps the layout and dtype).
        weight: (C, 1, K, K) or (C, K, K), K odd.
        bias: (C,) or None.
        dilation: an int; G ints (C split into G equal contiguous groups); or a 1-D integer
            tensor of C per-channel rates.
        stride: 1 or 2.
        backend: "auto", "reference", "triton" or "cuda".
    """
    check_input(x)
    check_tensor("weight", weight)
    channels = x.shape[1]
    if weight.dim() == 4 and weight.shape[1] == 1:
        weight = weight.reshape(weight.shape[0], weight.shape[2], weight.shape[3])
    if weight.dim() != 3 or weight.shape[0] != channels or weight.shape[1] != weight.shape[2]:
        raise ValueError(f"weight: expected shape (C, 1, K, K) or (C, K, K) with C={channels}, "
                         f"got {tuple(weight.shape)}")
    kernel_size = weight.shape[-1]
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"weight: kernel size K must be odd and >= 1, got K={kernel_size}")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (channels,):
            raise ValueError(f"bias: expected shape ({channels},), got {tuple(bias.shape)}")
    stride = checked_stride(stride)
    rates = normalize_dilation(dilation, channels)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_dtype(x)
    check_same_device_and_dtype(x=x, weight=weight, bias=bias)

    groups = dilation_groups(rates, kernel_size)
    chosen = select_backend(OP_NAME, backend, x.device, fused_reason(x, kernel_size))
    if chosen == "reference":
        counts = [g.channels for g in groups]
        weights = weight.reshape(channels, 1, kernel_size, kernel_size).split(counts)
        biases = bias.split(counts) if bias is not None else (None,) * len(groups)
        return grouped_depthwise_conv2d_reference(x, weights, biases, groups, stride)
    counts = [g.channels for g in groups]
    return run_fused(x, pack_weights(weight.split(counts), x), bias, groups, stride, chosen)
