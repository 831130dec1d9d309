// Launchers of the fused decode ops (csrc/<op>.cu). Plain C++ header: no CUDA
// types, so bindings.cpp needs no CUDA headers.
//
// Every pointer is a raw device address (tensor.data_ptr()); every tensor is
// contiguous with the shape named in the comment. dtype: 0 = float16,
// 1 = bfloat16. `stream` is a cudaStream_t, `device` the CUDA device index.
// Each launcher validates its arguments, launches on `stream` and returns ""
// on success or an error message (it never throws, allocates or syncs).
// Semantics: d3kernels/reference/ops.py.
#pragma once

#include <cstdint>
#include <string>

namespace d3k {

// ---------------------------------------------------------------- attn_block
// Scratch sizes for attn_block with these shapes (fp32 elements / int32 counters).
struct AttnWorkspace {
  int64_t num_splits = 0;   // split-K partitions of the positions
  int64_t split_len = 0;    // positions per split
  int64_t head_groups = 0;  // blocks per kv head (query heads are processed <= 8 per block)
  int64_t q_elems = 0;      // q_ws: [B, H, D] fp32
  int64_t o_elems = 0;      // o_ws: [B, H * D] fp32
  int64_t ml_elems = 0;     // part_ml: [B, H, num_splits, 2] fp32
  int64_t acc_elems = 0;    // part_acc: [B, H, num_splits, D] fp32
  int64_t counters = 0;     // counters: [B, H_kv, head_groups] int32
  int64_t rows_elems = 0;   // rows_ws (paged only): 2 B int32 = [B] int32 positions, then [B] uint8 flags
};
std::string attn_workspace(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, int device, AttnWorkspace* out);

// The KV cache layout an op reads and writes, said explicitly (not by which pointers are set).
enum class CacheLayout : int { kContiguous = 0, kPaged = 1 };

struct AttnBlockArgs {
  uintptr_t out = 0;        // [B, d] dtype (written)
  uintptr_t h = 0;          // [B, d] dtype (may alias out)
  uintptr_t attn_norm = 0;  // [d]
  uintptr_t wqkv = 0;       // [(H + 2 H_kv) D, d]
  uintptr_t bqkv = 0;       // [(H + 2 H_kv) D] or 0
  uintptr_t wo = 0;         // [d, H D]
  uintptr_t k_cache = 0;    // [B, H_kv, S, D] (updated at pos)
  uintptr_t v_cache = 0;
  uintptr_t kv_valid = 0;   // [B, S] uint8 (set to 1 at pos)
  uintptr_t pos = 0;        // [B] int32
  uintptr_t rope_cos = 0;   // [rope_len, D/2] fp32, row stride rope_ld
  uintptr_t rope_sin = 0;
  uintptr_t row_active = 0; // [B] uint8
  uintptr_t q_ws = 0, o_ws = 0, part_ml = 0, part_acc = 0, counters = 0;  // AttnWorkspace
  int64_t B = 0, d = 0, H = 0, Hkv = 0, D = 0, S = 0, rope_len = 0, rope_ld = 0, num_splits = 0;
  double eps = 0;
  int dtype = 0, device = 0;
  uintptr_t stream = 0;
  // Paged KV cache (layout kPaged): k_cache / v_cache are the pool [num_pages, page_size, H_kv, D],
  // kv_valid [num_pages, page_size]; S must be max_pages * page_size (the split plan's length).
  CacheLayout layout = CacheLayout::kContiguous;
  uintptr_t block_table = 0;   // [B, max_pages] int32
  uintptr_t slot_mapping = 0;  // [B] int64, -1 = the row runs nothing
  uintptr_t rows_ws = 0;       // AttnWorkspace::rows_elems int32 of scratch
  int64_t num_pages = 0, page_size = 0, max_pages = 0;
};
// attn_block on a contiguous cache, or (layout kPaged) on a paged one: attn_block_paged.
std::string attn_block(const AttnBlockArgs& a);

// ---------------------------------------------------------------- mlp_block
struct MlpBlockArgs {
  uintptr_t out = 0;        // [B, d] (written; may alias h)
  uintptr_t h = 0;          // [B, d]
  uintptr_t mlp_norm = 0;   // [d]
  uintptr_t w_gate_up = 0;  // [2F, d]
  uintptr_t w_down = 0;     // [d, F]
  uintptr_t row_active = 0; // [B] uint8
  uintptr_t act_ws = 0;     // [B, F] fp32 scratch
  int64_t B = 0, d = 0, F = 0;
  double eps = 0;
  int dtype = 0, device = 0;
  uintptr_t stream = 0;
};
std::string mlp_block(const MlpBlockArgs& a);

// ---------------------------------------------------------------- lm_head
struct LmHeadArgs {
  uintptr_t logits = 0;      // [B, V] fp32 (written)
  uintptr_t h = 0;           // [B, d]
  uintptr_t final_norm = 0;  // [d]
  uintptr_t w_lm = 0;        // [V, d]
  int64_t B = 0, d = 0, V = 0;
  double eps = 0;
  int dtype = 0, device = 0;
  uintptr_t stream = 0;
};
std::string lm_head(const LmHeadArgs& a);

// ---------------------------------------------------------------- write_kv
struct WriteKvArgs {
  uintptr_t k_cache = 0, v_cache = 0;  // [L, B, H_kv, S, D] (updated)
  uintptr_t kv_valid = 0;              // [L, B, S] uint8 (updated)
  uintptr_t src_h = 0;                 // [B, d]
  uintptr_t norms = 0;                 // [L, d]
  uintptr_t wqkv = 0;                  // [L, (H + 2 H_kv) D, d]
  uintptr_t bqkv = 0;                  // [L, (H + 2 H_kv) D] or 0
  uintptr_t pos = 0;                   // [B] int32
  uintptr_t rope_cos = 0, rope_sin = 0;  // [rope_len, D/2] fp32, row stride rope_ld
  uintptr_t flags = 0;                 // [L, B] uint8
  int mode = 0;                        // 0 mask, 1 project, 2 copy
  int64_t L = 0, B = 0, d = 0, H = 0, Hkv = 0, D = 0, S = 0, rope_len = 0, rope_ld = 0;
  double eps = 0;
  int dtype = 0, device = 0;
  uintptr_t stream = 0;
  // Paged KV cache (layout kPaged): k_cache / v_cache [L, num_pages, page_size, H_kv, D], kv_valid
  // [L, num_pages, page_size]; S must be max_pages * page_size.
  CacheLayout layout = CacheLayout::kContiguous;
  uintptr_t slot_mapping = 0;  // [B] int64, -1 = nothing
  int64_t num_pages = 0, page_size = 0, max_pages = 0;
};
// write_kv on a contiguous cache, or (layout kPaged) on a paged one: write_kv_paged.
std::string write_kv(const WriteKvArgs& a);

// ---------------------------------------------------------------- sample
// tokens[b] (int64) = argmax(logits[b, :V]) (fp32, row stride ld); torch.argmax semantics.
std::string argmax(uintptr_t tokens, uintptr_t logits, int64_t B, int64_t V, int64_t ld, int device,
                   uintptr_t stream);

// ---------------------------------------------------------------- introspection
// {sm_count, cc (e.g. 90), pdl (PDL in use)} of a device; "" on success.
std::string device_facts(int device, int* sm_count, int* cc, bool* pdl);

}  // namespace d3k
