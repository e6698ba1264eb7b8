// Window attention for windows whose tiles do not fit one block's shared memory (up to SAM's
// 64x64 whole-image window), on CUDA cores, every dtype. A window is cut into tiles of
// kStreamTile tokens; a block holds one query or key tile and streams the other side's
// tiles through shared memory:
//  * forward: one block per (window, query tile, head), online softmax over the key tiles;
//  * backward, dq kernel first: one block per (run of windows, query tile, head), two passes
//    over the key tiles (delta_i = sum_j P_ij dP_ij in fp32, then dS and dq); it stores delta
//    and adds the run's bias gradient, each (i, j) of the run by one thread;
//  * then the dk/dv kernel: one block per (window, key tile, head), every query tile
//    streamed past it, dk and dv in registers.
// No atomics: every partial has one owner and the host sums partials in a fixed order.
#pragma once

#include "simt.cuh"

#include <cmath>

namespace ultron {
namespace {

constexpr int kStreamTile = 32;         // tokens per query or key tile: one key per lane
constexpr int kStreamThreads = 128;     // forward and dq kernels: 4 warps, 8 query rows each
constexpr int kStreamDkdvThreads = 256; // dk/dv kernel
constexpr int kStreamMaxDim = 128;      // the dk/dv kernel keeps (tile x D) / 256 values per thread
constexpr int kStreamAccumulators = kStreamTile * kStreamMaxDim / kStreamDkdvThreads;
constexpr int kStreamFwd = 0, kStreamDq = 1, kStreamDkdv = 2;
// Launch bounds name a block count too (4 and 2: at most 128 registers): with the thread
// count alone, ptxas kept these kernels at 56-64 registers and spilled (sm_75 to sm_90).

// Dynamic shared memory of one streamed kernel (4-byte floats or ints, then 8-byte ints):
//  forward: Q, K, V tiles; the output accumulator; per query row max, sum and two norm
//           scratch values; one row of probabilities per warp; the tile infos;
//  dq:      Q, dO, K, V tiles; the dq accumulator; seven values per row; the warps' rows of
//           dS; the tile infos;
//  dk/dv:   Q, dO, K, V tiles; P, dS and dS*C tiles; seven values per row; the tile infos.
// The tile infos (TileInfos): four ints per token of a tile, and one int64 per query token.
__host__ __device__ inline size_t streamed_smem_bytes(int head_dim, int kernel) {
  const size_t tile = kStreamTile, rows = tile * (head_dim + 1), warps_rows = kStreamThreads;
  const size_t infos = 4 * tile + 2 * tile;
  size_t floats = 0;
  if (kernel == kStreamFwd) floats = 3 * rows + tile * head_dim + 4 * tile + warps_rows + infos;
  if (kernel == kStreamDq) floats = 4 * rows + tile * head_dim + 7 * tile + warps_rows + infos;
  if (kernel == kStreamDkdv) floats = 4 * rows + 3 * tile * (tile + 1) + 7 * tile + infos;
  return sizeof(float) * floats;
}

// Per token of a tile: its packed info (pack_token) and table coordinate; for a query tile
// with the decomposed relative position, also where its row starts in rel (rel_offset).
template <bool kVideo, typename T>
__device__ void tile_infos(const Geometry& g, int64_t window, int first, int* info, int* table,
                           const RelPos<T>& rel, int head, int64_t* rel_offset) {
  for (int r = threadIdx.x; r < kStreamTile; r += blockDim.x) {
    const Token t = token_of<kVideo>(g, window, first + r);
    info[r] = pack_token(g, t);
    table[r] = t.table;
    if (rel_offset != nullptr) rel_offset[r] = rel.rows != nullptr && t.real ? offset(rel.s, t, head) : 0;
  }
}

__device__ __forceinline__ bool is_query(int info) { return info >= 0 && info < kPadKey; }

// What every streamed kernel keeps at the end of its shared memory: the packed info and
// table coordinate of each token of its query tile and of its key tile, and where each
// query's decomposed-bias row starts (RelPos; the region is 8-byte aligned: every region
// before it is a multiple of 32 floats).
struct TileInfos {
  int *q_info, *q_table, *k_info, *k_table;
  int64_t* q_rel;
  __device__ explicit TileInfos(float* base)
      : q_info(reinterpret_cast<int*>(base)), q_table(q_info + kStreamTile), k_info(q_table + kStreamTile),
        k_table(k_info + kStreamTile), q_rel(reinterpret_cast<int64_t*>(k_table + kStreamTile)) {}
};

// The decomposed-relative-position gradient of query i (its row: grad) from dS of one key
// tile (ds: this lane's key first_k + lane; ds_row: the warp's 32 values in shared memory,
// read after a __syncwarp). Row entries: one warp sum per window row the tile touches, added
// by lane 0; column entries: lane l sums the tile's keys in the column of key first_k + l
// (keys l, l + ww, ...; every key when ww >= 32). Each entry has one owner per tile and the
// tiles come in order: deterministic.
__device__ __forceinline__ void add_rel_grad(float* grad, const Geometry& g, int i, int first_k, float ds,
                                             const float* ds_row, int lane) {
  const int last = min(first_k + kStreamTile, g.tokens) - 1;
  const int j = first_k + lane;
  for (int key_row = first_k / g.ww; key_row <= last / g.ww; ++key_row) {
    const float sum = warp_sum(j <= last && j / g.ww == key_row ? ds : 0.f);
    if (lane == 0) grad[rel_row_entry(g, i, key_row * g.ww)] += sum;
  }
  if (lane < g.ww && j <= last) {
    float sum = 0.f;
    for (int u = lane; first_k + u <= last && u < kStreamTile; u += g.ww) sum += ds_row[u];
    grad[rel_col_entry(g, i, j)] += sum;
  }
}

// A key tile (K and V rows, padding rows with the head's pad vectors) and its infos.
template <bool kVideo, typename T>
__device__ void load_key_tile(float* ks, float* vs, int* info, int* table, const T* k, const T* v,
                              const Strides& sk, const Strides& sv, const Geometry& g, const Options<T>& opt,
                              int64_t window, int head, int first) {
  const int dim = g.head_dim;
  load_rows<kVideo>(ks, k, sk, g, window, head, g.has_pad ? opt.k_pad + head * dim : nullptr, first, kStreamTile);
  load_rows<kVideo>(vs, v, sv, g, window, head, g.has_pad ? opt.v_pad + head * dim : nullptr, first, kStreamTile);
  tile_infos<kVideo>(g, window, first, info, table, RelPos<T>{}, head, nullptr);
}

// Cosine attention: a tile's rows normalised in place, with their inverse norms and 'live'
// flags (device_helpers.cuh). Callers synchronise before other threads read the rows.
__device__ __forceinline__ void normalise_tile(float* rows, int dim, float* inv, float* live) {
  row_inverse_norms(rows, dim + 1, kStreamTile, dim, inv, live, float_of);
  scale_rows(rows, dim + 1, kStreamTile, dim, inv, float_of, float_of);
}

// The next key tile of a stream, once every thread is done with the previous one: loaded,
// normalised in place for cosine attention (inv, live: its norm scratch), then a barrier.
template <bool kVideo, typename T>
__device__ void stage_key_tile(float* ks, float* vs, const TileInfos& infos, float* inv, float* live, const T* k,
                               const T* v, const Strides& sk, const Strides& sv, const Geometry& g,
                               const Options<T>& opt, int64_t window, int head, int first) {
  __syncthreads();
  load_key_tile<kVideo>(ks, vs, infos.k_info, infos.k_table, k, v, sk, sv, g, opt, window, head, first);
  __syncthreads();
  if (g.qk_norm) {
    normalise_tile(ks, g.head_dim, inv, live);
    __syncthreads();
  }
}

template <typename T, bool kVideo>
__global__ void __launch_bounds__(kStreamThreads, 4) window_attn_fwd_streamed_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ out, float* __restrict__ lse,
    Geometry g, Strides sq, Strides sk, Strides sv, Strides so, Strides sl, Options<T> opt, RelPos<T> rel,
    int q_tiles) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int dim = g.head_dim, ld = dim + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  float* qs = smem;
  float* ks = qs + kStreamTile * ld;
  float* vs = ks + kStreamTile * ld;
  float* acc = vs + kStreamTile * ld;  // tile x dim: sum_j p_ij v_j, rescaled as the max moves
  float* row_max = acc + kStreamTile * dim;
  float* row_sum = row_max + kStreamTile;
  float* inv = row_sum + kStreamTile;  // norm scratch (qk_norm)
  float* live = inv + kStreamTile;
  float* probs = live + kStreamTile + warp * 32;
  const TileInfos infos(live + kStreamTile + warps * 32);
  const int64_t window = blockIdx.x / q_tiles;
  const int first_q = (blockIdx.x % q_tiles) * kStreamTile;
  const int head = blockIdx.y;
  const float scale = head_scale(opt, head);
  load_rows<kVideo>(qs, q, sq, g, window, head, static_cast<const T*>(nullptr), first_q, kStreamTile);
  tile_infos<kVideo>(g, window, first_q, infos.q_info, infos.q_table, rel, head, infos.q_rel);
  for (int r = threadIdx.x; r < kStreamTile; r += blockDim.x) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  for (int e = threadIdx.x; e < kStreamTile * dim; e += blockDim.x) acc[e] = 0.f;
  __syncthreads();
  if (g.qk_norm) normalise_tile(qs, dim, inv, live);  // read after the key loop's barriers
  const int key_tiles = (g.tokens + kStreamTile - 1) / kStreamTile;
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int first_k = kt * kStreamTile;
    // (the first barrier also ends the query tile's use of the norm scratch)
    stage_key_tile<kVideo>(ks, vs, infos, inv, live, k, v, sk, sv, g, opt, window, head, first_k);
    for (int r = warp; r < kStreamTile; r += warps) {
      if (!is_query(infos.q_info[r])) continue;  // warp-uniform: padding and past-the-window rows
      float s = -INFINITY;
      if (packed_pair_allowed(infos.q_info[r], infos.k_info[lane])) {
        float dot = 0.f;
        for (int d = 0; d < dim; ++d) dot += qs[r * ld + d] * ks[lane * ld + d];
        s = dot * scale + bias_at(bias, bias_kind, g, head, first_q + r, first_k + lane, infos.q_table[r],
                                  infos.k_table[lane]);
        if (rel.rows != nullptr) s += rel_bias(rel.rows + infos.q_rel[r], g, first_q + r, first_k + lane);
      }
      // Online softmax: the row's max so far, and its sum and accumulator rescaled to it.
      // A row with no allowed key yet keeps max -inf, sum 0 and accumulator 0.
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, warp_max(s));
      const float base = new_max == -INFINITY ? 0.f : new_max;
      const float p = __expf(s - base);
      const float alpha = __expf(old_max - base);
      const float total = row_sum[r] * alpha + warp_sum(p);
      probs[lane] = p;
      __syncwarp();
      for (int d = lane; d < dim; d += 32) {
        float a = acc[r * dim + d] * alpha;
        for (int j = 0; j < kStreamTile; ++j) a += probs[j] * vs[j * ld + d];
        acc[r * dim + d] = a;
      }
      __syncwarp();  // probs is the next row's; every lane has read the row's max and sum
      if (lane == 0) {
        row_max[r] = new_max;
        row_sum[r] = total;
      }
    }
  }
  __syncwarp();
  for (int r = warp; r < kStreamTile; r += warps) {  // a warp finishes the rows it owns
    if (!is_query(infos.q_info[r])) continue;
    const Token ti = token_of<kVideo>(g, window, first_q + r);
    const float total = row_sum[r];
    // A row whose every key is masked: output 0 and lse -inf, as on every backend.
    const float scale_out = total > 0.f ? 1.f / total : 0.f;
    for (int d = lane; d < dim; d += 32) out[offset(so, ti, head) + d] = static_cast<T>(acc[r * dim + d] * scale_out);
    if (lane == 0) lse[offset(sl, ti, head)] = total > 0.f ? row_max[r] + logf(total) : -INFINITY;
  }
}

