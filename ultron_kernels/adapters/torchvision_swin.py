"""torchvision's Swin V1 and V2 (``torchvision.models.swin_transformer``: swin_t/s/b,
swin_v2_t/s/b) and Video Swin (``torchvision.models.video.swin_transformer``: swin3d_t/s/b):
``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2`` and ``ShiftedWindowAttention3d``
become one op call on the (B, H, W, C) grid or the (B, T, H, W, C) video.

torchvision pads and then rolls (the op's default order), gives no shift to a window that
covers the whole padded grid (repeated here), and projects its zero-padded tokens with the
qkv bias (``pad_kv``); V2 zeroes the k part of that bias. Shift regions are masked with -100
there and excluded here: equal within rounding.

Video Swin shrinks the window to the input on an axis where the input is not larger, with
no shift there. Its bias is then the top-left corner of the full window's (N, N) bias, which
is the shrunk window's own only when the frame axis alone shrank; it is passed as a dense
bias in that case, so that the result is torchvision's exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ultron_kernels.adapters import Adapter, class_named
from ultron_kernels.adapters.swin import (continuous_position_bias, convert, grid_attention,
                                          logit_scale_per_head)

_MODULE = "torchvision.models.swin_transformer"


def _v1_parameters(module, head_dim: int):
    """(qkv bias, bias table, scale, qk_norm) of ShiftedWindowAttention."""
    return module.qkv.bias, module.relative_position_bias_table, head_dim ** -0.5, False


def _v2_parameters(module, head_dim: int):
    """The same for V2: cosine attention, the continuous position bias, the k-bias zeroed."""
    bias = module.qkv.bias
    if bias is not None:
        third = bias.numel() // 3
        bias = torch.cat((bias[:third], torch.zeros_like(bias[third:2 * third]), bias[2 * third:]))
    table = continuous_position_bias(module.cpb_mlp, module.relative_coords_table, module.num_heads)
    return bias, table, logit_scale_per_head(module.logit_scale), True


def _forward(self, x):
    height, width = x.shape[1:3]
    window = self.window_size
    padded = (-(-height // window[0]) * window[0], -(-width // window[1]) * window[1])
    shift = [0 if window[a] >= padded[a] else self.shift_size[a] for a in range(2)]
    head_dim = x.shape[-1] // self.num_heads
    bias, table, scale, cosine = self._ultron_parameters(self, head_dim)
    out = grid_attention(x, self.qkv.weight, bias, self.num_heads, window, shift, table, scale,
                         self._ultron_backend, qk_norm=cosine)
    return F.dropout(self.proj(out), p=self.dropout, training=self.training)


def _forward_3d(self, x):
    size = x.shape[1:4]
    window = [min(w, s) for w, s in zip(self.window_size, size)]
    shift = [0 if s <= w else sh for w, s, sh in zip(self.window_size, size, self.shift_size)]
    if window == list(self.window_size):
        bias = self.relative_position_bias_table
    else:
        bias = self.get_relative_position_bias(window)[0]
    head_dim = x.shape[-1] // self.num_heads
    out = grid_attention(x, self.qkv.weight, self.qkv.bias, self.num_heads, window, shift, bias,
                         head_dim ** -0.5, self._ultron_backend)
    return F.dropout(self.proj(out), p=self.dropout, training=self.training)


def _convert_3d(module, backend: str):
    return convert(module, {"forward": _forward_3d}, __name__, backend,
                   head_dim=module.qkv.in_features // module.num_heads,
                   attention_dropout=module.attention_dropout, window=module.window_size,
                   shift=module.shift_size, library="torchvision")


def _converter(parameters, cosine: bool):
    def convert_module(module, backend: str):
        return convert(module, {"forward": _forward, "_ultron_parameters": staticmethod(parameters)},
                       __name__, backend, head_dim=module.qkv.in_features // module.num_heads,
                       attention_dropout=module.attention_dropout, window=module.window_size,
                       shift=module.shift_size, library="torchvision", cosine=cosine)
    return convert_module


ADAPTERS = [
    Adapter("torchvision ShiftedWindowAttention", class_named(_MODULE, "ShiftedWindowAttention"),
            _converter(_v1_parameters, cosine=False)),
    Adapter("torchvision ShiftedWindowAttentionV2", class_named(_MODULE, "ShiftedWindowAttentionV2"),
            _converter(_v2_parameters, cosine=True)),
    Adapter("torchvision ShiftedWindowAttention3d (Video Swin)",
            class_named("torchvision.models.video.swin_transformer", "ShiftedWindowAttention3d"),
            _convert_3d),
]
