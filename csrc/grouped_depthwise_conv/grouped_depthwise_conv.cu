// Channel-wise dilated depthwise convolution: forward, grad input, grad weight/bias.
//
// Every channel c has its own dilation d_c (int32 vector) and zero 'same' padding
// d_c*(K-1)/2. One launch covers every channel.
//  * forward and grad input share one gather kernel per layout: grad input is the forward
//    gather read backwards (o*stride = i + pad - k*d), so there are no atomics;
//  * channels_last: one thread per (pixel, run of VEC channels with equal dilation), one
//    16-byte load per tap;
//  * NCHW: a 32 x 32 output tile per block, its source window and halo (sized by the largest
//    rate) staged once in shared memory; rates whose halo does not fit take a direct kernel
//    (one thread per output, tap re-reads served by L1);
//  * grad weight/bias: per-chunk partial sums reduced in a fixed tree order inside the block,
//    then over chunks by at::sum: bitwise-deterministic.
#include "../common.cuh"

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

namespace ultron {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

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
  int C, src_h, src_w, dst_h, dst_w, stride, k;
};

// Calls visit(sy, sx, tap) for each tap of destination (y, x) whose source lies inside the
// image (the others read the zero padding). K is a compile-time constant after inlining
// whenever the caller's is, so both loops unroll.
template <bool TRANSPOSED, typename Visit>
__device__ __forceinline__ void for_each_source_tap(int y, int x, int d, int pad, int K,
                                                    const ConvShape& s, Visit&& visit) {
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int sy = source_pos<TRANSPOSED>(y, kh, d, pad, s.stride, s.src_h);
    if (sy < 0) continue;
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int sx = source_pos<TRANSPOSED>(x, kw, d, pad, s.stride, s.src_w);
      if (sx >= 0) visit(sy, sx, kh * K + kw);
    }
  }
}

// Grids are 3-D so that no thread divides a 64-bit index per element: z walks rows
// (channels_last: b*H + y) or planes (NCHW: b*C + c), with a grid-stride loop past 65535.
constexpr int kMaxGridZ = 65535;

// channels_last: x-lanes take runs of VEC channels (one dilation each), y-lanes take output
// columns; grid (runs / blockDim.x, W_dst / blockDim.y, rows), each block looping over rows.
// For a compile-time K the block first stages its channels' weights tap-major in shared
// memory, so a tap's VEC weights are one 16-byte shared load rather than VEC scattered
// global loads (the instruction count that would otherwise bound the kernel).
template <typename T, int KT, int VEC, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads) gather_nhwc_kernel(
    const T* __restrict__ src, const T* __restrict__ weight, const T* __restrict__ bias,
    const int* __restrict__ dilation, T* __restrict__ dst, int64_t rows, ConvShape s) {
  ULTRON_SHARED_ARRAY(T, staged, KT > 0 ? KT * KT * 32 * VEC : 1);  // [tap][block channel]
  const int K = KT > 0 ? KT : s.k;
  const int block_channels = blockDim.x * VEC;
  if (KT > 0) {
    const int first = blockIdx.x * block_channels;
    for (int e = threadIdx.y * blockDim.x + threadIdx.x; e < KT * KT * block_channels;
         e += blockDim.x * blockDim.y) {
      const int tap = e / block_channels, c = first + e % block_channels;
      staged[e] = c < s.C ? weight[c * KT * KT + tap] : static_cast<T>(0.f);
    }
    __syncthreads();
  }
  const int run = blockIdx.x * blockDim.x + threadIdx.x;
  const int x = blockIdx.y * blockDim.y + threadIdx.y;
  if (run >= s.C / VEC || x >= s.dst_w) return;  // no block-wide synchronisation below
  const int c0 = run * VEC;
  const int d = dilation[c0];
  const int pad = d * (K / 2);
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
    for_each_source_tap<TRANSPOSED>(y, x, d, pad, K, s, [&](int sy, int sx, int tap) {
      const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(
          image + (static_cast<int64_t>(sy) * s.src_w + sx) * s.C);
      Pack<T, VEC> w;
      if (KT > 0) {
        w = *reinterpret_cast<const Pack<T, VEC>*>(staged + tap * block_channels + threadIdx.x * VEC);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) w.v[v] = weight[(c0 + v) * K * K + tap];
      }
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
// H_dst / 8, planes); tap re-reads are served by L1. Taken when a channel's halo is too large
// for the shared-memory tile below.
template <typename T, int KT, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads) gather_nchw_kernel(
    const T* __restrict__ src, const T* __restrict__ weight, const T* __restrict__ bias,
    const int* __restrict__ dilation, T* __restrict__ dst, int64_t planes, ConvShape s) {
  const int K = KT > 0 ? KT : s.k;
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= s.dst_w || y >= s.dst_h) return;  // no block-wide synchronisation below
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {  // plane = b*C + c
    const int c = static_cast<int>(plane % s.C);
    const int d = dilation[c];
    const int pad = d * (K / 2);
    const T* w = weight + c * K * K;
    float acc = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
    const T* image = src + plane * s.src_h * s.src_w;
    for_each_source_tap<TRANSPOSED>(y, x, d, pad, K, s, [&](int sy, int sx, int tap) {
      acc += static_cast<float>(image[static_cast<int64_t>(sy) * s.src_w + sx]) *
             static_cast<float>(w[tap]);
    });
    dst[(plane * s.dst_h + y) * s.dst_w + x] = static_cast<T>(acc);
  }
}

