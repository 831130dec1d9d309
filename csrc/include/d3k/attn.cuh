// attn_block device code: three kernels per call (csrc/README.md).
//   k1 AttnPreOp (GEMV):  q, k, v = wqkv @ rmsnorm(h) (+ bias), RoPE on q and k,
//                         k/v -> cache at pos, kv_valid[b, pos] = 1, q -> fp32 scratch.
//   k2 attn_decode_kernel: split-K flash decoding over the valid positions, with
//                         the combine done by the last split block of each head group.
//   k3 OProjOp (GEMV):     out = h + wo @ o.
//
// Two cache layouts, one code path (the paged differences are a few branches on a pointer, and a
// template flag in k2's inner loop):
//   contiguous: k_cache [nb, H_kv, S, D], kv_valid [nb, S]; row b writes and reads its own row;
//   paged (slot != nullptr): a pool k_cache [num_pages * page_size slots, H_kv, D], kv_valid [slots];
//     row b writes its new K/V at slot[b] (int64, -1 = the row runs nothing) and reads logical
//     position p at slot block_table[b, p / page_size] * page_size + p % page_size. k1 also writes each
//     row's effective status (row_active and slot >= 0 -> run; a slot past the pool -> position -1, the
//     out-of-range status) to scratch, which k2 and k3 read as their (active, pos): k3 is the contiguous
//     kernel unchanged.
#pragma once

#include "d3k/gemv_kernel.cuh"

