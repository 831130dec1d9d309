// mlp_block launcher: per group of <= 16 rows, k4 mlp_up (RMSNorm + gate/up +
// SiLU * up -> fp32 act) then k5 mlp_down (out = h + w_down @ act), chained
// with PDL. Semantics: reference mlp_block.
#include <climits>

#include "d3k/internal.cuh"
#include "d3k/ops.h"

namespace d3k {

std::string mlp_block(const MlpBlockArgs& a) {
  const std::string op = "d3k.mlp_block: ";
  D3K_RETURN_IF_ERROR(check_preamble(op, a.dtype, a.B, a.d));
  D3K_CHECK(a.F >= 1 && a.F <= INT_MAX / 4, op + "MLP width F=" + std::to_string(a.F) + " out of range");
  D3K_CHECK(a.out && a.h && a.mlp_norm && a.w_gate_up && a.w_down && a.row_active && a.act_ws,
            op + "null pointer argument");
  D3K_CHECK(aligned16(reinterpret_cast<void*>(a.act_ws)), op + "the act workspace must be 16-byte aligned");

  DeviceGuard guard;
  DeviceCaps caps;
  std::string e = guard.enter(a.device, &caps);
  if (!e.empty()) return e;

  const int64_t es = dtype_size(a.dtype);
  const int B = static_cast<int>(a.B), d = static_cast<int>(a.d), F = static_cast<int>(a.F);
  const bool vec8_up = d % 8 == 0 && aligned16(reinterpret_cast<void*>(a.h)) &&
                       aligned16(reinterpret_cast<void*>(a.mlp_norm)) &&
                       aligned16(reinterpret_cast<void*>(a.w_gate_up));
  const bool vec8_down = F % 8 == 0 && aligned16(reinterpret_cast<void*>(a.w_down));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);
  char* h = reinterpret_cast<char*>(a.h);
  char* out = reinterpret_cast<char*>(a.out);
  float* act = reinterpret_cast<float*>(a.act_ws);
  const uint8_t* active = reinterpret_cast<const uint8_t*>(a.row_active);

  for (int b0 = 0; b0 < B; b0 += kMaxRows) {
    const int nb = std::min(kMaxRows, B - b0);
    MlpUpParams k4 = {};
    k4.g.nb = nb;
    k4.g.K = d;
    k4.g.n_slots = 2 * F;
    k4.eps = static_cast<float>(a.eps);
    k4.h = h + static_cast<int64_t>(b0) * d * es;
    k4.ldh = d;
    k4.norm = reinterpret_cast<const void*>(a.mlp_norm);
    k4.w = reinterpret_cast<const void*>(a.w_gate_up);
    k4.act = act + static_cast<int64_t>(b0) * F;
    k4.F = F;
    e = run_mlp_up(k4, a.dtype, caps, vec8_up, st);
    if (!e.empty()) return e;

    MlpDownParams k5 = {};
    k5.g.nb = nb;
    k5.g.K = F;
    k5.g.n_slots = d;
    k5.w = reinterpret_cast<const void*>(a.w_down);
    k5.act = k4.act;
    k5.h = k4.h;
    k5.ldh = d;
    k5.out = out + static_cast<int64_t>(b0) * d * es;
    k5.ld_out = d;
    k5.active = active + b0;
    e = run_mlp_down(k5, a.dtype, caps, vec8_down, st);
    if (!e.empty()) return e;
  }
  return "";
}

}  // namespace d3k
