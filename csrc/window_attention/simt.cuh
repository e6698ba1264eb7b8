// Window attention on CUDA cores (SIMT), forward and backward: float32 and the windows the
// tensor-core kernels do not take. One block per run of windows and one head; the window's
// K and V (backward: Q, K, V, dO, P, dS) as float rows in shared memory, plain FMA. Its
// shared-memory loads per FMA make it several times slower than the tensor-core path: the
// fallback, not the fast path.
#pragma once

#include "device_helpers.cuh"

#include <cfloat>

namespace ultron {
namespace {

constexpr int kFwdThreads = 128;
constexpr int kBwdThreads = 256;

// Rows first..first+count-1 of a window -> shared memory (float, row stride head_dim + 1:
// column reads hit distinct banks); padding rows take pad_row (the head's pad vector) when
// given, else zeros, and rows past the window zeros. The defaults load the whole window.
template <bool kVideo, typename T>
__device__ void load_rows(float* dst, const T* src, const Strides& s, const Geometry& g,
                          int64_t window, int head, const T* pad_row = nullptr, int first = 0,
                          int count = -1) {
  const int ld = g.head_dim + 1;
  if (count < 0) count = g.tokens;
  for (int e = threadIdx.x; e < count * g.head_dim; e += blockDim.x) {
    const int t = e / g.head_dim, d = e % g.head_dim;
    const Token tok = token_of<kVideo>(g, window, first + t);
    dst[t * ld + d] = tok.real ? static_cast<float>(src[offset(s, tok, head) + d])
                               : (pad_row != nullptr && tok.inside ? static_cast<float>(pad_row[d]) : 0.f);
  }
}

template <typename T, bool kVideo>
__global__ void __launch_bounds__(kFwdThreads, 8) window_attn_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ out, float* __restrict__ lse,
    Geometry g, Strides sq, Strides sk, Strides sv, Strides so, Strides sl, Options<T> opt, RelPos<T> rel) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int n = g.tokens, dim = g.head_dim, ld = dim + 1;
  float* ks = smem;
  float* vs = ks + n * ld;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  float* probs = vs + n * ld + warp * (n + dim);
  float* qrow = probs + n;
  const int64_t window = blockIdx.x;
  const int head = blockIdx.y;
  const float scale = head_scale(opt, head);
  load_rows<kVideo>(ks, k, sk, g, window, head, g.has_pad ? opt.k_pad + head * dim : nullptr);
  load_rows<kVideo>(vs, v, sv, g, window, head, g.has_pad ? opt.v_pad + head * dim : nullptr);
  __syncthreads();
  if (g.qk_norm) {  // the key rows, normalised in place (the forward keeps no inverse norms)
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      const float inv = 1.f / fmaxf(row_norm(ks + t * ld, dim, float_of), kNormEps);
      for (int d = 0; d < dim; ++d) ks[t * ld + d] *= inv;
    }
    __syncthreads();
  }
  for (int i = warp; i < n; i += warps) {
    const Token ti = token_of<kVideo>(g, window, i);
    if (!ti.real) continue;  // warp-uniform: padded queries have no output
    float sum = 0.f;
    for (int d = lane; d < dim; d += 32) {
      qrow[d] = static_cast<float>(q[offset(sq, ti, head) + d]);
      sum += qrow[d] * qrow[d];
    }
    if (g.qk_norm) {
      const float r = 1.f / fmaxf(sqrtf(warp_sum(sum)), kNormEps);
      for (int d = lane; d < dim; d += 32) qrow[d] *= r;
    }
    __syncwarp();
    const T* rel_row = rel.rows != nullptr ? rel.rows + offset(rel.s, ti, head) : nullptr;
    float row_max = -FLT_MAX;
    for (int j = lane; j < n; j += 32) {
      const Token tj = token_of<kVideo>(g, window, j);
      float s = -INFINITY;
      if (is_key(g, tj) && tj.region == ti.region) {
        float dot = 0.f;
        for (int d = 0; d < dim; ++d) dot += qrow[d] * ks[j * ld + d];
        s = dot * scale + bias_at(bias, bias_kind, g, head, i, j, ti.table, tj.table);
        if (rel_row != nullptr) s += rel_bias(rel_row, g, i, j);
      }
      probs[j] = s;
      row_max = fmaxf(row_max, s);
    }
    row_max = warp_max(row_max);  // -FLT_MAX when every key is masked
    float row_sum = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float p = __expf(probs[j] - row_max);  // exp(-inf) = 0 for masked keys
      probs[j] = p;
      row_sum += p;
    }
    row_sum = warp_sum(row_sum);
    __syncwarp();
    // A row whose every key is masked (a -inf bias) has output 0 and lse -inf, on every
    // backend; its gradients are 0.
    const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;
    for (int d = lane; d < dim; d += 32) {
      float acc = 0.f;
      for (int j = 0; j < n; ++j) acc += probs[j] * vs[j * ld + d];
      out[offset(so, ti, head) + d] = static_cast<T>(acc * inv);
    }
    if (lane == 0) lse[offset(sl, ti, head)] = row_max + logf(row_sum);
    __syncwarp();
  }
}

