// What kernels may use beyond plain CUDA C++, written once for both builds: under nvcc the
// real thing, under -DULTRON_CUDA_SIM the host simulation (sim/cuda_sim.h). No ATen here, so
// the simulation's own tests (tests/test_cuda_sim.py) compile kernels against it alone.
#pragma once

#ifdef ULTRON_CUDA_SIM
#include "sim/cuda_sim.h"
#endif

// Tensor-core kernel bodies need sm_80 (bf16 wmma). Device code for an older architecture
// gets a __trap() instead of a body, and the host only takes the tensor-core path when the
// kernel's code was compiled for sm_80 or newer (kernel_ptx_version), so such a build can
// never return uninitialised output.
#if defined(ULTRON_CUDA_SIM) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define ULTRON_TENSOR_CORE_BODY 1
#else
#define ULTRON_TENSOR_CORE_BODY 0
#endif

// A kernel's dynamic shared memory, 128-byte aligned.
#ifdef ULTRON_CUDA_SIM
#define ULTRON_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::ultron::sim::dynamic_shared_memory())
#else
#define ULTRON_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif

// A static shared array of `count` elements, 16-byte aligned.
#ifdef ULTRON_CUDA_SIM
#define ULTRON_SHARED_ARRAY(type, name, count)   \
  static const char name##_declaration = 0;      \
  type* name = ::ultron::sim::static_shared<type>(&name##_declaration, (count))
#else
#define ULTRON_SHARED_ARRAY(type, name, count) __shared__ __align__(16) type name[count]
#endif

namespace ultron {
#ifndef ULTRON_CUDA_SIM  // the simulation defines these with host bodies
// 16 bytes global -> shared without a register round trip; complete after cp_async_wait.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `Pending` committed groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}
#endif

}  // namespace ultron