// NCHW, shared-memory tile: a (32, 8) block computes a kTileW x kTileH output tile of one
// plane (kTileH / 8 rows per thread). The source window the tile reads, halo included, is
// loaded once, coalesced, with zeros where it leaves the image, so the K*K taps then read
// shared memory with no bounds checks. grid (W_dst / kTileW, H_dst / kTileH, planes).
constexpr int kTileW = 32, kTileH = 32;
// Shared memory per block up to which the tile kernel runs (7 blocks of 256 threads per SM).
constexpr size_t kTileSmemBudget = 32 * 1024;

// floor(a / stride) for stride 1 or 2, negative a included (arithmetic shift).
__host__ __device__ __forceinline__ int floor_div_stride(int a, int stride) { return a >> (stride - 1); }

// First source position and extent, along one axis, read by destination positions
// [first, last] of a channel with padding `pad`.
template <bool TRANSPOSED>
__host__ __device__ __forceinline__ int2 source_span(int first, int last, int pad, int stride) {
  if (TRANSPOSED) {  // src*stride = pos + pad - k*d, k*d in [0, 2*pad]
    const int lo = floor_div_stride(first - pad, stride);
    return make_int2(lo, floor_div_stride(last + pad, stride) - lo + 1);
  }
  return make_int2(first * stride - pad, (last - first) * stride + 1 + 2 * pad);
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

// Shared memory of the tile kernel: the K*K weights, then the largest source window.
template <bool TRANSPOSED>
size_t tile_smem_bytes(int k, int max_dilation, int stride) {
  const int pad = max_dilation * (k / 2);
  const int2 rows = source_span<TRANSPOSED>(0, kTileH - 1, pad, stride);
  const int2 cols = source_span<TRANSPOSED>(0, kTileW - 1, pad, stride);
  return sizeof(float) * (static_cast<size_t>(k) * k + static_cast<size_t>(rows.y) * cols.y);
}

template <typename T, int KT, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads) gather_nchw_tile_kernel(
    const T* __restrict__ src, const T* __restrict__ weight, const T* __restrict__ bias,
    const int* __restrict__ dilation, T* __restrict__ dst, int64_t planes, ConvShape s,
    int window_capacity) {
  ULTRON_DYNAMIC_SMEM(float, smem);
  const int K = KT > 0 ? KT : s.k;
  float* taps = smem;
  float* window = smem + K * K;
  const int x0 = blockIdx.x * kTileW, y0 = blockIdx.y * kTileH;
  const int x_last = min(x0 + kTileW, s.dst_w) - 1, y_last = min(y0 + kTileH, s.dst_h) - 1;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {  // plane = b*C + c
    const int c = static_cast<int>(plane % s.C);
    const int d = dilation[c];
    const int pad = d * (K / 2);
    const int2 rows = source_span<TRANSPOSED>(y0, y_last, pad, s.stride);
    const int2 cols = source_span<TRANSPOSED>(x0, x_last, pad, s.stride);
    if (rows.y * cols.y > window_capacity) __trap();  // max_dilation was below this rate
    const T* image = src + plane * s.src_h * s.src_w;
    for (int e = tid; e < K * K; e += kThreads) taps[e] = static_cast<float>(weight[c * K * K + e]);
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
    const int x = x0 + threadIdx.x;
    const float b = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
    for (int y = y0 + threadIdx.y; x <= x_last && y <= y_last; y += blockDim.y) {
      float acc = b;
#pragma unroll
      for (int kh = 0; kh < K; ++kh) {
        const int wy = window_pos<TRANSPOSED>(y, kh, d, pad, s.stride, rows.x);
        if (TRANSPOSED && wy < 0) continue;  // forward taps always land inside
        const float* line = window + wy * cols.y;
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const int wx = window_pos<TRANSPOSED>(x, kw, d, pad, s.stride, cols.x);
          if (TRANSPOSED && wx < 0) continue;
          acc += line[wx] * (KT > 0 ? w[kh * K + kw] : taps[kh * K + kw]);
        }
      }
      dst[(plane * s.dst_h + y) * s.dst_w + x] = static_cast<T>(acc);
    }
    __syncthreads();  // the next plane overwrites the window
  }
}

