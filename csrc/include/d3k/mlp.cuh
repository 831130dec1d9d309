// mlp_block device code: two GEMV kernels per call.
//   k4 MlpUpOp:   act = silu(g) * u, [g; u] = w_gate_up @ rmsnorm(h)   (fp32 scratch [nb, F])
//   k5 MlpDownOp: out = h + w_down @ act; inactive rows out = h.
#pragma once

#include "d3k/gemv_kernel.cuh"

namespace d3k {

struct MlpUpParams {
  GemvGeom g;  // n_slots = 2F, K = d
  uint32_t prefetch_bytes;
  float eps;
  const void* h;     // [nb, d]
  int64_t ldh;
  const void* norm;  // [d]
  const void* w;     // [2F, d] ([gate; up])
  float* act;        // [nb, F] fp32
  int F;
};

struct MlpUpOp : GemvNormOpBase<MlpUpParams> {
  static constexpr bool kPairs = true;
  // slot 2i -> gate row i, slot 2i + 1 -> up row F + i: each warp owns whole pairs.
  __device__ static int row_of(const Params& p, int slot) { return (slot >> 1) + (slot & 1) * p.F; }
  template <typename T, int BMAX, int RPW>
  __device__ static void epilogue(const Params& p, int slot0, const bool (&rvalid)[RPW],
                                  const float (&acc)[RPW][BMAX], const float (&rstd)[BMAX], int lane) {
    static_assert(RPW % 2 == 0, "mlp_up needs gate/up pairs in one warp");
    for_each_pair<BMAX, RPW>(acc, p.g.nb, lane, [&](int i, int b, float a0, float a1) {
      if (!rvalid[2 * i]) return;
      const int col = (slot0 + 2 * i) >> 1;
      const float gt = a0 * rstd[b], up = a1 * rstd[b];
      // torch: silu(g) = g * sigmoid(g); then * u
      const float sg = gt / (1.f + expf(-gt));
      p.act[static_cast<int64_t>(b) * p.F + col] = sg * up;
    });
  }
};

struct MlpDownParams {
  GemvGeom g;  // n_slots = d, K = F
  uint32_t prefetch_bytes;
  float eps;  // unused
  const void* w;      // [d, F]
  const float* act;   // [nb, F] fp32
  const void* h;      // [nb, d]
  int64_t ldh;
  void* out;          // [nb, d]
  int64_t ld_out;
  const uint8_t* active;
};

struct MlpDownOp : GemvOpBase<MlpDownParams> {
  static constexpr bool kPairs = false;
  static constexpr bool kNorm = false;
  __device__ static uint32_t row_mask(const Params& p) {
    uint32_t mask = 0;
    for (int b = 0; b < p.g.nb; ++b) mask |= (p.active[b] != 0 ? 1u : 0u) << b;
    return mask;
  }
  template <typename T, int BMAX, int VEC>
  __device__ static void stage(const Params& p, float* xs, int k0, int kl, uint32_t mask, float (&)[BMAX]) {
    stage_f32<BMAX, VEC>(xs, p.g.kc, p.act, p.g.K, k0, kl, p.g.nb, mask);
  }
  template <typename T, int BMAX, int RPW>
  __device__ static void epilogue(const Params& p, int slot0, const bool (&rvalid)[RPW],
                                  const float (&acc)[RPW][BMAX], const float (&)[BMAX], int lane) {
    const T* h = static_cast<const T*>(p.h);
    T* out = static_cast<T*>(p.out);
    for_each_output<BMAX, RPW>(acc, p.g.nb, lane, [&](int r, int b, float a) {
      if (!rvalid[r]) return;
      const int row = slot0 + r;
      const T hv = h[b * p.ldh + row];
      out[b * p.ld_out + row] = p.active[b] != 0 ? from_f<T>(to_f<T>(hv) + a) : hv;
    });
  }
};

}  // namespace d3k
