// Host simulation of the CUDA builtins that the kernels in csrc/ use, so that the same .cu
// sources compile as C++ (-DULTRON_CUDA_SIM) and run on CPU tensors: slowly, but through
// the kernels' own code. See the README, "CUDA kernels without a GPU".
//
// Execution model
//  * A launch runs its blocks one after another. Each CUDA thread of a block is a fiber
//    (ucontext) on the calling OS thread; a fiber runs until it reaches a barrier or a warp
//    collective, then the next one runs (in thread order, or reversed with
//    ULTRON_KERNELS_CUDA_SIM_ORDER=reverse). Every thread thus runs as far ahead of the others
//    as the barriers allow: a read that lacks a barrier sees data not yet written.
//  * Shared memory, static and dynamic, is filled with 0xFF bytes (NaN in every float type)
//    at the start of every block, and so is each cp.async destination until its wait_group.
//    Reading shared memory that was not written in this block, or a cp.async destination
//    before its wait, therefore shows up as NaN in the results.
//  * Every rule the GPU enforces at launch is checked (block and grid limits, dynamic shared
//    memory against the simulated device's opt-in limit); so are wmma's pointer and stride
//    rules, warp collectives with exited lanes, barriers that can never complete (deadlock),
//    cp.async copies never waited on, writes past the dynamic shared memory, and __trap.
//    Each is reported as an error that names the kernel, block and thread.
//  * Not modelled: timing, bank conflicts, the memory model (a fiber's writes are visible
//    at once), the hardware's fragment-to-lane layout (fragments are opaque: a kernel that
//    reads frag.x[] does not compile here) and the tensor cores' accumulation order.
//
// The simulated device is set by ULTRON_KERNELS_CUDA_SIM_ARCH (75, 80, 86, 89 or 90, default
// 90: its shared-memory opt-in limit and the architecture the kernels count as compiled for) and ULTRON_KERNELS_CUDA_SIM_SMS (default 4: the host
// code sizes grids from the SM count, so a small count exercises the grid-stride loops and
// the runs of several windows per block).
#pragma once

#ifndef ULTRON_CUDA_SIM
#error "csrc/sim/cuda_sim.h is the host simulation of CUDA; it needs -DULTRON_CUDA_SIM"
#endif

#include <sys/mman.h>
#include <ucontext.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The toolkit's vector types and 16-bit float types are host-usable headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ULTRON_SIM_POISON(addr, bytes) ASAN_POISON_MEMORY_REGION(addr, bytes)
#define ULTRON_SIM_UNPOISON(addr, bytes) ASAN_UNPOISON_MEMORY_REGION(addr, bytes)
#else
#define ULTRON_SIM_POISON(addr, bytes) ((void)(addr), (void)(bytes))
#define ULTRON_SIM_UNPOISON(addr, bytes) ((void)(addr), (void)(bytes))
#endif

// Function qualifiers: everything is host code here.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared arrays are declared with ULTRON_SHARED_ARRAY (common.cuh), which the
// simulation backs with a per-block arena it can poison; a bare __shared__ would be a
// function-static that no block start could reset, so it does not compile here.
#define __shared__ __shared___is_not_simulated__declare_with_ULTRON_SHARED_ARRAY

