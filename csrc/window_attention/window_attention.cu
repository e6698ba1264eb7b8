// Window attention (Swin W-MSA / SW-MSA), forward and backward, one thread block per
// (window, head).
//
// fp16/bf16, windows of up to 128 tokens (7x7 and 8x8 included): tensor cores (wmma
// 16x16x16), forward and backward. The window's Q, K, V sit in shared memory (padded to a multiple of 16
// tokens), S = Q K^T and O = P V are wmma tiles spread over the warps, the softmax is one
// warp per row in between. A SIMT path (K, V in shared memory as float, plain FMA) serves
// float32 and larger windows: its shared-memory loads per FMA make it several times slower
// than the tensor-core path, so it is the fallback, not the fast path.
// Padding, the cyclic shift, the region mask and the relative-position-bias gather are index
// arithmetic; q/k/v are read through their strides (views of a packed qkv tensor).
// Backward: each block owns a run of windows for one head and accumulates the bias gradient
// of the run in shared memory; runs are summed by at::sum: deterministic, no atomics.
// Options for the models people run: a per-head scale (with its gradient), cosine attention
// (q and k rows normalised in shared memory after loading: no normalised copy in global
// memory), padded keys that take per-head vectors (with their gradients) and timm's
// roll-then-pad order. The scale and pad-vector gradients are per-block partials too.
#include "../common.cuh"

