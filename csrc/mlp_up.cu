// k4 of mlp_block: RMSNorm + gate/up GEMV + SiLU * up (d3k/mlp.cuh).
#include "d3k/internal.cuh"

namespace d3k {

std::string run_mlp_up(const MlpUpParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st) {
  return gemv_run<MlpUpOp>("mlp_block: launch of mlp_up (k4)", p, dtype, caps, vec8, 1, st);
}

}  // namespace d3k