// Grad weight/bias partial sums of one chunk of output rows (b*H_out + y), block (32, 8).
// channels_last: x-lanes take 32 consecutive channels, y-lanes stride over columns. NCHW:
// one channel per block, x-lanes stride over columns, y-lanes over the chunk's rows.
// For K in {3, 5, 7} all taps accumulate in registers in one pass over grad_out; other K take
// one pass per tap. Each sum is reduced in a fixed order: dw_partial[chunk, c, tap],
// db_partial[chunk, c].
template <typename T, int KT, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads) grad_weight_partial_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ x, const int* __restrict__ dilation,
    float* __restrict__ dw_partial, float* __restrict__ db_partial, int64_t rows,
    int64_t rows_per_chunk, ConvShape s) {
  constexpr int kTapsPerPass = KT > 0 ? KT * KT : 1;
  ULTRON_SHARED_ARRAY(float, scratch, kThreads);
  const int K = KT > 0 ? KT : s.k;
  const int c = CHANNELS_LAST ? blockIdx.y * 32 + threadIdx.x : blockIdx.y;
  const bool channel_ok = c < s.C;
  const int d = channel_ok ? dilation[c] : 1;
  const int pad = d * (K / 2);
  const int64_t begin = blockIdx.x * rows_per_chunk;
  const int64_t end = min(begin + rows_per_chunk, rows);
  const int row_step = CHANNELS_LAST ? 1 : blockDim.y;
  const int col_first = CHANNELS_LAST ? threadIdx.y : threadIdx.x;
  const int col_step = CHANNELS_LAST ? blockDim.y : blockDim.x;
  // src = x (H, W); dst = grad_out (H_out, W_out).
  for (int first = 0; first < K * K; first += kTapsPerPass) {
    float acc[kTapsPerPass + 1];  // the last one: the bias gradient (first pass only)
#pragma unroll
    for (int u = 0; u <= kTapsPerPass; ++u) acc[u] = 0.f;
    if (channel_ok) {
      for (int64_t r = begin + (CHANNELS_LAST ? 0 : threadIdx.y); r < end; r += row_step) {
        const int oy = static_cast<int>(r % s.dst_h);
        const int64_t b = r / s.dst_h;
        for (int ox = col_first; ox < s.dst_w; ox += col_step) {
          const int64_t g_off = CHANNELS_LAST ? ((b * s.dst_h + oy) * s.dst_w + ox) * s.C + c
                                              : ((b * s.C + c) * s.dst_h + oy) * s.dst_w + ox;
          const float g = static_cast<float>(grad_out[g_off]);
          acc[kTapsPerPass] += g;
#pragma unroll
          for (int u = 0; u < kTapsPerPass; ++u) {
            const int tap = first + u;
            const int iy = source_pos<false>(oy, tap / K, d, pad, s.stride, s.src_h);
            const int ix = source_pos<false>(ox, tap % K, d, pad, s.stride, s.src_w);
            if (iy < 0 || ix < 0) continue;
            const int64_t x_off = CHANNELS_LAST ? ((b * s.src_h + iy) * s.src_w + ix) * s.C + c
                                                : ((b * s.C + c) * s.src_h + iy) * s.src_w + ix;
            acc[u] += g * static_cast<float>(x[x_off]);
          }
        }
      }
    }
    const bool writer = CHANNELS_LAST ? threadIdx.y == 0 : (threadIdx.x == 0 && threadIdx.y == 0);
    const int64_t out_row = blockIdx.x * static_cast<int64_t>(s.C) + c;
#pragma unroll
    for (int u = 0; u <= kTapsPerPass; ++u) {
      if (u == kTapsPerPass && first != 0) break;  // the bias gradient, once
      float total;
      if (CHANNELS_LAST) {  // fixed-order sum over the y-lanes of each channel
        scratch[threadIdx.y * 32 + threadIdx.x] = acc[u];
        __syncthreads();
        total = 0.f;
        if (threadIdx.y == 0)
          for (int y = 0; y < blockDim.y; ++y) total += scratch[y * 32 + threadIdx.x];
        __syncthreads();
      } else {
        total = block_sum(acc[u], scratch);
      }
      if (writer && channel_ok) {
        if (u == kTapsPerPass) db_partial[out_row] = total;
        else dw_partial[out_row * K * K + first + u] = total;
      }
    }
  }
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
    default: fn(std::integral_constant<int, 0>{}); break;  // any other odd K, read at run time
  }
}

