// Resident blocks per SM from NVIDIA's host-only occupancy calculator (cuda_occupancy.h),
// for a device described on the command line instead of a present GPU (tools/gpu_archs.py).
// stdin, one kernel per line: "major minor threads_per_sm smem_per_sm smem_optin regs threads
// static_smem dynamic_smem"; stdout, one line each: "blocks limiting_factors".
#include <cuda_occupancy.h>

#include <cstdio>

int main() {
  int major, minor, threads_per_sm, regs, threads;
  long smem_per_sm, smem_optin, static_smem, dynamic_smem;
  while (std::scanf("%d %d %d %ld %ld %d %d %ld %ld", &major, &minor, &threads_per_sm, &smem_per_sm,
                    &smem_optin, &regs, &threads, &static_smem, &dynamic_smem) == 9) {
    cudaOccDeviceProp device{};
    device.computeMajor = major;
    device.computeMinor = minor;
    device.maxThreadsPerBlock = 1024;
    device.maxThreadsPerMultiprocessor = threads_per_sm;
    device.regsPerBlock = 65536;
    device.regsPerMultiprocessor = 65536;
    device.warpSize = 32;
    device.sharedMemPerBlock = 49152;
    device.sharedMemPerMultiprocessor = static_cast<size_t>(smem_per_sm);
    device.sharedMemPerBlockOptin = static_cast<size_t>(smem_optin);
    device.reservedSharedMemPerBlock = 1024;
    device.numSms = 1;
    cudaOccFuncAttributes kernel{};
    kernel.maxThreadsPerBlock = 1024;
    kernel.numRegs = regs;
    kernel.sharedSizeBytes = static_cast<size_t>(static_smem);
    kernel.partitionedGCConfig = PARTITIONED_GC_OFF;
    kernel.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN;
    kernel.maxDynamicSharedSizeBytes = static_cast<int>(smem_optin - static_smem);
    cudaOccDeviceState state{};
    cudaOccResult result{};
    cudaOccError error = cudaOccMaxActiveBlocksPerMultiprocessor(&result, &device, &kernel, &state,
                                                                 threads, static_cast<size_t>(dynamic_smem));
    std::printf("%d %d\n", error == CUDA_OCC_SUCCESS ? result.activeBlocksPerMultiprocessor : -1,
                result.limitingFactors);
  }
  return 0;
}
