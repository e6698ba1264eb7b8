// Grouped depthwise convolution: forward, grad input, grad weight/bias.
//
// Contiguous channel groups each have their own kernel (kh, kw), dilation (dh, dw) and zero
// padding (top, bottom, left, right); an identity group (kernel 0x0) passes its channels
// through. The channel-wise dilated convolution is the case of one square kernel and a
// dilation per group. One launch covers every group; each thread reads its channel's group
// from a device table, so the tap loops run that group's own kh x kw taps.
//  * forward and grad input share one gather kernel per layout: grad input is the forward
//    gather read backwards (o*stride = i + pad - k*d), so there are no atomics;
//  * channels_last: one thread per (pixel, run of VEC channels of one group), one 16-byte load
//    per tap for the activations and one for the weights, which are packed tap-major per group;
//  * NCHW: a 32 x 32 output tile per block, its source window and halo staged once in shared
//    memory; groups whose halo does not fit take a direct kernel (one thread per output, tap
//    re-reads served by L1);
//  * grad weight/bias: per-chunk partial sums reduced in a fixed tree order inside the block,
//    then over chunks by at::sum: bitwise-deterministic.
// When every group has the same square kernel of 3, 5 or 7, it is a template argument, so the
// tap loops unroll (the ULTRON case); any other mix runs the same kernels with run-time loops.
#include "../common.cuh"

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

namespace ultron {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxKernel = 31;
constexpr int kMaxDilation = (1 << 20) - 1;
constexpr int kSpecInts = 9;  // per group: channels, kh, kw, dh, dw, pad top, bottom, left, right

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// One group as the kernels read it. An identity group reads as a 1x1 tap of weight 1.
struct Group {
  int first, channels;         // channel range [first, first + channels)
  int kh, kw, dh, dw;
  int pad_top, pad_left;
  int weight_offset;           // into the packed weights, tap-major: [tap][channel]; -1: identity
};

__device__ __forceinline__ int taps_of(const Group& g) { return g.weight_offset < 0 ? 0 : g.kh * g.kw; }

template <typename T>
__device__ __forceinline__ float tap_weight(const T* weight, const Group& g, int c, int tap) {
  return g.weight_offset < 0 ? 1.f
                             : static_cast<float>(weight[g.weight_offset + tap * g.channels + (c - g.first)]);
}

// Position in the source image that tap k of destination position `pos` reads, or -1.
// Forward: src = pos*stride - pad + k*d. Grad input (TRANSPOSED): src*stride = pos + pad - k*d.
template <bool TRANSPOSED>
__device__ __forceinline__ int source_pos(int pos, int k, int d, int pad, int stride, int limit) {
  if (TRANSPOSED) {
    const int scaled = pos + pad - k * d;
    if (scaled < 0 || scaled % stride != 0) return -1;
    const int src = scaled / stride;
    return src < limit ? src : -1;
  }
  const int src = pos * stride - pad + k * d;
  return (src >= 0 && src < limit) ? src : -1;
}

struct ConvShape {
  int C, src_h, src_w, dst_h, dst_w, stride;
};

// Calls visit(sy, sx, tap) for each tap of destination (y, x) whose source lies inside the
// image (the others read the zero padding). KT > 0: every group's kernel is KT x KT, a
// compile-time constant, so both loops unroll.
template <bool TRANSPOSED, int KT, typename Visit>
__device__ __forceinline__ void for_each_source_tap(int y, int x, const Group& g, const ConvShape& s,
                                                    Visit&& visit) {
  const int kh = KT > 0 ? KT : g.kh, kw = KT > 0 ? KT : g.kw;
#pragma unroll
  for (int i = 0; i < kh; ++i) {
    const int sy = source_pos<TRANSPOSED>(y, i, g.dh, g.pad_top, s.stride, s.src_h);
    if (sy < 0) continue;
#pragma unroll
    for (int j = 0; j < kw; ++j) {
      const int sx = source_pos<TRANSPOSED>(x, j, g.dw, g.pad_left, s.stride, s.src_w);
      if (sx >= 0) visit(sy, sx, i * kw + j);
    }
  }
}

// Grids are 3-D so that no thread divides a 64-bit index per element: z walks rows
// (channels_last: b*H + y) or planes (NCHW: b*C + c), with a grid-stride loop past 65535.
constexpr int kMaxGridZ = 65535;

// channels_last: x-lanes take runs of VEC channels (one group each), y-lanes take output
// columns; grid (runs / blockDim.x, W_dst / blockDim.y, rows), each block looping over rows.
// For a compile-time K the block first stages its channels' weights tap-major in shared
// memory: read from global memory instead, the KT*KT loop-invariant weight vectors would be
// hoisted out of the row loop into registers (176 for 7x7 bf16 on sm_90, where staged: 64).
template <typename T, int KT, int VEC, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads) gather_nhwc_kernel(
    const T* __restrict__ src, const T* __restrict__ weight, const T* __restrict__ bias,
    const Group* __restrict__ groups, const int* __restrict__ group_of, T* __restrict__ dst, int64_t rows,
    ConvShape s) {
  ULTRON_SHARED_ARRAY(T, staged, KT > 0 ? KT * KT * 32 * VEC : 1);  // [tap][block channel]
  const int block_channels = blockDim.x * VEC;
  if (KT > 0) {
    const int first = blockIdx.x * block_channels;
    for (int e = threadIdx.y * blockDim.x + threadIdx.x; e < KT * KT * block_channels;
         e += blockDim.x * blockDim.y) {
      const int tap = e / block_channels, c = first + e % block_channels;
      T value = static_cast<T>(0.f);
      if (c < s.C) {
        const Group& owner = groups[group_of[c]];
        value = weight[owner.weight_offset + tap * owner.channels + (c - owner.first)];
      }
      staged[e] = value;
    }
    __syncthreads();
  }
  const int run = blockIdx.x * blockDim.x + threadIdx.x;
  const int x = blockIdx.y * blockDim.y + threadIdx.y;
  if (run >= s.C / VEC || x >= s.dst_w) return;  // no block-wide synchronisation below
  const int c0 = run * VEC;
  const Group g = groups[group_of[c0]];
  float b[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) b[v] = bias != nullptr ? static_cast<float>(bias[c0 + v]) : 0.f;
  for (int64_t row = blockIdx.z; row < rows; row += gridDim.z) {
    const int y = static_cast<int>(row % s.dst_h);
    const int64_t batch = row / s.dst_h;
    const T* image = src + batch * s.src_h * s.src_w * s.C + c0;
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = b[v];
    for_each_source_tap<TRANSPOSED, KT>(y, x, g, s, [&](int sy, int sx, int tap) {
      const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(
          image + (static_cast<int64_t>(sy) * s.src_w + sx) * s.C);
      if (KT == 0 && g.weight_offset < 0) {  // identity: a 1x1 tap of weight 1
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += static_cast<float>(in.v[v]);
        return;
      }
      // VEC consecutive channels of one tap: contiguous in the tap-major weights.
      const Pack<T, VEC> w = *reinterpret_cast<const Pack<T, VEC>*>(
          KT > 0 ? staged + tap * block_channels + threadIdx.x * VEC
                 : weight + g.weight_offset + tap * g.channels + (c0 - g.first));
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += static_cast<float>(in.v[v]) * static_cast<float>(w.v[v]);
    });
    Pack<T, VEC> result;
#pragma unroll
    for (int v = 0; v < VEC; ++v) result.v[v] = static_cast<T>(acc[v]);
    *reinterpret_cast<Pack<T, VEC>*>(dst + (row * s.dst_w + x) * s.C + c0) = result;
  }
}

