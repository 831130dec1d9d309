// The weight block formats of the CPU backend, each in one place: its layout, its portable decode and its
// SIMD dot product. Included by d3k/cpu/kernels_impl.h, which is compiled once per instruction
// set (csrc/cpu/isa_*.cpp); the SIMD parts exist only in the builds whose flags have AVX2, FMA and F16C.
//
// Every format is read in chunks of 64 values (two 32-value groups of the activation rounding; a row of a
// 32-value block type may end with a half chunk). A chunk decodes to
//   w[64]  unsigned integers (uint8),
//   sc[4]  a float scale per 16 values, and an integer zero point kOffset (per format),
//   mn[2]  a float added per 32 values (the "minimum" types; 0 for the others),
// so that value k = sc[k / 16] * (w[k] - kOffset) + mn[k / 32]. Against activations rounded to 16-bit integer
// blocks of 32 (x_k = dx_g * q_k) the chunk's dot product is
//   sum_q sc[q] dx_g(q) sum_{k in q} (w_k - kOffset) q_k  +  sum_g mn[g] dx_g sum_{k in g} q_k,
// integer inside each 16 values, float across them. Layouts are ggml's (ggml-common.h), little-endian.
//
// The SIMD path (AVX2 + FMA + F16C; the avx2 and avx512 builds both use it) reads 32 values per 256-bit
// register: maddubs multiplies the unsigned weights with each int8 plane of the activations into int16 pairs
// (|pair| <= 2 * 63 * 127 for the unsigned types, no saturation; Q8_0 uses the sign trick), madd widens to
// 8 int32 lanes of 4 values each and joins the planes (x 255, x 1), the zero point comes off in the lanes.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define D3K_SIMD_BLOCKS 1
#endif

#include "d3k/cpu/kernels.h"

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

// One activation row rounded for the block types (kernels.h XRow holds the pointers): 16-bit integers
// q = round(x / dx), dx = amax / kQMax per 32 values, each stored as two int8 planes q = 255 hi + lo with hi,
// lo in [-127, 127] (so the int8 multiply-adds, sign trick included, read them exactly):
//   hi, lo int8 [K]
//   dx    float [K / 32]
//   nz    int32 [K / 4]    -8 * the sum of each 4 consecutive q (the zero points' correction, in the lanes)
//   xs    float [K / 32]   dx * the 32 values' sum of q (the minimum types' term)

#if defined(D3K_SIMD_BLOCKS)
// ------------------------------------------------------------------ SIMD helpers
// (w - kZero) . q over the 32 values at v0 as 8 int32 lanes (lane l: values 4l .. 4l + 3); w unsigned bytes
// (|pair| <= 2 * 63 * 127 in maddubs's int16), the two planes joined in int32.
template <int kZero>
inline __m256i group_dot(__m256i w, const XRow& x, int64_t v0) {
  const __m256i ph = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)(x.hi + v0)));
  const __m256i pl = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)(x.lo + v0)));
  __m256i p = _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(255)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
  if constexpr (kZero != 0) {
    static_assert(kZero == 8 || kZero == 16 || kZero == 32, "zero points are 8, 16 or 32");
    __m256i z = _mm256_loadu_si256((const __m256i*)(x.nz + v0 / 4));
    if constexpr (kZero > 8) z = _mm256_slli_epi32(z, kZero == 16 ? 1 : 2);
    p = _mm256_add_epi32(p, z);
  }
  return p;
}

// signed weights (Q8_0): |w| . sign(q, w), per plane
inline __m256i group_dot_signed(__m256i w, const XRow& x, int64_t v0) {
  const __m256i a = _mm256_sign_epi8(w, w);
  const __m256i ph = _mm256_maddubs_epi16(a, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(x.hi + v0)), w));
  const __m256i pl = _mm256_maddubs_epi16(a, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(x.lo + v0)), w));
  return _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(255)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
}

