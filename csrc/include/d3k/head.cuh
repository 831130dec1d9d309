// lm_head (RMSNorm + GEMV into fp32 logits) and greedy sampling (argmax).
#pragma once

#include "d3k/gemv_kernel.cuh"

namespace d3k {

struct LmHeadParams {
  GemvGeom g;  // n_slots = V, K = d
  uint32_t prefetch_bytes;
  float eps;
  const void* h;     // [nb, d]
  int64_t ldh;
  const void* norm;  // [d]
  const void* w;     // [V, d]
  float* logits;     // [nb, V]
  int64_t ld_logits;
};

struct LmHeadOp : GemvNormOpBase<LmHeadParams> {
  static constexpr bool kPairs = false;
  template <typename T, int BMAX, int RPW>
  __device__ static void epilogue(const Params& p, int slot0, const bool (&rvalid)[RPW],
                                  const float (&acc)[RPW][BMAX], const float (&rstd)[BMAX], int lane) {
    for_each_output<BMAX, RPW>(acc, p.g.nb, lane, [&](int r, int b, float a) {
      if (rvalid[r]) p.logits[b * p.ld_logits + slot0 + r] = a * rstd[b];
    });
  }
};

// ---------------------------------------------------------------- argmax
constexpr int kArgmaxThreads = 1024;

// torch.argmax semantics: the first index of the maximum; NaN counts as the
// maximum (the first NaN wins).
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

// One block per row: tokens[b] = argmax(logits[b, :V]).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) argmax_kernel(const float* __restrict__ logits, int64_t ld, int V,
                                                          int64_t* __restrict__ tokens, int vec4) {
  static_assert(kThreads == 1024, "the second reduction stage assumes 32 warps");
  __shared__ float sv[kThreads / 32];
  __shared__ int si[kThreads / 32];
  pdl_wait();
  pdl_trigger();
  const int b = blockIdx.x;
  const float* x = logits + b * ld;
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  if (vec4) {
    const int n4 = V >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int j = threadIdx.x; j < n4; j += kThreads) {
      const float4 v = x4[j];
      const int i = j * 4;
      if (argmax_better(v.x, i, bv, bi)) { bv = v.x; bi = i; }
      if (argmax_better(v.y, i + 1, bv, bi)) { bv = v.y; bi = i + 1; }
      if (argmax_better(v.z, i + 2, bv, bi)) { bv = v.z; bi = i + 2; }
      if (argmax_better(v.w, i + 3, bv, bi)) { bv = v.w; bi = i + 3; }
    }
    for (int i = n4 * 4 + threadIdx.x; i < V; i += kThreads) {
      const float v = x[i];
      if (argmax_better(v, i, bv, bi)) { bv = v; bi = i; }
    }
  } else {
    for (int i = threadIdx.x; i < V; i += kThreads) {
      const float v = x[i];
      if (argmax_better(v, i, bv, bi)) { bv = v; bi = i; }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (argmax_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = sv[lane];
    bi = si[lane];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (argmax_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) tokens[b] = bi;
  }
}

}  // namespace d3k
