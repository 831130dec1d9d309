// The one GEMV kernel template. An "Op" policy struct supplies the weights, the
// output-row permutation, the staging of x and the epilogue:
//
//   struct Op {
//     using Params = ...;                 // has: GemvGeom g; uint32_t prefetch_bytes; float eps;
//     static constexpr bool kNorm;        // stage is an RMSNorm stage (epilogue gets rstd)
//     template <typename T> static const T* weights(const Params&);   // may use blockIdx.y
//     static int row_of(const Params&, int slot);                     // slot -> weight row
//     static bool block_active(const Params&);                        // after pdl_wait; block-uniform
//     static uint32_t row_mask(const Params&);                        // after pdl_wait
//     template <typename T, int BMAX, int VEC>
//     static void stage(const Params&, float* xs, int k0, int kl, uint32_t mask, float (&ss)[BMAX]);
//     template <typename T, int BMAX, int RPW>
//     static void epilogue(const Params&, int slot0, const bool (&rvalid)[RPW],
//                          const float (&acc)[RPW][BMAX], const float (&rstd)[BMAX], int lane);
//   };
//
// Grid: x = ceil(n_slots / (8 * RPW)) blocks of 256 threads; y = Op-defined
// (layers for the write_kv projection). Dynamic shared memory: kc * BMAX floats.
#pragma once

#include "d3k/gemv.cuh"

namespace d3k {

// Defaults shared by most ops: weights at p.w, slot s -> weight row s, every block
// runs, every row is active. An op that needs other behaviour declares its own member,
// which hides the default.
template <typename P>
struct GemvOpBase {
  using Params = P;
  template <typename T>
  __device__ static const T* weights(const Params& p) {
    return static_cast<const T*>(p.w);
  }
  __device__ static int row_of(const Params&, int slot) { return slot; }
  __device__ static bool block_active(const Params&) { return true; }
  __device__ static uint32_t row_mask(const Params&) { return 0xffffffffu; }
};

// Ops that stage rmsnorm(h) * norm (p.h, p.ldh, p.norm); the epilogue gets the row scales.
template <typename P>
struct GemvNormOpBase : GemvOpBase<P> {
  using Params = P;
  static constexpr bool kNorm = true;
  template <typename T, int BMAX, int VEC>
  __device__ static void stage(const Params& p, float* xs, int k0, int kl, uint32_t, float (&ss)[BMAX]) {
    stage_norm<T, BMAX, VEC>(xs, p.g.kc, static_cast<const T*>(p.h), p.ldh, static_cast<const T*>(p.norm), k0, kl,
                             p.g.nb, ss);
  }
};

template <typename Op, typename T, int BMAX, int RPW, int VEC>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const typename Op::Params p) {
  D3K_DYNAMIC_SMEM(float4, d3k_gemv_smem);
  float* xs = reinterpret_cast<float*>(d3k_gemv_smem);
  __shared__ float red[kGemvWarps][BMAX];
  __shared__ float rstd[BMAX];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const GemvGeom g = p.g;

  const T* W = Op::template weights<T>(p);
  const int slot0 = (blockIdx.x * kGemvWarps + warp) * RPW;
  const T* wrow[RPW];
  bool rvalid[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int s = slot0 + r;
    rvalid[r] = s < g.n_slots;
    wrow[r] = W + static_cast<int64_t>(Op::row_of(p, rvalid[r] ? s : 0)) * g.K;
  }
  // Before the wait: L2 prefetch of weights only (see device.cuh).
  if constexpr (VEC == 8) gemv_prefetch<T, RPW>(wrow, rvalid, lane, p.prefetch_bytes);
  pdl_wait();
  pdl_trigger();
  if (!Op::block_active(p)) return;
  const uint32_t mask = Op::row_mask(p);

  float acc[RPW][BMAX];
  float ss[BMAX];
#pragma unroll
  for (int b = 0; b < BMAX; ++b) {
    ss[b] = 0.f;
#pragma unroll
    for (int r = 0; r < RPW; ++r) acc[r][b] = 0.f;
  }
  for (int k0 = 0; k0 < g.K; k0 += g.kc) {
    const int kl = min(g.kc, g.K - k0);
    __syncthreads();  // the previous chunk's readers are done with xs
    Op::template stage<T, BMAX, VEC>(p, xs, k0, kl, mask, ss);
    __syncthreads();
    gemv_chunk<T, BMAX, RPW, VEC>(wrow, rvalid, k0, xs, g.kc, kl, g.nb, lane, acc);
  }
  if constexpr (Op::kNorm) {
    block_rstd<BMAX>(ss, g.nb, g.K, p.eps, red, rstd);
  }
  gemv_warp_reduce<BMAX, RPW>(acc, g.nb);
  Op::template epilogue<T, BMAX, RPW>(p, slot0, rvalid, acc, rstd, lane);
}

