"""Triton kernels for window attention (FlashAttention-style, runs of whole windows per program).

Windows are 2D (Swin) or 3D (Video Swin: frames x rows x columns); a 2D call is the T = 1
volume of the same index math. A program takes one block of queries of a run of windows for
one head; the keys of each window are streamed in blocks with an online softmax (one block
for windows up to 64 tokens, which covers 7x7 and 8x8: the bias tile is then gathered once
per run; up to 4096 tokens in 64-token blocks). Padding, the cyclic shift, the
shifted-window region mask and the relative-position-bias gather are index arithmetic inside
the kernel: no padded, rolled or partitioned copies, and q/k/v may be strided views of a
packed qkv tensor.

Forward saves the output and a float32 logsumexp per query. Backward recomputes the scores;
with a scale gradient or cosine attention it needs no saved output: the softmax term
delta_i = sum_j P_ij dP_ij is summed in fp32 from the tiles (a 16-bit output would enter the
scale gradient's cancelling sum). Otherwise a window of several blocks takes delta from
dO . O in a pre-pass, as FlashAttention does, saving the dq kernel's first sweep.
Each program of the dk/dv kernel owns one key block of a run of windows, so dk/dv need no
atomics; a window of one block is whole in its tile, which gives delta and dq there too; a
larger window first runs a dq kernel (one query block per program, two passes over the key
blocks: delta, then dq; one pass when the pre-pass gave delta). The bias gradient is accumulated per run of windows then reduced
in a fixed order: deterministic.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl

from ultron_kernels.backends import autotune_enabled, triton_interpreter_on
from ultron_kernels.triton.launch import Launch, autotune, plan

@triton.jit
def _token_coords(window, block, T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w,
                  WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ST: tl.constexpr,
                  SH: tl.constexpr, SW: tl.constexpr, BLOCK: tl.constexpr, ROLL_FIRST: tl.constexpr):
    """For tokens ``block*BLOCK + arange(BLOCK)`` of ``window`` (windows numbered batch, then
    time, row, column): batch, in-window token id, image frame/row/col, 'image token' and
    'inside the window' flags (a token inside the window but not in the image is padding) and
    shift region. A 2D grid is the T = 1 case (WT = 1, ST = 0)."""
    per_frame = n_win_h * n_win_w
    per_image = n_win_t * per_frame
    batch = window // per_image
    wz = (window % per_image) // per_frame
    wy = (window % per_frame) // n_win_w
    wx = window % n_win_w
    token = block * BLOCK + tl.arange(0, BLOCK)
    z_rolled = wz * WT + token // (WH * WW)
    y_rolled = wy * WH + (token // WW) % WH
    x_rolled = wx * WW + token % WW
    inside = token < WT * WH * WW
    if ROLL_FIRST:                    # timm: the image was rolled by (-ST, -SH, -SW), then padded
        z = (z_rolled + ST) % T
        y = (y_rolled + SH) % H
        x = (x_rolled + SW) % W
        real = inside & (z_rolled < T) & (y_rolled < H) & (x_rolled < W)
    else:                             # the padded grid was rolled
        z = (z_rolled + ST) % Tp
        y = (y_rolled + SH) % Hp
        x = (x_rolled + SW) % Wp
        real = inside & (z < T) & (y < H) & (x < W)
    region = tl.zeros_like(token)
    if ST > 0:
        region += 9 * ((z_rolled >= Tp - WT).to(tl.int32) + (z_rolled >= Tp - ST).to(tl.int32))
    if SH > 0:
        region += 3 * ((y_rolled >= Hp - WH).to(tl.int32) + (y_rolled >= Hp - SH).to(tl.int32))
    if SW > 0:
        region += (x_rolled >= Wp - WW).to(tl.int32) + (x_rolled >= Wp - SW).to(tl.int32)
    return batch, token, z, y, x, real, inside, region


@triton.jit
def _row_offsets(batch, z, y, x, head, sb, st, sh, sw, sn):
    """int64 offsets of the tokens' rows (one head) in a (B, T, H, W, heads, ...) tensor."""
    return batch.to(tl.int64) * sb + head * sn + (z.to(tl.int64) * st + y.to(tl.int64) * sh + x * sw)


