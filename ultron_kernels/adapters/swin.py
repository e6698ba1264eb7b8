"""What the Swin adapters (timm, torchvision; V1 and V2) share: the fused attention on the
(B, H, W, C) grid, and the checks that decide whether a block can run it exactly."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ultron_kernels.adapters import Unsupported, set_fused
from ultron_kernels.ops.window_attention import fused_shape_reason, window_attention


def convert(module: nn.Module, overrides: dict, home: str, backend: str, *, head_dim: int,
            attention_dropout: float, window, shift, library: str, cosine: bool = False,
            padded: Optional[bool] = None):
    """Turn a Swin module into its fused subclass (``overrides`` in module ``home``) when it
    can run our op exactly; returns (module, report note). Raises Unsupported otherwise.
    ``padded``: whether the block's grid is padded to whole windows (None: known only per call)."""
    _check_convertible(module, head_dim, attention_dropout, window, backend, cosine)
    set_fused(module, overrides, home, backend)
    kind = "cosine attention (qk_norm, per-head logit scale)" if cosine else "attention"
    padding = f"; its grid padded to whole windows as {library} pads it" if padded else ""
    return module, (f"window {tuple(window)} shift {tuple(shift)}: {kind} in one {backend} "
                    f"window_attention call{padding}")


def _check_convertible(module: nn.Module, head_dim: int, attention_dropout: float, window, backend: str,
                       cosine: bool) -> None:
    if attention_dropout > 0:
        raise Unsupported(f"attention dropout {attention_dropout} > 0 (not implemented in the "
                          "fused op): left on its own path")
    why = fused_shape_reason(backend, tuple(window), head_dim, conversion_device(module, backend),
                             extras=cosine)
    if why:
        raise Unsupported(f"{why}: left on its own path")


def conversion_device(module: nn.Module, backend: str) -> torch.device:
    """The device whose limits a conversion checks: the module's if it is on a GPU; for a CPU
    module swapped to "cuda", the GPU it will most likely move to (the current one), or the
    simulated device where the CUDA kernels run on the CPU; else meta (no device limit known)."""
    from ultron_kernels import _cuda

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cuda" or backend != "cuda":
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device if _cuda.simulation_reason() is None else torch.device("meta")


def continuous_position_bias(cpb_mlp: nn.Module, coords_table: torch.Tensor, heads: int) -> torch.Tensor:
    """Swin V2's bias table, ((2wh-1)*(2ww-1), heads): 16 * sigmoid of the MLP over the log-
    spaced relative coordinates. Elementwise, so applying it to the table before the op's
    gather equals the libraries' order (gather, then sigmoid)."""
    return 16 * torch.sigmoid(cpb_mlp(coords_table).view(-1, heads))


def logit_scale_per_head(logit_scale: torch.Tensor) -> torch.Tensor:
    """Swin V2's (heads, 1, 1) logit scale -> the op's (heads,) scale, capped at 100."""
    return torch.clamp(logit_scale, max=math.log(100.0)).exp().view(-1)


def grid_attention(x: torch.Tensor, weight: torch.Tensor, qkv_bias: Optional[torch.Tensor],
                   heads: int, window, shift, table: Optional[torch.Tensor],
                   scale: Union[float, torch.Tensor], backend: str, *, qk_norm: bool = False,
                   shift_order: str = "pad_then_roll") -> torch.Tensor:
    """(B, H, W, C) or (B, T, H, W, C) -> the same with heads * head_dim channels: the qkv
    projection on the grid, then shifted-window attention in one op (the roll, partition and
    reverse are index arithmetic inside it; q, k and v are views of the projection).

    The libraries pad the grid with zeros before the projection, so their padded keys and
    values are the projection's bias (zero without one) and are not masked: pad_kv repeats
    that on grids not divisible by the window."""
    grid = x.shape[:-1]
    q, k, v = F.linear(x, weight, qkv_bias).view(*grid, 3, heads, -1).unbind(-3)
    pad_kv = None
    if any(size % w for size, w in zip(grid[1:], window)):
        bias = qkv_bias if qkv_bias is not None else weight.new_zeros(weight.shape[0])
        _, k_pad, v_pad = bias.view(3, heads, -1).unbind(0)
        pad_kv = (k_pad, v_pad)
    out = window_attention(q, k, v, tuple(window), tuple(shift), table, scale, qk_norm=qk_norm,
                           pad_kv=pad_kv, shift_order=shift_order, backend=backend)
    return out.reshape(*grid, -1)
