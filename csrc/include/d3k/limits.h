// What the CUDA kernels can take, in one place. The launchers check these, build_info() exports them
// ("limits"), and d3kernels.backends and CudaKernels read them from there, so Python restates none.
// Plain C++ (no CUDA types): bindings.cpp includes it too.
#pragma once

#include <string>

namespace d3k {

constexpr int kHeadDims[] = {64, 128};              // head_dim: the attention and K/V tiles are built for these
constexpr const char* kDtypes[] = {"float16", "bfloat16"};   // dtype codes 0 and 1
constexpr int kPageSizeMultiple = 16;               // paged attention reads whole 16-position tiles
constexpr int kMaxPageSize = 1 << 20;

inline bool head_dim_supported(long long D) {
  for (int d : kHeadDims)
    if (D == d) return true;
  return false;
}

// "(64, 128)", for error messages.
inline std::string head_dims_text() {
  std::string s = "(";
  for (int d : kHeadDims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + ")";
}

}  // namespace d3k
