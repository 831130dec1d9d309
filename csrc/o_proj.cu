// k3 of attn_block: out = h + wo @ o (d3k/attn.cuh).
#include "d3k/internal.cuh"

namespace d3k {

std::string run_o_proj(const OProjParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st) {
  return gemv_run<OProjOp>("attn_block: launch of o_proj (k3)", p, dtype, caps, vec8, 1, st);
}

}  // namespace d3k