// NCHW, direct: a (32, 8) block covers 32 x 8 outputs of a plane; grid (W_dst / 32,
// H_dst / 8, planes); tap re-reads are served by L1. Taken when a group's halo is too large
// for the shared-memory tile below.
template <typename T, int KT, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads) gather_nchw_kernel(
    const T* __restrict__ src, const T* __restrict__ weight, const T* __restrict__ bias,
    const Group* __restrict__ groups, const int* __restrict__ group_of, T* __restrict__ dst, int64_t planes,
    ConvShape s) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= s.dst_w || y >= s.dst_h) return;  // no block-wide synchronisation below
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {  // plane = b*C + c
    const int c = static_cast<int>(plane % s.C);
    const Group g = groups[group_of[c]];
    float acc = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
    const T* image = src + plane * s.src_h * s.src_w;
    for_each_source_tap<TRANSPOSED, KT>(y, x, g, s, [&](int sy, int sx, int tap) {
      acc += static_cast<float>(image[static_cast<int64_t>(sy) * s.src_w + sx]) * tap_weight(weight, g, c, tap);
    });
    dst[(plane * s.dst_h + y) * s.dst_w + x] = static_cast<T>(acc);
  }
}

// NCHW, shared-memory tile: a (32, 8) block computes a kTileW x kTileH output tile of one
// plane (kTileH / 8 consecutive rows per thread). The source window the tile reads, halo included, is
// loaded once, coalesced, with zeros where it leaves the image, so the taps then read shared
// memory with no bounds checks. grid (W_dst / kTileW, H_dst / kTileH, planes).
constexpr int kTileW = 32, kTileH = 32;
// Resident blocks the tile kernel's launch bounds ask for: 4 (64 registers) where the kernel
// needs no more (3x3, run-time K), else 3 (80: the 5x5 and 7x7 weights stay in registers).
// With the thread count alone, ptxas held the run-time-K grad input at 40 and spilled.
constexpr int tile_blocks_per_sm(int kt) { return kt == 0 || kt == 3 ? 4 : 3; }
constexpr int kRowsPerThread = kTileH / (kThreads / kTileW);
// Shared memory per block up to which the tile kernel runs (7 blocks of 256 threads per SM).
constexpr size_t kTileSmemBudget = 32 * 1024;

// floor(a / stride) for stride 1 or 2, negative a included (arithmetic shift).
__host__ __device__ __forceinline__ int floor_div_stride(int a, int stride) { return a >> (stride - 1); }

// First source position and extent, along one axis, read by destination positions
// [first, last] through k taps of dilation d after padding `pad` (the padding before).
template <bool TRANSPOSED>
__host__ __device__ __forceinline__ int2 source_span(int first, int last, int k, int d, int pad, int stride) {
  if (TRANSPOSED) {  // src*stride = pos + pad - t*d, t in [0, k-1]
    const int lo = floor_div_stride(first + pad - (k - 1) * d, stride);
    return make_int2(lo, floor_div_stride(last + pad, stride) - lo + 1);
  }
  return make_int2(first * stride - pad, (last - first) * stride + 1 + (k - 1) * d);
}

// Position, inside a staged source window that starts at `origin` (from source_span), that
// tap k of destination `pos` reads; -1 where grad input has no such tap (stride 2, odd
// offset). The window holds the zero padding, so nothing else can fall outside it.
template <bool TRANSPOSED>
__device__ __forceinline__ int window_pos(int pos, int k, int d, int pad, int stride, int origin) {
  if (TRANSPOSED) {
    const int scaled = pos + pad - k * d;
    return stride == 2 && (scaled & 1) ? -1 : floor_div_stride(scaled, stride) - origin;
  }
  return pos * stride - pad + k * d - origin;
}

// Floats of the largest source window of a full tile over the groups (0 for none).
template <bool TRANSPOSED>
int64_t tile_window_floats(const std::vector<Group>& groups, int stride) {
  int64_t most = 0;
  for (const Group& g : groups) {
    const int2 rows = source_span<TRANSPOSED>(0, kTileH - 1, g.kh, g.dh, g.pad_top, stride);
    const int2 cols = source_span<TRANSPOSED>(0, kTileW - 1, g.kw, g.dw, g.pad_left, stride);
    most = std::max<int64_t>(most, static_cast<int64_t>(rows.y) * cols.y);
  }
  return most;
}

