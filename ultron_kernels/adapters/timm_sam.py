"""timm's Segment Anything / ViTDet image encoder (``timm.models.vision_transformer_sam``):
the attention of its windowed and global blocks with the decomposed relative position
becomes one ``window_attention(rel_pos=...)`` call, the whole (H, W) input one window.

The block partitions (and pads) the grid itself before calling the attention, so the
attention sees whole windows: windowed blocks a batch of (14, 14) windows, global blocks the
whole grid. Its padded tokens went through the qkv projection like any other (zeros after
the norm: the projection's bias) and are not masked; the op computes exactly that, since it
gets the same inputs. Tables of another length than 2 * size - 1 are resized with timm's own
``get_rel_pos``, as timm does per call.

Converted on every backend: the fused ones (Triton, CUDA) keep each query's products with the
table rows, never the N x N bias; "auto" takes Triton on a GPU that has it, else the
reference, which keeps no more in memory than timm's own path. A window or head dim the
chosen kernels do not run is left on timm's path with the limit named, as are the RoPE and
LayerNorm-qk-norm variants.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ultron_kernels.adapters import Adapter, Unsupported, class_named, set_fused
from ultron_kernels.adapters.swin import conversion_device
from ultron_kernels.ops.window_attention import fused_shape_reason, window_attention


def _table(table, size: int):
    """``table`` for windows ``size`` tokens long: as it is when it has 2 * size - 1 rows, else
    resampled linearly to that length along its rows, as timm's ``get_rel_pos`` does per call."""
    if table.shape[0] == 2 * size - 1:
        return table
    return F.interpolate(table.t()[None], size=2 * size - 1, mode="linear")[0].t()


def _forward(self, x):
    batch, height, width, _ = x.shape
    heads = self.num_heads
    q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).view(batch, height, width, 3, heads, -1).unbind(3)
    tables = (_table(self.rel_pos_h, height), _table(self.rel_pos_w, width))
    out = window_attention(q, k, v, (height, width), 0, None, self.scale, rel_pos=tables,
                           backend=self._ultron_backend)
    return self.proj_drop(self.proj(out.reshape(batch, height, width, -1)))


def _convert(attn: nn.Module, backend: str):
    if attn.rope is not None:
        raise Unsupported("rotary position embedding (RoPE) is not supported: left on timm's path")
    if not attn.use_rel_pos:
        raise Unsupported("no relative position: timm's SDPA already runs this attention fused")
    if not isinstance(attn.q_norm, nn.Identity):
        raise Unsupported("qk_norm (a LayerNorm per head) is not the op's cosine qk_norm: left on timm's path")
    if attn.attn_drop.p > 0:
        raise Unsupported(f"attention dropout {attn.attn_drop.p} > 0 (not implemented in the fused op): "
                          "left on timm's path")
    # The block's windows (or, in a global block, its grid) are the tables' size.
    size = (attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2
    why = fused_shape_reason(backend, size, attn.head_dim, conversion_device(attn, backend), rel_pos=True)
    if why:
        raise Unsupported(f"{why}: left on timm's SDPA path")
    set_fused(attn, {"forward": _forward}, __name__, backend)
    return attn, f"decomposed relative position, tables for {size[0]}x{size[1]} windows: one {backend} " \
                 "window_attention call per (H, W) input"


ADAPTERS = [
    Adapter("timm SAM / ViTDet Attention", class_named("timm.models.vision_transformer_sam", "Attention"),
            _convert),
]
