// The inner loops of the CPU backend, written once and compiled per instruction set: csrc/cpu/isa_*.cpp
// define D3K_ISA_TABLE and D3K_ISA_NS and include this file under their flags (-mavx512f ... / -mavx2 ...
// / none), so the intrinsics paths below are chosen by the compiler's feature macros.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "d3k/cpu/kernels.h"
#include "d3k/cpu/formats.h"

namespace d3k::cpu {
namespace D3K_ISA_NS {
namespace {

// ------------------------------------------------------------------ activation rounding
// x [K] -> q, dx, xs (formats.h): one dx = amax / kQMax per span of kSpan values (the last may be shorter).
void quantize(const float* x, int64_t K, int16_t* q, float* dx, float* xs) {
  for (int64_t s0 = 0; s0 < K; s0 += kSpan) {
    const int64_t n = std::min<int64_t>(kSpan, K - s0), g0 = s0 / kBlock;
    const float* xb = x + s0;
#if defined(__AVX2__)
    // the scalar loop below, 8 values a register: the same amax, 1 / d and round half to even (cvtps_epi32
    // under the default rounding mode), so both paths give the same integers
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(3.4028235e38f);
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask);
      m = _mm256_max_ps(m, a);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));   // inf or NaN
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    if (!_mm256_movemask_ps(bad)) {   // inf and NaN inputs take the scalar path, which defines what they give
      const float d = _mm_cvtss_f32(m4) / kQMax, id = d > 0.f ? 1.f / d : 0.f;
      const __m256 idv = _mm256_set1_ps(id);
      for (int64_t g = 0; g < n / kBlock; ++g) {
        __m256i r[4];
        for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 32 * g + 8 * i), idv));
        const __m256i p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(r[0], r[1]), 0xD8);
        const __m256i p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(r[2], r[3]), 0xD8);
        _mm256_storeu_si256((__m256i*)(q + s0 + 32 * g), p01);
        _mm256_storeu_si256((__m256i*)(q + s0 + 32 * g + 16), p23);
        __m256i t = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
        dx[g0 + g] = d;
        xs[g0 + g] = d * (float)_mm_cvtsi128_si32(t4);
      }
      continue;
    }
#endif
    float amax = 0.f;
    for (int64_t j = 0; j < n; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float d = amax / kQMax, id = d > 0.f ? 1.f / d : 0.f;
    for (int64_t g = 0; g < n / kBlock; ++g) {
      int32_t total = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int v = (int)std::nearbyint(xb[32 * g + j] * id);   // round half to even; |v| <= 32512
        q[s0 + 32 * g + j] = (int16_t)v;
        total += v;
      }
      dx[g0 + g] = d;
      xs[g0 + g] = d * (float)total;
    }
  }
}

// ------------------------------------------------------------------ block rows
// Any block format through its portable decode (formats.h): the scalar path.
template <class F>
float dot_chunks_portable(const uint8_t* row, const XRow& x, int64_t K) {
  float acc = 0.f;
  alignas(64) uint8_t w[64];
  float sc[4], mn[2];
  for (int64_t c = 0; c * 64 < K; ++c) {
    const int ng = (int)std::min<int64_t>(2, (K - c * 64) / kBlock);
    F::decode(row, c, ng, w, sc, mn);
    for (int g = 0; g < ng; ++g) {
      const int64_t v = c * 64 + 32 * g;
      float part = 0.f;
      for (int h = 0; h < 2; ++h) {
        int32_t s = 0;
        for (int k = 16 * h; k < 16 * h + 16; ++k) s += ((int32_t)w[32 * g + k] - F::kOffset) * x.q[v + k];
        part += sc[2 * g + h] * (float)s;
      }
      acc += part * x.dx[2 * c + g] + mn[g] * x.xs[2 * c + g];
    }
  }
  return acc;
}

