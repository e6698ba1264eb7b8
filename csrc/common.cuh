// Host-side helpers shared by the CUDA kernels of ultron_kernels (ATen tensors, the device
// query, the launch), plus device.cuh.
//
// The same sources build two ways: with nvcc for the GPU (ultron_kernels._C), and as host
// C++ with -DULTRON_CUDA_SIM against the simulation in sim/cuda_sim.h
// (ultron_kernels._C_sim, CPU tensors). Everything that differs between the two lives here,
// in device.cuh or in the simulation header: the device query, the launch, the device guard,
// shared-memory declarations and the inline-PTX helpers. The kernels and their host code
// are the same text.
#pragma once

#include <array>
#include <mutex>
#include <string>

#include <ATen/ATen.h>

#include "device.cuh"

#ifndef ULTRON_CUDA_SIM
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace ultron {

// What the host code needs to know about the current device (the simulated one in the sim).
struct DeviceInfo {
  int index, sms, major, minor;
  int64_t smem_optin;  // shared memory per block with the opt-in attribute
};

inline DeviceInfo current_device() {
#ifdef ULTRON_CUDA_SIM
  const sim::DeviceModel m = sim::device_model();
  return DeviceInfo{0, m.sms, m.major, m.minor, m.smem_optin};
#else
  const auto* p = at::cuda::getCurrentDeviceProperties();
  return DeviceInfo{at::cuda::current_device(), p->multiProcessorCount, p->major, p->minor,
                    static_cast<int64_t>(p->sharedMemPerBlockOptin)};
#endif
}

#ifdef ULTRON_CUDA_SIM
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

// Tensors of the device this build runs on: CUDA, or the CPU under the simulation.
inline void check_device(const at::Tensor& t, const char* name) {
#ifdef ULTRON_CUDA_SIM
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor (ultron_kernels._C_sim runs the CUDA ",
              "kernels on the CPU), got device ", t.device());
#else
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
#endif
}

// Shapes the kernels index with int: a value that does not fit is an error, never a wrap.
inline int checked_int(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value >= 0 && value <= INT32_MAX, what, " = ", value, " does not fit the kernels' 32-bit indexing");
  return static_cast<int>(value);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifdef ULTRON_CUDA_SIM
// "gather_nhwc_kernel<float, 3, 4, false>", from the launch helper's own signature.
template <auto Kernel>
std::string kernel_name() {
  const std::string pretty = __PRETTY_FUNCTION__;
  const std::string key = "Kernel = ";
  const size_t from = pretty.find(key);
  if (from == std::string::npos) return pretty;
  std::string name = pretty.substr(from + key.size());
  name = name.substr(0, name.find_first_of(";]"));  // "; std::string = ...]" follows
  const size_t scope = name.rfind("::", name.find('<'));
  return scope == std::string::npos ? name : name.substr(scope + 2);
}
#endif

// The virtual architecture (e.g. 90) the kernel's code for this device was compiled for:
// what __CUDA_ARCH__ was when its body was compiled.
template <auto Kernel>
int kernel_ptx_version() {
#ifdef ULTRON_CUDA_SIM
  const DeviceInfo d = current_device();
  return d.major * 10 + d.minor;
#else
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, Kernel));
  return attributes.ptxVersion;
#endif
}

constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// Launches Kernel<<<grid, block, smem>>>(args...) on the current stream and checks the
// launch. Above 48 KB of dynamic shared memory, the kernel's limit is raised once per device
// to the device's opt-in maximum (never to a per-call size: two host threads launching with
// different sizes would otherwise race on the attribute).
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, Args&&... args) {
#ifdef ULTRON_CUDA_SIM
  sim::launch(kernel_name<Kernel>(), Kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  const DeviceInfo device = current_device();
  TORCH_CHECK(static_cast<int64_t>(smem) <= device.smem_optin, "a kernel needs ", smem,
              " bytes of shared memory per block; this device allows ", device.smem_optin);
  if (smem > kDefaultDynamicSmem) {
    static std::array<std::once_flag, 64> raised;
    TORCH_CHECK(device.index < static_cast<int>(raised.size()), "device index ", device.index, " >= 64");
    std::call_once(raised[device.index], [&] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(device.smem_optin)));
    });
  }
  Kernel<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Calls FN.template operator()<scalar_t>() for the three dtypes the fused kernels support.
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", dtype, " (float32, float16, bfloat16)");
  }
}

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