template <typename T, bool kVideo>
__global__ void __launch_bounds__(kStreamThreads, 4) window_attn_bwd_dq_streamed_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ lse, const T* __restrict__ grad_out, const float* __restrict__ bias, int bias_kind,
    T* __restrict__ dq, float* __restrict__ delta, float* __restrict__ dbias_partial, Geometry g, Strides sq,
    Strides sk, Strides sv, Strides sl, Strides sdo, Strides sgrad, Options<T> opt, float* __restrict__ dscale,
    RelPos<T> rel, int64_t windows, int windows_per_block, int q_tiles) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int dim = g.head_dim, ld = dim + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  float* qs = smem;
  float* dos = qs + kStreamTile * ld;
  float* ks = dos + kStreamTile * ld;
  float* vs = ks + kStreamTile * ld;
  float* acc = vs + kStreamTile * ld;  // tile x dim: sum_j dS_ij k_j
  float* row_lse = acc + kStreamTile * dim;
  float* row_delta = row_lse + kStreamTile;
  float* row_dc = row_delta + kStreamTile;  // sum_j dS_ij C_ij (cosine attention, scale gradient)
  float* inv_q = row_dc + kStreamTile;
  float* live_q = inv_q + kStreamTile;
  float* inv_k = live_q + kStreamTile;
  float* live_k = inv_k + kStreamTile;
  float* ds_row = live_k + kStreamTile + warp * 32;
  const TileInfos infos(live_k + kStreamTile + warps * 32);
  const bool extras = g.qk_norm || dscale != nullptr;
  const int64_t run = blockIdx.x / q_tiles;
  const int q_tile = blockIdx.x % q_tiles, first_q = q_tile * kStreamTile;
  const int head = blockIdx.y;
  const float scale = head_scale(opt, head);
  const int key_tiles = (g.tokens + kStreamTile - 1) / kStreamTile;
  float* run_dbias = dbias_partial != nullptr
                         ? dbias_partial + (run * gridDim.y + head) * static_cast<int64_t>(g.tokens) * g.tokens
                         : nullptr;
  const int64_t first = run * windows_per_block;
  const int64_t last = min(first + windows_per_block, windows);
  for (int64_t window = first; window < last; ++window) {
    __syncthreads();  // the previous window's rows are written out
    load_rows<kVideo>(qs, q, sq, g, window, head, static_cast<const T*>(nullptr), first_q, kStreamTile);
    load_rows<kVideo>(dos, grad_out, sdo, g, window, head, static_cast<const T*>(nullptr), first_q, kStreamTile);
    tile_infos<kVideo>(g, window, first_q, infos.q_info, infos.q_table, rel, head, infos.q_rel);
    for (int r = threadIdx.x; r < kStreamTile; r += blockDim.x) {
      const Token t = token_of<kVideo>(g, window, first_q + r);
      row_lse[r] = t.real ? lse[offset(sl, t, head)] : 0.f;
      row_delta[r] = 0.f;
      row_dc[r] = 0.f;
    }
    for (int e = threadIdx.x; e < kStreamTile * dim; e += blockDim.x) acc[e] = 0.f;
    __syncthreads();
    if (g.qk_norm) normalise_tile(qs, dim, inv_q, live_q);  // read after the key loop's barriers
    for (int pass = 0; pass < 2; ++pass) {  // 0: delta_i = sum_j P_ij dP_ij; 1: dS, dq, bias gradient
      for (int kt = 0; kt < key_tiles; ++kt) {
        const int first_k = kt * kStreamTile;
        stage_key_tile<kVideo>(ks, vs, infos, inv_k, live_k, k, v, sk, sv, g, opt, window, head, first_k);
        for (int r = warp; r < kStreamTile; r += warps) {
          if (!is_query(infos.q_info[r])) continue;  // warp-uniform
          float p = 0.f, dp = 0.f, c = 0.f;
          if (packed_pair_allowed(infos.q_info[r], infos.k_info[lane])) {
            for (int d = 0; d < dim; ++d) {
              c += qs[r * ld + d] * ks[lane * ld + d];
              dp += dos[r * ld + d] * vs[lane * ld + d];
            }
            float s = c * scale + bias_at(bias, bias_kind, g, head, first_q + r, first_k + lane, infos.q_table[r],
                                          infos.k_table[lane]);
            if (rel.rows != nullptr) s += rel_bias(rel.rows + infos.q_rel[r], g, first_q + r, first_k + lane);
            if (s > -INFINITY) p = __expf(s - row_lse[r]);  // a -inf bias masks the pair
          }
          if (pass == 0) {
            const float sum = warp_sum(p * dp);
            if (lane == 0) row_delta[r] += sum;
            continue;
          }
          const float ds = p * (dp - row_delta[r]);
          if (extras) {
            const float sum = warp_sum(ds * c);
            if (lane == 0) row_dc[r] += sum;
          }
          if (run_dbias != nullptr && first_k + lane < g.tokens)  // this thread's (i, j) of the run
            run_dbias[static_cast<int64_t>(first_q + r) * g.tokens + first_k + lane] += ds;
          ds_row[lane] = ds;
          __syncwarp();
          if (rel.grad != nullptr) add_rel_grad(rel.grad + infos.q_rel[r], g, first_q + r, first_k, ds, ds_row, lane);
          for (int d = lane; d < dim; d += 32) {
            float a = acc[r * dim + d];
            for (int j = 0; j < kStreamTile; ++j) a += ds_row[j] * ks[j * ld + d];
            acc[r * dim + d] = a;
          }
          __syncwarp();
        }
      }
    }
    __syncwarp();
    for (int r = warp; r < kStreamTile; r += warps) {  // a warp finishes the rows it owns
      if (!is_query(infos.q_info[r])) continue;
      const Token ti = token_of<kVideo>(g, window, first_q + r);
      for (int d = lane; d < dim; d += 32) {
        const float gq = acc[r * dim + d];
        dq[offset(sgrad, ti, head) + d] = static_cast<T>(
            scale * (g.qk_norm ? through_norm(gq, qs[r * ld + d], inv_q[r], live_q[r], row_dc[r]) : gq));
      }
      if (lane == 0) delta[offset(sl, ti, head)] = row_delta[r];
    }
    if (dscale != nullptr) {  // per (window, query tile): the rows' sums in order
      __syncthreads();
      if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int r = 0; r < kStreamTile; ++r) sum += row_dc[r];
        dscale[(window * q_tiles + q_tile) * gridDim.y + head] = sum;
      }
    }
  }
}

