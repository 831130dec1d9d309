// k1 of attn_block: RMSNorm + QKV GEMV (+ bias) + RoPE + KV write (d3k/attn.cuh).
#include "d3k/internal.cuh"

namespace d3k {

std::string run_attn_pre(const AttnPreParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st) {
  return gemv_run<AttnPreOp>("attn_block: launch of attn_pre (k1)", p, dtype, caps, vec8, 1, st);
}

}  // namespace d3k
