// Helpers shared by the CUDA kernels of ultron_kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace ultron {

// Calls FN.template operator()<scalar_t>() for the three dtypes the fused kernels support.
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (float32, float16, bfloat16)");
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Deterministic sum of one float per thread over a block, in a fixed tree order.
// `scratch` holds blockDim.x * blockDim.y floats; the result is valid in thread (0, 0).
__device__ inline float block_sum(float value, float* scratch) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int n = blockDim.x * blockDim.y;
  scratch[tid] = value;
  __syncthreads();
  for (int half = n / 2; half > 0; half /= 2) {
    if (tid < half) scratch[tid] += scratch[tid + half];
    __syncthreads();
  }
  const float total = scratch[0];
  __syncthreads();
  return total;
}

}  // namespace ultron