// The GEMV's software prefetch distance: 4 KB ahead of the block it reads (the rows of a thread's share are
// contiguous, so that is 2-4 rows ahead). Two threads streaming Q4_0 rows ran at ~12.5 GB/s with it against
// ~11 without, on a VM where a plain 2-thread read reached 18-25 (the hardware prefetcher alone does not run
// far enough ahead); 1 KB gained less. A prefetch past the end of the matrix is harmless (it never faults).
constexpr int64_t kPrefetch = 4096;

// the GEMV streams from memory: ask for the kBytes at p, kPrefetch ahead, now (one prefetch a 64-byte line; the
// calls cover a row's bytes in order)
template <int kBytes>
D3K_ALWAYS_INLINE void prefetch_ahead(const uint8_t* p) {
  for (int off = 0; off < kBytes; off += 64) _mm_prefetch((const char*)(p + kPrefetch + off), _MM_HINT_T0);
}

// One weight row against RX activation rows: out[b] = row . xs[b]. Each group of 32 weights is decoded once
// (F::load) and multiplied with every activation row, so RX > 1 is the GEMM's micro-kernel and RX = 1 the GEMV.
// Every (weight row, activation row) pair sums in the same order whatever RX is, so a row's result does not
// depend on the batch around it. Per pair and group of 32: two madd and an add, then
// - 32-value blocks: a convert and an FMA by the block's float scale into the span's partial sum, which meets
//   the span's dx once per 8 groups;
// - K-quants (integer scales inside the weights): an int32 add; convert and FMA by d dx once per kIntGroups.
template <class F, int RX>
D3K_ALWAYS_INLINE void dot_rows(const uint8_t* row, const XRow* xs, int64_t K, float* out) {
#if defined(D3K_SIMD_BLOCKS)
  __m256 acc[RX];
  float extra[RX];
  for (int b = 0; b < RX; ++b) {
    acc[b] = _mm256_setzero_ps();
    extra[b] = 0.f;
  }
  if constexpr (F::kIntGroups > 0) {
    for (int64_t u = 0; u < K / F::kValues; ++u) {
      const uint8_t* blk = row + u * F::kBytes;
      if constexpr (RX == 1) prefetch_ahead<F::kBytes>(blk);
      typename F::Head h;
      F::head(blk, h);
      for (int j0 = 0; j0 < F::kGroups; j0 += F::kIntGroups) {
        __m256i isum[RX];
        for (int b = 0; b < RX; ++b) isum[b] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int j = j0; j < j0 + F::kIntGroups; ++j) {
          fmt::Group G;
          F::load(blk, j, h, G);
          const int64_t v = (u * F::kGroups + j) * 32;
          for (int b = 0; b < RX; ++b) {
            const __m256i l0 = _mm256_madd_epi16(G.w0, _mm256_loadu_si256((const __m256i*)(xs[b].q + v)));
            const __m256i l1 = _mm256_madd_epi16(G.w1, _mm256_loadu_si256((const __m256i*)(xs[b].q + v + 16)));
            isum[b] = _mm256_add_epi32(isum[b], _mm256_add_epi32(l0, l1));
            // keeps the sum in a register group by group: without it GCC reassociates the unrolled integer
            // sums of a tile (all madds first) and spills them
            asm("" : "+x"(isum[b]));
          }
        }
        const int64_t g0 = u * F::kGroups;   // the super-block is one span: one dx
        for (int b = 0; b < RX; ++b)
          acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[b]), _mm256_set1_ps(h.d * xs[b].dx[g0]), acc[b]);
      }
      if constexpr (F::kMin)
        for (int b = 0; b < RX; ++b) acc[b] = _mm256_fmadd_ps(h.m, _mm256_loadu_ps(xs[b].xs + 8 * u), acc[b]);
    }
  } else {   // float scales: a span's partial sum meets its dx once (a span is 8 blocks, or Q6_K's super-block)
    constexpr int64_t kSpanGroups = kSpan / 32;
    static_assert(F::kGroups == 1 || F::kGroups == kSpanGroups, "a span holds whole blocks");
    const int64_t ng = K / 32;
    __m256 part[RX];
    alignas(32) float mn[kSpanGroups] = {};   // the minimum types: the span's 8 minima, then 8 FMAs in one
    const auto group = [&](int64_t g, const fmt::Group& G) __attribute__((always_inline)) {
      for (int b = 0; b < RX; ++b) {
        const int16_t* q = xs[b].q + 32 * g;
        const __m256i l0 = _mm256_madd_epi16(G.w0, _mm256_loadu_si256((const __m256i*)q));
        const __m256i l1 = _mm256_madd_epi16(G.w1, _mm256_loadu_si256((const __m256i*)(q + 16)));
        if constexpr (F::kHalves) {
          // the halves' lane sums interleaved (lane pairs summed in int32, exactly), so that one convert and one
          // FMA by (s0, s1, s0, s1, ...) serve both: Q6_K's GEMV 5-17% faster than two of each, its tile 9-12% slower
          const __m256i t = _mm256_add_epi32(_mm256_unpacklo_epi32(l0, l1), _mm256_unpackhi_epi32(l0, l1));
          part[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), G.s01, part[b]);
        } else {
          part[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(l0, l1)), _mm256_set1_ps(G.s), part[b]);
        }
      }
      if constexpr (F::kMin) mn[g % kSpanGroups] = G.mn;
    };
    for (int64_t g0 = 0; g0 < ng; g0 += kSpanGroups) {
      const bool whole = g0 + kSpanGroups <= ng;   // else a row's last, shorter span
      for (int b = 0; b < RX; ++b) part[b] = _mm256_setzero_ps();
      typename F::Head h;
      fmt::Group G;
      if constexpr (F::kGroups == 1) {
        const auto block = [&](int64_t g) __attribute__((always_inline)) {
          const uint8_t* blk = row + g * F::kBytes;
          // one prefetch a block, though several share a line: one a line (a span's 3-5) read Q8_0 7% slower
          if constexpr (RX == 1) prefetch_ahead<F::kBytes>(blk);
          F::load(blk, 0, h, G);
          group(g, G);
        };
        if (whole) {   // unrolled
#pragma GCC unroll 8
          for (int j = 0; j < kSpanGroups; ++j) block(g0 + j);
        } else {
          for (int64_t g = g0; g < ng; ++g) block(g);
        }
      } else {
        const uint8_t* blk = row + (g0 / kSpanGroups) * F::kBytes;
        if constexpr (RX == 1) prefetch_ahead<F::kBytes>(blk);
        F::head(blk, h);
#pragma GCC unroll 8
        for (int j = 0; j < F::kGroups; ++j) {
          F::load(blk, j, h, G);
          group(g0 + j, G);
        }
      }
      for (int b = 0; b < RX; ++b) acc[b] = _mm256_fmadd_ps(part[b], _mm256_broadcast_ss(xs[b].dx + g0), acc[b]);
      if constexpr (F::kMin) {
        if (whole) {
          for (int b = 0; b < RX; ++b) acc[b] = _mm256_fmadd_ps(_mm256_load_ps(mn), _mm256_loadu_ps(xs[b].xs + g0), acc[b]);
        } else {
          for (int b = 0; b < RX; ++b)
            for (int64_t g = g0; g < ng; ++g) extra[b] += mn[g - g0] * xs[b].xs[g];
        }
      }
    }
  }
  for (int b = 0; b < RX; ++b) out[b] = fmt::hsum8(acc[b]) + extra[b];
