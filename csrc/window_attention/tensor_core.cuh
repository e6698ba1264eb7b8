// Window attention on tensor cores (wmma 16x16x16), fp16/bf16 windows of up to 128 tokens,
// forward and backward. The window's Q, K, V sit in shared memory (padded to a multiple of
// 16 tokens), S = Q K^T and O = P V are wmma tiles spread over the warps, the softmax is
// one warp per row in between.
#pragma once

#include "device_helpers.cuh"

#include <cfloat>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace ultron {
namespace {

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
  l.rows = take(np * 8 * (backward ? 5 : 4));  // row offsets: q, k, v, out | q, k, v, dO, grads
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

// Score of the pair (i, j) from its raw Q.K product: scaled and biased (bias: the staged
// n x n tile, or nullptr), or -inf where the shifted-window mask forbids it, i is no query
// or j no key (ti, tj: token info; i, j >= n are neither, so the tile is only read inside).
__device__ __forceinline__ float packed_score(float qk, float scale, const float* bias, int n,
                                              int i, int j, int ti, int tj) {
  if (!packed_pair_allowed(ti, tj)) return -INFINITY;
  return qk * scale + (bias != nullptr ? bias[i * n + j] : 0.f);
}

// The bias of every token pair (n x n), staged once per block: it is the same for every
// window, and the gather from a table would otherwise cost one scattered load per score.
__device__ void stage_bias(float* dst, const float* bias, int kind, const Geometry& g, int head) {
  const int n = g.tokens;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e % n;
    dst[e] = bias_at(bias, kind, g, head, i, j, table_pos<true>(g, i), table_pos<true>(g, j));
  }
}

// Per window, once per token: its packed info and the element offset of its row in each of
// `count` tensors (-1 for padding). The copy loops below then need no index arithmetic.
template <bool kVideo>
__device__ void token_rows(const Geometry& g, int64_t window, int head, int np, int* info,
                           int64_t* rows, const Strides* strides, int count) {
  for (int t = threadIdx.x; t < np; t += blockDim.x) {
    const Token tok = token_of<kVideo>(g, window, t);
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

template <typename T, bool kVideo>
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
  const float scale = head_scale(opt, head);
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
    token_rows<kVideo>(g, window, head, L.np, info, rows, strides, 4);
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

template <typename T, bool kVideo>
__global__ void __launch_bounds__(kTcBwdThreads, 2) window_attn_bwd_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ lse, const T* __restrict__ grad_out,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ dq, T* __restrict__ dk,
    T* __restrict__ dv, float* __restrict__ dbias_partial, Geometry g, Strides sq, Strides sk,
    Strides sv, Strides sdo, Strides sgrad, Options<T> opt, ExtraGrads extra,
    int64_t windows, int windows_per_block, bool vec) {
  // lse and the gradients are contiguous with q's shape (lse without D): lse index = gradient
  // row offset / D. No saved output is read: delta_i = sum_j P_ij dP_ij is summed in fp32.
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
  float* row_lse = t.row_a;
  int* info = t.info;
  int64_t* rows = t.rows;
  const int head = blockIdx.y, n = g.tokens, dim = g.head_dim, np = L.np;
  const float scale = head_scale(opt, head);
  const T* k_pad = g.has_pad ? opt.k_pad + head * dim : nullptr;
  const T* v_pad = g.has_pad ? opt.v_pad + head * dim : nullptr;
  float dk_pad_run = 0.f, dv_pad_run = 0.f;  // thread d < dim
  const Strides strides[5] = {sq, sk, sv, sdo, sgrad};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (bias_grad)
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) dbias[e] = 0.f;
  if (has_bias) stage_bias(bias_s, bias, bias_kind, g, head);  // read after a barrier below
  const int64_t first = static_cast<int64_t>(blockIdx.x) * windows_per_block;
  const int64_t last = min(first + windows_per_block, windows);
  for (int64_t window = first; window < last; ++window) {
    token_rows<kVideo>(g, window, head, np, info, rows, strides, 5);
    __syncthreads();
    load_tile(qs, L.ld16, q, rows, np, dim, vec);
    load_tile(ks, L.ld16, k, rows + np, np, dim, vec, k_pad, info);
    load_tile(vs, L.ld16, v, rows + 2 * np, np, dim, vec, v_pad, info);
    load_tile(dos, L.ld16, grad_out, rows + 3 * np, np, dim, vec);
    const int64_t* grad_rows = rows + 4 * np;
    for (int i = threadIdx.x; i < np; i += blockDim.x)
      row_lse[i] = grad_rows[i] >= 0 ? lse[grad_rows[i] / dim] : 0.f;
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

    // P and dS in fp32, one warp per row: each lane keeps P and C of its (at most
    // kTcMaxTokens / 32) columns in registers while the warp sums delta_i = sum_j P_ij dP_ij
    // (lanes, then the shuffle tree: a fixed order); then dS = P (dP - delta).
    constexpr int kColumnsPerLane = kTcMaxTokens / 32;
    for (int i = warp; i < np; i += warps) {
      const float row_max = row_lse[i], inv_q = g.qk_norm ? rx.inv_q[i] : 1.f;
      const int ti = info[i];
      float p[kColumnsPerLane], c[kColumnsPerLane], acc = 0.f;
#pragma unroll
      for (int u = 0; u < kColumnsPerLane; ++u) {
        const int j = lane + 32 * u;
        p[u] = c[u] = 0.f;
        if (j < np) {
          c[u] = g.qk_norm ? ss[i * L.ldf + j] * inv_q * rx.inv_k[j] : ss[i * L.ldf + j];
          const float s = packed_score(c[u], scale, bias_s, n, i, j, ti, info[j]);
          p[u] = s > -INFINITY ? __expf(s - row_max) : 0.f;
          acc += p[u] * dps[i * L.ldf + j];
        }
      }
      const float delta = warp_sum(acc);
#pragma unroll
      for (int u = 0; u < kColumnsPerLane; ++u) {  // P, dS; bias gradient
        const int j = lane + 32 * u;
        if (j >= np) continue;
        const float ds = p[u] * (dps[i * L.ldf + j] - delta);
        ps[i * L.ldh + j] = Native<T>::from(p[u]);
        dss[i * L.ldh + j] = Native<T>::from(ds);
        if (extras) ss[i * L.ldf + j] = ds * c[u];  // this lane's own (i, j): read just above
        if (bias_grad && i < n && j < n) dbias[i * n + j] += ds;  // one owner lane per (i, j)
      }
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
      store_tile(which == 0 ? dv : (which == 1 ? dk : dq), rows + 4 * np, stage, L.ldo, nullptr,
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

}  // namespace
}  // namespace ultron