// Built-in variables. Only one simulated thread runs at a time, so plain globals suffice;
// the scheduler sets threadIdx before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace ultron {
namespace sim {

// What a launch reports when a kernel breaks a rule of the GPU (see the top of this file).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The simulated GPU: what the host code reads from cudaDeviceProp.
struct DeviceModel {
  int sms, major, minor;
  int64_t smem_optin;  // sharedMemPerBlockOptin
};

inline DeviceModel device_model() {
  const char* arch_env = std::getenv("ULTRON_KERNELS_CUDA_SIM_ARCH");
  const char* sms_env = std::getenv("ULTRON_KERNELS_CUDA_SIM_SMS");
  const int arch = arch_env != nullptr && *arch_env ? std::atoi(arch_env) : 90;
  const int sms = sms_env != nullptr && *sms_env ? std::atoi(sms_env) : 4;
  int64_t optin;
  switch (arch) {
    case 75: optin = 64 * 1024; break;  // Turing: no bf16 wmma, so no tensor-core path
    case 80: optin = 163 * 1024; break;
    case 86: case 89: optin = 99 * 1024; break;
    case 90: optin = 227 * 1024; break;
    default:
      throw Error("ULTRON_KERNELS_CUDA_SIM_ARCH must be 75, 80, 86, 89 or 90, got '" +
                  std::string(arch_env) + "'");
  }
  if (sms < 1 || sms > 1024)
    throw Error("ULTRON_KERNELS_CUDA_SIM_SMS must be in [1, 1024], got '" + std::string(sms_env) + "'");
  return DeviceModel{sms, arch / 10, arch % 10, optin};
}

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr size_t kSmemCanary = 256;
constexpr unsigned char kPoison = 0xFF;  // NaN in fp32, fp16 and bf16
enum Wait { kRunnable = 0, kBlockBarrier, kWarpBarrier };

struct PendingCopy {
  void* dst;
  const void* src;
  size_t bytes;
  unsigned group;
};

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  uint3 index;
  bool done = false;
  Wait wait = kRunnable;
  unsigned wait_generation = 0;
  unsigned collectives = 0;  // warp collectives passed: parity of the exchange buffer
  std::vector<PendingCopy> copies;
  unsigned committed_groups = 0;
};

// A barrier's state: how many have arrived, and a generation that advances when the last
// participant arrives (a waiting fiber is runnable again once it has).
struct Barrier {
  unsigned arrived = 0, generation = 0;
  void release() {
    arrived = 0;
    ++generation;
  }
};

struct Warp {
  unsigned lanes = 32, live = 32;
  Barrier barrier;
  uint64_t exchange[2][32];
};

// The one block being simulated, and the launch it belongs to.
struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned threads = 0, live = 0, current = 0;
  Barrier barrier;
  ucontext_t scheduler;
  bool in_fiber = false;
  std::string error;
  std::string kernel;
  std::function<void()> body;
  std::vector<unsigned char> dynamic_smem;
  size_t dynamic_bytes = 0;
  unsigned char* dynamic_base = nullptr;
  // Static shared arrays: offsets in a 128-byte aligned arena, per declaration, per launch.
  alignas(128) unsigned char static_smem[kStaticSmemLimit];
  std::vector<std::pair<const void*, size_t>> static_offsets;
  size_t static_used = 0;
};

inline Block& block() {
  static Block b;
  return b;
}

// One line per launch since the last take_launch_log(): the kernel, grid, block and dynamic
// shared memory. Tests read it to check which of the host code's paths ran.
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}

