// Tiny kernels, each in a correct and a deliberately broken variant, run through the CUDA
// host simulation (csrc/sim/cuda_sim.h). tests/test_cuda_sim.py builds this file with g++
// (plain and under AddressSanitizer) and checks that every correct variant passes and every
// broken one is caught.
//
// usage: planted_bugs <case> <correct|broken>
// exit 0: results match the host computation; 1: they do not (printed); 2: the simulation
// reported an error (printed).
#include "device.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

using nvcuda::wmma::fragment;

namespace {

constexpr int kBlock = 128;

// Each block reverses its 128 values through shared memory. Broken: no barrier between the
// writes and the reads of other threads' values.
__global__ void reverse_block(const float* in, float* out, bool broken) {
  ULTRON_SHARED_ARRAY(float, tile, kBlock);
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  tile[t] = in[base + t];
  if (!broken) __syncthreads();
  out[base + t] = tile[blockDim.x - 1 - t];
}

// Sums `tiles` tiles through one shared buffer. Broken: no trailing barrier, so a fast
// thread overwrites the buffer with the next tile while others still read this one.
__global__ void sum_tiles(const float* in, float* out, int tiles, bool broken) {
  ULTRON_SHARED_ARRAY(float, tile, kBlock);
  const int t = threadIdx.x;
  float acc = 0.f;
  for (int i = 0; i < tiles; ++i) {
    tile[t] = in[i * kBlock + t];
    __syncthreads();
    acc += tile[kBlock - 1 - t];
    if (!broken) __syncthreads();
  }
  out[t] = acc;
}

// Double-buffered cp.async copies of 128-float tiles, 32 threads x 16 bytes each. Broken:
// waits with two groups pending, so it reads the current tile before its copy completed.
__global__ void async_tiles(const float* in, float* out, int tiles, bool broken) {
  ULTRON_SHARED_ARRAY(float, buffer, 2 * kBlock);
  const int t = threadIdx.x;
  float acc = 0.f;
  ultron::cp_async_16(buffer + 4 * t, in + 4 * t);
  ultron::cp_async_commit();
  for (int i = 0; i < tiles; ++i) {
    if (i + 1 < tiles) ultron::cp_async_16(buffer + ((i + 1) % 2) * kBlock + 4 * t, in + (i + 1) * kBlock + 4 * t);
    ultron::cp_async_commit();
    if (broken) ultron::cp_async_wait<2>();
    else ultron::cp_async_wait<1>();
    __syncthreads();
    for (int j = 0; j < 4; ++j) acc += buffer[(i % 2) * kBlock + (4 * t + 64 + j) % kBlock];
    __syncthreads();
  }
  ultron::cp_async_wait<0>();
  out[t] = acc;
}

// Doubles n values through dynamic shared memory of exactly n floats. Broken: the staging
// loop runs one element too far.
__global__ void stage_dynamic(const float* in, float* out, int n, bool broken) {
  ULTRON_DYNAMIC_SMEM(float, stage);
  for (int i = threadIdx.x; i < n + (broken ? 1 : 0); i += blockDim.x) stage[i] = i < n ? in[i] : 0.f;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = 2.f * stage[n - 1 - i];
}

// out[i] = in[i] + in[i + 1] (the last element: in[i] alone). Broken: the last element also
// reads in[n], one past the end of the buffer.
__global__ void neighbour_sum(const float* in, float* out, int n, bool broken) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = in[i] + (i + 1 < n || broken ? in[i + 1] : 0.f);
}

// out[i] = 3 * in[i]. Broken: stores to out[i + 1], one past the end for the last thread.
__global__ void scale_store(const float* in, float* out, int n, bool broken) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i + (broken ? 1 : 0)] = 3.f * in[i];
}

