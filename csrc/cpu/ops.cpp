// Launchers of the native CPU backend (d3k/cpu/ops.h): argument checks, the work split over a team of
// threads (OpenMP), and the fused op bodies. The inner loops (dot products, activation rounding) come from
// the instruction-set table chosen at run time (d3k/cpu/kernels.h).
//
// Threads: one OpenMP parallel region per launch, or per recorded Program (a whole decode step): inside
// it the team splits each phase (weight rows, heads, rows) and meets at barriers, so a step costs one
// fork and a few barriers per layer, and the threads spin between ops instead of sleeping.
// Scratch: one arena per calling thread, grown to the largest op it has run and then reused (no
// allocation per step); ops launched from two Python threads use two arenas.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "d3k/cpu/kernels.h"
#include "d3k/cpu/ops.h"

namespace d3k::cpu {

float kHalfTable[65536];
namespace {
const bool g_half_table_filled = [] {
  for (uint32_t i = 0; i < 65536; ++i) kHalfTable[i] = f16_to_f32((uint16_t)i);
  return true;
}();

// ------------------------------------------------------------------ instruction set, threads
bool cpu_has(const char* what) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!std::strcmp(what, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (!std::strcmp(what, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return !std::strcmp(what, "scalar");
}

const IsaKernels* best_isa() {
  if (cpu_has("avx512")) return &kAvx512;
  if (cpu_has("avx2")) return &kAvx2;
  return &kScalar;
}

const IsaKernels* g_isa = best_isa();

int default_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int g_threads = default_threads();

struct Team {
  int id = 0, n = 1;
  void barrier() const {
#if defined(_OPENMP)
    if (n > 1) {
#pragma omp barrier
    }
#endif
  }
  // [lo, hi) of this thread's share of n_items, in chunks of `align` items (the last chunk may be short)
  void share(int64_t items, int64_t align, int64_t* lo, int64_t* hi) const {
    const int64_t chunks = (items + align - 1) / align, per = chunks / n, extra = chunks % n;
    const int64_t c0 = id * per + std::min<int64_t>(id, extra), c1 = c0 + per + (id < extra ? 1 : 0);
    *lo = std::min(items, c0 * align);
    *hi = std::min(items, c1 * align);
  }
};

template <class Body>
void in_team(Body&& body) {
#if defined(_OPENMP)
  if (g_threads > 1) {
#pragma omp parallel num_threads(g_threads)
    body(Team{omp_get_thread_num(), omp_get_num_threads()});
    return;
  }
#endif
  body(Team{});
}

// ------------------------------------------------------------------ scratch
thread_local std::vector<char> t_arena;

// Carves 64-byte aligned pieces out of a base pointer; with base == nullptr it only counts bytes.
struct Bump {
  char* base;
  std::size_t used = 0;
  template <class T>
  T* take(int64_t n) {
    used = (used + 63) & ~std::size_t(63);
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += sizeof(T) * std::max<int64_t>(n, 1);
    return p;
  }
};

char* arena(std::size_t bytes) {
  if (t_arena.size() < bytes + 64) t_arena.resize(bytes + 64);
  return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(t_arena.data()) + 63) & ~uintptr_t(63));
}

// The rounded copy of nx activation rows of K values (kernels.h XRow), and their float values.
struct Rows {
  float* f;
  int16_t* q;
  float *dx, *xs;
  XRow* x;
  int64_t K;
  void make(Bump& m, int64_t nx, int64_t K_, bool quantized) {
    K = K_;
    f = m.take<float>(nx * K);
    x = m.take<XRow>(nx);
    const int64_t nb = K / kBlock;
    q = quantized ? m.take<int16_t>(nx * K) : nullptr;
    dx = quantized ? m.take<float>(nx * nb) : nullptr;
    xs = quantized ? m.take<float>(nx * nb) : nullptr;
  }
  // row i: point x[i] at its pieces (one thread per row, before a barrier)
  void point(int64_t i) {
    XRow& r = x[i];
    r.f = f + i * K;
    if (!q) return;
    const int64_t nb = K / kBlock;
    r.q = q + i * K;
    r.dx = dx + i * nb;
    r.xs = xs + i * nb;
  }
  // round values [v0, v1) of row i to 16-bit spans (v0 a multiple of kSpan, v1 too or K; no-op without rounding)
  void round(int64_t i, int64_t v0, int64_t v1) const {
    if (!q || v1 <= v0) return;
    const int64_t nb = K / kBlock;
    g_isa->quantize(f + i * K + v0, v1 - v0, q + i * K + v0, dx + i * nb + v0 / kBlock, xs + i * nb + v0 / kBlock);
  }
};

bool is_block(int64_t t) { return t >= (int64_t)QType::kQ4_0 && t < kNumQTypes; }

// ------------------------------------------------------------------ weights: row blocks (ops.h MatDesc)
const MatDesc& mat(uintptr_t p, int64_t layer = 0) { return reinterpret_cast<const MatDesc*>(p)[layer]; }

bool quantized(const MatDesc& m) {
  for (int64_t s = 0; s < m.nseg; ++s)
    if (is_block(m.seg[s].type)) return true;
  return false;
}

// y[b * ldy + r] = row r of m . xs[b] for r in [r0, r1) (rows of the whole matrix; un-permuted, see Seg)
void gemv_mat(const MatDesc& m, int64_t r0, int64_t r1, const XRow* xs, int nx, float* y, int64_t ldy, int64_t K) {
  int64_t base = 0;
  for (int64_t s = 0; s < m.nseg; ++s) {
    const Seg& g = m.seg[s];
    const int64_t lo = std::max(r0, base), hi = std::min(r1, base + g.rows);
    if (lo < hi)
      g_isa->gemv(QType(g.type), reinterpret_cast<const uint8_t*>(g.ptr), g.ld, lo - base, hi - base, xs, nx, y + base,
                  ldy, K, g.perm_d);
    base += g.rows;
  }
}

// ------------------------------------------------------------------ activations
int esize(DType t) { return t == DType::kF32 ? 4 : 2; }

inline float load(DType t, uintptr_t p, int64_t i) {
  if (t == DType::kF32) return reinterpret_cast<const float*>(p)[i];
  const uint16_t h = reinterpret_cast<const uint16_t*>(p)[i];
  return t == DType::kF16 ? f16_to_f32(h) : bf16_to_f32(h);
}

inline void store(DType t, uintptr_t p, int64_t i, float v) {
  if (t == DType::kF32) reinterpret_cast<float*>(p)[i] = v;
  else if (t == DType::kF16) reinterpret_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  else reinterpret_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

// y [K] float32 = rmsnorm(x row) * w, in float32 like the reference (the sum of squares in double).
void rms_norm(DType t, uintptr_t x, int64_t row, uintptr_t w, int64_t K, double eps, float* y) {
  double ss = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const float v = load(t, x, row * K + j);
    y[j] = v;
    ss += (double)v * v;
  }
  const float inv = 1.0f / std::sqrt((float)(ss / (double)K) + (float)eps);
  for (int64_t j = 0; j < K; ++j) y[j] = y[j] * inv * load(t, w, j);
}

// HF rotate_half RoPE of x [D] with the table rows cos / sin [D/2]
void rope(float* x, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// ------------------------------------------------------------------ checks
std::string need(bool ok, const std::string& what) { return ok ? "" : "d3kernels cpu: " + what; }

std::string check_weight(const char* name, uintptr_t p, int64_t rows, int64_t cols, int64_t layers = 1) {
  if (!p) return need(false, std::string(name) + " is a null pointer (no MatDesc)");
  for (int64_t l = 0; l < layers; ++l) {
    const MatDesc& m = mat(p, l);
    const std::string at = std::string(name) + (layers > 1 ? " layer " + std::to_string(l) : "");
    if (m.nseg < 1 || m.nseg > kMaxSegs) return need(false, at + ": " + std::to_string(m.nseg) + " row blocks (1 to 3)");
    int64_t total = 0;
    for (int64_t s = 0; s < m.nseg; ++s) {
      const Seg& g = m.seg[s];
      if (!g.ptr) return need(false, at + ": a null pointer");
      if (g.type < 0 || g.type >= kNumQTypes) return need(false, at + ": unknown storage type " + std::to_string(g.type));
      const int64_t rb = row_bytes(QType(g.type), cols);
      if (rb < 0)
        return need(false, at + ": " + std::to_string(cols) + " columns of " + qtype_name(QType(g.type)) +
                               " are not whole blocks (a misaligned row)");
      if (g.ld < rb) return need(false, at + ": row stride " + std::to_string(g.ld) + " < " + std::to_string(rb));
      if (g.rows < 1) return need(false, at + ": an empty row block");
      if (g.perm_d < 0 || g.perm_d % 2 || (g.perm_d && g.rows % g.perm_d))
        return need(false, at + ": perm_d " + std::to_string(g.perm_d) + " does not divide the block's rows");
      total += g.rows;
    }
    if (total != rows)
      return need(false, at + ": " + std::to_string(total) + " rows, expected " + std::to_string(rows));
  }
  return "";
}

std::string check_common(int64_t B, int64_t d, DType dt) {
  if (B < 1 || d < 1) return need(false, "B and d must be >= 1");
  if ((int)dt < 0 || (int)dt > 2) return need(false, "unknown activation dtype code " + std::to_string((int)dt));
  return "";
}

// ------------------------------------------------------------------ the ops' bodies
// The one addressing rule of both caches, per layer: a contiguous [B, H_kv, S, D] or a paged
// [num_pages, page_size, H_kv, D] K (or V), with validity [B, S] or [num_pages, page_size]. An entry is the
// validity index (b * S + p, or a paged slot); the stacked caches of write_kv add `entries() * H_kv * D`
// elements per layer.
struct KvAddr {
  Layout layout;
  int64_t B, Hkv, S, D, ps, max_pages, num_pages;
  const int32_t* bt;  // paged: block_table [B, max_pages] (read by slot(); write_kv writes at slot_mapping)
  int64_t entries() const { return layout == Layout::kContiguous ? B * S : num_pages * ps; }
  // the entry of row b's position p; -1 if its page is not in the pool
  int64_t slot(int64_t b, int64_t p) const {
    if (layout == Layout::kContiguous) return b * S + p;
    const int32_t page = bt[b * max_pages + p / ps];
    if (page < 0 || page >= num_pages) return -1;
    return (int64_t)page * ps + p % ps;
  }
  // element offset of row b's head g at entry e
  int64_t elem(int64_t b, int64_t g, int64_t e) const {
    if (layout == Layout::kContiguous) return ((b * Hkv + g) * S + (e - b * S)) * D;
    return (e * Hkv + g) * D;
  }
};

// The end of both layer halves: out = h + w @ x for the n running rows (rows[i], activations xs[i] of K values),
// out = h for the others; each thread takes a share of the d outputs. y: [n, d] scratch.
void residual_out(const Team& t, const MatDesc& w, const XRow* xs, int64_t K, const int64_t* rows, int64_t n,
                  float* y, DType dt, uintptr_t h, uintptr_t out, int64_t B, int64_t d) {
  int64_t lo, hi;
  t.share(d, 16, &lo, &hi);
  if (n) gemv_mat(w, lo, hi, xs, (int)n, y, d, K);
  for (int64_t i = 0, b = 0; b < B; ++b) {
    const bool runs = i < n && rows[i] == b;
    for (int64_t r = lo; r < hi; ++r) {
      const float hv = load(dt, h, b * d + r);
      store(dt, out, b * d + r, runs ? hv + y[i * d + r] : hv);
    }
    i += runs;
  }
  t.barrier();
}

struct AttnScratch {
  Rows x, o;
  float *qkv, *y, *scores;
  int64_t* rows;   // active rows
  uint8_t* bad;    // per active row: position out of range
  int64_t* slot;   // per active row: the write slot (paged) or b * S + pos
};

AttnScratch attn_scratch(Bump& m, const AttnArgs& a, int threads) {
  AttnScratch s;
  const int64_t R = (a.H + 2 * a.Hkv) * a.D, HD = a.H * a.D;
  s.x.make(m, a.B, a.d, quantized(mat(a.wqkv)));
  s.o.make(m, a.B, HD, quantized(mat(a.wo)));
  s.qkv = m.take<float>(a.B * R);
  s.y = m.take<float>(a.B * a.d);
  const int64_t S = a.layout == Layout::kPaged ? a.max_pages * a.page_size : a.S;
  s.scores = m.take<float>((S + 16) * threads);
  s.rows = m.take<int64_t>(a.B);
  s.bad = m.take<uint8_t>(a.B);
  s.slot = m.take<int64_t>(a.B);
  return s;
}

void attn_body(const AttnArgs& a, const Team& t, char* base) {
  Bump m{base};
  AttnScratch s = attn_scratch(m, a, t.n);
  const int64_t R = (a.H + 2 * a.Hkv) * a.D, HD = a.H * a.D, D = a.D, group = a.H / a.Hkv;
  const bool paged = a.layout == Layout::kPaged;
  const uint8_t* act = reinterpret_cast<const uint8_t*>(a.row_active);
  const int32_t* pos = reinterpret_cast<const int32_t*>(a.pos);
  const int64_t* slots = reinterpret_cast<const int64_t*>(a.slot_mapping);
  const int64_t limit = std::min(paged ? a.max_pages * a.page_size : a.S, a.rope_len);
  KvAddr kv{a.layout, a.B, a.Hkv, a.S, D, a.page_size, a.max_pages, a.num_pages,
            reinterpret_cast<const int32_t*>(a.block_table)};
  const int64_t es = esize(a.dtype);
  int64_t n = 0;  // every thread computes the same list
  for (int64_t b = 0; b < a.B; ++b)
    if (act[b] && (!paged || slots[b] >= 0)) s.rows[n++] = b;
  // 1. rmsnorm (+ rounding) of the active rows; each row's range check
  for (int64_t i = t.id; i < n; i += t.n) {
    const int64_t b = s.rows[i], p = pos[b];
    rms_norm(a.dtype, a.h, b, a.attn_norm, a.d, a.eps, s.x.f + i * a.d);
    s.x.point(i);
    s.x.round(i, 0, a.d);
    s.o.point(i);
    bool bad = p < 0 || p >= limit;
    if (paged) bad = bad || slots[b] >= kv.entries() || kv.slot(b, p) != slots[b];
    s.bad[i] = bad;   // 1: out of range, writes nothing and reads nothing
    s.slot[i] = bad ? -1 : kv.slot(b, p);   // paged: the slot_mapping entry, checked just above
    if (paged && !bad)   // 2: a page it reads lies outside the pool: it writes its K/V, its output is NaN
      for (int64_t pp = 0; pp <= p && !s.bad[i]; pp += a.page_size)
        if (kv.slot(b, pp) < 0) s.bad[i] = 2;
  }
  t.barrier();
  // 2. qkv [n, R] = wqkv @ x (+ bias); shares of whole heads, so un-permuted rows stay in the thread's share
  int64_t lo, hi;
  t.share(R, D, &lo, &hi);
  if (n) gemv_mat(mat(a.wqkv), lo, hi, s.x.x, (int)n, s.qkv, R, a.d);
  if (a.bqkv)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = lo; r < hi; ++r) s.qkv[i * R + r] += load(a.dtype, a.bqkv, r);
  t.barrier();
  // 3. every write (RoPE'd k, v, valid = 1), then 4. every read, as the reference orders them
  const QType kvt = QType((int)a.dtype);
  for (int64_t task = t.id; task < n * a.Hkv; task += t.n) {
    const int64_t i = task / a.Hkv, g = task % a.Hkv, b = s.rows[i];
    if (s.bad[i] == 1) continue;
    const int64_t p = pos[b];
    float* k = s.qkv + i * R + HD + g * D;
    const float* v = s.qkv + i * R + HD + a.Hkv * D + g * D;
    rope(k, D, reinterpret_cast<const float*>(a.rope_cos) + p * a.rope_ld,
         reinterpret_cast<const float*>(a.rope_sin) + p * a.rope_ld);
    const int64_t e = kv.elem(b, g, s.slot[i]);
    for (int64_t j = 0; j < D; ++j) {
      store(a.dtype, a.k_cache, e + j, k[j]);
      store(a.dtype, a.v_cache, e + j, v[j]);
    }
    if (g == 0) reinterpret_cast<uint8_t*>(a.kv_valid)[s.slot[i]] = 1;
  }
  t.barrier();
  float* sc = s.scores + t.id * (limit + 16);
  const float scale = 1.0f / std::sqrt((float)D);
  for (int64_t task = t.id; task < n * a.H; task += t.n) {
    const int64_t i = task / a.H, hd = task % a.H, g = hd / group, b = s.rows[i];
    float* o = s.o.f + i * HD + hd * D;
    if (s.bad[i]) {  // the kernels cannot raise: an out-of-range row, or one reading outside the pool, gets NaN
      for (int64_t j = 0; j < D; ++j) o[j] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const int64_t p = pos[b];
    float* q = s.qkv + i * R + hd * D;
    rope(q, D, reinterpret_cast<const float*>(a.rope_cos) + p * a.rope_ld,
         reinterpret_cast<const float*>(a.rope_sin) + p * a.rope_ld);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t pp = 0; pp <= p; ++pp) {
      const int64_t sl = kv.slot(b, pp);
      if (sl < 0 || !reinterpret_cast<const uint8_t*>(a.kv_valid)[sl]) {
        sc[pp] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const uint8_t* kr = reinterpret_cast<const uint8_t*>(a.k_cache) + kv.elem(b, g, sl) * es;
      sc[pp] = g_isa->dot(kvt, kr, q, D) * scale;
      mx = std::max(mx, sc[pp]);
    }
    float sum = 0.f;
    for (int64_t pp = 0; pp <= p; ++pp) {
      sc[pp] = sc[pp] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(sc[pp] - mx);
      sum += sc[pp];
    }
    std::fill(o, o + D, 0.f);
    for (int64_t pp = 0; pp <= p; ++pp) {
      if (sc[pp] == 0.f) continue;
      const int64_t sl = kv.slot(b, pp);
      g_isa->axpy(kvt, sc[pp] / sum, reinterpret_cast<const uint8_t*>(a.v_cache) + kv.elem(b, g, sl) * es,
                  o, D);
    }
  }
  t.barrier();
  // 5. round o, then 6. out = h + wo @ o; idle rows: out = h
  t.share(HD, kSpan, &lo, &hi);   // whole spans of the rounding
  for (int64_t i = 0; i < n; ++i) s.o.round(i, lo, hi);
  t.barrier();
  residual_out(t, mat(a.wo), s.o.x, HD, s.rows, n, s.y, a.dtype, a.h, a.out, a.B, a.d);
}

struct MlpScratch {
  Rows x, act;
  float *gu, *y;
  int64_t* rows;
};

MlpScratch mlp_scratch(Bump& m, const MlpArgs& a) {
  MlpScratch s;
  s.x.make(m, a.B, a.d, quantized(mat(a.w_gate_up)));
  s.act.make(m, a.B, a.F, quantized(mat(a.w_down)));
  s.gu = m.take<float>(a.B * 2 * a.F);
  s.y = m.take<float>(a.B * a.d);
  s.rows = m.take<int64_t>(a.B);
  return s;
}

void mlp_body(const MlpArgs& a, const Team& t, char* base) {
  Bump m{base};
  MlpScratch s = mlp_scratch(m, a);
  const uint8_t* act = reinterpret_cast<const uint8_t*>(a.row_active);
  const int64_t F = a.F;
  int64_t n = 0;
  for (int64_t b = 0; b < a.B; ++b)
    if (act[b]) s.rows[n++] = b;
  for (int64_t i = t.id; i < n; i += t.n) {
    rms_norm(a.dtype, a.h, s.rows[i], a.mlp_norm, a.d, a.eps, s.x.f + i * a.d);
    s.x.point(i);
    s.x.round(i, 0, a.d);
    s.act.point(i);
  }
  t.barrier();
  // gate row j and up row F + j in the same thread, so silu(g) * u needs no barrier
  int64_t lo, hi;
  t.share(F, kSpan, &lo, &hi);   // whole spans of the rounding, which each thread rounds for its own share
  const MatDesc& wgu = mat(a.w_gate_up);
  if (n) {
    gemv_mat(wgu, lo, hi, s.x.x, (int)n, s.gu, 2 * F, a.d);
    gemv_mat(wgu, F + lo, F + hi, s.x.x, (int)n, s.gu, 2 * F, a.d);
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = lo; j < hi; ++j) s.act.f[i * F + j] = silu(s.gu[i * 2 * F + j]) * s.gu[i * 2 * F + F + j];
    s.act.round(i, lo, hi);
  }
  t.barrier();
  residual_out(t, mat(a.w_down), s.act.x, F, s.rows, n, s.y, a.dtype, a.h, a.out, a.B, a.d);
}

struct HeadScratch {
  Rows x;
  int64_t* rows;   // the rows computed
  float* y;        // [n, V] when only some rows are computed, else null (written in place)
};

HeadScratch head_scratch(Bump& m, const LmHeadArgs& a) {
  HeadScratch s;
  s.x.make(m, a.B, a.d, quantized(mat(a.w_lm)));
  s.rows = m.take<int64_t>(a.B);
  s.y = a.row_active ? m.take<float>(a.B * a.V) : nullptr;
  return s;
}

// logits of the active rows only: an idle slot costs no multiply (the GEMM's tiles take the active rows alone)
void head_body(const LmHeadArgs& a, const Team& t, char* base) {
  Bump m{base};
  HeadScratch s = head_scratch(m, a);
  const uint8_t* act = reinterpret_cast<const uint8_t*>(a.row_active);
  int64_t n = 0;  // every thread computes the same list
  for (int64_t b = 0; b < a.B; ++b)
    if (!act || act[b]) s.rows[n++] = b;
  for (int64_t i = t.id; i < n; i += t.n) {
    rms_norm(a.dtype, a.h, s.rows[i], a.final_norm, a.d, a.eps, s.x.f + i * a.d);
    s.x.point(i);
    s.x.round(i, 0, a.d);
  }
  t.barrier();
  int64_t lo, hi;
  t.share(a.V, 64, &lo, &hi);
  float* logits = reinterpret_cast<float*>(a.logits);
  const bool direct = n == a.B;   // rows i = b: straight into the logits
  if (n) gemv_mat(mat(a.w_lm), lo, hi, s.x.x, (int)n, direct ? logits : s.y, a.V, a.d);
  if (!direct)   // each thread moves the columns it computed
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(logits + s.rows[i] * a.V + lo, s.y + i * a.V + lo, (hi - lo) * sizeof(float));
  t.barrier();
}

struct KvScratch {
  Rows x;     // one row per thread
  float* kv;  // [threads, 2 H_kv D]
};

KvScratch kv_scratch(Bump& m, const WriteKvArgs& a, int threads) {
  KvScratch s;
  bool q = false;
  for (int64_t l = 0; l < a.L; ++l) q = q || quantized(mat(a.wqkv, l));
  s.x.make(m, threads, a.d, q);
  s.kv = m.take<float>(threads * 2 * a.Hkv * a.D);
  return s;
}

void kv_body(const WriteKvArgs& a, const Team& t, char* base) {
  Bump m{base};
  KvScratch s = kv_scratch(m, a, t.n);
  const bool paged = a.layout == Layout::kPaged;
  const uint8_t* flags = reinterpret_cast<const uint8_t*>(a.flags);
  const int32_t* pos = reinterpret_cast<const int32_t*>(a.pos);
  const int64_t* slots = reinterpret_cast<const int64_t*>(a.slot_mapping);
  const int64_t D = a.D, HD = a.H * a.D, KV = a.Hkv * D, es = esize(a.dtype);
  const KvAddr kv{a.layout, a.B, a.Hkv, a.S, D, a.page_size, 0, a.num_pages, nullptr};
  const int64_t per_layer = kv.entries(), layer_elems = per_layer * KV;
  const int64_t limit = std::min(paged ? std::numeric_limits<int64_t>::max() : a.S, a.rope_len);
  uint8_t* valid = reinterpret_cast<uint8_t*>(a.kv_valid);
  // the entry (slot) row b writes, or -1: out of range or (paged) no slot
  auto slot_of = [&](int64_t b) -> int64_t {
    const int64_t p = pos[b];
    if (p < 0 || p >= limit) return -1;
    if (!paged) return b * a.S + p;
    return slots[b] >= 0 && slots[b] < per_layer ? slots[b] : -1;
  };
  for (int64_t task = t.id; task < a.L * a.B; task += t.n) {
    const int64_t l = task / a.B, b = task % a.B, e = slot_of(b);
    if (!flags[l * a.B + b] || e < 0) continue;
    if (a.mode == 0) {
      valid[l * per_layer + e] = 0;
    } else if (a.mode == 2) {
      int64_t src = l - 1;
      while (src >= 0 && flags[src * a.B + b]) --src;
      if (src < 0) {
        valid[l * per_layer + e] = 0;
        continue;
      }
      for (int64_t g = 0; g < a.Hkv; ++g) {
        const int64_t to = l * layer_elems + kv.elem(b, g, e), from = src * layer_elems + kv.elem(b, g, e);
        std::memcpy(reinterpret_cast<char*>(a.k_cache) + to * es, reinterpret_cast<char*>(a.k_cache) + from * es, D * es);
        std::memcpy(reinterpret_cast<char*>(a.v_cache) + to * es, reinterpret_cast<char*>(a.v_cache) + from * es, D * es);
      }
      valid[l * per_layer + e] = valid[src * per_layer + e];
    } else {  // project: layer l's K/V rows applied to rmsnorm(src_h[b]) with layer l's norm
      float* x = s.x.f + t.id * a.d;
      rms_norm(a.dtype, a.src_h, b, a.norms + (uintptr_t)(l * a.d * es), a.d, a.eps, x);
      s.x.point(t.id);
      s.x.round(t.id, 0, a.d);
      float* kvr = s.kv + t.id * 2 * KV;
      // layer l's K and V rows (HD .. HD + 2 KV of its wqkv), written at kvr[0 .. 2 KV)
      gemv_mat(mat(a.wqkv, l), HD, HD + 2 * KV, &s.x.x[t.id], 1, kvr - HD, 2 * KV, a.d);
      if (a.bqkv) {
        const int64_t R = HD + 2 * KV;
        for (int64_t r = 0; r < 2 * KV; ++r) kvr[r] += load(a.dtype, a.bqkv, l * R + HD + r);
      }
      const int64_t p = pos[b];
      for (int64_t g = 0; g < a.Hkv; ++g) {
        rope(kvr + g * D, D, reinterpret_cast<const float*>(a.rope_cos) + p * a.rope_ld,
             reinterpret_cast<const float*>(a.rope_sin) + p * a.rope_ld);
        const int64_t to = l * layer_elems + kv.elem(b, g, e);
        for (int64_t j = 0; j < D; ++j) {
          store(a.dtype, a.k_cache, to + j, kvr[g * D + j]);
          store(a.dtype, a.v_cache, to + j, kvr[KV + g * D + j]);
        }
      }
      valid[l * per_layer + e] = 1;
    }
  }
  t.barrier();
}

// ------------------------------------------------------------------ argument checks
std::string check(const AttnArgs& a) {
  std::string e = check_common(a.B, a.d, a.dtype);
  if (!e.empty()) return e;
  if (a.H < 1 || a.Hkv < 1 || a.H % a.Hkv || a.D < 2 || a.D % 2) return need(false, "bad head counts or head_dim");
  if (!a.out || !a.h || !a.attn_norm || !a.k_cache || !a.v_cache || !a.kv_valid || !a.pos || !a.rope_cos ||
      !a.rope_sin || !a.row_active)
    return need(false, "attn_block: a null pointer");
  if (a.layout == Layout::kPaged && (!a.block_table || !a.slot_mapping || a.page_size < 1 || a.max_pages < 1))
    return need(false, "attn_block_paged: block_table, slot_mapping, page_size and max_pages are needed");
  if (a.rope_ld < a.D / 2) return need(false, "rope table row stride < D/2");
  e = check_weight("wqkv", a.wqkv, (a.H + 2 * a.Hkv) * a.D, a.d);
  return e.empty() ? check_weight("wo", a.wo, a.d, a.H * a.D) : e;
}

std::string check(const MlpArgs& a) {
  std::string e = check_common(a.B, a.d, a.dtype);
  if (!e.empty()) return e;
  if (a.F < 1 || !a.out || !a.h || !a.mlp_norm || !a.row_active) return need(false, "mlp_block: bad F or a null pointer");
  e = check_weight("w_gate_up", a.w_gate_up, 2 * a.F, a.d);
  if (e.empty()) e = check_weight("w_down", a.w_down, a.d, a.F);
  if (e.empty() && quantized(mat(a.w_down)) && a.F % kBlock) return need(false, "w_down: F is not a multiple of 32");
  return e;
}

std::string check(const WriteKvArgs& a) {
  std::string e = check_common(a.B, a.d, a.dtype);
  if (!e.empty()) return e;
  if (a.L < 1 || a.H < 1 || a.Hkv < 1 || a.D < 2 || a.D % 2 || a.mode < 0 || a.mode > 2)
    return need(false, "write_kv: bad L, heads, head_dim or mode");
  if (!a.k_cache || !a.v_cache || !a.kv_valid || !a.src_h || !a.norms || !a.pos || !a.rope_cos || !a.rope_sin ||
      !a.flags)
    return need(false, "write_kv: a null pointer");
  if (a.layout == Layout::kPaged && (!a.slot_mapping || a.page_size < 1 || a.num_pages < 1))
    return need(false, "write_kv_paged: slot_mapping, page_size and num_pages are needed");
  return check_weight("wqkv", a.wqkv, (a.H + 2 * a.Hkv) * a.D, a.d, a.L);
}

std::string check(const LmHeadArgs& a) {
  std::string e = check_common(a.B, a.d, a.dtype);
  if (!e.empty()) return e;
  if (a.V < 1 || !a.logits || !a.h || !a.final_norm) return need(false, "lm_head: bad V or a null pointer");
  return check_weight("w_lm", a.w_lm, a.V, a.d);
}

template <class Args>
std::size_t scratch_bytes(const Args& a, int threads) {
  Bump m{nullptr};
  if constexpr (std::is_same_v<Args, AttnArgs>) attn_scratch(m, a, threads);
  else if constexpr (std::is_same_v<Args, MlpArgs>) mlp_scratch(m, a);
  else if constexpr (std::is_same_v<Args, WriteKvArgs>) kv_scratch(m, a, threads);
  else head_scratch(m, a);
  return m.used;
}

template <class Args, class Body>
std::string launch(const Args& a, Body body) {
  std::string e = check(a);
  if (!e.empty()) return e;
  char* base = arena(scratch_bytes(a, g_threads));
  in_team([&](const Team& t) { body(a, t, base); });
  return "";
}

}  // namespace

// ------------------------------------------------------------------ public
namespace {
struct TypeInfo {
  const char* name;
  int values, bytes;   // per block (1 value for the float types)
};
constexpr TypeInfo kTypes[kNumQTypes] = {{"f32", 1, 4},    {"f16", 1, 2},    {"bf16", 1, 2},   {"q4_0", 32, 18},
                                         {"q4_1", 32, 20}, {"q8_0", 32, 34}, {"q5_0", 32, 22}, {"q5_1", 32, 24},
                                         {"q4_K", 256, 144}, {"q5_K", 256, 176}, {"q6_K", 256, 210}};
}  // namespace

int64_t row_bytes(QType q, int64_t cols) {
  const int i = (int)q;
  if (i < 0 || i >= kNumQTypes || cols < 1) return -1;
  const TypeInfo& t = kTypes[i];
  return cols % t.values ? -1 : cols / t.values * t.bytes;
}

const char* qtype_name(QType q) {
  const int i = (int)q;
  return i >= 0 && i < kNumQTypes ? kTypes[i].name : "unknown";
}

std::string attn_block(const AttnArgs& a) { return launch(a, attn_body); }
std::string mlp_block(const MlpArgs& a) { return launch(a, mlp_body); }
std::string write_kv(const WriteKvArgs& a) { return launch(a, kv_body); }
std::string lm_head(const LmHeadArgs& a) { return launch(a, head_body); }

std::string linear(uintptr_t y, uintptr_t x, uintptr_t w, QType w_type, int64_t w_ld, uintptr_t bias, int64_t N,
                   int64_t R, int64_t K) {
  if (!y || !x || N < 1 || R < 1 || K < 1) return need(false, "linear: null pointer or empty size");
  const MatDesc desc{1, {{(int64_t)w, (int64_t)w_type, w_ld, R, 0}}};
  std::string e = check_weight("w", reinterpret_cast<uintptr_t>(&desc), R, K);
  if (!e.empty()) return e;
  const bool q = quantized(desc);
  Bump count{nullptr};
  Rows tmp;
  tmp.make(count, N, K, q);
  Bump m{arena(count.used)};
  Rows rows;
  rows.make(m, N, K, q);
  in_team([&](const Team& t) {
    for (int64_t i = t.id; i < N; i += t.n) {
      std::memcpy(rows.f + i * K, reinterpret_cast<const float*>(x) + i * K, K * 4);
      rows.point(i);
      rows.round(i, 0, K);
    }
    t.barrier();
    int64_t lo, hi;
    t.share(R, 16, &lo, &hi);
    float* out = reinterpret_cast<float*>(y);
    // a block of x rows at a time keeps them in cache while each weight row is read once per block
    for (int64_t i0 = 0; i0 < N; i0 += 64) {
      const int nx = (int)std::min<int64_t>(64, N - i0);
      gemv_mat(desc, lo, hi, rows.x + i0, nx, out + i0 * R, R, K);
    }
    if (bias)
      for (int64_t i = 0; i < N; ++i)
        for (int64_t r = lo; r < hi; ++r) out[i * R + r] += reinterpret_cast<const float*>(bias)[r];
  });
  return "";
}

std::string embed(uintptr_t out, DType dtype, uintptr_t ids, uintptr_t w, QType w_type, int64_t w_ld, int64_t N,
                  int64_t R, int64_t K) {
  if (!out || !ids || N < 0 || R < 1 || K < 1) return need(false, "embed: null pointer or empty size");
  const MatDesc desc{1, {{(int64_t)w, (int64_t)w_type, w_ld, R, 0}}};
  std::string e = check_weight("w", reinterpret_cast<uintptr_t>(&desc), R, K);
  if (!e.empty()) return e;
  const int64_t* id = reinterpret_cast<const int64_t*>(ids);
  std::vector<float> row(K);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = id[i];
    if (r >= 0 && r < R) g_isa->decode_row(w_type, reinterpret_cast<const uint8_t*>(w) + r * w_ld, row.data(), K);
    else std::fill(row.begin(), row.end(), std::numeric_limits<float>::quiet_NaN());
    for (int64_t j = 0; j < K; ++j) store(dtype, out, i * K + j, row[j]);
  }
  return "";
}