inline std::vector<std::string> take_launch_log() {
  std::vector<std::string> taken;
  taken.swap(launch_log());
  return taken;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline Fiber& current_fiber() { return block().fibers[block().current]; }

inline std::string where() {
  const Block& b = block();
  std::ostringstream s;
  s << b.kernel << " block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z
    << ") thread (" << threadIdx.x << ", " << threadIdx.y << ", " << threadIdx.z << ")";
  return s.str();
}

inline void yield_to_scheduler() {
  Block& b = block();
  b.in_fiber = false;
  swapcontext(&current_fiber().context, &b.scheduler);
  b.in_fiber = true;
}

// A rule broken inside a kernel: the launch stops and reports it. Never returns.
[[noreturn]] inline void fail(const std::string& what) {
  Block& b = block();
  if (!b.in_fiber) throw Error(what);
  b.error = where() + ": " + what;
  yield_to_scheduler();
  std::abort();  // a failed block is never resumed
}

// The current fiber arrives at `bar`, shared by `participants` fibers: the last one releases
// the others and goes on; the others wait (as `kind`) until it has.
inline void arrive(Barrier& bar, unsigned participants, Wait kind) {
  if (++bar.arrived == participants) {
    bar.release();
    return;
  }
  Fiber& f = current_fiber();
  f.wait = kind;
  f.wait_generation = bar.generation;
  yield_to_scheduler();
}

inline void block_barrier() { arrive(block().barrier, block().live, kBlockBarrier); }

inline Warp& current_warp() { return block().warps[block().current / 32]; }

// Every lane of the warp must arrive (the kernels use full masks); returns once all have.
inline void warp_barrier(const char* what) {
  Warp& w = current_warp();
  if (w.live != w.lanes)
    fail(std::string(what) + " with a full mask in a warp where some lanes have exited");
  arrive(w.barrier, w.lanes, kWarpBarrier);
}

// Lane exchange for the shuffles: each lane deposits its value, all lanes meet, each reads
// its source lane. Two buffers alternate, so a lane that runs on to the next collective
// cannot overwrite a value another lane has yet to read.
inline const uint64_t* warp_exchange(uint64_t bits, const char* what) {
  Warp& w = current_warp();
  Fiber& f = current_fiber();
  const unsigned parity = f.collectives++ & 1u;
  w.exchange[parity][block().current % 32] = bits;
  warp_barrier(what);
  return w.exchange[parity];
}

inline void complete_copies(unsigned keep_groups) {
  Fiber& f = current_fiber();
  size_t kept = 0;
  for (PendingCopy& c : f.copies) {
    if (c.group + keep_groups < f.committed_groups) {
      std::memcpy(c.dst, c.src, c.bytes);
    } else {
      f.copies[kept++] = c;
    }
  }
  f.copies.resize(kept);
}

inline void finish_thread() {
  Block& b = block();
  Fiber& f = current_fiber();
  if (!f.copies.empty()) fail("cp.async copies were never waited on (cp.async.wait_group)");
  Warp& w = current_warp();
  if (w.barrier.arrived > 0) fail("exited while other lanes of its warp wait in a warp collective");
  --w.live;
  f.done = true;
  // __syncthreads counts exited threads as arrived.
  if (--b.live > 0 && b.barrier.arrived == b.live) b.barrier.release();
}

inline void fiber_entry() {
  Block& b = block();
  b.in_fiber = true;
  b.body();
  finish_thread();
  b.in_fiber = false;
  // returning resumes uc_link: the scheduler
}

// The storage of a static shared array; `declaration` identifies it (one per declaration
// and template instance), so every thread of the block gets the same address.
template <typename T>
T* static_shared(const void* declaration, size_t count) {
  Block& b = block();
  for (const auto& entry : b.static_offsets)
    if (entry.first == declaration) return reinterpret_cast<T*>(b.static_smem + entry.second);
  const size_t offset = (b.static_used + 127) / 128 * 128;
  if (offset + count * sizeof(T) > kStaticSmemLimit)
    fail("static shared memory above the 48 KB every GPU allows");
  b.static_offsets.emplace_back(declaration, offset);
  b.static_used = offset + count * sizeof(T);
  return reinterpret_cast<T*>(b.static_smem + offset);
}

inline bool blocked(const Block& b, const Fiber& f, unsigned t) {
  if (f.wait == kBlockBarrier) return b.barrier.generation == f.wait_generation;
  if (f.wait == kWarpBarrier) return b.warps[t / 32].barrier.generation == f.wait_generation;
  return false;
}

inline void run_block(Block& b, uint3 index, bool reverse) {
  blockIdx = index;
  b.live = b.threads;
  b.barrier.arrived = 0;
  b.error.clear();
  for (Warp& w : b.warps) {
    w.live = w.lanes;
    w.barrier.arrived = 0;
  }
  std::memset(b.static_smem, kPoison, sizeof(b.static_smem));
  std::memset(b.dynamic_base, kPoison, b.dynamic_bytes);
  std::memset(b.dynamic_base + b.dynamic_bytes, kPoison, kSmemCanary);
  ULTRON_SIM_POISON(b.dynamic_base + b.dynamic_bytes, kSmemCanary);
  for (unsigned t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    f.done = false;
    f.wait = kRunnable;
    f.collectives = 0;
    f.copies.clear();
    f.committed_groups = 0;
    f.index = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (;;) {
    bool alive = false, progressed = false;
    for (unsigned i = 0; i < b.threads; ++i) {
      const unsigned t = reverse ? b.threads - 1 - i : i;
      Fiber& f = b.fibers[t];
      if (f.done) continue;
      alive = true;
      if (blocked(b, f, t)) continue;
      f.wait = kRunnable;
      b.current = t;
      threadIdx = f.index;
      swapcontext(&b.scheduler, &f.context);
      progressed = true;
      if (!b.error.empty()) throw Error(b.error);
    }
    if (!alive) break;
    if (!progressed) {
      throw Error(b.kernel + " block (" + std::to_string(index.x) + ", " + std::to_string(index.y) +
                  ", " + std::to_string(index.z) +
                  "): deadlock: threads wait at barriers that the others never reach");
    }
  }
  ULTRON_SIM_UNPOISON(b.dynamic_base + b.dynamic_bytes, kSmemCanary);
  for (size_t i = 0; i < kSmemCanary; ++i) {
    if (b.dynamic_base[b.dynamic_bytes + i] != kPoison)
      throw Error(b.kernel + ": wrote past the end of its " + std::to_string(b.dynamic_bytes) +
                  " bytes of dynamic shared memory");
  }
}

inline void prepare_block(Block& b, unsigned threads) {
  while (b.fibers.size() < threads) {
    b.fibers.emplace_back();
    void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stack == MAP_FAILED) throw Error("cuda sim: cannot map a fiber stack");
    b.fibers.back().stack = static_cast<char*>(stack);
  }
  b.threads = threads;
  b.warps.assign((threads + 31) / 32, Warp{});
  for (unsigned w = 0; w < b.warps.size(); ++w) b.warps[w].lanes = std::min(32u, threads - 32 * w);
}

// Runs kernel(args...) over the grid. `name` names the kernel in every report.
template <typename... Params, typename... Args>
void launch(const std::string& name, void (*kernel)(Params...), dim3 grid, dim3 block_dim,
            size_t dynamic_smem, Args&&... args) {
  const DeviceModel device = device_model();
  const uint64_t threads = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  auto refuse = [&](const std::string& why) { throw Error(name + ": launch refused: " + why); };
  if (threads == 0 || threads > 1024 || block_dim.z > 64)
    refuse("block (" + std::to_string(block_dim.x) + ", " + std::to_string(block_dim.y) + ", " +
           std::to_string(block_dim.z) + ") is outside the limits (1..1024 threads, z <= 64)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u)
    refuse("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
           std::to_string(grid.z) + ") is outside the limits");
  if (dynamic_smem > static_cast<size_t>(device.smem_optin))
    refuse(std::to_string(dynamic_smem) + " bytes of dynamic shared memory exceed sm_" +
           std::to_string(device.major * 10 + device.minor) + "'s opt-in limit of " +
           std::to_string(device.smem_optin));
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const std::lock_guard<std::mutex> lock(launch_mutex());
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer's report names the kernel's source line; add the block and thread.
  __sanitizer_set_death_callback([] {
    if (block().in_fiber) std::fprintf(stderr, "ultron cuda sim: in %s\n", where().c_str());
  });
#endif
  Block& b = block();
  b.kernel = name;
  std::ostringstream line;
  line << name << " grid=(" << grid.x << "," << grid.y << "," << grid.z << ") block=(" << block_dim.x << ","
       << block_dim.y << "," << block_dim.z << ") smem=" << dynamic_smem;
  if (launch_log().size() < 10000) launch_log().push_back(line.str());
  b.body = [&] { std::apply(kernel, params); };
  b.dynamic_bytes = dynamic_smem;
  b.dynamic_smem.resize(dynamic_smem + kSmemCanary + 128);
  b.dynamic_base = b.dynamic_smem.data() + (128 - reinterpret_cast<uintptr_t>(b.dynamic_smem.data()) % 128) % 128;
  b.static_offsets.clear();
  b.static_used = 0;
  prepare_block(b, static_cast<unsigned>(threads));
  blockDim = block_dim;
  gridDim = grid;
  const char* order = std::getenv("ULTRON_KERNELS_CUDA_SIM_ORDER");
  const bool reverse = order != nullptr && std::string(order) == "reverse";
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(b, uint3{x, y, z}, reverse);
}

inline unsigned char* dynamic_shared_memory() { return block().dynamic_base; }

template <typename T>
T shuffle(T value, unsigned mask, const char* what, unsigned (*source)(unsigned lane, int arg, int width),
          int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) fail(std::string(what) + ": only full masks are simulated");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(what) + ": width must be a power of two in [1, 32]");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const unsigned lane = block().current % 32;
  const uint64_t* all = warp_exchange(bits, what);
  const uint64_t got = all[source(lane, arg, width)];
  T result;
  std::memcpy(&result, &got, sizeof(T));
  return result;
}

}  // namespace sim
}  // namespace ultron

