// The batched GEMV engine behind every projection kernel (QKV, O, gate/up,
// down, lm_head, the write_kv projection).
//
//   acc[r][b] = sum_k W[row_r, k] * x[b, k]      for the block's rows, b < nb <= BMAX
//
// Memory-bound decode design (B = 1..16): each warp owns RPW output rows; a
// block of 8 warps owns 8 * RPW rows. The activations x (fp32) are staged in
// shared memory in chunks of kc columns, so every weight element is read
// exactly once per call for all nb rows, with 16-byte streaming loads (VEC = 8
// elements) and several loads in flight per lane. Lanes accumulate in fp32;
// a warp butterfly reduction gives every lane the full sums, and the op's
// epilogue writes them.
//
// RMSNorm is folded in: the stage writes x = h * norm_w and accumulates
// sum(h^2) per row on the way, and the epilogue scales by rstd = rsqrt(mean +
// eps). Mathematically W (h * rstd * w) = rstd * (W (h * w)); each block
// recomputes rstd for its rows from h (d is small).
//
// VEC = 8 needs K % 8 == 0 and 16-byte aligned rows and vectors (the launcher
// checks); VEC = 1 is the scalar fallback for any K.
//
// Shared-memory layout of one staged row b (VEC = 8): [2][kc / 8][4] floats,
// i.e. the first four of each group of 8 columns, then the last four, so that
// a warp's float4 reads are contiguous (no bank conflicts). VEC = 1: [kc].
#pragma once

#include "d3k/device.cuh"

namespace d3k {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
// Dynamic shared memory for staged activations: 44 KB (static extras stay
// under the 48 KB a block gets without opting in).
constexpr int kGemvSmemFloats = 11264;

// Largest chunk (columns, a multiple of 256) for BMAX staged rows.
__host__ __device__ constexpr int gemv_kc_max(int bmax) { return 256 * (kGemvSmemFloats / (256 * bmax)); }

struct GemvGeom {
  int nb;       // rows of x in this launch (1..BMAX)
  int K;        // reduction length (columns of W)
  int kc;       // staged chunk width (multiple of 256, <= gemv_kc_max(BMAX))
  int n_slots;  // output rows ("slots") of the whole launch
};

// ---------------------------------------------------------------- staging
// xs[b][c] = h[b, k0 + c] * w[k0 + c] for c < kl; ss[b] += h^2.
template <typename T, int BMAX, int VEC>
__device__ __forceinline__ void stage_norm(float* xs, int kc, const T* h, int64_t ldh, const T* w, int k0, int kl,
                                           int nb, float (&ss)[BMAX]) {
  const int tid = threadIdx.x;
  if constexpr (VEC == 8) {
    const int nj = kl >> 3;
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < nb) {
        const T* hb = h + b * ldh + k0;
        float* xb = xs + b * kc;
        for (int j = tid; j < nj; j += kGemvThreads) {
          float hf[8], wf[8];
          unpack8<T>(ld16(hb + j * 8), hf);
          unpack8<T>(__ldg(reinterpret_cast<const uint4*>(w + k0 + j * 8)), wf);
          float s = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) s = fmaf(hf[e], hf[e], s);
          ss[b] += s;
          *reinterpret_cast<float4*>(xb + j * 4) = make_float4(hf[0] * wf[0], hf[1] * wf[1], hf[2] * wf[2], hf[3] * wf[3]);
          *reinterpret_cast<float4*>(xb + (kc >> 1) + j * 4) =
              make_float4(hf[4] * wf[4], hf[5] * wf[5], hf[6] * wf[6], hf[7] * wf[7]);
        }
      }
    }
  } else {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < nb) {
        const T* hb = h + b * ldh + k0;
        float* xb = xs + b * kc;
        for (int c = tid; c < kl; c += kGemvThreads) {
          const float hv = to_f<T>(hb[c]);
          ss[b] = fmaf(hv, hv, ss[b]);
          xb[c] = hv * to_f<T>(w[k0 + c]);
        }
      }
    }
  }
}

// xs[b][c] = x[b, k0 + c] (fp32) for rows b whose bit is set in `mask`, else 0.
template <int BMAX, int VEC>
__device__ __forceinline__ void stage_f32(float* xs, int kc, const float* x, int64_t ldx, int k0, int kl, int nb,
                                          uint32_t mask) {
  const int tid = threadIdx.x;
  if constexpr (VEC == 8) {
    const int nj = kl >> 3;
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < nb) {
        const bool on = (mask >> b) & 1u;
        const float* src = x + b * ldx + k0;
        float* xb = xs + b * kc;
        for (int j = tid; j < nj; j += kGemvThreads) {
          float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
          if (on) {
            lo = *reinterpret_cast<const float4*>(src + j * 8);
            hi = *reinterpret_cast<const float4*>(src + j * 8 + 4);
          }
          *reinterpret_cast<float4*>(xb + j * 4) = lo;
          *reinterpret_cast<float4*>(xb + (kc >> 1) + j * 4) = hi;
        }
      }
    }
  } else {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < nb) {
        const bool on = (mask >> b) & 1u;
        const float* src = x + b * ldx + k0;
        float* xb = xs + b * kc;
        for (int c = tid; c < kl; c += kGemvThreads) xb[c] = on ? src[c] : 0.f;
      }
    }
  }
}

