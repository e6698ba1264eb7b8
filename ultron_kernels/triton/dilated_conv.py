"""Triton kernels for the channel-wise dilated depthwise convolution.

One launch covers every channel whatever its dilation: the per-channel rate is read from an
int32 vector. The kernels take the tensors' strides, so NCHW and channels_last share them;
the tile is (channels x output pixels) and the launcher shapes it per layout so that the
contiguous axis (W for NCHW, C for NHWC) lies along the warp.

* forward: direct convolution, K*K masked loads per output tile (re-reads hit L1/L2);
* grad input: the same gather read backwards (no atomics);
* grad weight / bias: per-tile partial sums written to a (tiles, C, K*K) buffer that the
  launcher reduces in a fixed order, so two backward calls give bitwise-identical grads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ultron_kernels.backends import triton_interpreter_on


@triton.jit
def _tile_coords(pid_pixels, pid_channels, C, height, width,
                 BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Batch index, channel vector and (row, col) vectors of one program's tile."""
    tiles_h = tl.cdiv(height, BLOCK_H)
    tiles_w = tl.cdiv(width, BLOCK_W)
    batch = pid_pixels // (tiles_h * tiles_w)
    tile = pid_pixels % (tiles_h * tiles_w)
    channel = pid_channels * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel = tl.arange(0, BLOCK_H * BLOCK_W)
    row = (tile // tiles_w) * BLOCK_H + pixel // BLOCK_W
    col = (tile % tiles_w) * BLOCK_W + pixel % BLOCK_W
    channel_ok = channel < C
    inside = channel_ok[:, None] & ((row < height) & (col < width))[None, :]
    return batch, channel, row, col, channel_ok, inside


@triton.jit
def _dilated_conv_fwd_kernel(
        x_ptr, w_ptr, b_ptr, dil_ptr, y_ptr,
        C, H, W, H_out, W_out,
        sxb, sxc, sxh, sxw, syb, syc, syh, syw,
        K: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    batch, channel, oh, ow, channel_ok, out_ok = _tile_coords(
        tl.program_id(0), tl.program_id(1), C, H_out, W_out,
        BLOCK_C, BLOCK_H, BLOCK_W)
    dil = tl.load(dil_ptr + channel, mask=channel_ok, other=1)[:, None]
    pad = dil * (K // 2)
    x_base = x_ptr + batch.to(tl.int64) * sxb + channel[:, None].to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for kh in tl.static_range(K):
        ih = oh[None, :] * STRIDE - pad + kh * dil
        row_ok = out_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(K):
            iw = ow[None, :] * STRIDE - pad + kw * dil
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=0.0)
            wv = tl.load(w_ptr + channel * (K * K) + (kh * K + kw), mask=channel_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[:, None]
    y_offset = (batch.to(tl.int64) * syb + channel[:, None].to(tl.int64) * syc
                + oh[None, :] * syh + ow[None, :] * syw)
    tl.store(y_ptr + y_offset, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _dilated_conv_grad_input_kernel(
        dy_ptr, w_ptr, dil_ptr, dx_ptr,
        C, H, W, H_out, W_out,
        sdyb, sdyc, sdyh, sdyw, sdxb, sdxc, sdxh, sdxw,
        K: tl.constexpr, STRIDE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # dx[ih, iw] = sum over taps of dy[oh, ow] * w[kh, kw] where oh*STRIDE = ih + pad - kh*dil.
    batch, channel, ih, iw, channel_ok, in_ok = _tile_coords(
        tl.program_id(0), tl.program_id(1), C, H, W,
        BLOCK_C, BLOCK_H, BLOCK_W)
    dil = tl.load(dil_ptr + channel, mask=channel_ok, other=1)[:, None]
    pad = dil * (K // 2)
    dy_base = dy_ptr + batch.to(tl.int64) * sdyb + channel[:, None].to(tl.int64) * sdyc
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for kh in tl.static_range(K):
        oh_scaled = ih[None, :] + pad - kh * dil
        oh = oh_scaled // STRIDE
        row_ok = in_ok & (oh_scaled >= 0) & (oh < H_out)
        if STRIDE > 1:
            row_ok = row_ok & (oh_scaled % STRIDE == 0)
        for kw in tl.static_range(K):
            ow_scaled = iw[None, :] + pad - kw * dil
            ow = ow_scaled // STRIDE
            ok = row_ok & (ow_scaled >= 0) & (ow < W_out)
            if STRIDE > 1:
                ok = ok & (ow_scaled % STRIDE == 0)
            g = tl.load(dy_base + oh * sdyh + ow * sdyw, mask=ok, other=0.0)
            wv = tl.load(w_ptr + channel * (K * K) + (kh * K + kw), mask=channel_ok, other=0.0)
            acc += g.to(tl.float32) * wv.to(tl.float32)[:, None]
    dx_offset = (batch.to(tl.int64) * sdxb + channel[:, None].to(tl.int64) * sdxc
                 + ih[None, :] * sdxh + iw[None, :] * sdxw)
    tl.store(dx_ptr + dx_offset, acc.to(dx_ptr.dtype.element_ty), mask=in_ok)


@triton.jit
def _dilated_conv_grad_weight_kernel(
        dy_ptr, x_ptr, dil_ptr, dw_partial_ptr, db_partial_ptr,
        C, H, W, H_out, W_out,
        sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw,
        K: tl.constexpr, STRIDE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # Partial sums of one output tile: dw_partial[tile, c, tap] and db_partial[tile, c].
    pid_pixels = tl.program_id(0)
    batch, channel, oh, ow, channel_ok, out_ok = _tile_coords(
        pid_pixels, tl.program_id(1), C, H_out, W_out,
        BLOCK_C, BLOCK_H, BLOCK_W)
    dil = tl.load(dil_ptr + channel, mask=channel_ok, other=1)[:, None]
    pad = dil * (K // 2)
    dy_offset = (batch.to(tl.int64) * sdyb + channel[:, None].to(tl.int64) * sdyc
                 + oh[None, :] * sdyh + ow[None, :] * sdyw)
    g = tl.load(dy_ptr + dy_offset, mask=out_ok, other=0.0).to(tl.float32)
    partial_row = pid_pixels.to(tl.int64) * C + channel
    tl.store(db_partial_ptr + partial_row, tl.sum(g, axis=1), mask=channel_ok)
    x_base = x_ptr + batch.to(tl.int64) * sxb + channel[:, None].to(tl.int64) * sxc
    for kh in tl.static_range(K):
        ih = oh[None, :] * STRIDE - pad + kh * dil
        row_ok = out_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(K):
            iw = ow[None, :] * STRIDE - pad + kw * dil
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=0.0).to(tl.float32)
            tl.store(dw_partial_ptr + partial_row * (K * K) + (kh * K + kw),
                     tl.sum(g * xv, axis=1), mask=channel_ok)


def _tile(t: torch.Tensor) -> dict:
    """Fixed tile (used by the interpreter and by the deterministic grad-weight kernel)
    with the contiguous axis along the warp."""
    if t.stride(1) == 1 and t.shape[1] > 1:  # channels_last
        block_c = min(64, triton.next_power_of_2(t.shape[1]))
        return dict(BLOCK_C=block_c, BLOCK_H=4, BLOCK_W=max(2, 256 // (block_c * 4)), num_warps=4)
    return dict(BLOCK_C=2, BLOCK_H=8, BLOCK_W=32, num_warps=4)


def _configs() -> list[triton.Config]:
    shapes = [(2, 8, 32), (1, 16, 32), (4, 4, 32), (1, 8, 64),     # NCHW-friendly
              (32, 4, 8), (64, 2, 8), (16, 4, 16), (64, 4, 4)]     # NHWC-friendly
    return [triton.Config({"BLOCK_C": c, "BLOCK_H": h, "BLOCK_W": w}, num_warps=nw)
            for c, h, w in shapes for nw in (4, 8)]


_KEY = ["C", "H", "W", "H_out", "W_out", "K", "STRIDE"]
# The layout enters the key through the strides' values (C-stride 1 for channels_last).
_fwd_autotuned = triton.autotune(configs=_configs(), key=_KEY + ["sxc", "syc"])(
    _dilated_conv_fwd_kernel)
_grad_input_autotuned = triton.autotune(configs=_configs(), key=_KEY + ["sdyc", "sdxc"])(
    _dilated_conv_grad_input_kernel)


def _grid(batch: int, height: int, width: int, channels: int):
    def grid(meta):
        tiles = triton.cdiv(height, meta["BLOCK_H"]) * triton.cdiv(width, meta["BLOCK_W"])
        return (batch * tiles, triton.cdiv(channels, meta["BLOCK_C"]))
    return grid


def _launch(tuned, plain, layout_of: torch.Tensor, grid_shape, *args, **flags):
    """Autotuned launch on a GPU; one fixed tile in the interpreter (autotuning there would
    only multiply its run time)."""
    if triton_interpreter_on():
        tile = _tile(layout_of)
        plain[_grid(*grid_shape)(tile)](*args, **flags, **tile)
    else:
        tuned[_grid(*grid_shape)](*args, **flags)


def dilated_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias, dilation: torch.Tensor,
                         stride: int, out: torch.Tensor) -> torch.Tensor:
    """Writes the convolution of ``x`` into ``out`` (either layout) and returns it."""
    batch, channels, height, width = x.shape
    h_out, w_out = out.shape[2:]
    if out.numel() == 0:
        return out
    _launch(_fwd_autotuned, _dilated_conv_fwd_kernel, x, (batch, h_out, w_out, channels),
            x, weight, bias if bias is not None else weight, dilation, out,
            channels, height, width, h_out, w_out, *x.stride(), *out.stride(),
            K=weight.shape[-1], STRIDE=stride, HAS_BIAS=bias is not None)
    return out


def dilated_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          dilation: torch.Tensor, stride: int, grad_x: torch.Tensor):
    """Writes grad x into ``grad_x``; returns (grad_x, grad_weight (C,K,K) fp32, grad_bias fp32)."""
    batch, channels, height, width = x.shape
    h_out, w_out = grad_out.shape[2:]
    kernel_size = weight.shape[-1]
    geometry = (channels, height, width, h_out, w_out)
    if grad_x.numel() > 0:
        _launch(_grad_input_autotuned, _dilated_conv_grad_input_kernel, x,
                (batch, height, width, channels),
                grad_out, weight, dilation, grad_x, *geometry,
                *grad_out.stride(), *grad_x.stride(), K=kernel_size, STRIDE=stride)
    # Grad weight: one fixed tile, so that the partial-sum order never depends on tuning.
    tile = _tile(x)
    grid = _grid(batch, h_out, w_out, channels)(tile)
    dw_partial = torch.empty((grid[0], channels, kernel_size * kernel_size),
                             device=x.device, dtype=torch.float32)
    db_partial = torch.empty((grid[0], channels), device=x.device, dtype=torch.float32)
    if grid[0] > 0 and channels > 0:
        _dilated_conv_grad_weight_kernel[grid](
            grad_out, x, dilation, dw_partial, db_partial, *geometry,
            *grad_out.stride(), *x.stride(), K=kernel_size, STRIDE=stride, **tile)
    grad_weight = dw_partial.sum(0).view(channels, kernel_size, kernel_size)
    return grad_x, grad_weight, db_partial.sum(0)