template <typename T, bool kVideo>
__global__ void __launch_bounds__(kStreamDkdvThreads, 2) window_attn_bwd_dkdv_streamed_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ lse, const float* __restrict__ delta, const T* __restrict__ grad_out,
    const float* __restrict__ bias, int bias_kind, T* __restrict__ dk, T* __restrict__ dv, Geometry g,
    Strides sq, Strides sk, Strides sv, Strides sl, Strides sdo, Strides sgrad, Options<T> opt,
    float* __restrict__ dpad, RelPos<T> rel, int k_tiles) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int dim = g.head_dim, ld = dim + 1, lp = kStreamTile + 1;
  float* ks = smem;
  float* vs = ks + kStreamTile * ld;
  float* qs = vs + kStreamTile * ld;
  float* dos = qs + kStreamTile * ld;
  float* ps = dos + kStreamTile * ld;  // tile x tile: P, dS, dS * C (cosine attention)
  float* dss = ps + kStreamTile * lp;
  float* dcs = dss + kStreamTile * lp;
  float* row_lse = dcs + kStreamTile * lp;
  float* row_delta = row_lse + kStreamTile;
  float* inv_q = row_delta + kStreamTile;  // norm scratch of the query tile
  float* live_q = inv_q + kStreamTile;
  float* inv_k = live_q + kStreamTile;
  float* live_k = inv_k + kStreamTile;
  float* dc_k = live_k + kStreamTile;  // sum_i dS_ij C_ij
  const TileInfos infos(dc_k + kStreamTile);
  const int64_t window = blockIdx.x / k_tiles;
  const int first_k = (blockIdx.x % k_tiles) * kStreamTile;
  const int head = blockIdx.y;
  const float scale = head_scale(opt, head);
  load_key_tile<kVideo>(ks, vs, infos.k_info, infos.k_table, k, v, sk, sv, g, opt, window, head, first_k);
  for (int r = threadIdx.x; r < kStreamTile; r += blockDim.x) dc_k[r] = 0.f;
  __syncthreads();
  if (g.qk_norm) normalise_tile(ks, dim, inv_k, live_k);  // read after the query loop's barriers
  // Element e = threadIdx.x + a * blockDim.x of the tile x dim gradients: key e / dim, column
  // e % dim; a fixed unrolled count keeps them in registers.
  float dk_acc[kStreamAccumulators], dv_acc[kStreamAccumulators];
