"""``window_attention``: public API, input validation, custom-op registration.

The fused backends run behind two ``torch.library`` custom ops (forward -> (out, lse),
backward -> (dq, dk, dv, dbias)) tied by ``register_autograd``. The reference backend is plain
PyTorch and differentiates itself.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from ultron_kernels import _cuda
from ultron_kernels.backends import select_backend
from ultron_kernels.ops._common import (autocast_inputs, check_int32_sizes, check_same_device_and_dtype,
                                        check_tensor, no_autocast)
from ultron_kernels.reference.window_attention import window_attention_reference

OP_NAME = "window_attention"
# Head dims of the fused backends: any up to 128 (Triton rounds its tiles up to a power of two
# and masks the padding columns: SAM-H's 80 runs as 128; CUDA takes any width, on the tensor
# cores for multiples of 16).
MAX_FUSED_HEAD_DIM = 128
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tokens per window each fused backend runs: up to SAM's 64x64 whole-image attention. Windows
# of more than one tile are streamed in blocks (Triton) or tiles (CUDA, where a window whose
# one-block tiles do not fit the device's shared memory is streamed); past that, the
# bias-gradient partials and a dense bias are gigabytes per head. Larger windows run on the
# reference backend.
MAX_FUSED_WINDOW_TOKENS = {"triton": 4096, "cuda": 4096}
# Tokens per tile of the CUDA streamed kernels (csrc/window_attention/streamed.cuh).
CUDA_STREAM_TILE = 32
BIAS_NONE, BIAS_TABLE, BIAS_DENSE = 0, 1, 2

Pair = Union[int, Sequence[int]]


def _axes(name: str, value: Pair, count: int) -> tuple[int, ...]:
    """An int (the same on every axis) or ``count`` ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),) * count
    if (isinstance(value, Sequence) and len(value) == count and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        return tuple(int(v) for v in value)
    shape = "a pair of ints (wh, ww) for (B, H, W, heads, D) tensors" if count == 2 else (
        "3 ints (wt, wh, ww) for (B, T, H, W, heads, D) tensors")
    raise TypeError(f"{name} must be an int or {shape}, got {value!r}")


def _diagonal_sums(t: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> (..., 2n-1): entry d sums t[..., i, j] over i - j = d - (n-1). Skewing
    the flipped matrix through a padded reshape puts each diagonal in one column, so the sum
    is a plain reduction over rows: fixed order, no scatter, no atomics."""
    n = t.shape[-1]
    lead = t.shape[:-2]
    flipped = torch.nn.functional.pad(t.flip(-1), (0, n)).reshape(*lead, 2 * n * n)
    return flipped[..., :n * (2 * n - 1)].reshape(*lead, n, 2 * n - 1).sum(-2)


def _bias_gradient(dense_grad: torch.Tensor, bias: torch.Tensor, kind: int,
                   window: Sequence[int]) -> torch.Tensor:
    """Dense (heads, N, N) float32 gradient -> gradient shaped like ``bias``. A table entry
    gathers the query/key pairs with its offset on every axis: diagonal sums over each axis's
    (query, key) coordinate pair in turn, last axis first."""
    if kind == BIAS_DENSE:
        return dense_grad.to(bias.dtype)
    heads, n = dense_grad.shape[0], len(window)
    pairs = dense_grad.reshape(heads, *window, *window)
    pairs = pairs.permute(0, *(d for axis in range(n) for d in (1 + axis, 1 + n + axis)))
    for _ in range(n):  # (h, offsets so far..., q/k coordinate pairs left...)
        pairs = _diagonal_sums(pairs).movedim(-1, 1)
    return pairs.movedim(0, -1).reshape(-1, heads).contiguous().to(bias.dtype)


# ---------------------------------------------------------------- custom ops (fused backends)
#
# scale is a float32 (heads,) tensor, or None for the float scale_value (the common case: the
# Triton kernels then take it as an argument, not a load); k_pad and v_pad are (heads, D) in
# q's dtype or None; roll_first is timm's roll-then-pad order; rel_rows is the decomposed
# relative position's per-query rows (rel_pos_rows) or None.

@torch.library.custom_op("ultron_kernels::window_attention_fwd", mutates_args=())
def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                   bias_kind: int, window: list[int], shift: list[int],
                   scale: Optional[torch.Tensor], scale_value: float, qk_norm: bool,
                   k_pad: Optional[torch.Tensor], v_pad: Optional[torch.Tensor], roll_first: bool,
                   backend: str, rel_rows: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ultron_kernels.triton.window_attention import window_attention_forward
        return window_attention_forward(q, k, v, bias, bias_kind, tuple(window), tuple(shift),
                                        _triton_scale(scale, scale_value), qk_norm, k_pad, v_pad,
                                        roll_first, rel_rows)
    return _cuda.cuda_ops(q.device).window_attention_fwd(q, k, v, bias, bias_kind, window, shift, scale,
                                                         scale_value, qk_norm, k_pad, v_pad, roll_first,
                                                         rel_rows)


def _triton_scale(scale: Optional[torch.Tensor], scale_value: float):
    return scale_value if scale is None else scale


@_fused_forward.register_fake
def _(q, k, v, bias, bias_kind, window, shift, scale, scale_value, qk_norm, k_pad, v_pad, roll_first,
      backend, rel_rows=None):
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("ultron_kernels::window_attention_bwd", mutates_args=())
def _fused_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    lse: torch.Tensor, bias: Optional[torch.Tensor],
                    bias_kind: int, window: list[int], shift: list[int],
                    scale: Optional[torch.Tensor], scale_value: float, qk_norm: bool,
                    k_pad: Optional[torch.Tensor], v_pad: Optional[torch.Tensor],
                    roll_first: bool, bias_grad: bool, scale_grad: bool, pad_grad: bool,
                    backend: str, rel_rows: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias, dscale, dk_pad, dv_pad, drel_rows); a gradient not asked for is
    empty (drel_rows whenever rel_rows is given). ``out``, the forward's output, is given to
    the Triton backend where no scale gradient or cosine attention needs the softmax term
    summed from P and dP (_delta_from_output); otherwise both backends sum it in fp32."""
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if backend == "triton":
        from ultron_kernels.triton.window_attention import window_attention_backward
        grads = window_attention_backward(
            grad_out, q, k, v, lse, bias, bias_kind, tuple(window), tuple(shift),
            _triton_scale(scale, scale_value), qk_norm, k_pad, v_pad, roll_first, bias_grad,
            scale_grad, pad_grad, rel_rows, out)
    else:
        grads = _cuda.cuda_ops(q.device).window_attention_bwd(
            grad_out, q, k, v, lse, bias, bias_kind, window, shift, scale, scale_value, qk_norm,
            k_pad, v_pad, roll_first, bias_grad, scale_grad, pad_grad, rel_rows)
    dq, dk, dv, dense, dscale, dk_pad, dv_pad, drel = grads

    def none():  # a gradient not asked for; outputs may not alias each other
        return q.new_empty((0,))

    dbias = _bias_gradient(dense, bias, bias_kind, tuple(window)) if bias_grad else none()
    if pad_grad:
        dk_pad, dv_pad = dk_pad.to(k_pad.dtype), dv_pad.to(v_pad.dtype)
    else:
        dk_pad, dv_pad = none(), none()
    drel = drel if rel_rows is not None else none()
    return dq, dk, dv, dbias, (dscale if scale_grad else none()), dk_pad, dv_pad, drel


@_fused_backward.register_fake
def _(grad_out, q, k, v, lse, bias, bias_kind, window, shift, scale, scale_value, qk_norm,
      k_pad, v_pad, roll_first, bias_grad, scale_grad, pad_grad, backend, rel_rows=None, out=None):
    def grad_like(t, wanted):
        return torch.empty_like(t) if wanted else q.new_empty((0,))

    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            grad_like(bias, bias_grad), grad_like(scale, scale_grad), grad_like(k_pad, pad_grad),
            grad_like(v_pad, pad_grad), grad_like(rel_rows, rel_rows is not None))


def _delta_from_output(backend: str, qk_norm: bool, scale_grad: bool) -> bool:
    """Whether the backward takes the softmax term from dO . O (the saved 16-bit output), as
    FlashAttention does: on Triton, where it saves a sweep over the keys of windows of several
    blocks, unless a cancelling sum needs it from P and dP in fp32 (the scale gradient; the
    cosine attention's dq and dk terms)."""
    return backend == "triton" and not qk_norm and not scale_grad


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, bias_kind, window, shift, scale, scale_value, qk_norm, k_pad, v_pad, roll_first,
     backend, rel_rows) = inputs
    out, lse = output
    needs = ctx.needs_input_grad
    ctx.grads = (bias is not None and needs[3], scale is not None and needs[7],
                 k_pad is not None and (needs[10] or needs[11]))
    keep = out if _delta_from_output(backend, qk_norm, ctx.grads[1]) else None
    ctx.save_for_backward(q, k, v, bias, scale, k_pad, v_pad, lse, rel_rows, keep)
    ctx.args = (bias_kind, window, shift, scale_value, qk_norm, roll_first, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, scale, k_pad, v_pad, lse, rel_rows, out = ctx.saved_tensors
    bias_kind, window, shift, scale_value, qk_norm, roll_first, backend = ctx.args
    bias_grad, scale_grad, pad_grad = ctx.grads
    dq, dk, dv, dbias, dscale, dk_pad, dv_pad, drel = _fused_backward(
        grad_out, q, k, v, lse, bias, bias_kind, window, shift, scale, scale_value, qk_norm,
        k_pad, v_pad, roll_first, bias_grad, scale_grad, pad_grad, backend, rel_rows, out)
    return (dq, dk, dv, dbias if bias_grad else None, None, None, None,
            dscale if scale_grad else None, None, None, dk_pad if pad_grad else None,
            dv_pad if pad_grad else None, None, None,
            drel if rel_rows is not None and ctx.needs_input_grad[14] else None)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API

SHIFT_ORDERS = ("pad_then_roll", "roll_then_pad")


def _validate(q, k, v, window_size, shift_size, rel_pos_bias, scale, qk_norm, pad_kv, shift_order,
              rel_pos=None):
    check_tensor("q", q)
    if q.dim() not in (5, 6):
        raise ValueError(f"q: expected a 5-D (B, H, W, heads, D) or 6-D (B, T, H, W, heads, D) "
                         f"tensor, got shape {tuple(q.shape)}")
    axes = q.dim() - 3
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_int32_sizes(name, t)
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head_dim) dimension must be contiguous, "
                             f"got strides {t.stride()}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}")
    check_same_device_and_dtype(q=q, k=k, v=v)
    if not q.is_floating_point() or q.dtype not in FUSED_DTYPES + (torch.float64,):
        raise TypeError(f"q: dtype must be float16, bfloat16, float32 or float64, got {q.dtype}")
    window = _axes("window_size", window_size, axes)
    shift = _axes("shift_size", shift_size, axes)
    if min(window) < 1:
        raise ValueError(f"window_size must be >= 1, got {window}")
    if not all(0 <= s < w for s, w in zip(shift, window)):
        raise ValueError(f"shift_size must satisfy 0 <= shift < window ({window}), got {shift}")
    heads, head_dim, tokens = q.shape[-2], q.shape[-1], math.prod(window)
    kind = BIAS_NONE
    if rel_pos_bias is not None:
        check_tensor("rel_pos_bias", rel_pos_bias)
        table_shape = (math.prod([2 * w - 1 for w in window]), heads)
        dense_shape = (heads, tokens, tokens)
        if tuple(rel_pos_bias.shape) == table_shape:
            kind = BIAS_TABLE
        elif tuple(rel_pos_bias.shape) == dense_shape:
            kind = BIAS_DENSE
        else:
            raise ValueError(f"rel_pos_bias: expected a table of shape {table_shape} or a dense "
                             f"tensor of shape {dense_shape}, got {tuple(rel_pos_bias.shape)}")
        _check_floating_on("rel_pos_bias", rel_pos_bias, q.device)
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, torch.Tensor):
        if tuple(scale.shape) != (heads,):
            raise ValueError(f"scale: a tensor scale must have shape (heads,) = ({heads},), got "
                             f"{tuple(scale.shape)}")
        _check_floating_on("scale", scale, q.device)
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, a (heads,) tensor or None, got {scale!r}")
    else:
        scale = float(scale)
    if not isinstance(qk_norm, bool):
        raise TypeError(f"qk_norm must be a bool, got {qk_norm!r}")
    if pad_kv is not None:
        if not isinstance(pad_kv, (tuple, list)) or len(pad_kv) != 2:
            raise TypeError(f"pad_kv must be None or a pair (k_pad, v_pad) of tensors, got "
                            f"{type(pad_kv).__name__}")
        for name, t in zip(("pad_kv[0] (k_pad)", "pad_kv[1] (v_pad)"), pad_kv):
            check_tensor(name, t)
            if tuple(t.shape) != (heads, head_dim):
                raise ValueError(f"{name}: expected shape (heads, head_dim) = {(heads, head_dim)}, "
                                 f"got {tuple(t.shape)}")
            _check_floating_on(name, t, q.device)
    if shift_order not in SHIFT_ORDERS:
        raise ValueError(f"shift_order must be one of {SHIFT_ORDERS}, got {shift_order!r}")
    if rel_pos is not None:
        _check_rel_pos(rel_pos, window, head_dim, qk_norm, q.device)
    return window, shift, kind, scale


