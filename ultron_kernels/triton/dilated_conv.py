"""Triton kernels for the channel-wise dilated depthwise convolution.

One launch covers every channel whatever its dilation: the per-channel rate is read from an
int32 vector. The kernels take the tensors' strides, so NCHW and channels_last share them;
the tile is (channels x output pixels) and the launcher shapes it per layout so that the
contiguous axis (W for NCHW, C for NHWC) lies along the warp.

* forward and grad input: one gather kernel; forward is a direct convolution with K*K
  masked loads per output tile (re-reads hit L1/L2), grad input reads the taps backwards
  (no atomics);
* grad weight / bias: per-tile partial sums written to a (tiles, C, K*K) buffer that the
  launcher reduces in a fixed order, so two backward calls give bitwise-identical grads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ultron_kernels.backends import autotune_enabled, triton_interpreter_on
from ultron_kernels.triton.launch import Launch, plan, prune_to_device


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
def _dilation(dil_ptr, channel, channel_ok, BLOCK_C: tl.constexpr, CHANNEL_RUN: tl.constexpr):
    """Dilation of the tile's channels: one scalar when the block lies inside a run of equal
    rates (the addresses are then affine in the channel, so channels_last loads vectorise),
    else a (BLOCK_C, 1) column."""
    if CHANNEL_RUN % BLOCK_C == 0:
        return tl.load(dil_ptr + tl.program_id(1) * BLOCK_C)
    else:
        return tl.load(dil_ptr + channel, mask=channel_ok, other=1)[:, None]


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
def _dilated_conv_gather_kernel(
        src_ptr, w_ptr, b_ptr, dil_ptr, dst_ptr,
        C, H_src, W_src, H_dst, W_dst,
        ssb, ssc, ssh, ssw, sdb, sdc, sdh, sdw,
        K: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr,
        CHANNEL_RUN: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # Forward: src = x, dst = y. Grad input (TRANSPOSED): src = dy, dst = dx; the same taps
    # read backwards, so every dx element is written once, without atomics.
    batch, channel, dh, dw, channel_ok, dst_ok = _tile_coords(
        tl.program_id(0), tl.program_id(1), C, H_dst, W_dst, BLOCK_C, BLOCK_H, BLOCK_W)
    dil = _dilation(dil_ptr, channel, channel_ok, BLOCK_C, CHANNEL_RUN)
    pad = dil * (K // 2)
    src_base = src_ptr + batch.to(tl.int64) * ssb + channel[:, None].to(tl.int64) * ssc
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for kh in tl.static_range(K):
        sh, row_ok = _source_pos(dh[None, :], kh, dil, pad, STRIDE, H_src, TRANSPOSED)
        row_ok = row_ok & dst_ok
        for kw in tl.static_range(K):
            sw, col_ok = _source_pos(dw[None, :], kw, dil, pad, STRIDE, W_src, TRANSPOSED)
            v = tl.load(src_base + sh * ssh + sw * ssw, mask=row_ok & col_ok, other=0.0)
            wv = tl.load(w_ptr + channel * (K * K) + (kh * K + kw), mask=channel_ok, other=0.0)
            acc += v.to(tl.float32) * wv.to(tl.float32)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[:, None]
    dst_offset = (batch.to(tl.int64) * sdb + channel[:, None].to(tl.int64) * sdc
                  + dh[None, :] * sdh + dw[None, :] * sdw)
    tl.store(dst_ptr + dst_offset, acc.to(dst_ptr.dtype.element_ty), mask=dst_ok)


@triton.jit
def _dilated_conv_grad_weight_kernel(
        dy_ptr, x_ptr, dil_ptr, dw_partial_ptr, db_partial_ptr,
        C, H, W, H_out, W_out, n_tiles,
        sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw,
        K: tl.constexpr, STRIDE: tl.constexpr, CHANNEL_RUN: tl.constexpr, TAPS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # Program p sums the output tiles p, p + P, p + 2P, ... (P programs along axis 0) into
    # dw_partial[p, c, tap] and db_partial[p, c]. The taps are a tensor axis (TAPS = K*K
    # padded to a power of two): one (channels x pixels x taps) gather per tile, reduced
    # over the pixels, so each program keeps one (channels x taps) accumulator.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tap = tl.arange(0, TAPS)
    kh = (tap // K)[None, None, :]
    kw = (tap % K)[None, None, :]
    tap_ok = (tap < K * K)[None, None, :]
    acc = tl.zeros((BLOCK_C, TAPS), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(pid, n_tiles, programs):
        batch, channel, oh, ow, channel_ok, out_ok = _tile_coords(
            tile, tl.program_id(1), C, H_out, W_out, BLOCK_C, BLOCK_H, BLOCK_W)
        dil = _dilation(dil_ptr, channel, channel_ok, BLOCK_C, CHANNEL_RUN)
        pad = dil * (K // 2)
        dy_offset = (batch.to(tl.int64) * sdyb + channel[:, None].to(tl.int64) * sdyc
                     + oh[None, :] * sdyh + ow[None, :] * sdyw)
        g = tl.load(dy_ptr + dy_offset, mask=out_ok, other=0.0).to(tl.float32)
        acc_bias += tl.sum(g, axis=1)
        dil3 = dil if CHANNEL_RUN % BLOCK_C == 0 else dil[:, :, None]
        pad3 = pad if CHANNEL_RUN % BLOCK_C == 0 else pad[:, :, None]
        ih, row_ok = _source_pos(oh[None, :, None], kh, dil3, pad3, STRIDE, H, False)
        iw, col_ok = _source_pos(ow[None, :, None], kw, dil3, pad3, STRIDE, W, False)
        x_offset = (batch.to(tl.int64) * sxb + channel[:, None, None].to(tl.int64) * sxc
                    + ih * sxh + iw * sxw)
        ok = out_ok[:, :, None] & row_ok & col_ok & tap_ok
        xv = tl.load(x_ptr + x_offset, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(g[:, :, None] * xv, axis=1)
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    row = pid.to(tl.int64) * C + channel
    tl.store(db_partial_ptr + row, acc_bias, mask=channel_ok)
    tl.store(dw_partial_ptr + row[:, None] * (K * K) + tap[None, :], acc,
             mask=channel_ok[:, None] & (tap < K * K)[None, :])


def _grad_weight_tile(t: torch.Tensor, taps: int, channel_run: int) -> dict:
    """Fixed tile of the grad-weight kernel: about 8K (channel, pixel, tap) elements, the
    channel block inside a run of equal dilations where the run allows it."""
    budget = 8192 // taps
    if t.stride(1) == 1 and t.shape[1] > 1:  # channels_last
        block_c = min(32, triton.next_power_of_2(t.shape[1]), max(channel_run, 8))
        pixels = max(1, budget // block_c)
        block_w = min(pixels, 8)
        return dict(BLOCK_C=block_c, BLOCK_H=max(1, pixels // block_w), BLOCK_W=block_w, num_warps=4)
    block_w = min(budget, 32)
    return dict(BLOCK_C=1, BLOCK_H=max(1, budget // block_w), BLOCK_W=block_w, num_warps=4)


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


# The layout enters the key through the strides' values (C-stride 1 for channels_last).
_gather_autotuned = triton.autotune(
    configs=_configs(),
    key=["C", "H_src", "W_src", "H_dst", "W_dst", "ssc", "sdc", "K", "STRIDE", "TRANSPOSED",
         "CHANNEL_RUN"],
    prune_configs_by={"early_config_prune": prune_to_device(_dilated_conv_gather_kernel)},
)(_dilated_conv_gather_kernel)


def _grid(batch: int, height: int, width: int, channels: int):
    def grid(meta):
        tiles = triton.cdiv(height, meta["BLOCK_H"]) * triton.cdiv(width, meta["BLOCK_W"])
        return (batch * tiles, triton.cdiv(channels, meta["BLOCK_C"]))
    return grid


def _program_budget(device: torch.device) -> int:
    """Programs for the reduction kernels: a few per multiprocessor on a GPU; few in the
    interpreter, where every program costs Python time."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def gather_launch(layout_of: torch.Tensor, grid_shape, *args, **flags) -> Launch:
    """The gather kernel's launch: autotuned on a GPU; one fixed tile in the interpreter
    (autotuning there would only multiply its run time) or when autotuning is switched off."""
    if not triton_interpreter_on() and autotune_enabled():
        return Launch(_gather_autotuned, _grid(*grid_shape), args, flags)
    tile = _tile(layout_of)
    return plan("dilated conv gather", [tile], lambda candidate: Launch(
        _dilated_conv_gather_kernel, _grid(*grid_shape)(candidate), args, dict(flags, **candidate)))


