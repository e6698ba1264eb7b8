"""Pure-PyTorch window attention (Swin W-MSA / SW-MSA, 2D or Video Swin's 3D): the CPU path
and the oracle's twin.

Pad the end of each axis to whole windows, roll by minus the shift (or roll first, then pad: timm's
order), partition, attend with the relative position bias and the shifted-window region mask,
reverse. Padded positions are excluded as keys, or take given per-head key/value vectors
(what a zero-padded input becomes through a qkv projection with bias); their outputs are
dropped.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

# F.normalize's default: the cosine attention of Swin V2 (timm, torchvision) uses it.
NORM_EPS = 1e-12


def relative_position_index(*window: int, device=None) -> torch.Tensor:
    """(N, N) index into a relative position table for a (wh, ww) or (wt, wh, ww) window:
    ((2wh-1)*(2ww-1), heads) as in Swin and timm, ((2wt-1)*(2wh-1)*(2ww-1), heads) as in
    torchvision's Video Swin (frame offset slowest); a 2D window is the wt = 1 case. Not
    cached: it costs N^2 integer ops, and torch.compile traces this path (a cache wrapper
    would be a Dynamo warning)."""
    coords = torch.meshgrid(*(torch.arange(w, device=device) for w in window), indexing="ij")
    index = torch.zeros((), dtype=torch.long, device=device)
    for coord, w in zip(coords, window):
        coord = coord.flatten()
        index = index * (2 * w - 1) + (coord[:, None] - coord[None, :] + w - 1)
    return index


def region_labels(padded: int, window: int, shift: int) -> torch.Tensor:
    """Swin's region of each rolled coordinate along one axis: slices (0, -w), (-w, -s), (-s, None)."""
    coord = torch.arange(padded)
    if shift == 0:
        return torch.zeros(padded, dtype=torch.long)
    return (coord >= padded - window).long() + (coord >= padded - shift).long()


def dense_bias(rel_pos_bias: Optional[torch.Tensor], window, heads: int) -> Optional[torch.Tensor]:
    """(heads, N, N) bias from a relative position table (2D or 3D ``window``) or a dense
    tensor."""
    if rel_pos_bias is None or rel_pos_bias.dim() == 3:
        return rel_pos_bias
    n = math.prod(window)
    index = relative_position_index(*window, device=rel_pos_bias.device)
    return rel_pos_bias[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)