// ---------------------------------------------------------------- accumulate
// acc[r][b] += sum_{c < kl} wrow[r][k0 + c] * xs[b][c] over this lane's columns.
template <typename T, int BMAX, int RPW, int VEC>
__device__ __forceinline__ void gemv_chunk(const T* const (&wrow)[RPW], const bool (&rvalid)[RPW], int k0,
                                           const float* xs, int kc, int kl, int nb, int lane,
                                           float (&acc)[RPW][BMAX]) {
  if constexpr (VEC == 8) {
    constexpr int UNR = 8 / RPW;  // 16-byte loads in flight per lane: RPW * UNR = 8
    constexpr int STEP = 32 * 8;
    for (int c0 = lane * 8; c0 < kl; c0 += STEP * UNR) {
      uint4 wv[UNR][RPW];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int c = c0 + u * STEP;
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          wv[u][r] = make_uint4(0u, 0u, 0u, 0u);
          if (c < kl && rvalid[r]) wv[u][r] = ld_stream16(wrow[r] + k0 + c);
        }
      }
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int c = c0 + u * STEP;
        if (c < kl) {
          float wf[RPW][8];
#pragma unroll
          for (int r = 0; r < RPW; ++r) unpack8<T>(wv[u][r], wf[r]);
          const float* x0 = xs + (c >> 3) * 4;
          const float* x1 = x0 + (kc >> 1);
#pragma unroll
          for (int b = 0; b < BMAX; ++b) {
            if (b < nb) {
              const float4 a = *reinterpret_cast<const float4*>(x0 + b * kc);
              const float4 z = *reinterpret_cast<const float4*>(x1 + b * kc);
#pragma unroll
              for (int r = 0; r < RPW; ++r) {
                float s = acc[r][b];
                s = fmaf(wf[r][0], a.x, s);
                s = fmaf(wf[r][1], a.y, s);
                s = fmaf(wf[r][2], a.z, s);
                s = fmaf(wf[r][3], a.w, s);
                s = fmaf(wf[r][4], z.x, s);
                s = fmaf(wf[r][5], z.y, s);
                s = fmaf(wf[r][6], z.z, s);
                s = fmaf(wf[r][7], z.w, s);
                acc[r][b] = s;
              }
            }
          }
        }
      }
    }
  } else {
    constexpr int UNR = 8;
    for (int c0 = lane; c0 < kl; c0 += 32 * UNR) {
      float wf[UNR][RPW];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int c = c0 + u * 32;
#pragma unroll
        for (int r = 0; r < RPW; ++r) wf[u][r] = (c < kl && rvalid[r]) ? to_f<T>(__ldg(wrow[r] + k0 + c)) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int c = c0 + u * 32;
        if (c < kl) {
#pragma unroll
          for (int b = 0; b < BMAX; ++b) {
            if (b < nb) {
              const float xv = xs[b * kc + c];
#pragma unroll
              for (int r = 0; r < RPW; ++r) acc[r][b] = fmaf(wf[u][r], xv, acc[r][b]);
            }
          }
        }
      }
    }
  }
}

// Every lane ends with the warp-wide sums.
template <int BMAX, int RPW>
__device__ __forceinline__ void gemv_warp_reduce(float (&acc)[RPW][BMAX], int nb) {
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b < nb) acc[r][b] = warp_sum(acc[r][b]);
    }
  }
}

// rstd[b] = rsqrt(sum(h^2) / d + eps) for b < nb, from each thread's partial ss.
// Contains __syncthreads(); call from every thread of the block.
template <int BMAX>
__device__ __forceinline__ void block_rstd(const float (&ss)[BMAX], int nb, int d, float eps,
                                           float (&red)[kGemvWarps][BMAX], float (&rstd)[BMAX]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int b = 0; b < BMAX; ++b) {
    if (b < nb) {
      const float v = warp_sum(ss[b]);
      if (lane == 0) red[warp][b] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x < nb) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) s += red[w][threadIdx.x];
    rstd[threadIdx.x] = rsqrtf(s / static_cast<float>(d) + eps);
  }
  __syncthreads();
}

// L2 prefetch (before pdl_wait) of the first bytes of this warp's rows:
// lane r < RPW prefetches row r. `bytes` is capped by the caller.
template <typename T, int RPW>
__device__ __forceinline__ void gemv_prefetch(const T* const (&wrow)[RPW], const bool (&rvalid)[RPW], int lane,
                                              uint32_t bytes) {
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    if (lane == r && rvalid[r]) prefetch_l2(wrow[r], bytes);
  }
}

}  // namespace d3k
