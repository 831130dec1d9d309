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

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
#endif

// ------------------------------------------------------------------ activation rounding
void quantize(const float* x, int64_t K, int8_t* hi, int8_t* lo, float* dx, int32_t* nz, float* xs) {
  for (int64_t g = 0; g < K / kBlock; ++g) {
    const float* xb = x + g * kBlock;
    float amax = 0.f;
    for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float d = amax / kQMax, id = d > 0.f ? 1.f / d : 0.f;
    int32_t total = 0;
    for (int j = 0; j < kBlock; j += 4) {
      int32_t s = 0;
      for (int k = j; k < j + 4; ++k) {
        const int q = (int)std::nearbyint(xb[k] * id);   // round half to even; |q| <= 32512
        const int l = ((q + 127) % 255 + 255) % 255 - 127, h = (q - l) / 255;   // q = 255 h + l, both in [-127, 127]
        hi[g * kBlock + k] = (int8_t)h;
        lo[g * kBlock + k] = (int8_t)l;
        s += q;
      }
      nz[(g * kBlock + j) / 4] = -8 * s;
      total += s;
    }
    dx[g] = d;
    xs[g] = d * (float)total;
  }
}

// ------------------------------------------------------------------ block rows
// Any block format, through its portable decode (formats.h): the scalar and AVX2 paths, and the AVX-512
// path's half chunk at the end of a row of 32-value blocks.
template <class F>
float dot_chunks_portable(const uint8_t* row, const XRow& x, int64_t c0, int64_t K) {
  float acc = 0.f;
  alignas(64) uint8_t w[64];
  float sc[4], mn[2];
  for (int64_t c = c0; c * 64 < K; ++c) {
    const int ng = (int)std::min<int64_t>(2, (K - c * 64) / kBlock);
    F::decode(row, c, ng, w, sc, mn);
    for (int g = 0; g < ng; ++g) {
      const int64_t v = c * 64 + 32 * g;
      float part = 0.f;
      for (int h = 0; h < 2; ++h) {
        int32_t s = 0;
        for (int k = 16 * h; k < 16 * h + 16; ++k) s += (int32_t)w[32 * g + k] * (255 * x.hi[v + k] + x.lo[v + k]);
        const int32_t* nz = x.nz + (v + 16 * h) / 4;   // -8 sum(q) per 4 values
        s += F::kOffset / 8 * (nz[0] + nz[1] + nz[2] + nz[3]);
        part += sc[2 * g + h] * (float)s;
      }
      acc += part * x.dx[2 * c + g] + mn[g] * x.xs[2 * c + g];
    }
  }
  return acc;
}

template <class F>
float dot_row(const uint8_t* row, const XRow& x, int64_t K) {
#if defined(D3K_SIMD_BLOCKS)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  if constexpr (F::kValues == 256) {
    __m256 mins = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; ++sb) F::super(row, sb, x, a0, a1, mins);
    return fmt::hsum8(_mm256_add_ps(a0, a1)) + fmt::hsum8(mins);
  } else {
    float e0 = 0.f, e1 = 0.f;   // two chains, so the minima's scalar adds do not serialize the loop
    const int64_t nb = K / 32;
    int64_t g = 0;
    for (; g + 1 < nb; g += 2) {
      F::group(row + g * F::kBytes, 32 * g, x, a0, e0);
      F::group(row + (g + 1) * F::kBytes, 32 * g + 32, x, a1, e1);
    }
    if (g < nb) F::group(row + g * F::kBytes, 32 * g, x, a0, e0);
    return fmt::hsum8(_mm256_add_ps(a0, a1)) + e0 + e1;
  }
#else
  return dot_chunks_portable<F>(row, x, 0, K);
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

// ------------------------------------------------------------------ many activation rows (prefill, batches)
// With several activation rows, a weight row is decoded once (the format's portable decode) into signed int8
// values w - zero point, a scale per 16 values and a minimum per 32, and then multiplied with every activation
// row: the decode is paid once per weight row and call instead of once per activation row.
constexpr int kUnpackRows = 4;   // from this many activation rows on