// Warp sums by butterfly shuffles, one result per warp. Broken: lane 0 waits at a block
// barrier that the rest of its warp, waiting in __syncwarp, never reaches: a deadlock.
__global__ void warp_sums(const float* in, float* out, bool broken) {
  const int t = threadIdx.x, lane = t % 32;
  float v = in[blockIdx.x * blockDim.x + t];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (broken) {
    if (t == 0) __syncthreads();
    else if (t < 32) __syncwarp();
  }
  if (lane == 0) out[blockIdx.x * (blockDim.x / 32) + t / 32] = v;
}

// C (32 x 32, float) = A (32 x 32, bf16, row-major) B (32 x 32, bf16, col-major) by wmma, one
// warp per 16 x 16 tile. Broken: the operands are read at an offset that breaks wmma's
// 32-byte alignment rule.
__global__ void wmma_gemm(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, bool broken) {
  using namespace nvcuda::wmma;
  const int warp = threadIdx.x / 32, row = warp / 2, col = warp % 2;
  fragment<accumulator, 16, 16, 16, float> acc;
  fill_fragment(acc, 0.f);
  const int skew = broken ? 8 : 0;
  for (int k = 0; k < 32; k += 16) {
    fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major> fa;
    fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major> fb;
    load_matrix_sync(fa, a + 16 * row * 32 + k + skew, 32);
    load_matrix_sync(fb, b + 16 * col * 32 + k, 32);
    mma_sync(acc, fa, fb, acc);
  }
  store_matrix_sync(c + 16 * row * 32 + 16 * col, acc, 32, mem_row_major);
}

// A buffer of exactly n floats on the heap, so AddressSanitizer's redzone follows it.
struct Buffer {
  explicit Buffer(size_t n, float fill) : data(new float[n]), size(n) {
    for (size_t i = 0; i < n; ++i) data[i] = fill;
  }
  std::unique_ptr<float[]> data;
  size_t size;
};

Buffer inputs(size_t n) {
  Buffer b(n, 0.f);
  for (size_t i = 0; i < n; ++i) b.data[i] = std::sin(0.37 * i) + 0.01f * (i % 7);
  return b;
}

int compare(const Buffer& got, const std::vector<float>& want) {
  double worst = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(double(got.data[i]) - want[i]);
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  if (worst <= 1e-4) {
    std::printf("PASS\n");
    return 0;
  }
  std::printf("MISMATCH max abs error %g\n", worst);
  return 1;
}

const float kPoisonOut = std::nanf("");

