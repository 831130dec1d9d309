// The CPU backend's inner loops, one table per instruction set (csrc/cpu/isa_*.cpp compile
// d3k/cpu/kernels_impl.h three times with different flags); csrc/cpu/ops.cpp picks one at run time.
#pragma once

#include <cstdint>
#include <cstring>

#include "d3k/cpu/ops.h"

namespace d3k::cpu {

// One activation row as the dot products read it: float values, and for quantized weights the same values
// rounded to 16-bit integer blocks of kBlock (q, per-block scale d, the rounded block's sum s = d * qsum,
// qsum = sum of q). 16 bits, not llama.cpp's 8: the rounding error (amax / 65534 per value) stays far below
// the weights' own, at the same instruction count (one 32-pair multiply-add per block with AVX-512).
constexpr float kQMax = 32767.f;
struct XRow {
  const float* f = nullptr;
  const int16_t* q = nullptr;
  const float* d = nullptr;
  const float* s = nullptr;
  const int32_t* qsum = nullptr;
};

struct IsaKernels {
  const char* name;
  // x [K] (K a multiple of kBlock) -> q [K], d, s, qsum [K / kBlock]: d = amax / kQMax, q = round(x / d),
  // qsum = sum of q, s = d * qsum.
  void (*quantize)(const float* x, int64_t K, int16_t* q, float* d, float* s, int32_t* qsum);
  // y[b * ldy + r] = w[r, :] . xs[b] for r in [r0, r1), b < nx; w rows of K values of type t, ld bytes apart.
  void (*gemv)(QType t, const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y,
               int64_t ldy, int64_t K);
  // float types (f32 / f16 / bf16) only: v[:K] . x, and y[:K] += a * v.
  float (*dot)(QType t, const uint8_t* v, const float* x, int64_t K);
  void (*axpy)(QType t, float a, const uint8_t* v, float* y, int64_t K);
};

extern const IsaKernels kScalar;
extern const IsaKernels kAvx2;
extern const IsaKernels kAvx512;

// float16 / bfloat16 <-> float32 without special instructions (every ISA table agrees on them).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN (torch's rounding)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);                     // NaN
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                    // overflow (>= 65520) -> inf
  if (ax < 0x38800000u) {                                                      // subnormal or zero
    float a;
    std::memcpy(&a, &ax, 4);
    // a * 2^24 rounded to an integer (nearest even) is the subnormal's mantissa
    float m = a * 16777216.0f;
    uint32_t r = (uint32_t)__builtin_nearbyintf(m);
    return (uint16_t)(sign | r);
  }
  uint32_t mant = ax & 0x7fffffu, exp = (ax >> 23) - 127 + 15;
  uint32_t h = exp << 10 | mant >> 13, rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;                       // carries into exp correctly
  return (uint16_t)(sign | h);
}

}  // namespace d3k::cpu
