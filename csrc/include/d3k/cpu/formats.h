// The weight block formats of the CPU backend, each in one place: its layout, its portable decode and its
// SIMD dot product. Included by d3k/cpu/kernels_impl.h, which is compiled once per instruction
// set (csrc/cpu/isa_*.cpp); the SIMD parts exist only in the builds whose flags have AVX2, FMA and F16C.
//
// Every format is read two ways:
// - decode(row, c, ng, w, sc, mn): the portable path, in chunks of 64 values (two 32-value groups of the activation
//   rounding; a row of a 32-value block type may end with a half chunk) as
//     w[64]  unsigned integers (uint8),
//     sc[4]  a float scale per 16 values, and an integer zero point kOffset (per format),
//     mn[2]  a float added per 32 values (the "minimum" types; 0 for the others),
//   so that value k = sc[k / 16] * (w[k] - kOffset) + mn[k / 32];
// - load(row, g, G) (SIMD builds): group g, the 32 values at 32 g, as int16 w - kOffset in two registers (values
//   0..15, 16..31), the scale of each half and the group's minimum.
// Against activations rounded to 16-bit integers with one scale per span of 256 values (x_k = dx q_k; kernels.h)
// a 32-value block's dot product is
//   dx (sc_0 sum_{k < 16} (w_k - kOffset) q_k + sc_1 sum_{k >= 16} (w_k - kOffset) q_k) + mn_g dx sum_k q_k,
// integer inside each 16 values, float across them. Q4_K's and Q5_K's sub-block scales are 6-bit integers times
// one float d per super-block, so their SIMD path multiplies the integer scale into the weights (kIntGroups
// below) and sums the super-block's groups in int32 before d dx applies once: one span is one super-block.
// (Q6_K's int8 scales per 16 values stay floats: see Q6_K.) Layouts are ggml's (ggml-common.h), little-endian.
//
// The SIMD path (AVX2 + FMA + F16C; the avx2 and avx512 builds both use it) multiplies int16 weights with the
// int16 activations by madd (16 products a register, summed in pairs into int32). 32-value blocks:
// |w - kOffset| <= 128 and |q| <= 32512 keep each lane's sum of 4 products below 2^24, so the lanes convert to
// float exactly (Q6_K, |w - 32| <= 32, also adds the lanes of its two halves in pairs before converting).
// Q4_K / Q5_K: |sc w| <= 945 / 1953 over a super-block's 8 groups keep each lane below 2^31 (at most 2.031e9
// for Q5_K), and the int32 sum converts to float once (rounded to 24 bits).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define D3K_SIMD_BLOCKS 1
#endif

#include "d3k/cpu/kernels.h"

// The SIMD loads sit in the innermost loops: inlined always, so that a group stays in registers.
#define D3K_ALWAYS_INLINE inline __attribute__((always_inline))

namespace d3k::cpu::fmt {

inline uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline float h2f(const uint8_t* p) { return kHalfTable[u16(p)]; }

// One activation row rounded for the block types (kernels.h XRow holds the pointers): q = round(x / dx) with
// dx = amax / kQMax per span of kSpan = 256 values (the last span of a row may be shorter, a multiple of 32),
//   q   int16 [K]
//   dx  float [K / 32]   the span's dx, repeated for each 32 values
//   xs  float [K / 32]   dx * the 32 values' sum of q (the minimum types' term)

#if defined(D3K_SIMD_BLOCKS)
// ------------------------------------------------------------------ SIMD helpers
// One group of 32 weights as the SIMD path reads it.
struct Group {
  __m256i w0, w1;   // int16 w - kOffset of values 0..15 and 16..31 (kIntGroups formats: times their integer scale)
  float s;          // the group's float scale (not kHalves)
  __m256 s01;       // kHalves (Q6_K's scale per 16): the scales of values 0..15 and 16..31 alternating, s0, s1, s0,
                    // s1, ...: the lanes of the two halves' madd sums interleaved
  float mn;         // the minimum (the kMin formats of 32-value blocks; the K-quants' come per super-block)
};

D3K_ALWAYS_INLINE __m256i u8x16(const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)); }
D3K_ALWAYS_INLINE __m256i i8x16(const uint8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
D3K_ALWAYS_INLINE __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi16(0x0F)); }
D3K_ALWAYS_INLINE __m256i high4(__m256i v) { return _mm256_srli_epi16(v, 4); }   // of zero-extended bytes
// bits [from, from + n) of each 16-bit lane moved to [4, 4 + n), the rest cleared (mask: ((1 << n) - 1) << 4)
D3K_ALWAYS_INLINE __m256i bits_to(__m256i v, int from, short mask) {
  const __m256i b = from <= 4 ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - from)) : _mm256_srl_epi16(v, _mm_cvtsi32_si128(from - 4));
  return _mm256_and_si256(b, _mm256_set1_epi16(mask));
}
// the 32 bits of qh, bit k for value k, as two registers of 16-bit lanes holding 0x10 (bit set) or 0
D3K_ALWAYS_INLINE void bits_to_16(uint32_t qh, __m256i& h0, __m256i& h1) {
  const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, -32768);
  h0 = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)(qh & 0xFFFF)), sel), sel),
                        _mm256_set1_epi16(0x10));
  h1 = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)(qh >> 16)), sel), sel),
                        _mm256_set1_epi16(0x10));
}

inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
#endif

// ------------------------------------------------------------------ the 32-value block types
// The nibble types, one layout family: a block of 32 values is {f16 d; [f16 m;] [u32 qh;] u8 qs[16]}, byte j of
// qs holding value j (low nibble) and j + 16 (high), bit k of qh value k's 5th bit (kFive):
//   Q4_0 {d; qs}: v = d (q - 8)          Q4_1 {d, m; qs}: v = d q + m
//   Q5_0 {d; qh; qs}: v = d (q - 16)     Q5_1 {d, m; qh; qs}: v = d q + m
template <QType T, bool kFive, bool kHasMin>
struct Nibbles32 {
  static constexpr QType kType = T;
  static constexpr bool kMin = kHasMin;   // a float minimum per 32 values
  static constexpr bool kHalves = false;   // a scale per 16 values
  static constexpr int kGroups = 1;   // groups of 32 values per block
  static constexpr int kIntGroups = 0;   // a float scale per group (see Q4_K)
  struct Head {};
  static void head(const uint8_t*, Head&) {}
  static constexpr int kQh = kHasMin ? 4 : 2, kQs = kQh + (kFive ? 4 : 0);   // where qh and qs start
  static constexpr int kValues = 32, kBytes = kQs + 16, kOffset = kHasMin ? 0 : kFive ? 16 : 8;
  static void decode(const uint8_t* row, int64_t c, int ng, uint8_t* w, float* sc, float* mn) {
    for (int g = 0; g < ng && g < 2; ++g) {
      const uint8_t* b = row + (2 * c + g) * kBytes;
      const uint32_t qh = kFive ? u32(b + kQh) : 0;
      for (int j = 0; j < 16; ++j) {
        w[32 * g + j] = (b[kQs + j] & 0xF) | ((qh >> j) & 1) << 4;
        w[32 * g + j + 16] = (b[kQs + j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      }
      sc[2 * g] = sc[2 * g + 1] = h2f(b);
      mn[g] = kHasMin ? h2f(b + 2) : 0.f;
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  static D3K_ALWAYS_INLINE void load(const uint8_t* b, int, const Head&, Group& G) {
    const __m256i w = u8x16(b + kQs);
    G.w0 = low4(w);
    G.w1 = high4(w);
    if constexpr (kFive) {
      __m256i h0, h1;
      bits_to_16(u32(b + kQh), h0, h1);
      G.w0 = _mm256_or_si256(G.w0, h0);
      G.w1 = _mm256_or_si256(G.w1, h1);
    }
    if constexpr (kOffset != 0) {
      const __m256i z = _mm256_set1_epi16(kOffset);
      G.w0 = _mm256_sub_epi16(G.w0, z);
      G.w1 = _mm256_sub_epi16(G.w1, z);
    }
    G.s = h2f(b);
    G.mn = kHasMin ? h2f(b + 2) : 0.f;
  }
#endif
};
using Q4_0 = Nibbles32<QType::kQ4_0, false, false>;
using Q4_1 = Nibbles32<QType::kQ4_1, false, true>;
using Q5_0 = Nibbles32<QType::kQ5_0, true, false>;
using Q5_1 = Nibbles32<QType::kQ5_1, true, true>;

// Q8_0 {f16 d; i8 qs[32]}: v = d q; read as w = q + 128 with zero point 128.
struct Q8_0 {
  static constexpr QType kType = QType::kQ8_0;
  static constexpr bool kMin = false;   // a float minimum per 32 values
  static constexpr bool kHalves = false;   // a scale per 16 values
  static constexpr int kGroups = 1;   // groups of 32 values per block
  static constexpr int kIntGroups = 0;   // a float scale per group (see Q4_K)
  struct Head {};
  static void head(const uint8_t*, Head&) {}
  static constexpr int kValues = 32, kBytes = 34, kOffset = 128;  // the SIMD path reads the signed bytes
  static void decode(const uint8_t* row, int64_t c, int ng, uint8_t* w, float* sc, float* mn) {
    for (int g = 0; g < ng && g < 2; ++g) {
      const uint8_t* b = row + (2 * c + g) * kBytes;
      for (int j = 0; j < 32; ++j) w[32 * g + j] = b[2 + j] ^ 0x80;
      sc[2 * g] = sc[2 * g + 1] = h2f(b);
      mn[g] = 0.f;
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  static D3K_ALWAYS_INLINE void load(const uint8_t* b, int, const Head&, Group& G) {
    G.w0 = i8x16(b + 2);
    G.w1 = i8x16(b + 18);
    G.s = h2f(b);
    G.mn = 0.f;
  }
#endif
};

// ------------------------------------------------------------------ the K-quants: super-blocks of 256
// The 6-bit scale and minimum of sub-block j (0..7) of Q4_K / Q5_K (ggml's get_scale_min_k4).
D3K_ALWAYS_INLINE void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}: 8 sub-blocks of 32, v = d sc_j q - dmin m_j; the 32 bytes of
// qs[32 c ..] hold sub-block 2c (low nibbles) and 2c + 1 (high nibbles).
// Q5_K {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K plus a 5th bit, bit 2c (2c + 1) of qh[l]
// for value l of sub-block 2c (2c + 1).
template <bool kFive>
struct QxK {
  static constexpr QType kType = kFive ? QType::kQ5_K : QType::kQ4_K;
  static constexpr bool kMin = true;   // the minima: Head::m, per super-block
  static constexpr bool kHalves = false;
  static constexpr int kValues = 256, kBytes = kFive ? 176 : 144, kOffset = 0;
  static constexpr int kQs = kFive ? 48 : 16;
  static void decode(const uint8_t* row, int64_t c, int, uint8_t* w, float* sc, float* mn) {
    const uint8_t* b = row + (c / 4) * kBytes;
    const int cc = (int)(c % 4);
    const float d = h2f(b), dmin = h2f(b + 2);
    for (int h = 0; h < 2; ++h) {
      int s, m;
      scale_min_k4(2 * cc + h, b + 4, &s, &m);
      sc[2 * h] = sc[2 * h + 1] = d * (float)s;
      mn[h] = -dmin * (float)m;
      for (int l = 0; l < 32; ++l) {
        const uint8_t q = b[kQs + 32 * cc + l];
        int v = h ? q >> 4 : q & 0xF;
        if constexpr (kFive) v |= ((b[16 + l] >> (2 * cc + h)) & 1) << 4;
        w[32 * h + l] = (uint8_t)v;
      }
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  // the super-block's d, its 8 integer scales and its minima (floats), once for its 8 groups: the 12 bytes of
  // 6-bit values rearranged into 8 scale bytes and 8 minimum bytes (ggml's utmp shuffle)
  static constexpr int kGroups = 8, kIntGroups = 8;
  struct Head {
    float d;
    __m256i sc;   // the 8 scales as int16, in both 128-bit halves (one byte shuffle broadcasts scale j)
    __m256 m;     // -dmin * m_j
  };
  static D3K_ALWAYS_INLINE void head(const uint8_t* b, Head& h) {
    uint32_t u[4];
    std::memcpy(u, b + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t m03 = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = m03;
    u[0] &= 0x3f3f3f3f;
    const __m128i v = _mm_loadu_si128((const __m128i*)u);
    h.sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(v));
    h.d = h2f(b);
    h.m = _mm256_mul_ps(_mm256_set1_ps(-h2f(b + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))));
  }
  // group j: sub-block j of super-block b, times its scale
  static D3K_ALWAYS_INLINE void load(const uint8_t* b, int j, const Head& h, Group& G) {
    const uint8_t* q = b + kQs + 32 * (j / 2);
    __m256i w0 = u8x16(q), w1 = u8x16(q + 16);
    w0 = j % 2 ? high4(w0) : low4(w0);
    w1 = j % 2 ? high4(w1) : low4(w1);
    if constexpr (kFive) {   // bit j of qh[l] is value l's 5th bit
      w0 = _mm256_or_si256(w0, bits_to(u8x16(b + 16), j, 0x10));
      w1 = _mm256_or_si256(w1, bits_to(u8x16(b + 32), j, 0x10));
    }
    const __m256i s = _mm256_shuffle_epi8(h.sc, _mm256_set1_epi16((short)(2 * j | (2 * j + 1) << 8)));
    G.w0 = _mm256_mullo_epi16(w0, s);
    G.w1 = _mm256_mullo_epi16(w1, s);
  }
#endif
};
using Q4_K = QxK<false>;
using Q5_K = QxK<true>;

// Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: v = d scales[k / 16] (q - 32), q 6 bits. In each half
// n of 128 values, value l + 32 i (l < 32, i < 4) takes the low (i = 0, 1) or high (i = 2, 3) nibble of
// ql[64 n + l + 32 (i & 1)] and bits 2i, 2i + 1 of qh[32 n + l].
struct Q6_K {
  static constexpr QType kType = QType::kQ6_K;
  static constexpr bool kMin = false;   // a float minimum per 32 values
  static constexpr bool kHalves = true;   // a scale per 16 values
  static constexpr int kValues = 256, kBytes = 210, kOffset = 32;
  static void decode(const uint8_t* row, int64_t c, int, uint8_t* w, float* sc, float* mn) {
    const uint8_t* b = row + (c / 4) * kBytes;
    const int cc = (int)(c % 4), n = cc / 2, hi = cc % 2;
    const float d = h2f(b + 208);
    for (int q = 0; q < 4; ++q) sc[q] = d * (float)(int8_t)b[192 + 4 * cc + q];
    mn[0] = mn[1] = 0.f;
    for (int half = 0; half < 2; ++half) {     // values 32 half + l of the chunk: i = 2 hi + half
      const int i = 2 * hi + half;
      for (int l = 0; l < 32; ++l) {
        const uint8_t qlb = b[64 * n + l + 32 * half];
        const int lo4 = hi ? qlb >> 4 : qlb & 0xF;
        w[32 * half + l] = (uint8_t)(lo4 | ((b[128 + 32 * n + l] >> (2 * i)) & 3) << 4);
      }
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  // d times the 16 int8 scales of super-block b, computed once for its 8 groups. (Multiplying the int8 scales
  // into the weights as Q4_K does cost the GEMV two mullo and two broadcasts per group: 34% more instructions.)
  static constexpr int kGroups = 8, kIntGroups = 0;
  struct Head {
    alignas(32) float s[16];
  };
  static D3K_ALWAYS_INLINE void head(const uint8_t* b, Head& h) {
    const __m128i sc8 = _mm_loadu_si128((const __m128i*)(b + 192));
    const __m256 d = _mm256_set1_ps(h2f(b + 208));
    _mm256_store_ps(h.s, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8))));
    _mm256_store_ps(h.s + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)))));
  }
  // group j: values 32 i .. 32 i + 31 of half n of super-block b (j = 4 n + i)
  static D3K_ALWAYS_INLINE void load(const uint8_t* b, int j, const Head& h, Group& G) {
    const int n = j / 4, i = j % 4;
    const uint8_t* ql = b + 64 * n + 32 * (i & 1);
    __m256i w0 = u8x16(ql), w1 = u8x16(ql + 16);
    w0 = i < 2 ? low4(w0) : high4(w0);
    w1 = i < 2 ? low4(w1) : high4(w1);
    const uint8_t* qh = b + 128 + 32 * n;
    const __m256i z = _mm256_set1_epi16(kOffset);
    G.w0 = _mm256_sub_epi16(_mm256_or_si256(w0, bits_to(u8x16(qh), 2 * i, 0x30)), z);
    G.w1 = _mm256_sub_epi16(_mm256_or_si256(w1, bits_to(u8x16(qh + 16), 2 * i, 0x30)), z);
    G.s01 = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(h.s + 2 * j)));
    G.mn = 0.f;
  }
#endif
};

// The format of each block QType
template <QType T> struct OfT;
template <> struct OfT<QType::kQ4_0> { using type = Q4_0; };
template <> struct OfT<QType::kQ4_1> { using type = Q4_1; };
template <> struct OfT<QType::kQ5_0> { using type = Q5_0; };
template <> struct OfT<QType::kQ5_1> { using type = Q5_1; };
template <> struct OfT<QType::kQ8_0> { using type = Q8_0; };
template <> struct OfT<QType::kQ4_K> { using type = Q4_K; };
template <> struct OfT<QType::kQ5_K> { using type = Q5_K; };
template <> struct OfT<QType::kQ6_K> { using type = Q6_K; };
template <QType T> using Of = typename OfT<T>::type;

}  // namespace d3k::cpu::fmt
