"""timm's Swin Transformer (``timm.models.swin_transformer``): the block's shift, partition,
attention, reverse and unshift become one op call on the (B, H, W, C) grid.

Exact where timm's own order agrees with the op's: grids divisible by the window (every
standard 224/256/384 configuration; timm rolls before padding, the op pads before rolling, so
they differ only on padded grids). Other grids run timm's own path, call by call. Timm masks
the shifted-window regions with -100 where the op excludes them: equal within rounding
(exp(-100) is below fp32's resolution against a non-masked key).
"""

from __future__ import annotations

from ultron_kernels.adapters import Adapter, class_named
from ultron_kernels.adapters.swin import convert, cosine_attention_not_yet, grid_attention

_BLOCK = ("timm.models.swin_transformer", "SwinTransformerBlock")


def _attn(self, x):
    attn = self.attn
    height, width = x.shape[1:3]
    window = self.window_size
    # timm precomputes its mask for input_resolution unless dynamic_mask is set; the op's
    # exclusion equals it on the same grid.
    same_grid = getattr(self, "dynamic_mask", False) or (height, width) == tuple(self.input_resolution)
    if height % window[0] or width % window[1] or not same_grid:
        return self._ultron_original._attn(self, x)
    out = grid_attention(x, attn.qkv, attn.num_heads, window, self.shift_size,
                         attn.relative_position_bias_table, attn.scale, self._ultron_backend)
    return attn.proj_drop(attn.proj(out))


def _convert_block(block, backend: str):
    attn = block.attn
    return convert(block, {"_attn": _attn}, __name__, backend,
                   head_dim=attn.qkv.out_features // (3 * attn.num_heads),
                   attention_dropout=attn.attn_drop.p, window=block.window_size,
                   shift=block.shift_size, library="timm")


ADAPTERS = [
    Adapter("timm SwinTransformerBlock", class_named(*_BLOCK), _convert_block),
    Adapter("timm SwinTransformerV2Block",
            class_named("timm.models.swin_transformer_v2", "SwinTransformerV2Block"),
            cosine_attention_not_yet("timm")),
]