template <typename T, int KT, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads, tile_blocks_per_sm(KT)) gather_nchw_tile_kernel(
    const T* __restrict__ src, const T* __restrict__ weight, const T* __restrict__ bias,
    const Group* __restrict__ groups, const int* __restrict__ group_of, T* __restrict__ dst, int64_t planes,
    ConvShape s, int max_taps, int window_capacity) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  float* taps = smem;
  float* window = smem + max_taps;
  const int x0 = blockIdx.x * kTileW, y0 = blockIdx.y * kTileH;
  const int x_last = min(x0 + kTileW, s.dst_w) - 1, y_last = min(y0 + kTileH, s.dst_h) - 1;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {  // plane = b*C + c
    const int c = static_cast<int>(plane % s.C);
    const Group g = groups[group_of[c]];
    const int kh = KT > 0 ? KT : g.kh, kw = KT > 0 ? KT : g.kw;
    // The whole tile's window, also at the image's edges (the rows and columns past it read
    // as zeros): every thread's taps then land inside it, with no per-load bounds checks.
    const int2 rows = source_span<TRANSPOSED>(y0, y0 + kTileH - 1, kh, g.dh, g.pad_top, s.stride);
    const int2 cols = source_span<TRANSPOSED>(x0, x0 + kTileW - 1, kw, g.dw, g.pad_left, s.stride);
    if (rows.y * cols.y > window_capacity || kh * kw > max_taps) __trap();  // the host sized it smaller
    const T* image = src + plane * s.src_h * s.src_w;
    for (int e = tid; e < kh * kw; e += kThreads) taps[e] = tap_weight(weight, g, c, e);
    for (int r = threadIdx.y; r < rows.y; r += blockDim.y) {
      const int sy = rows.x + r;
      const bool row_in = sy >= 0 && sy < s.src_h;
      for (int col = threadIdx.x; col < cols.y; col += blockDim.x) {
        const int sx = cols.x + col;
        window[r * cols.y + col] = row_in && sx >= 0 && sx < s.src_w
            ? static_cast<float>(image[static_cast<int64_t>(sy) * s.src_w + sx]) : 0.f;
      }
    }
    __syncthreads();
    // A compile-time K keeps the weights in registers: one shared load per tap, not two.
    float w[KT > 0 ? KT * KT : 1];
#pragma unroll
    for (int e = 0; e < (KT > 0 ? KT * KT : 0); ++e) w[e] = taps[e];
    // Each thread computes kRowsPerThread consecutive rows of column x.
    const int x = x0 + threadIdx.x;
    const int y_first = y0 + threadIdx.y * kRowsPerThread;
    const float b = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
    float acc[kRowsPerThread];
#pragma unroll
    for (int o = 0; o < kRowsPerThread; ++o) acc[o] = b;
    if (s.stride == 1 && g.dh == 1) {
      // Register blocking: per kernel column j, the rows' values slide down the thread's
      // column, so output row o, step t reads window row (first + o + t): one new shared
      // load and one weight per kRowsPerThread FMAs (0.5 loads per FMA, against 2 for a
      // run-time kernel read tap by tap). Grad input steps the kernel rows backwards.
      const float* column = window + threadIdx.y * kRowsPerThread * cols.y;
#pragma unroll
      for (int j = 0; j < kw; ++j) {
        const int wx = TRANSPOSED ? x + g.pad_left - j * g.dw - cols.x : x - g.pad_left + j * g.dw - cols.x;
        float v[kRowsPerThread];
#pragma unroll
        for (int o = 0; o + 1 < kRowsPerThread; ++o) v[o] = column[o * cols.y + wx];
#pragma unroll
        for (int t = 0; t < kh; ++t) {
          v[kRowsPerThread - 1] = column[(t + kRowsPerThread - 1) * cols.y + wx];
          const int tap = (TRANSPOSED ? kh - 1 - t : t) * kw + j;
          const float weight_tj = KT > 0 ? w[tap] : taps[tap];
#pragma unroll
          for (int o = 0; o < kRowsPerThread; ++o) acc[o] += v[o] * weight_tj;
#pragma unroll
          for (int o = 0; o + 1 < kRowsPerThread; ++o) v[o] = v[o + 1];
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kh; ++i) {
        int line[kRowsPerThread];  // window offset of row y_first + o through kernel row i; -1: no tap
#pragma unroll
        for (int o = 0; o < kRowsPerThread; ++o) {
          const int wy = window_pos<TRANSPOSED>(y_first + o, i, g.dh, g.pad_top, s.stride, rows.x);
          line[o] = wy < 0 ? -1 : wy * cols.y;  // only grad input at stride 2 has no-tap rows
        }
#pragma unroll
        for (int j = 0; j < kw; ++j) {
          const int wx = window_pos<TRANSPOSED>(x, j, g.dw, g.pad_left, s.stride, cols.x);
          if (TRANSPOSED && wx < 0) continue;
          const float weight_ij = KT > 0 ? w[i * kw + j] : taps[i * kw + j];
#pragma unroll
          for (int o = 0; o < kRowsPerThread; ++o)
            if (!TRANSPOSED || line[o] >= 0) acc[o] += window[line[o] + wx] * weight_ij;
        }
      }
    }
#pragma unroll
    for (int o = 0; o < kRowsPerThread; ++o)
      if (x <= x_last && y_first + o <= y_last) dst[(plane * s.dst_h + y_first + o) * s.dst_w + x] = static_cast<T>(acc[o]);
    __syncthreads();  // the next plane overwrites the window and the taps
  }
}