def decomposed_bias(q_windows: torch.Tensor, rel_pos: tuple[torch.Tensor, torch.Tensor],
                    window, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """SAM / ViTDet's decomposed relative position bias of (..., N, D) query windows of a
    (1, wh, ww) window: bias[i, j] = q_i . Rh[y_i - y_j + wh - 1] + q_i . Rw[x_i - x_j + ww - 1],
    (y, x) in-window coordinates, as (..., N, N) in ``dtype`` (default q's). Each query's
    products with every table row ((..., N, 2wh - 1) and (..., N, 2ww - 1)) are formed in q's
    dtype, then gathered per key row and column: the (N, N, D) gathered tables are never
    made, and the one (..., N, N) tensor is formed in ``dtype`` directly."""
    _, wh, ww = window
    device = q_windows.device
    biases = []
    for table, size, coord in ((rel_pos[0], wh, torch.arange(wh * ww, device=device) // ww),
                               (rel_pos[1], ww, torch.arange(wh * ww, device=device) % ww)):
        per_offset = q_windows @ table.to(q_windows.dtype).t()           # (..., N, 2 size - 1)
        offsets = coord[:, None] - torch.arange(size, device=device)[None, :] + size - 1
        biases.append(per_offset.gather(-1, offsets.expand(*per_offset.shape[:-1], size)).to(dtype))
    return (biases[0][..., :, None] + biases[1][..., None, :]).flatten(-2)


def _partition(t: torch.Tensor, window) -> torch.Tensor:
    """(B, Tp, Hp, Wp, heads, D) -> (B, nWt, nWh, nWw, heads, N, D)."""
    b, tp, hp, wp, heads, d = t.shape
    wt, wh, ww = window
    t = t.reshape(b, tp // wt, wt, hp // wh, wh, wp // ww, ww, heads, d)
    return t.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(
        b, tp // wt, hp // wh, wp // ww, heads, wt * wh * ww, d)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               window, shift, rel_pos_bias: Optional[torch.Tensor],
                               scale: Union[float, torch.Tensor], qk_norm: bool = False,
                               pad_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                               roll_first: bool = False, return_lse: bool = False,
                               rel_pos: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """q, k, v: (B, H, W, heads, D) with a (wh, ww) window and shift, or (B, T, H, W, heads,
    D) with (wt, wh, ww) ones; returns q's shape, contiguous, and with ``return_lse`` also the
    logsumexp of each query's scores (q's shape without D) in the compute dtype (-inf for a
    row whose every key is masked), as the fused forward saves it. A 2D grid is computed as
    the T = 1 volume.

    scale: a float or a (heads,) tensor. qk_norm: q and k L2-normalised along D (cosine
    attention). pad_kv: (k_pad, v_pad), each (heads, D): padded positions are keys with these
    values instead of being excluded. roll_first: roll the unpadded grid, then pad (timm's
    order) instead of padding, then rolling. rel_pos: (rel_pos_h, rel_pos_w), 2D windows:
    SAM's decomposed bias (decomposed_bias) from q as given, added unscaled."""
    if len(window) == 2:
        result = window_attention_reference(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), (1, *window), (0, *shift),
            rel_pos_bias, scale, qk_norm, pad_kv, roll_first, return_lse, rel_pos)
        return tuple(t.squeeze(1) for t in result) if return_lse else result.squeeze(1)
    batch, frames, height, width, heads = q.shape[:5]
    wt, wh, ww = window
    sizes = (frames, height, width)
    padded = tuple(-(-size // w) * w for size, w in zip(sizes, window))
    tp, hp, wp = padded
    pad = (0, 0, 0, 0, 0, wp - width, 0, hp - height, 0, tp - frames)
    back = tuple(-s for s in shift)
    dims = (1, 2, 3)
    image = torch.zeros(padded, dtype=torch.bool, device=q.device)
    image[:frames, :height, :width] = True

    # A roll or a pad that moves nothing is skipped: each would be a copy of q, k and v (and
    # of their gradients) held for the backward.
    def roll(t: torch.Tensor, shifts) -> torch.Tensor:
        return torch.roll(t, shifts, dims) if any(shifts) else t

    def pad_grid(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, pad) if padded != sizes else t

    def arrange(t: torch.Tensor) -> torch.Tensor:  # the image -> the rolled, padded grid
        if roll_first:
            return pad_grid(roll(t, back))
        return roll(pad_grid(t), back)

    def restore(t: torch.Tensor) -> torch.Tensor:
        """(B, nWt, nWh, nWw, heads, N, X) windows -> (B, T, H, W, heads, X) on the image."""
        t = t.reshape(batch, tp // wt, hp // wh, wp // ww, heads, wt, wh, ww, t.shape[-1])
        t = t.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(batch, tp, hp, wp, heads, t.shape[-1])
        if roll_first:
            return roll(t[:, :frames, :height, :width], tuple(shift))
        return roll(t, tuple(shift))[:, :frames, :height, :width]

    # Scores, softmax and P.V in fp32 for 16-bit inputs, as the kernels accumulate: large
    # but finite fp16 inputs must not overflow to inf here either.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v = (arrange(t.to(compute)) for t in (q, k, v))
    valid = image if roll_first else torch.roll(image, back, (0, 1, 2))
    keys = valid
    if pad_kv is not None:
        in_image = valid[None, :, :, :, None, None]
        k = torch.where(in_image, k, pad_kv[0].to(compute))
        v = torch.where(in_image, v, pad_kv[1].to(compute))
        keys = torch.ones_like(valid)
    labels = (region_labels(tp, wt, shift[0])[:, None, None] * 9
              + region_labels(hp, wh, shift[1])[None, :, None] * 3
              + region_labels(wp, ww, shift[2])[None, None, :]).to(q.device)

    def windows_of(grid: torch.Tensor) -> torch.Tensor:  # (Tp, Hp, Wp) -> (nWt, nWh, nWw, N)
        return _partition(grid[None, :, :, :, None, None], window)[0, :, :, :, 0, :, 0]

    def allowed_pairs() -> torch.Tensor:  # (nWt, nWh, nWw, N, N)
        valid_w, keys_w, labels_w = windows_of(valid), windows_of(keys), windows_of(labels)
        allowed = (labels_w[..., :, None] == labels_w[..., None, :]) & keys_w[..., None, :]
        # Padded queries attend anywhere (their outputs are dropped): keeps every row finite.
        return allowed | ~valid_w[..., :, None]

    if isinstance(scale, torch.Tensor):
        scale = scale.to(compute).view(heads, 1, 1)
    decomposed = None
    if rel_pos is not None:  # from q as given: rel_pos excludes qk_norm
        q_windows = _partition(q, window)
        if rel_pos_bias is None and not return_lse:
            # As timm computes it, so that the reference keeps no more in memory than timm's
            # own path: the decomposed bias is SDPA's additive mask, in the inputs' dtype (a
            # float32 mask would be twice a 16-bit one). It is masked only where some pair is
            # not allowed (a shift, or padded keys without pad_kv; never in SAM's blocks). No
            # row is fully masked: every real query is a key of its own region.
            mask = decomposed_bias(q_windows, rel_pos, window, out_dtype)
            if any(shift) or (pad_kv is None and padded != sizes):
                mask = mask.masked_fill(~allowed_pairs()[None, :, :, :, None], float("-inf"))
            per_head = isinstance(scale, torch.Tensor)
            q_windows = q_windows * scale if per_head else q_windows
            out = F.scaled_dot_product_attention(
                *(t.to(out_dtype).flatten(0, 3) for t in (q_windows, _partition(k, window), _partition(v, window))),
                attn_mask=mask.flatten(0, 3), scale=1.0 if per_head else scale)
            return restore(out.reshape(q_windows.shape)).contiguous()
        decomposed = decomposed_bias(q_windows, rel_pos, window)
    if qk_norm:
        q, k = F.normalize(q, dim=-1, eps=NORM_EPS), F.normalize(k, dim=-1, eps=NORM_EPS)
    scores = _partition(q, window) @ _partition(k, window).transpose(-1, -2) * scale
    bias = dense_bias(rel_pos_bias, window, heads)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if decomposed is not None:
        scores = scores + decomposed
    scores = scores.masked_fill(~allowed_pairs()[None, :, :, :, None], float("-inf"))
    # A query whose every key is masked (a -inf bias) gets output 0 and zero gradients, as on
    # the fused backends; its scores are made finite first so no NaN enters the softmax or
    # its backward.
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    attn = scores.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)
    out = restore(attn @ _partition(v, window)).to(out_dtype).contiguous()
    if not return_lse:
        return out
    return out, restore(scores.logsumexp(-1, keepdim=True))[..., 0].contiguous()
