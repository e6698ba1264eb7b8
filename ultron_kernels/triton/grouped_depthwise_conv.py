"""Triton kernels for the grouped depthwise convolution (and the channel-wise dilated one,
its special case).

One launch covers every group. Axis 1 of the grid walks channel blocks, each inside one group
(a host-made block table names the group and the block's channel range), so a program reads
its group's kernel shape, dilation, padding and weight offset as scalars: the tap loops run
that group's own kh x kw taps (a 1x11 band costs 11 taps, not 121), and the addresses stay
affine in the channel, so channels_last loads vectorise. An identity group is a 1x1 tap of
weight 1 (exact in every dtype). The kernels take the tensors' strides, so NCHW and
channels_last share them; the tile is (channels x output pixels), shaped per layout so that
the contiguous axis (W for NCHW, C for NHWC) lies along the warp.

* forward and grad input: one gather kernel; forward is a direct convolution with a masked
  load per tap (re-reads hit L1/L2), grad input reads the taps backwards (no atomics);
* grad weight / bias: per-program partial sums written to a (programs, weights) buffer that
  the launcher reduces in a fixed order, so two backward calls give bitwise-identical grads.
  Grid axis 2 walks chunks of TAPS taps; a chunk past its group's taps has nothing to do.

Large kernels (9x9 and up: RepLKNet, UniRepLKNet; 16-bit, stride 1) take tensor-core kernels
instead, where the gather would read each input element kh*kw times. One kernel row of a
depthwise conv over an output tile BLOCK_W columns wide is a product with a banded (Toeplitz)
matrix: out[r, x] += sum_s strip[r, s] * T[s, x], with strip the 2*BLOCK_W source columns the
tile reads through that row and T[s, x] = w[i, (s - x) / dw] on the band. So each kernel row
is one (BLOCK_H x 2*BLOCK_W) @ (2*BLOCK_W x BLOCK_W) dot per channel (tl.dot batched over the
channel block): the strip is read once per kernel row instead of once per tap, and the taps
run on tensor cores (exact: products of 16-bit values in fp32). Grad input is the same kernel
with the weights flipped. Grad weight is the same band read the other way: per kernel row i,
the products M = dy_tileᵀ @ x_strip summed over the tiles hold dw[i, j] on their j-th
diagonal (sum over x of M[x, x + j*dw]), extracted once per program.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ultron_kernels.backends import autotune_enabled, triton_interpreter_on
from ultron_kernels.reference.grouped_depthwise_conv import ResolvedGroup
from ultron_kernels.triton.launch import Launch, autotune, plan

GROUP_COLUMNS = 9   # first channel, channels, kh, kw, dh, dw, pad top, pad left, weight offset (-1: identity)
BLOCK_COLUMNS = 3   # group, first channel, end channel
MAX_TAPS_PER_CHUNK = 16
# The banded (Toeplitz) path: output tiles BLOCK_W columns wide read STRIP = 2 * BLOCK_W source
# columns per kernel row, so a group's horizontal span (kw - 1) * dw + 1 may be up to
# BLOCK_W + 1: 32-wide tiles take spans up to 33 (a 31-wide kernel undilated), 16-wide tiles
# spans up to 17 (13x13), with half the band's wasted products. Kernels of LARGE_KERNEL_TAPS
# taps and more take it.
BAND_TILE_WIDTHS = (16, 32)
LARGE_KERNEL_TAPS = 81
BAND_BLOCK_C = 4  # channels_last: 8-byte runs of bf16 channels; 8 channels need 255 registers on sm_90


@triton.jit
def _tile_pixels(pid_pixels, height, width, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Batch index and (row, col) vectors of one program's pixel tile, and which exist."""
    tiles_h = tl.cdiv(height, BLOCK_H)
    tiles_w = tl.cdiv(width, BLOCK_W)
    batch = pid_pixels // (tiles_h * tiles_w)
    tile = pid_pixels % (tiles_h * tiles_w)
    pixel = tl.arange(0, BLOCK_H * BLOCK_W)
    row = (tile // tiles_w) * BLOCK_H + pixel // BLOCK_W
    col = (tile % tiles_w) * BLOCK_W + pixel % BLOCK_W
    return batch, row, col, (row < height) & (col < width)


@triton.jit
def _block_group(group_ptr, block_ptr, pid_channels, BLOCK_C: tl.constexpr, FULL_BLOCKS: tl.constexpr):
    """The channels of block ``pid_channels`` (all in one group) and that group's geometry:
    (channel, channel_ok, kh, kw, dh, dw, pad_top, pad_left, each channel's weight at tap 0,
    the stride between taps, has_weight). The packed weights are tap-major per group, so a
    tap's weights for consecutive channels are contiguous. FULL_BLOCKS: every group's channel
    count is a multiple of BLOCK_C, so blocks start at multiples of BLOCK_C and need no channel
    mask: the channels_last loads can then be vectors (the table's values carry no such
    facts for the compiler)."""
    group = tl.load(block_ptr + pid_channels * 3)       # BLOCK_COLUMNS
    first = tl.load(block_ptr + pid_channels * 3 + 1)
    end = tl.load(block_ptr + pid_channels * 3 + 2)
    row = group_ptr + group * 9                          # GROUP_COLUMNS
    group_first = tl.load(row)
    tap_stride = tl.load(row + 1)
    kh = tl.load(row + 2)
    kw = tl.load(row + 3)
    dil_h = tl.load(row + 4)
    dil_w = tl.load(row + 5)
    pad_top = tl.load(row + 6)
    pad_left = tl.load(row + 7)
    weight_offset = tl.load(row + 8)
    has_weight = weight_offset >= 0
    weight_offset = tl.maximum(weight_offset, 0)
    if FULL_BLOCKS:
        first = tl.multiple_of(first, BLOCK_C)
        weight_offset = tl.multiple_of(weight_offset, BLOCK_C)
        tap_stride = tl.multiple_of(tap_stride, BLOCK_C)
    channel = first + tl.arange(0, BLOCK_C)
    if FULL_BLOCKS:
        channel_ok = tl.full((BLOCK_C,), 1, tl.int1)
    else:
        channel_ok = channel < end
    weight_base = weight_offset + (channel - group_first)
    return (channel, channel_ok, kh, kw, dil_h, dil_w, pad_top, pad_left, weight_base, tap_stride, has_weight)


@triton.jit
def _source_pos(pos, k, dil, pad, STRIDE: tl.constexpr, limit, TRANSPOSED: tl.constexpr):
    """Source position that tap ``k`` of destination ``pos`` reads, and whether it exists.
    Forward: src = pos*STRIDE - pad + k*dil. Grad input (TRANSPOSED): src*STRIDE = pos + pad - k*dil."""
    if TRANSPOSED:
        scaled = pos + pad - k * dil
        src = scaled // STRIDE
        ok = (scaled >= 0) & (src < limit)
        if STRIDE > 1:
            ok = ok & (scaled % STRIDE == 0)
    else:
        src = pos * STRIDE - pad + k * dil
        ok = (src >= 0) & (src < limit)
    return src, ok


@triton.jit
def _grouped_conv_gather_kernel(
        src_ptr, w_ptr, b_ptr, group_ptr, block_ptr, dst_ptr,
        H_src, W_src, H_dst, W_dst,
        ssb, ssc, ssh, ssw, sdb, sdc, sdh, sdw,
        STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr,
        BLOCK_C: tl.constexpr, FULL_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # Forward: src = x, dst = y. Grad input (TRANSPOSED): src = dy, dst = dx; the same taps
    # read backwards, so every dx element is written once, without atomics.
    batch, dst_h, dst_w, pixel_ok = _tile_pixels(tl.program_id(0), H_dst, W_dst, BLOCK_H, BLOCK_W)
    channel, channel_ok, kh, kw, dil_h, dil_w, pad_top, pad_left, weight_base, tap_stride, has_weight = \
        _block_group(group_ptr, block_ptr, tl.program_id(1), BLOCK_C, FULL_BLOCKS)
    dst_ok = channel_ok[:, None] & pixel_ok[None, :]
    weight_ok = channel_ok & has_weight  # an identity group's masked weight reads as 1
    src_base = src_ptr + batch.to(tl.int64) * ssb + channel[:, None].to(tl.int64) * ssc
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for i in range(kh):
        src_h, row_ok = _source_pos(dst_h[None, :], i, dil_h, pad_top, STRIDE, H_src, TRANSPOSED)
        row_ok = row_ok & dst_ok
        for j in range(kw):
            src_w, col_ok = _source_pos(dst_w[None, :], j, dil_w, pad_left, STRIDE, W_src, TRANSPOSED)
            v = tl.load(src_base + src_h * ssh + src_w * ssw, mask=row_ok & col_ok, other=0.0)
            wv = tl.load(w_ptr + weight_base + (i * kw + j) * tap_stride, mask=weight_ok, other=1.0)
            acc += v.to(tl.float32) * wv.to(tl.float32)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[:, None]
    dst_offset = (batch.to(tl.int64) * sdb + channel[:, None].to(tl.int64) * sdc
                  + dst_h[None, :] * sdh + dst_w[None, :] * sdw)
    tl.store(dst_ptr + dst_offset, acc.to(dst_ptr.dtype.element_ty), mask=dst_ok)


@triton.jit
def _grouped_conv_grad_weight_kernel(
        dy_ptr, x_ptr, group_ptr, block_ptr, dw_partial_ptr, db_partial_ptr,
        C, n_weights, H, W, H_out, W_out, n_tiles,
        sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw,
        STRIDE: tl.constexpr, TAPS: tl.constexpr,
        BLOCK_C: tl.constexpr, FULL_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # Program (p, block, chunk) sums the output tiles p, p + P, p + 2P, ... (P programs along
    # axis 0) for taps [chunk*TAPS, chunk*TAPS + TAPS) of its block's group into
    # dw_partial[p, weight] (and, chunk 0, db_partial[p, c]). The taps are a tensor axis: one
    # (channels x pixels x taps) gather per tile, reduced over the pixels.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    chunk = tl.program_id(2)
    channel, channel_ok, kh, kw, dil_h, dil_w, pad_top, pad_left, weight_base, tap_stride, has_weight = \
        _block_group(group_ptr, block_ptr, tl.program_id(1), BLOCK_C, FULL_BLOCKS)
    tap = chunk * TAPS + tl.arange(0, TAPS)
    tap_ok = (tap < kh * kw) & has_weight
    tap_h = (tap // kw)[None, None, :]
    tap_w = (tap % kw)[None, None, :]
    active = has_weight & (chunk * TAPS < kh * kw)
    last_tile = tl.where(active, n_tiles, 0)
    acc = tl.zeros((BLOCK_C, TAPS), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(pid, last_tile, programs):
        batch, out_h, out_w, pixel_ok = _tile_pixels(tile, H_out, W_out, BLOCK_H, BLOCK_W)
        out_ok = channel_ok[:, None] & pixel_ok[None, :]
        dy_offset = (batch.to(tl.int64) * sdyb + channel[:, None].to(tl.int64) * sdyc
                     + out_h[None, :] * sdyh + out_w[None, :] * sdyw)
        g = tl.load(dy_ptr + dy_offset, mask=out_ok, other=0.0).to(tl.float32)
        acc_bias += tl.sum(g, axis=1)
        in_h, row_ok = _source_pos(out_h[None, :, None], tap_h, dil_h, pad_top, STRIDE, H, False)
        in_w, col_ok = _source_pos(out_w[None, :, None], tap_w, dil_w, pad_left, STRIDE, W, False)
        x_offset = (batch.to(tl.int64) * sxb + channel[:, None, None].to(tl.int64) * sxc
                    + in_h * sxh + in_w * sxw)
        ok = out_ok[:, :, None] & row_ok & col_ok & tap_ok[None, None, :]
        xv = tl.load(x_ptr + x_offset, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(g[:, :, None] * xv, axis=1)
    partial_row = pid.to(tl.int64) * n_weights
    tl.store(dw_partial_ptr + partial_row + weight_base[:, None] + tap[None, :] * tap_stride, acc,
             mask=channel_ok[:, None] & tap_ok[None, :])
    tl.store(db_partial_ptr + pid.to(tl.int64) * C + channel, acc_bias, mask=channel_ok & active & (chunk == 0))


@triton.jit
def _load_strip(base, rows, row_ok, cols, col_ok, channel_ok, sh, sw):
    """(BLOCK_C, rows, cols) source values, zero outside the image."""
    mask = channel_ok[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :]
    return tl.load(base + rows[None, :, None] * sh + cols[None, None, :] * sw, mask=mask, other=0.0)


@triton.jit
def _toeplitz_conv_kernel(
        src_ptr, band_ptr, b_ptr, group_ptr, block_ptr, dst_ptr,
        H_src, W_src, H_dst, W_dst, band_rows,
        ssb, ssc, ssh, ssw, sdb, sdc, sdh, sdw,
        HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr,
        BLOCK_C: tl.constexpr, FULL_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr, STRIP: tl.constexpr):
    # Stride 1. Forward: src = x, dst = y. Grad input (TRANSPOSED): src = dy, dst = dx, a
    # forward conv with the kernel flipped (in the band rows) and padding (k - 1) * d - pad
    # before. band_ptr: per channel and kernel row, the row's weights laid out by source
    # offset s - x (see band_rows), zeros off the band: T[s, x] is one unmasked load.
    tiles_h = tl.cdiv(H_dst, BLOCK_H)
    tiles_w = tl.cdiv(W_dst, BLOCK_W)
    pid = tl.program_id(0)
    batch = pid // (tiles_h * tiles_w)
    tile = pid % (tiles_h * tiles_w)
    row0 = (tile // tiles_w) * BLOCK_H
    col0 = (tile % tiles_w) * BLOCK_W
    channel, channel_ok, kh, kw, dil_h, dil_w, pad_top, pad_left, weight_base, tap_stride, has_weight = \
        _block_group(group_ptr, block_ptr, tl.program_id(1), BLOCK_C, FULL_BLOCKS)
    if TRANSPOSED:
        pad_top = (kh - 1) * dil_h - pad_top
        pad_left = (kw - 1) * dil_w - pad_left
    dst_h = row0 + tl.arange(0, BLOCK_H)
    dst_w = col0 + tl.arange(0, BLOCK_W)
    src_w = col0 - pad_left + tl.arange(0, STRIP)
    src_w_ok = (src_w >= 0) & (src_w < W_src)
    offset = tl.arange(0, STRIP)[:, None] - tl.arange(0, BLOCK_W)[None, :] + (BLOCK_W - 1)
    band_base = band_ptr + (channel * band_rows * (STRIP + BLOCK_W))[:, None, None] + offset[None, :, :]
    src_base = src_ptr + batch.to(tl.int64) * ssb + channel[:, None, None].to(tl.int64) * ssc
    acc = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=tl.float32)
    for i in range(kh):
        src_h = dst_h - pad_top + i * dil_h
        strip = _load_strip(src_base, src_h, (src_h >= 0) & (src_h < H_src), src_w, src_w_ok, channel_ok, ssh, ssw)
        band = tl.load(band_base + i * (STRIP + BLOCK_W), mask=channel_ok[:, None, None], other=0.0)
        acc = tl.dot(strip, band, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[:, None, None]
    dst_offset = (batch.to(tl.int64) * sdb + channel[:, None, None].to(tl.int64) * sdc
                  + dst_h[None, :, None] * sdh + dst_w[None, None, :] * sdw)
    dst_ok = channel_ok[:, None, None] & (dst_h < H_dst)[None, :, None] & (dst_w < W_dst)[None, None, :]
    tl.store(dst_ptr + dst_offset, acc.to(dst_ptr.dtype.element_ty), mask=dst_ok)


@triton.jit
def _toeplitz_grad_weight_kernel(
        dy_ptr, x_ptr, group_ptr, block_ptr, dw_partial_ptr, db_partial_ptr,
        C, n_weights, H, W, H_out, W_out, n_tiles,
        sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw,
        BLOCK_C: tl.constexpr, FULL_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr, STRIP: tl.constexpr):
    # Program (p, block, i) sums, over the output tiles p, p + P, ... (stride 1), the products
    # dy_tileᵀ @ x_strip of kernel row i into M (BLOCK_C, BLOCK_W, STRIP); then writes
    # dw_partial[p, (i, j)] = sum_x M[x, x + j*dw] for each tap j (and, row 0, db_partial[p, c]).
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tap_h = tl.program_id(2)
    channel, channel_ok, kh, kw, dil_h, dil_w, pad_top, pad_left, weight_base, tap_stride, has_weight = \
        _block_group(group_ptr, block_ptr, tl.program_id(1), BLOCK_C, FULL_BLOCKS)
    active = has_weight & (tap_h < kh)
    last_tile = tl.where(active, n_tiles, 0)
    tiles_h = tl.cdiv(H_out, BLOCK_H)
    tiles_w = tl.cdiv(W_out, BLOCK_W)
    products = tl.zeros((BLOCK_C, BLOCK_W, STRIP), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dy_base = dy_ptr + channel[:, None, None].to(tl.int64) * sdyc
    x_base = x_ptr + channel[:, None, None].to(tl.int64) * sxc
    for tile in range(pid, last_tile, programs):
        batch = tile // (tiles_h * tiles_w)
        row0 = (tile % (tiles_h * tiles_w)) // tiles_w * BLOCK_H
        col0 = (tile % tiles_w) * BLOCK_W
        out_h = row0 + tl.arange(0, BLOCK_H)
        out_w = col0 + tl.arange(0, BLOCK_W)
        g = _load_strip(dy_base + batch.to(tl.int64) * sdyb, out_h, out_h < H_out, out_w, out_w < W_out,
                        channel_ok, sdyh, sdyw)
        acc_bias += tl.sum(tl.sum(g.to(tl.float32), axis=2), axis=1)
        in_h = out_h - pad_top + tap_h * dil_h
        in_w = col0 - pad_left + tl.arange(0, STRIP)
        strip = _load_strip(x_base + batch.to(tl.int64) * sxb, in_h, (in_h >= 0) & (in_h < H), in_w,
                            (in_w >= 0) & (in_w < W), channel_ok, sxh, sxw)
        products = tl.dot(tl.permute(g, (0, 2, 1)), strip, products)
    offset = tl.arange(0, STRIP)[None, None, :] - tl.arange(0, BLOCK_W)[None, :, None]
    partial_row = dw_partial_ptr + pid.to(tl.int64) * n_weights + weight_base
    for j in range(kw):
        diagonal = tl.sum(tl.sum(tl.where(offset == j * dil_w, products, 0.0), axis=2), axis=1)
        tl.store(partial_row + (tap_h * kw + j) * tap_stride, diagonal, mask=channel_ok & active)
    tl.store(db_partial_ptr + pid.to(tl.int64) * C + channel, acc_bias, mask=channel_ok & active & (tap_h == 0))


# ---------------------------------------------------------------- host side

def _groups_of(spec: tuple) -> list[ResolvedGroup]:
    return [ResolvedGroup(*spec[i:i + 9]) for i in range(0, len(spec), 9)]


@functools.lru_cache(maxsize=128)
def _group_table(spec: tuple, device: torch.device) -> torch.Tensor:
    """(G, GROUP_COLUMNS) int32: each group's geometry and the offset of its weights in the
    packed weight vector (-1 and a 1x1 tap for an identity group)."""
    rows, first, offset = [], 0, 0
    for g in _groups_of(spec):
        if g.identity:
            rows.append([first, g.channels, 1, 1, 1, 1, 0, 0, -1])
        else:
            rows.append([first, g.channels, g.kernel_h, g.kernel_w, g.dilation_h, g.dilation_w, g.pad_top,
                         g.pad_left, offset])
            offset += g.channels * g.kernel_h * g.kernel_w
        first += g.channels
    return torch.tensor(rows, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=128)
def _block_table(spec: tuple, block_c: int, device: torch.device) -> torch.Tensor:
    """(blocks, BLOCK_COLUMNS) int32: the channel blocks of BLOCK_C channels, none straddling
    two groups."""
    rows, first = [], 0
    for index, g in enumerate(_groups_of(spec)):
        rows += [[index, c, min(c + block_c, first + g.channels)]
                 for c in range(first, first + g.channels, block_c)]
        first += g.channels
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, BLOCK_COLUMNS).to(device)


def _channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1


def _block_c(t: torch.Tensor, spec: tuple, cap: int) -> tuple[int, bool]:
    """(channels per program, whether every block is full). NCHW: 1. channels_last: the
    largest power of two up to ``cap`` that divides every group's channel count, when that is
    at least 4 (full blocks: vector loads); else a power of two up to ``cap``, no larger than
    the widest group needs, with the last block of a group masked."""
    if not _channels_last(t):
        return 1, True
    counts = [g.channels for g in _groups_of(spec) if g.channels]
    full = cap
    while full > 1 and any(c % full for c in counts):
        full //= 2
    if full >= 4:
        return full, True
    return min(cap, triton.next_power_of_2(max(counts or [1]))), False


def _max_taps(spec: tuple) -> int:
    return max([g.kernel_h * g.kernel_w for g in _groups_of(spec) if not g.identity] or [1])


def _tile(t: torch.Tensor, block_c: int) -> dict:
    """Fixed tile (the interpreter's, and the one used when autotuning is off) with the
    contiguous axis along the warp."""
    if _channels_last(t):  # about 1K elements: 8 per thread, 16-byte vectors of bf16 channels
        pixels = max(4, 1024 // block_c)
        return dict(BLOCK_H=pixels // min(8, pixels), BLOCK_W=min(8, pixels), num_warps=4)
    return dict(BLOCK_H=16, BLOCK_W=32, num_warps=4)


def _grad_weight_tile(t: torch.Tensor, taps: int, block_c: int) -> dict:
    """Fixed tile of the grad-weight kernel: about 8K (channel, pixel, tap) elements."""
    pixels = max(1, 8192 // (taps * block_c))
    block_w = min(pixels, 8 if _channels_last(t) else 32)
    return dict(BLOCK_H=max(1, pixels // block_w), BLOCK_W=block_w, num_warps=4)


def _configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_H": h, "BLOCK_W": w}, num_warps=nw) for h, w in shapes for nw in (4, 8)]


# BLOCK_C is fixed per call (the block table depends on it), so each layout tunes the pixel
# tile only; the layout's own list keeps the contiguous axis along the warp. Each list is in
# order of preference (a capped tuning times its head): the fixed default tile first.
_AUTOTUNE_KEY = ["H_src", "W_src", "H_dst", "W_dst", "STRIDE", "TRANSPOSED", "BLOCK_C", "FULL_BLOCKS"]
_gather_autotuned = {
    layout: autotune(f"grouped conv gather ({layout})", _grouped_conv_gather_kernel, _configs(shapes), _AUTOTUNE_KEY)
    for layout, shapes in (("nchw", [(16, 32), (8, 64), (8, 32), (32, 32), (4, 64)]),
                           ("nhwc", [(4, 8), (4, 4), (8, 8), (2, 8), (2, 4)]))
}


def _grid(batch: int, height: int, width: int, blocks: int):
    def grid(meta):
        tiles = triton.cdiv(height, meta["BLOCK_H"]) * triton.cdiv(width, meta["BLOCK_W"])
        return (batch * tiles, blocks)
    return grid


def _program_budget(device: torch.device) -> int:
    """Programs for the reduction kernel: a few per multiprocessor on a GPU; few in the
    interpreter, where every program costs Python time."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def gather_launch(src: torch.Tensor, weight: torch.Tensor, bias, spec: tuple, dst: torch.Tensor,
                  stride: int, transposed: bool) -> Launch:
    """The gather kernel's launch (forward: src = x, dst = y; grad input: src = dy, dst = dx):
    autotuned on a GPU; one fixed tile in the interpreter (autotuning there would only
    multiply its run time) or when autotuning is switched off."""
    block_c, full = _block_c(dst, spec, 64)
    blocks = _block_table(spec, block_c, dst.device)
    args = (src, weight, bias if bias is not None else weight, _group_table(spec, dst.device), blocks, dst,
            *src.shape[2:], *dst.shape[2:], *src.stride(), *dst.stride())
    flags = dict(STRIDE=stride, HAS_BIAS=bias is not None, TRANSPOSED=transposed, BLOCK_C=block_c,
                 FULL_BLOCKS=full)
    grid = _grid(dst.shape[0], *dst.shape[2:], blocks.shape[0])
    if not triton_interpreter_on() and autotune_enabled():
        return Launch(_gather_autotuned["nhwc" if _channels_last(dst) else "nchw"], grid, args, flags)
    return plan("grouped conv gather", [_tile(dst, block_c)], lambda candidate: Launch(
        _grouped_conv_gather_kernel, grid(candidate), args, dict(flags, **candidate)))


def _partial_sums_launch(name: str, kernel, grad_out: torch.Tensor, x: torch.Tensor, n_weights: int, spec: tuple,
                         block_c: int, full: bool, tile: dict, grid_z: int, meta: dict):
    """(launch or None, dw_partial, db_partial) of a grad-weight kernel that sums its share of
    the output tiles into row p of (programs, weights) and (programs, C) partials: grid
    (programs, channel blocks, grid_z), the program count fixed by the shape and the device
    only, so that the partial-sum order never depends on tuning."""
    batch, channels, height, width = x.shape
    h_out, w_out = grad_out.shape[2:]
    blocks = _block_table(spec, block_c, x.device)
    n_tiles = _grid(batch, h_out, w_out, 1)(tile)[0]
    programs = max(1, min(n_tiles, _program_budget(x.device) // max(1, blocks.shape[0] * grid_z)))
    dw_partial = torch.empty((programs, n_weights), device=x.device, dtype=torch.float32)
    # Identity groups' channels get no bias gradient: their partials stay zero.
    db_partial = torch.zeros((programs, channels), device=x.device, dtype=torch.float32)
    if n_tiles == 0 or n_weights == 0:
        return None, dw_partial.zero_(), db_partial
    args = (grad_out, x, _group_table(spec, x.device), blocks, dw_partial, db_partial, channels, n_weights,
            height, width, h_out, w_out, n_tiles, *grad_out.stride(), *x.stride())
    meta = dict(meta, BLOCK_C=block_c, FULL_BLOCKS=full)
    launch = plan(name, [tile], lambda candidate: Launch(
        kernel, (programs, blocks.shape[0], grid_z), args, dict(meta, **candidate)))
    return launch, dw_partial, db_partial


def grad_weight_launch(grad_out: torch.Tensor, x: torch.Tensor, n_weights: int, spec: tuple, stride: int):
    """(launch or None, dw_partial, db_partial): the grad-weight kernel with a fixed tile,
    grid axis 2 walking chunks of taps."""
    taps = min(MAX_TAPS_PER_CHUNK, triton.next_power_of_2(_max_taps(spec)))
    block_c, full = _block_c(x, spec, 32)
    return _partial_sums_launch("grouped conv grad weight", _grouped_conv_grad_weight_kernel, grad_out, x,
                                n_weights, spec, block_c, full, _grad_weight_tile(x, taps, block_c),
                                triton.cdiv(_max_taps(spec), taps), dict(STRIDE=stride, TAPS=taps))


def _band_width(spec: tuple):
    """The banded kernels' tile width for these groups (the narrowest whose strip holds every
    group's span), or None where some group's span is too wide."""
    span = max(((g.kernel_w - 1) * g.dilation_w + 1 for g in _groups_of(spec) if not g.identity), default=1)
    return next((w for w in BAND_TILE_WIDTHS if span <= w + 1), None)


def takes_band_path(spec: tuple, stride: int, dtype: torch.dtype) -> bool:
    """Whether the banded tensor-core kernels run this conv: 16-bit (their products are exact
    in fp32; fp32 would round through TF32), stride 1, every group's kernel large and its
    horizontal span within a strip."""
    groups = [g for g in _groups_of(spec) if not g.identity]
    return (stride == 1 and dtype in (torch.float16, torch.bfloat16) and bool(groups)
            and all(g.kernel_h * g.kernel_w >= LARGE_KERNEL_TAPS for g in groups) and _band_width(spec) is not None)


def _band_tile(t: torch.Tensor, spec: tuple, height: int) -> dict:
    """The banded kernels' tile: BLOCK_H rows (the dot's M, 16 or 32: a band is loaded once
    per BLOCK_H output rows, and small images waste less with 16), BLOCK_W columns
    (_band_width) and a STRIP of twice that; NCHW one channel (strip rows are contiguous),
    channels_last a block of BAND_BLOCK_C channels. One stage: the strips of consecutive
    kernel rows overlap, so they are L1 hits, and software pipelining them through shared
    memory only costs registers (sm_90, channels_last: 186 instead of 221 or 255 with two or
    three stages)."""
    width = _band_width(spec)
    return dict(BLOCK_H=16 if height <= 16 else 32, BLOCK_W=width, STRIP=2 * width,
                num_warps=8 if _channels_last(t) else 4, num_stages=1)


def band_rows(weight: torch.Tensor, spec: tuple, channels: int, width: int, flipped: bool) -> torch.Tensor:
    """(C, rows, 3 * width) weights of the banded kernel with tiles ``width`` columns wide:
    row i of channel c holds its kernel row i by source offset, w[c, i, j] at
    j * dw + width - 1, zeros elsewhere (so the kernel loads T[s, x] = row[s - x + width - 1]
    without a mask). ``flipped``: the kernel rotated 180 degrees, for grad input. An
    identity group is a 1 at offset 0 of row 0."""
    groups = _groups_of(spec)
    rows = max(g.kernel_h for g in groups)
    bands = weight.new_zeros((channels, rows, 3 * width))
    first, offset = 0, 0
    for g in groups:
        if g.identity:
            bands[first:first + g.channels, 0, width - 1] = 1
        else:
            taps = g.kernel_h * g.kernel_w
            w = weight[offset:offset + taps * g.channels].view(g.kernel_h, g.kernel_w, g.channels).permute(2, 0, 1)
            if flipped:
                w = w.flip(1, 2)
            band = slice(width - 1, width + (g.kernel_w - 1) * g.dilation_w, g.dilation_w)
            bands[first:first + g.channels, :g.kernel_h, band] = w
            offset += taps * g.channels
        first += g.channels
    return bands


def band_launch(src: torch.Tensor, weight: torch.Tensor, bias, spec: tuple, dst: torch.Tensor,
                transposed: bool) -> Launch:
    """The banded kernel's launch (forward: src = x, dst = y; grad input: src = dy, dst = dx)."""
    block_c, full = _block_c(dst, spec, BAND_BLOCK_C)
    blocks = _block_table(spec, block_c, dst.device)
    tile = _band_tile(dst, spec, dst.shape[2])
    bands = band_rows(weight, spec, dst.shape[1], tile["BLOCK_W"], flipped=transposed)
    args = (src, bands, bias if bias is not None else weight, _group_table(spec, dst.device), blocks, dst,
            *src.shape[2:], *dst.shape[2:], bands.shape[1], *src.stride(), *dst.stride())
    meta = dict(HAS_BIAS=bias is not None, TRANSPOSED=transposed, BLOCK_C=block_c, FULL_BLOCKS=full)
    grid = _grid(dst.shape[0], *dst.shape[2:], blocks.shape[0])
    return plan("grouped conv band", [tile], lambda candidate: Launch(
        _toeplitz_conv_kernel, grid(candidate), args, dict(meta, **candidate)))


def band_grad_weight_launch(grad_out: torch.Tensor, x: torch.Tensor, n_weights: int, spec: tuple):
    """(launch or None, dw_partial, db_partial) of the banded grad-weight kernel, grid axis 2
    walking the kernel rows."""
    block_c, full = _block_c(x, spec, BAND_BLOCK_C)
    return _partial_sums_launch("grouped conv band grad weight", _toeplitz_grad_weight_kernel, grad_out, x,
                                n_weights, spec, block_c, full, _band_tile(x, spec, grad_out.shape[2]),
                                max(g.kernel_h for g in _groups_of(spec)), {})


def grouped_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias, spec: tuple,
                         stride: int, out: torch.Tensor) -> torch.Tensor:
    """Writes the convolution of ``x`` into ``out`` (either layout) and returns it. ``spec``:
    the resolved groups flattened (9 ints each); ``weight``: their packed weights."""
    if out.numel() > 0:
        if takes_band_path(spec, stride, x.dtype):
            band_launch(x, weight, bias, spec, out, transposed=False).run()
        else:
            gather_launch(x, weight, bias, spec, out, stride, transposed=False).run()
    return out


def grouped_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, spec: tuple,
                          stride: int, grad_x: torch.Tensor):
    """Writes grad x into ``grad_x``; returns (grad_x, grad of the packed weight (fp32),
    grad bias (C,) fp32)."""
    banded = takes_band_path(spec, stride, x.dtype)
    if grad_x.numel() > 0:
        if banded:
            band_launch(grad_out, weight, None, spec, grad_x, transposed=True).run()
        else:
            gather_launch(grad_out, weight, None, spec, grad_x, stride, transposed=True).run()
    if banded:
        launch, dw_partial, db_partial = band_grad_weight_launch(grad_out, x, weight.numel(), spec)
    else:
        launch, dw_partial, db_partial = grad_weight_launch(grad_out, x, weight.numel(), spec, stride)
    if launch is not None:
        launch.run()
    return grad_x, dw_partial.sum(0), db_partial.sum(0)