// Grad weight/bias partial sums of one chunk of output rows (b*H_out + y), block (32, 8).
// channels_last: x-lanes take 32 consecutive channels, y-lanes stride over columns. NCHW:
// one channel per block, x-lanes stride over columns, y-lanes over the chunk's rows.
// Each pass accumulates kTapsPerPass taps in registers over the chunk (KT > 0: all KT*KT taps
// in one pass); the block makes as many passes as its channels' largest kernel needs. Each sum
// is reduced in a fixed order: dw_partial[chunk, weight], db_partial[chunk, c].
template <typename T, int KT, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads) grad_weight_partial_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ x, const Group* __restrict__ groups,
    const int* __restrict__ group_of, float* __restrict__ dw_partial, float* __restrict__ db_partial,
    int64_t n_weights, int64_t rows, int64_t rows_per_chunk, ConvShape s) {
  constexpr int kTapsPerPass = KT > 0 ? KT * KT : 8;
  constexpr int kSlice = 9;  // a 3x3 kernel's taps and its bias in one slice
  ULTRON_SHARED_ARRAY(float, scratch, kSlice * kThreads);
  const int c = CHANNELS_LAST ? blockIdx.y * 32 + threadIdx.x : blockIdx.y;
  const bool channel_ok = c < s.C;
  const Group g = groups[group_of[channel_ok ? c : 0]];
  const int taps = channel_ok ? taps_of(g) : 0;
  // Passes are block-uniform (each ends in block-wide reductions): the largest tap count among
  // the block's channels. NCHW blocks have one channel; channels_last blocks have the same 32
  // channels in every warp, so a warp's maximum is the block's. A compile-time K is one pass
  // known as such (the accumulators then need not outlive it).
  int block_taps = KT > 0 ? KT * KT : taps;
  if (CHANNELS_LAST && KT == 0) {
#pragma unroll
    for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2)
      block_taps = max(block_taps, __shfl_xor_sync(0xffffffffu, block_taps, lane_mask));
  }
  const int64_t begin = blockIdx.x * rows_per_chunk;
  const int64_t end = min(begin + rows_per_chunk, rows);
  const int row_step = CHANNELS_LAST ? 1 : blockDim.y;
  const int col_first = CHANNELS_LAST ? threadIdx.y : threadIdx.x;
  const int col_step = CHANNELS_LAST ? blockDim.y : blockDim.x;
  const int64_t out_row = blockIdx.x * static_cast<int64_t>(s.C) + c;
  // src = x (H, W); dst = grad_out (H_out, W_out).
  for (int first = 0; first < block_taps; first += kTapsPerPass) {
    // A run-time kernel's taps of this pass, once per pass (a compile-time K needs none: one
    // pass of constant taps, which keeps 2*K*K values out of the registers).
    int tap_h[KT > 0 ? 1 : kTapsPerPass], tap_w[KT > 0 ? 1 : kTapsPerPass];
#pragma unroll
    for (int u = 0; u < (KT > 0 ? 0 : kTapsPerPass); ++u) {
      const int tap = first + u;
      const bool live = tap < taps;
      tap_h[u] = live ? tap / g.kw : -1;  // -1: no such tap in this channel's kernel
      tap_w[u] = live ? tap % g.kw : 0;
    }
    float acc[kTapsPerPass + 1];  // the last one: the bias gradient (first pass only)
#pragma unroll
    for (int u = 0; u <= kTapsPerPass; ++u) acc[u] = 0.f;
    if (taps > 0) {
      for (int64_t r = begin + (CHANNELS_LAST ? 0 : threadIdx.y); r < end; r += row_step) {
        const int oy = static_cast<int>(r % s.dst_h);
        const int64_t b = r / s.dst_h;
        for (int ox = col_first; ox < s.dst_w; ox += col_step) {
          const int64_t g_off = CHANNELS_LAST ? ((b * s.dst_h + oy) * s.dst_w + ox) * s.C + c
                                              : ((b * s.C + c) * s.dst_h + oy) * s.dst_w + ox;
          const float grad = static_cast<float>(grad_out[g_off]);
          acc[kTapsPerPass] += grad;
#pragma unroll
          for (int u = 0; u < kTapsPerPass; ++u) {
            const int ty = KT > 0 ? u / KT : tap_h[u], tx = KT > 0 ? u % KT : tap_w[u];
            if (ty < 0) continue;
            const int iy = source_pos<false>(oy, ty, g.dh, g.pad_top, s.stride, s.src_h);
            const int ix = source_pos<false>(ox, tx, g.dw, g.pad_left, s.stride, s.src_w);
            if (iy < 0 || ix < 0) continue;
            const int64_t x_off = CHANNELS_LAST ? ((b * s.src_h + iy) * s.src_w + ix) * s.C + c
                                                : ((b * s.C + c) * s.src_h + iy) * s.src_w + ix;
            acc[u] += grad * static_cast<float>(x[x_off]);
          }
        }
      }
    }
    // Fixed-order sums, kSlice sums at a time through shared memory, so that a pass costs a
    // few barriers per kSlice taps rather than per tap. channels_last: over the y-lanes of each
    // channel; NCHW: a tree over the block.
    // The slice loops unroll, so acc[] is indexed with constants and stays in registers.
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    constexpr int kSums = kTapsPerPass + 1;  // the last: the bias gradient, written once
#pragma unroll
    for (int slice = 0; slice < kSums; slice += kSlice) {
#pragma unroll
      for (int v = 0; v < kSlice; ++v)
        if (slice + v < kSums) scratch[v * kThreads + tid] = acc[slice + v];
      __syncthreads();
      if (CHANNELS_LAST) {
        if (threadIdx.y == 0) {
          for (int v = 0; v < kSlice && slice + v < kSums; ++v) {
            float total = 0.f;
            for (int y = 0; y < blockDim.y; ++y) total += scratch[v * kThreads + y * 32 + threadIdx.x];
            scratch[v * kThreads + threadIdx.x] = total;  // only this lane reads it back
          }
        }
      } else {
        for (int half = kThreads / 2; half > 0; half /= 2) {
          if (tid < half)
            for (int v = 0; v < kSlice && slice + v < kSums; ++v)
              scratch[v * kThreads + tid] += scratch[v * kThreads + tid + half];
          __syncthreads();
        }
      }
      const bool writer = CHANNELS_LAST ? threadIdx.y == 0 : tid == 0;
      if (writer && taps > 0) {
        for (int v = 0; v < kSlice && slice + v < kSums; ++v) {
          const int u = slice + v;
          const float total = scratch[v * kThreads + (CHANNELS_LAST ? threadIdx.x : 0)];
          if (u == kTapsPerPass) {
            if (first == 0) db_partial[out_row] = total;
          } else if (first + u < taps) {
            dw_partial[blockIdx.x * n_weights + g.weight_offset + (first + u) * g.channels + (c - g.first)] = total;
          }
        }
      }
      __syncthreads();  // the next slice overwrites the scratch
    }
  }
}