int run_case(const std::string& name, bool broken) {
  using ultron::sim::launch;
  if (name == "missing_barrier") {
    const Buffer in = inputs(2 * kBlock);
    Buffer out(2 * kBlock, kPoisonOut);
    launch("reverse_block", reverse_block, dim3(2), dim3(kBlock), 0, in.data.get(), out.data.get(), broken);
    std::vector<float> want(2 * kBlock);
    for (int i = 0; i < 2 * kBlock; ++i) want[i] = in.data[(i / kBlock) * kBlock + kBlock - 1 - i % kBlock];
    return compare(out, want);
  }
  if (name == "missing_trailing_barrier") {
    const int tiles = 3;
    const Buffer in = inputs(tiles * kBlock);
    Buffer out(kBlock, kPoisonOut);
    launch("sum_tiles", sum_tiles, dim3(1), dim3(kBlock), 0, in.data.get(), out.data.get(), tiles, broken);
    std::vector<float> want(kBlock, 0.f);
    for (int t = 0; t < kBlock; ++t)
      for (int i = 0; i < tiles; ++i) want[t] += in.data[i * kBlock + kBlock - 1 - t];
    return compare(out, want);
  }
  if (name == "early_cp_async_wait") {
    const int tiles = 4;
    const Buffer in = inputs(tiles * kBlock);
    Buffer out(32, kPoisonOut);
    launch("async_tiles", async_tiles, dim3(1), dim3(32), 0, in.data.get(), out.data.get(), tiles, broken);
    std::vector<float> want(32, 0.f);
    for (int t = 0; t < 32; ++t)
      for (int i = 0; i < tiles; ++i)
        for (int j = 0; j < 4; ++j) want[t] += in.data[i * kBlock + (4 * t + 64 + j) % kBlock];
    return compare(out, want);
  }
  if (name == "shared_store_past_end") {
    const int n = 200;
    const Buffer in = inputs(n);
    Buffer out(n, kPoisonOut);
    launch("stage_dynamic", stage_dynamic, dim3(1), dim3(64), n * sizeof(float), in.data.get(), out.data.get(), n,
           broken);
    std::vector<float> want(n);
    for (int i = 0; i < n; ++i) want[i] = 2.f * in.data[n - 1 - i];
    return compare(out, want);
  }
  if (name == "global_read_past_end" || name == "global_store_past_end") {
    const int n = 100;
    const Buffer in = inputs(n);
    Buffer out(n, kPoisonOut);
    std::vector<float> want(n);
    if (name == "global_read_past_end") {
      launch("neighbour_sum", neighbour_sum, dim3(2), dim3(64), 0, in.data.get(), out.data.get(), n, broken);
      for (int i = 0; i < n; ++i) want[i] = in.data[i] + (i + 1 < n ? in.data[i + 1] : 0.f);
    } else {
      launch("scale_store", scale_store, dim3(2), dim3(64), 0, in.data.get(), out.data.get(), n, broken);
      for (int i = 0; i < n; ++i) want[i] = 3.f * in.data[i];
    }
    return compare(out, want);
  }
  if (name == "divergent_barrier") {
    const Buffer in = inputs(2 * kBlock);
    Buffer out(8, kPoisonOut);
    launch("warp_sums", warp_sums, dim3(2), dim3(kBlock), 0, in.data.get(), out.data.get(), broken);
    std::vector<float> want(8, 0.f);
    for (int i = 0; i < 2 * kBlock; ++i) want[i / 32] += in.data[i];
    return compare(out, want);
  }
  if (name == "wmma_misaligned") {
    std::vector<__nv_bfloat16> a(32 * 32 + 16), b(32 * 32);
    const Buffer values = inputs(2 * 32 * 32);
    for (int i = 0; i < 32 * 32; ++i) {
      a[i] = __float2bfloat16(values.data[i]);
      b[i] = __float2bfloat16(values.data[32 * 32 + i]);
    }
    // 32-byte aligned copies of the operands.
    auto* a_aligned = static_cast<__nv_bfloat16*>(std::aligned_alloc(32, a.size() * 2));
    auto* b_aligned = static_cast<__nv_bfloat16*>(std::aligned_alloc(32, b.size() * 2));
    auto* c_aligned = static_cast<float*>(std::aligned_alloc(32, 32 * 32 * 4));
    std::memcpy(a_aligned, a.data(), a.size() * 2);
    std::memcpy(b_aligned, b.data(), b.size() * 2);
    launch("wmma_gemm", wmma_gemm, dim3(1), dim3(128), 0, a_aligned, b_aligned, c_aligned, broken);
    Buffer c(32 * 32, 0.f);
    std::memcpy(c.data.get(), c_aligned, 32 * 32 * 4);
    std::vector<float> want(32 * 32, 0.f);
    for (int i = 0; i < 32; ++i)
      for (int j = 0; j < 32; ++j)
        for (int k = 0; k < 32; ++k)
          want[i * 32 + j] += __bfloat162float(a[i * 32 + k]) * __bfloat162float(b[j * 32 + k]);
    std::free(a_aligned);
    std::free(b_aligned);
    std::free(c_aligned);
    return compare(c, want);
  }
  std::printf("unknown case %s\n", name.c_str());
  return 3;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::string(argv[2]) != "correct" && std::string(argv[2]) != "broken")) {
    std::printf("usage: %s <case> <correct|broken>\n", argv[0]);
    return 3;
  }
  try {
    return run_case(argv[1], std::string(argv[2]) == "broken");
  } catch (const ultron::sim::Error& e) {
    std::printf("SIM ERROR: %s\n", e.what());
    return 2;
  }
}
