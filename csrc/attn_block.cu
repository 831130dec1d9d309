// attn_block launcher: validates, then per group of <= 16 rows launches
//   k1 attn_pre -> k2 attn_decode (split-K + last-block combine) -> k3 o_proj,
// chained with Programmatic Dependent Launch. Semantics: reference attn_block.
#include <climits>
#include <cmath>

#include "d3k/internal.cuh"
#include "d3k/limits.h"
#include "d3k/ops.h"

namespace d3k {

namespace {

const char* kOp = "d3k.attn_block: ";

std::string check_shapes(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S) {
  std::string e = kOp;
  if (B < 1) return e + "B must be >= 1, got " + std::to_string(B);
  if (H < 1 || Hkv < 1) return e + "H and H_kv must be >= 1, got H=" + std::to_string(H) + " H_kv=" + std::to_string(Hkv);
  if (H % Hkv != 0) return e + "H=" + std::to_string(H) + " must be a multiple of H_kv=" + std::to_string(Hkv);
  if (!head_dim_supported(D)) return e + "head_dim " + std::to_string(D) + " is not supported by the CUDA kernels " + head_dims_text();
  if (S < 1 || S > INT_MAX / 2) return e + "cache length S=" + std::to_string(S) + " out of range [1, 2^30]";
  if ((H + 2 * Hkv) * D > INT_MAX) return e + "(H + 2 H_kv) * D is too large";
  return "";
}

}  // namespace

std::string attn_plan(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, const DeviceCaps& caps,
                      AttnPlan* out) {
  std::string e = check_shapes(B, H, Hkv, D, S);
  if (!e.empty()) return e;
  AttnPlan pl;
  pl.G = static_cast<int>(H / Hkv);
  pl.NG = static_cast<int>(ceil_div(pl.G, 8));
  pl.GPB = static_cast<int>(ceil_div(pl.G, pl.NG));
  pl.GMAX = pl.GPB <= 1 ? 1 : pl.GPB <= 2 ? 2 : pl.GPB <= 4 ? 4 : 8;
  // Enough splits that one launch (<= 16 rows) has ~2 blocks per SM at full
  // context; each split covers >= 256 positions. Splits past a row's pos exit at once.
  const int64_t nb = std::min<int64_t>(B, kMaxRows);
  const int64_t per_split = nb * Hkv * pl.NG;
  int64_t ns = ceil_div(2 * static_cast<int64_t>(caps.sm_count), per_split);
  ns = std::max<int64_t>(1, std::min<int64_t>(ns, ceil_div(S, 256)));
  const int64_t len = round_up(ceil_div(S, ns), 64);
  pl.split_len = static_cast<int>(len);
  pl.NS = static_cast<int>(ceil_div(S, len));
  if (pl.NS > 65535) return std::string(kOp) + "too many splits";
  *out = pl;
  return "";
}

std::string attn_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, int device, AttnWorkspace* out) {
  DeviceCaps caps;
  std::string e = device_caps(device, &caps);
  if (!e.empty()) {
    (void)cudaGetLastError();
    return e;
  }
  AttnPlan pl;
  e = attn_plan(B, H, Hkv, D, S, caps, &pl);
  if (!e.empty()) return e;
  AttnWorkspace w;
  w.num_splits = pl.NS;
  w.split_len = pl.split_len;
  w.head_groups = pl.NG;
  w.q_elems = B * H * D;
  w.o_elems = B * H * D;
  w.ml_elems = B * H * pl.NS * 2;
  w.acc_elems = B * H * pl.NS * D;
  w.counters = B * Hkv * pl.NG;
  w.rows_elems = 2 * B;
  *out = w;
  return "";
}