// Grad weight/bias of large kernels (NCHW, stride 1, undilated columns, at least
// kLargeKernelTaps taps in every group), one channel per block, over the same chunks of
// output rows (b*H_out + y) as grad_weight_partial_kernel. The chunk is cut into tiles of up
// to kGwTileH rows of one image by kTileW columns; each tile stages dy and the x window it
// reads (halo included, zeros outside the image) in shared memory. Thread t owns taps
// (i, 4q .. 4q + 3) of its channel's kernel (kh * ceil(kw / 4) <= 248 threads for 31x31) and
// sums them over the whole chunk in registers: along a tile row, its four x values slide by
// one column per output, so each dy value (a broadcast) and one new x value feed four FMAs.
// Each weight is summed by one thread in a fixed order; the bias gradient, shared by the
// threads as they stage dy, is one tree at the end: no atomics, and no thread does the
// bias's adds beside its taps.
constexpr int kGwTileH = 8;
constexpr int kTapsPerThread = 4;
constexpr int kLargeKernelTaps = 81;  // 9x9 and up, as the Triton path
static_assert(kGwTileH * kTileW == kThreads, "each thread stages one dy value per tile and owns one bias share");
// Its launch bounds name 4 blocks (64 registers): with the thread count alone, ptxas held the
// 16-bit instances at 40 registers and spilled.

// Floats per staged x row: the tile's columns, the taps and the last owner's three extra
// columns; odd, so that the four kernel rows a warp covers read four different banks.
__host__ __device__ __forceinline__ int large_window_stride(int kw) {
  return (kTileW + (kw + kTapsPerThread - 1) / kTapsPerThread * kTapsPerThread) | 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 4) grad_weight_large_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ x, const Group* __restrict__ groups,
    const int* __restrict__ group_of, float* __restrict__ dw_partial, float* __restrict__ db_partial,
    int64_t n_weights, int64_t rows, int64_t rows_per_chunk, ConvShape s) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  float* dy_tile = smem;                       // kGwTileH x kTileW
  float* window = smem + kGwTileH * kTileW;    // (kGwTileH + (kh - 1) * dh) x stride
  const int c = blockIdx.y;
  const Group g = groups[group_of[c]];
  if (taps_of(g) == 0) return;  // identity: no weights, no bias gradient (partials stay zero)
  const int stride = large_window_stride(g.kw);
  const int window_rows = kGwTileH + (g.kh - 1) * g.dh;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int quads = (g.kw + kTapsPerThread - 1) / kTapsPerThread;
  const int i = tid / quads, j0 = (tid % quads) * kTapsPerThread;
  const bool owner = i < g.kh;
  float acc[kTapsPerThread] = {0.f, 0.f, 0.f, 0.f};
  float acc_bias = 0.f;
  const int64_t begin = blockIdx.x * rows_per_chunk;
  const int64_t end = min(begin + rows_per_chunk, rows);
  for (int64_t r = begin; r < end;) {
    const int64_t b = r / s.dst_h;
    const int oy = static_cast<int>(r % s.dst_h);
    const int64_t left = end - r;  // rows of this chunk still to do
    const int n = min(left < kGwTileH ? static_cast<int>(left) : kGwTileH, s.dst_h - oy);
    const T* dy_plane = grad_out + (b * s.C + c) * s.dst_h * s.dst_w;
    const T* x_plane = x + (b * s.C + c) * s.src_h * s.src_w;
    for (int x0 = 0; x0 < s.dst_w; x0 += kTileW) {
      for (int e = tid; e < kGwTileH * kTileW; e += kThreads) {
        const int ty = e / kTileW, tx = x0 + e % kTileW;
        const float grad = ty < n && tx < s.dst_w
                               ? static_cast<float>(dy_plane[static_cast<int64_t>(oy + ty) * s.dst_w + tx]) : 0.f;
        dy_tile[e] = grad;
        acc_bias += grad;  // each thread's share of the bias gradient, summed over the block at the end
      }
      for (int e = tid; e < window_rows * stride; e += kThreads) {
        const int sy = oy - g.pad_top + e / stride, sx = x0 - g.pad_left + e % stride;
        window[e] = sy >= 0 && sy < s.src_h && sx >= 0 && sx < s.src_w
                        ? static_cast<float>(x_plane[static_cast<int64_t>(sy) * s.src_w + sx]) : 0.f;
      }
      __syncthreads();
      if (owner) {
        for (int ty = 0; ty < n; ++ty) {
          const float* line = window + (ty + i * g.dh) * stride + j0;
          const float* grads = dy_tile + ty * kTileW;
          float v[kTapsPerThread];
#pragma unroll
          for (int q = 0; q < kTapsPerThread; ++q) v[q] = line[q];
#pragma unroll 4
          for (int tx = 0; tx < kTileW; ++tx) {
            const float d = grads[tx];
#pragma unroll
            for (int q = 0; q < kTapsPerThread; ++q) acc[q] += d * v[q];
#pragma unroll
            for (int q = 0; q + 1 < kTapsPerThread; ++q) v[q] = v[q + 1];
            v[kTapsPerThread - 1] = line[tx + kTapsPerThread];  // the row holds kTileW + 4*quads columns
          }
        }
      }
      __syncthreads();  // the next tile overwrites both
    }
    r += n;
  }
  if (owner) {
#pragma unroll
    for (int q = 0; q < kTapsPerThread; ++q)
      if (j0 + q < g.kw)
        dw_partial[blockIdx.x * n_weights + g.weight_offset + (i * g.kw + j0 + q) * g.channels + (c - g.first)] = acc[q];
  }
  // The bias gradient: the threads' shares in a fixed tree order (the last sync above freed dy_tile).
  dy_tile[tid] = acc_bias;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) dy_tile[tid] += dy_tile[tid + half];
    __syncthreads();
  }
  if (tid == 0) db_partial[blockIdx.x * s.C + c] = dy_tile[0];
}

