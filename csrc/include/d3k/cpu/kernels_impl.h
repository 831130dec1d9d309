// The inner loops of the CPU backend, written once and compiled per instruction set: csrc/cpu/isa_*.cpp
// define D3K_ISA_TABLE and D3K_ISA_NS and include this file under their flags (-mavx512f ... / -mavx2 ...
// / none), so the intrinsics paths below are chosen by the compiler's feature macros.
#include <immintrin.h>

#include <cmath>

#include "d3k/cpu/kernels.h"

namespace d3k::cpu {
namespace D3K_ISA_NS {
namespace {

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// ------------------------------------------------------------------ activation rounding
void quantize(const float* x, int64_t K, int16_t* q, float* d, float* s, int32_t* qsum) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float db = amax / kQMax, id = db > 0.f ? 1.f / db : 0.f;
    int32_t qs = 0;
    for (int j = 0; j < kBlock; ++j) {
      const int v = (int)std::nearbyint(xb[j] * id);   // round half to even, as the vector conversion does
      q[b * kBlock + j] = (int16_t)v;
      qs += v;
    }
    d[b] = db;
    s[b] = db * (float)qs;   // the rounded block's sum: Q4_1's minimum then multiplies the values it dots
    qsum[b] = qs;
  }
}

// ------------------------------------------------------------------ block dot products
#if defined(__AVX2__)
inline __m256i nibbles(const uint8_t* qs) {  // 32 bytes: the low nibbles of qs[0:16], then the high ones
  const __m128i raw = _mm_loadu_si128((const __m128i*)qs);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
using VecI = __m512;
// the 32 weights of a block as int16 times the block's 32 int16 activations: 16 int32 lanes of pair sums
template <QType T>
inline __m512 block_dot(const uint8_t* blk, const int16_t* xq) {
  __m512i w;
  if constexpr (T == QType::kQ8_0) w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(blk + 2)));
  else w = _mm512_cvtepu8_epi16(nibbles(blk + (T == QType::kQ4_1 ? 4 : 2)));
  return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512(xq)));
}
inline __m512 vfma(__m512 a, float b, __m512 c) { return _mm512_fmadd_ps(a, _mm512_set1_ps(b), c); }
inline float vsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline __m512 vzero() { return _mm512_setzero_ps(); }
#elif defined(__AVX2__)
using VecI = __m256;
template <QType T>
inline __m256 block_dot(const uint8_t* blk, const int16_t* xq) {
  __m256i lo, hi;
  if constexpr (T == QType::kQ8_0) {
    const __m256i w8 = _mm256_loadu_si256((const __m256i*)(blk + 2));
    lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w8));
    hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w8, 1));
  } else {
    const __m256i n = nibbles(blk + (T == QType::kQ4_1 ? 4 : 2));
    lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(n));
    hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(n, 1));
  }
  const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i*)xq)),
                                     _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + 16))));
  return _mm256_cvtepi32_ps(p);
}
inline __m256 vfma(__m256 a, float b, __m256 c) { return _mm256_fmadd_ps(a, _mm256_set1_ps(b), c); }
inline float vsum(__m256 v) { return hsum(v); }
inline __m256 vzero() { return _mm256_setzero_ps(); }
#endif

// w: one row of nb blocks; the block types' dot products with one rounded activation row
template <QType T>
float dot_blocks(const uint8_t* w, const XRow& x, int64_t nb) {
  constexpr int kBytes = T == QType::kQ4_0 ? 18 : T == QType::kQ4_1 ? 20 : 34;
  float extra = 0.f;  // Q4_0's -8 offset, Q4_1's minimum
#if defined(__AVX2__)
  VecI acc0 = vzero(), acc1 = vzero();
  auto one = [&](int64_t i, VecI& acc) {
    const uint8_t* blk = w + i * kBytes;
    const float scale = half(blk) * x.d[i];
    acc = vfma(block_dot<T>(blk, x.q + i * kBlock), scale, acc);
    if constexpr (T == QType::kQ4_0) extra -= 8.f * scale * (float)x.qsum[i];
    if constexpr (T == QType::kQ4_1) extra += half(blk + 2) * x.s[i];
  };
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    one(b, acc0);
    one(b + 1, acc1);
  }
  if (b < nb) one(b, acc0);
  return vsum(acc0) + vsum(acc1) + extra;
#else
  float acc = 0.f;
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* blk = w + i * kBytes;
    const int16_t* xq = x.q + i * kBlock;
    const float scale = half(blk) * x.d[i];
    int32_t sum = 0;
    if constexpr (T == QType::kQ8_0) {
      const int8_t* wq = (const int8_t*)(blk + 2);
      for (int j = 0; j < kBlock; ++j) sum += (int32_t)wq[j] * xq[j];
    } else {
      const uint8_t* qs = blk + (T == QType::kQ4_1 ? 4 : 2);
      for (int j = 0; j < 16; ++j) sum += (int32_t)(qs[j] & 0xF) * xq[j] + (int32_t)(qs[j] >> 4) * xq[j + 16];
    }
    acc += scale * (float)sum;
    if constexpr (T == QType::kQ4_0) extra -= 8.f * scale * (float)x.qsum[i];
    if constexpr (T == QType::kQ4_1) extra += half(blk + 2) * x.s[i];
  }
  return acc + extra;
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
inline float hsumv(VecF v) { return hsum(v); }
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

template <QType T>
void gemv_t(const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y, int64_t ldy,
            int64_t K) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * ld;
    for (int b = 0; b < nx; ++b) {
      if constexpr (T == QType::kF32 || T == QType::kF16 || T == QType::kBF16) {
        y[b * ldy + r] = dot_float<T>(row, xs[b].f, K);
      } else {
        y[b * ldy + r] = dot_blocks<T>(row, xs[b], K / kBlock);
      }
    }
  }
}

void gemv(QType t, const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y,
          int64_t ldy, int64_t K) {
  switch (t) {
    case QType::kF32: return gemv_t<QType::kF32>(w, ld, r0, r1, xs, nx, y, ldy, K);
    case QType::kF16: return gemv_t<QType::kF16>(w, ld, r0, r1, xs, nx, y, ldy, K);
    case QType::kBF16: return gemv_t<QType::kBF16>(w, ld, r0, r1, xs, nx, y, ldy, K);
    case QType::kQ4_0: return gemv_t<QType::kQ4_0>(w, ld, r0, r1, xs, nx, y, ldy, K);
    case QType::kQ4_1: return gemv_t<QType::kQ4_1>(w, ld, r0, r1, xs, nx, y, ldy, K);
    case QType::kQ8_0: return gemv_t<QType::kQ8_0>(w, ld, r0, r1, xs, nx, y, ldy, K);
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
                                  D3K_ISA_NS::axpy};

}  // namespace d3k::cpu
