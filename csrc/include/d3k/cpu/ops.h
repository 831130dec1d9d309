// The native CPU backend (csrc/cpu/): the decode ops on CPU tensors, with weights as the checkpoint
// stores them. Plain C++ header: bindings.cpp binds these structs field by field (as for the CUDA ops).
//
// Pointers are CPU addresses (tensor.data_ptr()); tensors are contiguous. Activations (h, out, the KV
// cache, norms, biases) are float32, float16 or bfloat16 (`dtype`, see DType). A weight field holds the
// address of a MatDesc (a stacked weight: of L consecutive MatDescs, one per layer): a matrix [rows, cols]
// as up to three row blocks (Seg), each with its own storage type, so a GGUF file's q / k / v or gate / up
// tensors are read where they lie, in whatever type each has. Block types are ggml's (d3k/cpu/formats.h):
// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32 values), Q4_K, Q5_K, Q6_K (super-blocks of 256). With a block
// type the activations are rounded to int16 per block of 32 (d3k/cpu/kernels.h) before
// the integer dot products; float weights are read as float32 and multiplied in float32.
//
// Launchers check sizes and pointers, run on the calling thread's team of worker threads and return ""
// or an error message (they never throw). Semantics: d3kernels/reference/ops.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace d3k::cpu {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum class QType : int {
  kF32 = 0, kF16 = 1, kBF16 = 2, kQ4_0 = 3, kQ4_1 = 4, kQ8_0 = 5, kQ5_0 = 6, kQ5_1 = 7, kQ4_K = 8, kQ5_K = 9,
  kQ6_K = 10
};
constexpr int kNumQTypes = 11;
enum class Layout : int { kContiguous = 0, kPaged = 1 };
constexpr int kBlock = 32;   // values per group of the activation rounding (one sum of q each)
constexpr int kSpan = 256;   // values per scale of the activation rounding (the last span of a row may be shorter)

// Bytes of one row of `cols` values of type q (whole blocks of the type), or -1.
int64_t row_bytes(QType q, int64_t cols);
const char* qtype_name(QType q);

// One row block of a weight matrix: `rows` rows of type `type` (a QType) at address `ptr`, `ld` bytes apart.
// perm_d > 0: the rows are in llama.cpp's interleaved-RoPE order, heads of perm_d rows (GGUF Llama Q and K);
// the kernels write each output at its Hugging Face row. All int64, so Python fills them as one int64 tensor.
struct Seg {
  int64_t ptr, type, ld, rows, perm_d;
};
constexpr int kMaxSegs = 3;
struct MatDesc {
  int64_t nseg;
  Seg seg[kMaxSegs];
};

#define D3K_CPU_DECLARE_FIELD(type, name) type name{};
#define D3K_CPU_WEIGHT(X, w) X(uintptr_t, w)   // the address of its MatDesc(s)

// attn_block and attn_block_paged (layout kPaged: k_cache / v_cache are the pool [num_pages, page_size, H_kv, D],
// kv_valid [num_pages, page_size], block_table [B, max_pages] int32, slot_mapping [B] int64, -1: row idle).
#define D3K_CPU_ATTN_FIELDS(X)                                                            \
  X(uintptr_t, out) X(uintptr_t, h) X(uintptr_t, attn_norm)                               \
  D3K_CPU_WEIGHT(X, wqkv) X(uintptr_t, bqkv) D3K_CPU_WEIGHT(X, wo)                        \
  X(uintptr_t, k_cache) X(uintptr_t, v_cache) X(uintptr_t, kv_valid)                      \
  X(uintptr_t, pos) X(uintptr_t, rope_cos) X(uintptr_t, rope_sin) X(uintptr_t, row_active) \
  X(int64_t, B) X(int64_t, d) X(int64_t, H) X(int64_t, Hkv) X(int64_t, D) X(int64_t, S)   \
  X(int64_t, rope_len) X(int64_t, rope_ld) X(double, eps) X(DType, dtype) X(Layout, layout) \
  X(uintptr_t, block_table) X(uintptr_t, slot_mapping)                                    \
  X(int64_t, num_pages) X(int64_t, page_size) X(int64_t, max_pages)
struct AttnArgs {
  D3K_CPU_ATTN_FIELDS(D3K_CPU_DECLARE_FIELD)
};

#define D3K_CPU_MLP_FIELDS(X)                                                             \
  X(uintptr_t, out) X(uintptr_t, h) X(uintptr_t, mlp_norm)                                \
  D3K_CPU_WEIGHT(X, w_gate_up) D3K_CPU_WEIGHT(X, w_down) X(uintptr_t, row_active)         \
  X(int64_t, B) X(int64_t, d) X(int64_t, F) X(double, eps) X(DType, dtype)
struct MlpArgs {
  D3K_CPU_MLP_FIELDS(D3K_CPU_DECLARE_FIELD)
};