// The layout decision is always taken from x: a tensor with 1x1 spatial size or one channel
// is 'contiguous' in both formats.
bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

template <typename Fn>
void dispatch_kernel_size(int k, Fn&& fn) {
  switch (k) {
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;  // any other mix, read at run time
  }
}

unsigned grid_z(int64_t count) { return static_cast<unsigned>(std::min<int64_t>(count, kMaxGridZ)); }

// What the host derives from the groups, once per distinct group list and input size: the
// group table and the channel-to-group map on the device, and what the launches need. Checked
// and computed here, never taken from the caller, so a C++ caller cannot pass values that
// disagree with the groups.
struct Plan {
  std::vector<Group> groups;
  at::Tensor device_table;  // the Group rows, then one group index per channel (int32)
  int64_t out_h, out_w;
  int64_t n_weights;        // packed weight elements
  int uniform_kernel;       // K when every group is K x K with K in {3, 5, 7}, else 0
  int channel_run;          // largest power of two <= 8 dividing every group's channel count
  int max_taps;
  const Group* device_groups() const { return reinterpret_cast<const Group*>(device_table.data_ptr<int>()); }
  const int* device_group_of() const { return device_table.data_ptr<int>() + groups.size() * (sizeof(Group) / sizeof(int)); }
};

Plan plan_of(at::IntArrayRef spec, const at::Tensor& x, int64_t stride) {
  TORCH_CHECK_VALUE(!spec.empty() && spec.size() % kSpecInts == 0, "groups must hold ", kSpecInts,
                    " ints per group (channels, kh, kw, dh, dw, pad top, bottom, left, right), got ", spec.size());
  const int64_t height = x.size(2), width = x.size(3);
  Plan p;
  p.n_weights = 0;
  p.max_taps = 1;
  int64_t first = 0;
  std::vector<int> group_of;
  bool uniform = true;
  for (size_t i = 0; i < spec.size() / kSpecInts; ++i) {
    const int64_t* v = spec.data() + i * kSpecInts;
    const int64_t channels = v[0], kh = v[1], kw = v[2], dh = v[3], dw = v[4];
    const bool identity = kh == 0 && kw == 0;
    TORCH_CHECK_VALUE(channels >= 0, "groups[", i, "]: channels must be >= 0, got ", channels);
    TORCH_CHECK_VALUE(identity || (kh >= 1 && kh <= kMaxKernel && kw >= 1 && kw <= kMaxKernel), "groups[", i,
                      "]: kernel must be in [1, ", kMaxKernel, "] on both axes (or 0x0: identity), got ", kh, "x", kw);
    TORCH_CHECK_VALUE(dh >= 1 && dh <= kMaxDilation && dw >= 1 && dw <= kMaxDilation, "groups[", i,
                      "]: dilation must be in [1, ", kMaxDilation, "], got ", dh, "x", dw);
    for (int e = 5; e < 9; ++e)
      TORCH_CHECK_VALUE(v[e] >= 0 && v[e] <= kMaxDilation, "groups[", i, "]: padding must be in [0, ", kMaxDilation,
                        "], got ", v[e]);
    TORCH_CHECK_VALUE(!identity || (stride == 1 && v[5] + v[6] + v[7] + v[8] == 0 && dh == 1 && dw == 1), "groups[", i,
                      "]: an identity group needs stride 1, dilation 1 and no padding");
    // floor((size + pads - span) / stride) + 1, floored as Python does (an empty input with
    // 'same' padding has a numerator of -1 and an empty output).
    const auto out_size = [&](int64_t size, int64_t pads, int64_t span) {
      const int64_t numerator = size + pads - span;
      return (numerator >= 0 ? numerator / stride : -((-numerator + stride - 1) / stride)) + 1;
    };
    const int64_t out_h = identity ? height : out_size(height, v[5] + v[6], dh * (kh - 1) + 1);
    const int64_t out_w = identity ? width : out_size(width, v[7] + v[8], dw * (kw - 1) + 1);
    TORCH_CHECK_VALUE(identity || ((height + v[5] + v[6] - dh * (kh - 1) - 1 >= 0 || height == 0) &&
                                   (width + v[7] + v[8] - dw * (kw - 1) - 1 >= 0 || width == 0)),
                      "groups[", i, "]: the input ", height, "x", width, " is smaller than its dilated kernel");
    if (i == 0) {
      p.out_h = std::max<int64_t>(out_h, 0);
      p.out_w = std::max<int64_t>(out_w, 0);
    }
    TORCH_CHECK_VALUE(std::max<int64_t>(out_h, 0) == p.out_h && std::max<int64_t>(out_w, 0) == p.out_w,
                      "groups[", i, "] gives a ", out_h, "x", out_w, " output, groups[0] ", p.out_h, "x", p.out_w);
    Group g{static_cast<int>(first), checked_int(channels, "group channels"),
            identity ? 1 : static_cast<int>(kh), identity ? 1 : static_cast<int>(kw),
            static_cast<int>(dh), static_cast<int>(dw), static_cast<int>(v[5]), static_cast<int>(v[7]),
            identity ? -1 : checked_int(p.n_weights, "packed weight offset")};
    if (!identity) {
      p.n_weights += channels * kh * kw;
      p.max_taps = std::max<int>(p.max_taps, static_cast<int>(kh * kw));
    }
    uniform = uniform && !identity && kh == kw && kh == spec[1];
    group_of.insert(group_of.end(), channels, static_cast<int>(i));
    p.groups.push_back(g);
    first += channels;
  }
  TORCH_CHECK_VALUE(first == x.size(1), "groups: the channel counts sum to ", first, ", x has C = ", x.size(1));
  p.uniform_kernel = uniform && (spec[1] == 3 || spec[1] == 5 || spec[1] == 7) ? static_cast<int>(spec[1]) : 0;
  p.channel_run = 8;
  for (const Group& g : p.groups)
    while (p.channel_run > 1 && g.channels % p.channel_run != 0) p.channel_run /= 2;
  // The device copy is cached per (device, groups): a model calls with a few group lists, and
  // a host-to-device copy per call would be a synchronising transfer.
  std::vector<int> host;
  for (const Group& g : p.groups)
    host.insert(host.end(), {g.first, g.channels, g.kh, g.kw, g.dh, g.dw, g.pad_top, g.pad_left, g.weight_offset});
  host.insert(host.end(), group_of.begin(), group_of.end());
  static_assert(sizeof(Group) == 9 * sizeof(int), "the table rows are the Group fields");
  static std::mutex mutex;
  static std::map<std::tuple<int, int, std::vector<int>>, at::Tensor> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(static_cast<int>(x.device().type()), static_cast<int>(x.device().index()), host);
  auto found = cache.find(key);
  if (found == cache.end()) {
    if (cache.size() >= 256) cache.clear();
    at::Tensor table = at::tensor(host, at::TensorOptions().dtype(at::kInt));
    found = cache.emplace(std::move(key), table.to(x.device())).first;
  }
  p.device_table = found->second;
  return p;
}

