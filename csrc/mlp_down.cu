// k5 of mlp_block: out = h + w_down @ act (d3k/mlp.cuh).
#include "d3k/internal.cuh"

namespace d3k {

std::string run_mlp_down(const MlpDownParams& p, int dtype, const DeviceCaps& caps, bool vec8, cudaStream_t st) {
  return gemv_run<MlpDownOp>("mlp_block: launch of mlp_down (k5)", p, dtype, caps, vec8, 1, st);
}

}  // namespace d3k
