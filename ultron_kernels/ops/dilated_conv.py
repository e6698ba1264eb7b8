"""``channelwise_dilated_conv2d``: public API, input validation, custom-op registration.

The fused backends run behind two ``torch.library`` custom ops (forward, backward) tied by
``register_autograd``, so ``torch.compile(fullgraph=True)`` sees one opaque node per
direction. The reference backend is plain PyTorch and differentiates itself.
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional, Sequence, Union

import torch

from ultron_kernels import _cuda
from ultron_kernels.backends import select_backend
from ultron_kernels.ops._common import (autocast_inputs, check_int32_sizes, check_same_device_and_dtype,
                                        check_tensor)
from ultron_kernels.reference.dilated_conv import channelwise_dilated_conv2d_reference

OP_NAME = "channelwise_dilated_conv2d"
MAX_FUSED_KERNEL_SIZE = 15
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DILATION = 2**20 - 1  # as csrc/dilated_conv checks: rate * K/2 and the halo stay in int32

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


@functools.lru_cache(maxsize=64)
def _dilation_tensor(rates: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(rates, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def channel_run(rates: tuple[int, ...], cap: int) -> int:
    """Largest power of two (<= cap) such that every aligned run of that many channels shares
    one dilation. The kernels then read one dilation per run: the CUDA channels_last path
    loads a run as one vector (cap 8), the Triton kernels treat a channel block inside a run
    as one affine address range (cap 64)."""
    run = cap
    while run > 1 and (len(rates) % run or any(
            len(set(rates[c:c + run])) > 1 for c in range(0, len(rates), run))):
        run //= 2
    return run


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def _output_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


# ---------------------------------------------------------------- custom ops (fused backends)

@torch.library.custom_op("ultron_kernels::dilated_conv2d_fwd", mutates_args=())
def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   dilation: list[int], stride: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        from ultron_kernels.triton.dilated_conv import dilated_conv_forward
        batch, channels, height, width = x.shape
        out = torch.empty((batch, channels, _output_size(height, stride), _output_size(width, stride)),
                          device=x.device, dtype=x.dtype, memory_format=_memory_format(x))
        return dilated_conv_forward(x, weight, bias, _dilation_tensor(tuple(dilation), x.device),
                                    channel_run(tuple(dilation), 64), stride, out)
    # The CUDA op takes the rates as a list and derives what its kernels need itself.
    return _cuda.cuda_ops(x.device).dilated_conv2d_fwd(x, weight, bias, dilation, stride)


@_fused_forward.register_fake
def _(x, weight, bias, dilation, stride, backend):
    batch, channels, height, width = x.shape
    return torch.empty((batch, channels, _output_size(height, stride), _output_size(width, stride)),
                       device=x.device, dtype=x.dtype, memory_format=_memory_format(x))


@torch.library.custom_op("ultron_kernels::dilated_conv2d_bwd", mutates_args=())
def _fused_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    dilation: list[int], stride: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    if backend == "triton":
        from ultron_kernels.triton.dilated_conv import dilated_conv_backward
        grad_x, grad_w, grad_b = dilated_conv_backward(
            grad_out, x, weight, _dilation_tensor(tuple(dilation), x.device),
            channel_run(tuple(dilation), 64), stride, torch.empty_like(x))
    else:
        grad_x, grad_w, grad_b = _cuda.cuda_ops(x.device).dilated_conv2d_bwd(
            grad_out, x, weight, dilation, stride)
    return grad_x, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


@_fused_backward.register_fake
def _(grad_out, x, weight, dilation, stride, backend):
    return (torch.empty_like(x), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, dilation, stride, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.dilation, ctx.stride, ctx.backend = dilation, stride, backend


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _fused_backward(grad_out, x, weight, ctx.dilation, ctx.stride,
                                             ctx.backend)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API

def _fused_reason(x: torch.Tensor, kernel_size: int):
    def reason(backend: str) -> Optional[str]:
        if backend == "reference":
            return None
        if x.dtype not in FUSED_DTYPES:
            return f"dtype {x.dtype} runs on the reference backend only (fused: {FUSED_DTYPES})"
        if kernel_size > MAX_FUSED_KERNEL_SIZE:
            return f"kernel size {kernel_size} > {MAX_FUSED_KERNEL_SIZE}"
        return None
    return reason


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
    check_tensor("x", x, dims=4)
    check_tensor("weight", weight)
    check_int32_sizes("x", x)
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
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    rates = normalize_dilation(dilation, channels)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_same_device_and_dtype(x=x, weight=weight, bias=bias)
    if x.dtype not in FUSED_DTYPES + (torch.float64,):
        raise TypeError(f"x: dtype must be float16, bfloat16, float32 or float64, got {x.dtype}")

    chosen = select_backend(OP_NAME, backend, x.device, _fused_reason(x, kernel_size))
    if chosen == "reference":
        return channelwise_dilated_conv2d_reference(x, weight, bias, rates, int(stride))
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        # A channels-innermost view (e.g. k of a packed (B, H, W, 3, C) qkv) is read in place
        # by the Triton kernels, which take strides; anything else is made contiguous.
        if x.stride(1) != 1:
            x = x.contiguous()
        elif chosen != "triton":
            x = x.contiguous(memory_format=torch.channels_last)
    return _fused_forward(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                          list(rates), int(stride), chosen)
