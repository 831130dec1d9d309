// write_kv launcher: the depth-masked KV writer for many layers at once.
// mode 0 "mask" and 2 "copy" are one small kernel each; mode 1 "project" is one
// GEMV launch (grid.y = layers; layers without flags exit) per group of <= 16
// rows. Semantics: reference write_kv.
#include <climits>

#include "d3k/internal.cuh"
#include "d3k/limits.h"
#include "d3k/ops.h"

namespace d3k {

namespace {

template <typename T>
cudaError_t launch_copy(const KvLayout& kv, cudaStream_t st, bool pdl) {
  return launch(kv_copy_kernel<T>, dim3(static_cast<unsigned>(kv.nb), static_cast<unsigned>(kv.L)),
                dim3(kKvCopyThreads), 0, st, pdl, kv);
}

}  // namespace

std::string write_kv(const WriteKvArgs& a) {
  const bool paged = a.layout == CacheLayout::kPaged;
  const std::string op = paged ? "d3k.write_kv_paged: " : "d3k.write_kv: ";
  if (paged) {
    D3K_CHECK(a.page_size >= 1 && a.num_pages >= 1 && a.max_pages >= 1 && a.page_size <= INT_MAX / 2 &&
                  a.max_pages <= (INT_MAX / 2) / a.page_size && a.num_pages <= (INT64_MAX / 4) / a.page_size,
              op + "num_pages, page_size and max_pages must be >= 1 and max_pages * page_size < 2^30");
    D3K_CHECK(a.S == a.max_pages * a.page_size, op + "S must be max_pages * page_size");
    D3K_CHECK(a.slot_mapping != 0, op + "null pointer argument");
    D3K_CHECK(a.rope_len >= 1 && a.rope_ld >= a.D / 2,
              op + "rope tables must be [rope_len >= 1, D/2] with row stride >= D/2");
  }
  D3K_RETURN_IF_ERROR(check_preamble(op, a.dtype, a.B, a.d));
  D3K_CHECK(a.mode >= 0 && a.mode <= 2, op + "mode code " + std::to_string(a.mode) + " is not 0 (mask), 1 (project) or 2 (copy)");
  D3K_CHECK(a.L >= 1 && a.L <= 65535, op + "L=" + std::to_string(a.L) + " out of range [1, 65535]");
  D3K_CHECK(a.Hkv >= 1 && a.H >= 0, op + "need H_kv >= 1 and H >= 0");
  D3K_CHECK(head_dim_supported(a.D), op + "head_dim " + std::to_string(a.D) + " is not supported by the CUDA kernels " + head_dims_text());
  D3K_CHECK(a.S >= 1 && a.S <= INT_MAX / 2, op + "cache length S out of range");
  D3K_CHECK(a.k_cache && a.v_cache && a.kv_valid && a.pos && a.flags, op + "null pointer argument");
  D3K_CHECK(aligned16(reinterpret_cast<void*>(a.k_cache)) && aligned16(reinterpret_cast<void*>(a.v_cache)),
            op + "k_cache and v_cache must be 16-byte aligned");
  if (a.mode == 1) {
    D3K_CHECK(a.d >= 1 && a.d <= INT_MAX / 2, op + "hidden size d=" + std::to_string(a.d) + " out of range");
    D3K_CHECK((a.H + 2 * a.Hkv) * a.D <= INT_MAX / 2, op + "(H + 2 H_kv) * D is too large");
    D3K_CHECK(a.src_h && a.norms && a.wqkv && a.rope_cos && a.rope_sin, op + "null pointer argument");
    D3K_CHECK(a.rope_len >= 1 && a.rope_ld >= a.D / 2,
              op + "rope tables must be [rope_len >= 1, D/2] with row stride >= D/2");
  }

  DeviceGuard guard;
  DeviceCaps caps;
  std::string e = guard.enter(a.device, &caps);
  if (!e.empty()) return e;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);

