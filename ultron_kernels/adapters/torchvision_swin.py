"""torchvision's Swin (``torchvision.models.swin_transformer``, swin_t/s/b): its
``ShiftedWindowAttention`` becomes one op call on the (B, H, W, C) grid.

torchvision pads and then rolls (the op's order) and gives no shift to a window that covers
the whole padded grid, which the adapter repeats. Its padded keys are zero inputs projected
by qkv (so they take the qkv bias and are not masked), where the op excludes padded keys:
grids not divisible by the window therefore run torchvision's own path, call by call. Shift
regions are masked with -100 there and excluded here: equal within rounding.
"""

from __future__ import annotations

import torch.nn.functional as F

from ultron_kernels.adapters import Adapter, class_named
from ultron_kernels.adapters.swin import convert, cosine_attention_not_yet, grid_attention

_MODULE = "torchvision.models.swin_transformer"


def _forward(self, x):
    height, width = x.shape[1:3]
    window = self.window_size
    if height % window[0] or width % window[1]:
        return self._ultron_original.forward(self, x)
    shift = [0 if window[0] >= height else self.shift_size[0],
             0 if window[1] >= width else self.shift_size[1]]
    head_dim = x.shape[-1] // self.num_heads
    out = grid_attention(x, self.qkv, self.num_heads, window, shift,
                         self.relative_position_bias_table, head_dim ** -0.5, self._ultron_backend)
    return F.dropout(self.proj(out), p=self.dropout, training=self.training)


def _convert(module, backend: str):
    return convert(module, {"forward": _forward}, __name__, backend,
                   head_dim=module.qkv.in_features // module.num_heads,
                   attention_dropout=module.attention_dropout, window=module.window_size,
                   shift=module.shift_size, library="torchvision")


ADAPTERS = [
    Adapter("torchvision ShiftedWindowAttention", class_named(_MODULE, "ShiftedWindowAttention"), _convert),
    Adapter("torchvision ShiftedWindowAttentionV2", class_named(_MODULE, "ShiftedWindowAttentionV2"),
            cosine_attention_not_yet("torchvision")),
]
