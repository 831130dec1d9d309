// write_kv mode "project": K/V rows of every flagged layer from rmsnorm(src_h) (d3k/kv.cuh).
#include "d3k/internal.cuh"

namespace d3k {

std::string run_kv_project(const KvProjectParams& p, int dtype, const DeviceCaps& caps, bool vec8, int L,
                           cudaStream_t st) {
  return gemv_run<KvProjectOp>("write_kv: launch of kv_project", p, dtype, caps, vec8, L, st);
}

}  // namespace d3k