template <class F>
void unpack_row(const uint8_t* row, int64_t K, int8_t* q, float* sc, float* mn) {
  alignas(64) uint8_t w[64];
  float s4[4], m2[2];
  for (int64_t c = 0; c * 64 < K; ++c) {
    const int ng = (int)std::min<int64_t>(2, (K - c * 64) / kBlock);
    F::decode(row, c, ng, w, s4, m2);
    for (int k = 0; k < 32 * ng; ++k) q[c * 64 + k] = (int8_t)((int)w[k] - F::kOffset);
    for (int i = 0; i < 2 * ng; ++i) sc[c * 4 + i] = s4[i];
    for (int g = 0; g < ng; ++g) mn[c * 2 + g] = m2[g];
  }
}

// an unpacked weight row . one rounded activation row
inline float dot_unpacked(const int8_t* q, const float* sc, const float* mn, bool mins, const XRow& x, int64_t K) {
  float extra = 0.f;
  const int64_t ng = K / kBlock;
#if defined(D3K_SIMD_BLOCKS)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i k255 = _mm256_set1_epi16(255);
  for (int64_t g = 0; g < ng; ++g) {
    const __m256i w = _mm256_loadu_si256((const __m256i*)(q + 32 * g)), a = _mm256_sign_epi8(w, w);
    const __m256i xh = _mm256_loadu_si256((const __m256i*)(x.hi + 32 * g));
    const __m256i xl = _mm256_loadu_si256((const __m256i*)(x.lo + 32 * g));
    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(xh, w)), k255),
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(xl, w)), ones));
    const __m256 s = _mm256_mul_ps(_mm256_set_m128(_mm_broadcast_ss(sc + 2 * g + 1), _mm_broadcast_ss(sc + 2 * g)),
                                   _mm256_broadcast_ss(x.dx + g));
    if (g & 1) a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, a1);
    else a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, a0);
    if (mins) extra += mn[g] * x.xs[g];
  }
  return fmt::hsum8(_mm256_add_ps(a0, a1)) + extra;
#else
  float acc = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    float part = 0.f;
    for (int h = 0; h < 2; ++h) {
      int32_t s = 0;
      for (int k = 32 * g + 16 * h; k < 32 * g + 16 * h + 16; ++k) s += (int32_t)q[k] * (255 * x.hi[k] + x.lo[k]);
      part += sc[2 * g + h] * (float)s;
    }
    acc += part * x.dx[g];
    if (mins) extra += mn[g] * x.xs[g];
  }
  return acc + extra;
#endif
}

// the row's output index: its own, or un-permuted from llama.cpp's interleaved-RoPE order (kernels.h)
inline int64_t out_row(int64_t r, int64_t perm_d) {
  if (!perm_d) return r;
  const int64_t head = r / perm_d, i = r % perm_d;
  return head * perm_d + (i & 1) * (perm_d / 2) + (i >> 1);
}

template <QType T>
float dot_any(const uint8_t* row, const XRow& x, int64_t K) {
  if constexpr (T == QType::kF32 || T == QType::kF16 || T == QType::kBF16) return dot_float<T>(row, x.f, K);
  else return dot_row<fmt::Of<T>>(row, x, K);
}

template <class F>
void gemm_rows(const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y, int64_t ldy,
               int64_t K, int64_t perm_d) {
  thread_local std::vector<char> buf;   // grown once per thread to the largest K, then reused
  const std::size_t need = K + (K / 16 + K / 32) * sizeof(float) + 128;
  if (buf.size() < need) buf.resize(need);
  int8_t* q = reinterpret_cast<int8_t*>(buf.data());
  float* sc = reinterpret_cast<float*>(buf.data() + ((K + 63) & ~int64_t(63)));
  float* mn = sc + K / 16;
  const bool mins = F::kType == QType::kQ4_1 || F::kType == QType::kQ5_1 || F::kType == QType::kQ4_K ||
                    F::kType == QType::kQ5_K;
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row<F>(w + r * ld, K, q, sc, mn);
    const int64_t o = out_row(r, perm_d);
    for (int b = 0; b < nx; ++b) y[b * ldy + o] = dot_unpacked(q, sc, mn, mins, xs[b], K);
  }
}

template <QType T>
void gemv_t(const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y, int64_t ldy,
            int64_t K, int64_t perm_d) {
  if constexpr (T != QType::kF32 && T != QType::kF16 && T != QType::kBF16) {
    if (nx >= kUnpackRows) {
      return gemm_rows<fmt::Of<T>>(w, ld, r0, r1, xs, nx, y, ldy, K, perm_d);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * ld;
    const int64_t o = out_row(r, perm_d);
    for (int b = 0; b < nx; ++b) y[b * ldy + o] = dot_any<T>(row, xs[b], K);
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