std::string attn_block(const AttnBlockArgs& a) {
  const bool paged = a.layout == CacheLayout::kPaged;
  const std::string op = paged ? "d3k.attn_block_paged: " : kOp;
  if (paged) {
    D3K_CHECK(a.page_size >= kPageSizeMultiple && a.page_size % kPageSizeMultiple == 0 && a.page_size <= kMaxPageSize,
              op + "page_size " + std::to_string(a.page_size) + " is not supported by the CUDA attention kernel (a multiple of " +
                  std::to_string(kPageSizeMultiple) + ")");
    D3K_CHECK(a.num_pages >= 1 && a.num_pages <= INT_MAX,
              op + "num_pages=" + std::to_string(a.num_pages) + " out of range [1, 2^31)");
    D3K_CHECK(a.max_pages >= 1 && a.max_pages <= INT_MAX / a.page_size,
              op + "max_pages=" + std::to_string(a.max_pages) + " out of range");
    D3K_CHECK(a.S == a.max_pages * a.page_size, op + "S must be max_pages * page_size");
    D3K_CHECK(a.block_table != 0 && a.slot_mapping != 0 && a.rows_ws != 0, op + "null pointer argument");
  }
  D3K_RETURN_IF_ERROR(check_preamble(op, a.dtype, a.B, a.d));
  D3K_RETURN_IF_ERROR(check_shapes(a.B, a.H, a.Hkv, a.D, a.S));
  D3K_CHECK(a.H * a.D <= INT_MAX / 2, op + "H * D is too large");
  D3K_CHECK(a.rope_len >= 1 && a.rope_ld >= a.D / 2,
            op + "rope tables must be [rope_len >= 1, D/2] with row stride >= D/2, got rope_len=" +
                std::to_string(a.rope_len) + " row stride " + std::to_string(a.rope_ld));
  D3K_CHECK(a.out && a.h && a.attn_norm && a.wqkv && a.wo && a.k_cache && a.v_cache && a.kv_valid && a.pos &&
                a.rope_cos && a.rope_sin && a.row_active && a.q_ws && a.o_ws && a.part_ml && a.part_acc &&
                a.counters,
            op + "null pointer argument");
  D3K_CHECK(aligned16(reinterpret_cast<void*>(a.k_cache)) && aligned16(reinterpret_cast<void*>(a.v_cache)),
            op + "k_cache and v_cache must be 16-byte aligned");
  D3K_CHECK(aligned16(reinterpret_cast<void*>(a.q_ws)) && aligned16(reinterpret_cast<void*>(a.o_ws)),
            op + "q/o workspaces must be 16-byte aligned");

  DeviceGuard guard;
  DeviceCaps caps;
  std::string e = guard.enter(a.device, &caps);
  if (!e.empty()) return e;
  AttnPlan pl;
  e = attn_plan(a.B, a.H, a.Hkv, a.D, a.S, caps, &pl);
  if (!e.empty()) return e;
  D3K_CHECK(a.num_splits == pl.NS, op + "workspace was sized for " + std::to_string(a.num_splits) +
                                       " splits, this call needs " + std::to_string(pl.NS) +
                                       " (size it with attn_workspace)");

  const int64_t es = dtype_size(a.dtype);
  const int B = static_cast<int>(a.B), d = static_cast<int>(a.d), H = static_cast<int>(a.H),
            Hkv = static_cast<int>(a.Hkv), D = static_cast<int>(a.D), S = static_cast<int>(a.S);
  const int R = (H + 2 * Hkv) * D, HD = H * D;
  const int pos_limit = static_cast<int>(std::min<int64_t>(a.S, a.rope_len));
  const bool vec8_pre = d % 8 == 0 && aligned16(reinterpret_cast<void*>(a.h)) &&
                        aligned16(reinterpret_cast<void*>(a.attn_norm)) &&
                        aligned16(reinterpret_cast<void*>(a.wqkv));
  const bool vec8_o = HD % 8 == 0 && aligned16(reinterpret_cast<void*>(a.wo));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);
  char* h = reinterpret_cast<char*>(a.h);
  char* out = reinterpret_cast<char*>(a.out);
  char* kcache = reinterpret_cast<char*>(a.k_cache);
  char* vcache = reinterpret_cast<char*>(a.v_cache);
  uint8_t* valid = reinterpret_cast<uint8_t*>(a.kv_valid);
  const int* pos = reinterpret_cast<const int*>(a.pos);
  const uint8_t* active = reinterpret_cast<const uint8_t*>(a.row_active);
  float* q = reinterpret_cast<float*>(a.q_ws);
  float* o = reinterpret_cast<float*>(a.o_ws);
  float* pml = reinterpret_cast<float*>(a.part_ml);
  float* pacc = reinterpret_cast<float*>(a.part_acc);
  int* counters = reinterpret_cast<int*>(a.counters);
  const int64_t cache_row = paged ? 0 : static_cast<int64_t>(Hkv) * S * D;  // elements per batch row
  const int64_t valid_row = paged ? 0 : S;                                    // (paged: one pool)
  const int64_t* slots = paged ? reinterpret_cast<const int64_t*>(a.slot_mapping) : nullptr;  // device side: nullptr = contiguous
  const int* btab = reinterpret_cast<const int*>(a.block_table);
  const int64_t num_slots = paged ? a.num_pages * a.page_size : 0;
  int* rows_pos = reinterpret_cast<int*>(a.rows_ws);                                 // [B] int32
  uint8_t* rows_run = reinterpret_cast<uint8_t*>(a.rows_ws) + 4 * a.B;               // then [B] uint8
  const float scale_log2 = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(D)));

  for (int b0 = 0; b0 < B; b0 += kMaxRows) {
    const int nb = std::min(kMaxRows, B - b0);
    AttnPreParams k1 = {};
    k1.g.nb = nb;
    k1.g.K = d;
    k1.g.n_slots = R;
    k1.eps = static_cast<float>(a.eps);
    k1.h = h + static_cast<int64_t>(b0) * d * es;
    k1.ldh = d;
    k1.norm = reinterpret_cast<const void*>(a.attn_norm);
    k1.w = reinterpret_cast<const void*>(a.wqkv);
    k1.bias = reinterpret_cast<const void*>(a.bqkv);
    k1.k_cache = kcache + static_cast<int64_t>(b0) * cache_row * es;
    k1.v_cache = vcache + static_cast<int64_t>(b0) * cache_row * es;
    k1.kv_valid = valid + static_cast<int64_t>(b0) * valid_row;
    k1.pos = pos + b0;
    k1.active = active + b0;
    k1.slot = paged ? slots + b0 : nullptr;
    k1.num_slots = num_slots;
    k1.row_pos = paged ? rows_pos + b0 : nullptr;
    k1.row_run = paged ? rows_run + b0 : nullptr;
    k1.rope_cos = reinterpret_cast<const float*>(a.rope_cos);
    k1.rope_sin = reinterpret_cast<const float*>(a.rope_sin);
    k1.rope_ld = a.rope_ld;
    k1.pos_limit = pos_limit;
    k1.q = q + static_cast<int64_t>(b0) * HD;
    k1.counters = counters + static_cast<int64_t>(b0) * Hkv * pl.NG;
    k1.n_counters = nb * Hkv * pl.NG;
    k1.H = H;
    k1.Hkv = Hkv;
    k1.D = D;
    k1.S = S;
    e = run_attn_pre(k1, a.dtype, caps, vec8_pre, st);
    if (!e.empty()) return e;

    AttnParams k2 = {};
    k2.q = k1.q;
    k2.k_cache = k1.k_cache;
    k2.v_cache = k1.v_cache;
    k2.kv_valid = k1.kv_valid;
    k2.pos = paged ? k1.row_pos : k1.pos;  // paged: the effective row status k1 writes
    k2.active = paged ? k1.row_run : k1.active;
    k2.block_table = paged ? btab + static_cast<int64_t>(b0) * a.max_pages : nullptr;
    k2.bt_ld = a.max_pages;
    k2.num_pages = static_cast<int>(a.num_pages);
    k2.page_size = static_cast<int>(a.page_size);
    k2.pos_limit = pos_limit;
    k2.part_ml = pml + static_cast<int64_t>(b0) * H * pl.NS * 2;
    k2.part_acc = pacc + static_cast<int64_t>(b0) * H * pl.NS * D;
    k2.counters = k1.counters;
    k2.o = o + static_cast<int64_t>(b0) * HD;
    k2.H = H;
    k2.Hkv = Hkv;
    k2.G = pl.G;
    k2.GPB = pl.GPB;
    k2.NG = pl.NG;
    k2.S = S;
    k2.NS = pl.NS;
    k2.split_len = pl.split_len;
    k2.scale_log2 = scale_log2;
    e = run_attn_decode(k2, a.dtype, D, pl.GMAX, nb, caps, st);
    if (!e.empty()) return e;

    OProjParams k3 = {};
    k3.g.nb = nb;
    k3.g.K = HD;
    k3.g.n_slots = d;
    k3.w = reinterpret_cast<const void*>(a.wo);
    k3.o = k2.o;
    k3.ldo = HD;
    k3.h = k1.h;
    k3.ldh = d;
    k3.out = out + static_cast<int64_t>(b0) * d * es;
    k3.ld_out = d;
    k3.pos = k2.pos;
    k3.active = k2.active;
    k3.pos_limit = pos_limit;
    e = run_o_proj(k3, a.dtype, caps, vec8_o, st);
    if (!e.empty()) return e;
  }
  return "";
}

}  // namespace d3k
