// write_kv device code: the depth-masked KV writer (docs/design.md section 2).
//   mode "mask":    kv_mask_kernel     kv_valid[l, b, pos] = 0 where flags[l, b]
//   mode "copy":    kv_copy_kernel     K/V (and kv_valid) from the nearest lower
//                                      layer with flags == 0, else like "mask"
//   mode "project": KvProjectOp (GEMV) K/V rows of wqkv[l] @ rmsnorm(src_h) with
//                                      norms[l], RoPE on K, kv_valid = 1
// Rows whose pos is outside [0, S) (or past the RoPE table) are left untouched.
// Paged caches (KvLayout::slot != nullptr): layer l is a pool [slots, H_kv, D] (kv_valid [slots]); row b
// writes at slot[b] (int64; -1 = nothing, a slot past the pool is left untouched too) and pos[b] is only
// its RoPE position and range check.
#pragma once

#include "d3k/gemv_kernel.cuh"

namespace d3k {

struct KvLayout {
  void* k_cache;              // layer l, row b, head g, pos p: l * layer_stride + ((b * Hkv + g) * S + p) * D
  void* v_cache;              //   paged: l * layer_stride + (slot[b] * Hkv + g) * D
  int64_t cache_layer_stride;  // B * Hkv * S * D (full batch); paged: slots * Hkv * D
  uint8_t* kv_valid;          // l * valid_layer_stride + b * S + p; paged: l * valid_layer_stride + slot[b]
  int64_t valid_layer_stride;  // B * S; paged: slots
  const uint8_t* flags;       // flags[l * flags_ld + b]
  int64_t flags_ld;           // B
  const int* pos;             // [nb]
  const int64_t* slot;        // paged: [nb] write slots; nullptr: contiguous
  int64_t num_slots;          // paged: slots per layer
  int pos_limit;              // rows write only with 0 <= pos < pos_limit (mask / copy)
  int L, nb, Hkv, D, S;
};

// Where row b writes in each layer: false if it writes nothing (pos outside [0, limit); paged: a slot < 0
// or past the pool). kv: element offset of head 0 (head g at kv + g * kv_head_stride(p)); vofs: the index of
// its kv_valid byte.
__device__ __forceinline__ bool kv_target(const KvLayout& p, int b, int limit, int* ps_out, int64_t* kv,
                                          int64_t* vofs) {
  const int ps = p.pos[b];
  if (ps < 0 || ps >= limit) return false;
  *ps_out = ps;
  if (p.slot == nullptr) {
    *kv = (static_cast<int64_t>(b) * p.Hkv * p.S + ps) * p.D;
    *vofs = static_cast<int64_t>(b) * p.S + ps;
    return true;
  }
  const int64_t s = p.slot[b];
  if (s < 0 || s >= p.num_slots) return false;
  *kv = s * p.Hkv * p.D;
  *vofs = s;
  return true;
}

__device__ __forceinline__ int64_t kv_head_stride(const KvLayout& p) {
  return p.slot == nullptr ? static_cast<int64_t>(p.S) * p.D : p.D;
}

// ---------------------------------------------------------------- mask
template <int kThreads>
__global__ void __launch_bounds__(kThreads) kv_mask_kernel(const KvLayout p) {
  pdl_wait();
  pdl_trigger();
  const int n = p.L * p.nb;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int l = i / p.nb, b = i - (i / p.nb) * p.nb;
    if (p.flags[l * p.flags_ld + b] == 0) continue;
    int ps = 0;
    int64_t kv = 0, vofs = 0;
    if (!kv_target(p, b, p.pos_limit, &ps, &kv, &vofs)) continue;
    p.kv_valid[l * p.valid_layer_stride + vofs] = 0;
  }
}

// ---------------------------------------------------------------- copy
constexpr int kKvCopyThreads = 128;

// Grid (nb, L). Sources are layers with flags == 0, which this kernel never
// writes, so blocks are independent.
template <typename T>
__global__ void __launch_bounds__(kKvCopyThreads) kv_copy_kernel(const KvLayout p) {
  pdl_wait();
  pdl_trigger();
  const int b = blockIdx.x, l = blockIdx.y;
  if (p.flags[l * p.flags_ld + b] == 0) return;
  int ps = 0;
  int64_t kv = 0, vofs = 0;
  if (!kv_target(p, b, p.pos_limit, &ps, &kv, &vofs)) return;
  int src = -1;
  for (int j = l - 1; j >= 0; --j) {
    if (p.flags[j * p.flags_ld + b] == 0) {
      src = j;
      break;
    }
  }
  if (src < 0) {
    if (threadIdx.x == 0) p.kv_valid[l * p.valid_layer_stride + vofs] = 0;
    return;
  }
  if (threadIdx.x == 0) p.kv_valid[l * p.valid_layer_stride + vofs] = p.kv_valid[src * p.valid_layer_stride + vofs];
  const int chunks = p.D / 8;  // 16-byte chunks per head row
  const int n = p.Hkv * chunks;
  const int64_t hs = kv_head_stride(p);
  for (int i = threadIdx.x; i < n; i += kKvCopyThreads) {
    const int g = i / chunks, c = i - (i / chunks) * chunks;
    const int64_t e = kv + g * hs + c * 8;
    const T* ks = static_cast<const T*>(p.k_cache) + src * p.cache_layer_stride + e;
    const T* vs = static_cast<const T*>(p.v_cache) + src * p.cache_layer_stride + e;
    T* kd = static_cast<T*>(p.k_cache) + l * p.cache_layer_stride + e;
    T* vd = static_cast<T*>(p.v_cache) + l * p.cache_layer_stride + e;
    *reinterpret_cast<uint4*>(kd) = ld16(ks);
    *reinterpret_cast<uint4*>(vd) = ld16(vs);
  }
}

