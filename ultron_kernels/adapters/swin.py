"""What the Swin adapters (timm, torchvision) share: the fused attention on the (B, H, W, C)
grid, and the checks that decide whether a block can run it exactly."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ultron_kernels.adapters import Unsupported, set_fused
from ultron_kernels.ops.window_attention import FUSED_HEAD_DIMS, window_attention


def convert(module: nn.Module, overrides: dict, home: str, backend: str, *, head_dim: int,
            attention_dropout: float, window, shift, library: str):
    """Turn a Swin module into its fused subclass (``overrides`` in module ``home``) when it
    can run our op exactly; returns (module, report note). Raises Unsupported otherwise."""
    _check_convertible(head_dim, attention_dropout, backend)
    set_fused(module, overrides, home, backend)
    return module, (f"window {tuple(window)} shift {tuple(shift)}: one {backend} window_attention "
                    f"call (grids not divisible by the window keep {library}'s path)")


def cosine_attention_not_yet(library: str):
    """The adapter of a Swin V2 module: recognised, left alone with the reason."""
    def convert_v2(module: nn.Module, backend: str):
        raise Unsupported("Swin V2 cosine attention needs the op's qk_norm and per-head scale "
                          f"(issue #13, part 1): left on {library}'s path")
    return convert_v2


def _check_convertible(head_dim: int, attention_dropout: float, backend: str) -> None:
    if attention_dropout > 0:
        raise Unsupported(f"attention dropout {attention_dropout} > 0 (not implemented in the "
                          "fused op): left on its own path")
    if head_dim not in FUSED_HEAD_DIMS and backend != "reference":
        raise Unsupported(f"head_dim {head_dim} has no fused kernel (fused: {FUSED_HEAD_DIMS}): "
                          "left on its own path")


def grid_attention(x: torch.Tensor, qkv: nn.Linear, heads: int, window, shift,
                   table: Optional[torch.Tensor], scale: float, backend: str) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, heads * head_dim): the qkv projection on the grid, then
    shifted-window attention in one op (the roll, partition and reverse are index arithmetic
    inside it; q, k and v are views of the projection)."""
    batch, height, width, _ = x.shape
    q, k, v = qkv(x).view(batch, height, width, 3, heads, -1).unbind(3)
    out = window_attention(q, k, v, tuple(window), tuple(shift), table, scale, backend=backend)
    return out.reshape(batch, height, width, -1)