// ---------------------------------------------------------------- device builtins

inline void __syncthreads() { ultron::sim::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ultron::sim::fail("__syncwarp: only full masks are simulated");
  ultron::sim::warp_barrier("__syncwarp");
}
[[noreturn]] inline void __trap() { ultron::sim::fail("__trap() was called"); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ultron::sim::shuffle(value, mask, "__shfl_xor_sync",
      [](unsigned lane, int m, int w) { return (lane & ~unsigned(w - 1)) | ((lane ^ unsigned(m)) & unsigned(w - 1)); },
      lane_mask, width);
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return ultron::sim::shuffle(value, mask, "__shfl_sync",
      [](unsigned lane, int s, int w) { return (lane & ~unsigned(w - 1)) | (unsigned(s) & unsigned(w - 1)); },
      src_lane, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ultron::sim::shuffle(value, mask, "__shfl_down_sync",
      [](unsigned lane, int d, int w) {
        const unsigned in_segment = (lane & unsigned(w - 1)) + unsigned(d);
        return in_segment < unsigned(w) ? lane + unsigned(d) : lane;
      },
      static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ultron::sim::shuffle(value, mask, "__shfl_up_sync",
      [](unsigned lane, int d, int w) {
        return (lane & unsigned(w - 1)) >= unsigned(d) ? lane - unsigned(d) : lane;
      },
      static_cast<int>(delta), width);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

// ---------------------------------------------------------------- cp.async (deferred copies)

namespace ultron {
// 16 bytes global -> shared, asynchronously: the destination holds poison until the
// cp_async_wait that completes its group.
inline void cp_async_16(void* smem_dst, const void* global_src) {
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 || reinterpret_cast<uintptr_t>(global_src) % 16)
    sim::fail("cp.async of 16 bytes needs 16-byte aligned addresses");
  std::memset(smem_dst, sim::kPoison, 16);
  sim::Fiber& f = sim::current_fiber();
  f.copies.push_back({smem_dst, global_src, 16, f.committed_groups});
}
inline void cp_async_commit() { ++sim::current_fiber().committed_groups; }
// Waits until at most `Pending` committed groups are still in flight.
template <int Pending>
inline void cp_async_wait() { sim::complete_copies(Pending); }
}  // namespace ultron

// ---------------------------------------------------------------- nvcuda::wmma, 16x16x16

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Opaque: each lane holds the whole tile (in float; 16-bit inputs convert exactly).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the simulation has the 16x16x16 shape only");
  float tile[16 * 16];
};

namespace detail {
template <typename T>
void check_operand(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ultron::sim::fail(std::string(what) + ": the pointer must be 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    ultron::sim::fail(std::string(what) + ": ldm must be a multiple of 16 bytes, got " +
                      std::to_string(ldm) + " elements");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Elem>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, Elem value) {
  for (float& e : f.tile) e = static_cast<float>(value);
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "load the accumulator with a layout");
  detail::check_operand(p, ldm, "wmma::load_matrix_sync");
  ultron::sim::warp_barrier("wmma::load_matrix_sync");
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.tile[r * 16 + c] = static_cast<float>(row ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c) {
  static_assert(std::is_same<TA, TB>::value, "A and B must have one element type");
  static_assert(std::is_same<TC, float>::value, "the simulation accumulates in float only");
  ultron::sim::warp_barrier("wmma::mma_sync");
  float result[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.tile[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc += a.tile[i * 16 + k] * b.tile[k * 16 + j];
      result[i * 16 + j] = acc;
    }
  std::memcpy(d.tile, result, sizeof(result));
}

// Each lane stores its own eighth of the tile, as on the GPU: another lane that reads the
// tile without a barrier in between sees elements not yet written.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_operand(p, ldm, "wmma::store_matrix_sync");
  ultron::sim::warp_barrier("wmma::store_matrix_sync");
  const unsigned lane = ultron::sim::block().current % 32;
  for (unsigned e = lane; e < 256; e += 32) {
    const unsigned r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.tile[e];
  }
}
}  // namespace wmma
}  // namespace nvcuda