@triton.jit
def _rows_mask(rows, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The (rows, D) mask of the given rows' head columns. D is HEAD_DIM rounded up to a
    power of two (SAM-H's 80 -> 128); the other columns load as zeros, which no dot product
    sees, and are never stored. Without padding no column mask is compiled."""
    if HEAD_DIM == D:
        return rows[:, None]
    else:
        return rows[:, None] & (tl.arange(0, D) < HEAD_DIM)[None, :]


@triton.jit
def _load_head_vector(ptr, head, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row ``head`` of a contiguous (heads, HEAD_DIM) tensor as D columns, the padding ones
    zero (they enter the dots)."""
    d = head * HEAD_DIM + tl.arange(0, D)
    if HEAD_DIM == D:
        return tl.load(ptr + d)
    else:
        return tl.load(ptr + d, mask=tl.arange(0, D) < HEAD_DIM, other=0.0)


@triton.jit
def _store_head_vector(ptr, values, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A (D,) row's HEAD_DIM head columns stored at ``ptr``."""
    d = tl.arange(0, D)
    if HEAD_DIM == D:
        tl.store(ptr + d, values)
    else:
        tl.store(ptr + d, values, mask=d < HEAD_DIM)


@triton.jit
def _load_rows(ptr, batch, z, y, x, head, real, sb, st, sh, sw, sn, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs = _row_offsets(batch, z, y, x, head, sb, st, sh, sw, sn)[:, None] + tl.arange(0, D)[None, :]
    return tl.load(ptr + offs, mask=_rows_mask(real, D, HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(ptr, values, batch, z, y, x, head, real, sb, st, sh, sw, sn, D: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    offs = _row_offsets(batch, z, y, x, head, sb, st, sh, sw, sn)[:, None] + tl.arange(0, D)[None, :]
    tl.store(ptr + offs, values.to(ptr.dtype.element_ty), mask=_rows_mask(real, D, HEAD_DIM))


@triton.jit
def _load_kv(k_ptr, v_ptr, kpad_ptr, vpad_ptr, batch, z, y, x, head, real, inside,
             skb, skt, skh, skw, skn, svb, svt, svh, svw, svn, D: tl.constexpr, HEAD_DIM: tl.constexpr,
             HAS_PAD: tl.constexpr):
    """Key and value rows; padding rows are zero, or the head's pad vectors with HAS_PAD."""
    k = _load_rows(k_ptr, batch, z, y, x, head, real, skb, skt, skh, skw, skn, D, HEAD_DIM)
    v = _load_rows(v_ptr, batch, z, y, x, head, real, svb, svt, svh, svw, svn, D, HEAD_DIM)
    if HAS_PAD:
        pad = (inside & ~real)[:, None]
        k = tl.where(pad, _load_head_vector(kpad_ptr, head, D, HEAD_DIM)[None, :], k)
        v = tl.where(pad, _load_head_vector(vpad_ptr, head, D, HEAD_DIM)[None, :], v)
    return k, v


@triton.jit
def _inverse_norm(rows):
    """1 / max(|row|, eps) per row (F.normalize), and whether |row| >= eps (where the norm's
    derivative is not cut off by the clamp)."""
    norm = tl.sqrt(tl.sum(rows.to(tl.float32) * rows.to(tl.float32), 1))
    return 1.0 / tl.maximum(norm, 1e-12), norm >= 1e-12


@triton.jit
def _head_scale(scale_ptr, scale_value, head, PER_HEAD_SCALE: tl.constexpr):
    """The head's scale: loaded from the (heads,) tensor, or the float argument. A loaded
    scale costs the backward up to 62 registers (ptxas, sm_90: tools/compile_triton.py), so
    the common float scale stays an argument."""
    if PER_HEAD_SCALE:
        return tl.load(scale_ptr + head)
    else:
        return scale_value


@triton.jit
def _bias_tile(bias_ptr, head, q_block, k_block, sbias0, sbias1, sbias2,
               WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BIAS_KIND: tl.constexpr,
               BLOCK: tl.constexpr):
    """Relative position bias (fp32) of query block ``q_block`` against key block ``k_block``.
    It does not depend on the window, so programs that loop over windows gather it once.
    A table is indexed by the frame, row and column offsets (torchvision's 3D order; Swin's
    2D one when WT = 1)."""
    tq = q_block * BLOCK + tl.arange(0, BLOCK)
    tk = k_block * BLOCK + tl.arange(0, BLOCK)
    both = (tq < WT * WH * WW)[:, None] & (tk < WT * WH * WW)[None, :]
    if BIAS_KIND == 1:
        dz = (tq // (WH * WW))[:, None] - (tk // (WH * WW))[None, :] + WT - 1
        dy = ((tq // WW) % WH)[:, None] - ((tk // WW) % WH)[None, :] + WH - 1
        dx = (tq % WW)[:, None] - (tk % WW)[None, :] + WW - 1
        rel = (dz * (2 * WH - 1) + dy) * (2 * WW - 1) + dx
        return tl.load(bias_ptr + rel * sbias0 + head * sbias1, mask=both, other=0.0).to(tl.float32)
    elif BIAS_KIND == 2:
        return tl.load(bias_ptr + head * sbias0 + tq[:, None] * sbias1 + tk[None, :] * sbias2,
                       mask=both, other=0.0).to(tl.float32)
    else:
        return tl.zeros((BLOCK, BLOCK), dtype=tl.float32)


@triton.jit
def _rel_pos_tile(rel_ptr, rel_rows, tq, tk, k_block, real_q, key_in, WH: tl.constexpr,
                  WW: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    """SAM / ViTDet's decomposed relative position bias (fp32) of a query block against a key
    block. Each query has one row of its products with the tables (q_i . Rh[o] for
    o < 2WH - 1, then q_i . Rw[o]) at ``rel_rows``; the bias gathers it at the key's in-window
    row and column offsets. 2D windows only (WT = 1). ROW_BLOCKS: each key block is one
    window row (row k_block; SAM's 64 x 64 global blocks), so the row term is one value per
    query."""
    dx = (tq % WW)[:, None] - (tk % WW)[None, :] + WW - 1 + (2 * WH - 1)
    both = real_q[:, None] & key_in[None, :]
    rows = rel_ptr + rel_rows[:, None]
    along_w = tl.load(rows + dx, mask=both, other=0.0).to(tl.float32)
    if ROW_BLOCKS:
        along_h = tl.load(rel_ptr + rel_rows + ((tq // WW) % WH) - k_block + WH - 1, mask=real_q, other=0.0)
        return along_w + along_h.to(tl.float32)[:, None]
    else:
        dy = ((tq // WW) % WH)[:, None] - ((tk // WW) % WH)[None, :] + WH - 1
        return tl.load(rows + dy, mask=both, other=0.0).to(tl.float32) + along_w


@triton.jit
def _rel_pos_sums(ds, tk, k_block, dtype, WH: tl.constexpr, WW: tl.constexpr, RH: tl.constexpr,
                  RW: tl.constexpr, PRECISION: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    """Each query's dS summed over the key block's tokens of each in-window key row (BLOCK, RH)
    and key column (BLOCK, RW). No atomics: the query's program owns its sums. With
    ROW_BLOCKS (the block is window row k_block, RW = BLOCK) they are dS's row sums, in column
    k_block, and dS itself, in fp32; else dots with one-hot matrices, on the tensor cores in
    16-bit (dS rounded to ``dtype`` as for dq): (RH + RW) / D of a q.k dot's work."""
    if ROW_BLOCKS:
        return tl.where(tl.arange(0, RH)[None, :] == k_block, tl.sum(ds, 1)[:, None], 0.0), ds
    inside = (tk < WH * WW)[:, None]
    rows = ((tk // WW) % WH)[:, None] == tl.arange(0, RH)[None, :]
    cols = (tk % WW)[:, None] == tl.arange(0, RW)[None, :]
    ds = ds.to(dtype)
    # The one-hot matrices go through fp32: the interpreter casts a bool to bf16 as the raw
    # bits 0x0001 (a denormal), not 1.0.
    return (tl.dot(ds, tl.where(rows & inside, 1.0, 0.0).to(dtype), input_precision=PRECISION),
            tl.dot(ds, tl.where(cols & inside, 1.0, 0.0).to(dtype), input_precision=PRECISION))


@triton.jit
def _store_rel_pos_grad(drel_ptr, rel_rows, sum_rows, sum_cols, tq, real_q, WH: tl.constexpr,
                        WW: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):
    """The gradient of each query's table products from its dS sums (fp32, rounded once to
    the rows' dtype): the key row r is the offset ty - r + WH - 1 of query row ty (each offset
    once per query); offsets no key reaches keep the buffer's zeros."""
    r = tl.arange(0, RH)
    c = tl.arange(0, RW)
    rows = drel_ptr + rel_rows[:, None]
    tl.store(rows + (((tq // WW) % WH)[:, None] - r[None, :] + WH - 1),
             sum_rows.to(drel_ptr.dtype.element_ty), mask=real_q[:, None] & (r < WH)[None, :])
    tl.store(rows + ((tq % WW)[:, None] - c[None, :] + WW - 1 + (2 * WH - 1)),
             sum_cols.to(drel_ptr.dtype.element_ty), mask=real_q[:, None] & (c < WW)[None, :])


@triton.jit
def _program_run(n_windows, windows_per_program, NUM_BLOCKS: tl.constexpr):
    """Program (run, block) along axis 0, head along axis 1: the run's first and last+1
    window, its token block and its head."""
    run = tl.program_id(0) // NUM_BLOCKS
    first = run * windows_per_program
    last = tl.minimum(first + windows_per_program, n_windows)
    return run, tl.program_id(0) % NUM_BLOCKS, tl.program_id(1), first, last


@triton.jit
def _pair_bias(run_bias, bias_ptr, head, q_block, k_block, sbias0, sbias1, sbias2,
               WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BIAS_KIND: tl.constexpr,
               BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr):
    """The bias tile of (q_block, k_block): with one block per window, the run's tile
    gathered before the window loop; else gathered here."""
    if NUM_BLOCKS == 1:
        return run_bias
    else:
        return _bias_tile(bias_ptr, head, q_block, k_block, sbias0, sbias1, sbias2,
                          WT, WH, WW, BIAS_KIND, BLOCK)


@triton.jit
def _scores(q, k, inv_q, inv_k, scale, bias, region_q, region_k, key_ok,
            QK_NORM: tl.constexpr, PRECISION: tl.constexpr):
    """(c, s): the q.k products (cosines with QK_NORM: the unnormalised product times both
    inverse norms, so no normalised tile is made) and the scaled, biased, masked scores
    (fp32; -inf where attention is not allowed)."""
    c = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if QK_NORM:
        c = c * inv_q[:, None] * inv_k[None, :]
    allowed = key_ok[None, :] & (region_q[:, None] == region_k[None, :])
    return c, tl.where(allowed, c * scale + bias, float("-inf"))


@triton.jit
def _window_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, scale_ptr, kpad_ptr, vpad_ptr, rel_ptr, o_ptr, lse_ptr,
        T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, n_windows, windows_per_program, scale_value,
        sqb, sqt, sqh, sqw, sqn, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn,
        sob, sot, soh, sow, son, slb, slt, slh, slw, sln, sbias0, sbias1, sbias2,
        srb, srt, srh, srw, srn,
        WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ST: tl.constexpr,
        SH: tl.constexpr, SW: tl.constexpr,
        D: tl.constexpr, HEAD_DIM: tl.constexpr, BIAS_KIND: tl.constexpr, PER_HEAD_SCALE: tl.constexpr,
        QK_NORM: tl.constexpr, HAS_PAD: tl.constexpr, ROLL_FIRST: tl.constexpr, REL_POS: tl.constexpr,
        ROW_BLOCKS: tl.constexpr,
        BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    # Program (run, q_block): query block q_block of a run of windows, one head.
    _, q_block, head, first, last = _program_run(n_windows, windows_per_program, NUM_BLOCKS)
    run_bias = _bias_tile(bias_ptr, head, 0, 0, sbias0, sbias1, sbias2, WT, WH, WW, BIAS_KIND, BLOCK)
    scale = _head_scale(scale_ptr, scale_value, head, PER_HEAD_SCALE)
    for window in range(first, last):
        batch, tq, zq, yq, xq, real_q, inside_q, region_q = _token_coords(
            window, q_block, T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, WT, WH, WW, ST, SH, SW, BLOCK, ROLL_FIRST)
        q = _load_rows(q_ptr, batch, zq, yq, xq, head, real_q, sqb, sqt, sqh, sqw, sqn, D, HEAD_DIM)
        rel_rows = _row_offsets(batch, zq, yq, xq, head, srb, srt, srh, srw, srn)
        inv_q = scale
        if QK_NORM:
            inv_q, live_q = _inverse_norm(q)
        m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK,), dtype=tl.float32)
        acc = tl.zeros((BLOCK, D), dtype=tl.float32)
        for k_block in range(NUM_BLOCKS):
            batch_k, tk, zk, yk, xk, real_k, inside_k, region_k = _token_coords(
                window, k_block, T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, WT, WH, WW, ST, SH, SW, BLOCK, ROLL_FIRST)
            k, v = _load_kv(k_ptr, v_ptr, kpad_ptr, vpad_ptr, batch, zk, yk, xk, head, real_k, inside_k,
                            skb, skt, skh, skw, skn, svb, svt, svh, svw, svn, D, HEAD_DIM, HAS_PAD)
            inv_k = scale
            if QK_NORM:
                inv_k, live_k = _inverse_norm(k)
            bias = _pair_bias(run_bias, bias_ptr, head, q_block, k_block, sbias0, sbias1, sbias2,
                              WT, WH, WW, BIAS_KIND, BLOCK, NUM_BLOCKS)
            if REL_POS:
                bias += _rel_pos_tile(rel_ptr, rel_rows, tq, tk, k_block, real_q, inside_k, WH, WW, ROW_BLOCKS)
            c, s = _scores(q, k, inv_q, inv_k, scale, bias, region_q, region_k,
                           inside_k if HAS_PAD else real_k, QK_NORM, PRECISION)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        _store_rows(o_ptr, acc / l_safe[:, None], batch, zq, yq, xq, head, real_q, sob, sot, soh, sow, son,
                    D, HEAD_DIM)
        # A row whose every key is masked: output 0 (l_safe), lse -inf, as on every backend.
        lse = tl.where(l_i > 0.0, m_i + tl.log(l_safe), float("-inf"))
        tl.store(lse_ptr + _row_offsets(batch, zq, yq, xq, head, slb, slt, slh, slw, sln), lse, mask=real_q)


@triton.jit
def _query_rows(q_ptr, do_ptr, lse_ptr, batch, zq, yq, xq, head, real_q, scale,
                sqb, sqt, sqh, sqw, sqn, sdob, sdot, sdoh, sdow, sdon, slb, slt, slh, slw, sln,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr):
    """A query block's q and dO rows, logsumexp (0 for a fully masked row: its every p is 0
    anyway), inverse norm (the scale without QK_NORM) and 'norm not clamped' flag."""
    q = _load_rows(q_ptr, batch, zq, yq, xq, head, real_q, sqb, sqt, sqh, sqw, sqn, D, HEAD_DIM)
    do = _load_rows(do_ptr, batch, zq, yq, xq, head, real_q, sdob, sdot, sdoh, sdow, sdon, D, HEAD_DIM)
    lse = tl.load(lse_ptr + _row_offsets(batch, zq, yq, xq, head, slb, slt, slh, slw, sln),
                  mask=real_q, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    inv_q = scale
    live_q = real_q
    if QK_NORM:
        inv_q, live_q = _inverse_norm(q)
    return q, do, lse, inv_q, live_q


@triton.jit
def _probabilities(q, k, v, do, lse, inv_q, inv_k, scale, bias, real_q, region_q, region_k, key_ok,
                   QK_NORM: tl.constexpr, PRECISION: tl.constexpr):
    """(c, p, dp) of a query block against a key block: the q.k products (cosines with
    QK_NORM), the softmax probabilities recomputed from the saved logsumexp, and dO.V^T."""
    c, s = _scores(q, k, inv_q, inv_k, scale, bias, region_q, region_k, key_ok, QK_NORM, PRECISION)
    p = tl.where(real_q[:, None] & (s > float("-inf")), tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return c, p, dp


@triton.jit
def _finish_gradient(dq, dc_q, q, inv_q, live_q, scale, QK_NORM: tl.constexpr):
    """dq from sum_j ds_ij k_j (times ik_j with QK_NORM) and dc_q = sum_j ds_ij c_ij. With
    QK_NORM, s = scale * c + bias with c = (q.k) * iq * ik (iq, ik: inverse norms), so
    dq_i = scale * iq_i * sum_j ds_ij ik_j k_j - scale * iq_i^2 * dc_q_i * q_i, the second
    term only where |q_i| >= eps (F.normalize clamps the norm). dk is the same with the
    roles swapped."""
    if QK_NORM:
        return (dq * (scale * inv_q)[:, None]
                - (tl.where(live_q, inv_q * inv_q, 0.0) * scale * dc_q)[:, None] * q.to(tl.float32))
    else:
        return dq * scale


@triton.jit
def _softmax_term_kernel(o_ptr, do_ptr, delta_ptr, rows, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr):
    """delta = sum_d dO * O per (token, head) row, in fp32 from the 16-bit rows
    (FlashAttention's backward pre-pass): O and dO contiguous, delta shaped like the lse."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs = r.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, D)[None, :]
    live = _rows_mask(r < rows, D, HEAD_DIM)
    o = tl.load(o_ptr + offs, mask=live, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(delta_ptr + r, tl.sum(o * do, 1), mask=r < rows)


@triton.jit
def _window_attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, scale_ptr, kpad_ptr, vpad_ptr, rel_ptr, lse_ptr, do_ptr,
        dq_ptr, delta_ptr, drel_ptr,
        T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, n_windows, windows_per_program, scale_value,
        sqb, sqt, sqh, sqw, sqn, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn,
        slb, slt, slh, slw, sln, sdob, sdot, sdoh, sdow, sdon, sdqb, sdqt, sdqh, sdqw, sdqn, sbias0, sbias1, sbias2,
        srb, srt, srh, srw, srn,
        WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ST: tl.constexpr,
        SH: tl.constexpr, SW: tl.constexpr,
        D: tl.constexpr, HEAD_DIM: tl.constexpr, BIAS_KIND: tl.constexpr, PER_HEAD_SCALE: tl.constexpr,
        QK_NORM: tl.constexpr, HAS_PAD: tl.constexpr, ROLL_FIRST: tl.constexpr, REL_POS: tl.constexpr,
        ROW_BLOCKS: tl.constexpr,
        RH: tl.constexpr, RW: tl.constexpr, DELTA_GIVEN: tl.constexpr,
        BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    # Windows of several blocks. Program (run, q_block): dq of one query block of a run of
    # windows, one head, in two passes over the key blocks: the first sums the softmax term
    # delta_i = sum_j p_ij dp_ij in fp32 (no saved output is read: its 16-bit rounding would
    # enter the scale gradient's cancelling sum), the second accumulates dq. delta is stored
    # for the dk/dv kernel. DELTA_GIVEN (no scale gradient, no cosine attention): the launcher
    # computed delta from dO . O as FlashAttention does, and only the second pass runs.
    _, q_block, head, first, last = _program_run(n_windows, windows_per_program, NUM_BLOCKS)
    scale = _head_scale(scale_ptr, scale_value, head, PER_HEAD_SCALE)
    for window in range(first, last):
        batch, tq, zq, yq, xq, real_q, inside_q, region_q = _token_coords(
            window, q_block, T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, WT, WH, WW, ST, SH, SW, BLOCK, ROLL_FIRST)
        q, do, lse, inv_q, live_q = _query_rows(
            q_ptr, do_ptr, lse_ptr, batch, zq, yq, xq, head, real_q, scale, sqb, sqt, sqh, sqw, sqn,
            sdob, sdot, sdoh, sdow, sdon, slb, slt, slh, slw, sln, D, HEAD_DIM, QK_NORM)
        rel_rows = _row_offsets(batch, zq, yq, xq, head, srb, srt, srh, srw, srn)
        delta_offs = _row_offsets(batch, zq, yq, xq, head, slb, slt, slh, slw, sln)
        if DELTA_GIVEN:
            delta = tl.load(delta_ptr + delta_offs, mask=real_q, other=0.0)
        else:
            delta = tl.zeros((BLOCK,), dtype=tl.float32)
        dq = tl.zeros((BLOCK, D), dtype=tl.float32)
        dc_q = tl.zeros((BLOCK,), dtype=tl.float32)      # sum_j ds_ij c_ij per query
        ds_rows = tl.zeros((BLOCK, RH), dtype=tl.float32)  # sum of ds per key row (REL_POS)
        ds_cols = tl.zeros((BLOCK, RW), dtype=tl.float32)  # and per key column
        for sweep in tl.static_range(1 if DELTA_GIVEN else 0, 2):  # 0: delta, 1: dq
            for k_block in range(NUM_BLOCKS):
                _, tk, zk, yk, xk, real_k, inside_k, region_k = _token_coords(
                    window, k_block, T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, WT, WH, WW, ST, SH, SW, BLOCK, ROLL_FIRST)
                k, v = _load_kv(k_ptr, v_ptr, kpad_ptr, vpad_ptr, batch, zk, yk, xk, head, real_k,
                                inside_k, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn, D, HEAD_DIM, HAS_PAD)
                inv_k = scale
                if QK_NORM:
                    inv_k, live_k = _inverse_norm(k)
                bias = _bias_tile(bias_ptr, head, q_block, k_block, sbias0, sbias1, sbias2,
                                  WT, WH, WW, BIAS_KIND, BLOCK)
                if REL_POS:
                    bias += _rel_pos_tile(rel_ptr, rel_rows, tq, tk, k_block, real_q, inside_k, WH, WW, ROW_BLOCKS)
                c, p, dp = _probabilities(q, k, v, do, lse, inv_q, inv_k, scale, bias, real_q,
                                          region_q, region_k, inside_k if HAS_PAD else real_k,
                                          QK_NORM, PRECISION)
                if sweep == 0:
                    delta += tl.sum(p * dp, 1)
                else:
                    ds = p * (dp - delta[:, None])
                    if QK_NORM:
                        dc_q += tl.sum(ds * c, 1)
                        dq += tl.dot((ds * inv_k[None, :]).to(k.dtype), k, input_precision=PRECISION)
                    else:
                        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                    if REL_POS:
                        part_rows, part_cols = _rel_pos_sums(ds, tk, k_block, k.dtype, WH, WW, RH, RW, PRECISION, ROW_BLOCKS)
                        ds_rows += part_rows
                        ds_cols += part_cols
        if REL_POS:
            _store_rel_pos_grad(drel_ptr, rel_rows, ds_rows, ds_cols, tq, real_q, WH, WW, RH, RW)
        dq = _finish_gradient(dq, dc_q, q, inv_q, live_q, scale, QK_NORM)
        _store_rows(dq_ptr, dq, batch, zq, yq, xq, head, real_q, sdqb, sdqt, sdqh, sdqw, sdqn, D, HEAD_DIM)
        if not DELTA_GIVEN:
            tl.store(delta_ptr + delta_offs, delta, mask=real_q)


@triton.jit
def _window_attn_bwd_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, scale_ptr, kpad_ptr, vpad_ptr, rel_ptr, lse_ptr, do_ptr, delta_ptr,
        dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dscale_ptr, dpad_ptr, drel_ptr,
        T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, n_windows, windows_per_program, scale_value,
        sqb, sqt, sqh, sqw, sqn, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn,
        slb, slt, slh, slw, sln, sdob, sdot, sdoh, sdow, sdon, sdkb, sdkt, sdkh, sdkw, sdkn, sbias0, sbias1, sbias2,
        srb, srt, srh, srw, srn,
        WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ST: tl.constexpr,
        SH: tl.constexpr, SW: tl.constexpr,
        D: tl.constexpr, HEAD_DIM: tl.constexpr, BIAS_KIND: tl.constexpr, PER_HEAD_SCALE: tl.constexpr,
        QK_NORM: tl.constexpr, HAS_PAD: tl.constexpr, ROLL_FIRST: tl.constexpr, REL_POS: tl.constexpr,
        ROW_BLOCKS: tl.constexpr,
        RH: tl.constexpr, RW: tl.constexpr, BIAS_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
        PAD_GRAD: tl.constexpr, BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr,
        PRECISION: tl.constexpr):
    # Program (run, k_block): dk and dv of one key block of a run of windows, one head.
    # A window of one block is whole in the tile: delta_i = sum_j p_ij dp_ij is summed here
    # in fp32 and dq written here too. A window of several blocks reads delta and leaves dq
    # to _window_attn_bwd_dq_kernel, which ran first. dq, dk and dv are contiguous (strides
    # sdk*). The scale gradient is written per (window, key block, head), the pad-vector
    # gradients per (program, head): partials the launcher sums in a fixed order. The bias
    # gradient is summed per run of windows (one tile with one block per window, else the
    # program's own columns of the run's (N, N) slice).
    run, k_block, head, first, last = _program_run(n_windows, windows_per_program, NUM_BLOCKS)
    n_tok = WT * WH * WW
    ds_run = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)   # bias grad of this run (1 block)
    run_bias = _bias_tile(bias_ptr, head, 0, 0, sbias0, sbias1, sbias2, WT, WH, WW, BIAS_KIND, BLOCK)
    scale = _head_scale(scale_ptr, scale_value, head, PER_HEAD_SCALE)
    dk_pad = tl.zeros((D,), dtype=tl.float32)
    dv_pad = tl.zeros((D,), dtype=tl.float32)
    for window in range(first, last):
        batch, tk, zk, yk, xk, real_k, inside_k, region_k = _token_coords(
            window, k_block, T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, WT, WH, WW, ST, SH, SW, BLOCK, ROLL_FIRST)
        k, v = _load_kv(k_ptr, v_ptr, kpad_ptr, vpad_ptr, batch, zk, yk, xk, head, real_k, inside_k,
                        skb, skt, skh, skw, skn, svb, svt, svh, svw, svn, D, HEAD_DIM, HAS_PAD)
        inv_k = scale
        live_k = real_k
        if QK_NORM:
            inv_k, live_k = _inverse_norm(k)
        dk = tl.zeros((BLOCK, D), dtype=tl.float32)
        dv = tl.zeros((BLOCK, D), dtype=tl.float32)
        dc_k = tl.zeros((BLOCK,), dtype=tl.float32)      # sum_i ds_ij c_ij per key
        for q_block in range(NUM_BLOCKS):
            batch_q, tq, zq, yq, xq, real_q, inside_q, region_q = _token_coords(
                window, q_block, T, H, W, Tp, Hp, Wp, n_win_t, n_win_h, n_win_w, WT, WH, WW, ST, SH, SW, BLOCK, ROLL_FIRST)
            q, do, lse, inv_q, live_q = _query_rows(
                q_ptr, do_ptr, lse_ptr, batch, zq, yq, xq, head, real_q, scale, sqb, sqt, sqh, sqw, sqn,
                sdob, sdot, sdoh, sdow, sdon, slb, slt, slh, slw, sln, D, HEAD_DIM, QK_NORM)
            rel_rows = _row_offsets(batch, zq, yq, xq, head, srb, srt, srh, srw, srn)
            bias = _pair_bias(run_bias, bias_ptr, head, q_block, k_block, sbias0, sbias1, sbias2,
                              WT, WH, WW, BIAS_KIND, BLOCK, NUM_BLOCKS)
            if REL_POS:
                bias += _rel_pos_tile(rel_ptr, rel_rows, tq, tk, k_block, real_q, inside_k, WH, WW, ROW_BLOCKS)
            c, p, dp = _probabilities(q, k, v, do, lse, inv_q, inv_k, scale, bias, real_q,
                                      region_q, region_k, inside_k if HAS_PAD else real_k,
                                      QK_NORM, PRECISION)
            if NUM_BLOCKS == 1:
                delta = tl.sum(p * dp, 1)
            else:
                delta = tl.load(delta_ptr + _row_offsets(batch, zq, yq, xq, head, slb, slt, slh, slw, sln),
                                mask=real_q, other=0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if SCALE_GRAD or QK_NORM:
                dc_k += tl.sum(ds * c, 0)
            if QK_NORM:
                dk += tl.dot(tl.trans(ds * inv_q[:, None]).to(q.dtype), q, input_precision=PRECISION)
            else:
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            if NUM_BLOCKS == 1:
                if QK_NORM:
                    dq = tl.dot((ds * inv_k[None, :]).to(k.dtype), k, input_precision=PRECISION)
                else:
                    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                dq = _finish_gradient(dq, tl.sum(ds * c, 1), q, inv_q, live_q, scale, QK_NORM)
                _store_rows(dq_ptr, dq, batch, zq, yq, xq, head, real_q, sdkb, sdkt, sdkh, sdkw, sdkn, D, HEAD_DIM)
                if REL_POS:
                    ds_rows, ds_cols = _rel_pos_sums(ds, tk, k_block, k.dtype, WH, WW, RH, RW, PRECISION, ROW_BLOCKS)
                    _store_rel_pos_grad(drel_ptr, rel_rows, ds_rows, ds_cols, tq, real_q, WH, WW, RH, RW)
                if BIAS_GRAD:
                    ds_run += ds
            elif BIAS_GRAD:
                both = (tq < n_tok)[:, None] & (tk < n_tok)[None, :]
                offs = ((run * tl.num_programs(1) + head).to(tl.int64) * n_tok * n_tok
                        + tq[:, None] * n_tok + tk[None, :])
                old = tl.load(dbias_ptr + offs, mask=both, other=0.0)
                tl.store(dbias_ptr + offs, old + ds, mask=both)
        if SCALE_GRAD:  # one partial per window and key block, summed by the launcher
            tl.store(dscale_ptr + (window * NUM_BLOCKS + k_block).to(tl.int64) * tl.num_programs(1) + head,
                     tl.sum(dc_k, 0))
        dk = _finish_gradient(dk, dc_k, k, inv_k, live_k, scale, QK_NORM)
        _store_rows(dk_ptr, dk, batch, zk, yk, xk, head, real_k, sdkb, sdkt, sdkh, sdkw, sdkn, D, HEAD_DIM)
        _store_rows(dv_ptr, dv, batch, zk, yk, xk, head, real_k, sdkb, sdkt, sdkh, sdkw, sdkn, D, HEAD_DIM)
        if PAD_GRAD:  # padding keys all hold the head's pad vectors: their gradients add up
            pad = (inside_k & ~real_k)[:, None]
            dk_pad += tl.sum(tl.where(pad, dk, 0.0), 0)
            dv_pad += tl.sum(tl.where(pad, dv, 0.0), 0)
    partial = tl.program_id(0) * tl.num_programs(1) + head
    if PAD_GRAD:  # dpad is (programs, heads, 2, HEAD_DIM)
        _store_head_vector(dpad_ptr + partial.to(tl.int64) * 2 * HEAD_DIM, dk_pad, D, HEAD_DIM)
        _store_head_vector(dpad_ptr + partial.to(tl.int64) * 2 * HEAD_DIM + HEAD_DIM, dv_pad, D, HEAD_DIM)
    if BIAS_GRAD:
        if NUM_BLOCKS == 1:
            t = tl.arange(0, BLOCK)
            both = (t < n_tok)[:, None] & (t < n_tok)[None, :]
            offs = ((run * tl.num_programs(1) + head).to(tl.int64) * n_tok * n_tok
                    + t[:, None] * n_tok + t[None, :])
            tl.store(dbias_ptr + offs, ds_run, mask=both)


# Forward only: each query row's result does not depend on the launch shape. The backward
# keeps one fixed configuration so that its bits cannot change with a tuning decision.
# Configurations that do not fit the device's shared memory are pruned before timing. The
# list is in order of preference (a capped tuning times its head): 4 warps, software-pipelined
# first, which the counts in bench/NOTES.md favour for 64-token tiles; not yet a measurement.
_FWD_WARPS_STAGES = [(4, 2), (8, 2), (4, 3), (2, 2), (8, 3), (4, 1), (2, 3), (8, 1), (2, 1)]
_window_attn_fwd_autotuned = autotune(
    "window attention forward", _window_attn_fwd_kernel, [triton.Config({}, num_warps=w, num_stages=st) for w, st in _FWD_WARPS_STAGES],
    key=["T", "H", "W", "WT", "WH", "WW", "ST", "SH", "SW", "D", "HEAD_DIM", "BIAS_KIND", "PER_HEAD_SCALE", "QK_NORM", "HAS_PAD",
         "ROLL_FIRST", "REL_POS", "ROW_BLOCKS", "PRECISION"])


def launch_candidates(head_dim: int, tokens: int, backward: bool) -> list[dict]:
    """The plain (untuned) launch configurations, in order of preference; the first that
    fits the device's shared memory runs (launch.plan).

    The preferred one takes the whole window (up to 64 tokens) as one block. Compiled for
    sm_90, the backward with 3 stages needs up to 377 KB (fp32, D=128), over the 227 KB a
    block may have there, so it is never a candidate. On 99 KB parts (sm_86/sm_89) fp32 at
    D=128 does not fit even with one stage: the query/key block is then halved (the
    backward's dq is summed over key blocks in a fixed order, as for windows over 64 tokens).
    tools/compile_triton.py compiles the choice for sm_80/86/89/90, with the candidates
    rejected before it."""
    width = tile_width(head_dim)
    warps = 4 if width <= 64 else 8
    block = _block(tokens)
    stages = (1,) if backward and width > 64 else (2, 1)
    candidates = [dict(BLOCK=block, num_warps=warps, num_stages=st) for st in stages]
    while block > 16:
        block //= 2
        candidates.append(dict(BLOCK=block, num_warps=warps, num_stages=1))
    return candidates


def tile_width(head_dim: int) -> int:
    """The kernels' tile width for a head dim: a power of two (tl.arange) and 16 at least (a
    tl.dot's depth); SAM-H's 80 runs as 128 with the padding columns masked."""
    return max(16, triton.next_power_of_2(head_dim))


def _block(tokens: int) -> int:
    return max(16, min(64, triton.next_power_of_2(tokens)))


def _volumes(window, shift, *tensors):
    """The 3D window and shift, and each (B, H, W, ...) tensor of a 2D call as the T = 1
    volume (B, 1, H, W, ...), a view; a 3D call's as they are."""
    if len(window) == 3:
        return (tuple(window), tuple(shift), *tensors)
    return ((1, *window), (0, *shift), *(t.unsqueeze(1) for t in tensors))


def _geometry(q: torch.Tensor, window, shift):
    """q: the (B, T, H, W, heads, D) volume; window and shift: 3D."""
    batch, frames, height, width = q.shape[:4]
    n_win = [-(-size // w) for size, w in zip((frames, height, width), window)]
    return dict(T=frames, H=height, W=width, Tp=n_win[0] * window[0], Hp=n_win[1] * window[1],
                Wp=n_win[2] * window[2], n_win_t=n_win[0], n_win_h=n_win[1], n_win_w=n_win[2],
                n_windows=batch * n_win[0] * n_win[1] * n_win[2])


def _meta(q: torch.Tensor, window, shift, bias_kind: int, variant: "Variant",
          candidate: dict) -> dict:
    """Compile-time parameters of one launch: the op's flags and the candidate's tile (q the
    6-D volume, window and shift 3D)."""
    interpret = triton_interpreter_on() or q.device.type != "cuda"
    tf32 = q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpret
    return dict(WT=window[0], WH=window[1], WW=window[2], ST=shift[0], SH=shift[1], SW=shift[2],
                D=tile_width(q.shape[-1]), HEAD_DIM=q.shape[-1], BIAS_KIND=bias_kind, PER_HEAD_SCALE=variant.per_head_scale,
                QK_NORM=variant.qk_norm, HAS_PAD=variant.k_pad is not None,
                ROLL_FIRST=variant.roll_first, REL_POS=variant.rel_rows is not None,
                # rel_pos: each key block one window row (a 2D window BLOCK tokens wide)
                ROW_BLOCKS=variant.rel_rows is not None and window[2] == candidate["BLOCK"],
                NUM_BLOCKS=triton.cdiv(math.prod(window), candidate["BLOCK"]),
                PRECISION="tf32" if tf32 else "ieee", **candidate)


class Variant(NamedTuple):
    """The op's per-call options the kernels take: the scale (a float, or a (heads,) float32
    tensor), cosine attention, the pad vectors ((heads, D) in q's dtype, or None), timm's
    roll-then-pad order and the decomposed relative position's per-query rows (q's dtype,
    shaped like q with 2wh - 1 + 2ww - 1 columns for D: q . rel_pos_h[o], then q . rel_pos_w[o];
    contiguous) or None."""
    scale: Union[float, torch.Tensor]
    qk_norm: bool = False
    k_pad: Optional[torch.Tensor] = None
    v_pad: Optional[torch.Tensor] = None
    roll_first: bool = False
    rel_rows: Optional[torch.Tensor] = None

    @property
    def per_head_scale(self) -> bool:
        return isinstance(self.scale, torch.Tensor)

    def pointers(self, q: torch.Tensor) -> tuple:
        """scale, k_pad, v_pad, rel_rows pointer arguments (q stands in for an absent one)."""
        return (self.scale if self.per_head_scale else q,
                *(q if t is None else t for t in (self.k_pad, self.v_pad, self.rel_rows)))

    def rel_strides(self) -> tuple[int, ...]:
        """Batch, frame, row, column and head strides of the per-query rows (zeros without):
        rel_pos is 2D only, so the rows are a T = 1 volume."""
        if self.rel_rows is None:
            return (0,) * 5
        return _strides5(self.rel_rows.unsqueeze(1))

    @property
    def scale_value(self) -> float:
        return 0.0 if self.per_head_scale else self.scale


def _bias_strides(bias) -> tuple[int, int, int]:
    if bias is None:
        return 0, 0, 0
    strides = bias.stride()
    return (*strides, 0) if bias.dim() == 2 else strides


def _geometry_args(geo: dict, per_program: int, scale_value: float) -> tuple:
    return (geo["T"], geo["H"], geo["W"], geo["Tp"], geo["Hp"], geo["Wp"], geo["n_win_t"],
            geo["n_win_h"], geo["n_win_w"], geo["n_windows"], per_program, scale_value)


def _strides5(t: torch.Tensor) -> tuple[int, ...]:
    """Batch, frame, row, column and head strides of a 6-D volume tensor."""
    return t.stride()[:5]


def forward_launch(q, k, v, bias, bias_kind: int, window, shift, variant: Variant):
    """(launch, out, lse): the forward's configuration chosen for the device, not yet run.
    q, k, v: (B, H, W, heads, D) with a 2D window and shift, or (B, T, H, W, heads, D) with
    3D ones; out is shaped like q, lse like q without D."""
    heads, head_dim = q.shape[-2:]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    window, shift, q, k, v, out_v, lse_v = _volumes(window, shift, q, k, v, out, lse)
    geo = _geometry(q, window, shift)

    def build(candidate: dict) -> Launch:
        meta = _meta(q, window, shift, bias_kind, variant, candidate)
        blocks = meta["NUM_BLOCKS"]
        per_program = _windows_per_program(geo["n_windows"], heads * blocks, q.device,
                                           programs_per_sm=8)
        grid = (triton.cdiv(geo["n_windows"], per_program) * blocks, heads)
        args = (q, k, v, bias if bias is not None else q, *variant.pointers(q), out_v, lse_v,
                *_geometry_args(geo, per_program, variant.scale_value),
                *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out_v), *lse_v.stride(),
                *_bias_strides(bias), *variant.rel_strides())
        return Launch(_window_attn_fwd_kernel, grid, args, meta)

    candidates = launch_candidates(head_dim, math.prod(window), backward=False)
    launch = plan("window attention forward", candidates, build)
    if (launch.meta["BLOCK"] == candidates[0]["BLOCK"] and autotune_enabled()
            and not triton_interpreter_on()):
        # The tile is the preferred one: let the autotuner pick warps and stages.
        tile = {name: launch.meta[name] for name in launch.meta if name not in ("num_warps", "num_stages")}
        launch = Launch(_window_attn_fwd_autotuned, launch.grid, launch.args, tile)
    return launch, out, lse


def window_attention_forward(q, k, v, bias, bias_kind: int, window, shift,
                             scale: Union[float, torch.Tensor],
                             qk_norm: bool, k_pad, v_pad, roll_first: bool,
                             rel_rows: Optional[torch.Tensor] = None):
    """Returns (out shaped like q, contiguous; lse shaped like q without D, float32).
    rel_rows: the decomposed relative position's per-query rows (Variant), or None."""
    if q.numel() == 0:
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty(q.shape[:-1], dtype=torch.float32))
    variant = Variant(scale, qk_norm, k_pad, v_pad, roll_first, rel_rows)
    launch, out, lse = forward_launch(q, k, v, bias, bias_kind, window, shift, variant)
    launch.run()
    return out, lse


def _windows_per_program(n_windows: int, parallel: int, device: torch.device,
                         programs_per_sm: int) -> int:
    """Enough programs to fill the GPU a few times over; beyond that, longer runs of windows
    per program: one bias gather per run, fewer partial bias-gradient sums."""
    if device.type != "cuda":  # the interpreter: three runs, so the CPU tests cross run ends
        return max(1, -(-n_windows // 3))
    target = programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_windows, (n_windows * parallel) // target))


# The bias-gradient partials of windows over one block are (runs, heads, N, N) float32: the
# number of runs is capped so that they stay within this many bytes (one run at least, the
# size of a dense bias's own gradient).
BIAS_PARTIALS_BYTES = 256 * 2 ** 20


# Rows of the softmax-term pre-pass per program.
SOFTMAX_TERM_ROWS = 64


def backward_launch(grad_out, q, k, v, lse, bias, bias_kind: int, window, shift,
                    variant: Variant, bias_grad: bool, scale_grad: bool = False,
                    pad_grad: bool = False, out: Optional[torch.Tensor] = None):
    """(launches, buffers): the backward's kernels for the device, in the order they must
    run, not yet run: one kernel for windows of one block; for larger windows the dq kernel
    (which also stores delta) then the dk/dv kernel. With ``out`` (the forward's output,
    given when there is no scale gradient and no cosine attention, where delta enters no
    cancelling sum), a larger window's delta comes from dO . O in a pre-pass instead, and the
    dq kernel sweeps the keys once instead of twice. buffers: dq, dk, dv (shaped like q), and
    the partials of the bias (one per run of windows), scale and pad gradients (None where
    not asked for), and with the decomposed relative position the gradient of its per-query
    rows (shaped and typed like them; each query's program writes its row's reachable
    offsets once, the rest stays zero)."""
    heads, head_dim = q.shape[-2:]
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    drel = None if variant.rel_rows is None else torch.zeros_like(variant.rel_rows)
    delta = torch.empty_like(lse)
    window, shift, q, k, v, lse, grad_out, delta_v, dq_v, dk_v, dv_v = _volumes(
        window, shift, q, k, v, lse, grad_out, delta, dq, dk, dv)
    geo = _geometry(q, window, shift)
    tokens = math.prod(window)
    buffers = {}

    def build(candidate: dict) -> Launch:
        meta = dict(_meta(q, window, shift, bias_kind, variant, candidate), BIAS_GRAD=bias_grad,
                    SCALE_GRAD=scale_grad, PAD_GRAD=pad_grad,
                    # the dS sums per key row and column: a tl.dot's width, 16 at least
                    RH=max(16, triton.next_power_of_2(window[1])),
                    RW=max(16, triton.next_power_of_2(window[2])))
        blocks = meta["NUM_BLOCKS"]
        per_program = _windows_per_program(geo["n_windows"], heads * blocks, q.device,
                                           programs_per_sm=4)
        if bias_grad and blocks > 1:
            most_runs = max(1, BIAS_PARTIALS_BYTES // (4 * heads * tokens * tokens))
            per_program = max(per_program, -(-geo["n_windows"] // most_runs))
        runs = triton.cdiv(geo["n_windows"], per_program) if geo["n_windows"] else 0
        partial = dict(device=q.device, dtype=torch.float32)
        # Zeroed below for the chosen candidate only (its kernel accumulates into it).
        dbias = torch.empty((runs, heads, tokens, tokens), **partial) if bias_grad else None
        # Per window: a long run's sum would otherwise gather its rounding in one float.
        dscale = torch.empty((geo["n_windows"] * blocks, heads), **partial) if scale_grad else None
        dpad = torch.empty((runs * blocks, heads, 2, head_dim), **partial) if pad_grad else None
        common = (*_geometry_args(geo, per_program, variant.scale_value),
                  *_strides5(q), *_strides5(k), *_strides5(v), *lse.stride(),
                  *_strides5(grad_out), *_strides5(dq_v), *_bias_strides(bias), *variant.rel_strides())
        buffers[candidate["BLOCK"]] = dbias, dscale, dpad, common
        args = (q, k, v, bias if bias is not None else q, *variant.pointers(q), lse, grad_out,
                delta_v, dq_v, dk_v, dv_v,
                *(t if t is not None else lse for t in (dbias, dscale, dpad, drel)), *common)
        return Launch(_window_attn_bwd_kernel, (runs * blocks, heads), args, meta)

    launch = plan("window attention backward", launch_candidates(head_dim, tokens, backward=True),
                  build)
    launches = [launch]
    if launch.meta["NUM_BLOCKS"] > 1:
        delta_given = out is not None
        meta = {name: value for name, value in launch.meta.items()
                if name not in ("BIAS_GRAD", "SCALE_GRAD", "PAD_GRAD")}
        args = (q, k, v, bias if bias is not None else q, *variant.pointers(q), lse, grad_out,
                dq_v, delta_v, lse if drel is None else drel, *buffers[launch.meta["BLOCK"]][3])
        launches.insert(0, Launch(_window_attn_bwd_dq_kernel, launch.grid, args,
                                  dict(meta, DELTA_GIVEN=delta_given)))
        if delta_given:
            rows = delta.numel()
            launches.insert(0, Launch(_softmax_term_kernel, (triton.cdiv(rows, SOFTMAX_TERM_ROWS),),
                                      (out.contiguous(), grad_out.contiguous(), delta, rows),
                                      dict(D=tile_width(head_dim), HEAD_DIM=head_dim, BLOCK_ROWS=SOFTMAX_TERM_ROWS,
                                           num_warps=4)))
    dbias, dscale, dpad, _ = buffers[launch.meta["BLOCK"]]
    if dbias is not None:
        dbias.zero_()
    return launches, (dq, dk, dv, dbias, dscale, dpad, drel)


def window_attention_backward(grad_out, q, k, v, lse, bias, bias_kind: int, window, shift,
                              scale: Union[float, torch.Tensor], qk_norm: bool, k_pad, v_pad,
                              roll_first: bool, bias_grad: bool, scale_grad: bool, pad_grad: bool,
                              rel_rows: Optional[torch.Tensor] = None,
                              out: Optional[torch.Tensor] = None):
    """Returns (dq, dk, dv, dbias, dscale, dk_pad, dv_pad, drel_rows): dbias the (heads, N, N)
    float32 dense bias gradient, dscale (heads,) and the pad gradients (heads, D) float32, each
    None when not asked for; drel_rows the gradient of ``rel_rows`` (None without). ``out``:
    the forward's output, for delta from dO . O (backward_launch); without it no saved output
    is needed. Partials are summed in a fixed order: deterministic."""
    heads, head_dim = q.shape[-2:]
    if q.numel() == 0:
        tokens = math.prod(window)
        zeros = functools.partial(q.new_zeros, dtype=torch.float32)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                zeros((heads, tokens, tokens)) if bias_grad else None,
                zeros((heads,)) if scale_grad else None,
                *((zeros((heads, head_dim)),) * 2 if pad_grad else (None, None)),
                None if rel_rows is None else torch.zeros_like(rel_rows))
    variant = Variant(scale, qk_norm, k_pad, v_pad, roll_first, rel_rows)
    launches, (dq, dk, dv, dbias, dscale, dpad, drel) = backward_launch(
        grad_out, q, k, v, lse, bias, bias_kind, window, shift, variant, bias_grad,
        scale_grad, pad_grad, out)
    for launch in launches:
        launch.run()
    dpad = (dpad[:, :, 0].sum(0), dpad[:, :, 1].sum(0)) if dpad is not None else (None, None)
    return (dq, dk, dv, dbias.sum(0) if dbias is not None else None,
            dscale.sum(0) if dscale is not None else None, *dpad, drel)