unsigned grid_z(int64_t count) { return static_cast<unsigned>(std::min<int64_t>(count, kMaxGridZ)); }

// What the host derives from the rates, once per distinct rate list: the rates as an int32
// tensor on the device, the channel run (the largest power of two <= 8 such that every
// aligned run of that many channels shares one rate: the channels_last vector width) and
// the largest rate (it sizes the NCHW tile's halo). Computed here, never taken from the
// caller, so a C++ caller cannot pass values that disagree with the rates.
struct Rates {
  at::Tensor device_rates;
  int channel_run;
  int max_dilation;
};

Rates rates_of(at::IntArrayRef dilation, const at::Tensor& x) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(dilation.size()) == x.size(1), "dilation must have one rate per channel (",
              x.size(1), "), got ", dilation.size());
  std::vector<int> rates(dilation.size());
  for (size_t c = 0; c < dilation.size(); ++c) {
    TORCH_CHECK_VALUE(dilation[c] >= 1 && dilation[c] < (1 << 20), "dilation[", c, "] must be in [1, 2^20), got ",
                dilation[c]);
    rates[c] = static_cast<int>(dilation[c]);
  }
  int run = 8;
  auto run_holds = [&](int r) {
    if (rates.size() % r != 0) return false;
    for (size_t c = 0; c < rates.size(); ++c)
      if (rates[c] != rates[c - c % r]) return false;
    return true;
  };
  while (run > 1 && !run_holds(run)) run /= 2;
  const int max_dilation = rates.empty() ? 1 : *std::max_element(rates.begin(), rates.end());
  // The device copy is cached per (device, rates): a model calls with a few rate lists, and a
  // host-to-device copy per call would be a synchronising transfer.
  static std::mutex mutex;
  static std::map<std::tuple<int, int, std::vector<int>>, at::Tensor> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(static_cast<int>(x.device().type()), static_cast<int>(x.device().index()), rates);
  auto found = cache.find(key);
  if (found == cache.end()) {
    if (cache.size() >= 256) cache.clear();
    at::Tensor host = at::tensor(rates, at::TensorOptions().dtype(at::kInt));
    found = cache.emplace(std::move(key), host.to(x.device())).first;
  }
  return Rates{found->second, run, max_dilation};
}