// acc += lanes * scale * dx of the group starting at value v0
inline void add_scaled(__m256& acc, __m256i lanes, __m256 scale, const XRow& x, int64_t v0) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_mul_ps(scale, _mm256_broadcast_ss(x.dx + v0 / 32)), acc);
}

// a 32-value block whose f16 scale is at p: acc += lanes * scale * dx (both broadcast from memory)
inline void add_block(__m256& acc, __m256i lanes, const uint8_t* p, const XRow& x, int64_t v0) {
  add_scaled(acc, lanes, _mm256_broadcast_ss(kHalfTable + u16(p)), x, v0);
}

inline __m256i nibbles_16(const uint8_t* qs) {  // 16 bytes -> [qs & F, qs >> 4]
  const __m128i lo = _mm_loadu_si128((const __m128i*)qs);
  return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), _mm_srli_epi16(lo, 4), 1),
                          _mm256_set1_epi8(0x0F));
}

// the 32 bits of qh as 32 bytes of 0x10 (bit set) or 0 (ggml's bytes_from_bits_32, shifted to bit 4)
inline __m256i bits_to_16(uint32_t qh) {
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
  const __m256i bit = _mm256_set1_epi64x((long long)0x7fbfdfeff7fbfdfeULL);
  b = _mm256_or_si256(b, bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

// bits of each byte moved so that bit `from` lands on bit 4 or 5 (16-bit shifts; the mask keeps only bytes' own bits)
template <int kFrom, int kTo>
inline __m256i move_bits(__m256i v) {
  if constexpr (kFrom > kTo) return _mm256_srli_epi16(v, kFrom - kTo);
  else if constexpr (kFrom < kTo) return _mm256_slli_epi16(v, kTo - kFrom);
  else return v;
}

inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
#endif

// ------------------------------------------------------------------ the 32-value block types
// Q4_0 {f16 d; u8 qs[16]}: v = d (q - 8); byte j of qs holds value j (low nibble) and j + 16 (high).
struct Q4_0 {
  static constexpr QType kType = QType::kQ4_0;
  static constexpr bool kMin = false;   // a float minimum per 32 values
  static constexpr int kValues = 32, kBytes = 18, kOffset = 8;
  static void decode(const uint8_t* row, int64_t c, int ng, uint8_t* w, float* sc, float* mn) {
    for (int g = 0; g < ng && g < 2; ++g) {
      const uint8_t* b = row + (2 * c + g) * kBytes;
      for (int j = 0; j < 16; ++j) {
        w[32 * g + j] = b[2 + j] & 0xF;
        w[32 * g + j + 16] = b[2 + j] >> 4;
      }
      sc[2 * g] = sc[2 * g + 1] = h2f(b);
      mn[g] = 0.f;
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  static void group(const uint8_t* b, int64_t v0, const XRow& x, __m256& acc, float&) {
    add_block(acc, group_dot<kOffset>(nibbles_16(b + 2), x, v0), b, x, v0);
  }
#endif
};

// Q4_1 {f16 d, m; u8 qs[16]}: v = d q + m.
struct Q4_1 {
  static constexpr QType kType = QType::kQ4_1;
  static constexpr bool kMin = true;   // a float minimum per 32 values
  static constexpr int kValues = 32, kBytes = 20, kOffset = 0;
  static void decode(const uint8_t* row, int64_t c, int ng, uint8_t* w, float* sc, float* mn) {
    for (int g = 0; g < ng && g < 2; ++g) {
      const uint8_t* b = row + (2 * c + g) * kBytes;
      for (int j = 0; j < 16; ++j) {
        w[32 * g + j] = b[4 + j] & 0xF;
        w[32 * g + j + 16] = b[4 + j] >> 4;
      }
      sc[2 * g] = sc[2 * g + 1] = h2f(b);
      mn[g] = h2f(b + 2);
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  static void group(const uint8_t* b, int64_t v0, const XRow& x, __m256& acc, float& extra) {
    add_block(acc, group_dot<0>(nibbles_16(b + 4), x, v0), b, x, v0);
    extra += h2f(b + 2) * x.xs[v0 / 32];
  }
#endif
};

// Q5_0 {f16 d; u32 qh; u8 qs[16]}: v = d (q - 16), q = nibble | (bit k of qh) << 4 for value k.
struct Q5_0 {
  static constexpr QType kType = QType::kQ5_0;
  static constexpr bool kMin = false;   // a float minimum per 32 values
  static constexpr int kValues = 32, kBytes = 22, kOffset = 16;
  static void decode(const uint8_t* row, int64_t c, int ng, uint8_t* w, float* sc, float* mn) {
    for (int g = 0; g < ng && g < 2; ++g) {
      const uint8_t* b = row + (2 * c + g) * kBytes;
      const uint32_t qh = u32(b + 2);
      for (int j = 0; j < 16; ++j) {
        w[32 * g + j] = (b[6 + j] & 0xF) | ((qh >> j) & 1) << 4;
        w[32 * g + j + 16] = (b[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      }
      sc[2 * g] = sc[2 * g + 1] = h2f(b);
      mn[g] = 0.f;
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  static void group(const uint8_t* b, int64_t v0, const XRow& x, __m256& acc, float&) {
    const __m256i w = _mm256_or_si256(nibbles_16(b + 6), bits_to_16(u32(b + 2)));
    add_block(acc, group_dot<kOffset>(w, x, v0), b, x, v0);
  }
#endif
};

// Q5_1 {f16 d, m; u32 qh; u8 qs[16]}: v = d q + m.
struct Q5_1 {
  static constexpr QType kType = QType::kQ5_1;
  static constexpr bool kMin = true;   // a float minimum per 32 values
  static constexpr int kValues = 32, kBytes = 24, kOffset = 0;
  static void decode(const uint8_t* row, int64_t c, int ng, uint8_t* w, float* sc, float* mn) {
    for (int g = 0; g < ng && g < 2; ++g) {
      const uint8_t* b = row + (2 * c + g) * kBytes;
      const uint32_t qh = u32(b + 4);
      for (int j = 0; j < 16; ++j) {
        w[32 * g + j] = (b[8 + j] & 0xF) | ((qh >> j) & 1) << 4;
        w[32 * g + j + 16] = (b[8 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      }
      sc[2 * g] = sc[2 * g + 1] = h2f(b);
      mn[g] = h2f(b + 2);
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  static void group(const uint8_t* b, int64_t v0, const XRow& x, __m256& acc, float& extra) {
    const __m256i w = _mm256_or_si256(nibbles_16(b + 8), bits_to_16(u32(b + 4)));
    add_block(acc, group_dot<0>(w, x, v0), b, x, v0);
    extra += h2f(b + 2) * x.xs[v0 / 32];
  }
#endif
};

// Q8_0 {f16 d; i8 qs[32]}: v = d q; read as w = q + 128 with zero point 128.
struct Q8_0 {
  static constexpr QType kType = QType::kQ8_0;
  static constexpr bool kMin = false;   // a float minimum per 32 values
  static constexpr int kValues = 32, kBytes = 34, kOffset = 128;  // the SIMD path reads the signed bytes (sign trick)
  static void decode(const uint8_t* row, int64_t c, int ng, uint8_t* w, float* sc, float* mn) {
    for (int g = 0; g < ng && g < 2; ++g) {
      const uint8_t* b = row + (2 * c + g) * kBytes;
      for (int j = 0; j < 32; ++j) w[32 * g + j] = b[2 + j] ^ 0x80;
      sc[2 * g] = sc[2 * g + 1] = h2f(b);
      mn[g] = 0.f;
    }
  }
#if defined(D3K_SIMD_BLOCKS)
  static void group(const uint8_t* b, int64_t v0, const XRow& x, __m256& acc, float&) {
    add_block(acc, group_dot_signed(_mm256_loadu_si256((const __m256i*)(b + 2)), x, v0), b, x, v0);
  }
#endif
};

// ------------------------------------------------------------------ the K-quants: super-blocks of 256
// The 6-bit scale and minimum of sub-block j (0..7) of Q4_K / Q5_K (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
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
  static constexpr bool kMin = true;
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
  // one whole super-block (8 groups of 32); sb: its index in the row
  static void super(const uint8_t* row, int64_t sb, const XRow& x, __m256& acc0, __m256& acc1, __m256& mins) {
    const uint8_t* b = row + sb * kBytes;
    alignas(32) float s8[8], m8[8];
    const float d = h2f(b), dmin = h2f(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_min_k4(j, b + 4, &sc, &m);
      s8[j] = d * (float)sc;
      m8[j] = dmin * (float)m;
    }
    // the minima: - sum_j dmin m_j dx_j sum(xq of sub-block j)
    mins = _mm256_fnmadd_ps(_mm256_load_ps(m8), _mm256_loadu_ps(x.xs + 8 * sb), mins);
    const int64_t v = 256 * sb;
    const __m256i qh = kFive ? _mm256_loadu_si256((const __m256i*)(b + 16)) : _mm256_setzero_si256();
    const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    for (int cc = 0; cc < 4; ++cc) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + kQs + 32 * cc));
      __m256i w0 = _mm256_and_si256(q, m4), w1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
      if constexpr (kFive) {   // bit 2cc (2cc + 1) of each qh byte to bit 4
        const __m256i h = _mm256_srli_epi16(qh, 2 * cc);   // bit 2cc -> 0, 2cc + 1 -> 1
        w0 = _mm256_or_si256(w0, _mm256_and_si256(_mm256_slli_epi16(h, 4), b4));
        w1 = _mm256_or_si256(w1, _mm256_and_si256(_mm256_slli_epi16(h, 3), b4));
      }
      add_scaled(acc0, group_dot<0>(w0, x, v + 64 * cc), _mm256_broadcast_ss(s8 + 2 * cc), x, v + 64 * cc);
      add_scaled(acc1, group_dot<0>(w1, x, v + 64 * cc + 32), _mm256_broadcast_ss(s8 + 2 * cc + 1), x,
                 v + 64 * cc + 32);
    }
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
  static void super(const uint8_t* row, int64_t sb, const XRow& x, __m256& acc0, __m256& acc1, __m256&) {
    const uint8_t* b = row + sb * kBytes;
    const __m128i sc8 = _mm_loadu_si128((const __m128i*)(b + 192));
    const __m256 d = _mm256_set1_ps(h2f(b + 208));
    alignas(32) float s16[16];   // d * scales[k]
    _mm256_store_ps(s16, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8))));
    _mm256_store_ps(s16 + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)))));
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    const int64_t v = 256 * sb;
    for (int n = 0; n < 2; ++n) {
      const __m256i ql0 = _mm256_loadu_si256((const __m256i*)(b + 64 * n));        // values 0..31 (low), 64..95 (high)
      const __m256i ql1 = _mm256_loadu_si256((const __m256i*)(b + 64 * n + 32));   // values 32..63, 96..127
      const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * n));
      // value group i (32 values at 128 n + 32 i): bits 2i, 2i + 1 of qh to bits 4, 5
      const __m256i w[4] = {
          _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(move_bits<0, 4>(qh), m30)),
          _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(move_bits<2, 4>(qh), m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(move_bits<4, 4>(qh), m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_and_si256(move_bits<6, 4>(qh), m30))};
      for (int i = 0; i < 4; ++i) {
        const int64_t v0 = v + 128 * n + 32 * i;
        const float* sc = s16 + 8 * n + 2 * i;
        const __m256 scale = _mm256_set_m128(_mm_broadcast_ss(sc + 1), _mm_broadcast_ss(sc));
        add_scaled(i & 1 ? acc1 : acc0, group_dot<kOffset>(w[i], x, v0), scale, x, v0);
      }
    }
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
