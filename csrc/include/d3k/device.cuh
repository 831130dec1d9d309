// Device-side helpers shared by every d3kernels kernel: dtype conversion,
// 16-byte loads, warp reductions, Programmatic Dependent Launch (PDL) and L2
// prefetch. Header-only, torch-free.
//
// PDL contract (every kernel follows it, see csrc/README.md):
//   - before pdl_wait(): only L2 prefetches of weights (prefetch_l2), never an
//     ordinary load or store; L2 is the coherence point, so a prefetch can not
//     make a later load stale, whatever the previous kernel wrote;
//   - every block of every kernel executes pdl_wait() before it reads or writes
//     anything and before it exits, so "kernel N complete" implies "kernel N-1
//     complete" and the chain is transitive;
//   - pdl_trigger() only after pdl_wait(), so a dependent kernel starts only
//     once every block of this one has seen its predecessor complete.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace d3k {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------- PDL / prefetch
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Bulk L2 prefetch of [p, p + bytes); p 16-byte aligned, bytes a multiple of 16.
// A hint only: no effect on correctness. No-op before sm_90.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (bytes >= 16) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes & ~15u) : "memory");
  }
#endif
}

// ---------------------------------------------------------------- shared memory
// Declares `T* name`-like access to the launch's dynamic shared memory. The
// emulated build (D3K_EMU, csrc/emu/) has no extern __shared__ arrays and gets
// the block's buffer from the emulation layer instead.
#if defined(D3K_EMU)
#define D3K_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::d3k_emu::dynamic_smem())
#else
#define D3K_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

// ---------------------------------------------------------------- loads
// Streaming 16-byte load of read-only data (weights): no L1 allocation.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
#if defined(D3K_EMU)
  return *reinterpret_cast<const uint4*>(p);
#else
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
#endif
}

// Ordinary coherent 16-byte load (activations, KV cache written by earlier kernels).
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// ---------------------------------------------------------------- dtype
template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Round-to-nearest-even, as torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 8 packed 16-bit values -> 8 floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]);
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h2;
    memcpy(&h2, &w[i], 4);
    const float2 v = __half22float2(h2);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace d3k