#include <cfloat>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace ultron {
namespace {

constexpr int kFwdThreads = 128;
constexpr int kBwdThreads = 256;
constexpr int kBiasTable = 1;
constexpr int kBiasDense = 2;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps (Swin V2's cosine attention)

struct Geometry {
  int H, W, Hp, Wp, win_h, win_w, wh, ww, sh, sw, tokens, head_dim, heads;
  bool roll_first;  // timm: the image is rolled, then padded (else padded, then rolled)
  bool has_pad;     // padding tokens are keys with the head's pad vectors (else excluded)
  bool qk_norm;     // cosine attention
};

struct Strides {
  int64_t b, h, w, n;
};

struct Token {
  int64_t batch;
  int y, x, r, c, region;
  bool real;    // an image position: a query, and a key
  bool inside;  // inside the window (t < tokens): padding when not real
};

__device__ __forceinline__ Token token_of(const Geometry& g, int64_t window, int t) {
  Token tok;
  const int64_t per_image = static_cast<int64_t>(g.win_h) * g.win_w;
  tok.batch = window / per_image;
  const int local = static_cast<int>(window % per_image);
  tok.r = t / g.ww;
  tok.c = t % g.ww;
  const int y_rolled = (local / g.win_w) * g.wh + tok.r;
  const int x_rolled = (local % g.win_w) * g.ww + tok.c;
  tok.inside = t < g.tokens;
  if (g.roll_first) {  // undo torch.roll(-shift) of the image, padded after the roll
    tok.y = (y_rolled + g.sh) % g.H;
    tok.x = (x_rolled + g.sw) % g.W;
    tok.real = tok.inside && y_rolled < g.H && x_rolled < g.W;
  } else {             // undo torch.roll(-shift) of the padded grid
    tok.y = (y_rolled + g.sh) % g.Hp;
    tok.x = (x_rolled + g.sw) % g.Wp;
    tok.real = tok.inside && tok.y < g.H && tok.x < g.W;
  }
  const int ry = g.sh > 0 ? (y_rolled >= g.Hp - g.wh) + (y_rolled >= g.Hp - g.sh) : 0;
  const int rx = g.sw > 0 ? (x_rolled >= g.Wp - g.ww) + (x_rolled >= g.Wp - g.sw) : 0;
  tok.region = ry * 3 + rx;
  return tok;
}

__device__ __forceinline__ int64_t offset(const Strides& s, const Token& t, int head) {
  return t.batch * s.b + t.y * s.h + t.x * s.w + head * s.n;
}

// Whether the token is a key: an image position, or padding with pad vectors.
__device__ __forceinline__ bool is_key(const Geometry& g, const Token& t) {
  return g.has_pad ? t.inside : t.real;
}

// 1 / max(|row|, eps) of each of n rows (row stride ld, dim elements; E: float or a 16-bit
// type), as F.normalize divides by. live: 1 where |row| >= eps (the norm's derivative is not
// cut off by the clamp), else 0. One thread per row.
template <typename E, typename ToFloat>
__device__ void row_inverse_norms(const E* rows, int ld, int n, int dim, float* inv, float* live,
                                  ToFloat to_float) {
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    float sum = 0.f;
    for (int d = 0; d < dim; ++d) {
      const float x = to_float(rows[t * ld + d]);
      sum += x * x;
    }
    const float norm = sqrtf(sum);
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

// Bias of the in-window token pair (i, j), both < tokens, at window rows/cols (ri, ci) and
// (rj, cj). bias is float: a (T, heads) table or a (heads, N, N) dense tensor, both
// contiguous. It does not depend on the window.
__device__ __forceinline__ float bias_at(const float* bias, int kind, const Geometry& g, int head,
                                         int i, int j, int ri, int ci, int rj, int cj) {
  if (kind == kBiasTable) {
    const int entry = (ri - rj + g.wh - 1) * (2 * g.ww - 1) + (ci - cj + g.ww - 1);
    return bias[entry * g.heads + head];
  }
  if (kind == kBiasDense) return bias[(static_cast<int64_t>(head) * g.tokens + i) * g.tokens + j];
  return 0.f;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A window's rows -> shared memory (float); padding rows take pad_row (the head's pad
// vector) when given, else zeros.
template <typename T>
__device__ void load_rows(float* dst, const T* src, const Strides& s, const Geometry& g,
                          int64_t window, int head, const T* pad_row = nullptr) {
  const int ld = g.head_dim + 1;  // +1 float per row: column reads hit distinct banks
  for (int e = threadIdx.x; e < g.tokens * g.head_dim; e += blockDim.x) {
    const int t = e / g.head_dim, d = e % g.head_dim;
    const Token tok = token_of(g, window, t);
    dst[t * ld + d] = tok.real ? static_cast<float>(src[offset(s, tok, head) + d])
                               : (pad_row != nullptr ? static_cast<float>(pad_row[d]) : 0.f);
  }
}

// The per-call options every kernel takes: the (heads,) float scale and the (heads, D) pad
// vectors (nullptr without pad_kv).
template <typename T>
struct Options {
  const float* scale;
  const T* k_pad;
  const T* v_pad;
};

template <typename T>
__global__ void __launch_bounds__(kFwdThreads, 8) window_attn_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ out, float* __restrict__ lse,
    Geometry g, Strides sq, Strides sk, Strides sv, Strides so, Strides sl, Options<T> opt) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int n = g.tokens, dim = g.head_dim, ld = dim + 1;
  float* ks = smem;
  float* vs = ks + n * ld;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  float* probs = vs + n * ld + warp * (n + dim);
  float* qrow = probs + n;
  const int64_t window = blockIdx.x;
  const int head = blockIdx.y;
  const float scale = opt.scale[head];
  load_rows(ks, k, sk, g, window, head, g.has_pad ? opt.k_pad + head * dim : nullptr);
  load_rows(vs, v, sv, g, window, head, g.has_pad ? opt.v_pad + head * dim : nullptr);
  __syncthreads();
  if (g.qk_norm) {  // the key rows, normalised in place
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      float sum = 0.f;
      for (int d = 0; d < dim; ++d) sum += ks[t * ld + d] * ks[t * ld + d];
      const float r = 1.f / fmaxf(sqrtf(sum), kNormEps);
      for (int d = 0; d < dim; ++d) ks[t * ld + d] *= r;
    }
    __syncthreads();
  }
  for (int i = warp; i < n; i += warps) {
    const Token ti = token_of(g, window, i);
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
    float row_max = -FLT_MAX;
    for (int j = lane; j < n; j += 32) {
      const Token tj = token_of(g, window, j);
      float s = -INFINITY;
      if (is_key(g, tj) && tj.region == ti.region) {
        float dot = 0.f;
        for (int d = 0; d < dim; ++d) dot += qrow[d] * ks[j * ld + d];
        s = dot * scale + bias_at(bias, bias_kind, g, head, i, j, ti.r, ti.c, tj.r, tj.c);
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

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) window_attn_bwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ out, const float* __restrict__ lse, const T* __restrict__ grad_out,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ dq, T* __restrict__ dk,
    T* __restrict__ dv, float* __restrict__ dbias_partial, Geometry g, Strides sq, Strides sk,
    Strides sv, Strides so, Strides sl, Strides sdo, Strides sgrad, Options<T> opt,
    ExtraGrads extra, int64_t windows, int windows_per_block) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int n = g.tokens, dim = g.head_dim, ld = dim + 1, lp = n + 1;
  const bool extras = g.qk_norm || extra.dscale != nullptr;
  float* qs = smem;
  float* ks = qs + n * ld;
  float* vs = ks + n * ld;
  float* dos = vs + n * ld;
  float* ps = dos + n * ld;
  float* dss = ps + n * lp;
  float* dcs = dss + n * lp;          // dS_ij C_ij, n x lp, only with extras
  float* row_lse = dcs + (extras ? n * lp : 0);
  float* row_delta = row_lse + n;
  const RowExtras rx(row_delta + n, n);  // 6n floats, only with extras
  float* dbias = row_delta + n + (extras ? 6 * n : 0);  // n*n, only when dbias_partial != nullptr
  const int head = blockIdx.y;
  const float scale = opt.scale[head];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (dbias_partial != nullptr)
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) dbias[e] = 0.f;
  float dk_pad_run = 0.f, dv_pad_run = 0.f;  // thread d < dim
  const int64_t first = static_cast<int64_t>(blockIdx.x) * windows_per_block;
  const int64_t last = min(first + windows_per_block, windows);
  for (int64_t window = first; window < last; ++window) {
    load_rows(qs, q, sq, g, window, head);
    load_rows(ks, k, sk, g, window, head, g.has_pad ? opt.k_pad + head * dim : nullptr);
    load_rows(vs, v, sv, g, window, head, g.has_pad ? opt.v_pad + head * dim : nullptr);
    load_rows(dos, grad_out, sdo, g, window, head);
    for (int i = warp; i < n; i += warps) {  // delta_i = dO_i . O_i
      const Token ti = token_of(g, window, i);
      float acc = 0.f;
      if (ti.real)
        for (int d = lane; d < dim; d += 32)
          acc += static_cast<float>(grad_out[offset(sdo, ti, head) + d]) *
                 static_cast<float>(out[offset(so, ti, head) + d]);
      acc = warp_sum(acc);
      if (lane == 0) {
        row_delta[i] = acc;
        row_lse[i] = ti.real ? lse[offset(sl, ti, head)] : 0.f;
      }
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
      const Token ti = token_of(g, window, i), tj = token_of(g, window, j);
      float p = 0.f, ds = 0.f, c = 0.f;
      if (ti.real && is_key(g, tj) && ti.region == tj.region) {
        float dp = 0.f;
        for (int d = 0; d < dim; ++d) {
          c += qs[i * ld + d] * ks[j * ld + d];
          dp += dos[i * ld + d] * vs[j * ld + d];
        }
        const float s = c * scale + bias_at(bias, bias_kind, g, head, i, j, ti.r, ti.c, tj.r, tj.c);
        if (s > -INFINITY) {  // a -inf bias masks the pair (lse may be -inf too)
          p = __expf(s - row_lse[i]);
          ds = p * (dp - row_delta[i]);
        }
      }
      ps[i * lp + j] = p;
      dss[i * lp + j] = ds;
      if (extras) dcs[i * lp + j] = ds * c;
      if (dbias_partial != nullptr) dbias[e] += ds;  // each (i, j) has one owner thread
    }
    __syncthreads();
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
      const Token tt = token_of(g, window, t);
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
        const Token tt = token_of(g, window, t);
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

// ------------------------------------------------------------------ tensor-core forward

constexpr int kTcThreads = 128;
constexpr int kTcMaxTokens = 128;

// The CUDA type wmma takes for a c10 16-bit type, and float -> it.
template <typename T>
struct Native;
template <>
struct Native<at::Half> {
  using type = __half;
  static __device__ __forceinline__ type from(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to(type v) { return __half2float(v); }
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to(type v) { return __bfloat162float(v); }
};

// Shared-memory layout of the tensor-core kernels (regions the forward does not use have size
// 0). Rows are padded (16-bit tiles by 8 elements, float tiles by 4) so that wmma's row
// accesses spread over the banks; every region and every 16x16 tile starts on a 32-byte
// boundary, as wmma requires.
struct TcLayout {
  int np, ld16, ldf, ldh, ldo;
  size_t q, k, v, dout, s, dp, p, ds, stage, bias, dbias, info, extras, rows, bytes;
};

// extras: the six RowExtras rows (the options' backward, or the forward's inverse norms).
__host__ __device__ inline TcLayout tc_layout(int tokens, int dim, bool backward, bool has_bias,
                                              bool bias_grad, bool extras) {
  TcLayout l;
  l.np = (tokens + 15) / 16 * 16;
  l.ld16 = dim + 8;   // Q, K, V, dO (16-bit)
  l.ldf = l.np + 4;   // S, dP (float)
  l.ldh = l.np + 8;   // P, dS (16-bit)
  l.ldo = dim + 4;    // the float staging tile of O, dV, dK, dQ
  const size_t np = l.np, rows16 = np * l.ld16 * 2;
  size_t off = 0;
  auto take = [&off](size_t bytes) { const size_t at = off; off += (bytes + 127) / 128 * 128; return at; };
  l.q = take(rows16);
  l.k = take(rows16);
  l.v = take(rows16);
  l.dout = take(backward ? rows16 : 0);
  // S, and once it is consumed, the float staging tile of O / dV / dK / dQ (same region).
  l.s = take(np * (l.ldf > l.ldo ? l.ldf : l.ldo) * 4);
  l.stage = l.s;
  l.dp = take(backward ? np * l.ldf * 4 : 0);
  l.p = take(np * l.ldh * 2);
  l.ds = take(backward ? np * l.ldh * 2 : 0);
  l.bias = take(has_bias ? size_t(tokens) * tokens * 4 : 0);  // staged once per block
  l.dbias = take(backward && bias_grad ? size_t(tokens) * tokens * 4 : 0);
  l.info = take(np * 4 * 3);                  // token region + two floats per row
  l.extras = take(extras ? np * 4 * 6 : 0);
  l.rows = take(np * 8 * (backward ? 6 : 4));  // row offsets: q, k, v, out | q, k, v, dO, out, grads
  l.bytes = off;
  return l;
}

// Pointers to the regions of a TcLayout in a block's shared memory (NT: the 16-bit type).
template <typename NT>
struct TcTiles {
  NT *q, *k, *v, *dout, *p, *ds;
  float *s, *dp, *stage, *bias, *dbias, *row_a, *row_b;  // row_a/b: two floats per row
  float* extras;
  int* info;
  int64_t* rows;
  __device__ TcTiles(unsigned char* base, const TcLayout& L, bool has_bias)
      : q(reinterpret_cast<NT*>(base + L.q)), k(reinterpret_cast<NT*>(base + L.k)),
        v(reinterpret_cast<NT*>(base + L.v)), dout(reinterpret_cast<NT*>(base + L.dout)),
        p(reinterpret_cast<NT*>(base + L.p)), ds(reinterpret_cast<NT*>(base + L.ds)),
        s(reinterpret_cast<float*>(base + L.s)), dp(reinterpret_cast<float*>(base + L.dp)),
        stage(reinterpret_cast<float*>(base + L.stage)),
        bias(has_bias ? reinterpret_cast<float*>(base + L.bias) : nullptr),
        dbias(reinterpret_cast<float*>(base + L.dbias)),
        row_a(reinterpret_cast<float*>(base + L.info) + L.np),
        row_b(reinterpret_cast<float*>(base + L.info) + 2 * L.np),
        extras(reinterpret_cast<float*>(base + L.extras)),
        info(reinterpret_cast<int*>(base + L.info)), rows(reinterpret_cast<int64_t*>(base + L.rows)) {}
};

// Token info in one int: -1 for no key (outside the window, or padding the op excludes),
// the token's shift region for an image token, region + kPadKey for padding that is a key
// (pad_kv) but no query.
constexpr int kPadKey = 16;
__device__ __forceinline__ int pack_token(const Geometry& g, const Token& t) {
  if (t.real) return t.region;
  return g.has_pad && t.inside ? t.region + kPadKey : -1;
}

// Score of the pair (i, j) from its raw Q.K product: scaled and biased (bias: the staged
// n x n tile, or nullptr), or -inf where the shifted-window mask forbids it, i is no query
// or j no key (ti, tj: token info; i, j >= n are neither, so the tile is only read inside).
__device__ __forceinline__ float packed_score(float qk, float scale, const float* bias, int n,
                                              int i, int j, int ti, int tj) {
  if (ti < 0 || ti >= kPadKey || tj < 0 || ti != tj % kPadKey) return -INFINITY;
  return qk * scale + (bias != nullptr ? bias[i * n + j] : 0.f);
}

// The bias of every token pair (n x n), staged once per block: it is the same for every
// window, and the gather from a table would otherwise cost one scattered load per score.
__device__ void stage_bias(float* dst, const float* bias, int kind, const Geometry& g, int head) {
  const int n = g.tokens;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e % n;
    dst[e] = bias_at(bias, kind, g, head, i, j, i / g.ww, i % g.ww, j / g.ww, j % g.ww);
  }
}

// Per window, once per token: its packed info and the element offset of its row in each of
// `count` tensors (-1 for padding). The copy loops below then need no index arithmetic.
__device__ void token_rows(const Geometry& g, int64_t window, int head, int np, int* info,
                           int64_t* rows, const Strides* strides, int count) {
  for (int t = threadIdx.x; t < np; t += blockDim.x) {
    const Token tok = token_of(g, window, t);
    info[t] = pack_token(g, tok);
    for (int i = 0; i < count; ++i) rows[i * np + t] = tok.real ? offset(strides[i], tok, head) : -1;
  }
}

// Rows of a window -> shared memory (16-bit, row stride ld); padding rows take pad_row (the
// head's pad vector; info says which rows are padding keys) when given, else zeros. `vec`:
// every row starts on 16 bytes, so 8 elements move as one 16-byte cp.async, bits unchanged;
// the caller completes them with finish_tile_loads. Any head_dim that is a multiple of 16.
template <typename T, typename NT>
__device__ void load_tile(NT* dst, int ld, const T* src, const int64_t* rows, int np, int dim,
                          bool vec, const T* pad_row = nullptr, const int* info = nullptr) {
  if (vec) {
    const int chunks = dim / 8;
    for (int e = threadIdx.x; e < np * chunks; e += blockDim.x) {
      const int t = e / chunks, c = (e - t * chunks) * 8;
      if (rows[t] >= 0) {
        cp_async_16(dst + t * ld + c, src + rows[t] + c);
      } else if (pad_row != nullptr && info[t] >= kPadKey) {
        cp_async_16(dst + t * ld + c, pad_row + c);
      } else {
        *reinterpret_cast<uint4*>(dst + t * ld + c) = make_uint4(0, 0, 0, 0);
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < np * dim; e += blockDim.x) {
    const int t = e / dim, d = e - t * dim;
    const bool pad = rows[t] < 0 && pad_row != nullptr && info[t] >= kPadKey;
    dst[t * ld + d] = Native<T>::from(rows[t] >= 0 ? static_cast<float>(src[rows[t] + d])
                                      : pad ? static_cast<float>(pad_row[d]) : 0.f);
  }
}

// Cosine attention on the 16-bit tiles: the inverse norms of the q and k rows (the scores
// are the raw products times both, in float: no rounding of a normalised tile there) ...
template <typename T, typename NT>
__device__ void tile_inverse_norms(const NT* qs, const NT* ks, int ld, int np, int dim, const RowExtras& rx) {
  auto to_float = [](NT x) { return Native<T>::to(x); };
  row_inverse_norms(qs, ld, np, dim, rx.inv_q, rx.live_q, to_float);
  row_inverse_norms(ks, ld, np, dim, rx.inv_k, rx.live_k, to_float);
}

// ... and, for the backward's dQ = dS K^ and dK = dS^T Q^, the tiles normalised in place.
template <typename T, typename NT>
__device__ void normalize_tiles(NT* qs, NT* ks, int ld, int np, int dim, const RowExtras& rx) {
  auto to_float = [](NT x) { return Native<T>::to(x); };
  auto from_float = [](float x) { return Native<T>::from(x); };
  scale_rows(qs, ld, np, dim, rx.inv_q, to_float, from_float);
  scale_rows(ks, ld, np, dim, rx.inv_k, to_float, from_float);
}

// Completes this thread's load_tile copies; a __syncthreads must follow before any thread
// reads the tiles.
__device__ __forceinline__ void finish_tile_loads() {
  cp_async_commit();
  cp_async_wait<0>();
}

// Float rows in shared memory (row stride ld) times factor / row_div[t] -> T rows.
template <typename T>
__device__ void store_tile(T* dst, const int64_t* rows, const float* src, int ld,
                           const float* row_div, float factor, int np, int dim, bool vec) {
  const int width = vec ? 8 : 1, chunks = dim / width;
  for (int e = threadIdx.x; e < np * chunks; e += blockDim.x) {
    const int t = e / chunks, c = (e - t * chunks) * width;
    if (rows[t] < 0) continue;
    // A row whose every key is masked has row_div 0: its output is 0 (see the forward).
    const float f = row_div == nullptr ? factor : (row_div[t] > 0.f ? factor / row_div[t] : 0.f);
    if (vec) {
      union {
        uint4 bits;
        T h[8];
      } pack;
#pragma unroll
      for (int u = 0; u < 8; ++u) pack.h[u] = static_cast<T>(src[t * ld + c + u] * f);
      *reinterpret_cast<uint4*>(dst + rows[t] + c) = pack.bits;
    } else {
      dst[rows[t] + c] = static_cast<T>(src[t * ld + c] * f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads) window_attn_fwd_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ out, float* __restrict__ lse,
    Geometry g, Strides sq, Strides sk, Strides sv, Strides so, Options<T> opt, int64_t windows,
    int windows_per_block, bool vec) {
  // Block (run, head) takes windows [run * windows_per_block, ...) of one head.
  // out and lse are contiguous (this op allocates them): lse index = out row offset / D.
#if ULTRON_TENSOR_CORE_BODY
  using namespace nvcuda;
  using NT = typename Native<T>::type;
  ULTRON_DYNAMIC_SMEM(unsigned char, smem_raw);
  const bool has_bias = bias != nullptr;
  const TcLayout L = tc_layout(g.tokens, g.head_dim, false, has_bias, false, g.qk_norm);
  const TcTiles<NT> t(smem_raw, L, has_bias);
  const RowExtras rx(t.extras, L.np);
  NT *qs = t.q, *ks = t.k, *vs = t.v, *ps = t.p;
  float *ss = t.s, *os = t.stage, *bias_s = t.bias, *row_max = t.row_a, *row_sum = t.row_b;
  int* info = t.info;
  int64_t* rows = t.rows;
  const int head = blockIdx.y, dim = g.head_dim;
  const float scale = opt.scale[head];
  const T* k_pad = g.has_pad ? opt.k_pad + head * dim : nullptr;
  const T* v_pad = g.has_pad ? opt.v_pad + head * dim : nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const Strides strides[4] = {sq, sk, sv, so};
  const int64_t* out_rows = rows + 3 * L.np;
  const int tiles = L.np / 16, dtiles = dim / 16;
  if (has_bias) stage_bias(bias_s, bias, bias_kind, g, head);  // read after a barrier below

  const int64_t first = static_cast<int64_t>(blockIdx.x) * windows_per_block;
  const int64_t last = min(first + windows_per_block, windows);
  for (int64_t window = first; window < last; ++window) {
    token_rows(g, window, head, L.np, info, rows, strides, 4);
    __syncthreads();
    load_tile(qs, L.ld16, q, rows, L.np, dim, vec);
    load_tile(ks, L.ld16, k, rows + L.np, L.np, dim, vec, k_pad, info);
    load_tile(vs, L.ld16, v, rows + 2 * L.np, L.np, dim, vec, v_pad, info);
    finish_tile_loads();
    __syncthreads();
    // Read after the barrier that follows S (the matmul only reads the tiles too).
    if (g.qk_norm) tile_inverse_norms<T>(qs, ks, L.ld16, L.np, dim, rx);

    for (int tile = warp; tile < tiles * tiles; tile += warps) {  // S = Q K^T
      const int a = tile / tiles, b = tile % tiles;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < dim; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::col_major> fb;  // K^T
        wmma::load_matrix_sync(fa, qs + 16 * a * L.ld16 + kk, L.ld16);
        wmma::load_matrix_sync(fb, ks + 16 * b * L.ld16 + kk, L.ld16);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(ss + 16 * a * L.ldf + 16 * b, acc, L.ldf, wmma::mem_row_major);
    }
    __syncthreads();

    for (int i = warp; i < L.np; i += warps) {  // softmax, one warp per row; P unnormalised
      const int ti = info[i];
      float m = -FLT_MAX;
      for (int j = lane; j < L.np; j += 32) {
        const float c = g.qk_norm ? ss[i * L.ldf + j] * rx.inv_q[i] * rx.inv_k[j] : ss[i * L.ldf + j];
        const float s = packed_score(c, scale, bias_s, g.tokens, i, j, ti, info[j]);
        ss[i * L.ldf + j] = s;
        m = fmaxf(m, s);
      }
      m = warp_max(m);
      float l = 0.f;
      for (int j = lane; j < L.np; j += 32) {
        const float p = ti >= 0 ? __expf(ss[i * L.ldf + j] - m) : 0.f;  // masked: exp(-inf) = 0
        ps[i * L.ldh + j] = Native<T>::from(p);
        l += p;
      }
      l = warp_sum(l);
      if (lane == 0) {
        row_max[i] = m;
        row_sum[i] = l;
      }
    }
    __syncthreads();

    for (int tile = warp; tile < tiles * dtiles; tile += warps) {  // O = P V
      const int a = tile / dtiles, c = tile % dtiles;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < L.np; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, ps + 16 * a * L.ldh + kk, L.ldh);
        wmma::load_matrix_sync(fb, vs + kk * L.ld16 + 16 * c, L.ld16);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(os + 16 * a * L.ldo + 16 * c, acc, L.ldo, wmma::mem_row_major);
    }
    __syncthreads();

    store_tile(out, out_rows, os, L.ldo, row_sum, 1.f, L.np, dim, vec);
    for (int t = threadIdx.x; t < L.np; t += blockDim.x)
      if (out_rows[t] >= 0) lse[out_rows[t] / dim] = row_max[t] + logf(row_sum[t]);
    __syncthreads();  // the next window rewrites rows, info and the tiles
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture without bf16 wmma: never launched (kernel_ptx_version)
#endif
}

// Backward on tensor cores (fp16/bf16, windows <= 128 tokens): per window, S = QK^T and
// dP = dO V^T (wmma), P and dS elementwise (fp32, the run's bias gradient accumulated
// there), then dV = P^T dO, dK = dS^T Q, dQ = dS K (wmma, P and dS rounded to 16 bits as in
// FlashAttention), each staged through one float tile before it is written.
constexpr int kTcBwdThreads = 256;

#if ULTRON_TENSOR_CORE_BODY
// C (np x dim, float, staged) = op(A) B over the window: A is np x np (16-bit, row-major, or
// its transpose when A_TRANSPOSED), B is np x dim (16-bit, row-major).
template <typename NT, bool A_TRANSPOSED>
__device__ void tc_matmul_to_stage(const NT* a, int lda, const NT* b, int ldb, float* stage,
                                   int ldo, int np, int dim) {
  using namespace nvcuda;
  using ALayout = typename std::conditional<A_TRANSPOSED, wmma::col_major, wmma::row_major>::type;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int dtiles = dim / 16;
  for (int tile = warp; tile < (np / 16) * dtiles; tile += warps) {
    const int row = tile / dtiles, col = tile % dtiles;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < np; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, ALayout> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::row_major> fb;
      // op(A)[row block, kk block]: A itself at (16*row, kk), or A^T, stored as A at (kk, 16*row).
      wmma::load_matrix_sync(fa, A_TRANSPOSED ? a + kk * lda + 16 * row : a + 16 * row * lda + kk, lda);
      wmma::load_matrix_sync(fb, b + kk * ldb + 16 * col, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(stage + 16 * row * ldo + 16 * col, acc, ldo, wmma::mem_row_major);
  }
}
#endif

template <typename T>
__global__ void __launch_bounds__(kTcBwdThreads, 2) window_attn_bwd_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ out, const float* __restrict__ lse, const T* __restrict__ grad_out,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ dq, T* __restrict__ dk,
    T* __restrict__ dv, float* __restrict__ dbias_partial, Geometry g, Strides sq, Strides sk,
    Strides sv, Strides so, Strides sdo, Strides sgrad, Options<T> opt, ExtraGrads extra,
    int64_t windows, int windows_per_block, bool vec) {
  // out and lse are the contiguous forward outputs: lse index = out row offset / D.
#if ULTRON_TENSOR_CORE_BODY
  using namespace nvcuda;
  using NT = typename Native<T>::type;
  ULTRON_DYNAMIC_SMEM(unsigned char, smem_raw);
  const bool bias_grad = dbias_partial != nullptr, has_bias = bias != nullptr;
  const bool extras = g.qk_norm || extra.dscale != nullptr;
  const TcLayout L = tc_layout(g.tokens, g.head_dim, true, has_bias, bias_grad, extras);
  const TcTiles<NT> t(smem_raw, L, has_bias);
  const RowExtras rx(t.extras, L.np);
  NT *qs = t.q, *ks = t.k, *vs = t.v, *dos = t.dout, *ps = t.p, *dss = t.ds;
  float *ss = t.s, *dps = t.dp, *stage = t.stage, *dbias = t.dbias, *bias_s = t.bias;
  float *row_lse = t.row_a, *row_delta = t.row_b;
  int* info = t.info;
  int64_t* rows = t.rows;
  const int head = blockIdx.y, n = g.tokens, dim = g.head_dim, np = L.np;
  const float scale = opt.scale[head];
  const T* k_pad = g.has_pad ? opt.k_pad + head * dim : nullptr;
  const T* v_pad = g.has_pad ? opt.v_pad + head * dim : nullptr;
  float dk_pad_run = 0.f, dv_pad_run = 0.f;  // thread d < dim
  const Strides strides[6] = {sq, sk, sv, sdo, so, sgrad};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (bias_grad)
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) dbias[e] = 0.f;
  if (has_bias) stage_bias(bias_s, bias, bias_kind, g, head);  // read after a barrier below
  const int64_t first = static_cast<int64_t>(blockIdx.x) * windows_per_block;
  const int64_t last = min(first + windows_per_block, windows);
  for (int64_t window = first; window < last; ++window) {
    token_rows(g, window, head, np, info, rows, strides, 6);
    __syncthreads();
    load_tile(qs, L.ld16, q, rows, np, dim, vec);
    load_tile(ks, L.ld16, k, rows + np, np, dim, vec, k_pad, info);
    load_tile(vs, L.ld16, v, rows + 2 * np, np, dim, vec, v_pad, info);
    load_tile(dos, L.ld16, grad_out, rows + 3 * np, np, dim, vec);
    const int64_t* out_rows = rows + 4 * np;
    for (int i = warp; i < np; i += warps) {  // delta_i = dO_i . O_i, and lse_i
      const int64_t row = out_rows[i], grad_row = rows[3 * np + i];
      float acc = 0.f;
      if (row >= 0)
        for (int d = lane; d < dim; d += 32)
          acc += static_cast<float>(grad_out[grad_row + d]) * static_cast<float>(out[row + d]);
      acc = warp_sum(acc);
      if (lane == 0) {
        row_delta[i] = acc;
        row_lse[i] = row >= 0 ? lse[row / dim] : 0.f;
      }
    }
    finish_tile_loads();  // the copies overlapped the loop above
    __syncthreads();
    // Read after the barrier that follows S and dP (the matmuls only read the tiles too).
    if (g.qk_norm) tile_inverse_norms<T>(qs, ks, L.ld16, np, dim, rx);

    const int tiles = np / 16;
    for (int tile = warp; tile < 2 * tiles * tiles; tile += warps) {  // S = QK^T, dP = dO V^T
      const bool is_dp = tile >= tiles * tiles;
      const int a = (tile % (tiles * tiles)) / tiles, b = tile % tiles;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < dim; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, (is_dp ? dos : qs) + 16 * a * L.ld16 + kk, L.ld16);
        wmma::load_matrix_sync(fb, (is_dp ? vs : ks) + 16 * b * L.ld16 + kk, L.ld16);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync((is_dp ? dps : ss) + 16 * a * L.ldf + 16 * b, acc, L.ldf,
                              wmma::mem_row_major);
    }
    __syncthreads();

    for (int e = threadIdx.x; e < np * np; e += blockDim.x) {  // P, dS; bias gradient
      const int i = e / np, j = e % np;
      const float c = g.qk_norm ? ss[i * L.ldf + j] * rx.inv_q[i] * rx.inv_k[j] : ss[i * L.ldf + j];
      const float s = packed_score(c, scale, bias_s, n, i, j, info[i], info[j]);
      float p = 0.f, ds = 0.f;
      if (s > -INFINITY) {
        p = __expf(s - row_lse[i]);
        ds = p * (dps[i * L.ldf + j] - row_delta[i]);
      }
      ps[i * L.ldh + j] = Native<T>::from(p);
      dss[i * L.ldh + j] = Native<T>::from(ds);
      if (extras) ss[i * L.ldf + j] = ds * c;  // this thread's own (i, j): read just above
      if (bias_grad && i < n && j < n) dbias[i * n + j] += ds;  // one owner thread per (i, j)
    }
    __syncthreads();
    if (extras) {  // row and column sums of dS * C, each by one thread in a fixed order
      for (int r = threadIdx.x; r < np; r += blockDim.x) {
        float row = 0.f, col = 0.f;
        for (int u = 0; u < np; ++u) {
          row += ss[r * L.ldf + u];
          col += ss[u * L.ldf + r];
        }
        rx.dc_q[r] = row;
        rx.dc_k[r] = col;
      }
      if (g.qk_norm) normalize_tiles<T>(qs, ks, L.ld16, np, dim, rx);  // not read since S
      __syncthreads();  // the matmuls below overwrite ss (the staging tile)
      if (extra.dscale != nullptr && threadIdx.x == 0) {
        float sum = 0.f;
        for (int r = 0; r < np; ++r) sum += rx.dc_q[r];
        extra.dscale[window * gridDim.y + head] = sum;
      }
    }

    // dV = P^T dO, dK = scale * dS^T Q, dQ = scale * dS K; each staged, then written.
    for (int which = 0; which < 3; ++which) {
      if (which == 0) tc_matmul_to_stage<NT, true>(ps, L.ldh, dos, L.ld16, stage, L.ldo, np, dim);
      else if (which == 1) tc_matmul_to_stage<NT, true>(dss, L.ldh, qs, L.ld16, stage, L.ldo, np, dim);
      else tc_matmul_to_stage<NT, false>(dss, L.ldh, ks, L.ld16, stage, L.ldo, np, dim);
      __syncthreads();
      if (g.qk_norm && which > 0) {  // back through the normalisation of k (1) or q (2)
        const NT* unit = which == 1 ? ks : qs;
        const float *inv = which == 1 ? rx.inv_k : rx.inv_q, *live = which == 1 ? rx.live_k : rx.live_q;
        const float* dc = which == 1 ? rx.dc_k : rx.dc_q;
        for (int e = threadIdx.x; e < np * dim; e += blockDim.x) {
          const int r = e / dim, d = e - r * dim;
          stage[r * L.ldo + d] = through_norm(stage[r * L.ldo + d], Native<T>::to(unit[r * L.ld16 + d]),
                                              inv[r], live[r], dc[r]);
        }
        __syncthreads();
      }
      const float factor = which == 0 ? 1.f : scale;
      store_tile(which == 0 ? dv : (which == 1 ? dk : dq), rows + 5 * np, stage, L.ldo, nullptr,
                 factor, np, dim, vec);
      if (extra.dpad != nullptr && which < 2 && threadIdx.x < dim) {  // padding keys' gradients
        float sum = 0.f;
        for (int r = 0; r < np; ++r)
          if (info[r] >= kPadKey) sum += stage[r * L.ldo + threadIdx.x] * factor;
        (which == 0 ? dv_pad_run : dk_pad_run) += sum;
      }
      __syncthreads();
    }
  }
  const int64_t partial = static_cast<int64_t>(blockIdx.x) * gridDim.y + head;
  if (bias_grad) {
    float* dst = dbias_partial + partial * n * n;
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) dst[e] = dbias[e];
  }
  if (extra.dpad != nullptr && threadIdx.x < dim) {
    extra.dpad[partial * 2 * dim + threadIdx.x] = dk_pad_run;
    extra.dpad[partial * 2 * dim + dim + threadIdx.x] = dv_pad_run;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture without bf16 wmma: never launched (kernel_ptx_version)
#endif
}

Strides strides_of(const at::Tensor& t) {
  return Strides{t.stride(0), t.stride(1), t.stride(2), t.dim() > 3 ? t.stride(3) : 0};
}

Geometry geometry_of(const at::Tensor& q, at::IntArrayRef window, at::IntArrayRef shift) {
  TORCH_CHECK_VALUE(window.size() == 2 && shift.size() == 2, "window and shift must be pairs, got ", window, " and ",
              shift);
  for (int a = 0; a < 2; ++a) {
    TORCH_CHECK_VALUE(window[a] >= 1 && window[a] <= 1024, "window must be in [1, 1024] per axis, got ", window);
    TORCH_CHECK_VALUE(shift[a] >= 0 && shift[a] < window[a], "shift must be in [0, window) per axis, got shift ", shift,
                " for window ", window);
  }
  Geometry g;
  g.H = checked_int(q.size(1), "H");
  g.W = checked_int(q.size(2), "W");
  g.heads = checked_int(q.size(3), "heads");
  g.head_dim = checked_int(q.size(4), "head_dim");
  g.wh = static_cast<int>(window[0]);
  g.ww = static_cast<int>(window[1]);
  g.sh = static_cast<int>(shift[0]);
  g.sw = static_cast<int>(shift[1]);
  g.win_h = checked_int(ceil_div(g.H, g.wh), "windows per column");
  g.win_w = checked_int(ceil_div(g.W, g.ww), "windows per row");
  g.Hp = checked_int(static_cast<int64_t>(g.win_h) * g.wh, "padded H");
  g.Wp = checked_int(static_cast<int64_t>(g.win_w) * g.ww, "padded W");
  g.tokens = g.wh * g.ww;
  g.roll_first = g.has_pad = g.qk_norm = false;  // the options' caller sets them
  return g;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* tensors[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *tensors[i];
    check_device(t, names[i]);
    TORCH_CHECK_VALUE(t.dim() == 5, names[i], " must be 5-D (B, H, W, heads, head_dim), got ", t.dim(), "-D");
    TORCH_CHECK_VALUE(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(),
                "q, k, v must have one shape, dtype and device; ", names[i], " is ", t.sizes(), " ",
                t.scalar_type(), " on ", t.device(), ", q is ", q.sizes(), " ", q.scalar_type(), " on ", q.device());
    TORCH_CHECK_VALUE(t.stride(4) == 1, names[i], ": the last dimension must be contiguous, stride ", t.stride(4));
  }
}

// The bias as the kernels read it: float, contiguous, of the shape its kind says.
at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t kind, const at::Tensor& q,
                      const Geometry& g) {
  TORCH_CHECK_VALUE(kind == 0 || kind == kBiasTable || kind == kBiasDense,
              "bias_kind must be 0 (none), 1 (table) or 2 (dense), got ", kind);
  if (kind == 0) return at::Tensor();
  TORCH_CHECK_VALUE(bias.has_value(), "bias_kind ", kind, " needs a bias tensor");
  check_device(*bias, "rel_pos_bias");
  TORCH_CHECK_VALUE(bias->device() == q.device(), "rel_pos_bias is on ", bias->device(), ", q on ", q.device());
  const std::vector<int64_t> expected = kind == kBiasTable
      ? std::vector<int64_t>{int64_t(2 * g.wh - 1) * (2 * g.ww - 1), g.heads}
      : std::vector<int64_t>{g.heads, g.tokens, g.tokens};
  TORCH_CHECK_VALUE(bias->sizes() == at::IntArrayRef(expected), "rel_pos_bias of kind ",
              kind == kBiasTable ? "table" : "dense", " must have sizes ", at::IntArrayRef(expected), ", got ",
              bias->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "rel_pos_bias must be floating point, got ",
              bias->scalar_type());
  return bias->to(at::kFloat).contiguous();
}

size_t fwd_smem_bytes(const Geometry& g) {
  return sizeof(float) * (2 * g.tokens * (g.head_dim + 1) + (kFwdThreads / 32) * (g.tokens + g.head_dim));
}

// extras: cosine attention or a scale gradient (dS * C and six RowExtras rows).
size_t bwd_smem_bytes(const Geometry& g, bool bias_grad, bool extras) {
  const size_t n = g.tokens;
  return sizeof(float) * (4 * n * (g.head_dim + 1) + (extras ? 3 : 2) * n * (n + 1) + 2 * n +
                          (extras ? 6 * n : 0) + (bias_grad ? n * n : 0));
}

// The options as the kernels read them. scale: (heads,) floating -> float, contiguous.
// k_pad, v_pad: both or neither, (heads, head_dim) in q's dtype, contiguous.
struct CheckedOptions {
  at::Tensor scale, k_pad, v_pad;
  template <typename T>
  Options<T> view() const {
    return Options<T>{scale.data_ptr<float>(), k_pad.defined() ? k_pad.data_ptr<T>() : nullptr,
                      v_pad.defined() ? v_pad.data_ptr<T>() : nullptr};
  }
};

CheckedOptions check_options(const at::Tensor& scale, const std::optional<at::Tensor>& k_pad,
                             const std::optional<at::Tensor>& v_pad, const at::Tensor& q, const Geometry& g) {
  check_device(scale, "scale");
  TORCH_CHECK_VALUE(scale.device() == q.device(), "scale is on ", scale.device(), ", q on ", q.device());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == g.heads, "scale must have shape (heads,) = (", g.heads,
                    "), got ", scale.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "scale must be floating point, got ", scale.scalar_type());
  CheckedOptions opt{scale.to(at::kFloat).contiguous(), at::Tensor(), at::Tensor()};
  TORCH_CHECK_VALUE(k_pad.has_value() == v_pad.has_value(), "k_pad and v_pad must be given together");
  if (!k_pad.has_value()) return opt;
  const char* names[2] = {"k_pad", "v_pad"};
  const at::Tensor* pads[2] = {&*k_pad, &*v_pad};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *pads[i];
    check_device(t, names[i]);
    TORCH_CHECK_VALUE(t.device() == q.device(), names[i], " is on ", t.device(), ", q on ", q.device());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == g.heads && t.size(1) == g.head_dim, names[i],
                      " must have shape (heads, head_dim) = (", g.heads, ", ", g.head_dim, "), got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), names[i], " must have q's dtype ", q.scalar_type(),
                     ", got ", t.scalar_type());
  }
  opt.k_pad = k_pad->contiguous();
  opt.v_pad = v_pad->contiguous();
  return opt;
}

// fp16/bf16 windows of up to kTcMaxTokens tokens, head_dim a multiple of 16, whose tiles fit
// in shared memory, run on the tensor cores when the kernel was compiled for sm_80 or newer;
// everything else on the SIMT kernels.
template <auto TcKernel>
bool tensor_core_path(const at::Tensor& q, const Geometry& g, size_t smem_bytes) {
  return (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) && g.tokens <= kTcMaxTokens &&
         g.head_dim % 16 == 0 && static_cast<int64_t>(smem_bytes) <= current_device().smem_optin &&
         kernel_ptx_version<TcKernel>() >= 80;
}

// Every (b, h, w, head) row of these 16-bit tensors starts on a 16-byte boundary.
bool rows_are_16_byte_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
    for (int d = 0; d < 4; ++d)
      if (t->stride(d) % 8 != 0) return false;
  }
  return true;
}