// f(r, b, v) for every r < RPW, b < nb, each on exactly one lane of the warp.
template <int BMAX, int RPW, typename F>
__device__ __forceinline__ void for_each_output(const float (&acc)[RPW][BMAX], int nb, int lane, F&& f) {
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < nb && lane == ((r * BMAX + b) & 31)) f(r, b, acc[r][b]);
    }
  }
}

// f(i, b, v0, v1) for the row pairs (2i, 2i + 1), i < RPW / 2, b < nb, one lane each.
template <int BMAX, int RPW, typename F>
__device__ __forceinline__ void for_each_pair(const float (&acc)[RPW][BMAX], int nb, int lane, F&& f) {
#pragma unroll
  for (int i = 0; i < RPW / 2; ++i) {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < nb && lane == ((i * BMAX + b) & 31)) f(i, b, acc[2 * i][b], acc[2 * i + 1][b]);
    }
  }
}

// Row status for ops with positions: 0 = inactive, 1 = active with 0 <= pos < limit,
// 2 = active with a position out of range (the op writes NaN / nothing).
__device__ __forceinline__ int row_status(const int* pos, const uint8_t* active, int b, int limit, int* p_out) {
  if (active[b] == 0) return 0;
  const int ps = pos[b];
  *p_out = ps;
  return (ps >= 0 && ps < limit) ? 1 : 2;
}

// The same with a paged cache's write slots (slot == nullptr: a contiguous cache, as above): a row runs only
// with slot >= 0 (slot -1 = nothing: status 0); a slot past the pool (>= num_slots) is out of range (2).
__device__ __forceinline__ int row_status(const int* pos, const uint8_t* active, const int64_t* slot,
                                          int64_t num_slots, int b, int limit, int* p_out) {
  if (slot == nullptr) return row_status(pos, active, b, limit, p_out);
  if (active[b] == 0) return 0;
  const int64_t s = slot[b];
  if (s < 0) return 0;
  const int st = row_status(pos, active, b, limit, p_out);
  return s < num_slots ? st : 2;
}

// HF rotate_half on the pair (x1 = y0 at dim j, x2 = y1 at dim j + D/2):
// r0 = x1 cos - x2 sin, r1 = x2 cos + x1 sin, rounded like separate torch ops
// (no FMA contraction).
__device__ __forceinline__ void rope_rotate(float y0, float y1, float c, float s, float& r0, float& r1) {
  r0 = __fsub_rn(__fmul_rn(y0, c), __fmul_rn(y1, s));
  r1 = __fadd_rn(__fmul_rn(y1, c), __fmul_rn(y0, s));
}

// Output slots are permuted so each warp owns RoPE pairs: slot 2j (+1) of head
// hd is row hd*D + j (+ D/2).
__device__ __forceinline__ int rope_pair_row(int slot, int D) {
  const int hd = slot / D, w = slot - hd * D;
  return hd * D + (w >> 1) + (w & 1) * (D >> 1);
}

// The RoPE pair that even slot `slot` starts: head hd, pair index j, and its rows
// j and j + D/2 of that head.
struct RopePair {
  int hd, j, row0, row1;
};
__device__ __forceinline__ RopePair rope_pair(int slot, int D) {
  const int hd = slot / D, j = (slot - hd * D) >> 1, row0 = hd * D + j;
  return {hd, j, row0, row0 + (D >> 1)};
}

}  // namespace d3k
