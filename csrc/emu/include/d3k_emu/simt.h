// The SIMT emulation layer of the emulated build (D3K_EMU): csrc/ device code
// compiled by the host C++ compiler runs here, on the CPU, unchanged.
//
// Model:
// - A launch runs synchronously on the calling OS thread. Its blocks run one
//   after another, in a seeded random order, so "the last block combines"
//   patterns work and cross-block order dependence shows up as a seed-dependent
//   result.
// - Each CUDA thread of a block is a fiber (own stack, hand-written context
//   switch). A fiber runs until it reaches __syncthreads() or a warp exchange
//   (__shfl_*_sync), or returns. Barriers release their waiters in a seeded
//   random order, so a missing __syncthreads() gives seed-dependent results.
// - Checked and reported as an error (the launch returns cudaErrorLaunchFailure
//   or cudaErrorIllegalAddress, and the message says where):
//   __syncthreads() or a full-warp exchange reached while some threads of the
//   block / lanes of the warp have exited, a deadlock (threads waiting at
//   different barriers), a partial-warp mask, a fiber stack overflow, and any
//   access that faults (SIGSEGV / SIGBUS) inside a kernel, e.g. one that runs
//   into the PROT_NONE guard page of a guarded buffer (d3kernels/guarded.py).
// - Dynamic shared memory is filled with 0xff bytes (NaN as floats) before each
//   block, so reading an element no thread wrote poisons the result.
// - PDL (griddepcontrol) and L2 prefetches are no-ops; __threadfence() is a
//   fence; atomics are plain read-modify-writes (one OS thread).
// Not modelled: the memory model across blocks (blocks do not overlap), PDL
// ordering, timing, and sub-warp divergence (a fiber runs until it blocks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "d3k_emu/types.h"

// ---------------------------------------------------------------- runtime types
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
using cudaStream_t = struct CUstream_st*;

enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

enum cudaLaunchAttributeID : int { cudaLaunchAttributeProgrammaticStreamSerialization = 5 };
union cudaLaunchAttributeValue {
  unsigned programmaticStreamSerializationAllowed;
  char pad[64];
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
  int maxThreadsPerBlock;
};
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  size_t totalGlobalMem;
};

// The "device" the emulation reports: compute capability 9.0, so the launchers
// take their sm_90 paths (PDL attributes included), with D3K_EMU_SM_COUNT SMs
// (default 132, an H100 SXM), which sizes the grids as on that GPU.
#define CUDART_VERSION 13000

namespace d3k_emu {

void syncthreads();
// Warp exchange: this lane contributes `v` (sizeof <= 8) and receives lane src_of(lane)'s value.
enum class Shfl { kIdx, kXor, kDown, kUp };
void shfl(unsigned mask, const void* v, void* out, size_t size, Shfl kind, int arg, int width);
void* dynamic_smem();

// One grid launch. `body` runs the kernel for the current thread (a fiber).
struct KernelBody {
  void (*fn)(void*);
  void* ctx;
};
cudaError_t launch_grid(dim3 grid, dim3 block, size_t smem, KernelBody body);

// Last error of this OS thread (cudaGetLastError clears it); message of the last failed launch.
cudaError_t take_last_error();
cudaError_t peek_last_error();
const char* last_error_message();

}  // namespace d3k_emu

// The built-in index variables: per OS thread, set by the scheduler before it
// resumes a fiber (all fibers of a block share one OS thread).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// ---------------------------------------------------------------- device API
inline void __syncthreads() { d3k_emu::syncthreads(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
inline T d3k_emu_shfl(unsigned mask, T v, d3k_emu::Shfl kind, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp exchange of a type > 8 bytes");
  T r;
  d3k_emu::shfl(mask, &v, &r, sizeof(T), kind, arg, width);
  return r;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return d3k_emu_shfl(mask, v, d3k_emu::Shfl::kIdx, src_lane, width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return d3k_emu_shfl(mask, v, d3k_emu::Shfl::kXor, lane_mask, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return d3k_emu_shfl(mask, v, d3k_emu::Shfl::kDown, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return d3k_emu_shfl(mask, v, d3k_emu::Shfl::kUp, static_cast<int>(delta), width);
}

// One OS thread runs every fiber, and a fiber is never preempted: plain read-modify-writes.
inline int atomicAdd(int* p, int v) { const int o = *p; *p = o + v; return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned o = *p; *p = o + v; return o; }
inline float atomicAdd(float* p, float v) { const float o = *p; *p = o + v; return o; }

// ---------------------------------------------------------------- runtime API
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);

template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F*) {
  a->binaryVersion = 90;
  a->ptxVersion = 90;
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

// cudaLaunchKernelEx: the arguments are copied once (as the driver copies kernel
// parameters), then every thread calls the kernel with its own copy of them.
template <typename... KArgs, typename... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(KArgs...), Args&&... args) {
  using Tuple = std::tuple<std::decay_t<KArgs>...>;
  struct Ctx {
    void (*kernel)(KArgs...);
    Tuple args;
  } ctx{kernel, Tuple(std::forward<Args>(args)...)};
  d3k_emu::KernelBody body{[](void* c) {
                             Ctx* x = static_cast<Ctx*>(c);
                             std::apply(x->kernel, x->args);
                           },
                           &ctx};
  return d3k_emu::launch_grid(cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, body);
}
