// Window attention: device helpers both kernel families (SIMT, tensor cores) share: row
// norms for cosine attention, warp reductions, the per-call options and the per-row values
// and gradient partials the options' backward keeps.
#pragma once

#include "geometry.cuh"

namespace ultron {
namespace {

// |row| of dim elements (E: float or a 16-bit type), in float.
template <typename E, typename ToFloat>
__device__ __forceinline__ float row_norm(const E* row, int dim, ToFloat to_float) {
  float sum = 0.f;
  for (int d = 0; d < dim; ++d) {
    const float x = to_float(row[d]);
    sum += x * x;
  }
  return sqrtf(sum);
}

// 1 / max(|row|, eps) of each of n rows (row stride ld), as F.normalize divides by. live: 1
// where |row| >= eps (the norm's derivative is not cut off by the clamp), else 0. One thread
// per row.
template <typename E, typename ToFloat>
__device__ void row_inverse_norms(const E* rows, int ld, int n, int dim, float* inv, float* live,
                                  ToFloat to_float) {
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const float norm = row_norm(rows + t * ld, dim, to_float);
    inv[t] = 1.f / fmaxf(norm, kNormEps);
    live[t] = norm >= kNormEps ? 1.f : 0.f;
  }
}

// The rows scaled by their inverse norms in place (normalised). One thread per row.
template <typename E, typename ToFloat, typename FromFloat>
__device__ void scale_rows(E* rows, int ld, int n, int dim, const float* inv, ToFloat to_float,
                           FromFloat from_float) {
  for (int t = threadIdx.x; t < n; t += blockDim.x)
    for (int d = 0; d < dim; ++d) rows[t * ld + d] = from_float(to_float(rows[t * ld + d]) * inv[t]);
}

__device__ __forceinline__ float float_of(float x) { return x; }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The per-call options every kernel takes: the scale (a (heads,) float tensor, or nullptr for
// one float for every head) and the (heads, D) pad vectors (nullptr without pad_kv).
template <typename T>
struct Options {
  const float* scale;  // (heads,) or nullptr
  float scale_value;   // without a tensor
  const T* k_pad;
  const T* v_pad;
};

template <typename T>
__device__ __forceinline__ float head_scale(const Options<T>& opt, int head) {
  return opt.scale != nullptr ? opt.scale[head] : opt.scale_value;
}

// SAM / ViTDet's decomposed relative position (2D windows): each query's products with the
// rows of both tables, q . rel_pos_h[o] for o < 2wh - 1, then q . rel_pos_w[o], as a
// (B, H, W, heads, R) tensor in q's dtype (R = 2wh - 1 + 2ww - 1, the host makes it
// contiguous), formed by PyTorch before the call. The pair (i, j) adds two of query i's
// entries: at its row offset and at its column offset (rel_row_entry, rel_col_entry). The
// backward's grad has the rows' shape in float32, zero-filled by the host: entry o of query
// i gathers dS_ij over the keys j at that offset, each entry by one owner in a fixed order.
template <typename T>
struct RelPos {
  const T* rows;  // nullptr: no decomposed relative position
  Strides s;      // of rows and of grad
  float* grad;    // backward: the rows' gradient; nullptr in the forward
};

__device__ __forceinline__ int rel_columns(const Geometry& g) { return 2 * g.wh - 1 + 2 * g.ww - 1; }

// In-window tokens i and j (row-major in a wh x ww window): the entry of i's row that their
// row offset selects, and the one their column offset selects.
__device__ __forceinline__ int rel_row_entry(const Geometry& g, int i, int j) {
  return i / g.ww - j / g.ww + g.wh - 1;
}
__device__ __forceinline__ int rel_col_entry(const Geometry& g, int i, int j) {
  return 2 * g.wh - 1 + i % g.ww - j % g.ww + g.ww - 1;
}

// The decomposed bias of the pair (i, j), from query i's row (global T or staged float).
template <typename E>
__device__ __forceinline__ float rel_bias(const E* row, const Geometry& g, int i, int j) {
  return static_cast<float>(row[rel_row_entry(g, i, j)]) + static_cast<float>(row[rel_col_entry(g, i, j)]);
}

// Per-row values the backward keeps for the options (SIMT and tensor-core kernels): the
// inverse norms and 'live' flags of the normalised q and k rows, and sum_j dS_ij C_ij and
// sum_i dS_ij C_ij (C: the q.k products, cosines with qk_norm), which the scale gradient
// and the normalisation's backward need. Six rows of `count` floats.
struct RowExtras {
  float *inv_q, *inv_k, *live_q, *live_k, *dc_q, *dc_k;
  __device__ RowExtras(float* base, int count)
      : inv_q(base), inv_k(base + count), live_q(base + 2 * count), live_k(base + 3 * count),
        dc_q(base + 4 * count), dc_k(base + 5 * count) {}
};

// Through F.normalize: with s = scale * (q^ . k^) + bias and q^ = q / max(|q|, eps),
//   dq = scale * inv_q * (sum_j dS_ij k^_j - live_q * dc_q * q^_i), dk likewise;
// `raw` is the sum over the other operand, `unit` the normalised row's own element.
__device__ __forceinline__ float through_norm(float raw, float unit, float inv, float live, float dc) {
  return inv * (raw - live * dc * unit);
}

// Where the scale and pad-vector gradient partials of one block go.
struct ExtraGrads {
  float* dscale;  // (windows, heads) or nullptr: per window, not per run of windows, so that
                  // no float gathers the rounding of a long run (torch sums them pairwise)
  float* dpad;    // (blocks, heads, 2, D) or nullptr
};

}  // namespace
}  // namespace ultron