def _check_rel_pos(rel_pos, window, head_dim: int, qk_norm: bool, device: torch.device) -> None:
    """rel_pos: (rel_pos_h, rel_pos_w), floating, on q's device, (2 wh - 1, D) and (2 ww - 1, D)."""
    if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
        raise TypeError(f"rel_pos must be None or a pair (rel_pos_h, rel_pos_w) of tensors, got "
                        f"{type(rel_pos).__name__}")
    if len(window) != 2:
        raise ValueError(f"rel_pos: the decomposed relative position is defined for 2D windows, got "
                         f"window {window}")
    if qk_norm:
        raise ValueError("rel_pos: the decomposed relative position takes q as given; it is not "
                         "defined with qk_norm=True")
    for name, t, size in zip(("rel_pos[0] (rel_pos_h)", "rel_pos[1] (rel_pos_w)"), rel_pos, window):
        check_tensor(name, t)
        if tuple(t.shape) != (2 * size - 1, head_dim):
            raise ValueError(f"{name}: expected shape (2 * {size} - 1, head_dim) = "
                             f"{(2 * size - 1, head_dim)}, got {tuple(t.shape)} (timm's get_rel_pos "
                             "resizes a table of another length before the call)")
        _check_floating_on(name, t, device)


def _check_floating_on(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: dtype must be floating point, got {t.dtype}")


def cuda_shared_memory_bytes(tokens: int, head_dim: int, backward: bool, bias_grad: bool,
                             extras: bool = False, rel_columns: int = 0) -> int:
    """Shared memory one block of the CUDA SIMT kernels needs (csrc/window_attention: fwd
    keeps K and V plus per-warp rows, bwd keeps Q, K, V, dO, P, dS, the run's bias gradient
    and two ints per token; with ``extras`` (cosine attention or a scale gradient) also dS*C
    and six per-row values; with the decomposed relative position each token's
    ``rel_columns`` products with the table rows)."""
    row = head_dim + 1
    if not backward:
        return 4 * (2 * tokens * row + 4 * (tokens + head_dim))
    return 4 * (4 * tokens * row + (3 if extras else 2) * tokens * (tokens + 1) + 2 * tokens
                + (6 * tokens if extras else 0) + (tokens * tokens if bias_grad else 0)
                + tokens * rel_columns + 2 * tokens)


def cuda_streamed_shared_memory_bytes(head_dim: int, backward: bool) -> int:
    """Shared memory of the CUDA streamed kernels (streamed_smem_bytes in
    csrc/window_attention/streamed.cuh): the forward's, or the larger of the backward's dq and
    dk/dv kernels'."""
    tile, rows = CUDA_STREAM_TILE, CUDA_STREAM_TILE * (head_dim + 1)
    if not backward:
        return 4 * (3 * rows + tile * head_dim + 10 * tile + 128)
    return 4 * max(4 * rows + tile * head_dim + 13 * tile + 128,
                   4 * rows + 3 * tile * (tile + 1) + 13 * tile)


def fused_shape_reason(backend: str, window: Sequence[int], head_dim: int, device: torch.device,
                       needs_grad: bool = True, bias_grad: bool = True, extras: bool = False,
                       rel_pos: bool = False) -> Optional[str]:
    """Why ``backend`` cannot run windows of this size (2D or 3D) and head dim on ``device``
    (with a backward when ``needs_grad``; with the decomposed relative position when
    ``rel_pos``), or None. The op asks at each call; the Swin and SAM adapters ask when they
    convert, so that a swapped model never meets a limit at its first forward."""
    if backend in ("reference", "auto"):  # auto takes, per call, a backend that can run it
        return None
    if head_dim > MAX_FUSED_HEAD_DIM:
        return f"head_dim {head_dim} is over the fused kernels' {MAX_FUSED_HEAD_DIM}"
    tokens = math.prod(window)
    if tokens > MAX_FUSED_WINDOW_TOKENS[backend]:
        return (f"window {tuple(window)} has {tokens} tokens; the {backend} kernels run windows of "
                f"at most {MAX_FUSED_WINDOW_TOKENS[backend]} tokens (larger windows run on the "
                "reference backend)")
    # Under torch.compile the device query is left out (the kernels' own check still
    # names the limit); importing torch._dynamo here would import triton too early for
    # TRITON_INTERPRET to take effect.
    if backend == "cuda" and device.type != "meta" and not torch.compiler.is_compiling():
        limit = _cuda.shared_memory_per_block(device)
        for backward in (False, True) if needs_grad else (False,):
            rel_columns = sum(2 * size - 1 for size in window) if rel_pos else 0
            one_tile = cuda_shared_memory_bytes(tokens, head_dim, backward, bias_grad, extras, rel_columns)
            streamed = cuda_streamed_shared_memory_bytes(head_dim, backward)
            if one_tile > limit and streamed > limit:
                return (f"window {tuple(window)} with head_dim {head_dim} needs {streamed} bytes "
                        f"of shared memory per block in the CUDA kernels' streamed tiles "
                        f"({one_tile} as one tile); the device allows {limit}")
    return None


def rel_pos_rows(q: torch.Tensor, rel_pos: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Each query's products with every row of both tables, in q's dtype (what timm forms its
    bias in), shaped like q with 2wh - 1 + 2ww - 1 columns for D: q . rel_pos_h[o], then
    q . rel_pos_w[o]. The fused kernels (Triton and CUDA) gather the bias from them instead of
    forming the N x N bias; autograd carries their gradient
    to q and the tables. One matmul (fp32 accumulation), outside autocast: q already has the
    autocast dtype, the tables are cast to it."""
    tables = torch.cat([t.to(q.dtype) for t in rel_pos]).t()
    with no_autocast(q.device.type):
        return torch.matmul(q, tables)


def _fused_reason(q: torch.Tensor, window: Sequence[int], needs_grad: bool, bias_grad: bool,
                  extras: bool, rel_pos: bool = False):
    def reason(backend: str) -> Optional[str]:
        if backend != "reference" and q.dtype not in FUSED_DTYPES:
            return f"dtype {q.dtype} runs on the reference backend only (fused: {FUSED_DTYPES})"
        return fused_shape_reason(backend, window, q.shape[-1], q.device, needs_grad, bias_grad, extras,
                                  rel_pos)
    return reason


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Pair,
                     shift_size: Pair = 0, rel_pos_bias: Optional[torch.Tensor] = None,
                     scale: Union[float, torch.Tensor, None] = None, *, qk_norm: bool = False,
                     pad_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                     rel_pos: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                     shift_order: str = "pad_then_roll", backend: str = "auto") -> torch.Tensor:
    """Self-attention inside windows of a (B, H, W) grid (Swin) or a (B, T, H, W) video
    (Video Swin), with shifted windows.

    Args:
        q, k, v: (B, H, W, heads, D), or (B, T, H, W, heads, D) for 3D windows; same shape
            and dtype, last dim contiguous (views into a packed (..., 3, heads, D) tensor work
            without copies).
        window_size: int or (wh, ww); int or (wt, wh, ww) for 3D. The fused backends run up
            to ``MAX_FUSED_WINDOW_TOKENS`` (4096) tokens per window. Each axis is padded at its
            end to whole windows; padded positions are not keys (see ``pad_kv``) and their
            outputs are dropped.
        shift_size: int or one value per axis, 0 <= shift < window: Swin's shifted windows
            (roll by minus the shift, attend within regions, roll back).
        rel_pos_bias: None, a relative position table (((2wh-1)*(2ww-1), heads) indexed
            Swin-style; ((2wt-1)*(2wh-1)*(2ww-1), heads) indexed as torchvision's Video Swin),
            or a dense (heads, N, N) tensor, N the tokens per window. Gradients flow to it.
        scale: a float (default D**-0.5) or a (heads,) tensor, e.g. Swin V2's
            ``exp(clamp(logit_scale, max=log(100)))``. Gradients flow to a tensor.
        qk_norm: L2-normalise q and k along D first (eps 1e-12, as ``F.normalize``): cosine
            attention. Done on the loaded tiles; no normalised copy is made.
        pad_kv: (k_pad, v_pad), each (heads, D): padded positions become keys with these
            values, as when a zero-padded input goes through a qkv projection with bias (what
            timm, torchvision and mmdet do). Gradients flow to them.
        rel_pos: (rel_pos_h, rel_pos_w) of shapes (2wh - 1, D) and (2ww - 1, D), 2D windows:
            SAM / ViTDet's decomposed relative position, bias[i, j] = q_i . rel_pos_h[y_i - y_j
            + wh - 1] + q_i . rel_pos_w[x_i - x_j + ww - 1] ((y, x) in-window coordinates),
            from q as given and added unscaled, as timm's ``get_decomposed_rel_pos_bias``;
            gradients flow to q and both tables. Every backend; the fused ones never form
            the N x N bias (each query's 2wh - 1 + 2ww - 1 products with the table rows
            instead); not with ``qk_norm``.
        shift_order: "pad_then_roll" (torchvision, mmdet) or "roll_then_pad" (timm: the
            unpadded grid is rolled, then padded). The same on grids divisible by the window.
        backend: "auto", "reference", "triton" or "cuda".

    Returns:
        q's shape, contiguous.
    """
    window, shift, kind, scale = _validate(q, k, v, window_size, shift_size, rel_pos_bias, scale,
                                           qk_norm, pad_kv, shift_order, rel_pos)
    roll_first = shift_order == "roll_then_pad"
    q, k, v = autocast_inputs(q, k, v)
    k_pad, v_pad = (None, None) if pad_kv is None else (t.to(q.dtype).contiguous() for t in pad_kv)
    per_head = scale if isinstance(scale, torch.Tensor) else None
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, rel_pos_bias, k_pad, v_pad, per_head, *(rel_pos or ()))
        if t is not None)
    bias_grad = needs_grad and rel_pos_bias is not None and rel_pos_bias.requires_grad
    chosen = select_backend(OP_NAME, backend, q.device,
                            _fused_reason(q, window, needs_grad, bias_grad,
                                          extras=qk_norm or (per_head is not None
                                                             and per_head.requires_grad),
                                          rel_pos=rel_pos is not None))
    if chosen == "reference":
        pads = None if pad_kv is None else (k_pad, v_pad)
        return window_attention_reference(q, k, v, window, shift, rel_pos_bias, scale, qk_norm,
                                          pads, roll_first, rel_pos=rel_pos)
    value = 0.0 if per_head is not None else scale
    per_head = per_head.float().contiguous() if per_head is not None else None
    rows = None if rel_pos is None else rel_pos_rows(q, rel_pos)
    out, _ = _fused_forward(q, k, v, rel_pos_bias, kind, list(window), list(shift), per_head, value,
                            qk_norm, k_pad, v_pad, roll_first, chosen, rows)
    return out