template <typename T, bool TRANSPOSED>
void launch_gather(const at::Tensor& src, const at::Tensor& weight, const T* bias, const Rates& rates,
                   at::Tensor& dst, const ConvShape& s, bool channels_last) {
  if (dst.numel() == 0) return;
  const T* src_ptr = src.data_ptr<T>();
  const T* w_ptr = weight.data_ptr<T>();
  const int* d_ptr = rates.device_rates.data_ptr<int>();
  T* dst_ptr = dst.data_ptr<T>();
  const int64_t batch = dst.size(0);
  dispatch_kernel_size(s.k, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    if (channels_last) {
      constexpr int kMaxVec = 16 / sizeof(T);
      const bool aligned = reinterpret_cast<uintptr_t>(src_ptr) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(dst_ptr) % 16 == 0;
      const bool vector = aligned && rates.channel_run >= kMaxVec && s.C % kMaxVec == 0;
      const int runs = vector ? s.C / kMaxVec : s.C;
      const int lanes_c = std::min(32, 1 << (32 - __builtin_clz((std::max(runs, 1) - 1) | 1)));  // pow2 >= runs
      const dim3 block(lanes_c, kThreads / lanes_c);
      // Rows per block: about two waves of blocks over the GPU, so the weight staging is
      // paid a few times per block rather than once per row.
      const int64_t row_blocks = ceil_div(runs, block.x) * ceil_div(s.dst_w, block.y);
      const int64_t z = std::min<int64_t>(batch * s.dst_h,
                                          std::max<int64_t>(1, 16 * current_device().sms / row_blocks));
      const dim3 grid(ceil_div(runs, block.x), ceil_div(s.dst_w, block.y), grid_z(z));
      if (vector) {
        launch<gather_nhwc_kernel<T, KT, kMaxVec, TRANSPOSED>>(grid, block, 0, src_ptr, w_ptr, bias, d_ptr,
                                                              dst_ptr, batch * s.dst_h, s);
      } else {
        launch<gather_nhwc_kernel<T, KT, 1, TRANSPOSED>>(grid, block, 0, src_ptr, w_ptr, bias, d_ptr, dst_ptr,
                                                        batch * s.dst_h, s);
      }
    } else {
      const dim3 block(32, kThreads / 32);
      const size_t smem = tile_smem_bytes<TRANSPOSED>(s.k, rates.max_dilation, s.stride);
      if (smem <= kTileSmemBudget) {
        const dim3 grid(ceil_div(s.dst_w, kTileW), ceil_div(s.dst_h, kTileH), grid_z(batch * s.C));
        const int capacity = static_cast<int>(smem / sizeof(float)) - s.k * s.k;
        launch<gather_nchw_tile_kernel<T, KT, TRANSPOSED>>(grid, block, smem, src_ptr, w_ptr, bias, d_ptr,
                                                           dst_ptr, batch * s.C, s, capacity);
      } else {
        const dim3 grid(ceil_div(s.dst_w, 32), ceil_div(s.dst_h, block.y), grid_z(batch * s.C));
        launch<gather_nchw_kernel<T, KT, TRANSPOSED>>(grid, block, 0, src_ptr, w_ptr, bias, d_ptr, dst_ptr,
                                                      batch * s.C, s);
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  check_device(x, "x");
  check_device(weight, "weight");
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight is on ", weight.device(), ", x on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "x must be NCHW- or channels_last-contiguous");
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == x.size(1) && weight.size(1) == weight.size(2) &&
              weight.size(1) % 2 == 1 && weight.is_contiguous(),
              "weight must be a contiguous (C, K, K) tensor with K odd, got sizes ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  for (int d = 1; d < 4; ++d) checked_int(x.size(d), "a dimension of x");
}

ConvShape shape_of(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& weight,
                   int64_t stride) {
  return ConvShape{static_cast<int>(src.size(1)), static_cast<int>(src.size(2)),
                   static_cast<int>(src.size(3)), static_cast<int>(dst.size(2)),
                   static_cast<int>(dst.size(3)), static_cast<int>(stride),
                   static_cast<int>(weight.size(-1))};
}

}  // namespace

at::Tensor dilated_conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef dilation,
                              int64_t stride) {
  check_inputs(x, weight, stride);
  const Rates rates = rates_of(dilation, x);
  const DeviceGuard guard(x.device());
  const bool channels_last = is_channels_last(x);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({x.size(0), x.size(1), ceil_div(x.size(2), stride), ceil_div(x.size(3), stride)},
                             x.options().memory_format(format));
  if (bias.has_value()) {
    check_device(*bias, "bias");
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->numel() == x.size(1) &&
                bias->device() == x.device(), "bias must hold C = ", x.size(1), " elements of x's dtype on ",
                x.device(), ", got ", bias->numel(), " of ", bias->scalar_type(), " on ", bias->device());
  }
  dispatch_float_types(x.scalar_type(), "dilated_conv2d_fwd", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    launch_gather<T, false>(x, weight, b.defined() ? b.data_ptr<T>() : nullptr, rates, out,
                            shape_of(x, out, weight, stride), channels_last);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dilated_conv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef dilation,
    int64_t stride) {
  check_inputs(x, weight, stride);
  check_device(grad_out, "grad_out");
  const Rates rates = rates_of(dilation, x);
  // ceil(H / stride): the 'same' output size, 0 for an empty plane.
  const std::vector<int64_t> out_sizes = {x.size(0), x.size(1), ceil_div(x.size(2), stride),
                                          ceil_div(x.size(3), stride)};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_sizes), "grad_out must have the forward output's sizes ",
              at::IntArrayRef(out_sizes), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "grad_out must have x's dtype and device, got ", grad_out.scalar_type(), " on ", grad_out.device());
  const DeviceGuard guard(x.device());
  const bool channels_last = is_channels_last(x);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor g = grad_out.contiguous(format);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(format));
  const int64_t channels = x.size(1), taps = weight.size(-1) * weight.size(-1);
  const int64_t rows = g.size(0) * g.size(2);  // output rows b*H_out + y
  const int64_t channel_blocks = channels_last ? ceil_div(channels, 32) : channels;
  TORCH_CHECK_VALUE(channel_blocks <= kMaxGridZ, "dilated_conv2d_bwd: too many channels (", channels, ")");
  // Enough chunks of rows to fill the GPU a few times; the count depends only on the shape and
  // the device, so the summation order (and the bits) repeat from call to call.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(
      ceil_div(4 * current_device().sms, std::max<int64_t>(channel_blocks, 1)), rows));
  const int64_t rows_per_chunk = std::max<int64_t>(1, ceil_div(rows, chunks));
  const int64_t used_chunks = rows > 0 ? ceil_div(rows, rows_per_chunk) : 0;
  at::Tensor dw_partial = at::zeros({std::max<int64_t>(used_chunks, 1), channels, taps},
                                    x.options().dtype(at::kFloat));
  at::Tensor db_partial = at::zeros({std::max<int64_t>(used_chunks, 1), channels},
                                    x.options().dtype(at::kFloat));
  dispatch_float_types(x.scalar_type(), "dilated_conv2d_bwd", [&](auto tag) {
    using T = decltype(tag);
    launch_gather<T, true>(g, weight, nullptr, rates, grad_x, shape_of(g, grad_x, weight, stride), channels_last);
    if (used_chunks == 0 || channels == 0) return;
    const ConvShape s = shape_of(x, g, weight, stride);
    const dim3 grid(checked_int(used_chunks, "row chunks"), static_cast<unsigned>(channel_blocks));
    const dim3 block(32, 8);
    const int* d_ptr = rates.device_rates.data_ptr<int>();
    dispatch_kernel_size(s.k, [&](auto kt) {
      constexpr int KT = decltype(kt)::value;
      if (channels_last) {
        launch<grad_weight_partial_kernel<T, KT, true>>(grid, block, 0, g.data_ptr<T>(), x.data_ptr<T>(), d_ptr,
                                                        dw_partial.data_ptr<float>(), db_partial.data_ptr<float>(),
                                                        rows, rows_per_chunk, s);
      } else {
        launch<grad_weight_partial_kernel<T, KT, false>>(grid, block, 0, g.data_ptr<T>(), x.data_ptr<T>(), d_ptr,
                                                         dw_partial.data_ptr<float>(), db_partial.data_ptr<float>(),
                                                         rows, rows_per_chunk, s);
      }
    });
  });
  return {grad_x, dw_partial.sum(0).view(weight.sizes()), db_partial.sum(0)};
}

}  // namespace ultron
