"""``grouped_depthwise_conv2d``: public API, input validation, custom-op registration.

A depthwise convolution whose contiguous channel groups each have their own kernel shape,
dilation and padding (MixNet's MixedConv2d, InceptionNeXt's token mixer, CoaT's conv position
encoding, ULTRON's per-group dilation), with identity groups that pass their channels through.
The fused backends take every group in one launch per direction behind two
``torch.library`` custom ops (forward, backward) tied by ``register_autograd``; the weights
are packed into one vector per call (small), the activations are never copied. The
reference backend is plain PyTorch and differentiates itself.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Union

import torch

from ultron_kernels import _cuda
from ultron_kernels.backends import select_backend
from ultron_kernels.ops._common import (autocast_inputs, check_int32_sizes, check_same_device_and_dtype,
                                        check_tensor)
from ultron_kernels.reference.grouped_depthwise_conv import (ResolvedGroup, grouped_depthwise_conv2d_reference,
                                                             memory_format_of)

OP_NAME = "grouped_depthwise_conv2d"
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_SIZE = 31
MAX_DILATION = 2**20 - 1  # as csrc/grouped_depthwise_conv checks: offsets stay in int32

Padding = Union[str, int, Sequence[int]]
PADDING_MODES = ("same", "tf_same")


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DepthwiseGroup:
    """One contiguous channel group of :func:`grouped_depthwise_conv2d`.

    Args:
        channels: how many channels (groups follow each other in channel order).
        kernel_size: ``k`` or ``(kh, kw)``, each in 1..31, odd or even; None makes the group an
            identity: its channels pass through unchanged (stride 1 only).
        dilation: ``d`` or ``(dh, dw)``.
        padding: ``"same"`` (output ceil(H / stride); PyTorch's split of the total d*(k-1),
            the smaller half first), ``"tf_same"`` (TensorFlow/timm ``Conv2dSame``: the total
            depends on the input size, asymmetric at stride 2), ``p``, ``(ph, pw)`` or
            ``(top, bottom, left, right)``.
    """
    channels: int
    kernel_size: Optional[Union[int, tuple[int, int]]] = 3
    dilation: Union[int, tuple[int, int]] = 1
    padding: Padding = "same"

    def __post_init__(self):
        # Lists become tuples, so that a group is hashable (its checks are cached).
        for name in ("kernel_size", "dilation", "padding"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def identity(cls, channels: int) -> "DepthwiseGroup":
        return cls(channels, None)


def _checked_group(i: int, group) -> tuple:
    """(channels, kh, kw, dh, dw, padding) of ``groups[i]``, padding a mode or 4 ints; kh = 0
    for an identity group."""
    name = f"groups[{i}]"
    if not isinstance(group, DepthwiseGroup):
        raise TypeError(f"{name} must be a DepthwiseGroup, got {type(group).__name__}")
    channels = group.channels
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise ValueError(f"{name}.channels must be an int >= 1, got {channels!r}")
    if group.kernel_size is None:
        return int(channels), 0, 0, 1, 1, (0, 0, 0, 0)
    kh, kw = _pair(group.kernel_size, f"{name}.kernel_size")
    if not (1 <= kh <= MAX_KERNEL_SIZE and 1 <= kw <= MAX_KERNEL_SIZE):
        raise ValueError(f"{name}.kernel_size must be in [1, {MAX_KERNEL_SIZE}] on both axes, got {(kh, kw)}")
    dh, dw = _pair(group.dilation, f"{name}.dilation")
    if not (1 <= dh <= MAX_DILATION and 1 <= dw <= MAX_DILATION):
        raise ValueError(f"{name}.dilation must be in [1, {MAX_DILATION}] on both axes, got {(dh, dw)}")
    padding = group.padding
    if isinstance(padding, str):
        if padding not in PADDING_MODES:
            raise ValueError(f"{name}.padding must be one of {PADDING_MODES}, an int or a tuple of "
                             f"2 or 4 ints, got {padding!r}")
    else:
        values = (padding,) if isinstance(padding, numbers.Integral) else padding
        if (not isinstance(values, Sequence) or len(values) not in (1, 2, 4) or not all(
                isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in values)):
            raise TypeError(f"{name}.padding must be 'same', 'tf_same', an int or a tuple of 2 or 4 "
                            f"ints, got {padding!r}")
        if any(p < 0 for p in values):
            raise ValueError(f"{name}.padding must be >= 0, got {padding!r}")
        if len(values) == 1:
            padding = (int(values[0]),) * 4
        elif len(values) == 2:
            padding = (int(values[0]),) * 2 + (int(values[1]),) * 2
        else:
            padding = tuple(int(p) for p in values)
    return int(channels), kh, kw, dh, dw, padding


def _axis_padding(mode, size: int, kernel: int, dilation: int, stride: int, where: str):
    total_same = dilation * (kernel - 1)
    if mode == "same":
        if stride == 2 and total_same % 2:
            raise ValueError(f"{where}: 'same' padding cannot be given by kernel {kernel} with dilation "
                             f"{dilation} at stride 2 (the span d*(k-1) = {total_same} is odd); use "
                             "'tf_same' or an explicit padding")
        total = total_same
    else:  # tf_same: timm's get_same_padding
        total = max((math.ceil(size / stride) - 1) * stride + total_same + 1 - size, 0)
    return total // 2, total - total // 2


def resolve_groups(groups: Sequence[DepthwiseGroup], height: int, width: int,
                   stride: int) -> tuple[ResolvedGroup, ...]:
    """Every group checked, with its padding resolved for an (height, width) input."""
    resolved = []
    for i, group in enumerate(groups):
        channels, kh, kw, dh, dw, padding = _checked_group(i, group)
        if kh == 0 and stride != 1:
            raise ValueError(f"groups[{i}] is an identity group, which needs stride 1, got stride {stride}")
        if isinstance(padding, str):
            padding = (_axis_padding(padding, height, kh, dh, stride, f"groups[{i}]")
                       + _axis_padding(padding, width, kw, dw, stride, f"groups[{i}]"))
        resolved.append(ResolvedGroup(channels, kh, kw, dh, dw, *padding))
    sizes = [g.output_size(height, width, stride) for g in resolved]
    for i, size in enumerate(sizes):
        if min(size) < 0 or (min(size) == 0 and height > 0 and width > 0):
            raise ValueError(f"groups[{i}]: the input {height}x{width} is smaller than its dilated kernel "
                             f"with padding {resolved[i][5:]} (output size {size})")
        if size != sizes[0]:
            raise ValueError(f"groups: every group must give the same output size; groups[0] gives "
                             f"{sizes[0]}, groups[{i}] gives {size} (input {height}x{width}, stride {stride})")
    return tuple(resolved)


def checked_stride(stride) -> int:
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    return int(stride)


def _output_shape(x: torch.Tensor, spec: list[int], stride: int) -> tuple[int, int, int, int]:
    batch, channels, height, width = x.shape
    return (batch, channels) + ResolvedGroup(*spec[:9]).output_size(height, width, stride)


# ---------------------------------------------------------------- custom ops (fused backends)
#
# ``groups`` is the resolved groups flattened, 9 ints each (ResolvedGroup's fields); ``weight``
# is every non-identity group's weight, tap-major ((kh*kw, c_i) flattened, see pack_weights),
# concatenated in order; ``bias`` (C,) or None.

@torch.library.custom_op("ultron_kernels::grouped_dwconv2d_fwd", mutates_args=())
def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   groups: list[int], stride: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        from ultron_kernels.triton.grouped_depthwise_conv import grouped_conv_forward
        out = torch.empty(_output_shape(x, groups, stride), device=x.device, dtype=x.dtype,
                          memory_format=memory_format_of(x))
        return grouped_conv_forward(x, weight, bias, tuple(groups), stride, out)
    return _cuda.cuda_ops(x.device).grouped_dwconv2d_fwd(x, weight, bias, groups, stride)


@_fused_forward.register_fake
def _(x, weight, bias, groups, stride, backend):
    return torch.empty(_output_shape(x, groups, stride), device=x.device, dtype=x.dtype,
                       memory_format=memory_format_of(x))


@torch.library.custom_op("ultron_kernels::grouped_dwconv2d_bwd", mutates_args=())
def _fused_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    groups: list[int], stride: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    if backend == "triton":
        from ultron_kernels.triton.grouped_depthwise_conv import grouped_conv_backward
        grad_x, grad_w, grad_b = grouped_conv_backward(grad_out, x, weight, tuple(groups), stride, torch.empty(
            x.shape, device=x.device, dtype=x.dtype, memory_format=memory_format_of(x)))
    else:
        grad_x, grad_w, grad_b = _cuda.cuda_ops(x.device).grouped_dwconv2d_bwd(
            grad_out, x, weight, groups, stride)
    return grad_x, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


@_fused_backward.register_fake
def _(grad_out, x, weight, groups, stride, backend):
    return (torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=memory_format_of(x)),
            torch.empty_like(weight), weight.new_empty((x.shape[1],)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, stride, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.groups, ctx.stride, ctx.backend = groups, stride, backend


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _fused_backward(grad_out, x, weight, ctx.groups, ctx.stride, ctx.backend)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- shared by both public ops

def fused_reason(x: torch.Tensor, max_kernel_size: int = 1):
    def reason(backend: str) -> Optional[str]:
        if backend == "reference":
            return None
        if x.dtype not in FUSED_DTYPES:
            return f"dtype {x.dtype} runs on the reference backend only (fused: {FUSED_DTYPES})"
        if max_kernel_size > MAX_KERNEL_SIZE:
            return f"kernel size {max_kernel_size} > {MAX_KERNEL_SIZE}"
        return None
    return reason


def run_fused(x: torch.Tensor, packed_weight: torch.Tensor, packed_bias: Optional[torch.Tensor],
              groups: Sequence[ResolvedGroup], stride: int, backend: str) -> torch.Tensor:
    """The fused backends' call, with the weights (and bias) already packed."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        # A channels-innermost view (e.g. k of a packed (B, H, W, 3, C) qkv) is read in place
        # by the Triton kernels, which take strides; anything else is made contiguous.
        if x.stride(1) != 1:
            x = x.contiguous()
        elif backend != "triton":
            x = x.contiguous(memory_format=torch.channels_last)
    spec = [value for group in groups for value in group]
    return _fused_forward(x, packed_weight.contiguous(),
                          None if packed_bias is None else packed_bias.contiguous(), spec, stride, backend)