  const int64_t es = dtype_size(a.dtype);
  KvLayout kv = {};
  kv.k_cache = reinterpret_cast<void*>(a.k_cache);
  kv.v_cache = reinterpret_cast<void*>(a.v_cache);
  const int64_t num_slots = paged ? a.num_pages * a.page_size : 0;
  kv.cache_layer_stride = (paged ? num_slots : a.B * a.S) * a.Hkv * a.D;
  kv.kv_valid = reinterpret_cast<uint8_t*>(a.kv_valid);
  kv.valid_layer_stride = paged ? num_slots : a.B * a.S;
  kv.slot = paged ? reinterpret_cast<const int64_t*>(a.slot_mapping) : nullptr;
  kv.num_slots = num_slots;
  // contiguous mask / copy: pos in [0, S); paged: also within the RoPE tables, as the reference checks
  kv.pos_limit = static_cast<int>(paged ? std::min<int64_t>(a.S, a.rope_len) : a.S);
  kv.flags = reinterpret_cast<const uint8_t*>(a.flags);
  kv.flags_ld = a.B;
  kv.pos = reinterpret_cast<const int*>(a.pos);
  kv.L = static_cast<int>(a.L);
  kv.nb = static_cast<int>(a.B);
  kv.Hkv = static_cast<int>(a.Hkv);
  kv.D = static_cast<int>(a.D);
  kv.S = static_cast<int>(a.S);

  if (a.mode == 0) {
    const int threads = 256;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(a.L * a.B, threads), 4096));
    cudaError_t err = launch(kv_mask_kernel<256>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, st, caps.pdl, kv);
    D3K_LAUNCH_CHECK("write_kv: launch of kv_mask", err);
    return "";
  }
  if (a.mode == 2) {
    cudaError_t err = a.dtype == kBFloat16 ? launch_copy<__nv_bfloat16>(kv, st, caps.pdl)
                                           : launch_copy<__half>(kv, st, caps.pdl);
    D3K_LAUNCH_CHECK("write_kv: launch of kv_copy", err);
    return "";
  }

  // project
  const int d = static_cast<int>(a.d), H = static_cast<int>(a.H), D = static_cast<int>(a.D);
  const int64_t R = (a.H + 2 * a.Hkv) * a.D;
  const bool vec8 = d % 8 == 0 && aligned16(reinterpret_cast<void*>(a.src_h)) &&
                    aligned16(reinterpret_cast<void*>(a.norms)) && aligned16(reinterpret_cast<void*>(a.wqkv));
  const int64_t cache_row = paged ? 0 : a.Hkv * a.S * a.D;
  const int64_t valid_row = paged ? 0 : a.S;
  for (int b0 = 0; b0 < static_cast<int>(a.B); b0 += kMaxRows) {
    const int nb = std::min<int>(kMaxRows, static_cast<int>(a.B) - b0);
    KvProjectParams p = {};
    p.g.nb = nb;
    p.g.K = d;
    p.g.n_slots = static_cast<int>(2 * a.Hkv * a.D);
    p.eps = static_cast<float>(a.eps);
    p.kv = kv;
    p.kv.k_cache = reinterpret_cast<char*>(a.k_cache) + b0 * cache_row * es;
    p.kv.v_cache = reinterpret_cast<char*>(a.v_cache) + b0 * cache_row * es;
    p.kv.kv_valid = kv.kv_valid + static_cast<int64_t>(b0) * valid_row;
    p.kv.flags = kv.flags + b0;
    p.kv.pos = kv.pos + b0;
    p.kv.slot = paged ? kv.slot + b0 : nullptr;
    p.kv.nb = nb;
    p.h = reinterpret_cast<const char*>(a.src_h) + static_cast<int64_t>(b0) * d * es;
    p.ldh = d;
    p.norms = reinterpret_cast<const void*>(a.norms);
    p.w = reinterpret_cast<const void*>(a.wqkv);
    p.w_layer_stride = R * d;
    p.kv_row0 = H * D;
    p.bias = reinterpret_cast<const void*>(a.bqkv);
    p.bias_layer_stride = R;
    p.rope_cos = reinterpret_cast<const float*>(a.rope_cos);
    p.rope_sin = reinterpret_cast<const float*>(a.rope_sin);
    p.rope_ld = a.rope_ld;
    p.pos_limit = static_cast<int>(std::min<int64_t>(a.S, a.rope_len));
    e = run_kv_project(p, a.dtype, caps, vec8, kv.L, st);
    if (!e.empty()) return e;
  }
  return "";
}

}  // namespace d3k