template <typename T, bool TRANSPOSED>
void launch_gather(const at::Tensor& src, const at::Tensor& weight, const T* bias, const Plan& p,
                   at::Tensor& dst, const ConvShape& s, bool channels_last) {
  if (dst.numel() == 0) return;
  const T* src_ptr = src.data_ptr<T>();
  const T* w_ptr = weight.data_ptr<T>();
  const Group* groups = p.device_groups();
  const int* group_of = p.device_group_of();
  T* dst_ptr = dst.data_ptr<T>();
  const int64_t batch = dst.size(0);
  dispatch_kernel_size(p.uniform_kernel, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    if (channels_last) {
      constexpr int kMaxVec = 16 / sizeof(T);
      const bool aligned = reinterpret_cast<uintptr_t>(src_ptr) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(dst_ptr) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(w_ptr) % 16 == 0;
      const bool vector = aligned && p.channel_run >= kMaxVec;
      const int runs = vector ? s.C / kMaxVec : s.C;
      const int lanes_c = std::min(32, 1 << (32 - __builtin_clz((std::max(runs, 1) - 1) | 1)));  // pow2 >= runs
      const dim3 block(lanes_c, kThreads / lanes_c);
      // Rows per block: about sixteen blocks per SM over the GPU, each looping over rows.
      const int64_t row_blocks = ceil_div(runs, block.x) * ceil_div(s.dst_w, block.y);
      const int64_t z = std::min<int64_t>(batch * s.dst_h,
                                          std::max<int64_t>(1, 16 * current_device().sms / row_blocks));
      const dim3 grid(ceil_div(runs, block.x), ceil_div(s.dst_w, block.y), grid_z(z));
      if (vector) {
        launch<gather_nhwc_kernel<T, KT, kMaxVec, TRANSPOSED>>(grid, block, 0, src_ptr, w_ptr, bias, groups,
                                                              group_of, dst_ptr, batch * s.dst_h, s);
      } else {
        launch<gather_nhwc_kernel<T, KT, 1, TRANSPOSED>>(grid, block, 0, src_ptr, w_ptr, bias, groups, group_of,
                                                        dst_ptr, batch * s.dst_h, s);
      }
    } else {
      const dim3 block(32, kThreads / 32);
      const int64_t window = tile_window_floats<TRANSPOSED>(p.groups, s.stride);
      const size_t smem = sizeof(float) * (p.max_taps + window);
      if (smem <= kTileSmemBudget) {
        const dim3 grid(ceil_div(s.dst_w, kTileW), ceil_div(s.dst_h, kTileH), grid_z(batch * s.C));
        launch<gather_nchw_tile_kernel<T, KT, TRANSPOSED>>(grid, block, smem, src_ptr, w_ptr, bias, groups,
                                                           group_of, dst_ptr, batch * s.C, s, p.max_taps,
                                                           static_cast<int>(window));
      } else {
        const dim3 grid(ceil_div(s.dst_w, 32), ceil_div(s.dst_h, block.y), grid_z(batch * s.C));
        launch<gather_nchw_kernel<T, KT, TRANSPOSED>>(grid, block, 0, src_ptr, w_ptr, bias, groups, group_of,
                                                      dst_ptr, batch * s.C, s);
      }
    }
  });
}

// Shared memory of grad_weight_large_kernel for this conv, or 0 where it does not apply: it
// takes NCHW at stride 1 when every group with weights has kLargeKernelTaps taps or more and
// undilated columns, and its staged tiles fit kTileSmemBudget.
size_t large_grad_weight_smem(const Plan& p, bool channels_last, int64_t stride) {
  if (channels_last || stride != 1) return 0;
  int64_t floats = 0;
  bool any = false;
  for (const Group& g : p.groups) {
    if (g.weight_offset < 0) continue;
    if (g.kh * g.kw < kLargeKernelTaps || g.dw != 1) return 0;
    any = true;
    floats = std::max<int64_t>(floats, kGwTileH * kTileW + static_cast<int64_t>(kGwTileH + (g.kh - 1) * g.dh) *
                                                                 large_window_stride(g.kw));
  }
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  return any && bytes <= kTileSmemBudget ? bytes : 0;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  check_device(x, "x");
  check_device(weight, "weight");
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight is on ", weight.device(), ", x on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "x must be NCHW- or channels_last-contiguous");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  for (int d = 1; d < 4; ++d) checked_int(x.size(d), "a dimension of x");
}