#else
  for (int b = 0; b < RX; ++b) out[b] = dot_chunks_portable<F>(row, xs[b], K);
#endif
}

// ------------------------------------------------------------------ float rows (f32 / f16 / bf16)
template <QType T>
inline float load1(const uint8_t* v, int64_t j) {
  if constexpr (T == QType::kF32) {
    float f;
    std::memcpy(&f, v + 4 * j, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, v + 2 * j, 2);
    return T == QType::kF16 ? f16_to_f32(h) : bf16_to_f32(h);
  }
}

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using VecF = __m512;
template <QType T>
inline VecF loadv(const uint8_t* v, int64_t j) {
  if constexpr (T == QType::kF32) return _mm512_loadu_ps(v + 4 * j);
  const __m256i h = _mm256_loadu_si256((const __m256i*)(v + 2 * j));
  if constexpr (T == QType::kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline VecF fma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF zero() { return _mm512_setzero_ps(); }
inline VecF loadf(const float* p) { return _mm512_loadu_ps(p); }
inline void storef(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF bcast(float a) { return _mm512_set1_ps(a); }
inline float hsumv(VecF v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
constexpr int kLanes = 8;
using VecF = __m256;
template <QType T>
inline VecF loadv(const uint8_t* v, int64_t j) {
  if constexpr (T == QType::kF32) return _mm256_loadu_ps((const float*)(v + 4 * j));
  const __m128i h = _mm_loadu_si128((const __m128i*)(v + 2 * j));
  if constexpr (T == QType::kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline VecF fma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF zero() { return _mm256_setzero_ps(); }
inline VecF loadf(const float* p) { return _mm256_loadu_ps(p); }
inline void storef(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF bcast(float a) { return _mm256_set1_ps(a); }
inline float hsumv(VecF v) { return fmt::hsum8(v); }   // the AVX2 builds have FMA and F16C too
#endif

template <QType T>
float dot_float(const uint8_t* v, const float* x, int64_t K) {
  int64_t j = 0;
  float tail = 0.f;
#if defined(__AVX2__)
  VecF a0 = zero(), a1 = zero();
  for (; j + 2 * kLanes <= K; j += 2 * kLanes) {
    a0 = fma(loadv<T>(v, j), loadf(x + j), a0);
    a1 = fma(loadv<T>(v, j + kLanes), loadf(x + j + kLanes), a1);
  }
  for (; j + kLanes <= K; j += kLanes) a0 = fma(loadv<T>(v, j), loadf(x + j), a0);
  tail = hsumv(a0) + hsumv(a1);
#endif
  float acc = 0.f;
  for (; j < K; ++j) acc += load1<T>(v, j) * x[j];
  return tail + acc;
}

template <QType T>
void axpy_float(float a, const uint8_t* v, float* y, int64_t K) {
  int64_t j = 0;
#if defined(__AVX2__)
  const VecF av = bcast(a);
  for (; j + kLanes <= K; j += kLanes) storef(y + j, fma(av, loadv<T>(v, j), loadf(y + j)));
#endif
  for (; j < K; ++j) y[j] += a * load1<T>(v, j);
}

// the row's output index: its own, or un-permuted from llama.cpp's interleaved-RoPE order (kernels.h)
D3K_ALWAYS_INLINE int64_t out_row(int64_t r, int64_t perm_d) {
  if (!perm_d) return r;
  const int64_t head = r / perm_d, i = r % perm_d;
  return head * perm_d + (i & 1) * (perm_d / 2) + (i >> 1);
}

// Rows [r0, r1) of block format F against nx activation rows: the weight rows in blocks of kRowBlock (which stay
// in L2 while every activation row passes over them), each block against the activation rows kTile at a time
// (then 4, 2, 1 for the rest). One activation row is the GEMV: each weight row streams through once.
constexpr int64_t kRowBlock = 32;
constexpr int kTile = 8;

template <class F, int RX>
void pass(const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, float* y, int64_t ldy, int64_t K,
          int64_t perm_d) {
  float out[RX];
  for (int64_t r = r0; r < r1; ++r) {
    dot_rows<F, RX>(w + r * ld, xs, K, out);
    const int64_t o = out_row(r, perm_d);
    for (int b = 0; b < RX; ++b) y[b * ldy + o] = out[b];
  }
}

template <class F>
void gemm_blocks(const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y,
                 int64_t ldy, int64_t K, int64_t perm_d) {
  if (nx == 1) return pass<F, 1>(w, ld, r0, r1, xs, y, ldy, K, perm_d);
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(rb + kRowBlock, r1);
    int b = 0;
    for (; b + kTile <= nx; b += kTile) pass<F, kTile>(w, ld, rb, re, xs + b, y + b * ldy, ldy, K, perm_d);
    if (b + 4 <= nx) {
      pass<F, 4>(w, ld, rb, re, xs + b, y + b * ldy, ldy, K, perm_d);
      b += 4;
    }
    if (b + 2 <= nx) {
      pass<F, 2>(w, ld, rb, re, xs + b, y + b * ldy, ldy, K, perm_d);
      b += 2;
    }
    if (b < nx) pass<F, 1>(w, ld, rb, re, xs + b, y + b * ldy, ldy, K, perm_d);
  }
}

template <QType T>
void gemv_t(const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y, int64_t ldy,
            int64_t K, int64_t perm_d) {
  if constexpr (T == QType::kF32 || T == QType::kF16 || T == QType::kBF16) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + r * ld;
      const int64_t o = out_row(r, perm_d);
      for (int b = 0; b < nx; ++b) y[b * ldy + o] = dot_float<T>(row, xs[b].f, K);
    }
  } else {
    gemm_blocks<fmt::Of<T>>(w, ld, r0, r1, xs, nx, y, ldy, K, perm_d);
  }
}

#define D3K_EACH_BLOCK_QTYPE(X) X(kQ4_0) X(kQ4_1) X(kQ8_0) X(kQ5_0) X(kQ5_1) X(kQ4_K) X(kQ5_K) X(kQ6_K)
#define D3K_EACH_QTYPE(X) X(kF32) X(kF16) X(kBF16) D3K_EACH_BLOCK_QTYPE(X)

void gemv(QType t, const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y,
          int64_t ldy, int64_t K, int64_t perm_d) {
  switch (t) {
#define D3K_CASE(q) \
    case QType::q: return gemv_t<QType::q>(w, ld, r0, r1, xs, nx, y, ldy, K, perm_d);
    D3K_EACH_QTYPE(D3K_CASE)
#undef D3K_CASE
  }
}

template <class F>
void decode_blocks(const uint8_t* row, float* y, int64_t K) {
  alignas(64) uint8_t w[64];
  float sc[4], mn[2];
  for (int64_t c = 0; c * 64 < K; ++c) {
    const int ng = (int)std::min<int64_t>(2, (K - c * 64) / kBlock);
    F::decode(row, c, ng, w, sc, mn);
    for (int k = 0; k < 32 * ng; ++k) y[c * 64 + k] = sc[k / 16] * (float)((int)w[k] - F::kOffset) + mn[k / 32];
  }
}

void decode_row(QType t, const uint8_t* w, float* y, int64_t K) {
  switch (t) {
    case QType::kF32:
    case QType::kF16:
    case QType::kBF16:
      for (int64_t j = 0; j < K; ++j)
        y[j] = t == QType::kF32 ? load1<QType::kF32>(w, j) : t == QType::kF16 ? load1<QType::kF16>(w, j)
                                                                                : load1<QType::kBF16>(w, j);
      return;
#define D3K_CASE(q) \
    case QType::q: return decode_blocks<fmt::Of<QType::q>>(w, y, K);
    D3K_EACH_BLOCK_QTYPE(D3K_CASE)
#undef D3K_CASE
  }
}

float dot(QType t, const uint8_t* v, const float* x, int64_t K) {
  switch (t) {
    case QType::kF16: return dot_float<QType::kF16>(v, x, K);
    case QType::kBF16: return dot_float<QType::kBF16>(v, x, K);
    default: return dot_float<QType::kF32>(v, x, K);
  }
}

void axpy(QType t, float a, const uint8_t* v, float* y, int64_t K) {
  switch (t) {
    case QType::kF16: return axpy_float<QType::kF16>(a, v, y, K);
    case QType::kBF16: return axpy_float<QType::kBF16>(a, v, y, K);
    default: return axpy_float<QType::kF32>(a, v, y, K);
  }
}

}  // namespace
}  // namespace D3K_ISA_NS

const IsaKernels D3K_ISA_TABLE = {D3K_ISA_NAME, D3K_ISA_NS::quantize, D3K_ISA_NS::gemv, D3K_ISA_NS::dot,
                                  D3K_ISA_NS::axpy, D3K_ISA_NS::decode_row};

}  // namespace d3k::cpu