namespace d3k {

// Rows of x that a kernel processes per launch (the launcher splits larger
// batches into groups of kMaxRows).
constexpr int kMaxRows = 16;

// ============================================================== k1: norm + QKV + RoPE + KV write
struct AttnPreParams {
  GemvGeom g;
  uint32_t prefetch_bytes;
  float eps;
  const void* h;       // [nb, d], row stride ldh
  int64_t ldh;
  const void* norm;    // [d]
  const void* w;       // [(H + 2 H_kv) D, d]
  const void* bias;    // [(H + 2 H_kv) D] or nullptr
  void* k_cache;       // [nb, H_kv, S, D] (this group's rows); paged: the pool [slots, H_kv, D]
  void* v_cache;
  uint8_t* kv_valid;   // [nb, S]; paged: [slots]
  const int* pos;      // [nb]
  const uint8_t* active;
  const int64_t* slot; // paged: [nb] write slots (-1: the row runs nothing); nullptr: contiguous
  int64_t num_slots;   // paged: slots in the pool
  int* row_pos;        // paged: [nb] written by block 0: pos, or -1 for a slot past the pool
  uint8_t* row_run;    // paged: [nb] written by block 0: row_active and slot >= 0
  const float* rope_cos;  // [rope_len, D/2], row stride rope_ld
  const float* rope_sin;
  int64_t rope_ld;
  int pos_limit;       // min(S, rope_len) (paged: S = max_pages * page_size)
  float* q;            // [nb, H, D] fp32 scratch
  int* counters;       // k2's split counters of this group, zeroed here
  int n_counters;
  int H, Hkv, D, S;
};

struct AttnPreOp : GemvNormOpBase<AttnPreParams> {
  static constexpr bool kPairs = true;
  __device__ static int row_of(const Params& p, int slot) { return rope_pair_row(slot, p.D); }
  __device__ static int status(const Params& p, int b, int* ps) {
    return row_status(p.pos, p.active, p.slot, p.num_slots, b, p.pos_limit, ps);
  }
  // Element offset of (row b, kv head g) at position ps in the cache.
  __device__ static int64_t kv_elem(const Params& p, int b, int g, int ps) {
    if (p.slot != nullptr) return (p.slot[b] * p.Hkv + g) * p.D;
    return ((static_cast<int64_t>(b) * p.Hkv + g) * p.S + ps) * p.D;
  }
  template <typename T, int BMAX, int RPW>
  __device__ static void epilogue(const Params& p, int slot0, const bool (&rvalid)[RPW],
                                  const float (&acc)[RPW][BMAX], const float (&rstd)[BMAX], int lane) {
    static_assert(RPW % 2 == 0, "attn_pre needs RoPE pairs in one warp");
    uint32_t run = 0;  // rows that write (status 1), computed once rather than at every unrolled output
    for (int b = 0; b < p.g.nb; ++b) {
      int ps = 0;
      if (status(p, b, &ps) == 1) run |= 1u << b;
    }
    if (blockIdx.x == 0) {
      for (int i = threadIdx.x; i < p.n_counters; i += kGemvThreads) p.counters[i] = 0;
      if (threadIdx.x < p.g.nb) {
        const int b = threadIdx.x;
        if ((run >> b) & 1u) p.kv_valid[p.slot != nullptr ? p.slot[b] : static_cast<int64_t>(b) * p.S + p.pos[b]] = 1;
        if (p.slot != nullptr) {  // k2 and k3 read these as (active, pos)
          const int64_t s = p.slot[b];
          p.row_run[b] = p.active[b] != 0 && s >= 0;
          p.row_pos[b] = s < p.num_slots ? p.pos[b] : -1;
        }
      }
    }
    const T* bias = static_cast<const T*>(p.bias);
    const int D = p.D, half = D >> 1;
    for_each_pair<BMAX, RPW>(acc, p.g.nb, lane, [&](int i, int b, float a0, float a1) {
      const int slot = slot0 + 2 * i;
      if (!rvalid[2 * i]) return;
      if (!((run >> b) & 1u)) return;
      const int ps = p.pos[b];
      const auto [hd, j, row0, row1] = rope_pair(slot, D);
      float y0 = a0 * rstd[b], y1 = a1 * rstd[b];
      if (bias != nullptr) {
        y0 += to_f<T>(bias[row0]);
        y1 += to_f<T>(bias[row1]);
      }
      if (hd < p.H + p.Hkv) {
        float r0, r1;
        rope_rotate(y0, y1, p.rope_cos[ps * p.rope_ld + j], p.rope_sin[ps * p.rope_ld + j], r0, r1);
        if (hd < p.H) {
          float* q = p.q + (static_cast<int64_t>(b) * p.H + hd) * D;
          q[j] = r0;
          q[j + half] = r1;
        } else {
          T* kc = static_cast<T*>(p.k_cache) + kv_elem(p, b, hd - p.H, ps);
          kc[j] = from_f<T>(r0);
          kc[j + half] = from_f<T>(r1);
        }
      } else {
        T* vc = static_cast<T*>(p.v_cache) + kv_elem(p, b, hd - p.H - p.Hkv, ps);
        vc[j] = from_f<T>(y0);
        vc[j + half] = from_f<T>(y1);
      }
    });
  }
};

// ============================================================== k2: split-K decode attention
struct AttnParams {
  const float* q;        // [nb, H, D] fp32 (RoPE applied, unscaled)
  const void* k_cache;   // [nb, H_kv, S, D]; paged: the pool [slots, H_kv, D]
  const void* v_cache;
  const uint8_t* kv_valid;  // [nb, S]; paged: [slots]
  const int* pos;           // paged: k1's row_pos
  const uint8_t* active;    // paged: k1's row_run
  const int* block_table;   // paged: [nb, bt_ld] int32 page ids
  int64_t bt_ld;
  int num_pages, page_size;  // paged: page_size % (128 / (D / 8)) == 0 (a multiple of 16 serves D = 64, 128)
  int pos_limit;
  float* part_ml;        // [nb, H, NS, 2]  (m in log2 units, l)
  float* part_acc;       // [nb, H, NS, D]
  int* counters;         // [nb, H_kv, NG]
  float* o;              // [nb, H * D] fp32
  int H, Hkv, G;         // G = H / H_kv query heads per kv head
  int GPB, NG;           // query heads per block (<= GMAX), head groups per kv head
  int S, NS, split_len;
  float scale_log2;      // log2(e) / sqrt(D)
};

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / 32;

// Grid (NS, H_kv * NG, nb). Block (split s, kv head g, head group hg, row b)
// covers positions [s * split_len, min((s + 1) * split_len, pos + 1)) of row b
// for query heads g * G + hg * GPB + [0, GPB). Each group of LPR = D / 8
// lanes holds one position's K/V (8 dims per lane, 16-byte loads); RPP =
// 128 / LPR positions per pass, U passes unrolled. Online softmax in fp32, in
// log2 units. Positions with kv_valid = 0 are skipped (their K/V are not read).
// With one non-empty split the block writes o directly; otherwise it writes its
// partial (m, l, acc), and the last block to finish (atomic counter) combines.
//
// kPaged: the same loop over a paged pool. A pass's RPP positions start at a multiple of RPP (split_len
// is a multiple of 64) and page_size is a multiple of RPP, so they lie in one page: the block walks the
// pages (page index, offset) and reads each block_table entry once, one page ahead of its use. An
// entry outside [0, num_pages) is never dereferenced; its positions count as masked and the row's
// output becomes NaN (l = NaN), as for an out-of-range position.
template <typename T, int D, int GMAX, bool kPaged>
__global__ void __launch_bounds__(kAttnThreads) attn_decode_kernel(const AttnParams p) {
  constexpr int LPR = D / 8;
  constexpr int RPP = kAttnThreads / LPR;
  constexpr int U = 2;
  static_assert(D % 8 == 0 && 32 % LPR == 0, "unsupported head_dim");
  __shared__ float sm_m[kAttnWarps][GMAX];
  __shared__ float sm_l[kAttnWarps][GMAX];
  __shared__ float sm_acc[kAttnWarps][GMAX][D];
  __shared__ int sm_last;

  const int split = blockIdx.x;
  const int g = blockIdx.y / p.NG, hg = blockIdx.y - (blockIdx.y / p.NG) * p.NG;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int rs = tid / LPR, ds = tid - (tid / LPR) * LPR;

  pdl_wait();
  pdl_trigger();
  int ps = 0;
  if (row_status(p.pos, p.active, b, p.pos_limit, &ps) != 1) return;  // block-uniform
  const int n_ctx = ps + 1;
  const int n_splits = min(p.NS, (n_ctx + p.split_len - 1) / p.split_len);
  if (split >= n_splits) return;
  const int p_begin = split * p.split_len;
  const int p_end = min(p_begin + p.split_len, n_ctx);
  const int h0 = g * p.G + hg * p.GPB;
  const int nh = min(p.GPB, p.G - hg * p.GPB);

  float q[GMAX][8];
#pragma unroll
  for (int j = 0; j < GMAX; ++j) {
    if (j < nh) {
      const float* qp = p.q + (static_cast<int64_t>(b) * p.H + h0 + j) * D + ds * 8;
      const float4 a = *reinterpret_cast<const float4*>(qp);
      const float4 z = *reinterpret_cast<const float4*>(qp + 4);
      q[j][0] = a.x * p.scale_log2;
      q[j][1] = a.y * p.scale_log2;
      q[j][2] = a.z * p.scale_log2;
      q[j][3] = a.w * p.scale_log2;
      q[j][4] = z.x * p.scale_log2;
      q[j][5] = z.y * p.scale_log2;
      q[j][6] = z.z * p.scale_log2;
      q[j][7] = z.w * p.scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[j][e] = 0.f;
    }
  }
  float m[GMAX], l[GMAX], acc[GMAX][8];
#pragma unroll
  for (int j = 0; j < GMAX; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
  }

  const int64_t head_off = kPaged ? static_cast<int64_t>(g) * D + ds * 8
                                   : (static_cast<int64_t>(b) * p.Hkv + g) * p.S * D + ds * 8;
  const T* kb = static_cast<const T*>(p.k_cache) + head_off;
  const T* vb = static_cast<const T*>(p.v_cache) + head_off;
  const uint8_t* valid = kPaged ? p.kv_valid : p.kv_valid + static_cast<int64_t>(b) * p.S;
  // Paged: the page walk (block-uniform). pg_i, pg_off: page index and offset of the next pass's first
  // position; cur, nxt: the block_table entries of pages pg_i and pg_i + 1 (read only below n_pg).
  const int* bt = kPaged ? p.block_table + static_cast<int64_t>(b) * p.bt_ld : nullptr;
  const int n_pg = kPaged ? (p_end - 1) / p.page_size + 1 : 0;
  int pg_i = kPaged ? p_begin / p.page_size : 0;
  int pg_off = p_begin - pg_i * (kPaged ? p.page_size : 0);
  int cur = kPaged ? bt[pg_i] : 0;
  int nxt = kPaged && pg_i + 1 < n_pg ? bt[pg_i + 1] : -1;
  bool bad = false;

  // Warp-uniform trip count: every lane runs every iteration (shuffles below).
  for (int base = p_begin; base < p_end; base += RPP * U) {
    uint4 kr[U], vr[U];
    bool val[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int pp = base + u * RPP + rs;
      if constexpr (kPaged) {
        const bool page_ok = static_cast<unsigned>(cur) < static_cast<unsigned>(p.num_pages);
        bad |= !page_ok && base + u * RPP < p_end;
        const int64_t sl = static_cast<int64_t>(cur) * p.page_size + pg_off + rs;
        val[u] = page_ok && pp < p_end && valid[sl] != 0;
        kr[u] = make_uint4(0u, 0u, 0u, 0u);
        vr[u] = kr[u];
        if (val[u]) {
          kr[u] = ld16(kb + sl * (p.Hkv * D));
          vr[u] = ld16(vb + sl * (p.Hkv * D));
        }
        pg_off += RPP;
        if (pg_off == p.page_size) {
          pg_off = 0;
          ++pg_i;
          cur = nxt;
          nxt = pg_i + 1 < n_pg ? bt[pg_i + 1] : -1;
        }
      } else {
        val[u] = pp < p_end && valid[pp] != 0;
        kr[u] = make_uint4(0u, 0u, 0u, 0u);
        vr[u] = kr[u];
        if (val[u]) {
          kr[u] = ld16(kb + static_cast<int64_t>(pp) * D);
          vr[u] = ld16(vb + static_cast<int64_t>(pp) * D);
        }
      }
    }
    float s[U][GMAX];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      unpack8<T>(kr[u], kf);
#pragma unroll
      for (int j = 0; j < GMAX; ++j) {
        float t = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) t = fmaf(q[j][e], kf[e], t);
        s[u][j] = t;
      }
    }
#pragma unroll
    for (int off = 1; off < LPR; off <<= 1) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < GMAX; ++j) {
          if (j < nh) s[u][j] += __shfl_xor_sync(0xffffffffu, s[u][j], off);
        }
      }
    }
    float vf[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) unpack8<T>(vr[u], vf[u]);