#pragma unroll
  for (int a = 0; a < kStreamAccumulators; ++a) dk_acc[a] = dv_acc[a] = 0.f;
  const int query_tiles = (g.tokens + kStreamTile - 1) / kStreamTile;
  for (int qt = 0; qt < query_tiles; ++qt) {
    const int first_q = qt * kStreamTile;
    __syncthreads();
    load_rows<kVideo>(qs, q, sq, g, window, head, static_cast<const T*>(nullptr), first_q, kStreamTile);
    load_rows<kVideo>(dos, grad_out, sdo, g, window, head, static_cast<const T*>(nullptr), first_q, kStreamTile);
    tile_infos<kVideo>(g, window, first_q, infos.q_info, infos.q_table, rel, head, infos.q_rel);
    for (int r = threadIdx.x; r < kStreamTile; r += blockDim.x) {
      const Token t = token_of<kVideo>(g, window, first_q + r);
      row_lse[r] = t.real ? lse[offset(sl, t, head)] : 0.f;
      row_delta[r] = t.real ? delta[offset(sl, t, head)] : 0.f;
    }
    __syncthreads();
    if (g.qk_norm) {
      normalise_tile(qs, dim, inv_q, live_q);
      __syncthreads();
    }
    for (int e = threadIdx.x; e < kStreamTile * kStreamTile; e += blockDim.x) {
      const int i = e / kStreamTile, j = e % kStreamTile;
      float p = 0.f, ds = 0.f, c = 0.f;
      if (packed_pair_allowed(infos.q_info[i], infos.k_info[j])) {
        float dp = 0.f;
        for (int d = 0; d < dim; ++d) {
          c += qs[i * ld + d] * ks[j * ld + d];
          dp += dos[i * ld + d] * vs[j * ld + d];
        }
        float s = c * scale + bias_at(bias, bias_kind, g, head, first_q + i, first_k + j, infos.q_table[i],
                                      infos.k_table[j]);
        if (rel.rows != nullptr) s += rel_bias(rel.rows + infos.q_rel[i], g, first_q + i, first_k + j);
        if (s > -INFINITY) p = __expf(s - row_lse[i]);
        ds = p * (dp - row_delta[i]);
      }
      ps[i * lp + j] = p;
      dss[i * lp + j] = ds;
      dcs[i * lp + j] = ds * c;
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < kStreamAccumulators; ++a) {
      const int e = threadIdx.x + a * blockDim.x;
      if (e >= kStreamTile * dim) break;
      const int j = e / dim, d = e % dim;
      float gk = dk_acc[a], gv = dv_acc[a];
      for (int i = 0; i < kStreamTile; ++i) {
        gk += dss[i * lp + j] * qs[i * ld + d];
        gv += ps[i * lp + j] * dos[i * ld + d];
      }
      dk_acc[a] = gk;
      dv_acc[a] = gv;
    }
    if (g.qk_norm)
      for (int j = threadIdx.x; j < kStreamTile; j += blockDim.x) {
        float col = 0.f;
        for (int i = 0; i < kStreamTile; ++i) col += dcs[i * lp + j];
        dc_k[j] += col;
      }
  }
  __syncthreads();  // dc_k is whole; the query tiles are free for the pad-vector gradients
  float* pad_dk = qs;   // tile x ld: the gradient of each padding key, 0 for other keys
  float* pad_dv = dos;