// write_kv and write_kv_paged (layout kPaged: [L, num_pages, page_size, ...] and slot_mapping). mode: 0 mask,
// 1 project, 2 copy.
#define D3K_CPU_WRITE_KV_FIELDS(X)                                                        \
  X(uintptr_t, k_cache) X(uintptr_t, v_cache) X(uintptr_t, kv_valid) X(uintptr_t, src_h)  \
  X(uintptr_t, norms) D3K_CPU_WEIGHT(X, wqkv) X(uintptr_t, bqkv)                          \
  X(uintptr_t, pos) X(uintptr_t, rope_cos) X(uintptr_t, rope_sin) X(uintptr_t, flags)     \
  X(int, mode) X(int64_t, L) X(int64_t, B) X(int64_t, d) X(int64_t, H) X(int64_t, Hkv)    \
  X(int64_t, D) X(int64_t, S) X(int64_t, rope_len) X(int64_t, rope_ld) X(double, eps)     \
  X(DType, dtype) X(Layout, layout) X(uintptr_t, slot_mapping) X(int64_t, num_pages)      \
  X(int64_t, page_size)
struct WriteKvArgs {
  D3K_CPU_WRITE_KV_FIELDS(D3K_CPU_DECLARE_FIELD)
};

#define D3K_CPU_LM_HEAD_FIELDS(X)                                                         \
  X(uintptr_t, logits) X(uintptr_t, h) X(uintptr_t, final_norm) D3K_CPU_WEIGHT(X, w_lm)   \
  X(int64_t, B) X(int64_t, d) X(int64_t, V) X(double, eps) X(DType, dtype) X(uintptr_t, row_active)
// row_active: uint8 [B] or 0 (every row); rows with 0 are not computed and their logits keep what they held
struct LmHeadArgs {
  D3K_CPU_LM_HEAD_FIELDS(D3K_CPU_DECLARE_FIELD)
};

std::string attn_block(const AttnArgs& a);
std::string mlp_block(const MlpArgs& a);
std::string write_kv(const WriteKvArgs& a);
std::string lm_head(const LmHeadArgs& a);

// y [N, R] float32 = x [N, K] float32 @ w[R, K]^T (+ bias [R] float32 if non-zero): the prefill's projections.
std::string linear(uintptr_t y, uintptr_t x, uintptr_t w, QType w_type, int64_t w_ld, uintptr_t bias, int64_t N,
                   int64_t R, int64_t K);
// out [N, K] (dtype) = rows ids [N] int64 of w [R, K]: the embedding lookup; ids outside [0, R) give NaN rows.
std::string embed(uintptr_t out, DType dtype, uintptr_t ids, uintptr_t w, QType w_type, int64_t w_ld, int64_t N,
                  int64_t R, int64_t K);
// tokens [B] int64 = argmax of logits [B, V] float32 (row stride ld); the first maximum, NaN counts as largest.
std::string argmax(uintptr_t tokens, uintptr_t logits, int64_t B, int64_t V, int64_t ld);

// A recorded sequence of launches (the CPU's CUDA graph): run() executes them in order inside one
// parallel region, so the worker threads stay up between ops and Python is called once per step.
class Program {
 public:
  // each add checks its arguments ("" or why not) and keeps a copy; run() then cannot fail
  std::string add_attn(const AttnArgs& a) { return add(0, &a); }
  std::string add_mlp(const MlpArgs& a) { return add(1, &a); }
  std::string add_write_kv(const WriteKvArgs& a) { return add(2, &a); }
  std::string add_lm_head(const LmHeadArgs& a) { return add(3, &a); }
  std::size_t size() const { return ops_.size(); }
  std::string run() const;

 private:
  struct Op {
    int kind;
    AttnArgs attn;
    MlpArgs mlp;
    WriteKvArgs kv;
    LmHeadArgs head;
  };
  static std::string check_op(int kind, const void* args);
  std::string add(int kind, const void* args) {
    std::string e = check_op(kind, args);
    if (!e.empty()) return e;
    Op op{kind, {}, {}, {}, {}};
    if (kind == 0) op.attn = *static_cast<const AttnArgs*>(args);
    if (kind == 1) op.mlp = *static_cast<const MlpArgs*>(args);
    if (kind == 2) op.kv = *static_cast<const WriteKvArgs*>(args);
    if (kind == 3) op.head = *static_cast<const LmHeadArgs*>(args);
    ops_.push_back(op);
    return "";
  }
  std::vector<Op> ops_;
};

// Instruction sets: the best the CPU has, unless D3K_CPU_ISA (or set_isa) names a lower one.
const char* isa();                       // "avx512" | "avx2" | "scalar"
std::string set_isa(const std::string& name);   // "" or why not
std::vector<std::string> isas_supported();
int num_threads();
void set_num_threads(int n);

}  // namespace d3k::cpu
