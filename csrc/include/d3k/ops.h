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

// Each Args struct's fields are listed once, in an X-macro: the struct below and its Python class
// (bindings.cpp; d3kernels/_ops.py sets the fields by name) both come from it.
#define D3K_DECLARE_FIELD(type, name) type name{};

// attn_block. Paged KV cache (layout kPaged): k_cache / v_cache are the pool [num_pages, page_size, H_kv, D],
// kv_valid [num_pages, page_size]; S must be max_pages * page_size (the split plan's length).
#define D3K_ATTN_BLOCK_FIELDS(X)                                                         \
  X(uintptr_t, out)        /* [B, d] dtype (written) */                                  \
  X(uintptr_t, h)          /* [B, d] dtype (may alias out) */                            \
  X(uintptr_t, attn_norm)  /* [d] */                                                     \
  X(uintptr_t, wqkv)       /* [(H + 2 H_kv) D, d] */                                     \
  X(uintptr_t, bqkv)       /* [(H + 2 H_kv) D] or 0 */                                   \
  X(uintptr_t, wo)         /* [d, H D] */                                                \
  X(uintptr_t, k_cache)    /* [B, H_kv, S, D] (updated at pos) */                        \
  X(uintptr_t, v_cache)                                                                  \
  X(uintptr_t, kv_valid)   /* [B, S] uint8 (set to 1 at pos) */                          \
  X(uintptr_t, pos)        /* [B] int32 */                                               \
  X(uintptr_t, rope_cos)   /* [rope_len, D/2] fp32, row stride rope_ld */                \
  X(uintptr_t, rope_sin)                                                                 \
  X(uintptr_t, row_active) /* [B] uint8 */                                               \
  X(uintptr_t, q_ws) X(uintptr_t, o_ws) X(uintptr_t, part_ml) X(uintptr_t, part_acc)     \
  X(uintptr_t, counters)   /* AttnWorkspace */                                           \
  X(int64_t, B) X(int64_t, d) X(int64_t, H) X(int64_t, Hkv) X(int64_t, D) X(int64_t, S)  \
  X(int64_t, rope_len) X(int64_t, rope_ld) X(int64_t, num_splits)                        \
  X(double, eps) X(int, dtype) X(int, device) X(uintptr_t, stream)                       \
  X(CacheLayout, layout)                                                                 \
  X(uintptr_t, block_table)  /* [B, max_pages] int32 */                                  \
  X(uintptr_t, slot_mapping) /* [B] int64, -1 = the row runs nothing */                  \
  X(uintptr_t, rows_ws)      /* AttnWorkspace::rows_elems int32 of scratch */            \
  X(int64_t, num_pages) X(int64_t, page_size) X(int64_t, max_pages)
struct AttnBlockArgs {
  D3K_ATTN_BLOCK_FIELDS(D3K_DECLARE_FIELD)
};
// attn_block on a contiguous cache, or (layout kPaged) on a paged one: attn_block_paged.
std::string attn_block(const AttnBlockArgs& a);

// ---------------------------------------------------------------- mlp_block
#define D3K_MLP_BLOCK_FIELDS(X)                                                          \
  X(uintptr_t, out)        /* [B, d] (written; may alias h) */                           \
  X(uintptr_t, h)          /* [B, d] */                                                  \
  X(uintptr_t, mlp_norm)   /* [d] */                                                     \
  X(uintptr_t, w_gate_up)  /* [2F, d] */                                                 \
  X(uintptr_t, w_down)     /* [d, F] */                                                  \
  X(uintptr_t, row_active) /* [B] uint8 */                                               \
  X(uintptr_t, act_ws)     /* [B, F] fp32 scratch */                                     \
  X(int64_t, B) X(int64_t, d) X(int64_t, F)                                              \
  X(double, eps) X(int, dtype) X(int, device) X(uintptr_t, stream)
struct MlpBlockArgs {
  D3K_MLP_BLOCK_FIELDS(D3K_DECLARE_FIELD)
};
std::string mlp_block(const MlpBlockArgs& a);

// ---------------------------------------------------------------- lm_head
#define D3K_LM_HEAD_FIELDS(X)                                                            \
  X(uintptr_t, logits)     /* [B, V] fp32 (written) */                                   \
  X(uintptr_t, h)          /* [B, d] */                                                  \
  X(uintptr_t, final_norm) /* [d] */                                                     \
  X(uintptr_t, w_lm)       /* [V, d] */                                                  \
  X(int64_t, B) X(int64_t, d) X(int64_t, V)                                              \
  X(double, eps) X(int, dtype) X(int, device) X(uintptr_t, stream)
struct LmHeadArgs {
  D3K_LM_HEAD_FIELDS(D3K_DECLARE_FIELD)
};
std::string lm_head(const LmHeadArgs& a);

// ---------------------------------------------------------------- write_kv
// Paged KV cache (layout kPaged): k_cache / v_cache [L, num_pages, page_size, H_kv, D], kv_valid
// [L, num_pages, page_size]; S must be max_pages * page_size.
#define D3K_WRITE_KV_FIELDS(X)                                                           \
  X(uintptr_t, k_cache) X(uintptr_t, v_cache)  /* [L, B, H_kv, S, D] (updated) */        \
  X(uintptr_t, kv_valid)   /* [L, B, S] uint8 (updated) */                               \
  X(uintptr_t, src_h)      /* [B, d] */                                                  \
  X(uintptr_t, norms)      /* [L, d] */                                                  \
  X(uintptr_t, wqkv)       /* [L, (H + 2 H_kv) D, d] */                                  \
  X(uintptr_t, bqkv)       /* [L, (H + 2 H_kv) D] or 0 */                                \
  X(uintptr_t, pos)        /* [B] int32 */                                               \
  X(uintptr_t, rope_cos) X(uintptr_t, rope_sin)  /* [rope_len, D/2] fp32, stride rope_ld */ \
  X(uintptr_t, flags)      /* [L, B] uint8 */                                            \
  X(int, mode)             /* 0 mask, 1 project, 2 copy */                               \
  X(int64_t, L) X(int64_t, B) X(int64_t, d) X(int64_t, H) X(int64_t, Hkv) X(int64_t, D)  \
  X(int64_t, S) X(int64_t, rope_len) X(int64_t, rope_ld)                                 \
  X(double, eps) X(int, dtype) X(int, device) X(uintptr_t, stream)                       \
  X(CacheLayout, layout)                                                                 \
  X(uintptr_t, block_table)  /* [B, max_pages] int32 (not read) */                       \
  X(uintptr_t, slot_mapping) /* [B] int64, -1 = nothing */                               \
  X(int64_t, num_pages) X(int64_t, page_size) X(int64_t, max_pages)
struct WriteKvArgs {
  D3K_WRITE_KV_FIELDS(D3K_DECLARE_FIELD)
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