// ---------------------------------------------------------------- project
struct KvProjectParams {
  GemvGeom g;  // n_slots = 2 Hkv D, K = d
  uint32_t prefetch_bytes;
  float eps;
  KvLayout kv;
  const void* h;        // src_h [nb, d]
  int64_t ldh;
  const void* norms;    // [L, d]
  const void* w;        // [L, R, d]
  int64_t w_layer_stride;  // R * d
  int kv_row0;          // H * D: first K row of wqkv[l]
  const void* bias;     // [L, R] or nullptr
  int64_t bias_layer_stride;  // R
  const float* rope_cos;
  const float* rope_sin;
  int64_t rope_ld;
  int pos_limit;        // min(S, rope_len)
};

struct KvProjectOp {
  using Params = KvProjectParams;
  static constexpr bool kPairs = true;
  static constexpr bool kNorm = true;
  template <typename T>
  __device__ static const T* weights(const Params& p) {
    return static_cast<const T*>(p.w) + blockIdx.y * p.w_layer_stride + static_cast<int64_t>(p.kv_row0) * p.g.K;
  }
  __device__ static int row_of(const Params& p, int slot) { return rope_pair_row(slot, p.kv.D); }
  __device__ static bool block_active(const Params& p) {
    const int l = blockIdx.y;
    for (int b = 0; b < p.kv.nb; ++b) {
      if (p.kv.flags[l * p.kv.flags_ld + b] != 0) return true;
    }
    return false;
  }
  __device__ static uint32_t row_mask(const Params&) { return 0xffffffffu; }
  template <typename T, int BMAX, int VEC>
  __device__ static void stage(const Params& p, float* xs, int k0, int kl, uint32_t, float (&ss)[BMAX]) {
    const T* norm = static_cast<const T*>(p.norms) + static_cast<int64_t>(blockIdx.y) * p.g.K;
    stage_norm<T, BMAX, VEC>(xs, p.g.kc, static_cast<const T*>(p.h), p.ldh, norm, k0, kl, p.g.nb, ss);
  }
  template <typename T, int BMAX, int RPW>
  __device__ static void epilogue(const Params& p, int slot0, const bool (&rvalid)[RPW],
                                  const float (&acc)[RPW][BMAX], const float (&rstd)[BMAX], int lane) {
    static_assert(RPW % 2 == 0, "kv_project needs RoPE pairs in one warp");
    const int l = blockIdx.y;
    const KvLayout& kv = p.kv;
    auto ok = [&](int b, int* ps, int64_t* e, int64_t* vofs) {
      if (kv.flags[l * kv.flags_ld + b] == 0) return false;
      return kv_target(kv, b, p.pos_limit, ps, e, vofs);
    };
    if (blockIdx.x == 0 && threadIdx.x < kv.nb) {
      int ps = 0;
      int64_t e = 0, vofs = 0;
      if (ok(threadIdx.x, &ps, &e, &vofs)) kv.kv_valid[l * kv.valid_layer_stride + vofs] = 1;
    }
    const int64_t hs = kv_head_stride(kv);
    const T* bias = p.bias == nullptr ? nullptr
                                      : static_cast<const T*>(p.bias) + l * p.bias_layer_stride + p.kv_row0;
    const int D = kv.D, half = D >> 1;
    for_each_pair<BMAX, RPW>(acc, p.g.nb, lane, [&](int i, int b, float a0, float a1) {
      const int slot = slot0 + 2 * i;
      if (!rvalid[2 * i]) return;
      int ps = 0;
      int64_t e = 0, vofs = 0;
      if (!ok(b, &ps, &e, &vofs)) return;
      const auto [hd, j, row0, row1] = rope_pair(slot, D);
      float y0 = a0 * rstd[b], y1 = a1 * rstd[b];
      if (bias != nullptr) {
        y0 += to_f<T>(bias[row0]);
        y1 += to_f<T>(bias[row1]);
      }
      if (hd < kv.Hkv) {
        float r0, r1;
        rope_rotate(y0, y1, p.rope_cos[ps * p.rope_ld + j], p.rope_sin[ps * p.rope_ld + j], r0, r1);
        T* kc = static_cast<T*>(kv.k_cache) + l * kv.cache_layer_stride + e + hd * hs;
        kc[j] = from_f<T>(r0);
        kc[j + half] = from_f<T>(r1);
      } else {
        T* vc = static_cast<T*>(kv.v_cache) + l * kv.cache_layer_stride + e + (hd - kv.Hkv) * hs;
        vc[j] = from_f<T>(y0);
        vc[j + half] = from_f<T>(y1);
      }
    });
  }
};

}  // namespace d3k