template <typename T, bool kVideo>
__global__ void __launch_bounds__(kBwdThreads, 3) window_attn_bwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ lse, const T* __restrict__ grad_out,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ dq, T* __restrict__ dk,
    T* __restrict__ dv, float* __restrict__ dbias_partial, Geometry g, Strides sq, Strides sk,
    Strides sv, Strides sl, Strides sdo, Strides sgrad, Options<T> opt,
    ExtraGrads extra, RelPos<T> rel, int64_t windows, int windows_per_block) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int n = g.tokens, dim = g.head_dim, ld = dim + 1, lp = n + 1;
  const bool extras = g.qk_norm || extra.dscale != nullptr;
  float* qs = smem;
  float* ks = qs + n * ld;
  float* vs = ks + n * ld;
  float* dos = vs + n * ld;
  float* ps = dos + n * ld;
  float* dss = ps + n * lp;
  float* dcs = dss + n * lp;          // C_ij, then dS_ij C_ij, n x lp, only with extras
  float* row_lse = dcs + (extras ? n * lp : 0);
  float* row_delta = row_lse + n;
  const RowExtras rx(row_delta + n, n);  // 6n floats, only with extras
  float* dbias = row_delta + n + (extras ? 6 * n : 0);  // n*n, only when dbias_partial != nullptr
  // Each query's decomposed-bias row (rel_columns floats; 0 for padding), with rel_pos.
  float* rel_rows = dbias + (dbias_partial != nullptr ? n * n : 0);
  const int rc = rel.rows != nullptr ? rel_columns(g) : 0;
  // Per token of the window: its packed info (pack_token) and table coordinate, so that the
  // n x n pair loop does no index arithmetic.
  int* infos = reinterpret_cast<int*>(rel_rows + n * rc);
  int* tables = infos + n;
  const int head = blockIdx.y;
  const float scale = head_scale(opt, head);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (dbias_partial != nullptr)
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) dbias[e] = 0.f;
  float dk_pad_run = 0.f, dv_pad_run = 0.f;  // thread d < dim
  const int64_t first = static_cast<int64_t>(blockIdx.x) * windows_per_block;
  const int64_t last = min(first + windows_per_block, windows);
  for (int64_t window = first; window < last; ++window) {
    load_rows<kVideo>(qs, q, sq, g, window, head);
    load_rows<kVideo>(ks, k, sk, g, window, head, g.has_pad ? opt.k_pad + head * dim : nullptr);
    load_rows<kVideo>(vs, v, sv, g, window, head, g.has_pad ? opt.v_pad + head * dim : nullptr);
    load_rows<kVideo>(dos, grad_out, sdo, g, window, head);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {  // per token: lse, packed info, table coordinate
      const Token ti = token_of<kVideo>(g, window, i);
      row_lse[i] = ti.real ? lse[offset(sl, ti, head)] : 0.f;
      infos[i] = pack_token(g, ti);
      tables[i] = ti.table;
    }
    for (int e = threadIdx.x; e < n * rc; e += blockDim.x) {
      const Token ti = token_of<kVideo>(g, window, e / rc);
      rel_rows[e] = ti.real ? static_cast<float>(rel.rows[offset(rel.s, ti, head) + e % rc]) : 0.f;
    }
    __syncthreads();
    if (g.qk_norm) {  // float rows: normalised in place
      row_inverse_norms(qs, ld, n, dim, rx.inv_q, rx.live_q, float_of);
      row_inverse_norms(ks, ld, n, dim, rx.inv_k, rx.live_k, float_of);
      scale_rows(qs, ld, n, dim, rx.inv_q, float_of, float_of);
      scale_rows(ks, ld, n, dim, rx.inv_k, float_of, float_of);
      __syncthreads();
    }
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e % n;
      float p = 0.f, dp = 0.f, c = 0.f;
      if (packed_pair_allowed(infos[i], infos[j])) {
        for (int d = 0; d < dim; ++d) {
          c += qs[i * ld + d] * ks[j * ld + d];
          dp += dos[i * ld + d] * vs[j * ld + d];
        }
        float s = c * scale + bias_at(bias, bias_kind, g, head, i, j, tables[i], tables[j]);
        if (rc > 0) s += rel_bias(rel_rows + i * rc, g, i, j);
        if (s > -INFINITY) p = __expf(s - row_lse[i]);  // a -inf bias masks the pair (lse may be -inf too)
      }
      ps[i * lp + j] = p;
      dss[i * lp + j] = dp;  // dS once delta is known
      if (extras) dcs[i * lp + j] = c;
    }
    __syncthreads();
    // delta_i = sum_j P_ij dP_ij in fp32 (no saved output: its 16-bit rounding would enter
    // the scale gradient's cancelling sum), one warp per row in a fixed order.
    for (int i = warp; i < n; i += warps) {
      float acc = 0.f;
      for (int j = lane; j < n; j += 32) acc += ps[i * lp + j] * dss[i * lp + j];
      acc = warp_sum(acc);
      if (lane == 0) row_delta[i] = acc;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e % n;
      const float ds = ps[i * lp + j] * (dss[i * lp + j] - row_delta[i]);
      dss[i * lp + j] = ds;
      if (extras) dcs[i * lp + j] *= ds;
      if (dbias_partial != nullptr) dbias[e] += ds;  // each (i, j) has one owner thread
    }
    __syncthreads();
    // The decomposed bias rows' gradient: entry o of query t sums dS over the keys of one
    // window row (o < 2wh - 1) or one window column; one thread per entry, in key order.
    for (int e = threadIdx.x; e < n * rc; e += blockDim.x) {
      const int t = e / rc, o = e % rc;
      const Token tt = token_of<kVideo>(g, window, t);
      if (!tt.real) continue;
      const int row_entries = 2 * g.wh - 1;
      const int key_row = t / g.ww - (o - (g.wh - 1));  // of rel_row_entry(g, t, j) == o
      const int key_col = t % g.ww - (o - row_entries - (g.ww - 1));  // of rel_col_entry(g, t, j) == o
      float sum = 0.f;
      if (o < row_entries) {
        if (key_row >= 0 && key_row < g.wh)
          for (int c = 0; c < g.ww; ++c) sum += dss[t * lp + key_row * g.ww + c];
      } else if (key_col >= 0 && key_col < g.ww) {
        for (int r = 0; r < g.wh; ++r) sum += dss[t * lp + r * g.ww + key_col];
      }
      rel.grad[offset(rel.s, tt, head) + o] = sum;
    }
    if (extras) {  // row and column sums of dS * C, each by one thread in a fixed order
      for (int t = threadIdx.x; t < n; t += blockDim.x) {
        float row = 0.f, col = 0.f;
        for (int u = 0; u < n; ++u) {
          row += dcs[t * lp + u];
          col += dcs[u * lp + t];
        }
        rx.dc_q[t] = row;
        rx.dc_k[t] = col;
      }
      __syncthreads();
      if (extra.dscale != nullptr && threadIdx.x == 0) {
        float sum = 0.f;
        for (int t = 0; t < n; ++t) sum += rx.dc_q[t];
        extra.dscale[window * gridDim.y + head] = sum;
      }
    }
    // The gradients of query row t and key row t at column d.
    auto query_grad = [&](int t, int d) {
      float gq = 0.f;
      for (int j = 0; j < n; ++j) gq += dss[t * lp + j] * ks[j * ld + d];
      return scale * (g.qk_norm ? through_norm(gq, qs[t * ld + d], rx.inv_q[t], rx.live_q[t], rx.dc_q[t]) : gq);
    };
    auto key_grads = [&](int t, int d, float& gk, float& gv) {
      gk = 0.f;
      gv = 0.f;
      for (int i = 0; i < n; ++i) {
        gk += dss[i * lp + t] * qs[i * ld + d];
        gv += ps[i * lp + t] * dos[i * ld + d];
      }
      gk = scale * (g.qk_norm ? through_norm(gk, ks[t * ld + d], rx.inv_k[t], rx.live_k[t], rx.dc_k[t]) : gk);
    };
    for (int e = threadIdx.x; e < n * dim; e += blockDim.x) {
      const int t = e / dim, d = e % dim;
      const Token tt = token_of<kVideo>(g, window, t);
      if (!tt.real) continue;
      float gk, gv;
      key_grads(t, d, gk, gv);
      const int64_t o = offset(sgrad, tt, head) + d;
      dq[o] = static_cast<T>(query_grad(t, d));
      dk[o] = static_cast<T>(gk);
      dv[o] = static_cast<T>(gv);
    }
    if (extra.dpad != nullptr && threadIdx.x < dim) {  // padding keys all hold the pad vectors
      for (int t = 0; t < n; ++t) {
        const Token tt = token_of<kVideo>(g, window, t);
        if (tt.real || !tt.inside) continue;
        float gk, gv;
        key_grads(t, threadIdx.x, gk, gv);
        dk_pad_run += gk;
        dv_pad_run += gv;
      }
    }
    __syncthreads();
  }
  const int64_t partial = static_cast<int64_t>(blockIdx.x) * gridDim.y + head;
  if (dbias_partial != nullptr) {
    float* dst = dbias_partial + partial * n * n;
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) dst[e] = dbias[e];
  }
  if (extra.dpad != nullptr && threadIdx.x < dim) {
    extra.dpad[partial * 2 * dim + threadIdx.x] = dk_pad_run;
    extra.dpad[partial * 2 * dim + dim + threadIdx.x] = dv_pad_run;
  }
}

}  // namespace
}  // namespace ultron