def grad_weight_launch(grad_out: torch.Tensor, x: torch.Tensor, dilation: torch.Tensor,
                       kernel_size: int, channel_run: int, stride: int):
    """(launch or None, dw_partial, db_partial): the grad-weight kernel with a fixed tile and
    program count (from the shape and the device only), so that the partial-sum order never
    depends on tuning."""
    batch, channels, height, width = x.shape
    h_out, w_out = grad_out.shape[2:]
    taps = triton.next_power_of_2(kernel_size * kernel_size)
    tile = _grad_weight_tile(x, taps, channel_run)
    n_tiles, channel_blocks = _grid(batch, h_out, w_out, channels)(tile)
    programs = max(1, min(n_tiles, _program_budget(x.device) // max(channel_blocks, 1)))
    dw_partial = torch.empty((programs, channels, kernel_size * kernel_size),
                             device=x.device, dtype=torch.float32)
    db_partial = torch.empty((programs, channels), device=x.device, dtype=torch.float32)
    if n_tiles == 0 or channels == 0:
        return None, dw_partial.zero_(), db_partial.zero_()
    args = (grad_out, x, dilation, dw_partial, db_partial, channels, height, width, h_out, w_out,
            n_tiles, *grad_out.stride(), *x.stride())
    meta = dict(K=kernel_size, STRIDE=stride, CHANNEL_RUN=channel_run, TAPS=taps)
    launch = plan("dilated conv grad weight", [tile], lambda candidate: Launch(
        _dilated_conv_grad_weight_kernel, (programs, channel_blocks), args, dict(meta, **candidate)))
    return launch, dw_partial, db_partial


def dilated_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias, dilation: torch.Tensor,
                         channel_run: int, stride: int, out: torch.Tensor) -> torch.Tensor:
    """Writes the convolution of ``x`` into ``out`` (either layout) and returns it."""
    batch, channels, height, width = x.shape
    h_out, w_out = out.shape[2:]
    if out.numel() == 0:
        return out
    gather_launch(x, (batch, h_out, w_out, channels),
                  x, weight, bias if bias is not None else weight, dilation, out,
                  channels, height, width, h_out, w_out, *x.stride(), *out.stride(),
                  K=weight.shape[-1], STRIDE=stride, HAS_BIAS=bias is not None, TRANSPOSED=False,
                  CHANNEL_RUN=channel_run).run()
    return out


def dilated_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          dilation: torch.Tensor, channel_run: int, stride: int,
                          grad_x: torch.Tensor):
    """Writes grad x into ``grad_x``; returns (grad_x, grad_weight (C,K,K) fp32, grad_bias fp32)."""
    batch, channels, height, width = x.shape
    h_out, w_out = grad_out.shape[2:]
    kernel_size = weight.shape[-1]
    if grad_x.numel() > 0:
        gather_launch(x, (batch, height, width, channels),
                      grad_out, weight, weight, dilation, grad_x, channels, h_out, w_out, height, width,
                      *grad_out.stride(), *grad_x.stride(), K=kernel_size, STRIDE=stride,
                      HAS_BIAS=False, TRANSPOSED=True, CHANNEL_RUN=channel_run).run()
    launch, dw_partial, db_partial = grad_weight_launch(grad_out, x, dilation, kernel_size,
                                                        channel_run, stride)
    if launch is not None:
        launch.run()
    grad_weight = dw_partial.sum(0).view(channels, kernel_size, kernel_size)
    return grad_x, grad_weight, db_partial.sum(0)