// The pad vectors (when given) start on 16 bytes: each head's row then does too (head_dim
// is a multiple of 16 on the tensor-core path).
bool pads_are_16_byte_aligned(const CheckedOptions& opt) {
  return !opt.k_pad.defined() || (reinterpret_cast<uintptr_t>(opt.k_pad.data_ptr()) % 16 == 0 &&
                                  reinterpret_cast<uintptr_t>(opt.v_pad.data_ptr()) % 16 == 0);
}

// Windows per block so that windows x heads blocks come to about blocks_per_sm per SM;
// depends only on the shape and the device, so the bias-gradient partials repeat bitwise.
int windows_per_block(int64_t windows, int heads, int blocks_per_sm) {
  const int64_t runs = std::max<int64_t>(
      1, std::min<int64_t>(windows, ceil_div(int64_t(blocks_per_sm) * current_device().sms, heads)));
  return checked_int(std::max<int64_t>(1, ceil_div(windows, runs)), "windows per block");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t bias_kind, at::IntArrayRef window,
    at::IntArrayRef shift, const at::Tensor& scale, bool qk_norm, const std::optional<at::Tensor>& k_pad,
    const std::optional<at::Tensor>& v_pad, bool roll_first) {
  check_qkv(q, k, v);
  const DeviceGuard guard(q.device());
  Geometry g = geometry_of(q, window, shift);
  const CheckedOptions opt = check_options(scale, k_pad, v_pad, q, g);
  g.qk_norm = qk_norm;
  g.roll_first = roll_first;
  g.has_pad = opt.k_pad.defined();
  const at::Tensor b = float_bias(bias, bias_kind, q, g);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
  const int64_t windows = q.size(0) * g.win_h * g.win_w;
  if (out.numel() == 0) return {out, lse};
  TORCH_CHECK_VALUE(windows < (1LL << 31), "window_attention_fwd: too many windows for one launch (", windows, ")");
  TORCH_CHECK_VALUE(g.heads <= 65535, "window_attention_fwd: at most 65535 heads, got ", g.heads);
  const float* bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  const int kind = static_cast<int>(b.defined() ? bias_kind : 0);
  const size_t tc_smem = tc_layout(g.tokens, g.head_dim, false, bias_ptr != nullptr, false, qk_norm).bytes;
  const bool half = q.scalar_type() == at::kHalf;
  const bool tensor_cores = half ? tensor_core_path<window_attn_fwd_tc_kernel<at::Half>>(q, g, tc_smem)
                                 : tensor_core_path<window_attn_fwd_tc_kernel<at::BFloat16>>(q, g, tc_smem);
  if (tensor_cores) {
    // Runs of windows per block, about two waves of blocks: the staged bias is reused
    // across the run.
    const int per_block = windows_per_block(windows, g.heads, 8);
    const dim3 grid(static_cast<unsigned>(ceil_div(windows, per_block)), g.heads);
    const bool vec = rows_are_16_byte_aligned({&q, &k, &v, &out}) && pads_are_16_byte_aligned(opt);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      launch<window_attn_fwd_tc_kernel<T>>(grid, kTcThreads, tc_smem, q.data_ptr<T>(), k.data_ptr<T>(),
                                           v.data_ptr<T>(), bias_ptr, kind, out.data_ptr<T>(),
                                           lse.data_ptr<float>(), g, strides_of(q), strides_of(k), strides_of(v),
                                           strides_of(out), opt.view<T>(), windows, per_block, vec);
    };
    if (half) run(at::Half{});
    else run(at::BFloat16{});
    return {out, lse};
  }
  const size_t smem = fwd_smem_bytes(g);
  const dim3 grid(static_cast<unsigned>(windows), g.heads);
  dispatch_float_types(q.scalar_type(), "window_attention_fwd", [&](auto tag) {
    using T = decltype(tag);
    launch<window_attn_fwd_kernel<T>>(grid, kFwdThreads, smem, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                                      bias_ptr, kind, out.data_ptr<T>(), lse.data_ptr<float>(), g, strides_of(q),
                                      strides_of(k), strides_of(v), strides_of(out), strides_of(lse),
                                      opt.view<T>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    int64_t bias_kind, at::IntArrayRef window, at::IntArrayRef shift, const at::Tensor& scale, bool qk_norm,
    const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad, bool roll_first,
    bool bias_grad, bool scale_grad, bool pad_grad) {
  check_qkv(q, k, v);
  check_device(grad_out, "grad_out");
  check_device(out, "out");
  check_device(lse, "lse");
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.stride(4) == 1 &&
              grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(),
              "grad_out must match q's shape, dtype and device with a contiguous last dimension");
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous() &&
              lse.sizes() == q.sizes().slice(0, 4) && lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "out and lse must be the contiguous outputs of window_attention_fwd for this q");
  const DeviceGuard guard(q.device());
  Geometry g = geometry_of(q, window, shift);
  const CheckedOptions opt = check_options(scale, k_pad, v_pad, q, g);
  g.qk_norm = qk_norm;
  g.roll_first = roll_first;
  g.has_pad = opt.k_pad.defined();
  const at::Tensor b = float_bias(bias, bias_kind, q, g);
  TORCH_CHECK_VALUE(!bias_grad || b.defined(), "bias_grad needs a bias");
  TORCH_CHECK_VALUE(!pad_grad || g.has_pad, "pad_grad needs k_pad and v_pad");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  const int64_t windows = q.size(0) * g.win_h * g.win_w;
  TORCH_CHECK_VALUE(g.heads <= 65535, "window_attention_bwd: at most 65535 heads, got ", g.heads);
  // Runs of windows per block: enough blocks to fill the GPU a few times, fewer bias partials.
  const int per_block = windows > 0 ? windows_per_block(windows, g.heads, 8) : 1;
  const int64_t runs = windows > 0 ? ceil_div(windows, per_block) : 0;
  const at::TensorOptions partial = q.options().dtype(at::kFloat);
  const int64_t blocks = std::max<int64_t>(runs, 1);
  at::Tensor dbias = bias_grad ? at::zeros({blocks, g.heads, g.tokens, g.tokens}, partial) : at::empty({0}, partial);
  at::Tensor dscale = scale_grad ? at::zeros({std::max<int64_t>(windows, 1), g.heads}, partial) : at::empty({0}, partial);
  at::Tensor dpad = pad_grad ? at::zeros({blocks, g.heads, 2, g.head_dim}, partial) : at::empty({0}, partial);
  // The per-block partials summed in a fixed order: deterministic.
  auto result = [&] {
    return std::make_tuple(dq, dk, dv, bias_grad ? dbias.sum(0) : dbias, scale_grad ? dscale.sum(0) : dscale,
                           pad_grad ? dpad.select(2, 0).sum(0) : at::empty({0}, partial),
                           pad_grad ? dpad.select(2, 1).sum(0) : at::empty({0}, partial));
  };
  if (runs == 0 || q.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return result();
  }
  const float* bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  const int kind = static_cast<int>(b.defined() ? bias_kind : 0);
  const dim3 grid(checked_int(runs, "window runs"), g.heads);
  float* dbias_ptr = bias_grad ? dbias.data_ptr<float>() : nullptr;
  const ExtraGrads extra{scale_grad ? dscale.data_ptr<float>() : nullptr, pad_grad ? dpad.data_ptr<float>() : nullptr};
  const bool extras = qk_norm || scale_grad;
  const size_t tc_smem = tc_layout(g.tokens, g.head_dim, true, bias_ptr != nullptr, bias_grad, extras).bytes;
  const bool half = q.scalar_type() == at::kHalf;
  const bool tensor_cores = half ? tensor_core_path<window_attn_bwd_tc_kernel<at::Half>>(q, g, tc_smem)
                                 : tensor_core_path<window_attn_bwd_tc_kernel<at::BFloat16>>(q, g, tc_smem);
  if (tensor_cores) {
    const bool vec = rows_are_16_byte_aligned({&q, &k, &v, &grad_out, &out, &dq}) && pads_are_16_byte_aligned(opt);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      launch<window_attn_bwd_tc_kernel<T>>(
          grid, kTcBwdThreads, tc_smem, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), out.data_ptr<T>(),
          lse.data_ptr<float>(), grad_out.data_ptr<T>(), bias_ptr, kind, dq.data_ptr<T>(), dk.data_ptr<T>(),
          dv.data_ptr<T>(), dbias_ptr, g, strides_of(q), strides_of(k), strides_of(v), strides_of(out),
          strides_of(grad_out), strides_of(dq), opt.view<T>(), extra, windows, per_block, vec);
    };
    if (half) run(at::Half{});
    else run(at::BFloat16{});
    return result();
  }
  const size_t smem = bwd_smem_bytes(g, bias_grad, extras);
  dispatch_float_types(q.scalar_type(), "window_attention_bwd", [&](auto tag) {
    using T = decltype(tag);
    launch<window_attn_bwd_kernel<T>>(grid, kBwdThreads, smem, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                                      out.data_ptr<T>(), lse.data_ptr<float>(), grad_out.data_ptr<T>(), bias_ptr,
                                      kind, dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), dbias_ptr, g,
                                      strides_of(q), strides_of(k), strides_of(v), strides_of(out),
                                      strides_of(lse), strides_of(grad_out), strides_of(dq), opt.view<T>(), extra,
                                      windows, per_block);
  });
  return result();
}

}  // namespace ultron