std::string argmax(uintptr_t tokens, uintptr_t logits, int64_t B, int64_t V, int64_t ld) {
  if (!tokens || !logits || B < 1 || V < 1 || ld < V) return need(false, "argmax: bad arguments");
  for (int64_t b = 0; b < B; ++b) {
    const float* x = reinterpret_cast<const float*>(logits) + b * ld;
    int64_t best = 0;
    for (int64_t j = 0; j < V; ++j) {
      if (std::isnan(x[j])) {
        best = j;
        break;
      }
      if (x[j] > x[best]) best = j;
    }
    reinterpret_cast<int64_t*>(tokens)[b] = best;
  }
  return "";
}

std::string Program::run() const {
  std::size_t bytes = 0;
  for (const Op& op : ops_) {
    switch (op.kind) {
      case 0: bytes = std::max(bytes, scratch_bytes(op.attn, g_threads)); break;
      case 1: bytes = std::max(bytes, scratch_bytes(op.mlp, g_threads)); break;
      case 2: bytes = std::max(bytes, scratch_bytes(op.kv, g_threads)); break;
      default: bytes = std::max(bytes, scratch_bytes(op.head, g_threads)); break;
    }
  }
  char* base = arena(bytes);
  in_team([&](const Team& t) {
    for (const Op& op : ops_) {
      switch (op.kind) {
        case 0: attn_body(op.attn, t, base); break;
        case 1: mlp_body(op.mlp, t, base); break;
        case 2: kv_body(op.kv, t, base); break;
        default: head_body(op.head, t, base); break;
      }
    }
  });
  return "";
}

std::string Program::check_op(int kind, const void* args) {
  switch (kind) {
    case 0: return check(*static_cast<const AttnArgs*>(args));
    case 1: return check(*static_cast<const MlpArgs*>(args));
    case 2: return check(*static_cast<const WriteKvArgs*>(args));
    default: return check(*static_cast<const LmHeadArgs*>(args));
  }
}

const char* isa() { return g_isa->name; }

std::vector<std::string> isas_supported() {
  std::vector<std::string> out;
  for (const char* n : {"avx512", "avx2", "scalar"})
    if (cpu_has(n)) out.push_back(n);
  return out;
}

std::string set_isa(const std::string& name) {
  const IsaKernels* table = name == "avx512" ? &kAvx512 : name == "avx2" ? &kAvx2 : name == "scalar" ? &kScalar : nullptr;
  if (!table) return "unknown instruction set '" + name + "' (avx512, avx2, scalar)";
  if (!cpu_has(name.c_str())) return "this CPU lacks the '" + name + "' instructions the kernels use";
  g_isa = table;
  return "";
}

int num_threads() { return g_threads; }
void set_num_threads(int n) { g_threads = std::max(1, n); }

}  // namespace d3k::cpu
