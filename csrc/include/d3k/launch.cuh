// Host-side launch helpers shared by the launcher files (csrc/*.cu): device
// facts, the PDL launch wrapper, and the GEMV dispatch (dtype x batch bucket x
// rows-per-warp x vector width -> one kernel instantiation).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "d3k/common.cuh"
#include "d3k/gemv_kernel.cuh"

namespace d3k {

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct DeviceCaps {
  int sm_count = 0;
  int cc = 0;        // 10 * major + minor
  bool pdl = false;  // programmatic dependent launch is used on this device
};

// Cached per device (csrc/launch.cu). PDL is used when the device is sm_90+,
// the kernels' binary for it is sm_90+ (so they contain griddepcontrol.wait),
// and the environment variable D3K_PDL is not "0".
std::string device_caps(int device, DeviceCaps* out);

// Makes `device` current for the launches of one op, and restores the previous
// device afterwards.
class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  std::string enter(int device) {
    int cur = 0;
    D3K_CHECK_CUDA(cudaGetDevice(&cur));
    if (cur != device) {
      D3K_CHECK_CUDA(cudaSetDevice(device));
      prev_ = cur;
      restore_ = true;
    }
    return "";
  }
  // enter(device), then the device's cached capabilities: what every launcher needs first.
  std::string enter(int device, DeviceCaps* caps) {
    std::string e = enter(device);
    return e.empty() ? device_caps(device, caps) : e;
  }
  ~DeviceGuard() {
    if (restore_) (void)cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
  bool restore_ = false;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int bmax_for(int nb) { return nb <= 1 ? 1 : nb <= 2 ? 2 : nb <= 4 ? 4 : nb <= 8 ? 8 : 16; }
inline const char* dtype_name(int dtype) { return dtype == kFloat16 ? "float16" : "bfloat16"; }
inline int64_t dtype_size(int) { return 2; }

// cudaLaunchKernelEx with the PDL attribute when `pdl`. Should a launch with
// the attribute be refused (an unsupported stream or configuration), it is
// retried without it: the kernels are correct either way (device.cuh).
template <typename... KArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool pdl, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = pdl ? attr : nullptr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (e != cudaSuccess && pdl) {
    (void)cudaGetLastError();
    cfg.attrs = nullptr;
    cfg.numAttrs = 0;
    e = cudaLaunchKernelEx(&cfg, kernel, args...);
  }
  return e;
}

// Return an error string from the enclosing launcher if a launch failed.
#define D3K_LAUNCH_CHECK(what, expr)                                                               \
  do {                                                                                             \
    cudaError_t d3k_e_ = (expr);                                                                   \
    cudaError_t d3k_last_ = cudaGetLastError(); /* also clears a launch error */                   \
    if (d3k_e_ == cudaSuccess) d3k_e_ = d3k_last_;                                                 \
    if (d3k_e_ != cudaSuccess) return ::d3k::cuda_error_string(d3k_e_, what, __FILE__, __LINE__); \
  } while (0)

// ---------------------------------------------------------------- GEMV dispatch
// Rows per warp: the largest of 4, 2 (, 1) that still gives >= 2 blocks per SM.
inline int choose_rpw(int64_t n_slots, int sm_count, bool pairs) {
  for (int rpw : {4, 2}) {
    if (ceil_div(n_slots, kGemvWarps * rpw) >= 2 * static_cast<int64_t>(sm_count)) return rpw;
  }
  return pairs ? 2 : 1;
}

template <typename Op, typename T, int BMAX>
cudaError_t gemv_launch_bmax(const typename Op::Params& p, int rpw, bool vec8, int grid_y, cudaStream_t st,
                             bool pdl) {
  constexpr int R0 = Op::kPairs ? 2 : 1;
  const size_t smem = static_cast<size_t>(p.g.kc) * BMAX * sizeof(float);
  const dim3 block(kGemvThreads);
  auto grid = [&](int r) {
    return dim3(static_cast<unsigned>(ceil_div(p.g.n_slots, kGemvWarps * r)), static_cast<unsigned>(grid_y));
  };
  if (!vec8) return launch(gemv_kernel<Op, T, BMAX, R0, 1>, grid(R0), block, smem, st, pdl, p);
  if (rpw == 4) return launch(gemv_kernel<Op, T, BMAX, 4, 8>, grid(4), block, smem, st, pdl, p);
  if (rpw == 2) return launch(gemv_kernel<Op, T, BMAX, 2, 8>, grid(2), block, smem, st, pdl, p);
  return launch(gemv_kernel<Op, T, BMAX, R0, 8>, grid(R0), block, smem, st, pdl, p);
}

template <typename Op, typename T>
cudaError_t gemv_launch_t(const typename Op::Params& p, int bmax, int rpw, bool vec8, int grid_y, cudaStream_t st,
                          bool pdl) {
  switch (bmax) {
    case 1: return gemv_launch_bmax<Op, T, 1>(p, rpw, vec8, grid_y, st, pdl);
    case 2: return gemv_launch_bmax<Op, T, 2>(p, rpw, vec8, grid_y, st, pdl);
    case 4: return gemv_launch_bmax<Op, T, 4>(p, rpw, vec8, grid_y, st, pdl);
    case 8: return gemv_launch_bmax<Op, T, 8>(p, rpw, vec8, grid_y, st, pdl);
    default: return gemv_launch_bmax<Op, T, 16>(p, rpw, vec8, grid_y, st, pdl);
  }
}

// Fills p.g.kc and p.prefetch_bytes, picks the instantiation and launches.
// p.g.nb (1..16), p.g.K and p.g.n_slots must be set.
template <typename Op>
std::string gemv_run(const char* what, typename Op::Params p, int dtype, const DeviceCaps& caps, bool vec8,
                     int grid_y, cudaStream_t st) {
  const int bmax = bmax_for(p.g.nb);
  p.g.kc = static_cast<int>(std::min<int64_t>(round_up(p.g.K, 256), gemv_kc_max(bmax)));
  const int rpw = vec8 ? choose_rpw(p.g.n_slots, caps.sm_count, Op::kPairs) : (Op::kPairs ? 2 : 1);
  const int64_t row_bytes = static_cast<int64_t>(p.g.K) * 2;
  const int64_t cap = std::max<int64_t>(256, 32768 / (kGemvWarps * rpw));
  p.prefetch_bytes = static_cast<uint32_t>(std::min(row_bytes, cap) & ~int64_t{15});
  cudaError_t e = dtype == kBFloat16 ? gemv_launch_t<Op, __nv_bfloat16>(p, bmax, rpw, vec8, grid_y, st, caps.pdl)
                                     : gemv_launch_t<Op, __half>(p, bmax, rpw, vec8, grid_y, st, caps.pdl);
  D3K_LAUNCH_CHECK(what, e);
  return "";
}

}  // namespace d3k