void check_weight(const at::Tensor& weight, const Plan& p) {
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.numel() == p.n_weights && weight.is_contiguous(),
                    "weight must be the groups' packed weights: a contiguous 1-D tensor of ", p.n_weights,
                    " elements (sum of channels*kh*kw), got sizes ", weight.sizes());
}

ConvShape shape_of(const at::Tensor& src, const at::Tensor& dst) {
  return ConvShape{static_cast<int>(src.size(1)), static_cast<int>(src.size(2)), static_cast<int>(src.size(3)),
                   static_cast<int>(dst.size(2)), static_cast<int>(dst.size(3)), 0};
}

ConvShape with_stride(ConvShape s, int64_t stride) {
  s.stride = static_cast<int>(stride);
  return s;
}

}  // namespace

at::Tensor grouped_dwconv2d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef groups, int64_t stride) {
  check_inputs(x, weight, stride);
  const Plan p = plan_of(groups, x, stride);
  check_weight(weight, p);
  const DeviceGuard guard(x.device());
  const bool channels_last = is_channels_last(x);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({x.size(0), x.size(1), p.out_h, p.out_w}, x.options().memory_format(format));
  if (bias.has_value()) {
    check_device(*bias, "bias");
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->numel() == x.size(1) &&
                      bias->device() == x.device(), "bias must hold C = ", x.size(1), " elements of x's dtype on ",
                      x.device(), ", got ", bias->numel(), " of ", bias->scalar_type(), " on ", bias->device());
  }
  dispatch_float_types(x.scalar_type(), "grouped_dwconv2d_fwd", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    launch_gather<T, false>(x, weight, b.defined() ? b.data_ptr<T>() : nullptr, p, out,
                            with_stride(shape_of(x, out), stride), channels_last);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_dwconv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef groups,
    int64_t stride) {
  check_inputs(x, weight, stride);
  check_device(grad_out, "grad_out");
  const Plan p = plan_of(groups, x, stride);
  check_weight(weight, p);
  const std::vector<int64_t> out_sizes = {x.size(0), x.size(1), p.out_h, p.out_w};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_sizes), "grad_out must have the forward output's sizes ",
                    at::IntArrayRef(out_sizes), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
                    "grad_out must have x's dtype and device, got ", grad_out.scalar_type(), " on ", grad_out.device());
  const DeviceGuard guard(x.device());
  const bool channels_last = is_channels_last(x);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor g = grad_out.contiguous(format);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(format));
  const int64_t channels = x.size(1);
  const int64_t rows = g.size(0) * g.size(2);  // output rows b*H_out + y
  const int64_t channel_blocks = channels_last ? ceil_div(channels, 32) : channels;
  TORCH_CHECK_VALUE(channel_blocks <= kMaxGridZ, "grouped_dwconv2d_bwd: too many channels (", channels, ")");
  // Enough chunks of rows to fill the GPU a few times; the count depends only on the shape and
  // the device, so the summation order (and the bits) repeat from call to call.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(
      ceil_div(4 * current_device().sms, std::max<int64_t>(channel_blocks, 1)), rows));
  const int64_t rows_per_chunk = std::max<int64_t>(1, ceil_div(rows, chunks));
  const int64_t used_chunks = rows > 0 ? ceil_div(rows, rows_per_chunk) : 0;
  // Zero-filled: identity channels (and an empty input) leave their partials unwritten.
  at::Tensor dw_partial = at::zeros({std::max<int64_t>(used_chunks, 1), p.n_weights}, x.options().dtype(at::kFloat));
  at::Tensor db_partial = at::zeros({std::max<int64_t>(used_chunks, 1), channels}, x.options().dtype(at::kFloat));
  dispatch_float_types(x.scalar_type(), "grouped_dwconv2d_bwd", [&](auto tag) {
    using T = decltype(tag);
    launch_gather<T, true>(g, weight, nullptr, p, grad_x, with_stride(shape_of(g, grad_x), stride), channels_last);
    if (used_chunks == 0 || channels == 0) return;
    const ConvShape s = with_stride(shape_of(x, g), stride);
    const dim3 grid(checked_int(used_chunks, "row chunks"), static_cast<unsigned>(channel_blocks));
    const dim3 block(32, 8);
    const size_t large_smem = large_grad_weight_smem(p, channels_last, stride);
    if (large_smem > 0) {
      launch<grad_weight_large_kernel<T>>(grid, block, large_smem, g.data_ptr<T>(), x.data_ptr<T>(),
                                          p.device_groups(), p.device_group_of(), dw_partial.data_ptr<float>(),
                                          db_partial.data_ptr<float>(), p.n_weights, rows, rows_per_chunk, s);
      return;
    }
    dispatch_kernel_size(p.uniform_kernel, [&](auto kt) {
      constexpr int KT = decltype(kt)::value;
      if (channels_last) {
        launch<grad_weight_partial_kernel<T, KT, true>>(grid, block, 0, g.data_ptr<T>(), x.data_ptr<T>(),
                                                        p.device_groups(), p.device_group_of(),
                                                        dw_partial.data_ptr<float>(), db_partial.data_ptr<float>(),
                                                        p.n_weights, rows, rows_per_chunk, s);
      } else {
        launch<grad_weight_partial_kernel<T, KT, false>>(grid, block, 0, g.data_ptr<T>(), x.data_ptr<T>(),
                                                         p.device_groups(), p.device_group_of(),
                                                         dw_partial.data_ptr<float>(), db_partial.data_ptr<float>(),
                                                         p.n_weights, rows, rows_per_chunk, s);
      }
    });
  });
  return {grad_x, dw_partial.sum(0), db_partial.sum(0)};
}

}  // namespace ultron
