// lm_head launcher and kernel instantiations: logits (fp32) = w_lm @ rmsnorm(h),
// one GEMV launch per group of <= 16 rows. Semantics: reference lm_head.
#include <climits>

#include "d3k/internal.cuh"
#include "d3k/ops.h"

namespace d3k {

std::string run_lm_head(const LmHeadParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st) {
  return gemv_run<LmHeadOp>("lm_head: launch", p, dtype, caps, vec8, 1, st);
}

std::string lm_head(const LmHeadArgs& a) {
  const std::string op = "d3k.lm_head: ";
  D3K_RETURN_IF_ERROR(check_preamble(op, a.dtype, a.B, a.d));
  D3K_CHECK(a.V >= 1 && a.V <= INT_MAX / 2, op + "vocab size V=" + std::to_string(a.V) + " out of range");
  D3K_CHECK(a.logits && a.h && a.final_norm && a.w_lm, op + "null pointer argument");

  DeviceGuard guard;
  DeviceCaps caps;
  std::string e = guard.enter(a.device, &caps);
  if (!e.empty()) return e;

  const int64_t es = dtype_size(a.dtype);
  const int B = static_cast<int>(a.B), d = static_cast<int>(a.d), V = static_cast<int>(a.V);
  const bool vec8 = d % 8 == 0 && aligned16(reinterpret_cast<void*>(a.h)) &&
                    aligned16(reinterpret_cast<void*>(a.final_norm)) && aligned16(reinterpret_cast<void*>(a.w_lm));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);
  for (int b0 = 0; b0 < B; b0 += kMaxRows) {
    LmHeadParams p = {};
    p.g.nb = std::min(kMaxRows, B - b0);
    p.g.K = d;
    p.g.n_slots = V;
    p.eps = static_cast<float>(a.eps);
    p.h = reinterpret_cast<const char*>(a.h) + static_cast<int64_t>(b0) * d * es;
    p.ldh = d;
    p.norm = reinterpret_cast<const void*>(a.final_norm);
    p.w = reinterpret_cast<const void*>(a.w_lm);
    p.logits = reinterpret_cast<float*>(a.logits) + static_cast<int64_t>(b0) * V;
    p.ld_logits = V;
    e = run_lm_head(p, a.dtype, caps, vec8, st);
    if (!e.empty()) return e;
  }
  return "";
}

}  // namespace d3k
