"""timm's Swin Transformer V1 and V2 (``timm.models.swin_transformer``,
``swin_transformer_v2``): the block's shift, partition, attention, reverse and unshift become
one op call on the (B, H, W, C) grid.

timm rolls the grid and then pads it (``shift_order="roll_then_pad"``); its padded tokens are
zeros through the qkv projection (``pad_kv``), its mask is built on the padded grid, as the
op's. Shift regions are masked with -100 there and excluded here: equal within rounding
(exp(-100) is below fp32's resolution against a non-masked key).
"""

from __future__ import annotations

import torch

from ultron_kernels.adapters import Adapter, class_named, recognised_only
from ultron_kernels.adapters.swin import (continuous_position_bias, convert, grid_attention,
                                          logit_scale_per_head)


def _v1_parameters(attn):
    """(qkv weight, qkv bias, bias table, scale, qk_norm) of timm's V1 WindowAttention."""
    return attn.qkv.weight, attn.qkv.bias, attn.relative_position_bias_table, attn.scale, False


def _v2_parameters(attn):
    """The same for V2: cosine attention, the continuous position bias, a zero k-bias."""
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    table = continuous_position_bias(attn.cpb_mlp, attn.relative_coords_table, attn.num_heads)
    return attn.qkv.weight, bias, table, logit_scale_per_head(attn.logit_scale), True


def _attn(self, x):
    height, width = x.shape[1:3]
    # timm precomputes its mask for input_resolution unless dynamic_mask is set; on another
    # grid its own path runs (and says what is wrong).
    if not (getattr(self, "dynamic_mask", False) or (height, width) == tuple(self.input_resolution)):
        return self._ultron_original._attn(self, x)
    attn = self.attn
    weight, bias, table, scale, cosine = self._ultron_parameters(attn)
    out = grid_attention(x, weight, bias, attn.num_heads, self.window_size, self.shift_size, table,
                         scale, self._ultron_backend, qk_norm=cosine, shift_order="roll_then_pad")
    return attn.proj_drop(attn.proj(out))


def _converter(parameters, cosine: bool):
    def convert_block(block, backend: str):
        attn = block.attn
        return convert(block, {"_attn": _attn, "_ultron_parameters": staticmethod(parameters)},
                       __name__, backend, head_dim=attn.qkv.out_features // (3 * attn.num_heads),
                       attention_dropout=attn.attn_drop.p, window=block.window_size,
                       shift=block.shift_size, library="timm", cosine=cosine,
                       padded=any(r % w for r, w in zip(block.input_resolution, block.window_size)))
    return convert_block


ADAPTERS = [
    Adapter("timm SwinTransformerBlock", class_named("timm.models.swin_transformer", "SwinTransformerBlock"),
            _converter(_v1_parameters, cosine=False)),
    Adapter("timm SwinTransformerV2Block",
            class_named("timm.models.swin_transformer_v2", "SwinTransformerV2Block"),
            _converter(_v2_parameters, cosine=True)),
    Adapter("timm WindowMultiHeadAttention (swinv2_cr)",
            class_named("timm.models.swin_transformer_v2_cr", "WindowMultiHeadAttention"),
            recognised_only("timm's Swin V2-CR attention is not supported yet: left on timm's path")),
]
