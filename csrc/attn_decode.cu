// k2 of attn_block: split-K decode attention with last-block combine (d3k/attn.cuh).
#include "d3k/internal.cuh"

namespace d3k {

namespace {

template <typename T, int D, bool kPaged>
cudaError_t launch_decode(const AttnParams& p, int gmax, dim3 grid, cudaStream_t st, bool pdl) {
  const dim3 block(kAttnThreads);
  switch (gmax) {
    case 1: return launch(attn_decode_kernel<T, D, 1, kPaged>, grid, block, 0, st, pdl, p);
    case 2: return launch(attn_decode_kernel<T, D, 2, kPaged>, grid, block, 0, st, pdl, p);
    case 4: return launch(attn_decode_kernel<T, D, 4, kPaged>, grid, block, 0, st, pdl, p);
    default: return launch(attn_decode_kernel<T, D, 8, kPaged>, grid, block, 0, st, pdl, p);
  }
}

template <typename T, bool kPaged>
cudaError_t launch_decode_d(const AttnParams& p, int D, int gmax, dim3 grid, cudaStream_t st, bool pdl) {
  return D == 64 ? launch_decode<T, 64, kPaged>(p, gmax, grid, st, pdl)
                 : launch_decode<T, 128, kPaged>(p, gmax, grid, st, pdl);
}

// Paged caches (p.block_table != nullptr) run the kPaged instantiation of the same kernel.
template <typename T>
cudaError_t launch_decode_t(const AttnParams& p, int D, int gmax, dim3 grid, cudaStream_t st, bool pdl) {
  return p.block_table != nullptr ? launch_decode_d<T, true>(p, D, gmax, grid, st, pdl)
                                  : launch_decode_d<T, false>(p, D, gmax, grid, st, pdl);
}

}  // namespace

std::string run_attn_decode(const AttnParams& p, int dtype, int D, int gmax, int nb, const DeviceCaps& caps,
                            cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(p.NS), static_cast<unsigned>(p.Hkv * p.NG), static_cast<unsigned>(nb));
  cudaError_t e = dtype == kBFloat16 ? launch_decode_t<__nv_bfloat16>(p, D, gmax, grid, st, caps.pdl)
                                     : launch_decode_t<__half>(p, D, gmax, grid, st, caps.pdl);
  D3K_LAUNCH_CHECK("attn_block: launch of attn_decode (k2)", e);
  return "";
}

}  // namespace d3k