#pragma unroll
    for (int j = 0; j < GMAX; ++j) {
      if (j < nh) {
        float mx = m[j];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!val[u]) s[u][j] = -INFINITY;
          mx = fmaxf(mx, s[u][j]);
        }
        const float mref = (mx == -INFINITY) ? 0.f : mx;
        const float alpha = exp2f(m[j] - mref);
        float pu[U];
        float lsum = l[j] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          pu[u] = exp2f(s[u][j] - mref);
          lsum += pu[u];
        }
        l[j] = lsum;
        m[j] = mx;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float a = acc[j][e] * alpha;
#pragma unroll
          for (int u = 0; u < U; ++u) a = fmaf(pu[u], vf[u][e], a);
          acc[j][e] = a;
        }
      }
    }
  }

  if constexpr (kPaged) {
    if (bad) {  // a page outside the pool: the row's output is NaN
#pragma unroll
      for (int j = 0; j < GMAX; ++j) l[j] = __int_as_float(0x7fc00000);
    }
  }
  (void)bad;

  // Merge the row slots of a warp (lanes that differ in rs, same ds).
#pragma unroll
  for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
    for (int j = 0; j < GMAX; ++j) {
      if (j < nh) {
        const float mo = __shfl_xor_sync(0xffffffffu, m[j], off);
        const float lo = __shfl_xor_sync(0xffffffffu, l[j], off);
        const float mx = fmaxf(m[j], mo);
        const float mref = (mx == -INFINITY) ? 0.f : mx;
        const float a = exp2f(m[j] - mref), c = exp2f(mo - mref);
        l[j] = l[j] * a + lo * c;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float ao = __shfl_xor_sync(0xffffffffu, acc[j][e], off);
          acc[j][e] = acc[j][e] * a + ao * c;
        }
        m[j] = mx;
      }
    }
  }
  // Merge the warps through shared memory: lanes 0..LPR-1 of each warp hold its state.
  if (lane < LPR) {
#pragma unroll
    for (int j = 0; j < GMAX; ++j) {
      if (j < nh) {
        if (lane == 0) {
          sm_m[warp][j] = m[j];
          sm_l[warp][j] = l[j];
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) sm_acc[warp][j][ds * 8 + e] = acc[j][e];
      }
    }
  }
  __syncthreads();

  const int64_t HD = static_cast<int64_t>(p.H) * D;
  // Each thread finalizes (head j, dim dd) items of the block.
  float* part_ml = p.part_ml;
  float* part_acc = p.part_acc;
  for (int idx = tid; idx < nh * D; idx += kAttnThreads) {
    const int j = idx / D, dd = idx - (idx / D) * D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w][j]);
    const float mref = (M == -INFINITY) ? 0.f : M;
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float c = exp2f(sm_m[w][j] - mref);
      L += sm_l[w][j] * c;
      A += sm_acc[w][j][dd] * c;
    }
    const int h = h0 + j;
    if (n_splits == 1) {
      p.o[static_cast<int64_t>(b) * HD + static_cast<int64_t>(h) * D + dd] = A / L;
    } else {
      const int64_t slot = (static_cast<int64_t>(b) * p.H + h) * p.NS + split;
      part_acc[slot * D + dd] = A;
      if (dd == 0) {
        part_ml[slot * 2] = M;
        part_ml[slot * 2 + 1] = L;
      }
    }
  }
  if (n_splits == 1) return;

  // Last-block-done combine (threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  int* counter = p.counters + (static_cast<int64_t>(b) * p.Hkv + g) * p.NG + hg;
  if (tid == 0) {
    const int done = atomicAdd(counter, 1);
    sm_last = (done == n_splits - 1);
  }
  __syncthreads();
  if (!sm_last) return;
  __threadfence();
  if (tid == 0) *counter = 0;  // ready for the next call (k1 also zeroes it)
  for (int idx = tid; idx < nh * D; idx += kAttnThreads) {
    const int j = idx / D, dd = idx - (idx / D) * D;
    const int h = h0 + j;
    const int64_t base = (static_cast<int64_t>(b) * p.H + h) * p.NS;
    float M = -INFINITY;
    for (int sp = 0; sp < n_splits; ++sp) M = fmaxf(M, __ldcg(part_ml + (base + sp) * 2));
    const float mref = (M == -INFINITY) ? 0.f : M;
    float L = 0.f, A = 0.f;
    for (int sp = 0; sp < n_splits; ++sp) {
      const float c = exp2f(__ldcg(part_ml + (base + sp) * 2) - mref);
      L += __ldcg(part_ml + (base + sp) * 2 + 1) * c;
      A += __ldcg(part_acc + (base + sp) * D + dd) * c;
    }
    p.o[static_cast<int64_t>(b) * HD + static_cast<int64_t>(h) * D + dd] = A / L;
  }
}

