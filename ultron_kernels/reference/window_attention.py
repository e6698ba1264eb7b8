"""Pure-PyTorch window attention (Swin W-MSA / SW-MSA): the CPU path and the oracle's twin.

Pad bottom/right to whole windows, roll by (-sh, -sw) (or roll first, then pad: timm's
order), partition, attend with the relative position bias and the shifted-window region mask,
reverse. Padded positions are excluded as keys, or take given per-head key/value vectors
(what a zero-padded input becomes through a qkv projection with bias); their outputs are
dropped.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

# F.normalize's default: the cosine attention of Swin V2 (timm, torchvision) uses it.
NORM_EPS = 1e-12


def relative_position_index(window_h: int, window_w: int, device=None) -> torch.Tensor:
    """(N, N) index into a ((2wh-1)*(2ww-1), heads) bias table, as in Swin and timm. Not
    cached: it costs N^2 integer ops, and torch.compile traces this path (a cache wrapper
    would be a Dynamo warning)."""
    rows, cols = torch.meshgrid(torch.arange(window_h, device=device), torch.arange(window_w, device=device),
                                indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + window_h - 1
    d_col = cols[:, None] - cols[None, :] + window_w - 1
    return d_row * (2 * window_w - 1) + d_col


def region_labels(padded: int, window: int, shift: int) -> torch.Tensor:
    """Swin's region of each rolled coordinate along one axis: slices (0, -w), (-w, -s), (-s, None)."""
    coord = torch.arange(padded)
    if shift == 0:
        return torch.zeros(padded, dtype=torch.long)
    return (coord >= padded - window).long() + (coord >= padded - shift).long()


def dense_bias(rel_pos_bias: Optional[torch.Tensor], window_h: int, window_w: int,
               heads: int) -> Optional[torch.Tensor]:
    """(heads, N, N) bias from a table ((2wh-1)*(2ww-1), heads) or a dense tensor."""
    if rel_pos_bias is None or rel_pos_bias.dim() == 3:
        return rel_pos_bias
    n = window_h * window_w
    index = relative_position_index(window_h, window_w, rel_pos_bias.device)
    return rel_pos_bias[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)


def _partition(t: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
    """(B, Hp, Wp, heads, D) -> (B, nWh, nWw, heads, N, D)."""
    b, hp, wp, heads, d = t.shape
    t = t.reshape(b, hp // window_h, window_h, wp // window_w, window_w, heads, d)
    return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(
        b, hp // window_h, wp // window_w, heads, window_h * window_w, d)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               window: tuple[int, int], shift: tuple[int, int],
                               rel_pos_bias: Optional[torch.Tensor],
                               scale: Union[float, torch.Tensor], qk_norm: bool = False,
                               pad_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                               roll_first: bool = False, return_lse: bool = False):
    """q, k, v: (B, H, W, heads, D); returns (B, H, W, heads, D), contiguous, and with
    ``return_lse`` also the logsumexp of each query's scores (B, H, W, heads) in the compute
    dtype (-inf for a row whose every key is masked), as the fused forward saves it.

    scale: a float or a (heads,) tensor. qk_norm: q and k L2-normalised along D (cosine
    attention). pad_kv: (k_pad, v_pad), each (heads, D): padded positions are keys with these
    values instead of being excluded. roll_first: roll the unpadded grid, then pad (timm's
    order) instead of padding, then rolling."""
    batch, height, width, heads = q.shape[:4]
    (wh, ww), (sh, sw) = window, shift
    hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
    pad = (0, 0, 0, 0, 0, wp - width, 0, hp - height)
    image = torch.zeros(hp, wp, dtype=torch.bool, device=q.device)
    image[:height, :width] = True

    def arrange(t: torch.Tensor) -> torch.Tensor:  # the image -> the rolled, padded grid
        if roll_first:
            return F.pad(torch.roll(t, (-sh, -sw), (1, 2)), pad)
        return torch.roll(F.pad(t, pad), (-sh, -sw), (1, 2))

    def restore(t: torch.Tensor) -> torch.Tensor:
        """(B, nWh, nWw, heads, N, X) windows -> (B, H, W, heads, X) on the image."""
        t = t.reshape(batch, hp // wh, wp // ww, heads, wh, ww, t.shape[-1])
        t = t.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, hp, wp, heads, t.shape[-1])
        if roll_first:
            return torch.roll(t[:, :height, :width], (sh, sw), (1, 2))
        return torch.roll(t, (sh, sw), (1, 2))[:, :height, :width]

    # Scores, softmax and P.V in fp32 for 16-bit inputs, as the kernels accumulate: large
    # but finite fp16 inputs must not overflow to inf here either.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v = (arrange(t.to(compute)) for t in (q, k, v))
    valid = image if roll_first else torch.roll(image, (-sh, -sw), (0, 1))
    keys = valid
    if pad_kv is not None:
        in_image = valid[None, :, :, None, None]
        k = torch.where(in_image, k, pad_kv[0].to(compute))
        v = torch.where(in_image, v, pad_kv[1].to(compute))
        keys = torch.ones_like(valid)
    if qk_norm:
        q, k = F.normalize(q, dim=-1, eps=NORM_EPS), F.normalize(k, dim=-1, eps=NORM_EPS)
    labels = (region_labels(hp, wh, sh)[:, None] * 3 + region_labels(wp, ww, sw)[None, :])
    labels = labels.to(q.device)

    def windows_of(grid: torch.Tensor) -> torch.Tensor:  # (Hp, Wp) -> (nWh, nWw, N)
        return _partition(grid[None, :, :, None, None], wh, ww)[0, :, :, 0, :, 0]

    valid_w, keys_w, labels_w = windows_of(valid), windows_of(keys), windows_of(labels)
    allowed = (labels_w[..., :, None] == labels_w[..., None, :]) & keys_w[..., None, :]
    # Padded queries attend anywhere (their outputs are dropped): keeps every row finite.
    allowed = allowed | ~valid_w[..., :, None]

    if isinstance(scale, torch.Tensor):
        scale = scale.to(compute).view(heads, 1, 1)
    scores = _partition(q, wh, ww) @ _partition(k, wh, ww).transpose(-1, -2) * scale
    bias = dense_bias(rel_pos_bias, wh, ww, heads)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~allowed[None, :, :, None], float("-inf"))
    # A query whose every key is masked (a -inf bias) gets output 0 and zero gradients, as on
    # the fused backends; its scores are made finite first so no NaN enters the softmax or
    # its backward.
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    attn = scores.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)
    out = restore(attn @ _partition(v, wh, ww)).to(out_dtype).contiguous()
    if not return_lse:
        return out
    return out, restore(scores.logsumexp(-1, keepdim=True))[..., 0].contiguous()
