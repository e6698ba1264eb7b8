"""Drop-in window attention module, parameter-compatible with timm's Swin WindowAttention."""

from __future__ import annotations

import torch
from torch import nn

from ultron_kernels.ops.window_attention import Pair, _axes, window_attention


class WindowAttention(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): qkv Linear -> window attention -> proj Linear.

    Parameter names and shapes follow timm's ``WindowAttention`` (``qkv``, ``proj``,
    ``relative_position_bias_table``) so its state_dict loads as is. Unlike timm, shift and
    padding happen inside the op, so the module takes the (B, H, W, C) grid directly.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Pair = 7, shift_size: Pair = 0,
                 qkv_bias: bool = True, rel_pos_bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.window_size = _axes("window_size", window_size, 2)
        self.shift_size = _axes("shift_size", shift_size, 2)
        factory = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        if rel_pos_bias:
            wh, ww = self.window_size
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads, **factory))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.relative_position_bias_table = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The op on (B, H, W, heads, D) q, k, v with this module's window, shift and bias."""
        return window_attention(q, k, v, self.window_size, self.shift_size,
                                self.relative_position_bias_table, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).view(batch, height, width, 3, self.num_heads, channels // self.num_heads)
        out = self.attend(*qkv.unbind(3))
        return self.proj(out.view(batch, height, width, channels))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, backend={self.backend!r}")