// ============================================================== k3: O projection + residual
struct OProjParams {
  GemvGeom g;
  uint32_t prefetch_bytes;
  float eps;          // unused
  const void* w;      // [d, H D]
  const float* o;     // [nb, H D] fp32
  int64_t ldo;
  const void* h;      // [nb, d]
  int64_t ldh;
  void* out;          // [nb, d]
  int64_t ld_out;
  const int* pos;       // paged: k1's row_pos
  const uint8_t* active;  // paged: k1's row_run
  int pos_limit;
};

struct OProjOp : GemvOpBase<OProjParams> {
  static constexpr bool kPairs = false;
  static constexpr bool kNorm = false;
  __device__ static uint32_t row_mask(const Params& p) {
    uint32_t mask = 0;
    for (int b = 0; b < p.g.nb; ++b) {
      int ps = 0;
      if (row_status(p.pos, p.active, b, p.pos_limit, &ps) == 1) mask |= 1u << b;
    }
    return mask;
  }
  template <typename T, int BMAX, int VEC>
  __device__ static void stage(const Params& p, float* xs, int k0, int kl, uint32_t mask, float (&)[BMAX]) {
    stage_f32<BMAX, VEC>(xs, p.g.kc, p.o, p.ldo, k0, kl, p.g.nb, mask);
  }
  template <typename T, int BMAX, int RPW>
  __device__ static void epilogue(const Params& p, int slot0, const bool (&rvalid)[RPW],
                                  const float (&acc)[RPW][BMAX], const float (&)[BMAX], int lane) {
    const T* h = static_cast<const T*>(p.h);
    T* out = static_cast<T*>(p.out);
    for_each_output<BMAX, RPW>(acc, p.g.nb, lane, [&](int r, int b, float a) {
      if (!rvalid[r]) return;
      const int row = slot0 + r;
      int ps = 0;
      const int st = row_status(p.pos, p.active, b, p.pos_limit, &ps);
      const T hv = h[b * p.ldh + row];
      T v = hv;                                                    // inactive: out = h
      if (st == 1) v = from_f<T>(to_f<T>(hv) + a);                 // active
      else if (st == 2) v = from_f<T>(__int_as_float(0x7fc00000));  // bad position: NaN
      out[b * p.ld_out + row] = v;
    });
  }
};

}  // namespace d3k
