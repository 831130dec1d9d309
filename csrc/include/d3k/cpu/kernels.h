// The CPU backend's inner loops, one table per instruction set (csrc/cpu/isa_*.cpp compile
// d3k/cpu/kernels_impl.h three times with different flags); csrc/cpu/ops.cpp picks one at run time.
#pragma once

#include <cstdint>
#include <cstring>

#include "d3k/cpu/ops.h"

namespace d3k::cpu {

// One activation row as the dot products read it: its float values, and for block-quantized weights the same
// values rounded to 16-bit integers per kBlock values (dx = amax / kQMax; d3k/cpu/formats.h lists each array's
// shape). kQMax = 32512 keeps a sum of 4 products with |w| <= 128 below 2^24, exact in float.
constexpr float kQMax = 32512.f;
struct XRow {
  const float* f = nullptr;
  const int16_t* q = nullptr;
  const float* dx = nullptr;
  const float* xs = nullptr;
};

struct IsaKernels {
  const char* name;
  // x [K] (K a multiple of kBlock) -> the rounded row's arrays (formats.h)
  void (*quantize)(const float* x, int64_t K, int16_t* q, float* dx, float* xs);
  // y[b * ldy + map(r)] = w[r, :] . xs[b] for rows r in [r0, r1), b < nx; w rows of K values of type t, ld bytes
  // apart. map(r) = r, or with perm_d > 0 (rows stored in llama.cpp's interleaved-RoPE order, heads of perm_d
  // rows) the row's Hugging Face index: within each head, row 2 i + j goes to j perm_d / 2 + i.
  void (*gemv)(QType t, const uint8_t* w, int64_t ld, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y,
               int64_t ldy, int64_t K, int64_t perm_d);
  // float types (f32 / f16 / bf16) only: v[:K] . x, and y[:K] += a * v.
  float (*dot)(QType t, const uint8_t* v, const float* x, int64_t K);
  void (*axpy)(QType t, float a, const uint8_t* v, float* y, int64_t K);
  // one row of any type as float32 values: y[:K] = w row (the embedding lookup)
  void (*decode_row)(QType t, const uint8_t* w, float* y, int64_t K);
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

// f16_to_f32 of every 16-bit pattern (csrc/cpu/ops.cpp fills it at load): one load per block scale
extern float kHalfTable[65536];

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