def pack_weights(weights: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The kernels' weight vector: each (c_i, 1, kh, kw) weight tap-major, (kh*kw, c_i), so
    that one tap's weights of consecutive channels are contiguous (one vector load for a run
    of channels_last channels), concatenated. A small copy per call; autograd maps the
    gradient back to each weight."""
    return torch.cat([w.flatten(1).t().reshape(-1) for w in weights] or [x.new_empty(0)])


def check_input(x) -> None:
    check_tensor("x", x, dims=4)
    check_int32_sizes("x", x)


def check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in FUSED_DTYPES + (torch.float64,):
        raise TypeError(f"x: dtype must be float16, bfloat16, float32 or float64, got {x.dtype}")


# ---------------------------------------------------------------- public API

def grouped_depthwise_conv2d(x: torch.Tensor, weights: Sequence[Optional[torch.Tensor]],
                             groups: Sequence[DepthwiseGroup],
                             bias: Optional[Sequence[Optional[torch.Tensor]]] = None,
                             stride: int = 1, *, backend: str = "auto") -> torch.Tensor:
    """Depthwise convolution with a kernel shape, dilation and padding per channel group.

    Output group i equals ``F.conv2d(pad(x[:, group i]), weights[i], bias[i], stride,
    dilation=groups[i].dilation, groups=c_i)``, the groups concatenated in order: the
    split + conv + cat it replaces, in one pass over the activations.

    Args:
        x: (B, C, H, W), NCHW or channels_last (the output keeps the layout and dtype).
        weights: one per group: (c_i, 1, kh_i, kw_i), or None for an identity group.
        groups: the :class:`DepthwiseGroup` list; channel counts sum to C.
        bias: None, or one per group: (c_i,) or None.
        stride: 1 or 2, shared by every group.
        backend: "auto", "reference", "triton" or "cuda".
    """
    check_input(x)
    if isinstance(groups, DepthwiseGroup) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise TypeError(f"groups must be a non-empty sequence of DepthwiseGroup, got {groups!r}")
    stride = checked_stride(stride)
    resolved = resolve_groups(groups, x.shape[2], x.shape[3], stride)
    total = sum(g.channels for g in resolved)
    if total != x.shape[1]:
        raise ValueError(f"groups: the channel counts {[g.channels for g in resolved]} sum to {total}, "
                         f"but x has C={x.shape[1]}")
    weights = _per_group("weights", weights, resolved, required=True)
    biases = _per_group("bias", bias, resolved, required=False)
    for i, (g, w, b) in enumerate(zip(resolved, weights, biases)):
        if w is not None and tuple(w.shape) != (g.channels, 1, g.kernel_h, g.kernel_w):
            raise ValueError(f"weights[{i}]: expected shape {(g.channels, 1, g.kernel_h, g.kernel_w)} "
                             f"for groups[{i}], got {tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (g.channels,):
            raise ValueError(f"bias[{i}]: expected shape ({g.channels},), got {tuple(b.shape)}")
    cast = autocast_inputs(x, *weights, *biases)
    x, weights, biases = cast[0], cast[1:1 + len(resolved)], cast[1 + len(resolved):]
    check_dtype(x)  # first: an integer x is x's fault, not the weights'
    check_same_device_and_dtype(x=x, **{f"weights[{i}]": w for i, w in enumerate(weights)},
                                **{f"bias[{i}]": b for i, b in enumerate(biases)})

    chosen = select_backend(OP_NAME, backend, x.device, fused_reason(x))
    if chosen == "reference":
        return grouped_depthwise_conv2d_reference(x, weights, biases, resolved, stride)
    packed_weight = pack_weights([w for w in weights if w is not None], x)
    packed_bias = None
    if any(b is not None for b in biases):
        packed_bias = torch.cat([b if b is not None else x.new_zeros(g.channels)
                                 for g, b in zip(resolved, biases)])
    return run_fused(x, packed_weight, packed_bias, resolved, stride, chosen)


def _per_group(name: str, values, resolved, required: bool) -> tuple:
    """``values`` as one entry per group (None for identity groups), checked."""
    if values is None and not required:
        return (None,) * len(resolved)
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence) or len(values) != len(resolved):
        raise TypeError(f"{name} must be a sequence with one entry per group ({len(resolved)}), got "
                        f"{type(values).__name__}" + (f" of length {len(values)}" if isinstance(values, Sequence) else ""))
    for i, (value, g) in enumerate(zip(values, resolved)):
        if g.identity and value is not None:
            raise ValueError(f"{name}[{i}] must be None: groups[{i}] is an identity group")
        if value is None:
            if required and not g.identity:
                raise ValueError(f"{name}[{i}] is None, but groups[{i}] has kernel {(g.kernel_h, g.kernel_w)}")
            continue
        check_tensor(f"{name}[{i}]", value)
    return tuple(values)
