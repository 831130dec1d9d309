// Kernel-family launch functions, one per csrc/*.cu file so the many template
// instantiations compile in parallel. Called by the op launchers (attn_block.cu,
// mlp_block.cu, ...), which validate arguments first. Each returns "" or an error.
#pragma once

#include <climits>
#include <string>

#include "d3k/attn.cuh"
#include "d3k/head.cuh"
#include "d3k/kv.cuh"
#include "d3k/launch.cuh"
#include "d3k/mlp.cuh"

namespace d3k {

// The preamble every op launcher shares: the dtype code, the rows B and the hidden size d. Returns "" or
// the message, prefixed with op ("d3k.<op>: ").
inline std::string check_preamble(const std::string& op, int dtype, int64_t B, int64_t d) {
  if (dtype != kFloat16 && dtype != kBFloat16)
    return op + "dtype code " + std::to_string(dtype) + " is not supported (float16, bfloat16)";
  if (B < 1 || B > INT_MAX / 2) return op + "B must be >= 1, got " + std::to_string(B);
  if (d < 1 || d > INT_MAX / 2) return op + "hidden size d=" + std::to_string(d) + " out of range";
  return "";
}

// Return the error string of a check from the enclosing launcher, if there is one.
#define D3K_RETURN_IF_ERROR(expr)           \
  do {                                      \
    std::string d3k_e_ = (expr);            \
    if (!d3k_e_.empty()) return d3k_e_;     \
  } while (0)

// The attention split plan, shared by attn_workspace() and attn_block().
struct AttnPlan {
  int G = 0;          // query heads per kv head
  int NG = 0;         // head groups per kv head
  int GPB = 0;        // query heads per block
  int GMAX = 0;       // GPB rounded up to 1, 2, 4 or 8
  int NS = 0;         // splits
  int split_len = 0;  // positions per split
};
std::string attn_plan(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, const DeviceCaps& caps,
                      AttnPlan* out);

std::string run_attn_pre(const AttnPreParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st);
std::string run_attn_decode(const AttnParams& p, int dtype, int D, int gmax, int nb, const DeviceCaps& caps,
                            cudaStream_t st);
std::string run_o_proj(const OProjParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st);
std::string run_mlp_up(const MlpUpParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st);
std::string run_mlp_down(const MlpDownParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st);
std::string run_lm_head(const LmHeadParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st);
std::string run_kv_project(const KvProjectParams& p, int dtype, const DeviceCaps& caps, bool vec8, int L,
                           cudaStream_t st);

}  // namespace d3k