#pragma unroll
  for (int a = 0; a < kStreamAccumulators; ++a) {
    const int e = threadIdx.x + a * blockDim.x;
    if (e >= kStreamTile * dim) break;
    const int j = e / dim, d = e % dim;
    const Token tj = token_of<kVideo>(g, window, first_k + j);
    const float gk = scale * (g.qk_norm ? through_norm(dk_acc[a], ks[j * ld + d], inv_k[j], live_k[j], dc_k[j])
                                        : dk_acc[a]);
    if (tj.real) {
      const int64_t o = offset(sgrad, tj, head) + d;
      dk[o] = static_cast<T>(gk);
      dv[o] = static_cast<T>(dv_acc[a]);
    }
    if (dpad != nullptr) {
      const bool pad = tj.inside && !tj.real;
      pad_dk[j * ld + d] = pad ? gk : 0.f;
      pad_dv[j * ld + d] = pad ? dv_acc[a] : 0.f;
    }
  }
  if (dpad != nullptr) {  // padding keys all hold the pad vectors: their gradients add up
    __syncthreads();
    float* dst = dpad + (static_cast<int64_t>(blockIdx.x) * gridDim.y + head) * 2 * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
      float sum_k = 0.f, sum_v = 0.f;
      for (int j = 0; j < kStreamTile; ++j) {
        sum_k += pad_dk[j * ld + d];
        sum_v += pad_dv[j * ld + d];
      }
      dst[d] = sum_k;
      dst[dim + d] = sum_v;
    }
  }
}

}  // namespace
}  // namespace ultron
